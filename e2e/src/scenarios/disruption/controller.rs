//! The leading controller's pod deleted while a burst of spawns is in flight.

use std::time::{Duration, Instant};

use serde_json::json;
use spawner_core::Phase;

use super::super::client;
use super::super::{Failure, Target, Timings, ensure};
use super::cluster::{
    POLL, SYSTEM_NAMESPACE, backend_pods_by_owner, backend_uid, controller_leader, kubectl,
    name_of, pods_of, transition_events, wait_spawner_rolled_out,
};
use super::{each_phase_once, terminate_all};

/// The leading controller's pod is deleted while a burst of spawns is in flight: the standby
/// takes the Lease over and finishes them. Every backend reaches Ready exactly once (its status
/// stream shows each phase once, and one Kubernetes Event records its Ready), and each has
/// exactly one pod (pods counted by owner).
pub async fn controller_leader_deleted_mid_spawn(target: &Target) -> Result<Timings, Failure> {
    const BURST: usize = 8;
    let mut timings = Timings::default();
    wait_spawner_rolled_out().await?;
    let leader = controller_leader().await?;
    let controllers = pods_of(SYSTEM_NAMESPACE, "spawner-controller", None).await?;
    ensure(controllers.len() >= 2, || {
        format!(
            "{} controller replicas: a standby is needed",
            controllers.len()
        )
    })?;
    ensure(controllers.iter().any(|p| name_of(p) == leader), || {
        format!("the Lease holder {leader} is not a controller pod")
    })?;

    // Started late, so the backends are still on their way when the leader goes.
    let app = target.apps.demo.started_after(Duration::from_secs(3));
    let request = app.request(json!({ "gracePeriodSeconds": 60 }));
    let start = Instant::now();
    let spawned = futures::future::join_all((0..BURST).map(|_| target.api.spawn(&request))).await;
    let names: Vec<String> = spawned
        .into_iter()
        .map(|s| s.map(|s| s.name))
        .collect::<Result<_, _>>()?;
    kubectl(&[
        "-n",
        SYSTEM_NAMESPACE,
        "delete",
        "pod",
        &leader,
        "--wait=false",
    ])
    .await?;
    timings.record("burst spawned, leader deleted", start);

    let result = async {
        let follows = futures::future::join_all(names.iter().map(|name| {
            target.api.follow_phases_resuming(
                name,
                target.ready_timeout + Duration::from_secs(60),
                |p| p == Phase::Ready,
            )
        }))
        .await;
        for (name, follow) in names.iter().zip(follows) {
            let (events, _) = follow?;
            ensure(events.last().is_some_and(|e| e.phase == Phase::Ready), || {
                format!(
                    "{name} never became Ready after the leader {leader} was deleted: {:?} ({:?})",
                    client::phases(&events),
                    events.last().and_then(|e| e.reason.clone())
                )
            })?;
            each_phase_once(name, &events)?;
        }
        timings.record("burst Ready", start);
        let new_leader = controller_leader().await?;
        ensure(new_leader != leader, || {
            format!("{leader} was deleted but still holds the Lease")
        })?;

        let by_owner = backend_pods_by_owner().await?;
        for name in &names {
            let uid = backend_uid(name).await?;
            let pods = by_owner.get(&uid).cloned().unwrap_or_default();
            ensure(pods.len() == 1, || {
                format!("{name} (uid {uid}) owns {} pods: {pods:?}", pods.len())
            })?;
        }
        // The Events are published asynchronously, and best-effort (a full queue drops one):
        // wait a while for each Ready one, then count; two would be a second Ready transition.
        for name in &names {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut count = transition_events(name, "Ready").await?;
            while count == 0 && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
                count = transition_events(name, "Ready").await?;
            }
            ensure(count <= 1, || {
                format!("{name}: {count} Kubernetes Events record its Ready (at most one expected)")
            })?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    let cleanup = terminate_all(target, &names).await;
    result?;
    cleanup?;
    wait_spawner_rolled_out().await?;
    Ok(timings)
}
