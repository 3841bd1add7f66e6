//! One engine step: the chunks of every runnable request packed into one forward, then the logits rows each
//! request needs, computed together.

use std::time::Instant;

use kosmos_model::{ModelError, PagedKvCache, SeqChunk, Tensor, TextModel};

use super::score::ScoreTask;
use super::sequence::{RowsWanted, Sequence};

/// Whose chunk a span of the step's rows is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The running sequence at this index.
    Sequence(usize),
    /// The scoring at this index, in its context step.
    ScoreContext(usize),
    /// The scoring at `task`, candidate run `run`.
    ScoreCandidate {
        /// Index of the scoring.
        task: usize,
        /// Index of the run within the scoring.
        run: usize,
    },
}

/// The logits rows of one chunk: one row for `RowsWanted::Last`, every row for `RowsWanted::All`.
#[derive(Debug)]
pub(crate) struct ChunkLogits {
    pub(crate) owner: Owner,
    pub(crate) rows: Vec<Vec<f32>>,
}

/// Runs one packed forward over the runnable sequences and every scoring (whose blocks the scheduler reserved),
/// and returns the logits rows each chunk needs (f32, `(vocab)` each).
pub(crate) fn run(
    model: &TextModel,
    cache: &mut PagedKvCache,
    running: &mut [Sequence],
    scoring: &mut [ScoreTask],
    started: Instant,
) -> Result<Vec<ChunkLogits>, ModelError> {
    let mut owners = Vec::new();
    let mut chunks: Vec<(SeqChunk<'_>, RowsWanted)> = Vec::new();
    for (index, sequence) in running.iter_mut().enumerate() {
        if sequence.is_runnable() {
            chunks.push(sequence.chunk(started));
            owners.push(Owner::Sequence(index));
        }
    }
    for (task_index, task) in scoring.iter_mut().enumerate() {
        let in_context = task.in_context_step();
        let before = chunks.len();
        task.chunks(started, &mut chunks);
        for run in 0..chunks.len() - before {
            owners.push(if in_context {
                Owner::ScoreContext(task_index)
            } else {
                Owner::ScoreCandidate {
                    task: task_index,
                    run,
                }
            });
        }
    }
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<(usize, RowsWanted)> = chunks
        .iter()
        .map(|(chunk, rows)| (chunk.input_ids.len(), *rows))
        .collect();
    let mut seq_chunks: Vec<SeqChunk<'_>> = chunks.into_iter().map(|(chunk, _)| chunk).collect();
    // (total new tokens, hidden)
    let hidden = model.forward(cache, &mut seq_chunks)?;
    drop(seq_chunks);
    let mut selected: Vec<u32> = Vec::new();
    let mut counts = Vec::with_capacity(wanted.len());
    let mut start = 0usize;
    for &(len, rows) in &wanted {
        match rows {
            RowsWanted::Last => {
                selected.push((start + len - 1) as u32);
                counts.push(1);
            }
            RowsWanted::All => {
                selected.extend((start..start + len).map(|row| row as u32));
                counts.push(len);
            }
        }
        start += len;
    }
    let index = Tensor::from_vec(selected, counts.iter().sum::<usize>(), hidden.device())?;
    // (selected rows, vocab) f32
    let logits = model.logits(&hidden.index_select(&index, 0)?)?;
    let mut rows = logits.to_vec2::<f32>()?.into_iter();
    Ok(owners
        .into_iter()
        .zip(counts)
        .map(|(owner, count)| ChunkLogits {
            owner,
            rows: rows.by_ref().take(count).collect(),
        })
        .collect())
}
