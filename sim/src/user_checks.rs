//! What users saw, checked after every step: no user reached a backend other than the one its
//! token names (and no token opened another backend), and every backend a user terminated
//! ended within [`TERMINATE_BOUND`] of the api accepting the request.

use std::time::Duration;

use spawner_core::Phase;

use crate::invariants::Violation;
use crate::users::SharedReport;

/// The routers take every user to the backend its token names, and no token opens another.
pub const ROUTED_BY_TOKEN: &str = "users reach only the backend their token names";
/// A terminate request the api accepted is carried out.
pub const TERMINATED_ON_REQUEST: &str = "a backend its user terminated ends";
/// How long after the api accepted a user's terminate request its backend may still be live:
/// the controller ends it on the next reconcile (the request is a watched change). Suspended
/// while a fault is active and until its recovery time has passed, like the sweep deadlines.
pub const TERMINATE_BOUND: Duration = Duration::from_secs(10);

/// In a world without faults, a user's connection ends only when the user ends it or its
/// backend ends (swept, terminated, failed: its app crashed, its pod was evicted).
pub const NOT_LOST_WHILE_BACKEND_LIVES: &str = "no connection is lost while its backend lives";
/// How long after a user lost a connection its backend must be seen ended: the controller
/// fails a backend whose app exited on the next reconcile after the node reports it.
pub const LOST_BOUND: Duration = Duration::from_secs(10);

/// The users' terminate requests not yet seen carried out, and their lost connections not yet
/// explained by their backend ending.
#[derive(Default)]
pub struct UserChecks {
    /// Backend and when the world first saw its request.
    pending: Vec<(String, Duration)>,
    /// Backend of a lost connection, when that connection was opened, and when the world
    /// first saw the loss.
    lost: Vec<(String, Duration, Duration)>,
}

impl UserChecks {
    /// Checks the users' report at `now`. `backend_of` is the phase in the API server of the
    /// backend named so (`None` once deleted) and when the world first saw it (a name comes
    /// back once its backend is deleted); `deadlines_from` is when deadlines are owed again
    /// after faults (`None` when there never was one, `now` while one is active).
    pub fn check(
        &mut self,
        report: &SharedReport,
        now: Duration,
        deadlines_from: Option<Duration>,
        backend_of: impl Fn(&str) -> (Option<Phase>, Option<Duration>),
    ) -> Result<(), Violation> {
        let phase_of = |name: &str| backend_of(name).0;
        let (misrouted, requested, lost) = report.update(|r| {
            (
                r.misrouted.first().cloned(),
                std::mem::take(&mut r.terminate_requests),
                std::mem::take(&mut r.lost_connections),
            )
        });
        if let Some(detail) = misrouted {
            return Err(Violation {
                at: now,
                invariant: ROUTED_BY_TOKEN,
                detail,
            });
        }
        self.check_lost(lost, now, deadlines_from, &backend_of)?;
        self.pending
            .extend(requested.into_iter().map(|name| (name, now)));
        let owed_from = deadlines_from.unwrap_or(Duration::ZERO);
        let mut late = None;
        self.pending.retain(|(name, at)| match phase_of(name) {
            None => false,
            Some(phase) if phase.is_terminal() => false,
            Some(phase) => {
                if (*at).max(owed_from) + TERMINATE_BOUND < now && late.is_none() {
                    late = Some(format!(
                        "{name} is still {phase} {:.1}s after its user's terminate request was accepted",
                        (now - *at).as_secs_f64()
                    ));
                }
                true
            }
        });
        match late {
            Some(detail) => Err(Violation {
                at: now,
                invariant: TERMINATED_ON_REQUEST,
                detail,
            }),
            None => Ok(()),
        }
    }

    /// Every connection lost in a world without faults belongs to a backend that ended
    /// within [`LOST_BOUND`]. (With faults, a crashed router or a partition ends connections
    /// of live backends by design.)
    fn check_lost(
        &mut self,
        lost: Vec<(String, Duration)>,
        now: Duration,
        deadlines_from: Option<Duration>,
        backend_of: &impl Fn(&str) -> (Option<Phase>, Option<Duration>),
    ) -> Result<(), Violation> {
        if deadlines_from.is_some() {
            self.lost.clear();
            return Ok(());
        }
        self.lost
            .extend(lost.into_iter().map(|(name, opened)| (name, opened, now)));
        let mut lost_while_live = None;
        self.lost.retain(|(name, opened, at)| match backend_of(name) {
            (None, _) => false,
            (Some(phase), _) if phase.is_terminal() => false,
            // A later backend of the same name: the connection's own backend ended (a user
            // may notice the loss late, after waiting on its next backend).
            (Some(_), Some(first_seen)) if first_seen > *opened => false,
            (Some(phase), _) => {
                if *at + LOST_BOUND < now && lost_while_live.is_none() {
                    lost_while_live = Some(format!(
                        "a user's connection to {name} (opened at {:.3}s) ended at {:.3}s and its backend is still {phase}",
                        opened.as_secs_f64(),
                        at.as_secs_f64()
                    ));
                }
                true
            }
        });
        match lost_while_live {
            Some(detail) => Err(Violation {
                at: now,
                invariant: NOT_LOST_WHILE_BACKEND_LIVES,
                detail,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// One connection to `b`, opened at 10 s, lost at 20 s; checked at 40 s (past the bound)
    /// with `b`'s phase and when the world first saw the backend named `b`.
    fn check_one_loss(phase: Option<Phase>, first_seen: Duration) -> Result<(), Violation> {
        let report = SharedReport::default();
        let mut checks = UserChecks::default();
        report.update(|r| r.lost_connections.push(("b".into(), secs(10))));
        checks.check(&report, secs(20), None, |_| (phase, Some(first_seen)))?;
        checks.check(&report, secs(40), None, |_| (phase, Some(first_seen)))
    }

    #[test]
    fn a_connection_lost_while_its_backend_lives_is_a_violation() {
        let violation = check_one_loss(Some(Phase::Ready), secs(5)).expect_err("violation");
        assert_eq!(violation.invariant, NOT_LOST_WHILE_BACKEND_LIVES);
    }

    #[test]
    fn a_connection_whose_backend_ended_is_explained() {
        assert!(check_one_loss(Some(Phase::Swept), secs(5)).is_ok());
        assert!(check_one_loss(None, secs(5)).is_ok());
    }

    #[test]
    fn a_later_backend_of_the_same_name_does_not_make_a_loss_a_violation() {
        // The connection's backend was deleted and the key's next one got its name back
        // after the connection was opened (seen at 15 s): the loss is the old one's end.
        assert!(check_one_loss(Some(Phase::Ready), secs(15)).is_ok());
    }
}
