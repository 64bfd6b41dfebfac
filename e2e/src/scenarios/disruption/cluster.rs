//! The cluster through `kubectl`: Spawner's pods, the controller's Lease, backends' pods by
//! owner, Kubernetes Events, and waiting for Spawner's workloads to be rolled out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::Failure;

/// Where Spawner runs (deploy/base).
pub(super) const SYSTEM_NAMESPACE: &str = "spawner-system";
/// Where backends run (deploy/base).
pub(super) const BACKENDS_NAMESPACE: &str = "spawner-backends";
/// The controller's Lease (`--lease-name`).
pub(super) const CONTROLLER_LEASE: &str = "spawner-controller";
/// Longest wait for one `kubectl` command (a drain waits for evictions; it has its own timeout).
pub(super) const KUBECTL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a Deployment or DaemonSet to be rolled out again after a disruption.
pub(super) const ROLLOUT_TIMEOUT: &str = "300s";
/// Interval between looks at the cluster while waiting for a state (polling, not timing).
pub(super) const POLL: Duration = Duration::from_millis(500);

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

pub(super) async fn kubectl_json(args: &[&str]) -> Result<Value, Failure> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = kubectl(&all).await?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::new(format!("kubectl {}: not JSON: {e}", args.join(" "))))
}

pub(super) fn items(list: &Value) -> &[Value] {
    list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

pub(super) fn name_of(object: &Value) -> String {
    object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The names of the pods in `namespace` with label `app.kubernetes.io/name=<app>`, optionally
/// only those on `node`, not being deleted.
pub(super) async fn pods_of(
    namespace: &str,
    app: &str,
    node: Option<&str>,
) -> Result<Vec<Value>, Failure> {
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
pub(super) async fn controller_leader() -> Result<String, Failure> {
    let lease = kubectl_json(&["-n", SYSTEM_NAMESPACE, "get", "lease", CONTROLLER_LEASE]).await?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Failure::new(format!("lease {CONTROLLER_LEASE} has no holder: {lease}")))
}

/// Pods in the backends namespace per owning backend uid.
pub(super) async fn backend_pods_by_owner() -> Result<BTreeMap<String, Vec<String>>, Failure> {
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

pub(super) async fn backend_uid(name: &str) -> Result<String, Failure> {
    let slab = kubectl_json(&["-n", BACKENDS_NAMESPACE, "get", "slab", name]).await?;
    slab["metadata"]["uid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::new(format!("backend {name} has no uid")))
}

/// How many Kubernetes Events record `name` reaching `reason` (aggregated Events count their
/// repetitions).
pub(super) async fn transition_events(name: &str, reason: &str) -> Result<u64, Failure> {
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
