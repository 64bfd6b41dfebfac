//! Graceful shutdown: the connection tasks, counted, each with its own wake-up for the drain
//! signal. A per-task waker slot keeps the data path's polls free of a lock that every
//! connection would share (and is cheaper to poll than a `Notify`: a connection task polls it
//! on every wake-up, so once or twice per request or WebSocket message); the event streams
//! (few) watch a channel instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum DrainState {
    Running = 0,
    /// Stop taking new requests; let live ones finish.
    Draining = 1,
    /// The drain period is over: close now.
    Abort = 2,
    /// The drain is over; listeners' runtimes may stop.
    Finished = 3,
}

/// The running connection tasks and the drain signal.
#[derive(Debug)]
pub(crate) struct Tasks {
    state: AtomicU8,
    watch: watch::Sender<DrainState>,
    next_id: AtomicU64,
    running: Mutex<HashMap<u64, Arc<TaskWake>>>,
    idle: Notify,
}

impl Tasks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(DrainState::Running as u8),
            watch: watch::Sender::new(DrainState::Running),
            next_id: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
            idle: Notify::new(),
        })
    }

    fn state(&self) -> DrainState {
        match self.state.load(Ordering::SeqCst) {
            0 => DrainState::Running,
            1 => DrainState::Draining,
            2 => DrainState::Abort,
            _ => DrainState::Finished,
        }
    }

    /// Registers a task; it counts until the guard drops.
    pub fn start(self: &Arc<Self>) -> TaskGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(TaskWake::default());
        if let Ok(mut running) = self.running.lock() {
            running.insert(id, Arc::clone(&wake));
        }
        TaskGuard {
            tasks: Arc::clone(self),
            id,
            wake,
        }
    }

    pub fn set(&self, state: DrainState) {
        self.state.store(state as u8, Ordering::SeqCst);
        self.watch.send_replace(state);
        if let Ok(running) = self.running.lock() {
            for wake in running.values() {
                wake.wake();
            }
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<DrainState> {
        self.watch.subscribe()
    }

    pub fn count(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or(0)
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

/// The waker of the task waiting for a drain state.
#[derive(Debug, Default)]
struct TaskWake(Mutex<Option<Waker>>);

impl TaskWake {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        // Nothing panics while holding the lock; a poisoned slot is still consistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self) {
        if let Some(waker) = self.slot().take() {
            waker.wake();
        }
    }
}

/// Held by one connection task.
#[derive(Debug)]
pub(crate) struct TaskGuard {
    tasks: Arc<Tasks>,
    id: u64,
    wake: Arc<TaskWake>,
}

impl TaskGuard {
    /// Resolves once the drain state reaches at least `level`. The state is checked before and
    /// after the waker is stored, and `Tasks::set` stores the state before taking the waker
    /// (SeqCst), so a change is either seen here or wakes the task.
    pub fn reached(&self, level: DrainState) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| {
            if self.tasks.state() >= level {
                return Poll::Ready(());
            }
            {
                let mut slot = self.wake.slot();
                if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *slot = Some(cx.waker().clone());
                }
            }
            if self.tasks.state() >= level {
                return Poll::Ready(());
            }
            Poll::Pending
        })
    }

    pub fn state(&self) -> DrainState {
        self.tasks.state()
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let empty = match self.tasks.running.lock() {
            Ok(mut running) => {
                running.remove(&self.id);
                running.is_empty()
            }
            Err(_) => false,
        };
        if empty {
            self.tasks.idle.notify_waiters();
        }
    }
}

/// Resolves once a watched drain state reaches at least `level` (for the event streams).
pub(crate) async fn reached(rx: &mut watch::Receiver<DrainState>, level: DrainState) {
    if rx.wait_for(|s| *s >= level).await.is_err() {
        // The sender is gone: the sidecar is not running any more.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_task_is_woken_once_per_change_and_sees_the_state() {
        let tasks = Tasks::new();
        let guard = tasks.start();
        let wakes = Arc::new(CountWakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut draining = std::pin::pin!(guard.reached(DrainState::Draining));
        let mut abort = std::pin::pin!(guard.reached(DrainState::Abort));
        assert!(draining.as_mut().poll(&mut cx).is_pending());
        assert!(draining.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        tasks.set(DrainState::Draining);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(draining.as_mut().poll(&mut cx).is_ready());
        assert!(abort.as_mut().poll(&mut cx).is_pending());
        tasks.set(DrainState::Abort);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert!(abort.as_mut().poll(&mut cx).is_ready());
        // A state set while nobody waits is seen by the next poll.
        let late = tasks.start();
        assert!(
            std::pin::pin!(late.reached(DrainState::Abort))
                .poll(&mut cx)
                .is_ready()
        );
    }

    #[tokio::test]
    async fn tasks_see_each_stage_and_the_count_reaches_zero() {
        let tasks = Tasks::new();
        let a = tasks.start();
        let b = tasks.start();
        assert_eq!(tasks.count(), 2);
        let waiting = tokio::spawn(async move {
            a.reached(DrainState::Draining).await;
            assert_eq!(a.state(), DrainState::Draining);
            a.reached(DrainState::Abort).await;
        });
        tokio::task::yield_now().await;
        tasks.set(DrainState::Draining);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        tasks.set(DrainState::Abort);
        waiting.await.unwrap();
        assert_eq!(tasks.count(), 1);
        let done = tokio::spawn({
            let tasks = Arc::clone(&tasks);
            async move { tasks.all_done().await }
        });
        drop(b);
        done.await.unwrap();
        assert_eq!(tasks.count(), 0);
    }
}
