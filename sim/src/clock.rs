//! Wall-clock time inside the simulation: turmoil's logical time since its fixed epoch, plus a
//! per-host offset that a fault can step forward or back (a host whose clock jumps, then is
//! corrected).
//!
//! Only wall-clock *readings* move with the offset: every component's timers and countdowns
//! run on tokio's (turmoil's) monotonic time, which a clock step does not touch, as on a real
//! machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

/// The epoch every simulated world starts at, so timestamps are the same in every run.
pub fn sim_epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Simulated time since the world's start (what the world's `sim.elapsed()` reads), inside a
/// host; zero outside one.
pub fn sim_elapsed() -> Duration {
    let epoch = sim_epoch().duration_since(UNIX_EPOCH).unwrap_or_default();
    turmoil::since_epoch()
        .and_then(|since| since.checked_sub(epoch))
        .unwrap_or_default()
}

/// Milliseconds from the UNIX epoch to the simulated epoch.
pub fn sim_epoch_ms() -> i64 {
    sim_epoch()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Simulated wall clock of one host: turmoil's time since its epoch plus the host's offset.
/// Outside a host (between steps) it reads the epoch plus the offset.
#[derive(Clone, Debug, Default)]
pub struct SimClock {
    /// Milliseconds the host's clock is ahead of the world's (negative: behind).
    offset_ms: Arc<AtomicI64>,
}

impl SimClock {
    /// A clock that is never stepped.
    pub fn new() -> Self {
        Self::default()
    }

    /// How far this clock is ahead of the world's, in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// The clock's reading, in milliseconds since the UNIX epoch.
    pub fn now_ms(&self) -> i64 {
        let since = turmoil::since_epoch()
            .unwrap_or_else(|| sim_epoch().duration_since(UNIX_EPOCH).unwrap_or_default());
        since.as_millis() as i64 + self.offset_ms()
    }

    pub fn now(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }

    fn timestamp(&self) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_millisecond(self.now_ms())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }
}

/// The clocks of a world's hosts, by host name: the world gives each host's components its
/// clock, and clock-step faults move it.
#[derive(Clone, Debug, Default)]
pub struct HostClocks(Arc<Mutex<BTreeMap<String, SimClock>>>);

impl HostClocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SimClock>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock of `host` (the same one every time, so a step reaches every component there).
    pub fn of(&self, host: &str) -> SimClock {
        self.lock().entry(host.to_string()).or_default().clone()
    }

    /// Moves the clock of `host` by `by_ms` (negative: back).
    pub fn step(&self, host: &str, by_ms: i64) {
        self.of(host).offset_ms.fetch_add(by_ms, Ordering::SeqCst);
    }

    /// The offset of `host`'s clock, in milliseconds.
    pub fn offset_ms(&self, host: &str) -> i64 {
        self.lock().get(host).map_or(0, SimClock::offset_ms)
    }
}

/// The one clock contract, for every component and the API server.
impl spawner_core::clock::Clock for SimClock {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        self.timestamp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_moves_only_its_hosts_clock() {
        let clocks = HostClocks::default();
        let controller = clocks.of("controller-0");
        let node = clocks.of("node-0");
        let base = node.now_ms();
        assert_eq!(base, sim_epoch_ms());
        clocks.step("controller-0", 600_000);
        assert_eq!(controller.now_ms(), base + 600_000);
        assert_eq!(node.now_ms(), base);
        clocks.step("controller-0", -600_000);
        assert_eq!(clocks.offset_ms("controller-0"), 0);
        clocks.step("node-0", -1_500);
        assert_eq!(
            spawner_core::clock::Clock::now(&node).as_millisecond(),
            base - 1_500
        );
    }
}
