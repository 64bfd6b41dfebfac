//! Status writes of the sweeper (Ready, Swept): read fresh, compute the transition with the
//! phase machine, patch the status subresource with the resourceVersion it was computed from,
//! and retry from a fresh read when another writer got there first.

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use spawner_core::phase::{Observation, Phase, Transition, next_phase};
use spawner_core::resource::SessionLivedBackend;
use spawner_core::status::{apply_transition, status_patch};

use crate::clock::Clock;

/// Field manager of the sweeper's writes.
pub const MANAGER: &str = "spawner-sweeper";
const ATTEMPTS: usize = 5;

/// What came of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The transition was written.
    Written(Transition),
    /// The phase machine says nothing changes from the current phase.
    Unchanged(Phase),
    /// The backend is gone (or was replaced by another with the same name).
    Gone,
}

/// Applies `observation` to the backend `name` with `uid`.
pub async fn write_observation(
    api: &Api<SessionLivedBackend>,
    name: &str,
    uid: &str,
    observation: &Observation,
    clock: &dyn Clock,
    recorder: Option<&Recorder>,
) -> Result<WriteOutcome, kube::Error> {
    let mut last_conflict = None;
    for _ in 0..ATTEMPTS {
        let Some(backend) = api.get_opt(name).await? else {
            return Ok(WriteOutcome::Gone);
        };
        if backend.uid().as_deref() != Some(uid) {
            return Ok(WriteOutcome::Gone);
        }
        let mut status = backend.status.clone().unwrap_or_default();
        let Some(transition) = next_phase(status.phase, observation) else {
            return Ok(WriteOutcome::Unchanged(status.phase));
        };
        apply_transition(&mut status, &transition, &clock.now().to_string());
        let patch = status_patch(backend.resource_version().as_deref(), &status);
        match api
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                if let Some(recorder) = recorder {
                    publish(recorder, &backend, &transition).await;
                }
                return Ok(WriteOutcome::Written(transition));
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => last_conflict = Some(s),
            Err(e) => return Err(e),
        }
    }
    match last_conflict {
        Some(s) => Err(kube::Error::Api(s)),
        None => Ok(WriteOutcome::Gone),
    }
}

async fn publish(recorder: &Recorder, backend: &SessionLivedBackend, transition: &Transition) {
    let event = Event {
        type_: EventType::Normal,
        reason: transition.reason.clone(),
        note: Some(format!(
            "{} → {}: {}",
            transition.from, transition.to, transition.message
        )),
        action: transition.to.as_str().to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &backend.object_ref(&())).await {
        tracing::warn!(backend = %backend.name_any(), error = %e, "could not publish event");
    }
}
