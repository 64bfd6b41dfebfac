//! The connection monitor: live connections, last activity and readiness, plus the counters
//! behind `/_spawner/metrics`.
//!
//! The data path only touches atomics. A publisher task turns changes into a
//! `watch` channel of [`Activity`] snapshots (coalesced, so a busy proxy does not flood event
//! subscribers), which the event stream and an embedding process read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use spawner_core::state_stream::{PROTOCOL_VERSION, SidecarState};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// `sealed_until_ms` of a permanent seal.
const PERMANENT: u64 = u64::MAX;

/// What changes in a sidecar's state, without the ever-growing idle time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// The application accepts TCP connections on its port.
    pub ready: bool,
    /// Open WebSockets plus HTTP requests in flight.
    pub live_connections: u64,
    /// The last connect, disconnect or request (`tokio::time`, so the simulator controls it).
    pub last_active: Instant,
}

impl Activity {
    /// The protocol state at `now`.
    pub fn state_at(&self, now: Instant) -> SidecarState {
        SidecarState {
            v: PROTOCOL_VERSION,
            ready: self.ready,
            live_connections: self.live_connections,
            seconds_since_active: now.saturating_duration_since(self.last_active).as_secs(),
            millis_since_active: Some(
                u64::try_from(now.saturating_duration_since(self.last_active).as_millis())
                    .unwrap_or(u64::MAX),
            ),
        }
    }
}

/// Monotonic counters for `/_spawner/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub websockets: AtomicU64,
    pub dead_clients: AtomicU64,
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    pub upstream_errors: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Monitor {
    epoch: Instant,
    live: AtomicU64,
    ready: AtomicBool,
    /// Milliseconds from `epoch` to the last activity.
    last_active_ms: AtomicU64,
    /// Set by every change, cleared by the publisher; `changed` is notified only on the
    /// false → true edge so the hot path rarely touches the notifier.
    dirty: AtomicBool,
    changed: Notify,
    /// Milliseconds since `epoch` until which new connections are refused (0: not sealed,
    /// [`PERMANENT`]: for good). Written only under `seal_lock`; read lock-free.
    sealed_until_ms: AtomicU64,
    /// Serialises seal, renewal, permanence and release, so a tentative seal that fails is
    /// never mistaken for one in force.
    seal_lock: std::sync::Mutex<()>,
    /// Woken when the proxy sees the application refuse a connection.
    pub probe_wake: Notify,
    pub counters: Counters,
    published: watch::Sender<Activity>,
}

impl Monitor {
    pub fn new() -> Arc<Self> {
        let epoch = Instant::now();
        let (published, _) = watch::channel(Activity {
            ready: false,
            live_connections: 0,
            last_active: epoch,
        });
        Arc::new(Self {
            epoch,
            live: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            changed: Notify::new(),
            sealed_until_ms: AtomicU64::new(0),
            seal_lock: std::sync::Mutex::new(()),
            probe_wake: Notify::new(),
            counters: Counters::default(),
            published,
        })
    }

    /// The current state, read from the atomics (not the coalesced snapshot).
    pub fn activity(&self) -> Activity {
        Activity {
            ready: self.ready.load(Ordering::SeqCst),
            live_connections: self.live.load(Ordering::SeqCst),
            last_active: self.epoch
                + Duration::from_millis(self.last_active_ms.load(Ordering::SeqCst)),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Activity> {
        self.published.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::SeqCst) != ready {
            self.mark_changed();
        }
    }

    /// The proxy could not reach the application: not ready until the probe says otherwise.
    pub fn upstream_unreachable(&self) {
        self.counters
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        self.set_ready(false);
        self.probe_wake.notify_one();
    }

    fn now_ms(&self) -> u64 {
        let ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// Whether new connections are refused because the backend is being swept.
    pub fn is_sealed(&self) -> bool {
        let until = self.sealed_until_ms.load(Ordering::SeqCst);
        until == PERMANENT || (until != 0 && self.now_ms() < until)
    }

    fn seal_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data, so a poisoned one is as good as a healthy one.
        self.seal_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Seals the backend for `hold` if it has no live connection; `false` (and nothing sealed)
    /// when it has one. A seal in force is renewed (never shortened, never lifted): no
    /// connection was accepted while it held, so the renewal always succeeds. Together with
    /// the check after [`Monitor::connection_started`] this is race-free: a connection either
    /// sees the seal or is seen by it (both use SeqCst).
    pub fn try_seal(&self, hold: Duration) -> bool {
        let _serial = self.seal_guard();
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX))
            .clamp(1, PERMANENT - 1);
        if self.is_sealed() {
            self.sealed_until_ms.fetch_max(until, Ordering::SeqCst);
            return true;
        }
        let before = self.sealed_until_ms.swap(until, Ordering::SeqCst);
        if self.live.load(Ordering::SeqCst) > 0 {
            self.sealed_until_ms.store(before, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Seals for good (the sweep was written): a seal in force becomes permanent, and so does
    /// a new one if no connection is live. `false` when a connection is live and no seal held.
    pub fn seal_permanently(&self) -> bool {
        let _serial = self.seal_guard();
        if self.is_sealed() {
            self.sealed_until_ms.store(PERMANENT, Ordering::SeqCst);
            return true;
        }
        let before = self.sealed_until_ms.swap(PERMANENT, Ordering::SeqCst);
        if self.live.load(Ordering::SeqCst) > 0 {
            self.sealed_until_ms.store(before, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Lifts a seal that is not permanent (the sweep was decided against); `false` when the
    /// seal is permanent.
    pub fn unseal(&self) -> bool {
        let _serial = self.seal_guard();
        if self.sealed_until_ms.load(Ordering::SeqCst) == PERMANENT {
            return false;
        }
        self.sealed_until_ms.store(0, Ordering::SeqCst);
        true
    }

    fn touch(&self) {
        let ms = self.now_ms();
        // Under load most requests land in the millisecond already recorded: a load instead of
        // a locked read-modify-write on a cache line every runtime thread writes.
        if self.last_active_ms.load(Ordering::SeqCst) < ms {
            self.last_active_ms.fetch_max(ms, Ordering::SeqCst);
        }
    }

    fn mark_changed(&self) {
        // Already dirty: the publisher has not cleared the flag yet, so its next read of the
        // state (SeqCst, after clearing) sees this change. Checking first saves the swap.
        if !self.dirty.load(Ordering::SeqCst) && !self.dirty.swap(true, Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    /// A proxied request or WebSocket begins; it is live until the guard drops.
    pub fn connection_started(self: &Arc<Self>) -> LiveGuard {
        self.touch();
        self.live.fetch_add(1, Ordering::SeqCst);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.mark_changed();
        LiveGuard {
            monitor: Arc::clone(self),
        }
    }

    /// [`Monitor::connection_started`] unless the backend is sealed. The seal is checked before
    /// counting and again after: a seal that raced with this connection either saw it (and
    /// failed) or is seen here (and the connection is refused).
    pub(crate) fn connection_started_unless_sealed(self: &Arc<Self>) -> Option<LiveGuard> {
        if self.is_sealed() {
            return None;
        }
        let guard = self.connection_started();
        if self.is_sealed() {
            drop(guard);
            return None;
        }
        Some(guard)
    }

    /// Publishes changes to the watch channel, at most one snapshot per `coalesce`.
    pub async fn publish(self: Arc<Self>, coalesce: Duration) {
        loop {
            self.changed.notified().await;
            self.dirty.store(false, Ordering::SeqCst);
            let now = self.activity();
            self.published.send_if_modified(|current| {
                let modified = *current != now;
                *current = now;
                modified
            });
            if !coalesce.is_zero() {
                tokio::time::sleep(coalesce).await;
            }
        }
    }
}

/// One live connection: counted from creation until drop, whatever ends it (completion, a
/// client reset, a dead-client timeout or a drain).
#[derive(Debug)]
pub(crate) struct LiveGuard {
    monitor: Arc<Monitor>,
}

impl LiveGuard {
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let m = &self.monitor;
        m.touch();
        m.live.fetch_sub(1, Ordering::SeqCst);
        m.mark_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn guards_count_up_and_down_and_touch_activity() {
        let monitor = Monitor::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        let before = monitor.activity();
        assert_eq!(before.state_at(Instant::now()).seconds_since_active, 5);
        let a = monitor.connection_started();
        let b = monitor.connection_started();
        assert_eq!(monitor.activity().live_connections, 2);
        drop(a);
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(b);
        let after = monitor.activity();
        assert_eq!(after.live_connections, 0);
        assert_eq!(after.state_at(Instant::now()).seconds_since_active, 0);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            monitor
                .activity()
                .state_at(Instant::now())
                .seconds_since_active,
            4
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_seal_in_force_is_renewed_and_never_lifted_by_a_failed_attempt() {
        let monitor = Monitor::new();
        let hold = Duration::from_secs(30);
        assert!(monitor.try_seal(hold));
        // A connection that was counted before its second seal check (it will be refused).
        let racing = monitor.connection_started();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(monitor.try_seal(hold), "renewal of a seal in force");
        drop(racing);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(monitor.is_sealed(), "renewed at 20 s, holds until 50 s");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!monitor.is_sealed(), "lapses without renewal");

        // Not in force and a live connection: refused, and nothing sealed.
        let live = monitor.connection_started();
        assert!(!monitor.try_seal(hold));
        assert!(!monitor.is_sealed());
        assert!(!monitor.seal_permanently());
        assert!(!monitor.is_sealed());
        drop(live);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_seal_outlasts_every_hold_and_cannot_be_lifted() {
        let monitor = Monitor::new();
        assert!(monitor.try_seal(Duration::from_secs(30)));
        assert!(monitor.seal_permanently());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(monitor.is_sealed());
        assert!(monitor.try_seal(Duration::from_secs(1)));
        assert!(!monitor.unseal());
        assert!(monitor.is_sealed());
        assert!(monitor.connection_started_unless_sealed().is_none());

        let other = Monitor::new();
        assert!(other.try_seal(Duration::from_secs(30)));
        assert!(other.unseal());
        assert!(!other.is_sealed());
        assert!(other.connection_started_unless_sealed().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn publisher_coalesces_but_ends_at_the_truth() {
        let monitor = Monitor::new();
        let mut rx = monitor.subscribe();
        let task = tokio::spawn(Arc::clone(&monitor).publish(Duration::from_millis(50)));
        let guards: Vec<_> = (0..10).map(|_| monitor.connection_started()).collect();
        rx.changed().await.expect("publisher alive");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.borrow_and_update().live_connections, 10);
        drop(guards);
        monitor.set_ready(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last = *rx.borrow_and_update();
        assert_eq!(last.live_connections, 0);
        assert!(last.ready);
        task.abort();
    }
}
