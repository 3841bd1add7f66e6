//! The batching loop of the engine thread.
//!
//! Take the first live item; wait for more until `max_queue_delay` (`batching.max_queue_delay_seconds`) after that
//! item's admission (items already waiting are taken at once, even past it) or until `max_batch_images` is reached
//! (an item that does not fit is carried to the next batch); drop whatever expired or lost its caller meanwhile; run one model call; split the
//! embeddings back over the items' replies. A failing or panicking model call fails only its own batch.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kosmos_runtime::telemetry::span_context;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{BatchEncoder, ChunkOutput, EngineStats, WorkItem};
use crate::config::Batching;
use crate::error::RequestError;
use crate::metrics::EncoderMetrics;

/// How often an idle engine looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

pub(super) struct Batcher<E> {
    encoder: E,
    receiver: Receiver<WorkItem>,
    settings: Batching,
    stats: Arc<EngineStats>,
    stopping: Arc<AtomicBool>,
    /// An item taken from the queue that did not fit the previous batch.
    carry: Option<WorkItem>,
    next_batch_id: u64,
    metrics: Option<Arc<EncoderMetrics>>,
}

impl<E: BatchEncoder> Batcher<E> {
    pub(super) fn new(
        encoder: E,
        receiver: Receiver<WorkItem>,
        settings: Batching,
        stats: Arc<EngineStats>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            encoder,
            receiver,
            settings,
            stats,
            stopping,
            carry: None,
            next_batch_id: 0,
            metrics: None,
        }
    }

    pub(super) fn with_metrics(mut self, metrics: Option<Arc<EncoderMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs batches until stopped (and idle) or until every handle is dropped.
    pub(super) fn run(mut self) {
        while let Some(first) = self.next_first_item() {
            let batch = self.fill_batch(first);
            if !batch.is_empty() {
                self.execute(batch);
            }
        }
        tracing::debug!("encoder engine stopped");
    }

    fn next_first_item(&mut self) -> Option<WorkItem> {
        loop {
            let item = match self.carry.take() {
                Some(item) => item,
                None => match self.receiver.recv_timeout(IDLE_POLL) {
                    Ok(item) => item,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.stopping.load(Ordering::Acquire) {
                            return None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return None,
                },
            };
            if let Some(item) = keep_if_live(item, Instant::now()) {
                return Some(item);
            }
        }
    }

    fn fill_batch(&mut self, first: WorkItem) -> Vec<WorkItem> {
        let max_images = self.settings.max_batch_images.get();
        let wait_until = first.admitted_at + self.settings.max_queue_delay;
        let mut images = first.images.len();
        let mut batch = vec![first];
        while images < max_images {
            let now = Instant::now();
            let next = if now >= wait_until {
                self.receiver.try_recv().ok()
            } else {
                self.receiver.recv_timeout(wait_until - now).ok()
            };
            let Some(next) = next else { break };
            let Some(item) = keep_if_live(next, Instant::now()) else {
                continue;
            };
            if images + item.images.len() > max_images {
                self.carry = Some(item);
                break;
            }
            images += item.images.len();
            batch.push(item);
        }
        // A last look before spending compute: the wait may have outlived some callers or their deadlines.
        let now = Instant::now();
        batch
            .into_iter()
            .filter_map(|item| keep_if_live(item, now))
            .collect()
    }

    fn execute(&mut self, mut batch: Vec<WorkItem>) {
        let started = Instant::now();
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let batch_size: usize = batch.iter().map(|item| item.images.len()).sum();
        // A root span of its own (a batch serves several traces), linked to the span of every request in it.
        let batch_span = tracing::info_span!(
            parent: None,
            "encoder.batch",
            batch.id = batch_id,
            batch.size = batch_size,
            batch.requests = batch.len(),
        );
        for item in &mut batch {
            item.admission.release();
            // Closes the item's `encoder.queue` span: its wait ends here.
            item.queue_span = tracing::Span::none();
            batch_span.add_link(span_context(&item.span));
            if let Some(metrics) = &self.metrics {
                metrics.queued(
                    item.images.len(),
                    started.saturating_duration_since(item.admitted_at),
                );
            }
        }
        let inputs: Vec<&super::ModelInput> =
            batch.iter().flat_map(|item| item.images.iter()).collect();
        let encoder = &mut self.encoder;
        let outcome =
            batch_span.in_scope(|| catch_unwind(AssertUnwindSafe(|| encoder.encode(&inputs))));
        let encode_time = started.elapsed();
        let result = match outcome {
            Ok(Ok(embeddings)) if embeddings.len() == batch_size => Ok(embeddings),
            Ok(Ok(embeddings)) => Err(RequestError::Engine(format!(
                "the model returned {} embeddings for {batch_size} images",
                embeddings.len()
            ))),
            Ok(Err(err)) => Err(RequestError::Engine(err.to_string())),
            Err(panic) => Err(RequestError::Engine(format!(
                "the model panicked: {}",
                panic_message(panic.as_ref())
            ))),
        };
        match result {
            Ok(embeddings) => {
                self.stats.batches_executed.fetch_add(1, Ordering::AcqRel);
                self.stats
                    .images_encoded
                    .fetch_add(batch_size as u64, Ordering::AcqRel);
                if let Some(metrics) = &self.metrics {
                    metrics.batch_executed(batch_size, encode_time);
                }
                tracing::debug!(
                    batch_id,
                    batch_size,
                    requests = batch.len(),
                    encode_ms = encode_time.as_secs_f64() * 1e3,
                    "encoded batch"
                );
                let mut embeddings = embeddings.into_iter();
                for item in batch {
                    let mine: Vec<Vec<f32>> = embeddings.by_ref().take(item.images.len()).collect();
                    let output = ChunkOutput {
                        embeddings: mine,
                        queue_time: started.saturating_duration_since(item.admitted_at),
                        encode_time,
                        batch_size,
                        batch_id,
                    };
                    // The caller may have gone away while the batch ran; nothing is lost but the answer.
                    let _ = item.reply.send(Ok(output));
                }
            }
            Err(err) => {
                batch_span.in_scope(
                    || tracing::error!(batch_id, batch_size, %err, "engine batch failed"),
                );
                for item in batch {
                    let _ = item.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// The item if its caller still waits and its deadline has not passed; otherwise answers (or skips) it.
fn keep_if_live(item: WorkItem, now: Instant) -> Option<WorkItem> {
    if item.reply.is_closed() {
        item.span
            .in_scope(|| tracing::debug!("caller went away, skipping its images"));
        return None;
    }
    if item.deadline.is_some_and(|deadline| deadline <= now) {
        item.span
            .in_scope(|| tracing::debug!("deadline passed in the queue, skipping its images"));
        let _ = item.reply.send(Err(RequestError::DeadlineExceeded(
            "while queued for the encoder",
        )));
        return None;
    }
    Some(item)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::sync::Mutex;

    use super::super::{EngineHandle, EngineThread, start};
    use super::*;

    /// Records every batch; each embedding is `[first pixel value]`; sleeps `delay` per batch; panics on a pixel
    /// value of -1 and fails on -2.
    struct FakeEncoder {
        batches: Arc<Mutex<Vec<Vec<f32>>>>,
        delay: Duration,
    }

    impl BatchEncoder for FakeEncoder {
        type Error = String;

        fn encode(
            &mut self,
            images: &[&super::super::ModelInput],
        ) -> Result<Vec<Vec<f32>>, String> {
            std::thread::sleep(self.delay);
            let firsts: Vec<f32> = images.iter().map(|image| image.values()[0]).collect();
            self.batches
                .lock()
                .map_err(|_| "poisoned".to_string())?
                .push(firsts.clone());
            assert!(!firsts.contains(&-1.0), "boom");
            if firsts.contains(&-2.0) {
                return Err("model failure".into());
            }
            Ok(firsts.into_iter().map(|value| vec![value]).collect())
        }
    }

    fn image(value: f32) -> super::super::ModelInput {
        super::super::ModelInput::Pixels(kosmos_processor::PixelValues {
            data: vec![value],
            channels: 1,
            height: 1,
            width: 1,
        })
    }

    type Batches = Arc<Mutex<Vec<Vec<f32>>>>;

    fn engine(
        max_batch: usize,
        delay_ms: u64,
        max_queued: usize,
        model_ms: u64,
    ) -> (EngineHandle, EngineThread, Batches) {
        let batches: Batches = Arc::default();
        let settings = Batching {
            max_batch_images: NonZeroUsize::new(max_batch).expect("non-zero"),
            max_queue_delay: Duration::from_millis(delay_ms),
            max_queued_images: NonZeroUsize::new(max_queued).expect("non-zero"),
        };
        let encoder = FakeEncoder {
            batches: Arc::clone(&batches),
            delay: Duration::from_millis(model_ms),
        };
        let (handle, thread, _startup) =
            start(settings, None, move || Ok((encoder, ()))).expect("engine starts");
        (handle, thread, batches)
    }

    fn recorded(batches: &Batches) -> Vec<Vec<f32>> {
        batches.lock().expect("not poisoned").clone()
    }

    #[tokio::test]
    async fn requests_arriving_within_the_delay_share_one_batch_and_get_their_own_results() {
        let (handle, thread, batches) = engine(8, 200, 16, 0);
        let first = handle
            .submit(vec![image(1.0), image(2.0)], None)
            .expect("admitted");
        let second = handle.submit(vec![image(3.0)], None).expect("admitted");
        let first = first
            .into_iter()
            .next()
            .expect("one item")
            .await
            .expect("reply");
        let second = second
            .into_iter()
            .next()
            .expect("one item")
            .await
            .expect("reply");
        assert_eq!(
            first.expect("encoded").embeddings,
            vec![vec![1.0], vec![2.0]]
        );
        let second = second.expect("encoded");
        assert_eq!(second.embeddings, vec![vec![3.0]]);
        assert_eq!(second.batch_size, 3);
        assert_eq!(recorded(&batches), vec![vec![1.0, 2.0, 3.0]]);
        thread.stop().await;
    }

    #[tokio::test]
    async fn a_request_larger_than_a_batch_is_split_and_an_item_that_does_not_fit_waits() {
        let (handle, thread, batches) = engine(2, 100, 16, 0);
        let big = handle
            .submit(vec![image(1.0), image(2.0), image(3.0)], None)
            .expect("admitted");
        assert_eq!(big.len(), 2);
        for receiver in big {
            receiver.await.expect("reply").expect("encoded");
        }
        assert_eq!(recorded(&batches), vec![vec![1.0, 2.0], vec![3.0]]);
        thread.stop().await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_whole_request() {
        let (handle, thread, _batches) = engine(4, 300, 2, 0);
        let held = handle.submit(vec![image(1.0)], None).expect("admitted");
        let err = handle
            .submit(vec![image(2.0), image(3.0)], None)
            .expect_err("queue full");
        assert!(matches!(
            err,
            RequestError::QueueFull {
                requested: 2,
                queued: 1,
                max: 2
            }
        ));
        for receiver in held {
            receiver.await.expect("reply").expect("encoded");
        }
        assert_eq!(handle.queued_images(), 0);
        thread.stop().await;
    }

    #[tokio::test]
    async fn an_item_whose_deadline_passed_while_queued_is_answered_without_compute() {
        let (handle, thread, batches) = engine(1, 0, 8, 150);
        let slow = handle.submit(vec![image(1.0)], None).expect("admitted");
        let deadline = Instant::now() + Duration::from_millis(20);
        let late = handle
            .submit(vec![image(2.0)], Some(deadline))
            .expect("admitted");
        let late = late
            .into_iter()
            .next()
            .expect("one item")
            .await
            .expect("reply");
        assert!(
            matches!(late, Err(RequestError::DeadlineExceeded(_))),
            "{late:?}"
        );
        for receiver in slow {
            receiver.await.expect("reply").expect("encoded");
        }
        assert_eq!(recorded(&batches), vec![vec![1.0]]);
        assert_eq!(handle.stats().images_encoded, 1);
        thread.stop().await;
    }

    #[tokio::test]
    async fn an_item_whose_caller_went_away_is_skipped() {
        let (handle, thread, batches) = engine(1, 0, 8, 100);
        let slow = handle.submit(vec![image(1.0)], None).expect("admitted");
        drop(handle.submit(vec![image(2.0)], None).expect("admitted"));
        let after = handle.submit(vec![image(3.0)], None).expect("admitted");
        for receiver in slow.into_iter().chain(after) {
            receiver.await.expect("reply").expect("encoded");
        }
        assert_eq!(recorded(&batches), vec![vec![1.0], vec![3.0]]);
        thread.stop().await;
    }

    #[tokio::test]
    async fn a_panicking_or_failing_batch_fails_only_its_own_requests() {
        let (handle, thread, _batches) = engine(1, 0, 8, 0);
        for poison in [-1.0, -2.0] {
            let failed = handle.submit(vec![image(poison)], None).expect("admitted");
            let reply = failed
                .into_iter()
                .next()
                .expect("one item")
                .await
                .expect("reply");
            assert!(matches!(reply, Err(RequestError::Engine(_))), "{reply:?}");
        }
        let good = handle.submit(vec![image(5.0)], None).expect("admitted");
        let reply = good
            .into_iter()
            .next()
            .expect("one item")
            .await
            .expect("reply");
        assert_eq!(reply.expect("encoded").embeddings, vec![vec![5.0]]);
        assert_eq!(handle.stats().batches_executed, 1);
        thread.stop().await;
    }
}
