//! The simulator's pod runtime for the production node agent: every node owns a pool of
//! "slot" hosts, and each pod runs on a free slot — its sidecar (the production
//! `spawner-sidecar`) on the slot's address at the sidecar port, its application (the sim's echo
//! server) on the same host. A slot is reused when its pod ends, which keeps the number of
//! turmoil hosts in the tens (turmoil's cost per step grows with hosts) while every pod still
//! has an address of its own, as in a cluster.
//!
//! Slot hosts are created by the world builder (turmoil hosts can only be added from the sim
//! loop); the runtime talks to them through channels, and the host runs the pod's tasks so that
//! crashing the node's hosts kills its pods' sidecars and applications with it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use spawner_node_agent::{
    ContainerExit, ContainerPlan, ContainerRun, ContainerStart, PodRuntime, PodSandbox,
    ProbeTarget, RunningPod, RuntimeError, SandboxRequest,
};
use spawner_sidecar::SidecarHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::net::{SimListener, SimSidecarConnector};

/// First argument of a container command that runs the sim's echo application.
pub const APP_COMMAND: &str = "sim-app";
/// First argument of a container command that exits at once with the code in its second.
pub const CRASH_COMMAND: &str = "sim-crash";
/// An argument of [`APP_COMMAND`]: `exit-after-ms=N` makes the app crash N ms after it started
/// (exit code [`APP_CRASH_CODE`]), ending its WebSockets.
pub const APP_EXIT_AFTER: &str = "exit-after-ms=";
/// The exit code of an app that crashed on purpose.
pub const APP_CRASH_CODE: i32 = 3;
/// Port the application listens on in its slot.
pub const APP_PORT: u16 = 8080;
/// How long a new pod waits for a slot whose pod is stopping: longer than a pod's default
/// termination grace period (30 s), after which a stopping pod's slot is released whatever
/// its containers do.
const SLOT_WAIT: Duration = Duration::from_secs(35);
/// How often a waiting pod looks for a released slot.
const SLOT_POLL: Duration = Duration::from_millis(20);

/// Sidecars by pod name (`namespace/name`), for the invariant checker.
#[derive(Clone, Default)]
pub struct SidecarRegistry(Arc<Mutex<BTreeMap<String, RegisteredSidecar>>>);

/// A sidecar's handle, and a token that is gone once its slot host crashed.
type RegisteredSidecar = (SidecarHandle, Weak<()>);

impl SidecarRegistry {
    /// `host_alive` is gone once the slot host running the sidecar crashed: its connections
    /// died with it, whatever the handle last said.
    fn insert(&self, pod: String, handle: SidecarHandle, host_alive: Weak<()>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod, (handle, host_alive));
    }

    /// Forgets the sidecar of `pod` (its backend is gone), so observing stays proportional to
    /// the backends alive.
    pub fn remove(&self, pod: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(pod);
    }

    /// Live connections reported by each pod's sidecar.
    pub fn live(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(pod, (h, alive))| {
                let live = match alive.upgrade() {
                    // The monitor's atomic count, not the coalesced snapshot: exact after every step.
                    Some(_) => h.state().live_connections,
                    None => 0,
                };
                (pod.clone(), live)
            })
            .collect()
    }
}

struct StartPod {
    pod: String,
    containers: Vec<ContainerPlan>,
    exits: mpsc::UnboundedSender<ContainerExit>,
    stops: Vec<CancellationToken>,
    reply: oneshot::Sender<Vec<ContainerStart>>,
}

struct Slot {
    ip: IpAddr,
    busy: bool,
    /// The pod (`namespace/name`) holding the slot, while busy.
    pod: Option<String>,
    /// Its pod is being stopped: the slot is free once its containers have exited (within the
    /// pod's grace period).
    stopping: bool,
    /// Sender into the slot host's current incarnation (replaced when the host restarts).
    commands: Option<mpsc::UnboundedSender<StartPod>>,
}

/// The slots of one node; shared by its runtime and its slot hosts.
#[derive(Clone, Default)]
pub struct SlotPool {
    slots: Arc<Mutex<Vec<Slot>>>,
    sidecars: SidecarRegistry,
    /// Mutant: an app's crash is never reported (the pod looks running with its app dead).
    hide_app_crashes: bool,
}

impl SlotPool {
    pub fn new(sidecars: SidecarRegistry) -> Self {
        Self {
            slots: Arc::default(),
            sidecars,
            hide_app_crashes: false,
        }
    }

    /// The pool with the mutant that never reports an app's crash.
    pub fn hiding_app_crashes(mut self) -> Self {
        self.hide_app_crashes = true;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a slot and returns its index; call from the world builder.
    pub fn add_slot(&self) -> usize {
        let mut slots = self.lock();
        slots.push(Slot {
            ip: IpAddr::from([0, 0, 0, 0]),
            busy: false,
            pod: None,
            stopping: false,
            commands: None,
        });
        slots.len() - 1
    }

    /// Marks slot `index` as held by a pod that is being stopped.
    fn mark_stopping(&self, index: usize) {
        if let Some(slot) = self.lock().get_mut(index) {
            slot.stopping = true;
        }
    }

    /// Frees slot `index` (its pod's containers are gone).
    fn release(&self, index: usize) {
        if let Some(slot) = self.lock().get_mut(index) {
            slot.busy = false;
            slot.pod = None;
            slot.stopping = false;
        }
    }

    /// The body of slot host `index`, named `host`: serves pods sent to it until the host is
    /// crashed.
    pub async fn run_slot(self, index: usize, host: String) -> turmoil::Result {
        let (tx, mut rx) = mpsc::unbounded_channel();
        {
            let mut slots = self.lock();
            let slot = &mut slots[index];
            slot.ip = turmoil::lookup(host.as_str());
            slot.commands = Some(tx);
        }
        // Dropped with this future when the host crashes.
        let alive = Arc::new(());
        while let Some(start) = rx.recv().await {
            let starts = run_pod(
                &self.sidecars,
                self.hide_app_crashes,
                Arc::downgrade(&alive),
                start.pod,
                start.containers,
                start.exits,
                start.stops,
            )
            .await;
            let _ = start.reply.send(starts);
        }
        Ok(())
    }
}

async fn run_pod(
    sidecars: &SidecarRegistry,
    hide_app_crashes: bool,
    host_alive: Weak<()>,
    pod: String,
    containers: Vec<ContainerPlan>,
    exits: mpsc::UnboundedSender<ContainerExit>,
    stops: Vec<CancellationToken>,
) -> Vec<ContainerStart> {
    let mut starts = Vec::new();
    for (index, (container, stop)) in containers.into_iter().zip(stops).enumerate() {
        let exits = exits.clone();
        let id = format!("sim://{pod}/{}", container.name);
        let report = move |exit_code: i32, message: Option<String>| {
            let _ = exits.send(ContainerExit {
                index,
                exit_code,
                signal: None,
                message,
            });
        };
        match container.run {
            ContainerRun::Sidecar(plan) => {
                let listener = match SimListener::bind(("0.0.0.0", plan.serve_port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        starts.push(ContainerStart::Failed {
                            message: format!("sidecar cannot listen: {e}"),
                        });
                        continue;
                    }
                };
                let config = spawner_sidecar::SidecarConfig {
                    events_token: Some(plan.events_token).filter(|t| !t.is_empty()),
                    ..spawner_sidecar::SidecarConfig::new(format!(
                        "127.0.0.1:{}",
                        plan.upstream_port
                    ))
                };
                match spawner_sidecar::run_with_handle(
                    listener,
                    SimSidecarConnector,
                    config,
                    stop.clone().cancelled_owned(),
                ) {
                    Ok((handle, serve)) => {
                        sidecars.insert(pod.clone(), handle, host_alive.clone());
                        tokio::spawn(async move {
                            let code = if serve.await.is_ok() { 0 } else { 1 };
                            report(code, None);
                        });
                        starts.push(ContainerStart::Running { id });
                    }
                    Err(e) => starts.push(ContainerStart::Failed {
                        message: e.to_string(),
                    }),
                }
            }
            ContainerRun::Process { argv, env, .. } => match argv.first().map(String::as_str) {
                Some(APP_COMMAND) => {
                    let start = start_app(&argv, &env, stop, hide_app_crashes, report, id).await;
                    starts.push(start.unwrap_or_else(|message| ContainerStart::Failed { message }));
                }
                Some(CRASH_COMMAND) => {
                    let code = argv.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        report(code, Some("crashed on purpose".into()));
                    });
                    starts.push(ContainerStart::Running { id });
                }
                _ => starts.push(ContainerStart::Failed {
                    message: format!("the simulator cannot run {argv:?}"),
                }),
            },
        }
    }
    starts
}

/// Starts the sim's echo app (`APP_COMMAND`) on `PORT`, named after its backend; with
/// `exit-after-ms=N` it crashes N ms later (reported unless the mutant hides it).
async fn start_app(
    argv: &[String],
    env: &[(String, String)],
    stop: CancellationToken,
    hide_app_crashes: bool,
    report: impl FnOnce(i32, Option<String>) + Send + 'static,
    id: String,
) -> Result<ContainerStart, String> {
    let port = env
        .iter()
        .find(|(k, _)| k == "PORT")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(APP_PORT);
    let backend = env
        .iter()
        .find(|(k, _)| k == spawner_core::children::BACKEND_NAME_ENV)
        .map_or("", |(_, v)| v.as_str());
    let exit_after = argv
        .iter()
        .find_map(|a| a.strip_prefix(APP_EXIT_AFTER))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    let killed = CancellationToken::new();
    let app = crate::app::router(backend, killed.clone());
    let listener = SimListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| format!("cannot listen on {port}: {e}"))?;
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        let ended = |r: std::io::Result<()>| if r.is_ok() { 143 } else { 1 };
        let Some(after) = exit_after else {
            report(ended(serve.await), None);
            return;
        };
        tokio::select! {
            r = serve => report(ended(r), None),
            () = tokio::time::sleep(after) => {
                // Crashed: the listener goes with `serve`, the WebSockets with `killed`.
                killed.cancel();
                if !hide_app_crashes {
                    report(APP_CRASH_CODE, Some("crashed on purpose".into()));
                }
            }
        }
    });
    Ok(ContainerStart::Running { id })
}

/// What a pod was given by [`SlotRuntime::create_sandbox`].
pub struct SlotSandbox {
    index: usize,
    ip: IpAddr,
    pod: String,
    wants_app_port: bool,
}

impl PodSandbox for SlotSandbox {
    fn pod_ip(&self) -> IpAddr {
        self.ip
    }

    fn app_port(&self) -> Option<u16> {
        self.wants_app_port.then_some(APP_PORT)
    }
}

/// The node agent's runtime for one node.
#[derive(Clone)]
pub struct SlotRuntime {
    pool: SlotPool,
}

impl SlotRuntime {
    pub fn new(pool: SlotPool) -> Self {
        Self { pool }
    }
}

/// A pod running on a slot.
pub struct SlotPod {
    pool: SlotPool,
    index: usize,
    ip: IpAddr,
    starts: Vec<ContainerStart>,
    exits: mpsc::UnboundedReceiver<ContainerExit>,
    stops: Vec<CancellationToken>,
    /// Exits not yet returned by `next_exit`.
    outstanding: usize,
    /// Exits received while stopping, returned by `next_exit` first.
    pending: std::collections::VecDeque<ContainerExit>,
    stopped: Vec<bool>,
}

impl PodRuntime for SlotRuntime {
    type Sandbox = SlotSandbox;
    type Pod = SlotPod;

    async fn create_sandbox(&self, request: SandboxRequest) -> Result<SlotSandbox, RuntimeError> {
        let pod = format!("{}/{}", request.namespace, request.name);
        let give_up = tokio::time::Instant::now() + SLOT_WAIT;
        loop {
            {
                let mut slots = self.pool.lock();
                let free = slots
                    .iter_mut()
                    .enumerate()
                    .find(|(_, s)| !s.busy && s.commands.as_ref().is_some_and(|c| !c.is_closed()));
                if let Some((index, slot)) = free {
                    slot.busy = true;
                    slot.pod = Some(pod.clone());
                    return Ok(SlotSandbox {
                        index,
                        ip: slot.ip,
                        pod,
                        wants_app_port: request.wants_app_port,
                    });
                }
                // The node agent counts a pod's capacity as free once the pod is gone from
                // the API server, which can come before its containers have stopped (a pod
                // removed without graceful deletion is stopped after it is gone): wait for
                // such a slot rather than fail the pod.
                let releasing = slots.iter().any(|s| s.busy && s.stopping);
                if !releasing || tokio::time::Instant::now() >= give_up {
                    let holders: Vec<_> = slots.iter().filter_map(|s| s.pod.clone()).collect();
                    return Err(RuntimeError::NoAddress(format!(
                        "all {} simulated pod slots of this node are in use (by {})",
                        slots.len(),
                        holders.join(", ")
                    )));
                }
            }
            tokio::time::sleep(SLOT_POLL).await;
        }
    }

    async fn start(&self, sandbox: SlotSandbox, containers: Vec<ContainerPlan>) -> SlotPod {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let stops: Vec<_> = containers
            .iter()
            .map(|_| CancellationToken::new())
            .collect();
        let count = containers.len();
        let (reply, answer) = oneshot::channel();
        let sent = self.pool.lock()[sandbox.index]
            .commands
            .as_ref()
            .map(|c| {
                c.send(StartPod {
                    pod: sandbox.pod.clone(),
                    containers,
                    exits: exits_tx,
                    stops: stops.clone(),
                    reply,
                })
                .is_ok()
            })
            .unwrap_or(false);
        let starts = match (sent, answer.await) {
            (true, Ok(starts)) => starts,
            _ => (0..count)
                .map(|_| ContainerStart::Failed {
                    message: "the pod's simulated host is down".into(),
                })
                .collect(),
        };
        let outstanding = starts
            .iter()
            .filter(|s| matches!(s, ContainerStart::Running { .. }))
            .count();
        SlotPod {
            pool: self.pool.clone(),
            index: sandbox.index,
            ip: sandbox.ip,
            stopped: starts
                .iter()
                .map(|s| !matches!(s, ContainerStart::Running { .. }))
                .collect(),
            starts,
            exits,
            stops,
            outstanding,
            pending: Default::default(),
        }
    }

    async fn probe(&self, target: ProbeTarget) -> bool {
        match target {
            ProbeTarget::Tcp {
                host,
                port,
                timeout,
            } => tokio::time::timeout(timeout, turmoil::net::TcpStream::connect((host, port)))
                .await
                .is_ok_and(|r| r.is_ok()),
            ProbeTarget::Http {
                host,
                port,
                path,
                timeout,
            } => tokio::time::timeout(timeout, http_probe(host, port, &path))
                .await
                .unwrap_or(false),
        }
    }
}

async fn http_probe(host: IpAddr, port: u16, path: &str) -> bool {
    let Ok(mut stream) = turmoil::net::TcpStream::connect((host, port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    // "HTTP/1.1 2xx"
    head[9] == b'2'
}

impl SlotPod {
    fn mark_stopped(&mut self, exit: &ContainerExit) {
        if let Some(s) = self.stopped.get_mut(exit.index) {
            *s = true;
        }
    }

    async fn stop_indices(&mut self, indices: Vec<usize>, grace: Duration) {
        for &i in &indices {
            if let Some(stop) = self.stops.get(i) {
                stop.cancel();
            }
        }
        // Tasks stop at their next await; give them the grace period to report.
        let deadline = tokio::time::Instant::now() + grace.max(Duration::from_millis(10));
        while indices
            .iter()
            .any(|&i| !self.stopped.get(i).copied().unwrap_or(true))
        {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some(exit)) => {
                    self.mark_stopped(&exit);
                    self.pending.push_back(exit);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

impl RunningPod for SlotPod {
    fn pod_ip(&self) -> IpAddr {
        self.ip
    }

    fn starts(&self) -> &[ContainerStart] {
        &self.starts
    }

    async fn next_exit(&mut self) -> Option<ContainerExit> {
        if self.outstanding == 0 {
            return None;
        }
        let exit = match self.pending.pop_front() {
            Some(exit) => exit,
            None => self.exits.recv().await?,
        };
        self.mark_stopped(&exit);
        self.outstanding -= 1;
        Some(exit)
    }

    fn stop_container(
        &mut self,
        index: usize,
        grace: Duration,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.stop_indices(vec![index], grace)
    }

    fn stop_all(&mut self, grace: Duration) -> impl std::future::Future<Output = ()> + Send {
        self.pool.mark_stopping(self.index);
        let all = (0..self.stops.len()).collect();
        self.stop_indices(all, grace)
    }
}

impl Drop for SlotPod {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
        self.pool.release(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> SandboxRequest {
        SandboxRequest {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            listen_ports: vec![9090],
            wants_app_port: true,
        }
    }

    /// A pool of one slot whose host is up (its command channel open).
    fn one_slot() -> (SlotPool, SlotRuntime, mpsc::UnboundedReceiver<StartPod>) {
        let pool = SlotPool::new(SidecarRegistry::default());
        let index = pool.add_slot();
        let (tx, rx) = mpsc::unbounded_channel();
        pool.lock()[index].commands = Some(tx);
        (pool.clone(), SlotRuntime::new(pool), rx)
    }

    #[tokio::test]
    async fn a_new_pod_waits_for_a_slot_whose_pod_is_stopping() {
        let (pool, runtime, _host) = one_slot();
        let first = runtime.create_sandbox(request("a")).await.expect("free");
        pool.mark_stopping(first.index);
        let waiting = tokio::spawn({
            let runtime = runtime.clone();
            async move { runtime.create_sandbox(request("b")).await }
        });
        tokio::time::sleep(SLOT_POLL * 5).await;
        assert!(!waiting.is_finished(), "waits while the old pod stops");
        pool.release(first.index);
        let second = waiting.await.expect("task").expect("the released slot");
        assert_eq!(second.index, first.index);
        assert_eq!(second.pod, "default/b");
    }

    #[tokio::test]
    async fn a_full_node_with_nothing_stopping_fails_the_pod_at_once() {
        let (_pool, runtime, _host) = one_slot();
        runtime.create_sandbox(request("a")).await.expect("free");
        let error = match runtime.create_sandbox(request("b")).await {
            Ok(_) => panic!("no slot is free"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("in use (by default/a)"), "{error}");
    }
}
