//! Following a backend's phases on the api's status stream, as the scenarios check them: to
//! Ready, or to the end they expect.

use std::time::Duration;

use spawner_core::Phase;

use serde_json::json;

use super::{App, Failure, PhaseEvent, Target, client, ensure};

/// Waits for `name` to be Ready; a Failure names the phases seen and the reason.
pub async fn wait_ready(target: &Target, name: &str) -> Result<(), Failure> {
    let events = target
        .api
        .follow_phases(name, target.ready_timeout, |p| p == Phase::Ready)
        .await?;
    let last = events.last();
    ensure(last.is_some_and(|e| e.phase == Phase::Ready), || {
        format!(
            "{name} never became Ready: phases {:?}, last reason {:?}: {:?}",
            client::phases(&events),
            last.and_then(|e| e.reason.clone()),
            last.and_then(|e| e.message.clone()),
        )
    })
}

/// Follows `name`'s status stream to its terminal phase (within `timeout`) and checks that it
/// ended in `phase`, with `reason` when one is given; returns every phase event, the last one
/// being the end. A Failure names the phases seen, `what` happened before, and the reason.
pub async fn ended(
    target: &Target,
    name: &str,
    timeout: Duration,
    what: &str,
    phase: Phase,
    reason: Option<&str>,
) -> Result<Vec<PhaseEvent>, Failure> {
    let events = target.api.follow_phases(name, timeout, |_| false).await?;
    let last = events
        .last()
        .ok_or_else(|| Failure::new(format!("{name}: no phase events")))?;
    ensure(
        last.phase == phase && reason.is_none_or(|r| last.reason.as_deref() == Some(r)),
        || {
            format!(
                "{name} {what} ended {:?} ({:?}: {:?}), expected {phase:?}{}; phases {:?}",
                last.phase,
                last.reason,
                last.message,
                reason.map_or(String::new(), |r| format!(" ({r})")),
                client::phases(&events)
            )
        },
    )?;
    Ok(events)
}

/// The last of `events` (those [`ended`] returns, never empty).
pub fn end(events: &[PhaseEvent]) -> &PhaseEvent {
    &events[events.len() - 1]
}

/// Checks that `name` was never Ready in `events`.
pub fn never_ready(name: &str, events: &[PhaseEvent]) -> Result<(), Failure> {
    ensure(events.iter().all(|e| e.phase != Phase::Ready), || {
        format!("{name} was Ready: {:?}", client::phases(events))
    })
}

/// Terminates `name` and follows it to Terminated.
pub async fn terminate(target: &Target, name: &str) -> Result<Vec<PhaseEvent>, Failure> {
    target.api.terminate(name).await?;
    ended(
        target,
        name,
        Duration::from_secs(60),
        "after terminate",
        Phase::Terminated,
        None,
    )
    .await
}

/// Spawns `app` with `gracePeriodSeconds: grace_seconds` and follows it to its end as
/// [`ended`] checks it; the backend's name and its phase events.
pub async fn spawn_until_ended(
    target: &Target,
    app: &App,
    grace_seconds: u64,
    timeout: Duration,
    what: &str,
    phase: Phase,
    reason: Option<&str>,
) -> Result<(String, Vec<PhaseEvent>), Failure> {
    let spawned = target
        .api
        .spawn(&app.request(json!({ "gracePeriodSeconds": grace_seconds })))
        .await?;
    let events = ended(target, &spawned.name, timeout, what, phase, reason).await?;
    Ok((spawned.name, events))
}
