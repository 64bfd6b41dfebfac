//! Injected wall clock (DESIGN.md rule 3): every timestamp the server writes comes from here,
//! and its formats.

use chrono::{DateTime, SecondsFormat, Utc};

/// The one clock contract of the workspace (`spawner_core::clock`): localcluster reads every
/// timestamp it writes from it.
pub use spawner_core::clock::{Clock, SystemClock};

/// The clock's reading as chrono, which the server formats and computes with.
pub fn now(clock: &dyn Clock) -> DateTime<Utc> {
    spawner_core::clock::to_chrono(clock.now())
}

/// Kubernetes `Time` format: RFC 3339 with second precision.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Human age as kubectl prints it (`5s`, `3m`, `2h`, `4d`).
pub fn human_age(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 120 {
        format!("{secs}s")
    } else if secs < 600 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else if secs < 3 * 3600 {
        format!("{}m", secs / 60)
    } else if secs < 48 * 3600 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}d", secs / 86400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(130), "2m10s");
        assert_eq!(human_age(3600), "60m");
        assert_eq!(human_age(5 * 3600), "5h");
        assert_eq!(human_age(3 * 86400), "3d");
    }
}
