//! Shutdown: one token every task of a service watches. Tripped by SIGINT/SIGTERM in binaries, by hand in tests.

use tokio_util::sync::CancellationToken;

/// A clonable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal nobody has tripped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trips the signal: every waiter wakes up.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the signal was tripped.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the signal is tripped.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// A signal tripped by the first SIGINT (Ctrl-C) or SIGTERM the process receives.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            trigger.trigger();
        });
        shutdown
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGTERM, waiting for ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
