//! Pure decisions of the reconciler: what a Pod shows about its backend, and when the backend
//! must be looked at again. No I/O and no clock reads here: "now" is always a parameter.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use spawner_core::children::SIDECAR_CONTAINER_NAME;
use spawner_core::phase::{Observation, Phase, disruption_reason};
use spawner_core::resource::{SessionLivedBackend, SessionLivedBackendStatus};
use spawner_core::status::phase_time;

/// Waiting reasons of the application container that mean its image is not coming (yet).
pub const IMAGE_PULL_WAITING_REASONS: [&str; 2] = ["ErrImagePull", "ImagePullBackOff"];

/// Waiting reasons after which a container never starts without a change to the spec, as the
/// kubelet reports them (and as the localcluster node agent reports an image with no command in
/// process mode, `ProcessModeNeedsCommand`).
pub const UNSTARTABLE_WAITING_REASONS: [&str; 3] = [
    "InvalidImageName",
    "ErrImageNeverPull",
    "ProcessModeNeedsCommand",
];

/// Termination reasons of a container that never started (the runtime could not start it).
pub const NEVER_STARTED_REASONS: [&str; 4] = [
    "StartError",
    "ContainerCannotRun",
    "CreateContainerError",
    "CreateContainerConfigError",
];

/// What one look at a backend's pod found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodReport {
    /// In the order the phase machine should see them: progress first, then failures.
    pub observations: Vec<Observation>,
    /// When the pod must be looked at again even if nothing changes (an image pull deadline).
    pub recheck_at: Option<Timestamp>,
    /// The pod's IP, once it has one.
    pub pod_ip: Option<String>,
}

fn container_status<'a>(
    statuses: &'a [ContainerStatus],
    name: &str,
) -> Option<&'a ContainerStatus> {
    statuses.iter().find(|s| s.name == name)
}

/// Everything `pod` shows about the backend whose application container is named `app`.
pub fn observe_pod(
    pod: &Pod,
    app: &str,
    now: Timestamp,
    image_pull_timeout: Duration,
) -> PodReport {
    let mut report = PodReport::default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();

    if let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    {
        report.observations.push(Observation::PodScheduled {
            node: node.to_string(),
        });
    }
    let pod_phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if pod_phase == "Running" {
        report.observations.push(Observation::PodRunning);
    }
    report.pod_ip = status
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());

    // A pod being deleted while its backend is not finished was taken by someone else (the
    // controller deletes pods only after writing a terminal phase): a drain's eviction, a lost
    // node, `kubectl delete pod`. So was a pod Kubernetes marked Failed with a DisruptionTarget
    // condition: pod garbage collection does that to the pods of a deleted Node before it
    // force-deletes them (seen on kind). Reported before the containers' exits, which now are
    // its consequence, so the backend fails with why its pod went.
    let disruption = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    if pod.metadata.deletion_timestamp.is_some() || (disruption.is_some() && pod_phase == "Failed")
    {
        let reason = disruption_reason(disruption.and_then(|c| c.reason.as_deref()));
        let message = disruption
            .and_then(|c| c.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "the backend's pod was deleted".to_string());
        report.observations.push(Observation::PodFailed {
            reason: reason.to_string(),
            message,
        });
    }
    let statuses = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    if let Some(app_status) = container_status(statuses, app) {
        let state = app_status.state.as_ref();
        if let Some(terminated) = state.and_then(|s| s.terminated.as_ref())
            && let Some(reason) = terminated.reason.as_deref().filter(|r| {
                NEVER_STARTED_REASONS.contains(r) || UNSTARTABLE_WAITING_REASONS.contains(r)
            })
        {
            // It never ran: the exit code is the runtime's, not the application's.
            let message = terminated
                .message
                .clone()
                .or_else(|| status.and_then(|s| s.message.clone()))
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("application container could not start: {reason}"));
            report.observations.push(Observation::PodUnstartable {
                reason: reason.to_string(),
                message,
            });
        } else if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
            report.observations.push(Observation::AppExited {
                exit_code: terminated.exit_code,
                reason: terminated
                    .reason
                    .clone()
                    .unwrap_or_else(|| "Terminated".into()),
            });
        } else if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let message = waiting.message.clone().unwrap_or_default();
            if IMAGE_PULL_WAITING_REASONS.contains(&reason) {
                // The pull counts from when the node took the pod (or from its creation).
                let since = status
                    .and_then(|s| s.start_time.as_ref())
                    .or(pod.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0)
                    .unwrap_or(now);
                let deadline = add(since, image_pull_timeout);
                if now >= deadline {
                    report.observations.push(Observation::ImagePullTimedOut {
                        image: app_status.image.clone(),
                        message: if message.is_empty() {
                            reason.to_string()
                        } else {
                            message
                        },
                    });
                } else {
                    report.recheck_at = Some(deadline);
                }
            } else if UNSTARTABLE_WAITING_REASONS.contains(&reason) {
                report.observations.push(Observation::PodUnstartable {
                    reason: reason.to_string(),
                    message: if message.is_empty() {
                        format!("application container cannot start: {reason}")
                    } else {
                        message
                    },
                });
            }
        }
    }
    if let Some(sidecar) = container_status(statuses, SIDECAR_CONTAINER_NAME)
        && let Some(terminated) = sidecar.state.as_ref().and_then(|s| s.terminated.as_ref())
    {
        report.observations.push(Observation::PodFailed {
            reason: "SidecarExited".into(),
            message: format!(
                "the spawner sidecar exited with code {} ({})",
                terminated.exit_code,
                terminated.reason.as_deref().unwrap_or("Terminated")
            ),
        });
    }
    // A backend is not a job: a pod that finished, successfully or not, has failed it.
    if pod_phase == "Failed" || pod_phase == "Succeeded" {
        let reason = status
            .and_then(|s| s.reason.clone())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| format!("Pod{pod_phase}"));
        let message = status
            .and_then(|s| s.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("the backend's pod is {pod_phase}"));
        report
            .observations
            .push(Observation::PodFailed { reason, message });
    }
    report
}

/// `at + duration`, saturating at the end of time.
pub fn add(at: Timestamp, duration: Duration) -> Timestamp {
    at.saturating_add(duration).unwrap_or(Timestamp::MAX)
}

/// How long from `now` until `deadline` (zero when it has passed).
pub fn until(now: Timestamp, deadline: Timestamp) -> Duration {
    let d = deadline.duration_since(now);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

/// When `backend` reaches its `maxLifetimeSeconds`, counted from its creation.
pub fn lifetime_deadline(backend: &SessionLivedBackend) -> Option<Timestamp> {
    let lifetime = backend.spec.max_lifetime_seconds?;
    let created = backend.metadata.creation_timestamp.as_ref()?.0;
    Some(add(created, Duration::from_secs(u64::from(lifetime))))
}

/// When a finished backend may be deleted: `retention` after it reached its terminal phase (or,
/// when no condition records that time, after its creation, which is never later).
pub fn retention_deadline(backend: &SessionLivedBackend, retention: Duration) -> Option<Timestamp> {
    let status = backend.status.as_ref()?;
    if !status.phase.is_terminal() {
        return None;
    }
    let finished = phase_time(status, status.phase)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .or_else(|| backend.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    Some(add(finished, retention))
}

/// When a backend that is Running but not yet Ready fails its start: `timeout` after the time
/// of its `Running` condition. `None` once it was Ready, before it runs, or without a timeout.
/// Counting from Running, not creation: scheduling and image pulls have their own limits
/// (`--image-pull-timeout-seconds`), and a large image that pulls slowly but surely is no
/// reason to fail.
pub fn start_deadline(
    status: &SessionLivedBackendStatus,
    timeout: Option<Duration>,
) -> Option<Timestamp> {
    if status.phase != Phase::Running {
        return None;
    }
    let running = phase_time(status, Phase::Running)?
        .parse::<Timestamp>()
        .ok()?;
    Some(add(running, timeout?))
}

/// The earliest of some optional deadlines.
pub fn earliest(deadlines: impl IntoIterator<Item = Option<Timestamp>>) -> Option<Timestamp> {
    deadlines.into_iter().flatten().min()
}

/// Whether the phase is one where the controller still expects a pod to exist.
pub fn expects_pod(phase: Phase) -> bool {
    phase >= Phase::Constructed && !phase.is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn pending_unscheduled_pod_shows_nothing() {
        let report = observe_pod(
            &pod(json!({"metadata": {"name": "b"}, "status": {"phase": "Pending"}})),
            "app",
            ts("2024-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert_eq!(report, PodReport::default());
    }

    #[test]
    fn running_pod_is_scheduled_and_running_with_its_ip() {
        let report = observe_pod(
            &pod(json!({
                "spec": {"nodeName": "node-a", "containers": []},
                "status": {"phase": "Running", "podIP": "127.0.3.4"}
            })),
            "app",
            ts("2024-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert_eq!(
            report.observations,
            [
                Observation::PodScheduled {
                    node: "node-a".into()
                },
                Observation::PodRunning
            ]
        );
        assert_eq!(report.pod_ip.as_deref(), Some("127.0.3.4"));
    }

    #[test]
    fn app_exit_is_reported_with_code_before_the_pod_failure() {
        let report = observe_pod(
            &pod(json!({
                "spec": {"nodeName": "n", "containers": []},
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [{
                        "name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 3, "reason": "Error"}}
                    }]
                }
            })),
            "app",
            ts("2024-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert_eq!(
            report.observations[1],
            Observation::AppExited {
                exit_code: 3,
                reason: "Error".into()
            }
        );
        let (phase, transitions) = spawner_core::phase::run(Phase::Running, &report.observations);
        assert_eq!(phase, Phase::Failed);
        assert_eq!(transitions.last().and_then(|t| t.exit_code), Some(3));
    }

    fn pulling(reason: &str) -> Pod {
        pod(json!({
            "metadata": {"creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"nodeName": "n", "containers": []},
            "status": {
                "phase": "Pending",
                "startTime": "2024-01-01T00:00:10Z",
                "containerStatuses": [{
                    "name": "app", "image": "acme/missing:1", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": "not found"}}
                }]
            }
        }))
    }

    #[test]
    fn image_pull_fails_only_after_the_timeout_counted_from_start() {
        let early = observe_pod(
            &pulling("ImagePullBackOff"),
            "app",
            ts("2024-01-01T00:01:09Z"),
            TIMEOUT,
        );
        assert_eq!(early.observations.len(), 1, "{:?}", early.observations);
        assert_eq!(early.recheck_at, Some(ts("2024-01-01T00:01:10Z")));

        let late = observe_pod(
            &pulling("ErrImagePull"),
            "app",
            ts("2024-01-01T00:01:10Z"),
            TIMEOUT,
        );
        assert_eq!(
            late.observations[1],
            Observation::ImagePullTimedOut {
                image: "acme/missing:1".into(),
                message: "not found".into()
            }
        );
        assert_eq!(late.recheck_at, None);
    }

    #[test]
    fn unstartable_container_fails_at_once() {
        let report = observe_pod(
            &pulling("ProcessModeNeedsCommand"),
            "app",
            ts("2024-01-01T00:00:11Z"),
            TIMEOUT,
        );
        assert!(matches!(
            &report.observations[1],
            Observation::PodUnstartable { reason, .. } if reason == "ProcessModeNeedsCommand"
        ));
    }

    #[test]
    fn a_container_that_never_started_is_unstartable_not_an_app_exit() {
        let report = observe_pod(
            &pod(json!({
                "status": {
                    "phase": "Failed",
                    "message": "pod cannot run",
                    "containerStatuses": [{
                        "name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 128, "reason": "ProcessModeNeedsCommand",
                                  "message": "image but no command"}}
                    }]
                }
            })),
            "app",
            ts("2024-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert_eq!(
            report.observations[0],
            Observation::PodUnstartable {
                reason: "ProcessModeNeedsCommand".into(),
                message: "image but no command".into()
            }
        );
        let (phase, transitions) = spawner_core::phase::run(Phase::Scheduled, &report.observations);
        assert_eq!(phase, Phase::Failed);
        assert_eq!(transitions[0].reason, "ProcessModeNeedsCommand");
        assert_eq!(transitions[0].exit_code, None);
    }

    #[test]
    fn other_waiting_reasons_are_not_failures() {
        let report = observe_pod(
            &pulling("ContainerCreating"),
            "app",
            ts("2030-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert_eq!(report.observations.len(), 1);
        assert_eq!(report.recheck_at, None);
    }

    #[test]
    fn sidecar_exit_and_finished_pod_fail_the_backend() {
        let report = observe_pod(
            &pod(json!({
                "status": {
                    "phase": "Succeeded",
                    "containerStatuses": [{
                        "name": "spawner-sidecar", "image": "", "imageID": "", "ready": false,
                        "restartCount": 0, "state": {"terminated": {"exitCode": 1}}
                    }]
                }
            })),
            "app",
            ts("2024-01-01T00:00:00Z"),
            TIMEOUT,
        );
        assert!(matches!(
            &report.observations[0],
            Observation::PodFailed { reason, .. } if reason == "SidecarExited"
        ));
        assert!(matches!(
            &report.observations[1],
            Observation::PodFailed { reason, .. } if reason == "PodSucceeded"
        ));
    }

    /// A running pod, deleted (`deletionTimestamp` set) with these pod conditions, whose
    /// containers the kubelet has already stopped.
    fn deleted_pod(conditions: serde_json::Value) -> Pod {
        pod(json!({
            "metadata": {"name": "b", "deletionTimestamp": "2024-01-01T00:00:05Z"},
            "spec": {"nodeName": "worker", "containers": []},
            "status": {
                "phase": "Running",
                "conditions": conditions,
                "containerStatuses": [
                    {"name": "app", "image": "app:1", "imageID": "", "ready": false,
                     "restartCount": 0,
                     "state": {"terminated": {"exitCode": 143, "reason": "Error"}}},
                ],
            },
        }))
    }

    fn first_failure(report: &PodReport) -> Option<(String, String)> {
        report.observations.iter().find_map(|o| match o {
            Observation::PodFailed { reason, message } => Some((reason.clone(), message.clone())),
            Observation::AppExited { reason, .. } => Some(("AppExited".into(), reason.clone())),
            _ => None,
        })
    }

    #[test]
    fn an_evicted_pod_fails_its_backend_as_evicted_not_as_an_app_exit() {
        let report = observe_pod(
            &deleted_pod(json!([{
                "type": "DisruptionTarget", "status": "True",
                "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting",
            }])),
            "app",
            ts("2024-01-01T00:00:06Z"),
            TIMEOUT,
        );
        assert_eq!(
            first_failure(&report),
            Some(("Evicted".into(), "Eviction API: evicting".into()))
        );
        // Progress seen before it still counts (a Running pod was Running).
        assert!(report.observations.contains(&Observation::PodRunning));
    }

    #[test]
    fn a_pod_of_a_lost_node_or_deleted_by_hand_says_so() {
        let gc = observe_pod(
            &deleted_pod(json!([{
                "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
            }])),
            "app",
            ts("2024-01-01T00:00:06Z"),
            TIMEOUT,
        );
        assert_eq!(first_failure(&gc).map(|f| f.0), Some("NodeLost".into()));
        let by_hand = observe_pod(
            &deleted_pod(json!([])),
            "app",
            ts("2024-01-01T00:00:06Z"),
            TIMEOUT,
        );
        assert_eq!(
            first_failure(&by_hand),
            Some(("PodDeleted".into(), "the backend's pod was deleted".into()))
        );
    }

    #[test]
    fn a_pod_failed_by_pod_garbage_collection_is_node_lost() {
        // What kind showed after `kubectl delete node`: the pod Failed, no reason of its own,
        // its containers still reported running, no deletionTimestamp (it is force-deleted next).
        let mut p = deleted_pod(json!([{
            "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists",
        }]));
        p.metadata.deletion_timestamp = None;
        if let Some(status) = p.status.as_mut() {
            status.phase = Some("Failed".into());
            status.container_statuses = None;
        }
        let report = observe_pod(&p, "app", ts("2024-01-01T00:00:06Z"), TIMEOUT);
        assert_eq!(
            first_failure(&report),
            Some(("NodeLost".into(), "PodGC: node no longer exists".into()))
        );
    }

    #[test]
    fn a_disruption_condition_without_deletion_is_not_a_failure() {
        let mut p = deleted_pod(json!([{
            "type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
        }]));
        p.metadata.deletion_timestamp = None;
        if let Some(status) = p.status.as_mut() {
            status.container_statuses = None;
        }
        let report = observe_pod(&p, "app", ts("2024-01-01T00:00:06Z"), TIMEOUT);
        assert_eq!(first_failure(&report), None);
    }

    fn backend(value: serde_json::Value) -> SessionLivedBackend {
        serde_json::from_value(value).expect("backend")
    }

    #[test]
    fn lifetime_counts_from_creation() {
        let b = backend(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": "b", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}, "maxLifetimeSeconds": 90}
        }));
        assert_eq!(lifetime_deadline(&b), Some(ts("2024-01-01T00:01:30Z")));
        let mut without = b.clone();
        without.spec.max_lifetime_seconds = None;
        assert_eq!(lifetime_deadline(&without), None);
    }

    #[test]
    fn retention_counts_from_the_terminal_condition() {
        let b = backend(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": "b", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}},
            "status": {"phase": "Swept", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:05Z"},
                {"type": "Swept", "status": "True", "lastTransitionTime": "2024-01-01T00:10:00Z"}
            ]}
        }));
        assert_eq!(
            retention_deadline(&b, Duration::from_secs(30)),
            Some(ts("2024-01-01T00:10:30Z"))
        );
        let mut live = b.clone();
        if let Some(s) = live.status.as_mut() {
            s.phase = Phase::Ready;
        }
        assert_eq!(retention_deadline(&live, Duration::from_secs(30)), None);
    }

    #[test]
    fn the_start_deadline_counts_from_running_until_ready() {
        let mut status: SessionLivedBackendStatus = serde_json::from_value(json!({
            "phase": "Running", "conditions": [
                {"type": "Scheduled", "status": "True", "lastTransitionTime": "2024-01-01T00:00:01Z"},
                {"type": "Running", "status": "True", "lastTransitionTime": "2024-01-01T00:00:05Z"}
            ]
        }))
        .expect("status");
        let timeout = Some(Duration::from_secs(300));
        assert_eq!(
            start_deadline(&status, timeout),
            Some(ts("2024-01-01T00:05:05Z"))
        );
        assert_eq!(start_deadline(&status, None), None);
        status.phase = Phase::Ready;
        assert_eq!(start_deadline(&status, timeout), None);
        status.phase = Phase::Scheduled;
        assert_eq!(start_deadline(&status, timeout), None);
    }

    #[test]
    fn time_arithmetic_saturates() {
        let now = ts("2024-01-01T00:00:00Z");
        assert_eq!(until(now, ts("2023-01-01T00:00:00Z")), Duration::ZERO);
        assert_eq!(
            until(now, ts("2024-01-01T00:00:07Z")),
            Duration::from_secs(7)
        );
        assert_eq!(add(Timestamp::MAX, Duration::from_secs(1)), Timestamp::MAX);
        assert_eq!(earliest([None, Some(now), Some(Timestamp::MAX)]), Some(now));
        assert!(expects_pod(Phase::Ready) && !expects_pod(Phase::Submitted));
    }
}
