//! A worker drained or its Node deleted: its backends fail with why, nothing of them is left.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use spawner_core::Phase;
use tokio::process::Command;

use super::super::client;
use super::super::{Failure, Target, Timings, ensure};
use super::cluster::{
    BACKENDS_NAMESPACE, KUBECTL_TIMEOUT, POLL, ROLLOUT_TIMEOUT, SYSTEM_NAMESPACE,
    controller_leader, items, kubectl, kubectl_json, name_of, wait_spawner_rolled_out,
};
use super::terminate_all;

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
    let node = worker_without_the_leader().await?;
    let start = Instant::now();
    let mut names = Vec::new();
    let result = async {
        let (on_node, elsewhere) = spawn_until_one_is_on(target, &node, &mut names).await?;
        timings.record("backends Ready", start);
        let lost = Instant::now();
        let expected = take_away(&node, loss).await?;
        for name in &on_node {
            expect_failed_with(target, name, &node, loss, expected).await?;
        }
        timings.record("node lost→backends Failed", lost);
        for name in &elsewhere {
            let status = target.api.status(name).await?;
            ensure(status.phase == Phase::Ready, || {
                format!(
                    "{name}, not on {node}, is {:?} after {node} was lost ({loss:?})",
                    status.phase
                )
            })?;
        }
        wait_until_nothing_left(&node, &on_node).await
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

/// A worker the leading controller does not run on, so the leader sees the loss as it happens.
async fn worker_without_the_leader() -> Result<String, Failure> {
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
    workers
        .iter()
        .find(|w| **w != leader_node)
        .cloned()
        .ok_or_else(|| {
            Failure::new(format!(
                "no worker without the controller leader: {workers:?}"
            ))
        })
}

/// Spawns until some Ready backends run on `node` and some elsewhere (the scheduler spreads
/// them; a few tries are plenty); every name spawned goes into `names`, for the clean-up.
/// The backends on `node`, and the others.
async fn spawn_until_one_is_on(
    target: &Target,
    node: &str,
    names: &mut Vec<String>,
) -> Result<(Vec<String>, Vec<String>), Failure> {
    let mut on_node = Vec::new();
    let mut elsewhere = Vec::new();
    for _ in 0..4 {
        let request = target
            .apps
            .demo
            .request(json!({ "gracePeriodSeconds": 120 }));
        let spawned = futures::future::join_all((0..3).map(|_| target.api.spawn(&request))).await;
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
            if status.node.as_deref() == Some(node) {
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
    Ok((on_node, elsewhere))
}

/// Takes `node` away; the reasons its backends may end Failed with.
async fn take_away(node: &str, loss: WorkerLoss) -> Result<&'static [&'static str], Failure> {
    Ok(match loss {
        WorkerLoss::Drain => {
            kubectl(&[
                "drain",
                node,
                "--delete-emptydir-data",
                "--ignore-daemonsets",
                "--timeout=240s",
            ])
            .await?;
            &[spawner_core::phase::EVICTED_REASON]
        }
        WorkerLoss::Delete => {
            kubectl(&["delete", "node", node, "--wait=true"]).await?;
            &[spawner_core::phase::NODE_LOST_REASON, "PodMissing"]
        }
    })
}

/// Waits for backend `name`, which ran on the lost `node`, to end Failed with one of
/// `expected`, and prints the reason it gave.
async fn expect_failed_with(
    target: &Target,
    name: &str,
    node: &str,
    loss: WorkerLoss,
    expected: &[&str],
) -> Result<(), Failure> {
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
            && last
                .reason
                .as_deref()
                .is_some_and(|r| expected.contains(&r)),
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
    eprintln!(
        "{name} on {node} ({loss:?}): Failed {:?}: {:?}",
        last.reason, last.message
    );
    Ok(())
}

/// Waits until nothing of the backends `on_node` is left: their pods and Services deleted.
async fn wait_until_nothing_left(node: &str, on_node: &[String]) -> Result<(), Failure> {
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
            return Ok(());
        }
        if Instant::now() >= gone_by {
            return Err(Failure::new(format!(
                "pods or Services of the backends on {node} still exist: {left:?}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
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
