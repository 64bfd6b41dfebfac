//! Graceful shutdown: a signal every connection task watches, and a count of those tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrainState {
    Running,
    /// Stop taking new requests; let live ones finish.
    Draining,
    /// The drain period is over: close now.
    Abort,
}

#[derive(Clone, Debug)]
pub(crate) struct Drain(Arc<watch::Sender<DrainState>>);

impl Drain {
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(DrainState::Running)))
    }

    pub fn set(&self, state: DrainState) {
        self.0.send_replace(state);
    }

    pub fn subscribe(&self) -> watch::Receiver<DrainState> {
        self.0.subscribe()
    }
}

/// Resolves once the drain state reaches at least `level`.
pub(crate) async fn reached(rx: &mut watch::Receiver<DrainState>, level: DrainState) {
    let rank = |s: DrainState| match s {
        DrainState::Running => 0,
        DrainState::Draining => 1,
        DrainState::Abort => 2,
    };
    if rx.wait_for(|s| rank(*s) >= rank(level)).await.is_err() {
        // The sender is gone: the sidecar is not running any more.
        std::future::pending::<()>().await;
    }
}

/// Counts the running connection tasks.
#[derive(Debug, Default)]
pub(crate) struct TaskCount {
    running: AtomicUsize,
    idle: Notify,
}

impl TaskCount {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn start(self: &Arc<Self>) -> TaskGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }

    pub fn count(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub async fn all_done(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Held by one connection task.
#[derive(Debug)]
pub(crate) struct TaskGuard(Arc<TaskCount>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
