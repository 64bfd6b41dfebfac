//! Node registration and heartbeats, as the kubelet does them: a Node object with capacity,
//! addresses and a Ready condition, and a Lease in `kube-node-lease` renewed every few seconds
//! (what the node lifecycle controller watches), with the Ready condition's heartbeat time
//! refreshed less often.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// Namespace of node heartbeat leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Label naming the agent kind on its nodes.
pub const NODE_AGENT_LABEL: &str = "spawner.dev/node-agent";

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub host_ip: String,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
}

fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl NodeSettings {
    /// The node's labels: the configured ones plus the well-known ones the kubelet sets.
    pub fn all_labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), self.name.clone()),
            (
                "kubernetes.io/os".to_string(),
                std::env::consts::OS.to_string(),
            ),
            ("kubernetes.io/arch".to_string(), architecture().to_string()),
            (NODE_AGENT_LABEL.to_string(), "process".to_string()),
        ]);
        labels.extend(self.labels.clone());
        labels
    }

    /// The node's status: capacity, addresses, system info and conditions.
    pub fn status(&self, ready: bool, message: &str, now: Timestamp) -> serde_json::Value {
        let time = serde_json::to_value(Time(now)).unwrap_or_default();
        let pressure = |type_: &str, reason: &str| {
            json!({"type": type_, "status": "False", "reason": reason,
                   "lastHeartbeatTime": time, "lastTransitionTime": time})
        };
        let capacity = json!({
            "cpu": self.cpu, "memory": self.memory, "pods": self.max_pods.to_string(),
        });
        json!({
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                pressure("MemoryPressure", "KubeletHasSufficientMemory"),
                pressure("DiskPressure", "KubeletHasNoDiskPressure"),
                pressure("PIDPressure", "KubeletHasSufficientPID"),
                {
                    "type": "Ready",
                    "status": if ready { "True" } else { "False" },
                    "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
                    "message": message,
                    "lastHeartbeatTime": time,
                    "lastTransitionTime": time,
                },
            ],
            "nodeInfo": {
                "architecture": architecture(),
                "bootID": "",
                "containerRuntimeVersion": "spawner-process://1",
                "kernelVersion": "",
                "kubeProxyVersion": "",
                "kubeletVersion": concat!("v", env!("CARGO_PKG_VERSION"), "-spawner"),
                "machineID": "",
                "operatingSystem": std::env::consts::OS,
                "osImage": "Spawner node agent (process mode)",
                "systemUUID": "",
            },
        })
    }
}

/// Create the node (or take over an existing one of that name) and mark it Ready.
/// Returns the node's uid, which owns its lease.
pub async fn register(
    client: &Client,
    settings: &NodeSettings,
    now: Timestamp,
) -> Result<String, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": settings.name, "labels": settings.all_labels()},
        "spec": {},
    }))
    .map_err(kube::Error::SerdeError)?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let labels = json!({"metadata": {"labels": settings.all_labels()}});
            nodes
                .patch(
                    &settings.name,
                    &PatchParams::default(),
                    &Patch::Merge(&labels),
                )
                .await?;
        }
        Err(e) => return Err(e),
    }
    let status =
        json!({"status": settings.status(true, "node agent is posting ready status", now)});
    let node = nodes
        .patch_status(
            &settings.name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(node.metadata.uid.unwrap_or_default())
}

/// Refresh the Ready condition (and its heartbeat time).
pub async fn post_node_status(
    client: &Client,
    settings: &NodeSettings,
    ready: bool,
    message: &str,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({"status": settings.status(ready, message, now)});
    nodes
        .patch_status(
            &settings.name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == code)
}

/// Renew the node's lease, creating it (and its namespace, if the server has none) first.
pub async fn renew_lease(
    client: &Client,
    node_name: &str,
    node_uid: &str,
    duration: Duration,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    let renew = json!({"spec": {
        "holderIdentity": node_name,
        "leaseDurationSeconds": seconds,
        "renewTime": MicroTime(now),
    }});
    match leases
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&renew))
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) if is_status(&e, 404) => {}
        Err(e) => return Err(e),
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(node_name.into()),
            namespace: Some(NODE_LEASE_NAMESPACE.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node_name.into(),
                uid: node_uid.into(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: serde_json::from_value(renew["spec"].clone()).map_err(kube::Error::SerdeError)?,
    };
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 409) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            let namespaces: Api<Namespace> = Api::all(client.clone());
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(NODE_LEASE_NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match namespaces.create(&PostParams::default(), &namespace).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(e),
            }
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_status_is_a_valid_kubernetes_node_status() {
        let settings = NodeSettings {
            name: "n1".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            host_ip: "127.0.0.1".into(),
            cpu: "2".into(),
            memory: "1Gi".into(),
            max_pods: 10,
        };
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let status: k8s_openapi::api::core::v1::NodeStatus =
            serde_json::from_value(settings.status(true, "ok", now)).expect("parses as NodeStatus");
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(status.capacity.unwrap()["pods"].0, "10");
        assert_eq!(settings.all_labels()["kubernetes.io/hostname"], "n1");
        assert_eq!(settings.all_labels()["zone"], "a");
    }
}
