//! Wall-clock time inside the simulation: turmoil's logical time since its fixed epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

/// The epoch every simulated world starts at, so timestamps are the same in every run.
pub fn sim_epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Simulated wall clock; outside a host (between steps) it reads the epoch.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimClock;

impl SimClock {
    pub fn now(&self) -> DateTime<Utc> {
        let since = turmoil::since_epoch()
            .unwrap_or_else(|| sim_epoch().duration_since(UNIX_EPOCH).unwrap_or_default());
        DateTime::<Utc>::from(UNIX_EPOCH + since)
    }
}

impl spawner_localcluster::Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        SimClock::now(self)
    }
}
