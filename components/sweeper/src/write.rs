//! Status writes of the sweeper (Ready, Swept): read fresh (or start from the copy the watch
//! just showed), compute the transition with the phase machine, patch the status subresource
//! with the resourceVersion it was computed from, and retry from a fresh read when another
//! writer got there first.

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use spawner_core::phase::{Observation, Phase, Transition, next_phase};
use spawner_core::resource::SessionLivedBackend;
use spawner_core::status::{apply_transition, status_patch};
use spawner_core::transition_event::{EventReporter, transition_event};
use spawner_kube_events::EventPublisher;

use crate::clock::Clock;

/// Who reports the Events of the sweeper's transitions, and the queue they are posted from.
#[derive(Clone)]
pub struct TransitionEvents {
    pub reporter: EventReporter,
    pub publisher: EventPublisher,
}

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

/// Applies `observation` to the backend `name` with `uid`. The first attempt starts from
/// `seen` when given (a copy from the watch, saving a read when nothing changed since; a stale
/// copy only costs a conflict), later ones from a fresh read. Queues an Event per written
/// transition when `events` is given.
pub async fn write_observation(
    api: &Api<SessionLivedBackend>,
    (name, uid): (&str, &str),
    observation: &Observation,
    clock: &dyn Clock,
    events: Option<&TransitionEvents>,
    seen: Option<&SessionLivedBackend>,
) -> Result<WriteOutcome, kube::Error> {
    let mut last_conflict = None;
    for attempt in 0..ATTEMPTS {
        let fresh;
        let backend = match seen.filter(|_| attempt == 0) {
            Some(seen) => seen,
            None => match api.get_opt(name).await? {
                Some(backend) => {
                    fresh = backend;
                    &fresh
                }
                None => return Ok(WriteOutcome::Gone),
            },
        };
        if backend.uid().as_deref() != Some(uid) {
            return Ok(WriteOutcome::Gone);
        }
        let mut status = backend.status.clone().unwrap_or_default();
        let Some(transition) = next_phase(status.phase, observation) else {
            return Ok(WriteOutcome::Unchanged(status.phase));
        };
        let now = clock.now();
        apply_transition(&mut status, &transition, &now.to_string());
        let patch = status_patch(backend.resource_version().as_deref(), &status);
        match api
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                if let Some(events) = events {
                    let event = transition_event(backend, &transition, &events.reporter, now);
                    events.publisher.publish(event);
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
