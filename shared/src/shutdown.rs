//! Graceful shutdown: one token cancelled by whoever decides to stop, watched by every task.
//!
//! Tasks are spawned on a [`TaskTracker`] so that a stop can wait until they have all ended,
//! in the spirit of mini-redis's broadcast shutdown signal.

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// The pair every long-running component receives: the stop signal and the tracker to spawn on.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the process should stop.
    pub token: CancellationToken,
    /// Every background task is spawned here so that stopping can wait for it.
    pub tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh, un-cancelled shutdown handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that ends when it finishes or when the stop signal fires.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = fut => {}
            }
        });
    }

    /// Signals every task to stop and waits until they have.
    pub async fn stop(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
