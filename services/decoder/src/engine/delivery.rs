//! A generation stream's outbox: the tokens (and finish) its client has not taken yet, coalesced into one message,
//! so that a client that stops reading pauses its sequence instead of buffering without bound.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::types::{GenerateEvent, GenerateUpdate};
use crate::error::RequestError;

/// What happened when a stream's pending messages were offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Nothing is pending any more.
    Done,
    /// The client's buffer is full; the message stays pending.
    Blocked,
    /// The client went away.
    Closed,
}

/// The tokens (and finish) a stream has not received yet, coalesced into one message.
#[derive(Debug)]
pub(crate) struct Delivery {
    events: mpsc::Sender<GenerateEvent>,
    pub(crate) pending: GenerateUpdate,
    /// Since when the client's buffer has been full, if it is.
    blocked_since: Option<Instant>,
}

impl Delivery {
    pub(crate) fn new(events: mpsc::Sender<GenerateEvent>) -> Self {
        Self {
            events,
            pending: GenerateUpdate::default(),
            blocked_since: None,
        }
    }

    /// Whether a message waits for the client.
    pub(crate) fn is_pending(&self) -> bool {
        !self.pending.tokens.is_empty() || self.pending.finish.is_some()
    }

    /// Whether the client dropped its stream.
    pub(crate) fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Whether the client has left a message untaken for `timeout` or longer.
    pub(crate) fn stalled(&self, now: Instant, timeout: Duration) -> bool {
        self.blocked_since
            .is_some_and(|since| now.saturating_duration_since(since) >= timeout)
    }

    /// Offers the pending message to the client without blocking.
    pub(crate) fn flush(&mut self) -> Flush {
        if !self.is_pending() {
            self.blocked_since = None;
            return Flush::Done;
        }
        let update = std::mem::take(&mut self.pending);
        let flush = match self.events.try_send(Ok(update)) {
            Ok(()) => Flush::Done,
            Err(mpsc::error::TrySendError::Full(Ok(update))) => {
                self.pending = update;
                Flush::Blocked
            }
            Err(mpsc::error::TrySendError::Full(Err(_))) => Flush::Blocked,
            Err(mpsc::error::TrySendError::Closed(_)) => Flush::Closed,
        };
        match flush {
            Flush::Blocked => {
                self.blocked_since.get_or_insert_with(Instant::now);
            }
            Flush::Done | Flush::Closed => self.blocked_since = None,
        }
        flush
    }

    /// Ends the stream with `error`, best effort: a client whose buffer is full sees the stream end instead.
    pub(crate) fn fail(self, error: RequestError) {
        let _ = self.events.try_send(Err(error));
    }
}
