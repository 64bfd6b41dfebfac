//! The api replica serving a status stream deleted while a client follows it.

use std::time::{Duration, Instant};

use serde_json::json;
use spawner_core::Phase;

use super::super::client::{self, StatusStream, StreamItem};
use super::super::{Failure, Target, Timings, ensure};
use super::cluster::{POLL, SYSTEM_NAMESPACE, kubectl, name_of, pods_of, wait_spawner_rolled_out};
use super::each_phase_once;

/// The api replica serving a client's status stream is deleted while the client follows it
/// through the api Service: the stream ends, the client reconnects with `Last-Event-ID` (to
/// whichever replica the Service picks) and receives the remaining phases, each exactly once.
pub async fn api_pod_deleted_while_streaming(target: &Target) -> Result<Timings, Failure> {
    let mut timings = Timings::default();
    wait_spawner_rolled_out().await?;
    let apis = pods_of(SYSTEM_NAMESPACE, "spawner-api", None).await?;
    ensure(apis.len() >= 2, || {
        format!(
            "{} api replicas: a second one must serve while one goes",
            apis.len()
        )
    })?;
    // Slow to accept, so Ready usually comes after the break.
    let app = target.apps.demo.started_after(Duration::from_secs(10));
    let start = Instant::now();
    let spawned = target
        .api
        .spawn(&app.request(json!({ "gracePeriodSeconds": 60 })))
        .await?;
    let name = spawned.name;

    let mut before: Vec<(Option<String>, client::PhaseEvent)> = Vec::new();
    let mut stream = target.api.open_stream(&name, None).await?;
    // Follow until Running, so the break comes in the middle of the start.
    while !before.iter().any(|(_, e)| e.phase >= Phase::Running) {
        match stream.next().await? {
            StreamItem::Phase { id, event } => before.push((id, event)),
            other => {
                return Err(Failure::new(format!(
                    "{name}: the stream gave {other:?} before Running"
                )));
            }
        }
    }
    timings.record("spawn→Running on the stream", start);

    delete_the_serving_replica(&name, &apis, &mut stream, &mut before).await?;
    timings.record("stream ended", start);
    if before.last().is_some_and(|(_, e)| e.phase.is_terminal()) {
        return Err(Failure::new(format!(
            "{name} ended before the api replica went: {:?}",
            before.iter().map(|(_, e)| e.phase).collect::<Vec<_>>()
        )));
    }

    let last_id = before
        .iter()
        .rev()
        .find_map(|(id, _)| id.clone())
        .ok_or_else(|| Failure::new(format!("{name}: phase events without ids")))?;
    let after = resume_to_the_end(target, &name, &last_id).await?;
    timings.record("reconnected and followed to the end", start);

    let mut all: Vec<client::PhaseEvent> = before.into_iter().map(|(_, e)| e).collect();
    let resumed_from = all.last().map(|e| e.phase);
    ensure(after.first().map(|e| e.phase) > resumed_from, || {
        format!(
            "{name}: resumed after {last_id} but the first event was {:?}",
            after.first().map(|e| e.phase)
        )
    })?;
    all.extend(after);
    each_phase_once(&name, &all)?;
    ensure(
        all.iter().filter(|e| e.phase == Phase::Ready).count() == 1
            && all.last().map(|e| e.phase) == Some(Phase::Terminated),
        || {
            format!(
                "{name}: phases across the reconnect: {:?}",
                client::phases(&all)
            )
        },
    )?;
    timings.record("spawn→Terminated", start);
    Ok(timings)
}

/// Which replica serves the stream is the Service's choice: deletes the `apis` one at a time
/// until the stream ends (deleting one whose pod is gone without ending it shows it was not
/// the one; the next is, after the first's replacement is up). Phases read meanwhile go to
/// `before`.
async fn delete_the_serving_replica(
    name: &str,
    apis: &[serde_json::Value],
    stream: &mut StatusStream,
    before: &mut Vec<(Option<String>, client::PhaseEvent)>,
) -> Result<(), Failure> {
    let mut ended = false;
    let mut deleted = Vec::new();
    for pod in apis.iter().map(name_of) {
        let delete_args = [
            "-n",
            SYSTEM_NAMESPACE,
            "delete",
            "pod",
            pod.as_str(),
            "--wait=true",
        ];
        let delete = kubectl(&delete_args);
        tokio::pin!(delete);
        let read_until_end = async {
            loop {
                match stream.next().await {
                    Ok(StreamItem::Phase { id, event }) => before.push((id, event)),
                    Ok(StreamItem::Deleted) => {
                        return Err(Failure::new(format!("{name} deleted during the test")));
                    }
                    Ok(StreamItem::Ended) | Err(_) => return Ok(()),
                }
            }
        };
        tokio::select! {
            outcome = read_until_end => {
                outcome?;
                ended = true;
                // Let the deletion finish, so the cluster is whole again afterwards.
                delete.await?;
            }
            deleted_pod = &mut delete => { deleted_pod?; }
        }
        deleted.push(pod.clone());
        wait_spawner_rolled_out().await?;
        if ended {
            break;
        }
    }
    ensure(ended, || {
        format!("{name}: the status stream outlived the deletion of every api replica {deleted:?}")
    })?;
    Ok(())
}

/// Reconnects as EventSource does, with the last id received (a replica may still be starting,
/// so the first attempts may be refused), and follows to a terminal phase, terminating the
/// backend once it is Ready. The phases received after the reconnect.
async fn resume_to_the_end(
    target: &Target,
    name: &str,
    last_id: &str,
) -> Result<Vec<client::PhaseEvent>, Failure> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut resumed = loop {
        match target.api.open_stream(name, Some(last_id)).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(Failure::new(format!("{name}: reconnecting: {e}")));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    let mut after: Vec<client::PhaseEvent> = Vec::new();
    let mut terminated = false;
    let follow = async {
        loop {
            match resumed.next().await? {
                StreamItem::Phase { event, .. } => {
                    let phase = event.phase;
                    after.push(event);
                    if phase == Phase::Ready && !terminated {
                        // The rest of its life: a terminate, seen on the resumed stream.
                        target.api.terminate(name).await?;
                        terminated = true;
                    }
                    if phase.is_terminal() {
                        return Ok::<(), Failure>(());
                    }
                }
                other => {
                    return Err(Failure::new(format!(
                        "{name}: the resumed stream gave {other:?} before a terminal phase"
                    )));
                }
            }
        }
    };
    tokio::time::timeout(target.ready_timeout + Duration::from_secs(60), follow)
        .await
        .map_err(|_| {
            Failure::new(format!("{name}: resumed stream: no terminal phase in time"))
        })??;

    Ok(after)
}
