//! The discrete-event simulation of one deployment: the gateway, its pools of replicas, their autoscalers.
//!
//! Policy:
//! - time is in seconds; events are ordered by time, then by the order they were scheduled, so a seed gives one
//!   history; every random draw (the balancer's choices, exponential service times) comes from one ChaCha stream
//!   seeded from the run's seed;
//! - the gateway (`services/gateway`) sends one encode call per image of a request (its embedding cache is not
//!   modelled: every image misses), all at once; when the last embedding is back it opens one decoder call. A
//!   monolithic deployment sends the whole request to one pod. Replica choice is the gateway's power of two choices
//!   on in-flight calls among ready replicas ([`Routing::PowerOfTwo`]); a call a replica refuses (its queue is full:
//!   RESOURCE_EXHAUSTED) is retried on another replica up to the gateway's `max_attempts` (3 encoder, 2 decoder),
//!   then the request is dropped; a call that finds no ready replica at all (none tried yet) waits for one, as the
//!   gateway's `Pool::wait_for_replica` does, for at most [`SimParams::max_wait_for_replica_seconds`] (the
//!   gateway's `limits.max_waiting_for_replica_seconds`): the waiting calls of a pool go, oldest first, to the
//!   normal send path the moment one of its pods becomes ready, and a call still waiting at its bound drops its
//!   request (UNAVAILABLE). Callers' deadlines are not modelled (the trace has none): the bound is the only limit;
//! - the gateway's gauges are kept as `services/gateway/src/pool.rs` keeps them: a call is pending from sent to its
//!   first answer (an encode call's answer, a decoder stream's first token) and in flight until it ends; pending
//!   images count the images of pending encode calls; a call waiting for a replica is pending (with its images)
//!   but not in flight, which is what lets KEDA's activation wake a pool at zero replicas;
//! - each pool with a [`Scaling::Autoscaled`] spec is evaluated every `pollingInterval` on those gauges and on the
//!   decoder-measured time to first token; new pods serve after the calibration's start-up time; a scaled-in pod
//!   stops taking calls and terminates when its work is done (the newest pod goes first, not-yet-ready ones before
//!   ready ones, as a ReplicaSet picks);
//! - replica-hours count every pod from creation to termination within the trace's horizon (a GPU is held from
//!   the moment its pod is scheduled); requests that arrived within the horizon are followed to their end.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autoscaler::Autoscaler;
use crate::calibration::{Calibration, ServiceDistribution};
use crate::keda::{Gauge, PoolKind, ScalerSpec, Signal};
use crate::replica::{EncodeItem, PodState, Replica, Sequence, Work};
use crate::trace::{Request, exponential};

pub use crate::outcome::{
    DropReason, Outcome, PoolOutcome, PoolSample, RequestRecord, quantile_of,
};

/// Attempts per encode call (gateway `[encoder] max_attempts`).
const ENCODER_MAX_ATTEMPTS: usize = 3;
/// Attempts per decoder call (gateway `[decoder] max_attempts`).
const DECODER_MAX_ATTEMPTS: usize = 2;
/// How long after the horizon unfinished requests are given before the run stops and counts them as dropped.
const TAIL_LIMIT_SECONDS: f64 = 86_400.0;
/// The gateway's default `limits.max_waiting_for_replica_seconds` (`services/gateway/src/config/limits.rs`): the
/// wait bound of the deployments as `k8s/components/keda` runs them.
pub const DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS: f64 = 3.0;
/// The `limits.max_waiting_for_replica_seconds` that `k8s/components/scale-to-zero` sets, long enough for a pod to
/// start while calls wait.
pub const SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS: f64 = 300.0;

/// How the gateway picks a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// The gateway's policy: two random ready replicas, the one with fewer calls in flight.
    PowerOfTwo,
    /// What-if: calls wait in one gateway-side FIFO per pool and go to a ready replica with a free slot (fewer calls
    /// in flight than its batch size: `max_batch_images` / `max_running_sequences`). With batch size 1 a pool is an
    /// M/M/c queue.
    SharedQueue,
}

/// How many replicas a pool runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaling {
    /// Scaled by a KEDA ScaledObject; starts at its `minReplicaCount`.
    Autoscaled(ScalerSpec),
    /// A fixed count, ready from the start.
    Fixed(u32),
}

/// A deployment to simulate.
#[derive(Debug, Clone, PartialEq)]
pub enum Deployment {
    /// An encoder pool and a decoder pool.
    Split {
        /// The encoder pool.
        encoder: Scaling,
        /// The decoder pool.
        decoder: Scaling,
    },
    /// One pool of pods hosting both.
    Monolithic {
        /// The pool.
        pods: Scaling,
    },
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct SimParams<'a> {
    /// Service times and knobs.
    pub calibration: &'a Calibration,
    /// What to run.
    pub deployment: Deployment,
    /// The trace (arrivals non-decreasing).
    pub requests: &'a [Request],
    /// Replica-hours and the timeline cover `[0, horizon]`.
    pub horizon_seconds: f64,
    /// Replica choice.
    pub routing: Routing,
    /// Seed of the run's random stream.
    pub seed: u64,
    /// Timeline sampling period.
    pub sample_interval_seconds: f64,
    /// How long a call that finds no ready replica in its pool waits for one before its request is dropped
    /// UNAVAILABLE ([`Routing::PowerOfTwo`]; the gateway's `limits.max_waiting_for_replica_seconds`):
    /// [`DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS`] as deployed, [`SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS`] with
    /// `k8s/components/scale-to-zero`. Zero drops at once; infinity waits until a replica comes (or the run ends);
    /// a negative or NaN value is taken as zero.
    pub max_wait_for_replica_seconds: f64,
}

/// What an event does when its time comes.
#[derive(Debug, Clone, Copy)]
enum EventKind {
    /// A replica's encoder batching delay ran out.
    BatchTimer(usize),
    /// A replica finished its device work.
    WorkDone(usize),
    /// A starting pod passed its start-up time.
    PodReady(usize),
    /// A pool's autoscaler polls.
    Autoscale(usize),
    /// The oldest calls waiting for a replica of a pool reach their bound.
    WaitExpired(usize),
    /// The timeline is sampled.
    Sample,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    time: f64,
    order: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed, so that the max-heap pops the earliest event (then the earliest scheduled).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .time
            .total_cmp(&self.time)
            .then(other.order.cmp(&self.order))
    }
}

/// A call waiting in a gateway-side queue ([`Routing::SharedQueue`]).
#[derive(Debug, Clone, Copy)]
enum Call {
    Encode { request: u32, sent: f64 },
    Decode { request: u32 },
    Whole { request: u32 },
}

/// A call waiting in the gateway for a pool with no ready replica ([`Routing::PowerOfTwo`]).
#[derive(Debug, Clone, Copy)]
struct WaitingCall {
    /// The call, sent as it is when a replica becomes ready.
    call: Call,
    /// When its request is dropped if no replica came.
    expires_at: f64,
}

#[derive(Debug)]
struct Pool {
    kind: PoolKind,
    replicas: Vec<usize>,
    pending: u64,
    in_flight: u64,
    pending_images: u64,
    gateway_queue: VecDeque<Call>,
    /// Calls waiting for a ready replica, oldest first (one bound per run: also in expiry order).
    waiting_for_replica: VecDeque<WaitingCall>,
    scaler: Option<Autoscaler>,
    /// Decoder-measured TTFT samples (time, seconds), oldest first.
    ttft_samples: VecDeque<(f64, f64)>,
    ttft_window: f64,
    peak: u32,
    timeline: Vec<PoolSample>,
}

#[derive(Debug, Clone, Copy, Default)]
struct RequestState {
    images_left: u32,
    first_token: Option<f64>,
    finish: Option<f64>,
    dropped: Option<DropReason>,
}

struct Sim<'a> {
    params: &'a SimParams<'a>,
    calibration: &'a Calibration,
    now: f64,
    events: BinaryHeap<Event>,
    order: u64,
    rng: ChaCha8Rng,
    pools: Vec<Pool>,
    replicas: Vec<Replica>,
    states: Vec<RequestState>,
    unresolved: usize,
    /// The next request of the trace to arrive.
    next_request: usize,
    encode_calls: u64,
    encode_wait_seconds: f64,
}

/// Runs one deployment over the trace.
pub fn simulate(params: &SimParams<'_>) -> Outcome {
    let mut sim = Sim::new(params);
    sim.run();
    sim.finish()
}

impl<'a> Sim<'a> {
    fn new(params: &'a SimParams<'a>) -> Self {
        let mut sim = Self {
            params,
            calibration: params.calibration,
            now: 0.0,
            events: BinaryHeap::new(),
            order: 0,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            pools: Vec::new(),
            replicas: Vec::new(),
            states: vec![RequestState::default(); params.requests.len()],
            unresolved: params.requests.len(),
            next_request: 0,
            encode_calls: 0,
            encode_wait_seconds: 0.0,
        };
        let pools = match &params.deployment {
            Deployment::Split { encoder, decoder } => {
                vec![(PoolKind::Encoder, encoder), (PoolKind::Decoder, decoder)]
            }
            Deployment::Monolithic { pods } => vec![(PoolKind::Monolith, pods)],
        };
        for (index, (kind, scaling)) in pools.into_iter().enumerate() {
            let (initial, scaler) = match scaling {
                Scaling::Fixed(count) => (*count, None),
                Scaling::Autoscaled(spec) => {
                    (spec.min_replicas, Some(Autoscaler::new(spec.clone())))
                }
            };
            let ttft_window = scaler
                .as_ref()
                .map(|scaler| {
                    scaler
                        .spec()
                        .triggers
                        .iter()
                        .filter_map(|trigger| match trigger.signal {
                            Signal::DecoderTtftQuantile { window_seconds, .. } => {
                                Some(window_seconds)
                            }
                            Signal::GaugeSum(_) => None,
                        })
                        .fold(0.0, f64::max)
                })
                .unwrap_or(0.0);
            sim.pools.push(Pool {
                kind,
                replicas: Vec::new(),
                pending: 0,
                in_flight: 0,
                pending_images: 0,
                gateway_queue: VecDeque::new(),
                waiting_for_replica: VecDeque::new(),
                scaler,
                ttft_samples: VecDeque::new(),
                ttft_window,
                peak: initial,
                timeline: Vec::new(),
            });
            for _ in 0..initial {
                sim.add_replica(index, PodState::Ready);
            }
            if sim.pools[index].scaler.is_some() {
                sim.schedule(0.0, EventKind::Autoscale(index));
            }
        }
        sim.schedule(0.0, EventKind::Sample);
        sim
    }

    fn schedule(&mut self, time: f64, kind: EventKind) {
        self.order += 1;
        self.events.push(Event {
            time,
            order: self.order,
            kind,
        });
    }

    fn add_replica(&mut self, pool: usize, state: PodState) -> usize {
        let index = self.replicas.len();
        self.replicas
            .push(Replica::new(pool, self.pools[pool].kind, self.now, state));
        self.pools[pool].replicas.push(index);
        index
    }

    fn run(&mut self) {
        while self.step() {}
    }

    /// Runs the next arrival or event; `false` when nothing is left or the tail limit is reached.
    fn step(&mut self) -> bool {
        let requests = self.params.requests;
        let stop_at = self.params.horizon_seconds + TAIL_LIMIT_SECONDS;
        loop {
            let next_event = self.events.peek().map(|event| event.time);
            let next_arrival = requests
                .get(self.next_request)
                .map(|request| request.arrival);
            let take_arrival = match (next_arrival, next_event) {
                (Some(arrival), Some(event)) => arrival <= event,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return false,
            };
            if take_arrival {
                self.now = next_arrival.unwrap_or(self.now);
                self.arrive(self.next_request);
                self.next_request += 1;
                return true;
            }
            let Some(event) = self.events.pop() else {
                return false;
            };
            if event.time > stop_at {
                self.now = stop_at;
                return false;
            }
            // The expiry of calls a ready pod already took: dropped without moving the clock.
            if let EventKind::WaitExpired(pool) = event.kind
                && !self.waiting_expires_by(pool, event.time)
            {
                continue;
            }
            self.now = event.time;
            match event.kind {
                EventKind::BatchTimer(replica) => {
                    self.replicas[replica].timer_at = None;
                    self.kick(replica);
                }
                EventKind::WorkDone(replica) => self.work_done(replica),
                EventKind::PodReady(replica) => self.pod_ready(replica),
                EventKind::Autoscale(pool) => self.autoscale(pool),
                EventKind::WaitExpired(pool) => self.waiting_expired(pool),
                EventKind::Sample => self.sample(),
            }
            return true;
        }
    }

    /// Whether periodic events should go on: within the horizon, or while requests are unfinished.
    fn keep_ticking(&self) -> bool {
        self.now < self.params.horizon_seconds || self.unresolved > 0
    }

    fn arrive(&mut self, index: usize) {
        let request = self.params.requests[index];
        let request_id = index as u32;
        self.states[index].images_left = request.images;
        match self.params.deployment {
            Deployment::Monolithic { .. } => self.send(
                0,
                Call::Whole {
                    request: request_id,
                },
            ),
            Deployment::Split { .. } if request.images == 0 => {
                self.send(
                    1,
                    Call::Decode {
                        request: request_id,
                    },
                );
            }
            Deployment::Split { .. } => {
                for _ in 0..request.images {
                    if self.states[index].dropped.is_some() {
                        break;
                    }
                    let sent = self.now;
                    self.send(
                        0,
                        Call::Encode {
                            request: request_id,
                            sent,
                        },
                    );
                }
            }
        }
    }

    fn drop_request(&mut self, request: u32, reason: DropReason) {
        let state = &mut self.states[request as usize];
        if state.dropped.is_none() && state.finish.is_none() {
            state.dropped = Some(reason);
            self.unresolved -= 1;
        }
    }

    /// Sends a call to a pool: the gauges count it from here.
    fn send(&mut self, pool: usize, call: Call) {
        let images = call_images(call);
        match self.params.routing {
            Routing::SharedQueue => {
                self.count_call(pool, images);
                self.pools[pool].gateway_queue.push_back(call);
                self.dispatch(pool);
            }
            Routing::PowerOfTwo => {
                let attempts = match call {
                    Call::Encode { .. } => ENCODER_MAX_ATTEMPTS,
                    Call::Decode { .. } | Call::Whole { .. } => DECODER_MAX_ATTEMPTS,
                };
                let mut tried: Vec<usize> = Vec::new();
                for _ in 0..attempts {
                    let Some(replica) = self.pick(pool, &tried) else {
                        if tried.is_empty() {
                            self.wait_for_replica(pool, call, images);
                        } else {
                            self.drop_request(call_request(call), DropReason::ResourceExhausted);
                        }
                        return;
                    };
                    if self.admits(replica, call) {
                        self.count_call(pool, images);
                        self.deliver(replica, call);
                        return;
                    }
                    tried.push(replica);
                }
                self.drop_request(call_request(call), DropReason::ResourceExhausted);
            }
        }
    }

    fn count_call(&mut self, pool: usize, images: u64) {
        let pool = &mut self.pools[pool];
        pool.pending += 1;
        pool.in_flight += 1;
        pool.pending_images += images;
    }

    /// Holds a call that found no ready replica, counted as pending (with its `images`) but not in flight, until a
    /// pod of the pool is ready ([`Self::pod_ready`]) or the wait bound passes ([`Self::waiting_expired`]).
    fn wait_for_replica(&mut self, pool: usize, call: Call, images: u64) {
        let bound = self.params.max_wait_for_replica_seconds.max(0.0);
        let expires_at = self.now + bound;
        let counts = &mut self.pools[pool];
        counts.pending += 1;
        counts.pending_images += images;
        counts
            .waiting_for_replica
            .push_back(WaitingCall { call, expires_at });
        if expires_at.is_finite() {
            self.schedule(expires_at, EventKind::WaitExpired(pool));
        }
    }

    /// Takes the oldest waiting call of a pool off its gauges (the gateway's `WaitingGuard` dropping).
    fn take_waiting(&mut self, pool: usize) -> Option<Call> {
        let counts = &mut self.pools[pool];
        let waiting = counts.waiting_for_replica.pop_front()?;
        counts.pending -= 1;
        counts.pending_images -= call_images(waiting.call);
        Some(waiting.call)
    }

    /// Whether the oldest call waiting for a replica of `pool` reaches its bound by `time`.
    fn waiting_expires_by(&self, pool: usize, time: f64) -> bool {
        self.pools[pool]
            .waiting_for_replica
            .front()
            .is_some_and(|waiting| waiting.expires_at <= time)
    }

    /// Drops the requests of the calls that waited their bound for a replica of `pool` (UNAVAILABLE).
    fn waiting_expired(&mut self, pool: usize) {
        while self.waiting_expires_by(pool, self.now) {
            if let Some(call) = self.take_waiting(pool) {
                self.drop_request(call_request(call), DropReason::Unavailable);
            }
        }
    }

    /// Sends the calls waiting for a replica of `pool`, oldest first, now that one is ready; a call of a request
    /// dropped meanwhile (another of its calls was refused) is abandoned, as the gateway abandons it.
    fn release_waiting(&mut self, pool: usize) {
        for _ in 0..self.pools[pool].waiting_for_replica.len() {
            let Some(call) = self.take_waiting(pool) else {
                break;
            };
            if self.states[call_request(call) as usize].dropped.is_none() {
                self.send(pool, call);
            }
        }
    }

    /// Power of two choices on in-flight calls among the pool's ready replicas not tried yet.
    fn pick(&mut self, pool: usize, tried: &[usize]) -> Option<usize> {
        let candidates: Vec<usize> = self.pools[pool]
            .replicas
            .iter()
            .copied()
            .filter(|&r| self.replicas[r].state == PodState::Ready && !tried.contains(&r))
            .collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            len => {
                let first = self.rng.random_range(0..len);
                let second = (first + self.rng.random_range(1..len)) % len;
                let (a, b) = (candidates[first], candidates[second]);
                Some(if self.replicas[b].in_flight < self.replicas[a].in_flight {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// Whether a replica's bounded queue takes the call.
    fn admits(&self, replica: usize, call: Call) -> bool {
        let replica = &self.replicas[replica];
        let encoder = &self.calibration.encoder;
        let decoder = &self.calibration.decoder;
        match call {
            Call::Encode { .. } => replica.encode_queue.len() < encoder.max_queued_images as usize,
            Call::Decode { .. } => replica.waiting.len() < decoder.max_waiting_requests as usize,
            Call::Whole { request } => {
                let images = self.params.requests[request as usize].images as usize;
                replica.encode_queue.len() + images <= encoder.max_queued_images as usize
                    && replica.waiting.len() + replica.local_encodes.len()
                        < decoder.max_waiting_requests as usize
            }
        }
    }

    fn slots(&self, pool: usize) -> u32 {
        match self.pools[pool].kind {
            PoolKind::Encoder => self.calibration.encoder.max_batch_images,
            PoolKind::Decoder | PoolKind::Monolith => {
                self.calibration.decoder.max_running_sequences
            }
        }
    }

    /// Shared-queue routing: hands queued calls to ready replicas with a free slot, the least loaded first.
    fn dispatch(&mut self, pool: usize) {
        let slots = self.slots(pool);
        while !self.pools[pool].gateway_queue.is_empty() {
            let target = self.pools[pool]
                .replicas
                .iter()
                .copied()
                .filter(|&r| {
                    self.replicas[r].state == PodState::Ready && self.replicas[r].in_flight < slots
                })
                .min_by_key(|&r| self.replicas[r].in_flight);
            let Some(replica) = target else {
                break;
            };
            if let Some(call) = self.pools[pool].gateway_queue.pop_front() {
                self.deliver(replica, call);
            }
        }
    }

    fn sequence_for(&self, request: u32) -> Sequence {
        let spec = self.params.requests[request as usize];
        Sequence {
            request,
            arrived: self.now,
            prompt: spec.prompt_tokens + spec.images * self.calibration.decoder.image_tokens,
            output: spec.output_tokens,
            generated: 0,
        }
    }

    fn deliver(&mut self, replica: usize, call: Call) {
        let now = self.now;
        let sequence = match call {
            Call::Decode { request } | Call::Whole { request } => Some(self.sequence_for(request)),
            Call::Encode { .. } => None,
        };
        let images = match call {
            Call::Whole { request } => self.params.requests[request as usize].images,
            Call::Encode { .. } | Call::Decode { .. } => 0,
        };
        let target = &mut self.replicas[replica];
        target.in_flight += 1;
        match (call, sequence) {
            (Call::Encode { request, sent }, _) => target.encode_queue.push_back(EncodeItem {
                request,
                admitted: now,
                sent,
            }),
            (Call::Whole { request }, Some(sequence)) if images > 0 => {
                for _ in 0..images {
                    target.encode_queue.push_back(EncodeItem {
                        request,
                        admitted: now,
                        sent: now,
                    });
                }
                target.local_encodes.insert(request, (images, sequence));
            }
            (_, Some(sequence)) => target.waiting.push_back(sequence),
            (_, None) => {}
        }
        self.kick(replica);
    }

    /// Starts the device's next work if it is free.
    fn kick(&mut self, replica: usize) {
        let now = self.now;
        let calibration = self.calibration;
        let next = {
            let target = &mut self.replicas[replica];
            if target.busy.is_some() || target.state == PodState::Terminated {
                return;
            }
            target.next_work(now, calibration)
        };
        match next {
            Ok((work, mean_seconds)) => {
                let seconds = match (&work, calibration.encoder.service) {
                    (Work::EncoderBatch(_), ServiceDistribution::Exponential) => {
                        exponential(&mut self.rng, 1.0 / mean_seconds)
                    }
                    _ => mean_seconds,
                };
                if let Work::EncoderBatch(items) = &work
                    && self.replicas[replica].kind == PoolKind::Encoder
                {
                    for item in items {
                        self.encode_calls += 1;
                        self.encode_wait_seconds += now - item.sent;
                    }
                }
                self.replicas[replica].busy = Some(work);
                self.schedule(now + seconds, EventKind::WorkDone(replica));
            }
            Err(Some(timer)) => {
                let target = &mut self.replicas[replica];
                if target.timer_at.is_none_or(|at| at > timer) {
                    target.timer_at = Some(timer);
                    self.schedule(timer, EventKind::BatchTimer(replica));
                }
            }
            Err(None) => {}
        }
    }

    fn work_done(&mut self, replica: usize) {
        let pool = self.replicas[replica].pool;
        match self.replicas[replica].busy.take() {
            Some(Work::EncoderBatch(items)) => {
                for item in items {
                    self.image_encoded(replica, pool, item.request);
                }
            }
            Some(Work::DecoderStep) => self.step_done(replica, pool),
            None => {}
        }
        if self.params.routing == Routing::SharedQueue {
            self.dispatch(pool);
        }
        self.kick(replica);
        self.finish_drain(replica);
    }

    fn image_encoded(&mut self, replica: usize, pool: usize, request: u32) {
        if self.replicas[replica].kind == PoolKind::Monolith {
            let target = &mut self.replicas[replica];
            let mut ready = None;
            if let Some((left, sequence)) = target.local_encodes.get_mut(&request) {
                *left -= 1;
                if *left == 0 {
                    ready = Some(Sequence {
                        arrived: self.now,
                        ..*sequence
                    });
                }
            }
            if let Some(sequence) = ready {
                target.local_encodes.remove(&request);
                target.waiting.push_back(sequence);
            }
            return;
        }
        let counts = &mut self.pools[pool];
        counts.pending -= 1;
        counts.in_flight -= 1;
        counts.pending_images -= 1;
        self.replicas[replica].in_flight -= 1;
        let state = &mut self.states[request as usize];
        state.images_left -= 1;
        if state.images_left == 0 && state.dropped.is_none() {
            self.send(1, Call::Decode { request });
        }
    }

    fn step_done(&mut self, replica: usize, pool: usize) {
        let now = self.now;
        let mut running = std::mem::take(&mut self.replicas[replica].running);
        for sequence in &mut running {
            sequence.generated += 1;
            let request = sequence.request as usize;
            if sequence.generated == 1 {
                self.states[request].first_token = Some(now);
                let counts = &mut self.pools[pool];
                counts.pending -= 1;
                if counts.ttft_window > 0.0 {
                    // The decoder's own TTFT: from its receiving the call (queue + prefill).
                    counts.ttft_samples.push_back((now, now - sequence.arrived));
                }
            }
            if sequence.generated >= sequence.output {
                self.states[request].finish = Some(now);
                self.unresolved -= 1;
                self.pools[pool].in_flight -= 1;
                self.replicas[replica].in_flight -= 1;
            }
        }
        running.retain(|sequence| sequence.generated < sequence.output);
        self.replicas[replica].running = running;
    }

    fn pod_ready(&mut self, replica: usize) {
        if self.replicas[replica].state == PodState::Starting {
            self.replicas[replica].state = PodState::Ready;
            let pool = self.replicas[replica].pool;
            match self.params.routing {
                Routing::SharedQueue => self.dispatch(pool),
                Routing::PowerOfTwo => self.release_waiting(pool),
            }
        }
    }

    fn finish_drain(&mut self, replica: usize) {
        let target = &mut self.replicas[replica];
        if target.state == PodState::Draining && target.is_idle() {
            target.state = PodState::Terminated;
            target.ended = Some(self.now);
        }
    }

    fn desired_count(&self, pool: usize) -> u32 {
        self.pools[pool]
            .replicas
            .iter()
            .filter(|&&r| matches!(self.replicas[r].state, PodState::Starting | PodState::Ready))
            .count() as u32
    }

    fn ready_count(&self, pool: usize) -> u32 {
        self.pools[pool]
            .replicas
            .iter()
            .filter(|&&r| self.replicas[r].state == PodState::Ready)
            .count() as u32
    }

    fn metric(&mut self, signal: &Signal) -> f64 {
        match signal {
            Signal::GaugeSum(terms) => terms
                .iter()
                .map(|(gauge, kind)| {
                    self.pools.iter().find(|pool| pool.kind == *kind).map_or(
                        0.0,
                        |pool| match gauge {
                            Gauge::PendingRequests => pool.pending as f64,
                            Gauge::InflightRequests => pool.in_flight as f64,
                            Gauge::PendingImages => pool.pending_images as f64,
                        },
                    )
                })
                .sum(),
            Signal::DecoderTtftQuantile {
                quantile,
                window_seconds,
            } => {
                let now = self.now;
                let Some(pool) = self
                    .pools
                    .iter_mut()
                    .find(|pool| matches!(pool.kind, PoolKind::Decoder | PoolKind::Monolith))
                else {
                    return 0.0;
                };
                while pool
                    .ttft_samples
                    .front()
                    .is_some_and(|(time, _)| now - time > pool.ttft_window)
                {
                    pool.ttft_samples.pop_front();
                }
                let mut values: Vec<f64> = pool
                    .ttft_samples
                    .iter()
                    .filter(|(time, _)| now - time <= *window_seconds)
                    .map(|(_, ttft)| *ttft)
                    .collect();
                quantile_of(&mut values, *quantile).unwrap_or(0.0)
            }
        }
    }

    fn autoscale(&mut self, pool: usize) {
        let Some(scaler) = self.pools[pool].scaler.take() else {
            return;
        };
        let mut scaler = scaler;
        let metrics: Vec<f64> = scaler
            .spec()
            .triggers
            .iter()
            .map(|trigger| self.metric(&trigger.signal))
            .collect();
        let current = self.desired_count(pool);
        let desired = scaler.evaluate(self.now, current, &metrics);
        let interval = scaler.spec().polling_interval_seconds;
        self.pools[pool].scaler = Some(scaler);
        self.resize(pool, current, desired);
        if self.keep_ticking() {
            self.schedule(self.now + interval, EventKind::Autoscale(pool));
        }
    }

    fn resize(&mut self, pool: usize, current: u32, desired: u32) {
        if desired > current {
            for _ in current..desired {
                let replica = self.add_replica(pool, PodState::Starting);
                let ready_at = self.now + self.calibration.pod_startup_seconds;
                self.schedule(ready_at, EventKind::PodReady(replica));
            }
        }
        for _ in desired..current {
            // Not-yet-ready pods first, then the most recently created ready one.
            let members = &self.pools[pool].replicas;
            let victim = members
                .iter()
                .rev()
                .copied()
                .find(|&r| self.replicas[r].state == PodState::Starting)
                .or_else(|| {
                    members
                        .iter()
                        .rev()
                        .copied()
                        .find(|&r| self.replicas[r].state == PodState::Ready)
                });
            let Some(victim) = victim else {
                break;
            };
            let target = &mut self.replicas[victim];
            if target.state == PodState::Starting {
                target.state = PodState::Terminated;
                target.ended = Some(self.now);
            } else {
                target.state = PodState::Draining;
                self.finish_drain(victim);
            }
        }
        let count = self.desired_count(pool);
        let counts = &mut self.pools[pool];
        counts.peak = counts.peak.max(count);
    }

    fn sample(&mut self) {
        if self.now <= self.params.horizon_seconds {
            for pool in 0..self.pools.len() {
                let sample = PoolSample {
                    time: self.now,
                    desired: self.desired_count(pool),
                    ready: self.ready_count(pool),
                };
                self.pools[pool].timeline.push(sample);
            }
            self.schedule(
                self.now + self.params.sample_interval_seconds,
                EventKind::Sample,
            );
        }
    }

    fn finish(mut self) -> Outcome {
        let end_time = self.now;
        for index in 0..self.states.len() {
            if self.states[index].finish.is_none() && self.states[index].dropped.is_none() {
                self.drop_request(index as u32, DropReason::Unfinished);
            }
        }
        debug_assert_eq!(self.unresolved, 0);
        let horizon = self.params.horizon_seconds;
        let pools = self
            .pools
            .iter()
            .map(|pool| {
                let replica_seconds = pool
                    .replicas
                    .iter()
                    .map(|&r| {
                        let replica = &self.replicas[r];
                        let end = replica.ended.unwrap_or(end_time).min(horizon);
                        (end - replica.created.min(horizon)).max(0.0)
                    })
                    .sum();
                PoolOutcome {
                    kind: pool.kind,
                    replica_seconds,
                    peak_replicas: pool.peak,
                    timeline: pool.timeline.clone(),
                }
            })
            .collect();
        let records = self
            .params
            .requests
            .iter()
            .zip(&self.states)
            .map(|(request, state)| RequestRecord {
                arrival: request.arrival,
                output_tokens: request.output_tokens,
                image_heavy: request.image_heavy,
                ttft: state.first_token.map(|time| time - request.arrival),
                latency: state.finish.map(|time| time - request.arrival),
                dropped: state.dropped,
            })
            .collect();
        Outcome {
            records,
            pools,
            encode_calls: self.encode_calls,
            encode_wait_seconds: self.encode_wait_seconds,
            end_time,
        }
    }
}

/// The images a call counts in its pool's pending images: one per encode call, none for decoder and whole-request
/// calls.
fn call_images(call: Call) -> u64 {
    match call {
        Call::Encode { .. } => 1,
        Call::Decode { .. } | Call::Whole { .. } => 0,
    }
}

/// The request a call belongs to.
fn call_request(call: Call) -> u32 {
    match call {
        Call::Encode { request, .. } | Call::Decode { request } | Call::Whole { request } => {
            request
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::{
        DecoderCalibration, EncoderCalibration, EncoderPoint, ServiceDistribution, StepPoint,
    };

    /// A fast encoder and decoder: a request's work takes milliseconds, far less than the waits under test.
    fn calibration() -> Calibration {
        Calibration {
            name: "unit".to_owned(),
            source: "test".to_owned(),
            pod_startup_seconds: 0.0,
            encoder: EncoderCalibration {
                max_batch_images: 4,
                max_queue_delay_seconds: 0.001,
                max_queued_images: 64,
                service: ServiceDistribution::Deterministic,
                throughput: vec![EncoderPoint {
                    batch: 1,
                    images_per_second: 1000.0,
                }],
            },
            decoder: DecoderCalibration {
                max_running_sequences: 4,
                max_waiting_requests: 64,
                max_prefill_tokens_per_step: 1000,
                prefill_tokens_per_second: 1.0e6,
                image_tokens: 4,
                step: vec![StepPoint {
                    batch: 1,
                    context: 10,
                    ms: 1.0,
                }],
            },
        }
    }

    /// One request with two images at t = 1 s.
    fn two_image_request() -> Vec<Request> {
        vec![Request {
            arrival: 1.0,
            images: 2,
            prompt_tokens: 4,
            output_tokens: 3,
            image_heavy: true,
        }]
    }

    /// A split deployment with no encoder replica and one decoder, calls waiting at most 5 s for a replica.
    fn params<'a>(calibration: &'a Calibration, requests: &'a [Request]) -> SimParams<'a> {
        SimParams {
            calibration,
            deployment: Deployment::Split {
                encoder: Scaling::Fixed(0),
                decoder: Scaling::Fixed(1),
            },
            requests,
            horizon_seconds: 60.0,
            routing: Routing::PowerOfTwo,
            seed: 1,
            sample_interval_seconds: 10.0,
            max_wait_for_replica_seconds: 5.0,
        }
    }

    /// The encoder pool's gauges: (pending, in flight, pending images, calls waiting for a replica).
    fn encoder_gauges(sim: &Sim<'_>) -> (u64, u64, u64, usize) {
        let pool = &sim.pools[0];
        (
            pool.pending,
            pool.in_flight,
            pool.pending_images,
            pool.waiting_for_replica.len(),
        )
    }

    /// Runs every arrival and event due at or before `time`.
    fn run_until(sim: &mut Sim<'_>, time: f64) {
        loop {
            let next_arrival = sim
                .params
                .requests
                .get(sim.next_request)
                .map(|request| request.arrival);
            let next_event = sim.events.peek().map(|event| event.time);
            let next = match (next_arrival, next_event) {
                (Some(arrival), Some(event)) => arrival.min(event),
                (Some(only), None) | (None, Some(only)) => only,
                (None, None) => return,
            };
            if next > time || !sim.step() {
                return;
            }
        }
    }

    #[test]
    fn a_call_waiting_past_its_bound_drops_its_request_unavailable() {
        let calibration = calibration();
        let requests = two_image_request();
        let params = params(&calibration, &requests);
        let mut sim = Sim::new(&params);
        run_until(&mut sim, 1.0);
        assert_eq!(sim.now, 1.0);
        // Both encode calls wait: pending with their images, not in flight.
        assert_eq!(encoder_gauges(&sim), (2, 0, 2, 2));
        run_until(&mut sim, 5.9);
        assert_eq!(sim.states[0].dropped, None, "dropped before its bound");
        assert_eq!(encoder_gauges(&sim), (2, 0, 2, 2));
        sim.run();
        assert_eq!(encoder_gauges(&sim), (0, 0, 0, 0));
        let decoder = &sim.pools[1];
        assert_eq!((decoder.pending, decoder.in_flight), (0, 0));
        let outcome = sim.finish();
        assert_eq!(outcome.records[0].dropped, Some(DropReason::Unavailable));
        assert_eq!(outcome.records[0].ttft, None);
    }

    #[test]
    fn the_bound_is_when_the_request_is_dropped() {
        let calibration = calibration();
        let requests = two_image_request();
        let params = params(&calibration, &requests);
        let mut sim = Sim::new(&params);
        // Arrival at 1 s, bound 5 s: dropped by the event at 6 s, not before.
        while sim.states[0].dropped.is_none() && sim.step() {}
        assert_eq!(sim.now, 6.0);
        assert_eq!(sim.states[0].dropped, Some(DropReason::Unavailable));
        assert_eq!(encoder_gauges(&sim), (0, 0, 0, 0));
    }

    #[test]
    fn a_pod_ready_within_the_bound_takes_the_waiting_calls() {
        let calibration = calibration();
        let requests = two_image_request();
        let params = params(&calibration, &requests);
        let mut sim = Sim::new(&params);
        let pod = sim.add_replica(0, PodState::Starting);
        sim.schedule(3.0, EventKind::PodReady(pod));
        run_until(&mut sim, 3.0);
        assert_eq!(sim.now, 3.0);
        // Sent as they were when the pod became ready: pending and in flight, no longer waiting.
        assert_eq!(encoder_gauges(&sim), (2, 2, 2, 0));
        assert_eq!(sim.replicas[pod].in_flight, 2);
        sim.run();
        assert_eq!(encoder_gauges(&sim), (0, 0, 0, 0));
        let outcome = sim.finish();
        let record = outcome.records[0];
        assert_eq!(record.dropped, None);
        // Its first token came after the 2 s it waited for the pod.
        assert!(
            record.ttft.is_some_and(|ttft| ttft >= 2.0),
            "{:?}",
            record.ttft
        );
    }

    #[test]
    fn a_pod_ready_after_the_bound_finds_nothing_waiting() {
        let calibration = calibration();
        let requests = two_image_request();
        let params = params(&calibration, &requests);
        let mut sim = Sim::new(&params);
        let pod = sim.add_replica(0, PodState::Starting);
        sim.schedule(8.0, EventKind::PodReady(pod));
        sim.run();
        assert_eq!(sim.replicas[pod].state, PodState::Ready);
        assert_eq!(sim.replicas[pod].in_flight, 0);
        assert_eq!(encoder_gauges(&sim), (0, 0, 0, 0));
        let outcome = sim.finish();
        assert_eq!(outcome.records[0].dropped, Some(DropReason::Unavailable));
        assert_eq!(outcome.encode_calls, 0, "an expired call was encoded");
    }
}
