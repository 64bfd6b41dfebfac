//! Writing phase transitions into a backend's status, shared by every status writer (controller
//! and sweeper), so conditions, reasons and the optimistic-concurrency patch look the same
//! whoever wrote them.

use serde_json::{Value, json};

use crate::phase::{Phase, Transition};
use crate::resource::{BackendCondition, SessionLivedBackendStatus};

/// Applies `transition`, reached at `at` (RFC 3339), to `status`: phase, reason, message, exit
/// code, and one condition for the phase reached (replacing an older one of the same type).
pub fn apply_transition(status: &mut SessionLivedBackendStatus, transition: &Transition, at: &str) {
    status.phase = transition.to;
    status.reason = Some(transition.reason.clone());
    status.message = Some(transition.message.clone());
    if let Some(code) = transition.exit_code {
        status.exit_code = Some(code);
    }
    status
        .conditions
        .retain(|c| c.type_ != transition.to.as_str());
    status.conditions.push(BackendCondition {
        type_: transition.to.as_str().to_string(),
        status: "True".into(),
        last_transition_time: at.to_string(),
        reason: Some(transition.reason.clone()),
        message: Some(transition.message.clone()),
    });
}

/// The time (RFC 3339) `status` records for reaching `phase`, if any.
pub fn phase_time(status: &SessionLivedBackendStatus, phase: Phase) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == phase.as_str())
        .map(|c| c.last_transition_time.as_str())
}

/// A merge patch for the status subresource that only applies to the version it was computed
/// from: carrying `metadata.resourceVersion` makes a concurrent writer's patch fail with 409, so
/// phases never move backwards.
pub fn status_patch(resource_version: Option<&str>, status: &SessionLivedBackendStatus) -> Value {
    match resource_version {
        Some(rv) => json!({"metadata": {"resourceVersion": rv}, "status": status}),
        None => json!({ "status": status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::{Observation, next_phase};

    #[test]
    fn transition_sets_phase_reason_and_one_condition_per_phase() {
        let mut status = SessionLivedBackendStatus::default();
        let t = next_phase(
            Phase::Running,
            &Observation::AppExited {
                exit_code: 2,
                reason: "Error".into(),
            },
        )
        .expect("fails");
        apply_transition(&mut status, &t, "2024-01-01T00:00:00Z");
        apply_transition(&mut status, &t, "2024-01-01T00:00:05Z");
        assert_eq!(status.phase, Phase::Failed);
        assert_eq!(status.exit_code, Some(2));
        assert_eq!(status.reason.as_deref(), Some("ApplicationExited"));
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(
            phase_time(&status, Phase::Failed),
            Some("2024-01-01T00:00:05Z")
        );
        assert_eq!(phase_time(&status, Phase::Ready), None);
    }

    #[test]
    fn patch_carries_the_resource_version() {
        let status = SessionLivedBackendStatus::default();
        let patch = status_patch(Some("42"), &status);
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(patch["status"]["phase"], "Submitted");
        assert!(status_patch(None, &status).get("metadata").is_none());
    }
}
