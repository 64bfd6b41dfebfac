//! Disruption scenarios: a real cluster loses a part of Spawner (the leading controller, an
//! api replica, a node's sweeper) or a whole worker while users spawn, follow and hold
//! backends. They act on the cluster with `kubectl` (the current context: `scripts/e2e-kind.sh`
//! points `KUBECONFIG` at its kind cluster) and judge through the api as a web app would, plus
//! `kubectl` reads for what the api does not show (pods by owner, the leader's Lease, Events).
//! Only a cluster can run them: `spawner dev` has no pods to delete.
//!
//! Each scenario leaves the cluster as it found it (every Deployment and the DaemonSet rolled
//! out, a drained node uncordoned), so the others can run after it in any order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spawner_core::Phase;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, StreamItem};
use super::phases::ended;
use super::room::{next_room_state, open_room};
use super::{Failure, Target, Timings, ensure};

/// Where Spawner runs (deploy/base).
const SYSTEM_NAMESPACE: &str = "spawner-system";
/// Where backends run (deploy/base).
const BACKENDS_NAMESPACE: &str = "spawner-backends";
/// The controller's Lease (`--lease-name`).
const CONTROLLER_LEASE: &str = "spawner-controller";
/// Longest wait for one `kubectl` command (a drain waits for evictions; it has its own timeout).
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a Deployment or DaemonSet to be rolled out again after a disruption.
const ROLLOUT_TIMEOUT: &str = "300s";
/// Interval between looks at the cluster while waiting for a state (polling, not timing).
const POLL: Duration = Duration::from_millis(500);

/// Runs `kubectl` with `args` and returns its standard output.
pub async fn kubectl(args: &[&str]) -> Result<String, Failure> {
    let output = tokio::time::timeout(
        KUBECTL_TIMEOUT,
        Command::new("kubectl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        Failure::new(format!(
            "kubectl {}: no answer in {KUBECTL_TIMEOUT:?}",
            args.join(" ")
        ))
    })?
    .map_err(|e| Failure::new(format!("running kubectl {}: {e}", args.join(" "))))?;
    if !output.status.success() {
        return Err(Failure::new(format!(
            "kubectl {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn kubectl_json(args: &[&str]) -> Result<Value, Failure> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = kubectl(&all).await?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::new(format!("kubectl {}: not JSON: {e}", args.join(" "))))
}

fn items(list: &Value) -> &[Value] {
    list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The names of the pods in `namespace` with label `app.kubernetes.io/name=<app>`, optionally
/// only those on `node`, not being deleted.
async fn pods_of(namespace: &str, app: &str, node: Option<&str>) -> Result<Vec<Value>, Failure> {
    let selector = format!("app.kubernetes.io/name={app}");
    let list = kubectl_json(&["-n", namespace, "get", "pods", "-l", &selector]).await?;
    Ok(items(&list)
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| node.is_none_or(|n| p["spec"]["nodeName"].as_str() == Some(n)))
        .cloned()
        .collect())
}

/// Waits until Spawner's workloads are all rolled out (every replica ready and current).
pub async fn wait_spawner_rolled_out() -> Result<(), Failure> {
    for workload in [
        "deploy/spawner-controller",
        "deploy/spawner-api",
        "deploy/spawner-router",
        "ds/spawner-sweeper",
    ] {
        kubectl(&[
            "-n",
            SYSTEM_NAMESPACE,
            "rollout",
            "status",
            workload,
            &format!("--timeout={ROLLOUT_TIMEOUT}"),
        ])
        .await?;
    }
    Ok(())
}

/// The controller replica holding the leader Lease.
async fn controller_leader() -> Result<String, Failure> {
    let lease = kubectl_json(&["-n", SYSTEM_NAMESPACE, "get", "lease", CONTROLLER_LEASE]).await?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Failure::new(format!("lease {CONTROLLER_LEASE} has no holder: {lease}")))
}

/// Pods in the backends namespace per owning backend uid.
async fn backend_pods_by_owner() -> Result<BTreeMap<String, Vec<String>>, Failure> {
    let list = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "pods"]).await?;
    let mut by_owner: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in items(&list) {
        for owner in pod["metadata"]["ownerReferences"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if owner["kind"] == "SessionLivedBackend"
                && let Some(uid) = owner["uid"].as_str()
            {
                by_owner
                    .entry(uid.to_string())
                    .or_default()
                    .push(name_of(pod));
            }
        }
    }
    Ok(by_owner)
}

async fn backend_uid(name: &str) -> Result<String, Failure> {
    let slab = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "slab", name]).await?;
    slab["metadata"]["uid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::new(format!("backend {name} has no uid")))
}

/// How many Kubernetes Events record `name` reaching `reason` (aggregated Events count their
/// repetitions).
async fn transition_events(name: &str, reason: &str) -> Result<u64, Failure> {
    let selector = format!("involvedObject.name={name},reason={reason}");
    let list = kubectl_json(&[
        "-n",
        BACKENDS_NAMESPACE,
        "get",
        "events",
        "--field-selector",
        &selector,
    ])
    .await?;
    Ok(items(&list)
        .iter()
        .map(|e| {
            e["series"]["count"]
                .as_u64()
                .or(e["count"].as_u64())
                .unwrap_or(1)
                .max(1)
        })
        .sum())
}

/// Terminates `names` and waits until each is terminal.
async fn terminate_all(target: &Target, names: &[String]) -> Result<(), Failure> {
    for name in names {
        target.api.terminate(name).await?;
    }
    for name in names {
        let (events, _) = target
            .api
            .follow_phases_resuming(name, Duration::from_secs(120), |_| false)
            .await?;
        ensure(events.last().is_some_and(|e| e.phase.is_terminal()), || {
            format!("{name} after terminate: {:?}", client::phases(&events))
        })?;
    }
    Ok(())
}

/// Phases strictly increasing, so none came twice (the api's event ids are the phases).
fn each_phase_once(name: &str, events: &[client::PhaseEvent]) -> Result<(), Failure> {
    ensure(events.windows(2).all(|w| w[0].phase < w[1].phase), || {
        format!(
            "{name}: phases not each once, in order: {:?}",
            client::phases(events)
        )
    })
}

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

    // Which replica serves the stream is the Service's choice: delete the replicas one at a
    // time until the stream ends (deleting one whose pod is gone without ending it shows it was
    // not the one; the next is, after the first's replacement is up).
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
    timings.record("stream ended", start);
    if before.last().is_some_and(|(_, e)| e.phase.is_terminal()) {
        return Err(Failure::new(format!(
            "{name} ended before the api replica went: {:?}",
            before.iter().map(|(_, e)| e.phase).collect::<Vec<_>>()
        )));
    }

    // Reconnect as EventSource does, with the last id received; a replica may still be
    // starting, so the first attempts may be refused.
    let last_id = before
        .iter()
        .rev()
        .find_map(|(id, _)| id.clone())
        .ok_or_else(|| Failure::new(format!("{name}: phase events without ids")))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut resumed = loop {
        match target.api.open_stream(&name, Some(&last_id)).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(Failure::new(format!("{name}: reconnecting: {e}")));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    timings.record("reconnected", start);
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
                        target.api.terminate(&name).await?;
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

/// How a scenario takes a worker away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerLoss {
    /// `kubectl drain --delete-emptydir-data --ignore-daemonsets`, then `kubectl uncordon`.
    Drain,
    /// `kubectl delete node`; its pods go when pod garbage collection finds them orphaned
    /// (after its 40 s quarantine). Restored by restarting the node's kubelet (a kind node is a
    /// Docker container: `docker exec <node> systemctl restart kubelet`), which registers the
    /// Node again.
    Delete,
}

/// A worker is drained (`kubectl drain --delete-emptydir-data --ignore-daemonsets`): the
/// backends on it end Failed `Evicted`, and nothing of them is left (no pod, no Service, no
/// live backend); backends elsewhere are untouched. The worker drained is one the leading
/// controller does not run on, so the leader sees the evictions as they happen. The node is
/// uncordoned afterwards, whatever the outcome.
pub async fn worker_drained_backends_fail(target: &Target) -> Result<Timings, Failure> {
    lose_a_worker(target, WorkerLoss::Drain).await
}

/// A worker's Node is deleted (`kubectl delete node`): the backends on it end Failed `NodeLost`
/// (pod garbage collection marks their pods Failed with a DisruptionTarget condition, then
/// force-deletes them; `PodMissing` when the controller sees them only gone), nothing of them
/// is left, backends elsewhere are untouched. The node's kubelet is restarted afterwards, whatever the outcome, so its Node
/// comes back.
pub async fn worker_deleted_backends_fail(target: &Target) -> Result<Timings, Failure> {
    lose_a_worker(target, WorkerLoss::Delete).await
}

async fn lose_a_worker(target: &Target, loss: WorkerLoss) -> Result<Timings, Failure> {
    let mut timings = Timings::default();
    wait_spawner_rolled_out().await?;
    let leader = controller_leader().await?;
    let leader_pod = kubectl_json(&["-n", SYSTEM_NAMESPACE, "get", "pod", &leader]).await?;
    let leader_node = leader_pod["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let nodes = kubectl_json(&["get", "nodes"]).await?;
    let workers: Vec<String> = items(&nodes)
        .iter()
        .filter(|n| n["metadata"]["labels"]["node-role.kubernetes.io/control-plane"].is_null())
        .map(name_of)
        .collect();
    let node = workers
        .iter()
        .find(|w| **w != leader_node)
        .cloned()
        .ok_or_else(|| {
            Failure::new(format!(
                "no worker without the controller leader: {workers:?}"
            ))
        })?;

    let start = Instant::now();
    let mut names = Vec::new();
    let result = async {
        // Spawn until some backends run on the node to drain and some elsewhere (the scheduler
        // spreads them; a few tries are plenty).
        let mut on_node = Vec::new();
        let mut elsewhere = Vec::new();
        for _ in 0..4 {
            let request = target
                .apps
                .demo
                .request(json!({ "gracePeriodSeconds": 120 }));
            let spawned =
                futures::future::join_all((0..3).map(|_| target.api.spawn(&request))).await;
            for s in spawned {
                names.push(s?.name);
            }
            for name in names.iter().skip(on_node.len() + elsewhere.len()) {
                let (events, _) = target
                    .api
                    .follow_phases_resuming(name, target.ready_timeout, |p| p == Phase::Ready)
                    .await?;
                ensure(
                    events.last().is_some_and(|e| e.phase == Phase::Ready),
                    || format!("{name} never became Ready: {:?}", client::phases(&events)),
                )?;
                let status = target.api.status(name).await?;
                if status.node.as_deref() == Some(node.as_str()) {
                    on_node.push(name.clone());
                } else {
                    elsewhere.push(name.clone());
                }
            }
            if !on_node.is_empty() {
                break;
            }
        }
        ensure(!on_node.is_empty(), || {
            format!("none of {names:?} was scheduled on {node}")
        })?;
        timings.record("backends Ready", start);

        let lost = Instant::now();
        let expected: &[&str] = match loss {
            WorkerLoss::Drain => {
                kubectl(&[
                    "drain",
                    &node,
                    "--delete-emptydir-data",
                    "--ignore-daemonsets",
                    "--timeout=240s",
                ])
                .await?;
                &[spawner_core::phase::EVICTED_REASON]
            }
            WorkerLoss::Delete => {
                kubectl(&["delete", "node", &node, "--wait=true"]).await?;
                &[spawner_core::phase::NODE_LOST_REASON, "PodMissing"]
            }
        };
        for name in &on_node {
            // Pod garbage collection waits 40 s before it removes a deleted node's pods.
            let (events, _) = target
                .api
                .follow_phases_resuming(name, Duration::from_secs(240), |_| false)
                .await?;
            let last = events
                .last()
                .ok_or_else(|| Failure::new(format!("{name}: no phase events")))?;
            ensure(
                last.phase == Phase::Failed
                    && last.reason.as_deref().is_some_and(|r| expected.contains(&r)),
                || {
                    format!(
                        "{name} on {node} ({loss:?}) ended {:?} ({:?}: {:?}), phases {:?}, expected Failed {expected:?}",
                        last.phase,
                        last.reason,
                        last.message,
                        client::phases(&events)
                    )
                },
            )?;
        }
        timings.record("node lost→backends Failed", lost);
        for name in &on_node {
            let status = target.api.status(name).await?;
            eprintln!("{name} on {node} ({loss:?}): Failed {:?}: {:?}", status.reason, status.message);
        }
        for name in &elsewhere {
            let status = target.api.status(name).await?;
            ensure(status.phase == Phase::Ready, || {
                format!(
                    "{name}, not on {node}, is {:?} after {node} was lost ({loss:?})",
                    status.phase
                )
            })?;
        }
        // Nothing of them left: their pods and Services are deleted.
        let gone_by = Instant::now() + Duration::from_secs(120);
        loop {
            let pods = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "pods"]).await?;
            let services = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "services"]).await?;
            let left: BTreeSet<String> = items(&pods)
                .iter()
                .chain(items(&services))
                .map(name_of)
                .filter(|n| on_node.contains(n))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= gone_by {
                return Err(Failure::new(format!(
                    "pods or Services of the backends on {node} still exist: {left:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok::<(), Failure>(())
    }
    .await;
    let restored = restore_worker(&node, loss).await;
    let cleanup = terminate_all(target, &names).await;
    result?;
    restored?;
    cleanup?;
    // No backend of this scenario is left live.
    let slabs = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "slab"]).await?;
    let live: Vec<String> = items(&slabs)
        .iter()
        .filter(|s| names.contains(&name_of(s)))
        .filter(|s| {
            !s["status"]["phase"]
                .as_str()
                .and_then(|p| serde_json::from_value::<Phase>(json!(p)).ok())
                .is_some_and(Phase::is_terminal)
        })
        .map(name_of)
        .collect();
    ensure(live.is_empty(), || {
        format!("backends still live after {node} was lost ({loss:?}): {live:?}")
    })?;
    wait_spawner_rolled_out().await?;
    timings.record("total", start);
    Ok(timings)
}

/// Makes `node` a schedulable, Ready worker again after `loss`.
async fn restore_worker(node: &str, loss: WorkerLoss) -> Result<(), Failure> {
    match loss {
        WorkerLoss::Drain => {
            kubectl(&["uncordon", node]).await?;
        }
        WorkerLoss::Delete => {
            let output = tokio::time::timeout(
                KUBECTL_TIMEOUT,
                Command::new("docker")
                    .args(["exec", node, "systemctl", "restart", "kubelet"])
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| Failure::new(format!("restarting the kubelet of {node}: timed out")))?
            .map_err(|e| Failure::new(format!("docker exec {node}: {e}")))?;
            ensure(output.status.success(), || {
                format!(
                    "restarting the kubelet of {node}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )
            })?;
            // The kubelet registers its Node again; then it must become Ready.
            let deadline = Instant::now() + Duration::from_secs(180);
            while kubectl(&["get", "node", node]).await.is_err() {
                if Instant::now() >= deadline {
                    return Err(Failure::new(format!("{node} did not register again")));
                }
                tokio::time::sleep(POLL).await;
            }
            kubectl(&[
                "wait",
                "--for=condition=Ready",
                &format!("node/{node}"),
                "--timeout=180s",
            ])
            .await?;
            for daemonset in ["ds/kube-proxy", "ds/spawner-kind-cni"] {
                // kind's published node image has kindnet instead of our CNI DaemonSet.
                if kubectl(&["-n", "kube-system", "get", daemonset])
                    .await
                    .is_ok()
                {
                    kubectl(&[
                        "-n",
                        "kube-system",
                        "rollout",
                        "status",
                        daemonset,
                        &format!("--timeout={ROLLOUT_TIMEOUT}"),
                    ])
                    .await?;
                }
            }
        }
    }
    wait_spawner_rolled_out().await
}
