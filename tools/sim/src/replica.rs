//! One simulated pod: a device that runs one thing at a time — an encoder batch or a decoder step — with the
//! queues of the services it hosts.
//!
//! Policy, as the services implement it:
//! - encoder (`services/encoder`, dynamic batching): a batch starts once `max_batch_images` images wait or the first
//!   waiting image has waited `max_queue_delay` since its admission; it takes up to `max_batch_images` images in
//!   admission order;
//! - decoder (`services/decoder`, continuous batching): before each step, waiting requests are admitted first come,
//!   first served while fewer than `max_running_sequences` run and the step's prompt tokens stay within
//!   `max_prefill_tokens_per_step` (one longer prompt still runs alone), stopping at the first that does not fit;
//!   one packed step prefills the admitted prompts (each yields its first token) and decodes one token for every
//!   running sequence; a sequence leaves the batch after its last token. The KV reservation never binds here (every
//!   request's prompt + output fits the context), so it is not modelled;
//! - a monolithic pod hosts both on one device and alternates, as a monolithic engine's iteration encodes the images
//!   of new requests and then runs the decoder step: after an encoder batch, a decoder step if there are sequences;
//!   after a decoder step, an encoder batch if one is ready. Its decoder steps therefore wait for its encoder
//!   batches (TPOT) and its encoder batches for its decoder steps (TTFT): the interference a split deployment
//!   avoids.

use std::collections::{BTreeMap, VecDeque};

use crate::calibration::Calibration;
use crate::keda::PoolKind;

/// A pod's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// Created, not serving yet (start-up time).
    Starting,
    /// Serving.
    Ready,
    /// Scaled in: takes no new calls, finishes what it holds.
    Draining,
    /// Gone.
    Terminated,
}

/// An image waiting in an encoder queue.
#[derive(Debug, Clone, Copy)]
pub struct EncodeItem {
    /// The request index.
    pub request: u32,
    /// When the replica admitted it.
    pub admitted: f64,
    /// When the gateway sent the call (before any gateway-side queue).
    pub sent: f64,
}

/// A sequence in a decoder.
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    /// The request index.
    pub request: u32,
    /// When the decoder received it.
    pub arrived: f64,
    /// Prompt positions (text + image tokens).
    pub prompt: u32,
    /// Tokens to generate.
    pub output: u32,
    /// Tokens generated so far.
    pub generated: u32,
}

/// What the device runs now.
#[derive(Debug, Clone)]
pub enum Work {
    /// An encoder batch.
    EncoderBatch(Vec<EncodeItem>),
    /// One decoder step over the running sequences.
    DecoderStep,
}

/// A simulated pod.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The pool it belongs to.
    pub pool: usize,
    /// What it hosts.
    pub kind: PoolKind,
    /// When it was created (counted from here in replica-hours).
    pub created: f64,
    /// When it terminated.
    pub ended: Option<f64>,
    /// Its life-cycle state.
    pub state: PodState,
    /// Calls open on it (the gateway's view, used by the balancer).
    pub in_flight: u32,
    /// Images waiting for a batch.
    pub encode_queue: VecDeque<EncodeItem>,
    /// Sequences waiting for admission.
    pub waiting: VecDeque<Sequence>,
    /// Sequences in the running batch.
    pub running: Vec<Sequence>,
    /// Monolithic pods: request → (images still to encode here, its sequence).
    pub local_encodes: BTreeMap<u32, (u32, Sequence)>,
    /// What the device runs.
    pub busy: Option<Work>,
    /// A pending batch timer.
    pub timer_at: Option<f64>,
    /// Whether the last work was an encoder batch (monolithic pods alternate).
    pub last_was_encoder: bool,
}

impl Replica {
    /// A new pod of `kind` in pool `pool`.
    pub fn new(pool: usize, kind: PoolKind, created: f64, state: PodState) -> Self {
        Self {
            pool,
            kind,
            created,
            ended: None,
            state,
            in_flight: 0,
            encode_queue: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            local_encodes: BTreeMap::new(),
            busy: None,
            timer_at: None,
            last_was_encoder: false,
        }
    }

    /// Whether it runs an encoder.
    pub fn has_encoder(&self) -> bool {
        matches!(self.kind, PoolKind::Encoder | PoolKind::Monolith)
    }

    /// Whether it runs a decoder.
    pub fn has_decoder(&self) -> bool {
        matches!(self.kind, PoolKind::Decoder | PoolKind::Monolith)
    }

    /// Whether it holds no work at all.
    pub fn is_idle(&self) -> bool {
        self.busy.is_none()
            && self.encode_queue.is_empty()
            && self.waiting.is_empty()
            && self.running.is_empty()
            && self.local_encodes.is_empty()
    }

    /// What the device should do next at `now`, if anything: an encoder batch when one is ready, otherwise a decoder
    /// step when there are sequences; `Err(Some(t))` asks for a batch timer at `t`, `Err(None)` means nothing to do.
    pub fn next_work(
        &mut self,
        now: f64,
        calibration: &Calibration,
    ) -> Result<(Work, f64), Option<f64>> {
        let encoder = &calibration.encoder;
        let has_sequences = !(self.running.is_empty() && self.waiting.is_empty());
        let decoder_turn = self.has_decoder() && has_sequences && self.last_was_encoder;
        if self.has_encoder()
            && !decoder_turn
            && let Some(first) = self.encode_queue.front()
        {
            let deadline = first.admitted + encoder.max_queue_delay_seconds;
            let full = self.encode_queue.len() >= encoder.max_batch_images as usize;
            if full || deadline <= now {
                let take = self
                    .encode_queue
                    .len()
                    .min(encoder.max_batch_images as usize);
                let items: Vec<EncodeItem> = self.encode_queue.drain(..take).collect();
                let mean = calibration.encoder_batch_seconds(items.len() as u32);
                self.last_was_encoder = true;
                return Ok((Work::EncoderBatch(items), mean));
            }
        }
        if self.has_decoder() && has_sequences {
            self.last_was_encoder = false;
            let seconds = self.admit_and_time_step(calibration);
            return Ok((Work::DecoderStep, seconds));
        }
        match self.encode_queue.front() {
            Some(first) if self.has_encoder() => {
                Err(Some(first.admitted + encoder.max_queue_delay_seconds))
            }
            _ => Err(None),
        }
    }

    /// Admits waiting sequences into the batch and returns the step's duration.
    fn admit_and_time_step(&mut self, calibration: &Calibration) -> f64 {
        let decoder = &calibration.decoder;
        let mut prefill_tokens: u32 = 0;
        while self.running.len() < decoder.max_running_sequences as usize {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if prefill_tokens > 0
                && prefill_tokens.saturating_add(front.prompt) > decoder.max_prefill_tokens_per_step
            {
                break;
            }
            prefill_tokens = prefill_tokens.saturating_add(front.prompt);
            if let Some(sequence) = self.waiting.pop_front() {
                self.running.push(sequence);
            }
        }
        let decoding: Vec<&Sequence> = self.running.iter().filter(|s| s.generated > 0).collect();
        let rows = decoding.len() as u32;
        let mean_context = if decoding.is_empty() {
            0.0
        } else {
            decoding
                .iter()
                .map(|s| f64::from(s.prompt + s.generated))
                .sum::<f64>()
                / f64::from(rows)
        };
        calibration.decoder_step_seconds(rows, mean_context, prefill_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::{
        DecoderCalibration, EncoderCalibration, EncoderPoint, ServiceDistribution, StepPoint,
    };

    fn calibration() -> Calibration {
        Calibration {
            name: "unit".to_owned(),
            source: "test".to_owned(),
            pod_startup_seconds: 0.0,
            encoder: EncoderCalibration {
                max_batch_images: 4,
                max_queue_delay_seconds: 0.01,
                max_queued_images: 64,
                service: ServiceDistribution::Deterministic,
                throughput: vec![EncoderPoint {
                    batch: 1,
                    images_per_second: 100.0,
                }],
            },
            decoder: DecoderCalibration {
                max_running_sequences: 2,
                max_waiting_requests: 64,
                max_prefill_tokens_per_step: 100,
                prefill_tokens_per_second: 1000.0,
                image_tokens: 64,
                step: vec![StepPoint {
                    batch: 1,
                    context: 10,
                    ms: 10.0,
                }],
            },
        }
    }

    fn sequence(request: u32, prompt: u32) -> Sequence {
        Sequence {
            request,
            arrived: 0.0,
            prompt,
            output: 8,
            generated: 0,
        }
    }

    fn image(request: u32) -> EncodeItem {
        EncodeItem {
            request,
            admitted: 0.0,
            sent: 0.0,
        }
    }

    #[test]
    fn an_encoder_batch_waits_for_the_delay_unless_it_is_full() {
        let calibration = calibration();
        let mut replica = Replica::new(0, PoolKind::Encoder, 0.0, PodState::Ready);
        replica.encode_queue.extend([image(0), image(1)]);
        // Not full, delay not over: a timer at admission + 10 ms.
        assert!(
            matches!(replica.next_work(0.005, &calibration), Err(Some(t)) if (t - 0.01).abs() < 1e-12)
        );
        replica.encode_queue.extend([image(2), image(3), image(4)]);
        // Full (4 of 5 waiting): starts at once with 4 images, in admission order.
        match replica.next_work(0.005, &calibration) {
            Ok((Work::EncoderBatch(items), seconds)) => {
                let requests: Vec<u32> = items.iter().map(|item| item.request).collect();
                assert_eq!(requests, [0, 1, 2, 3]);
                assert!((seconds - 0.04).abs() < 1e-12);
            }
            other => panic!("expected a batch, got {other:?}"),
        }
        assert_eq!(replica.encode_queue.len(), 1);
    }

    #[test]
    fn admission_stops_at_the_first_prompt_over_the_prefill_budget() {
        let calibration = calibration();
        let mut replica = Replica::new(0, PoolKind::Decoder, 0.0, PodState::Ready);
        // 150 tokens alone exceed the 100-token budget but run alone; the next waits for the next step.
        replica.waiting.extend([sequence(0, 150), sequence(1, 10)]);
        match replica.next_work(0.0, &calibration) {
            Ok((Work::DecoderStep, seconds)) => assert!((seconds - 0.15).abs() < 1e-12),
            other => panic!("expected a step, got {other:?}"),
        }
        assert_eq!(replica.running.len(), 1);
        assert_eq!(replica.waiting.len(), 1);
    }

    #[test]
    fn a_monolithic_pod_alternates_encoder_batches_and_decoder_steps() {
        let calibration = calibration();
        let mut replica = Replica::new(0, PoolKind::Monolith, 0.0, PodState::Ready);
        replica.running.push(Sequence {
            generated: 1,
            ..sequence(0, 10)
        });
        replica.encode_queue.extend((1..=12).map(image));
        let mut kinds = Vec::new();
        for _ in 0..5 {
            match replica.next_work(1.0, &calibration) {
                Ok((Work::EncoderBatch(_), _)) => kinds.push("encode"),
                Ok((Work::DecoderStep, _)) => kinds.push("step"),
                Err(_) => kinds.push("idle"),
            }
        }
        assert_eq!(kinds, ["encode", "step", "encode", "step", "encode"]);
    }
}
