//! The boundary between the agent (which talks to the API server and decides) and whatever runs
//! a pod's containers: local processes ([`super::process::ProcessRuntime`]) or, in the
//! simulator, tasks on turmoil hosts. The runtime owns all I/O of a pod: its address, its
//! processes or tasks, its listeners and its probes.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

/// What the agent asks of a runtime before it builds the containers' environment, like CRI's
/// `RunPodSandbox`: an address for the pod and, for a backend pod, a free port for its
/// application (the local-mode deviation from Kubernetes: apps bind `0.0.0.0:$PORT`, so two
/// apps on one machine need different ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Ports the pod listens on at its own address (the sidecar's serve port); the runtime
    /// picks an address where all of them are free and keeps them reserved for the pod.
    pub listen_ports: Vec<u16>,
    /// Whether the pod's application needs a port of its own in `PORT`.
    pub wants_app_port: bool,
}

/// The network identity a runtime gave a pod.
pub trait PodSandbox: Send + 'static {
    fn pod_ip(&self) -> IpAddr;
    /// The application's port, when the request asked for one.
    fn app_port(&self) -> Option<u16>;
}

/// One container, fully resolved: the runtime runs exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPlan {
    pub name: String,
    pub run: ContainerRun,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerRun {
    /// A local process: `argv[0]` with `argv[1..]`, in its own process group.
    Process {
        argv: Vec<String>,
        /// The container's environment, in order, after `$(VAR)` expansion. The process also
        /// inherits the agent's environment (PATH, HOME ...) underneath these.
        env: Vec<(String, String)>,
        working_dir: Option<String>,
    },
    /// The Spawner sidecar, run in-process on the pod's address.
    Sidecar(SidecarPlan),
}

/// The injected sidecar container, recognised by its name and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarPlan {
    /// Port the sidecar serves on at the pod's address.
    pub serve_port: u16,
    /// Port of the application, on the loopback address of the machine (or simulated host).
    pub upstream_port: u16,
    /// Token the event stream requires.
    pub events_token: String,
    /// The container's whole environment, for settings beyond the three above.
    pub env: Vec<(String, String)>,
}

/// How a container's start went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerStart {
    /// Running; `id` is what `containerStatuses[].containerID` shows.
    Running { id: String },
    /// Could not start (command not found, port in use ...); kubelet reports `StartError`.
    Failed { message: String },
}

/// A container that stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerExit {
    /// Index of the container in the plan list given to [`PodRuntime::start`].
    pub index: usize,
    /// Exit code, `128 + signal` when a signal ended it (as container runtimes report).
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub message: Option<String>,
}

/// A readiness check the runtime performs from the node's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    Http {
        host: IpAddr,
        port: u16,
        path: String,
        timeout: Duration,
    },
    Tcp {
        host: IpAddr,
        port: u16,
        timeout: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no free pod address: {0}")]
    NoAddress(String),
    #[error("{0}")]
    Other(String),
}

/// Runs pods. One value serves every pod of an agent; it is shared between pod workers.
pub trait PodRuntime: Send + Sync + 'static {
    type Sandbox: PodSandbox;
    type Pod: RunningPod;

    /// Give a pod its address (and application port). Fails only when no address is left.
    fn create_sandbox(
        &self,
        request: SandboxRequest,
    ) -> impl Future<Output = Result<Self::Sandbox, RuntimeError>> + Send;

    /// Start `containers` (in order) in `sandbox`. Never fails as a whole: each container's
    /// outcome is in [`RunningPod::starts`], so one container that cannot start is reported
    /// like the kubelet reports it while the others run.
    fn start(
        &self,
        sandbox: Self::Sandbox,
        containers: Vec<ContainerPlan>,
    ) -> impl Future<Output = Self::Pod> + Send;

    /// One readiness probe: `true` when it succeeded within its timeout.
    fn probe(&self, target: ProbeTarget) -> impl Future<Output = bool> + Send;
}

/// A started pod. Dropping it must not leave anything running.
pub trait RunningPod: Send + 'static {
    fn pod_ip(&self) -> IpAddr;

    /// How each container's start went, in plan order.
    fn starts(&self) -> &[ContainerStart];

    /// The next container that stopped running; `None` once every started container has
    /// stopped and been reported. Cancellation safe.
    fn next_exit(&mut self) -> impl Future<Output = Option<ContainerExit>> + Send;

    /// Stop one container: SIGTERM (or cancellation), then SIGKILL after `grace`. Returns once
    /// it has stopped; its exit is then available from [`RunningPod::next_exit`].
    fn stop_container(&mut self, index: usize, grace: Duration) -> impl Future<Output = ()> + Send;

    /// Stop every container as [`RunningPod::stop_container`] does, all at once.
    fn stop_all(&mut self, grace: Duration) -> impl Future<Output = ()> + Send;
}
