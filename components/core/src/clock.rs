//! Wall-clock time, injected (DESIGN.md rule 3): the controller, the sweeper and the node agent
//! read "now" from a [`Clock`] in their context, never from the system directly; waiting uses
//! `tokio::time`.

use std::fmt::Debug;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// A source of wall-clock timestamps.
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> Timestamp;
}

/// `t` as a chrono time, for the code that formats or computes with chrono (truncated to
/// nanoseconds, which both represent exactly).
pub fn to_chrono(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32)
        .unwrap_or_default()
}

/// A chrono time as a [`Timestamp`].
pub fn from_chrono(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The system's clock, for production.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that starts at a fixed timestamp and advances with tokio's clock, so it follows
/// paused test time and the simulator's time.
#[derive(Clone, Debug)]
pub struct TokioClock {
    start: Timestamp,
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(start: Timestamp) -> Self {
        Self {
            start,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed =
            SignedDuration::try_from(self.origin.elapsed()).unwrap_or(SignedDuration::MAX);
        self.start.saturating_add(elapsed).unwrap_or(Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chrono_conversions_round_trip() {
        let t: Timestamp = "2030-01-02T03:04:05.123456789Z".parse().expect("ts");
        let c = to_chrono(t);
        assert_eq!(
            c.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "2030-01-02T03:04:05.123456789Z"
        );
        assert_eq!(from_chrono(c), t);
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_tokio_time() {
        let start: Timestamp = "2024-01-01T00:00:00Z".parse().expect("ts");
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(clock.now().to_string(), "2024-01-01T00:01:30Z");
    }
}
