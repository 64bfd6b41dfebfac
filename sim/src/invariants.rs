//! The invariants of DESIGN.md as a checker fed with what the world shows at every step.
//!
//! The world (the sim loop) reports observations — a backend's phase as stored in the API
//! server, the live-connection count its sidecar reports, its deletion — and the checker fails
//! at the first observation that breaks an invariant. Deadlines are checked with
//! [`InvariantChecker::check_deadlines`] at every step and leaks with
//! [`InvariantChecker::check_drained`] at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use spawner_core::Phase;

/// Something the world showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A backend was created for `key`, with its grace period.
    Created {
        backend: String,
        key: Option<String>,
        grace: Duration,
    },
    /// The backend's stored phase, with the reason of the last transition.
    Phase {
        backend: String,
        phase: Phase,
        reason: Option<String>,
    },
    /// Its sidecar's live-connection count.
    Live { backend: String, live: u64 },
    /// The backend object is gone from the API server.
    Deleted { backend: String },
    /// The backend is ending: its terminate was requested or its deletion began. The api
    /// counts it as no longer live for its key (the next get-or-create makes a new one).
    Ending { backend: String },
    /// The backend has a `maxLifetimeSeconds`: its `creationTimestamp` plus that, in
    /// milliseconds since the UNIX epoch (the deadline as the controller computes it).
    Lifetime { backend: String, deadline_ms: i64 },
}

/// An invariant broken, with what led to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub at: Duration,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {:.3}s: {}: {}",
            self.at.as_secs_f64(),
            self.invariant,
            self.detail
        )
    }
}

#[derive(Clone, Debug)]
struct Backend {
    key: Option<String>,
    grace: Duration,
    phase: Phase,
    phases_seen: BTreeSet<Phase>,
    live: u64,
    /// Sim time since when the backend has had no live connection.
    idle_since: Duration,
    /// Sim time since when it has had at least one, while it has.
    live_since: Option<Duration>,
    /// When it was first seen swept or stopped for a reason other than a request.
    stopped_at: Option<Duration>,
    /// When its lifetime ends by the controller's rule, in ms since the UNIX epoch.
    lifetime_deadline_ms: Option<i64>,
    /// Whether it ended by request (terminate, lifetime) rather than by its own doing.
    stopped_on_request: bool,
    /// Its terminate was requested or its deletion began ([`Observation::Ending`]).
    ending: bool,
    deleted: bool,
}

impl Backend {
    /// Whether a connection that is live now was already live [`RACE_WINDOW`] before the
    /// backend was stopped: one the sweeper had every chance to see.
    fn live_before_stop(&self) -> bool {
        // A failed backend's application is gone (the controller decided from the pod's
        // status), and a backend stopped on request (a terminate, its lifetime) is ended with
        // its users connected by design: what is left of their connections is the sidecar
        // draining them (a close frame a user does not answer lingers 5 s), which can outlast
        // a short retention.
        if self.phases_seen.contains(&Phase::Failed) || self.stopped_on_request {
            return false;
        }
        match (self.live_since, self.stopped_at) {
            (Some(since), Some(stopped)) if self.live > 0 => since + RACE_WINDOW <= stopped,
            _ => false,
        }
    }
}

/// How long before a sweep a connection may have opened without breaking the invariant: zero.
/// The sweeper seals the sidecar before it writes the sweep (`spawner_core::state_stream::SEAL_PATH`),
/// and a sealed sidecar refuses every new connection, so no connection can be live when a
/// backend is swept, however close to the sweep it was attempted.
pub const RACE_WINDOW: Duration = Duration::ZERO;

/// Reasons that stop a backend on purpose, whatever its connections.
const REQUESTED_STOPS: [&str; 2] = ["TerminateRequested", "MaxLifetimeExceeded"];

/// Slack allowed between the end of the grace period and the sweep (DESIGN.md: grace + 2 s).
pub const SWEEP_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct InvariantChecker {
    backends: BTreeMap<String, Backend>,
    /// Deleted backends whose name was used again (the api reuses a key's names once they are
    /// gone): kept for the counts.
    retired: Vec<Backend>,
    /// The latest reading any controller's wall clock can have made so far, in ms since the
    /// UNIX epoch ([`InvariantChecker::note_controller_clock`]).
    controller_clock_ms: i64,
}

impl InvariantChecker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn backends(&self) -> usize {
        self.backends.len() + self.retired.len()
    }

    /// Number of backends that reached `phase`.
    pub fn reached(&self, phase: Phase) -> usize {
        self.backends
            .values()
            .chain(&self.retired)
            .filter(|b| b.phases_seen.contains(&phase))
            .count()
    }

    /// A controller's wall clock reads `ms` (ms since the UNIX epoch) now. The checker keeps
    /// the highest reading: a clock stepped back can still have acted on what it read before.
    pub fn note_controller_clock(&mut self, ms: i64) {
        self.controller_clock_ms = self.controller_clock_ms.max(ms);
    }

    fn violation(at: Duration, invariant: &'static str, detail: String) -> Violation {
        Violation {
            at,
            invariant,
            detail,
        }
    }

    /// Applies one observation made at sim time `at`.
    pub fn observe(&mut self, at: Duration, observation: Observation) -> Result<(), Violation> {
        match observation {
            Observation::Created {
                backend,
                key,
                grace,
            } => self.observe_created(at, backend, key, grace),
            Observation::Phase {
                backend,
                phase,
                reason,
            } => self.observe_phase(at, &backend, phase, reason.as_deref()),
            Observation::Live { backend, live } => {
                self.observe_live(at, &backend, live);
                Ok(())
            }
            Observation::Lifetime {
                backend,
                deadline_ms,
            } => {
                if let Some(b) = self.backends.get_mut(&backend) {
                    b.lifetime_deadline_ms = Some(deadline_ms);
                }
                Ok(())
            }
            Observation::Ending { backend } => {
                if let Some(b) = self.backends.get_mut(&backend) {
                    b.ending = true;
                }
                Ok(())
            }
            Observation::Deleted { backend } => self.observe_deleted(at, &backend),
        }
    }

    /// A new backend: at most one live backend per key.
    fn observe_created(
        &mut self,
        at: Duration,
        backend: String,
        key: Option<String>,
        grace: Duration,
    ) -> Result<(), Violation> {
        if let Some(key) = &key
            && let Some((other, _)) = self.backends.iter().find(|(_, b)| {
                b.key.as_ref() == Some(key) && !b.deleted && !b.ending && !b.phase.is_terminal()
            })
        {
            return Err(Self::violation(
                at,
                "at most one live backend per key",
                format!("{backend} created for key {key:?} while {other} is live"),
            ));
        }
        if let Some(old) = self.backends.remove(&backend) {
            if !old.deleted {
                // Observed twice without a deletion in between: keep what we know.
                self.backends.insert(backend, old);
                return Ok(());
            }
            self.retired.push(old);
        }
        self.backends.insert(
            backend,
            Backend {
                key,
                grace,
                phase: Phase::Submitted,
                phases_seen: BTreeSet::from([Phase::Submitted]),
                live: 0,
                idle_since: at,
                live_since: None,
                stopped_at: None,
                lifetime_deadline_ms: None,
                stopped_on_request: false,
                ending: false,
                deleted: false,
            },
        );
        Ok(())
    }

    /// A phase change: forward only, lifetimes not cut short, no stop with a live connection.
    fn observe_phase(
        &mut self,
        at: Duration,
        backend: &str,
        phase: Phase,
        reason: Option<&str>,
    ) -> Result<(), Violation> {
        let Some(b) = self.backends.get_mut(backend) else {
            return Ok(());
        };
        if phase < b.phase {
            return Err(Self::violation(
                at,
                "phases only move forward",
                format!("{backend} went from {} back to {phase}", b.phase),
            ));
        }
        if phase == b.phase {
            return Ok(());
        }
        let requested = reason.is_some_and(|r| REQUESTED_STOPS.contains(&r));
        let stops = phase == Phase::Swept || (phase == Phase::Terminated && !requested);
        if stops {
            b.stopped_at.get_or_insert(at);
        }
        if phase == Phase::Terminated && requested {
            b.stopped_on_request = true;
        }
        if phase == Phase::Terminated
            && reason == Some("MaxLifetimeExceeded")
            && let Some(deadline) = b.lifetime_deadline_ms
            && deadline > self.controller_clock_ms
        {
            return Err(Self::violation(
                at,
                "lifetimes are never cut short (by the controller's clock)",
                format!(
                    "{backend} ended for its lifetime {:.3}s before its deadline by any controller's clock",
                    (deadline - self.controller_clock_ms) as f64 / 1000.0
                ),
            ));
        }
        if stops && b.live_before_stop() {
            return Err(Self::violation(
                at,
                "no backend is swept or terminated with a live connection",
                format!(
                    "{backend} became {phase} while its sidecar reports {} live connection(s)",
                    b.live
                ),
            ));
        }
        if phase == Phase::Ready && b.live == 0 {
            // The sidecar's idle countdown starts with the sidecar, not at creation.
            b.idle_since = b.idle_since.max(at);
        }
        b.phase = phase;
        b.phases_seen.insert(phase);
        Ok(())
    }

    /// A sidecar's live count: when the backend became idle or busy.
    fn observe_live(&mut self, at: Duration, backend: &str, live: u64) {
        let Some(b) = self.backends.get_mut(backend) else {
            return;
        };
        if live == 0 && b.live > 0 {
            b.idle_since = at;
            b.live_since = None;
        }
        if live > 0 && b.live == 0 {
            b.live_since = Some(at);
        }
        b.live = live;
    }

    /// A deletion: never with a live connection.
    fn observe_deleted(&mut self, at: Duration, backend: &str) -> Result<(), Violation> {
        let Some(b) = self.backends.get_mut(backend) else {
            return Ok(());
        };
        b.stopped_at.get_or_insert(at);
        if b.live_before_stop() {
            return Err(Self::violation(
                at,
                "no backend is deleted with a live connection",
                format!(
                    "{backend} deleted while its sidecar reports {} live",
                    b.live
                ),
            ));
        }
        b.deleted = true;
        Ok(())
    }

    /// Every backend idle past its grace period is swept within [`SWEEP_SLACK`]. Only checked
    /// while no fault is active (after a fault heals, sweeping must resume eventually: the
    /// caller passes `faults_healed_at`, the time from which the countdowns are owed again —
    /// when the last fault healed, plus the time the world needs to recover from it).
    pub fn check_deadlines(
        &self,
        now: Duration,
        faults_healed_at: Option<Duration>,
    ) -> Result<(), Violation> {
        for (name, b) in &self.backends {
            if b.deleted || b.phase.is_terminal() || b.live > 0 || b.phase < Phase::Ready {
                continue;
            }
            // After a fault, the countdown is only owed from the moment the world healed.
            let from = faults_healed_at.map_or(b.idle_since, |h| h.max(b.idle_since));
            let deadline = from + b.grace + SWEEP_SLACK;
            if now > deadline {
                return Err(Self::violation(
                    now,
                    "idle backends are swept within grace + 2 s",
                    format!(
                        "{name} idle since {:.3}s with grace {}s is still {}",
                        b.idle_since.as_secs_f64(),
                        b.grace.as_secs(),
                        b.phase
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One backend has at most one pod (`pods` names every pod of each backend, from the
    /// API server's store).
    pub fn check_pods(
        &self,
        now: Duration,
        pods: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), Violation> {
        match pods.iter().find(|(_, names)| names.len() > 1) {
            Some((backend, names)) => Err(Self::violation(
                now,
                "at most one pod per backend",
                format!("{backend} has pods {}", names.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// No node has more unfinished pods bound to it than its capacity (`max-pods`, the
    /// simulated node's slots): `bound` names the unfinished pods bound to each node, from the
    /// API server's store. The scheduler counts a node's pods from its own view, which may lag
    /// a pod finishing but must never miss a pod it bound.
    pub fn check_node_capacity(
        &self,
        now: Duration,
        bound: &BTreeMap<String, Vec<String>>,
        capacity: usize,
    ) -> Result<(), Violation> {
        match bound.iter().find(|(_, pods)| pods.len() > capacity) {
            Some((node, pods)) => Err(Self::violation(
                now,
                "no node gets more pods than its capacity",
                format!(
                    "{node} has {} unfinished pods bound for {capacity} slots: {}",
                    pods.len(),
                    pods.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// At the end of a drained run: every backend became Ready or Failed (or was stopped on
    /// request — a terminate or its lifetime — before either), and nothing is left in the API
    /// server (`leftovers` names what the caller still found there).
    pub fn check_drained(&self, now: Duration, leftovers: &[String]) -> Result<(), Violation> {
        for (name, b) in &self.backends {
            if !(b.phases_seen.contains(&Phase::Ready)
                || b.phases_seen.contains(&Phase::Failed)
                || b.stopped_on_request)
            {
                return Err(Self::violation(
                    now,
                    "every spawn ends Ready or Failed",
                    format!(
                        "{name} never became Ready or Failed (last phase {})",
                        b.phase
                    ),
                ));
            }
        }
        if !leftovers.is_empty() {
            return Err(Self::violation(
                now,
                "no leaks when the workload drains",
                format!("left behind: {}", leftovers.join(", ")),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn created(c: &mut InvariantChecker, name: &str, key: &str) {
        c.observe(
            S(0),
            Observation::Created {
                backend: name.into(),
                key: Some(key.into()),
                grace: S(10),
            },
        )
        .expect("created");
    }

    fn phase(name: &str, phase: Phase) -> Observation {
        Observation::Phase {
            backend: name.into(),
            phase,
            reason: None,
        }
    }

    fn live(name: &str, live: u64) -> Observation {
        Observation::Live {
            backend: name.into(),
            live,
        }
    }

    #[test]
    fn sweeping_a_live_backend_is_caught() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Ready)).expect("ready");
        c.observe(S(2), live("b1", 1)).expect("live");
        let v = c
            .observe(S(3), phase("b1", Phase::Swept))
            .expect_err("violation");
        assert_eq!(
            v.invariant,
            "no backend is swept or terminated with a live connection"
        );
        assert!(v.to_string().starts_with("at 3.000s"), "{v}");
    }

    #[test]
    fn a_connection_racing_the_sweep_is_a_violation() {
        // The sidecar is sealed before the sweep, so even a connection opened half a second
        // earlier and still live means the sweep did not wait for it.
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Ready)).expect("ready");
        c.observe(Duration::from_millis(3_500), live("b1", 1))
            .expect("live");
        let v = c
            .observe(S(4), phase("b1", Phase::Swept))
            .expect_err("swept with a live connection");
        assert_eq!(
            v.invariant,
            "no backend is swept or terminated with a live connection"
        );
    }

    #[test]
    fn requested_termination_of_a_live_backend_is_allowed() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(2), live("b1", 1)).expect("live");
        c.observe(
            S(3),
            Observation::Phase {
                backend: "b1".into(),
                phase: Phase::Terminated,
                reason: Some("MaxLifetimeExceeded".into()),
            },
        )
        .expect("allowed");
        // Its sidecar may still be draining the connection when its retention is over.
        c.observe(
            S(9),
            Observation::Deleted {
                backend: "b1".into(),
            },
        )
        .expect("deleting a backend stopped on request while it drains is allowed");
    }

    #[test]
    fn a_key_whose_backend_is_ending_may_get_a_new_one() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Ready)).expect("ready");
        c.observe(
            S(2),
            Observation::Ending {
                backend: "b1".into(),
            },
        )
        .expect("terminate requested");
        c.observe(
            S(3),
            Observation::Created {
                backend: "b2".into(),
                key: Some("k".into()),
                grace: S(10),
            },
        )
        .expect("the api counts b1 as no longer live");
    }

    #[test]
    fn backwards_phases_and_duplicate_keys_are_caught() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Running))
            .expect("running");
        let v = c
            .observe(S(2), phase("b1", Phase::Scheduled))
            .expect_err("backwards");
        assert_eq!(v.invariant, "phases only move forward");
        let v = c
            .observe(
                S(3),
                Observation::Created {
                    backend: "b2".into(),
                    key: Some("k".into()),
                    grace: S(10),
                },
            )
            .expect_err("duplicate key");
        assert_eq!(v.invariant, "at most one live backend per key");
        // Once b1 is finished, the key may get a new backend.
        c.observe(S(4), phase("b1", Phase::Failed)).expect("failed");
        c.observe(
            S(5),
            Observation::Created {
                backend: "b3".into(),
                key: Some("k".into()),
                grace: S(10),
            },
        )
        .expect("new backend for a finished key");
    }

    #[test]
    fn sweep_deadline_counts_from_last_disconnect_and_from_healing() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Ready)).expect("ready");
        c.observe(S(2), live("b1", 1)).expect("live");
        c.observe(S(5), live("b1", 0)).expect("idle");
        c.check_deadlines(S(17), None)
            .expect("within grace + slack");
        let v = c.check_deadlines(S(18), None).expect_err("late");
        assert_eq!(v.invariant, "idle backends are swept within grace + 2 s");
        c.check_deadlines(S(25), Some(S(14)))
            .expect("healed at 14: due at 26");
        c.observe(S(26), phase("b1", Phase::Swept)).expect("swept");
        c.check_deadlines(S(100), None)
            .expect("swept backends owe nothing");
    }

    #[test]
    fn drained_world_must_have_finished_every_backend_and_left_nothing() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        let v = c.check_drained(S(9), &[]).expect_err("never ready");
        assert_eq!(v.invariant, "every spawn ends Ready or Failed");
        c.observe(S(1), phase("b1", Phase::Ready)).expect("ready");
        c.observe(S(20), phase("b1", Phase::Swept)).expect("swept");
        c.check_drained(S(30), &[]).expect("clean");
        let v = c
            .check_drained(S(30), &["pod/b1".to_string()])
            .expect_err("leak");
        assert_eq!(v.invariant, "no leaks when the workload drains");
    }

    #[test]
    fn a_name_used_again_after_deletion_is_a_new_backend() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), phase("b1", Phase::Failed)).expect("failed");
        c.observe(
            S(2),
            Observation::Deleted {
                backend: "b1".into(),
            },
        )
        .expect("deleted");
        created(&mut c, "b1", "k");
        c.observe(S(3), phase("b1", Phase::Constructed))
            .expect("the new b1 starts over");
        assert_eq!(c.backends(), 2);
        assert_eq!(c.reached(Phase::Failed), 1);
    }

    #[test]
    fn a_lifetime_ends_only_once_a_controllers_clock_says_so() {
        let lifetime_ended = || Observation::Phase {
            backend: "b1".into(),
            phase: Phase::Terminated,
            reason: Some("MaxLifetimeExceeded".into()),
        };
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(
            S(0),
            Observation::Lifetime {
                backend: "b1".into(),
                deadline_ms: 60_000,
            },
        )
        .expect("lifetime");
        c.note_controller_clock(59_000);
        let v = c.observe(S(59), lifetime_ended()).expect_err("early");
        assert_eq!(
            v.invariant,
            "lifetimes are never cut short (by the controller's clock)"
        );
        // The controller's clock was stepped ahead (then back): what it read counts.
        c.note_controller_clock(660_000);
        c.note_controller_clock(61_000);
        c.observe(S(61), lifetime_ended())
            .expect("due by the clock");
        c.check_drained(S(70), &[])
            .expect("stopped on request before Ready is an end");
    }

    #[test]
    fn a_second_pod_for_a_backend_is_caught() {
        let c = InvariantChecker::new();
        let mut pods = BTreeMap::from([("b1".to_string(), vec!["b1".to_string()])]);
        c.check_pods(S(1), &pods).expect("one pod");
        pods.insert("b1".into(), vec!["b1".into(), "b1-retry".into()]);
        let v = c.check_pods(S(2), &pods).expect_err("two pods");
        assert_eq!(v.invariant, "at most one pod per backend");
    }

    #[test]
    fn a_node_bound_past_its_capacity_is_caught() {
        let c = InvariantChecker::new();
        let mut bound = BTreeMap::from([("node-0".to_string(), vec!["a".to_string()])]);
        c.check_node_capacity(S(1), &bound, 1).expect("full");
        bound.insert("node-0".into(), vec!["a".into(), "b".into()]);
        let v = c
            .check_node_capacity(S(2), &bound, 1)
            .expect_err("over capacity");
        assert_eq!(v.invariant, "no node gets more pods than its capacity");
    }

    #[test]
    fn deleting_a_live_backend_is_caught() {
        let mut c = InvariantChecker::new();
        created(&mut c, "b1", "k");
        c.observe(S(1), live("b1", 2)).expect("live");
        let v = c
            .observe(
                S(2),
                Observation::Deleted {
                    backend: "b1".into(),
                },
            )
            .expect_err("deleted live");
        assert_eq!(v.invariant, "no backend is deleted with a live connection");
    }
}
