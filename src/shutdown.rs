//! Draining: telling every task to finish, and waiting for them, with a deadline.
//!
//! A [`ShutdownCoordinator`] hands out [`ShutdownHandle`]s. Each task that must finish before
//! the process exits holds one; [`ShutdownCoordinator::shutdown_with_timeout`] signals them all
//! and waits until every handle was dropped, or the deadline passed.
//!
//! ```
//! use shellflip::{ShutdownCoordinator, ShutdownSignal};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let coordinator = ShutdownCoordinator::new();
//! let handle = coordinator.handle();
//! tokio::spawn(async move {
//!     let mut signal = ShutdownSignal::from(&*handle);
//!     signal.on_shutdown().await;
//!     // finish the work in hand, then drop `handle`
//! });
//! let drained = coordinator.shutdown_with_timeout(Duration::from_secs(5)).await;
//! assert!(drained);
//! # }
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Held by a task that must finish before the process exits.
#[derive(Debug)]
pub struct ShutdownHandle {
    signal: ShutdownSignal,
    /// Dropped with the last handle: that is how the coordinator learns that all finished.
    _done: mpsc::Sender<()>,
}

impl Default for ShutdownHandle {
    /// A handle that is never signalled and that nobody waits for.
    fn default() -> Self {
        let (done, _) = mpsc::channel(1);
        ShutdownHandle {
            signal: ShutdownSignal::default(),
            _done: done,
        }
    }
}

/// Tells a task that shutdown started. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignal {
    token: Option<CancellationToken>,
}

impl ShutdownSignal {
    /// Resolves once shutdown has started (at once if it already has). A signal made with
    /// `default()` never resolves.
    ///
    /// # Cancellation safety
    ///
    /// Cancellation safe: use it in `tokio::select!`.
    pub async fn on_shutdown(&mut self) {
        match &self.token {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Whether shutdown has started: for instance, to answer a keep-alive request with
    /// `Connection: close`.
    pub fn is_shutting_down(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }
}

impl From<&ShutdownHandle> for ShutdownSignal {
    fn from(handle: &ShutdownHandle) -> Self {
        handle.signal.clone()
    }
}

/// Signals a group of tasks to finish, and waits for them.
#[derive(Debug)]
pub struct ShutdownCoordinator {
    handle: Arc<ShutdownHandle>,
    token: CancellationToken,
    done: mpsc::Receiver<()>,
}

impl Default for ShutdownCoordinator {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownCoordinator {
    /// A coordinator with no task yet.
    pub fn new() -> Self {
        let token = CancellationToken::new();
        let (done_tx, done) = mpsc::channel(1);
        ShutdownCoordinator {
            handle: Arc::new(ShutdownHandle {
                signal: ShutdownSignal {
                    token: Some(token.clone()),
                },
                _done: done_tx,
            }),
            token,
            done,
        }
    }

    /// A handle for a task that must finish before shutdown completes.
    pub fn handle(&self) -> Arc<ShutdownHandle> {
        Arc::clone(&self.handle)
    }

    /// A handle for a task that need not be waited for, but may start tasks that must: when
    /// `upgrade` fails, shutdown has started.
    pub fn handle_weak(&self) -> Weak<ShutdownHandle> {
        Arc::downgrade(&self.handle)
    }

    /// A signal that resolves when shutdown starts, without holding up shutdown.
    pub fn signal(&self) -> ShutdownSignal {
        self.handle.signal.clone()
    }

    /// Signals every task that shutdown started, without waiting: for a server that drains on
    /// its own (a framework's graceful shutdown) while this coordinator's tasks finish too.
    /// [`shutdown`](Self::shutdown) later waits for them. Calling it again does nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let coordinator = shellflip::ShutdownCoordinator::new();
    /// let signal = coordinator.signal();
    /// coordinator.begin_shutdown();
    /// assert!(signal.is_shutting_down());
    /// coordinator.shutdown().await; // no task holds a handle: returns at once
    /// # }
    /// ```
    pub fn begin_shutdown(&self) {
        self.token.cancel();
    }

    /// Signals every task and waits until all handles were dropped. Stop accepting new work
    /// (drop listeners) first.
    pub async fn shutdown(mut self) {
        let started = std::time::Instant::now();
        tracing::info!("draining");
        self.token.cancel();
        drop(self.handle);
        let _ = self.done.recv().await;
        tracing::info!(elapsed = ?started.elapsed(), "drained");
    }

    /// Like [`shutdown`](Self::shutdown), but waits at most `timeout`. Returns whether every
    /// task finished in time.
    pub async fn shutdown_with_timeout(self, timeout: Duration) -> bool {
        let drained = tokio::time::timeout(timeout, self.shutdown()).await.is_ok();
        if !drained {
            tracing::warn!(?timeout, "drain deadline passed with tasks still running");
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tasks_then_returns() {
        let c = ShutdownCoordinator::new();
        let h = c.handle();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut s = ShutdownSignal::from(&*h);
            s.on_shutdown().await;
            assert!(s.is_shutting_down());
            let _ = rx.await;
            drop(h);
        });
        let shutdown = tokio::spawn(c.shutdown_with_timeout(Duration::from_secs(30)));
        tokio::task::yield_now().await;
        assert!(!shutdown.is_finished());
        tx.send(()).unwrap();
        assert!(shutdown.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_bounds_a_stuck_task() {
        let c = ShutdownCoordinator::new();
        let _stuck = c.handle();
        assert!(!c.shutdown_with_timeout(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn weak_handle_fails_after_shutdown_starts() {
        let c = ShutdownCoordinator::new();
        let weak = c.handle_weak();
        assert!(weak.upgrade().is_some());
        c.shutdown().await;
        assert!(weak.upgrade().is_none());
    }
}
