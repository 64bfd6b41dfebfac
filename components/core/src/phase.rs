//! The phase machine: what a backend's next phase is, given its current phase and one
//! observation of its pod, its sidecar or the clock.
//!
//! ```text
//! Submitted → Constructed → Scheduled → Running → Ready → Swept
//!      └───────────┴────────────┴──────────┴────────┴──→ Failed | Terminated
//! ```
//! Phases only move forward; `Swept`, `Failed` and `Terminated` are terminal. A component may
//! observe the world late or twice (reconcilers are level-triggered), so an observation that
//! would move a backend backwards is simply ignored, and one that shows later progress than the
//! current phase skips the phases in between.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Lifecycle phase of a backend, in order.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum Phase {
    /// The resource exists; nothing was created for it yet.
    #[default]
    Submitted,
    /// Its Pod and Service exist.
    Constructed,
    /// Its Pod is bound to a node.
    Scheduled,
    /// Its Pod runs.
    Running,
    /// Its sidecar reports that the application accepts connections.
    Ready,
    /// It stayed without connections past its grace period and was swept.
    Swept,
    /// It failed: the app exited, its pod failed or vanished, its image never came, or it timed out.
    Failed,
    /// It was stopped on request or at its maximum lifetime.
    Terminated,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 8] = [
        Phase::Submitted,
        Phase::Constructed,
        Phase::Scheduled,
        Phase::Running,
        Phase::Ready,
        Phase::Swept,
        Phase::Failed,
        Phase::Terminated,
    ];

    /// A terminal phase never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Swept | Phase::Failed | Phase::Terminated)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Submitted => "Submitted",
            Phase::Constructed => "Constructed",
            Phase::Scheduled => "Scheduled",
            Phase::Running => "Running",
            Phase::Ready => "Ready",
            Phase::Swept => "Swept",
            Phase::Failed => "Failed",
            Phase::Terminated => "Terminated",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reason of a backend that failed because it was not Ready within its start timeout.
pub const START_TIMEOUT_REASON: &str = "StartTimeout";

/// Reason of a backend whose pod was evicted (`kubectl drain`, the Eviction API, or the
/// kubelet under node pressure).
pub const EVICTED_REASON: &str = "Evicted";
/// Reason of a backend whose pod was deleted because its node went away (the node lifecycle
/// controller's taint manager, or pod garbage collection of a deleted node's pods).
pub const NODE_LOST_REASON: &str = "NodeLost";
/// Reason of a backend whose pod was deleted by someone else than the controller, for a reason
/// Kubernetes did not record (for example `kubectl delete pod`).
pub const POD_DELETED_REASON: &str = "PodDeleted";

/// The backend's failure reason for a pod that is being deleted although the backend is not
/// finished, from the reason of the pod's `DisruptionTarget` condition (set by Kubernetes
/// before it deletes a pod on its own initiative), if it has one.
pub fn disruption_reason(disruption_target_reason: Option<&str>) -> &'static str {
    match disruption_target_reason {
        Some("EvictionByEvictionAPI" | "TerminationByKubelet") => EVICTED_REASON,
        Some("DeletionByTaintManager" | "DeletionByPodGC") => NODE_LOST_REASON,
        _ => POD_DELETED_REASON,
    }
}

/// Something a component saw that may move a backend to another phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The backend's Pod and Service both exist.
    ChildrenCreated,
    /// The Pod is bound to `node`.
    PodScheduled { node: String },
    /// The Pod's phase is Running.
    PodRunning,
    /// The application container terminated (whatever the code: a backend is not a job).
    AppExited { exit_code: i32, reason: String },
    /// The Pod failed for a reason other than the app's own exit (eviction, sidecar crash...).
    PodFailed { reason: String, message: String },
    /// The Pod was created once and is gone although the backend is not finished.
    PodMissing,
    /// The application image could not be pulled for longer than the configured timeout.
    ImagePullTimedOut { image: String, message: String },
    /// The pod ran for the start timeout and its application never accepted a connection on
    /// `port` (the sidecar never reported Ready).
    StartTimedOut { waited_seconds: u64, port: u16 },
    /// The pod cannot be started at all (for example an image with no command in process mode).
    PodUnstartable { reason: String, message: String },
    /// The sidecar reported that the application accepts connections.
    SidecarReady,
    /// The sidecar reported no live connection for longer than the grace period.
    IdlePastGrace { idle_seconds: u64 },
    /// The backend reached `maxLifetimeSeconds`.
    LifetimeExceeded { lifetime_seconds: u32 },
    /// Someone asked for the backend to stop.
    TerminateRequested,
}

/// A phase change with its reason, recorded as an Event and as a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    /// CamelCase machine-readable reason, as Kubernetes Events use.
    pub reason: String,
    pub message: String,
    /// Set when the application container exited.
    pub exit_code: Option<i32>,
}

/// The next phase after `current` given `observation`, or `None` when nothing changes.
pub fn next_phase(current: Phase, observation: &Observation) -> Option<Transition> {
    if current.is_terminal() {
        return None;
    }
    let (target, reason, message, exit_code) = match observation {
        Observation::ChildrenCreated => (
            Phase::Constructed,
            "Constructed".to_string(),
            "pod and service created".to_string(),
            None,
        ),
        Observation::PodScheduled { node } => (
            Phase::Scheduled,
            "Scheduled".to_string(),
            format!("pod bound to node {node}"),
            None,
        ),
        Observation::PodRunning => (
            Phase::Running,
            "Running".to_string(),
            "pod is running".to_string(),
            None,
        ),
        Observation::SidecarReady => (
            Phase::Ready,
            "Ready".to_string(),
            "application accepts connections".to_string(),
            None,
        ),
        Observation::IdlePastGrace { idle_seconds } => {
            // Only a backend that ever ran can be idle; one still starting is not swept.
            if current < Phase::Running {
                return None;
            }
            (
                Phase::Swept,
                "IdlePastGracePeriod".to_string(),
                format!("no connection for {idle_seconds}s"),
                None,
            )
        }
        Observation::AppExited { exit_code, reason } => (
            Phase::Failed,
            "ApplicationExited".to_string(),
            format!("application container exited with code {exit_code} ({reason})"),
            Some(*exit_code),
        ),
        Observation::PodFailed { reason, message } => (
            Phase::Failed,
            if reason.is_empty() {
                "PodFailed".to_string()
            } else {
                reason.clone()
            },
            message.clone(),
            None,
        ),
        Observation::PodMissing => {
            // Before the pod was created there is nothing to miss.
            if current < Phase::Constructed {
                return None;
            }
            (
                Phase::Failed,
                "PodMissing".to_string(),
                "the backend's pod disappeared".to_string(),
                None,
            )
        }
        Observation::ImagePullTimedOut { image, message } => (
            Phase::Failed,
            "ImagePullTimeout".to_string(),
            format!("image {image} could not be pulled: {message}"),
            None,
        ),
        Observation::StartTimedOut {
            waited_seconds,
            port,
        } => {
            // Only a start can time out: a Ready backend ends by being swept or stopped.
            if current >= Phase::Ready {
                return None;
            }
            (
                Phase::Failed,
                START_TIMEOUT_REASON.to_string(),
                format!(
                    "not Ready {waited_seconds}s after its pod started running: \
                     the application never accepted a connection on port {port}"
                ),
                None,
            )
        }
        Observation::PodUnstartable { reason, message } => {
            (Phase::Failed, reason.clone(), message.clone(), None)
        }
        Observation::LifetimeExceeded { lifetime_seconds } => (
            Phase::Terminated,
            "MaxLifetimeExceeded".to_string(),
            format!("maximum lifetime of {lifetime_seconds}s reached"),
            None,
        ),
        Observation::TerminateRequested => (
            Phase::Terminated,
            "TerminateRequested".to_string(),
            "terminated on request".to_string(),
            None,
        ),
    };
    // Forward only: a late or repeated observation of earlier progress changes nothing.
    if target <= current {
        return None;
    }
    Some(Transition {
        from: current,
        to: target,
        reason,
        message,
        exit_code,
    })
}

/// Folds a sequence of observations from `start`, returning every transition taken.
pub fn run(start: Phase, observations: &[Observation]) -> (Phase, Vec<Transition>) {
    let mut phase = start;
    let mut transitions = Vec::new();
    for observation in observations {
        if let Some(transition) = next_phase(phase, observation) {
            phase = transition.to;
            transitions.push(transition);
        }
    }
    (phase, transitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disruption_reasons_say_who_took_the_pod() {
        assert_eq!(disruption_reason(Some("EvictionByEvictionAPI")), "Evicted");
        assert_eq!(disruption_reason(Some("TerminationByKubelet")), "Evicted");
        assert_eq!(
            disruption_reason(Some("DeletionByTaintManager")),
            "NodeLost"
        );
        assert_eq!(disruption_reason(Some("DeletionByPodGC")), "NodeLost");
        assert_eq!(
            disruption_reason(Some("PreemptionByScheduler")),
            "PodDeleted"
        );
        assert_eq!(disruption_reason(None), "PodDeleted");
    }
    use proptest::prelude::*;

    #[test]
    fn happy_path_goes_through_every_phase_in_order() {
        let (end, transitions) = run(
            Phase::Submitted,
            &[
                Observation::ChildrenCreated,
                Observation::PodScheduled { node: "n1".into() },
                Observation::PodRunning,
                Observation::SidecarReady,
                Observation::IdlePastGrace { idle_seconds: 31 },
            ],
        );
        assert_eq!(end, Phase::Swept);
        let phases: Vec<_> = transitions.iter().map(|t| t.to).collect();
        assert_eq!(
            phases,
            [
                Phase::Constructed,
                Phase::Scheduled,
                Phase::Running,
                Phase::Ready,
                Phase::Swept
            ]
        );
        assert_eq!(transitions[4].reason, "IdlePastGracePeriod");
    }

    #[test]
    fn late_observation_skips_intermediate_phases() {
        let t = next_phase(Phase::Submitted, &Observation::PodRunning).expect("moves");
        assert_eq!(t.to, Phase::Running);
    }

    #[test]
    fn stale_observation_is_ignored() {
        assert_eq!(next_phase(Phase::Ready, &Observation::PodRunning), None);
        assert_eq!(
            next_phase(Phase::Running, &Observation::ChildrenCreated),
            None
        );
    }

    #[test]
    fn app_exit_fails_with_exit_code() {
        let t = next_phase(
            Phase::Running,
            &Observation::AppExited {
                exit_code: 3,
                reason: "Error".into(),
            },
        )
        .expect("fails");
        assert_eq!(t.to, Phase::Failed);
        assert_eq!(t.exit_code, Some(3));
        assert!(t.message.contains("code 3"), "{}", t.message);
    }

    #[test]
    fn starting_backend_is_never_swept() {
        for phase in [Phase::Submitted, Phase::Constructed, Phase::Scheduled] {
            assert_eq!(
                next_phase(phase, &Observation::IdlePastGrace { idle_seconds: 999 }),
                None
            );
        }
    }

    #[test]
    fn missing_pod_before_construction_is_not_a_failure() {
        assert_eq!(next_phase(Phase::Submitted, &Observation::PodMissing), None);
        assert_eq!(
            next_phase(Phase::Scheduled, &Observation::PodMissing).map(|t| t.to),
            Some(Phase::Failed)
        );
    }

    #[test]
    fn a_start_times_out_only_before_ready() {
        let timed_out = Observation::StartTimedOut {
            waited_seconds: 300,
            port: 8080,
        };
        let t = next_phase(Phase::Running, &timed_out).expect("fails");
        assert_eq!(t.to, Phase::Failed);
        assert_eq!(t.reason, START_TIMEOUT_REASON);
        assert!(
            t.message.contains("300s") && t.message.contains("port 8080"),
            "{}",
            t.message
        );
        assert_eq!(next_phase(Phase::Ready, &timed_out), None);
    }

    #[test]
    fn terminate_while_starting_is_honoured() {
        let t = next_phase(Phase::Constructed, &Observation::TerminateRequested).expect("moves");
        assert_eq!(t.to, Phase::Terminated);
    }

    #[test]
    fn phase_serializes_as_its_name() {
        for phase in Phase::ALL {
            let json = serde_json::to_string(&phase).expect("serialize");
            assert_eq!(json, format!("\"{}\"", phase.as_str()));
        }
    }

    fn arb_phase() -> impl Strategy<Value = Phase> {
        proptest::sample::select(Phase::ALL.to_vec())
    }

    fn arb_observation() -> impl Strategy<Value = Observation> {
        prop_oneof![
            Just(Observation::ChildrenCreated),
            "[a-z]{1,5}".prop_map(|node| Observation::PodScheduled { node }),
            Just(Observation::PodRunning),
            (any::<i32>(), "[A-Za-z]{0,8}")
                .prop_map(|(exit_code, reason)| Observation::AppExited { exit_code, reason }),
            ("[A-Za-z]{0,8}", ".{0,10}")
                .prop_map(|(reason, message)| Observation::PodFailed { reason, message }),
            Just(Observation::PodMissing),
            Just(Observation::ImagePullTimedOut {
                image: "img".into(),
                message: "not found".into()
            }),
            Just(Observation::PodUnstartable {
                reason: "NoCommand".into(),
                message: "no command".into()
            }),
            Just(Observation::SidecarReady),
            (any::<u64>(), any::<u16>()).prop_map(|(waited_seconds, port)| {
                Observation::StartTimedOut {
                    waited_seconds,
                    port,
                }
            }),
            any::<u64>().prop_map(|idle_seconds| Observation::IdlePastGrace { idle_seconds }),
            any::<u32>()
                .prop_map(|lifetime_seconds| Observation::LifetimeExceeded { lifetime_seconds }),
            Just(Observation::TerminateRequested),
        ]
    }

    proptest! {
        #[test]
        fn phases_only_move_forward(
            start in arb_phase(),
            observations in proptest::collection::vec(arb_observation(), 0..40),
        ) {
            let mut phase = start;
            for observation in &observations {
                if let Some(t) = next_phase(phase, observation) {
                    prop_assert_eq!(t.from, phase);
                    prop_assert!(t.to > phase, "{:?} -> {:?} on {:?}", phase, t.to, observation);
                    phase = t.to;
                }
            }
        }

        #[test]
        fn terminal_phases_absorb_every_observation(
            start in arb_phase(),
            observations in proptest::collection::vec(arb_observation(), 0..40),
        ) {
            let mut phase = start;
            let mut terminal_at = None;
            for observation in &observations {
                if let Some(t) = next_phase(phase, observation) {
                    prop_assert!(terminal_at.is_none(), "left terminal {:?}", terminal_at);
                    phase = t.to;
                }
                if phase.is_terminal() && terminal_at.is_none() {
                    terminal_at = Some(phase);
                }
            }
            if let Some(terminal) = terminal_at {
                prop_assert_eq!(phase, terminal);
            }
        }

        #[test]
        fn failure_is_reachable_from_every_live_phase(start in arb_phase()) {
            let t = next_phase(start, &Observation::PodFailed { reason: "X".into(), message: String::new() });
            prop_assert_eq!(t.is_some(), !start.is_terminal());
        }

        #[test]
        fn replaying_the_same_observations_is_idempotent(
            observations in proptest::collection::vec(arb_observation(), 0..40),
        ) {
            // Level-triggered reconcilers see the same observation more than once.
            let (once, _) = run(Phase::Submitted, &observations);
            let doubled: Vec<_> = observations.iter().flat_map(|o| [o.clone(), o.clone()]).collect();
            let (twice, _) = run(Phase::Submitted, &doubled);
            prop_assert_eq!(once, twice);
        }
    }
}
