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

fn timestamp() -> k8s_openapi::jiff::Timestamp {
    let now = SimClock.now();
    k8s_openapi::jiff::Timestamp::new(now.timestamp(), now.timestamp_subsec_nanos() as i32)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// One trait for the controller, the sweeper and the node agent.
impl spawner_core::clock::Clock for SimClock {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        timestamp()
    }
}

impl spawner_api::Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        SimClock::now(self)
    }
}
