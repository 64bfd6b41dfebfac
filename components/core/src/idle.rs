//! The idle decision the sweeper acts on, from the sidecar's reported state.

use std::time::Duration;

use crate::state_stream::SidecarState;

/// What the sweeper should do about one backend now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleVerdict {
    /// Someone is connected: never sweep.
    Active,
    /// Nobody is connected; sweep after `remaining` unless something happens.
    Idle { remaining: Duration },
    /// Nobody has been connected for longer than the grace period.
    PastGrace { idle: Duration },
}

/// Decides from the last state the sidecar reported and the time elapsed since that report.
///
/// `elapsed_since_report` lets the sweeper count down between heartbeats without trusting its
/// own wall clock: the idle time is the sidecar's `seconds_since_active` plus how long ago (by
/// the sweeper's monotonic clock) that report arrived.
pub fn idle_verdict(
    state: &SidecarState,
    elapsed_since_report: Duration,
    grace: Duration,
) -> IdleVerdict {
    if state.live_connections > 0 {
        return IdleVerdict::Active;
    }
    let idle = state.idle().saturating_add(elapsed_since_report);
    if idle > grace {
        IdleVerdict::PastGrace { idle }
    } else {
        IdleVerdict::Idle {
            remaining: grace - idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_stream::PROTOCOL_VERSION;
    use proptest::prelude::*;

    fn state(live: u64, idle: u64) -> SidecarState {
        SidecarState {
            v: PROTOCOL_VERSION,
            ready: true,
            live_connections: live,
            seconds_since_active: idle,
            millis_since_active: None,
        }
    }

    #[test]
    fn counts_down_from_last_activity() {
        assert_eq!(
            idle_verdict(
                &state(0, 10),
                Duration::from_secs(5),
                Duration::from_secs(30)
            ),
            IdleVerdict::Idle {
                remaining: Duration::from_secs(15)
            }
        );
        assert_eq!(
            idle_verdict(
                &state(0, 29),
                Duration::from_secs(2),
                Duration::from_secs(30)
            ),
            IdleVerdict::PastGrace {
                idle: Duration::from_secs(31)
            }
        );
    }

    #[test]
    fn exactly_at_grace_is_not_yet_swept() {
        assert!(matches!(
            idle_verdict(&state(0, 30), Duration::ZERO, Duration::from_secs(30)),
            IdleVerdict::Idle { .. }
        ));
    }

    proptest! {
        #[test]
        fn a_live_connection_is_never_past_grace(
            live in 1u64..u64::MAX, idle in any::<u64>(), elapsed in any::<u64>(), grace in any::<u64>()
        ) {
            prop_assert_eq!(
                idle_verdict(&state(live, idle), Duration::from_secs(elapsed), Duration::from_secs(grace)),
                IdleVerdict::Active
            );
        }
    }
}
