//! The Kubernetes Event (`events.k8s.io/v1`) that records one phase transition of a backend,
//! so `kubectl describe` and `kubectl get events` tell a backend's story.
//!
//! Built here as a pure function; the controller and the sweeper create it with one `POST`.
//! They do not use kube-runtime's `Recorder`: it keeps every event of the last hour to fold
//! repeats into a series, and scans that whole cache on every publish. A transition happens
//! once per backend, so there is nothing to fold, and the scan made each publish slower the
//! more backends had been spawned (it was a visible share of the controller's CPU in bursts).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::phase::{Phase, Transition};
use crate::resource::SessionLivedBackend;

/// Who reports the events: the component (`reportingController`) and its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventReporter {
    pub controller: String,
    pub instance: String,
}

/// The Event for `transition` of `backend`, observed at `now` by `reporter`. Warning when the
/// backend failed, Normal otherwise. Its name is the backend's, the phase reached and `now` in
/// hexadecimal nanoseconds: one reconcile can make several transitions at the same instant
/// (Constructed to Scheduled to Running), and each needs its own Event.
pub fn transition_event(
    backend: &SessionLivedBackend,
    transition: &Transition,
    reporter: &EventReporter,
    now: Timestamp,
) -> Event {
    let regarding: ObjectReference = backend.object_ref(&());
    let name = backend.name_any();
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{name}.{}.{:x}",
                transition.to.as_str().to_ascii_lowercase(),
                now.as_nanosecond()
            )),
            namespace: backend.namespace(),
            ..Default::default()
        },
        action: Some(transition.to.as_str().to_string()),
        reason: Some(transition.reason.clone()),
        note: Some(format!(
            "{} → {}: {}",
            transition.from, transition.to, transition.message
        )),
        type_: Some(
            if transition.to == Phase::Failed {
                "Warning"
            } else {
                "Normal"
            }
            .to_string(),
        ),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend() -> SessionLivedBackend {
        serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": "slab-1", "namespace": "apps", "uid": "u-1", "resourceVersion": "7"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}},
        }))
        .expect("backend")
    }

    fn reporter(controller: &str, instance: &str) -> EventReporter {
        EventReporter {
            controller: controller.into(),
            instance: instance.into(),
        }
    }

    fn transition(to: Phase) -> Transition {
        Transition {
            from: Phase::Running,
            to,
            reason: "Because".into(),
            message: "it happened".into(),
            exit_code: None,
        }
    }

    #[test]
    fn an_event_regards_the_backend_and_names_its_reporter() {
        let reporter = reporter("spawner.dev/controller", "pod-a");
        let now: Timestamp = "2026-11-29T10:00:00.5Z".parse().expect("time");
        let event = transition_event(&backend(), &transition(Phase::Ready), &reporter, now);
        let regarding = event.regarding.expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("SessionLivedBackend"));
        assert_eq!(regarding.name.as_deref(), Some("slab-1"));
        assert_eq!(regarding.uid.as_deref(), Some("u-1"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("apps"));
        assert_eq!(
            event.metadata.name,
            Some(format!("slab-1.ready.{:x}", now.as_nanosecond()))
        );
        assert_eq!(event.action.as_deref(), Some("Ready"));
        assert_eq!(event.reason.as_deref(), Some("Because"));
        assert_eq!(event.note.as_deref(), Some("Running → Ready: it happened"));
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        assert_eq!(event.event_time, Some(MicroTime(now)));
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some("spawner.dev/controller")
        );
        assert_eq!(event.reporting_instance.as_deref(), Some("pod-a"));
    }

    #[test]
    fn a_failure_is_a_warning() {
        let reporter = reporter("c", "i");
        let event = transition_event(
            &backend(),
            &transition(Phase::Failed),
            &reporter,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(event.type_.as_deref(), Some("Warning"));
    }

    #[test]
    fn transitions_at_the_same_instant_get_distinct_names() {
        let reporter = reporter("c", "i");
        let now = Timestamp::UNIX_EPOCH;
        let names: std::collections::HashSet<_> = [Phase::Scheduled, Phase::Running]
            .into_iter()
            .map(|to| {
                transition_event(&backend(), &transition(to), &reporter, now)
                    .metadata
                    .name
            })
            .collect();
        assert_eq!(names.len(), 2);
    }
}
