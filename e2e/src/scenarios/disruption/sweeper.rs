//! A node's sweeper deleted while a user holds a WebSocket to a backend on that node.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use spawner_core::Phase;
use tokio_tungstenite::tungstenite::Message;

use super::super::client;
use super::super::phases::ended;
use super::super::room::{next_room_state, open_room};
use super::super::{Failure, Target, Timings, ensure};
use super::cluster::{POLL, SYSTEM_NAMESPACE, kubectl, name_of, pods_of, wait_spawner_rolled_out};

/// The sweeper pod of a backend's node is deleted while a user holds a WebSocket to the
/// backend: the DaemonSet's new sweeper never sweeps it under the user (held past the grace
/// period and the sweeper's restart); once the user leaves it is swept after its grace period.
pub async fn sweeper_deleted_while_user_connected(target: &Target) -> Result<Timings, Failure> {
    const GRACE: Duration = Duration::from_secs(3);
    let mut timings = Timings::default();
    wait_spawner_rolled_out().await?;
    let start = Instant::now();
    let spawned = target
        .api
        .spawn(
            &target
                .apps
                .demo
                .request(json!({ "gracePeriodSeconds": GRACE.as_secs() })),
        )
        .await?;
    let name = spawned.name;
    let (events, _) = target
        .api
        .follow_phases_resuming(&name, target.ready_timeout, |p| p == Phase::Ready)
        .await?;
    ensure(
        events.last().is_some_and(|e| e.phase == Phase::Ready),
        || format!("{name} never became Ready: {:?}", client::phases(&events)),
    )?;
    let status = target.api.status(&name).await?;
    let node = status
        .node
        .clone()
        .ok_or_else(|| Failure::new(format!("{name} is Ready without a node")))?;
    let mut ws = open_room(target, &status, spawned.url.as_deref()).await?;
    next_room_state(&mut ws).await?;
    timings.record("spawn→connected", start);

    let sweepers = pods_of(SYSTEM_NAMESPACE, "spawner-sweeper", Some(&node)).await?;
    ensure(sweepers.len() == 1, || {
        format!("{} sweeper pods on {node}", sweepers.len())
    })?;
    let sweeper = name_of(&sweepers[0]);
    // The WebSocket is read all along (the sidecar's pings are answered while reading).
    let hold = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    };
    let disrupt = async {
        kubectl(&[
            "-n",
            SYSTEM_NAMESPACE,
            "delete",
            "pod",
            &sweeper,
            "--wait=true",
        ])
        .await?;
        wait_spawner_rolled_out().await?;
        let replacement = pods_of(SYSTEM_NAMESPACE, "spawner-sweeper", Some(&node)).await?;
        ensure(
            replacement.len() == 1 && name_of(&replacement[0]) != sweeper,
            || format!("no new sweeper on {node} after {sweeper} was deleted"),
        )?;
        // Past the grace period with the new sweeper watching.
        let until = Instant::now() + GRACE + Duration::from_secs(4);
        while Instant::now() < until {
            let during = target.api.status(&name).await?;
            ensure(during.phase == Phase::Ready, || {
                format!(
                    "{name} is {:?} ({:?}) while its user is connected, after the sweeper {sweeper} was replaced",
                    during.phase, during.reason
                )
            })?;
            tokio::time::sleep(POLL).await;
        }
        Ok::<(), Failure>(())
    };
    tokio::select! {
        () = hold => return Err(Failure::new(format!("{name}: the WebSocket ended while held open"))),
        outcome = disrupt => outcome?,
    }
    timings.record("held past grace with a new sweeper", start);
    let _ = ws.send(Message::Close(None)).await;
    drop(ws);
    let closed = Instant::now();
    ended(
        target,
        &name,
        GRACE + Duration::from_secs(60),
        "after its user left",
        Phase::Swept,
        None,
    )
    .await?;
    // Never before its grace period (a second of slack for the two clocks' reading points).
    ensure(closed.elapsed() + Duration::from_secs(1) >= GRACE, || {
        format!(
            "{name} was swept {:.2}s after its user left, within its {}s grace period",
            closed.elapsed().as_secs_f64(),
            GRACE.as_secs()
        )
    })?;
    timings.record("disconnect→Swept", closed);
    Ok(timings)
}
