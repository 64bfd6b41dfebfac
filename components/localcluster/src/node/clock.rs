//! Injected wall clock (DESIGN.md rule 3): every timestamp the agent writes comes from here.

use k8s_openapi::jiff::Timestamp;

/// Source of wall-clock time for the timestamps the agent writes (startTime, startedAt,
/// finishedAt, heartbeats, lease renewals). Waiting never uses it: that is `tokio::time`.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The machine's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}
