//! The node agent: a kubelet and scheduler for one machine, and a client of whatever API
//! server it is given (localcluster or a real kube-apiserver) through kube-rs only.
//!
//! It registers one or more Nodes (Ready condition, capacity, a Lease in `kube-node-lease`
//! renewed as heartbeat), binds pending pods to them through `pods/<name>/binding` (least
//! loaded or round robin), and runs every pod bound to them through a [`PodRuntime`]: local
//! processes plus the in-process sidecar with [`ProcessRuntime`], simulated hosts in the
//! simulator. Pod status is written as the kubelet writes it; graceful deletion stops the
//! containers (SIGTERM, SIGKILL after the grace period) before the object is deleted for
//! good, and stopping the agent stops every pod. See `docs/node-agent.md`.

mod agent;
pub mod clock;
mod keeper;
mod launch;
pub mod plan;
pub mod process;
pub mod registration;
pub mod runtime;
pub mod schedule;
pub mod sidecar;
pub mod status;
mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, SystemClock};
pub use process::{InProcessSidecar, ProcessPod, ProcessRuntime, ProcessRuntimeConfig};
pub use runtime::{
    ContainerExit, ContainerPlan, ContainerRun, ContainerStart, PodRuntime, PodSandbox,
    ProbeTarget, RunningPod, RuntimeError, SandboxRequest, SidecarPlan,
};
pub use schedule::SchedulingPolicy;
pub use sidecar::SpawnerSidecar;
pub use worker::{MESSAGE_NODE_SHUTDOWN, REASON_NODE_SHUTDOWN};

use registration::NodeSettings;

/// Command-line settings of the node agent (embeddable in the `spawner` CLI).
#[derive(clap::Args, Clone, Debug)]
pub struct NodeAgentArgs {
    /// Names of the nodes this agent registers and runs pods on.
    #[arg(
        long = "node",
        env = "SPAWNER_NODES",
        value_delimiter = ',',
        default_value = "localnode"
    )]
    pub nodes: Vec<String>,
    /// Extra labels of the nodes, `key=value`.
    #[arg(long = "node-label", env = "SPAWNER_NODE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,
    /// How pending pods are spread over the nodes.
    #[arg(long, env = "SPAWNER_SCHEDULING", value_enum, default_value_t = SchedulingPolicy::LeastLoaded)]
    pub scheduling: SchedulingPolicy,
    /// Do not schedule pods (another scheduler binds them to this agent's nodes).
    #[arg(long, env = "SPAWNER_NO_SCHEDULER")]
    pub no_scheduler: bool,
    /// The `spec.schedulerName` this agent schedules for.
    #[arg(
        long,
        env = "SPAWNER_SCHEDULER_NAME",
        default_value = "default-scheduler"
    )]
    pub scheduler_name: String,
    /// Pods per node.
    #[arg(long, env = "SPAWNER_MAX_PODS", default_value_t = 110)]
    pub max_pods: u32,
    /// CPU capacity each node reports (default: the machine's cores).
    #[arg(long, env = "SPAWNER_NODE_CPU")]
    pub cpu: Option<String>,
    /// Memory capacity each node reports.
    #[arg(long, env = "SPAWNER_NODE_MEMORY", default_value = "8Gi")]
    pub memory: String,
    /// Seconds between lease renewals.
    #[arg(long, env = "SPAWNER_HEARTBEAT_SECONDS", default_value_t = 10)]
    pub heartbeat_seconds: u64,
    /// Lease duration written to the node lease.
    #[arg(long, env = "SPAWNER_LEASE_DURATION_SECONDS", default_value_t = 40)]
    pub lease_duration_seconds: u64,
    /// Seconds between refreshes of the nodes' Ready condition.
    #[arg(long, env = "SPAWNER_NODE_STATUS_SECONDS", default_value_t = 60)]
    pub node_status_seconds: u64,
    /// Longest grace period given to a pod when the agent stops.
    #[arg(long, env = "SPAWNER_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// The first loopback address given to a pod.
    #[arg(long, env = "SPAWNER_FIRST_POD_IP", default_value = "127.1.0.1")]
    pub first_pod_ip: Ipv4Addr,
    /// Directory for the applications' stdout/stderr (default: the agent's log).
    #[arg(long, env = "SPAWNER_POD_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
}

fn parse_label(input: &str) -> Result<(String, String), String> {
    input
        .split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {input:?}"))
}

impl NodeAgentArgs {
    /// The agent's configuration, with the machine's clock.
    pub fn config(&self) -> NodeAgentConfig {
        NodeAgentConfig {
            nodes: self.nodes.clone(),
            node_labels: self.node_labels.iter().cloned().collect(),
            scheduling: (!self.no_scheduler).then_some(self.scheduling),
            scheduler_name: self.scheduler_name.clone(),
            max_pods: self.max_pods,
            cpu: self.cpu.clone().unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .to_string()
            }),
            memory: self.memory.clone(),
            heartbeat_interval: Duration::from_secs(self.heartbeat_seconds.max(1)),
            lease_duration: Duration::from_secs(self.lease_duration_seconds.max(1)),
            node_status_interval: Duration::from_secs(self.node_status_seconds.max(1)),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            ..NodeAgentConfig::default()
        }
    }

    /// The process runtime with the in-process Spawner sidecar.
    pub fn process_runtime(&self) -> ProcessRuntime<SpawnerSidecar> {
        ProcessRuntime::new(self.process_runtime_config(), SpawnerSidecar)
    }

    /// Settings of the process runtime.
    pub fn process_runtime_config(&self) -> ProcessRuntimeConfig {
        ProcessRuntimeConfig {
            first_pod_ip: self.first_pod_ip,
            log_dir: self.log_dir.clone(),
        }
    }
}

/// Configuration of the node agent.
#[derive(Clone)]
pub struct NodeAgentConfig {
    pub nodes: Vec<String>,
    pub node_labels: BTreeMap<String, String>,
    /// `None`: the agent does not schedule.
    pub scheduling: Option<SchedulingPolicy>,
    pub scheduler_name: String,
    pub max_pods: u32,
    pub cpu: String,
    pub memory: String,
    /// The nodes' address (`status.hostIP` of their pods).
    pub host_ip: IpAddr,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
    pub node_status_interval: Duration,
    pub shutdown_grace: Duration,
    pub clock: Arc<dyn Clock>,
}

impl Default for NodeAgentConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["localnode".into()],
            node_labels: BTreeMap::new(),
            scheduling: Some(SchedulingPolicy::LeastLoaded),
            scheduler_name: "default-scheduler".into(),
            max_pods: 110,
            cpu: "1".into(),
            memory: "8Gi".into(),
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            heartbeat_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            node_status_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for NodeAgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgentConfig")
            .field("nodes", &self.nodes)
            .field("scheduling", &self.scheduling)
            .field("host_ip", &self.host_ip)
            .finish_non_exhaustive()
    }
}

impl NodeAgentConfig {
    fn node_settings(&self) -> Vec<NodeSettings> {
        self.nodes
            .iter()
            .map(|name| NodeSettings {
                name: name.clone(),
                labels: self.node_labels.clone(),
                host_ip: self.host_ip.to_string(),
                cpu: self.cpu.clone(),
                memory: self.memory.clone(),
                max_pods: self.max_pods,
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeAgentError {
    #[error("the node agent needs at least one node name")]
    NoNodes,
}

/// Run the node agent until `shutdown` completes; then stop every pod it runs (each within
/// its grace period, capped by `config.shutdown_grace`), report them, mark its nodes not
/// ready, and return.
pub async fn run<R: PodRuntime>(
    client: kube::Client,
    config: NodeAgentConfig,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeAgentError> {
    agent::run(client, config, runtime, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: NodeAgentArgs,
    }

    #[test]
    fn arguments_parse_into_a_config() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "agent",
            "--node",
            "a,b",
            "--node-label",
            "zone=z1",
            "--scheduling",
            "round-robin",
            "--first-pod-ip",
            "127.9.0.1",
            "--heartbeat-seconds",
            "3",
        ])
        .expect("parses");
        let config = cli.agent.config();
        assert_eq!(config.nodes, vec!["a", "b"]);
        assert_eq!(
            config.node_labels.get("zone").map(String::as_str),
            Some("z1")
        );
        assert_eq!(config.scheduling, Some(SchedulingPolicy::RoundRobin));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(
            cli.agent.process_runtime_config().first_pod_ip,
            Ipv4Addr::new(127, 9, 0, 1)
        );

        let defaults = Cli::try_parse_from(["agent", "--no-scheduler"]).expect("parses");
        assert_eq!(defaults.agent.config().nodes, vec!["localnode"]);
        assert_eq!(defaults.agent.config().scheduling, None);
        assert!(Cli::try_parse_from(["agent", "--node-label", "novalue"]).is_err());
    }
}
