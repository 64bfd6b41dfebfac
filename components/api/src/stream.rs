//! `GET /backend/{id}/status/stream`: Server-Sent Events of a backend's phase transitions.
//!
//! The history so far comes from the backend's conditions (one per phase reached), then live
//! transitions from the replica's shared watch of all backends ([`crate::hub`]). Each event's `id` is its phase: phases only move
//! forward, so a client reconnecting with `Last-Event-ID: Running` receives exactly the phases
//! after Running, never one twice. The stream ends after a terminal phase (or an event
//! `deleted` when the backend disappears without one). Comment heartbeats keep proxies and
//! clients from timing out; the shared watch is replaced after a fresh list when it stays
//! silent longer than the idle timeout, so a partition is noticed within seconds.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use kube::ResourceExt;
use spawner_core::{Phase, SessionLivedBackend};
use tokio::sync::broadcast::error::RecvError;

use crate::error::ApiError;
use crate::extract::BackendName;
use crate::hub::{Change, Subscription};
use crate::model::PhaseEvent;
use crate::naming::UrlTemplate;
use crate::routes::{SharedState, get_backend};

/// Pause before retrying after the Kubernetes API failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Name of the event carrying a phase.
pub const PHASE_EVENT: &str = "phase";
/// Name of the final event when the backend was deleted without a terminal phase seen.
pub const DELETED_EVENT: &str = "deleted";

/// Which phases a client has already received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseTracker {
    last_sent: Option<Phase>,
}

impl PhaseTracker {
    /// A tracker resuming after the event with id `last_event_id` (a phase name); an unknown
    /// id starts from the beginning.
    pub fn resume_after(last_event_id: Option<&str>) -> Self {
        let last_sent =
            last_event_id.and_then(|id| Phase::ALL.into_iter().find(|p| p.as_str() == id.trim()));
        Self { last_sent }
    }

    /// Whether the client already has a terminal phase.
    pub fn finished(&self) -> bool {
        self.last_sent.is_some_and(Phase::is_terminal)
    }

    /// The events for the phases `backend` reached that were not sent yet, in order; marks
    /// them sent.
    pub fn advance(
        &mut self,
        backend: &SessionLivedBackend,
        template: &UrlTemplate,
        namespace: &str,
    ) -> Vec<PhaseEvent> {
        let events = phase_history(backend, template, namespace);
        let new: Vec<_> = events
            .into_iter()
            .filter(|e| self.last_sent.is_none_or(|last| e.phase > last))
            .collect();
        if let Some(last) = new.last() {
            self.last_sent = Some(last.phase);
        }
        new
    }
}

/// Every phase `backend` reached, in order: Submitted at creation, one per condition, and the
/// current phase when no condition records it.
pub fn phase_history(
    backend: &SessionLivedBackend,
    template: &UrlTemplate,
    namespace: &str,
) -> Vec<PhaseEvent> {
    let name = backend.name_any();
    let status = backend.status.clone().unwrap_or_default();
    let current = status.phase;
    let event = |phase: Phase,
                 time: Option<String>,
                 reason: Option<String>,
                 message: Option<String>| PhaseEvent {
        name: name.clone(),
        phase,
        time,
        reason,
        message,
        node: (phase >= Phase::Scheduled)
            .then(|| status.node_name.clone())
            .flatten(),
        url: (phase == Phase::Ready)
            .then(|| template.render(&name, namespace, status.url.as_deref()))
            .flatten(),
        exit_code: (phase == current && phase.is_terminal())
            .then_some(status.exit_code)
            .flatten(),
    };
    let mut by_phase = BTreeMap::new();
    let created = backend
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    by_phase.insert(
        Phase::Submitted,
        event(Phase::Submitted, created, None, None),
    );
    for condition in &status.conditions {
        let Some(phase) = Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == condition.type_)
        else {
            continue;
        };
        // A terminal condition other than the current phase cannot be true (phases only move
        // forward); ignore it rather than end the stream on the wrong phase.
        if phase > current || (phase.is_terminal() && phase != current) {
            continue;
        }
        by_phase.insert(
            phase,
            event(
                phase,
                Some(condition.last_transition_time.clone()),
                condition.reason.clone(),
                condition.message.clone(),
            ),
        );
    }
    by_phase
        .entry(current)
        .or_insert_with(|| event(current, None, status.reason.clone(), status.message.clone()));
    by_phase.into_values().collect()
}

fn to_sse(event: &PhaseEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_string());
    Event::default()
        .id(event.phase.as_str())
        .event(PHASE_EVENT)
        .data(data)
}

enum Outgoing {
    Phase(PhaseEvent),
    Deleted,
}

struct PhaseStream {
    state: SharedState,
    name: String,
    tracker: PhaseTracker,
    queue: VecDeque<Outgoing>,
    finished: bool,
    subscription: Subscription,
}

impl PhaseStream {
    fn observe(&mut self, backend: &SessionLivedBackend) {
        let config = &self.state.config;
        let events = self
            .tracker
            .advance(backend, &config.url_template, &config.namespace);
        self.queue.extend(events.into_iter().map(Outgoing::Phase));
    }

    /// The next SSE event, or `None` when the stream is over.
    async fn next_event(&mut self) -> Option<Event> {
        let mut shutdown = self.state.shutdown.clone();
        loop {
            match self.queue.pop_front() {
                Some(Outgoing::Phase(event)) => {
                    self.finished |= event.phase.is_terminal();
                    return Some(to_sse(&event));
                }
                Some(Outgoing::Deleted) => {
                    self.finished = true;
                    let data = serde_json::json!({ "name": self.name }).to_string();
                    return Some(Event::default().event(DELETED_EVENT).data(data));
                }
                None => {}
            }
            if self.finished || *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return None;
                    }
                }
                received = self.subscription.changes.recv() => match received {
                    Ok(change) => self.apply(&change).await,
                    // Fell behind the shared watch: catch up from a read.
                    Err(RecvError::Lagged(_)) => self.resync().await,
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Queues what one change of the shared watch shows of this backend.
    async fn apply(&mut self, change: &Change) {
        match change {
            Change::Applied(b) if b.name_any() == self.name => self.observe(b),
            Change::Deleted(b) if b.name_any() == self.name => {
                self.observe(b);
                self.backend_gone();
            }
            Change::Relisted(all) => match all.get(&self.name) {
                Some(b) => self.observe(b),
                // A list that was already under way when this stream subscribed can predate
                // the backend's creation: only a read says whether it is really gone.
                None => self.resync().await,
            },
            _ => {}
        }
    }

    /// A fresh read of the backend: catches up on what a lagging receiver missed.
    async fn resync(&mut self) {
        let idle_timeout = self.state.config.watch_idle_timeout;
        match tokio::time::timeout(idle_timeout, self.state.backends.get_opt(&self.name)).await {
            Ok(Ok(Some(backend))) => self.observe(&backend),
            Ok(Ok(None)) => self.backend_gone(),
            Ok(Err(e)) => {
                tracing::warn!(name = self.name, error = %e, "cannot read backend");
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(_) => tracing::warn!(name = self.name, "reading the backend timed out"),
        }
    }

    fn backend_gone(&mut self) {
        let terminal_queued = self
            .queue
            .iter()
            .any(|o| matches!(o, Outgoing::Phase(e) if e.phase.is_terminal()));
        if !terminal_queued && !self.tracker.finished() && !self.finished {
            self.queue.push_back(Outgoing::Deleted);
        }
        if self.queue.is_empty() {
            self.finished = true;
        }
    }
}

/// The handler. Over the cap of concurrent streams it answers 503 with `Retry-After`.
pub async fn status_stream(
    State(state): State<SharedState>,
    BackendName(name): BackendName,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let subscription = state
        .hub
        .subscribe()
        .ok_or_else(ApiError::too_many_streams)?;
    let backend = get_backend(&state, &name).await?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let heartbeat = state.config.heartbeat;
    let mut stream = PhaseStream {
        tracker: PhaseTracker::resume_after(last_event_id),
        state,
        name,
        queue: VecDeque::new(),
        finished: false,
        subscription,
    };
    stream.finished = stream.tracker.finished();
    stream.observe(&backend);
    let events = futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok(event), stream))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use spawner_core::resource::{BackendCondition, SessionLivedBackendStatus};

    fn condition(phase: Phase, time: &str) -> BackendCondition {
        BackendCondition {
            type_: phase.as_str().to_string(),
            status: "True".into(),
            last_transition_time: time.into(),
            reason: Some(phase.as_str().into()),
            message: None,
        }
    }

    fn backend(phase: Phase, conditions: Vec<BackendCondition>) -> SessionLivedBackend {
        let spec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}
        }))
        .expect("spec");
        let mut backend = SessionLivedBackend::new("slab-a", spec);
        backend.status = Some(SessionLivedBackendStatus {
            phase,
            node_name: Some("node-1".into()),
            url: Some("http://127.0.1.1:9090".into()),
            exit_code: Some(2),
            conditions,
            ..Default::default()
        });
        backend
    }

    fn phases(events: &[PhaseEvent]) -> Vec<Phase> {
        events.iter().map(|e| e.phase).collect()
    }

    #[test]
    fn history_comes_from_conditions_then_the_current_phase() {
        let b = backend(
            Phase::Running,
            vec![
                condition(Phase::Scheduled, "t2"),
                condition(Phase::Constructed, "t1"),
            ],
        );
        let history = phase_history(&b, &UrlTemplate::default(), "ns");
        assert_eq!(
            phases(&history),
            [
                Phase::Submitted,
                Phase::Constructed,
                Phase::Scheduled,
                Phase::Running
            ]
        );
        assert_eq!(history[1].time.as_deref(), Some("t1"));
        assert_eq!(history[0].node, None);
        assert_eq!(history[2].node.as_deref(), Some("node-1"));
        assert_eq!(history[3].time, None);
        assert!(
            history
                .iter()
                .all(|e| e.url.is_none() && e.exit_code.is_none())
        );
    }

    #[test]
    fn ready_carries_the_url_and_failure_the_exit_code() {
        let b = backend(Phase::Ready, vec![condition(Phase::Ready, "t")]);
        let history = phase_history(&b, &UrlTemplate::default(), "ns");
        assert_eq!(
            history.last().and_then(|e| e.url.as_deref()),
            Some("http://127.0.1.1:9090")
        );
        let b = backend(
            Phase::Failed,
            vec![
                condition(Phase::Running, "t"),
                condition(Phase::Failed, "u"),
            ],
        );
        let history = phase_history(&b, &UrlTemplate::default(), "ns");
        assert_eq!(
            phases(&history),
            [Phase::Submitted, Phase::Running, Phase::Failed]
        );
        assert_eq!(history.last().and_then(|e| e.exit_code), Some(2));
    }

    #[test]
    fn impossible_conditions_are_ignored() {
        // A condition ahead of the phase, or a terminal one that is not the phase.
        let b = backend(
            Phase::Running,
            vec![condition(Phase::Ready, "t"), condition(Phase::Swept, "u")],
        );
        assert_eq!(
            phases(&phase_history(&b, &UrlTemplate::default(), "ns")),
            [Phase::Submitted, Phase::Running]
        );
    }

    #[test]
    fn tracker_sends_each_phase_once_and_resumes_after_an_id() {
        let mut tracker = PhaseTracker::resume_after(None);
        let t = UrlTemplate::default();
        let first = tracker.advance(&backend(Phase::Scheduled, vec![]), &t, "ns");
        assert_eq!(phases(&first), [Phase::Submitted, Phase::Scheduled]);
        assert!(
            tracker
                .advance(&backend(Phase::Scheduled, vec![]), &t, "ns")
                .is_empty()
        );
        let next = tracker.advance(
            &backend(Phase::Ready, vec![condition(Phase::Running, "t")]),
            &t,
            "ns",
        );
        assert_eq!(phases(&next), [Phase::Running, Phase::Ready]);
        assert!(!tracker.finished());
        let end = tracker.advance(&backend(Phase::Swept, vec![]), &t, "ns");
        assert_eq!(phases(&end), [Phase::Swept]);
        assert!(tracker.finished());

        let mut resumed = PhaseTracker::resume_after(Some("Running"));
        let rest = resumed.advance(
            &backend(Phase::Ready, vec![condition(Phase::Running, "t")]),
            &t,
            "ns",
        );
        assert_eq!(phases(&rest), [Phase::Ready]);
        assert_eq!(
            PhaseTracker::resume_after(Some("bogus")),
            PhaseTracker::default()
        );
        assert!(PhaseTracker::resume_after(Some("Terminated")).finished());
    }
}
