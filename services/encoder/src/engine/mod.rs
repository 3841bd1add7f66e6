//! The engine: one dedicated OS thread owns the model and runs dynamic batches; request handlers talk to it
//! through an [`EngineHandle`] (a bounded queue counted in images, one `oneshot` reply per queued item).
//!
//! Admission is all-or-nothing per request: its images are reserved against `max_queued_images` at once (full →
//! RESOURCE_EXHAUSTED), then split into items of at most `max_batch_images` so that any item fits a batch. An
//! item's reservation is released when its batch starts computing or when the item is dropped unanswered, so the
//! count is "images waiting for the engine", the ones of a batch still filling included.
//!
//! The batching loop itself is in `batcher.rs`; the model behind it is any [`BatchEncoder`], [`VisionEngine`] in
//! the service.

mod batcher;
mod vision;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use kosmos_processor::{FlattenedPatches, PixelValues};
use tokio::sync::oneshot;

pub use vision::VisionEngine;

use crate::config::Batching;
use crate::error::{RequestError, StartError};
use crate::metrics::EncoderMetrics;

/// One preprocessed image, in the form its model family takes.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelInput {
    /// KOSMOS-1 / Kosmos-2: CLIP pixels `(3, size, size)`.
    Pixels(PixelValues),
    /// Kosmos-2.5: a page as `max_patches` rows of flattened patches.
    Page(FlattenedPatches),
}

impl ModelInput {
    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        match self {
            ModelInput::Pixels(pixels) => &pixels.data,
            ModelInput::Page(page) => &page.data,
        }
    }
}

/// A model that turns a batch of preprocessed images into embeddings; runs on the engine thread only.
pub trait BatchEncoder {
    /// What a failed batch reports.
    type Error: std::fmt::Display;

    /// `images` (all of the model's family) → one embedding per image, in order, each `(tokens, hidden)` row-major.
    fn encode(&mut self, images: &[&ModelInput]) -> Result<Vec<Vec<f32>>, Self::Error>;
}

/// What the engine computed for one queued item (a request's images, or a part of them).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkOutput {
    /// One embedding per image of the item, `(tokens, hidden)` row-major.
    pub embeddings: Vec<Vec<f32>>,
    /// From admission to the start of the batch that carried the item.
    pub queue_time: Duration,
    /// The model call of that batch.
    pub encode_time: Duration,
    /// Images in that batch, other callers' included.
    pub batch_size: usize,
    /// Sequence number of that batch (items of one request may share a batch).
    pub batch_id: u64,
}

/// The engine's answer to one queued item.
pub type ChunkReply = Result<ChunkOutput, RequestError>;

/// Engine counters since start.
#[derive(Debug, Default)]
struct EngineStats {
    batches_executed: AtomicU64,
    images_encoded: AtomicU64,
}

/// A copy of the engine counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Batches that ran through the model successfully.
    pub batches_executed: u64,
    /// Images those batches encoded.
    pub images_encoded: u64,
}

/// Images of one item reserved against `max_queued_images`; released once, when the batch starts or on drop.
#[derive(Debug)]
struct Admission {
    queued: Arc<AtomicUsize>,
    images: usize,
}

impl Admission {
    fn release(&mut self) {
        if self.images > 0 {
            self.queued.fetch_sub(self.images, Ordering::AcqRel);
            self.images = 0;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// One queued unit of work: at most `max_batch_images` images of one request.
#[derive(Debug)]
struct WorkItem {
    images: Vec<ModelInput>,
    admitted_at: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<ChunkReply>,
    admission: Admission,
    /// The span of the request the item belongs to: the batch span links to it.
    span: tracing::Span,
    /// `encoder.queue`, a child of `span` from admission until the batch starts (closed when dropped).
    queue_span: tracing::Span,
}

/// The request handlers' side of the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    sender: SyncSender<WorkItem>,
    queued: Arc<AtomicUsize>,
    settings: Batching,
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Queues the images of one request, all or none, and returns one receiver per item in image order.
    ///
    /// `deadline` is when the caller stops waiting: an item still queued then is answered DEADLINE_EXCEEDED
    /// without compute, and one whose receiver was dropped is skipped.
    pub fn submit(
        &self,
        images: Vec<ModelInput>,
        deadline: Option<Instant>,
    ) -> Result<Vec<oneshot::Receiver<ChunkReply>>, RequestError> {
        let requested = images.len();
        let max = self.settings.max_queued_images.get();
        if let Err(queued) =
            self.queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    queued.checked_add(requested).filter(|&total| total <= max)
                })
        {
            tracing::warn!(queued, requested, max, "encoder queue full");
            return Err(RequestError::QueueFull {
                requested,
                queued,
                max,
            });
        }
        let admitted_at = Instant::now();
        let max_batch = self.settings.max_batch_images.get();
        let mut items = Vec::with_capacity(requested.div_ceil(max_batch));
        let mut receivers = Vec::with_capacity(items.capacity());
        let mut rest = images;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(max_batch));
            let chunk = std::mem::replace(&mut rest, tail);
            let (reply, receiver) = oneshot::channel();
            let admission = Admission {
                queued: Arc::clone(&self.queued),
                images: chunk.len(),
            };
            let queue_span = tracing::info_span!("encoder.queue", images = chunk.len());
            items.push(WorkItem {
                images: chunk,
                admitted_at,
                deadline,
                reply,
                admission,
                span: tracing::Span::current(),
                queue_span,
            });
            receivers.push(receiver);
        }
        // On failure the items not sent are dropped here (releasing their reservation) and the ones already sent
        // are skipped by the engine, since their receivers are dropped with `receivers`.
        for item in items {
            match self.sender.try_send(item) {
                Ok(()) => {}
                // The channel holds max_queued_images items and every queued item holds at least one reserved
                // image, so it cannot be full after a successful reservation; answer as if the queue were.
                Err(TrySendError::Full(_)) => {
                    return Err(RequestError::QueueFull {
                        requested,
                        queued: self.queued_images(),
                        max,
                    });
                }
                Err(TrySendError::Disconnected(_)) => return Err(RequestError::EngineStopped),
            }
        }
        Ok(receivers)
    }

    /// The engine counters.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            batches_executed: self.stats.batches_executed.load(Ordering::Acquire),
            images_encoded: self.stats.images_encoded.load(Ordering::Acquire),
        }
    }

    /// Images admitted and not yet running.
    pub fn queued_images(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The batching settings.
    pub fn settings(&self) -> Batching {
        self.settings
    }
}

/// The engine thread, to stop and join once no handler can submit any more.
#[derive(Debug)]
pub struct EngineThread {
    thread: std::thread::JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

impl EngineThread {
    /// Lets the engine finish what is queued, then waits for the thread to end.
    pub async fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the engine thread panicked"),
            Err(err) => tracing::error!(%err, "cannot join the engine thread"),
        }
    }
}

/// The loader's result, received once the model is loaded and the engine is about to take work.
pub type Startup<I> = oneshot::Receiver<Result<I, StartError>>;

/// Starts the engine thread: it runs `loader` (which builds the model on that thread, so the thread owns it),
/// reports the loader's result through the returned [`Startup`], then batches until stopped; with `metrics`, it
/// records batches and queue times there and publishes the queue length.
pub fn start<E, I, L>(
    settings: Batching,
    metrics: Option<Arc<EncoderMetrics>>,
    loader: L,
) -> Result<(EngineHandle, EngineThread, Startup<I>), StartError>
where
    E: BatchEncoder,
    I: Send + 'static,
    L: FnOnce() -> Result<(E, I), StartError> + Send + 'static,
{
    let queued = Arc::new(AtomicUsize::new(0));
    if let Some(metrics) = &metrics {
        metrics.observe_queue(Arc::clone(&queued));
    }
    let (sender, receiver) = sync_channel(settings.max_queued_images.get());
    let stats = Arc::new(EngineStats::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let (ready, startup) = oneshot::channel();
    let batcher_stats = Arc::clone(&stats);
    let batcher_stopping = Arc::clone(&stopping);
    let thread = std::thread::Builder::new()
        .name("encoder-engine".into())
        .spawn(move || {
            let (encoder, info) = match loader() {
                Ok(loaded) => loaded,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            // A dropped receiver means the server gave up on startup; the loop still ends once it is stopped.
            let _ = ready.send(Ok(info));
            batcher::Batcher::new(encoder, receiver, settings, batcher_stats, batcher_stopping)
                .with_metrics(metrics)
                .run();
        })
        .map_err(|err| StartError::Engine(format!("cannot spawn the engine thread: {err}")))?;
    let handle = EngineHandle {
        sender,
        queued,
        settings,
        stats,
    };
    Ok((handle, EngineThread { thread, stopping }, startup))
}
