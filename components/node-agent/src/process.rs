//! The process runtime: each container is a local process in its own process group, and the
//! Spawner sidecar runs in-process on the pod's own loopback address.
//!
//! Pods get addresses `127.x.y.z` counted up from a configurable first address (Linux routes
//! all of 127.0.0.0/8 to the loopback interface, so nothing needs configuring). A backend's
//! application gets a free port in `PORT` because apps bind `0.0.0.0:$PORT`; its sidecar's
//! upstream points there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::keeper::GroupKeeper;
use super::launch;
use super::runtime::{
    ContainerExit, ContainerPlan, ContainerRun, ContainerStart, PodRuntime, PodSandbox,
    ProbeTarget, RunningPod, RuntimeError, SandboxRequest, SidecarPlan,
};

/// How long to wait for a process to disappear after SIGKILL before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How many addresses to try before declaring that none is free.
const ADDRESS_ATTEMPTS: u32 = 4096;

/// Runs the Spawner sidecar in-process for a pod. The process runtime hands it the listener
/// bound on the pod's address and the application's address; `shutdown` asks it to stop.
pub trait InProcessSidecar: Send + Sync + 'static {
    fn serve(
        &self,
        listener: TcpListener,
        upstream: SocketAddr,
        plan: SidecarPlan,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// Settings of the process runtime.
#[derive(Clone, Debug)]
pub struct ProcessRuntimeConfig {
    /// The first pod address; later ones count up from it within 127.0.0.0/8.
    pub first_pod_ip: Ipv4Addr,
    /// Where the applications' stdout and stderr go (`<namespace>_<pod>_<container>.log`);
    /// without it they go to the agent's tracing output.
    pub log_dir: Option<PathBuf>,
}

impl Default for ProcessRuntimeConfig {
    fn default() -> Self {
        Self {
            first_pod_ip: Ipv4Addr::new(127, 1, 0, 1),
            log_dir: None,
        }
    }
}

/// Runs pods as local processes; see the module documentation.
pub struct ProcessRuntime<S> {
    config: ProcessRuntimeConfig,
    next_ip: Mutex<u32>,
    sidecar: Arc<S>,
    /// Application ports handed to pods that still exist: a port is free when nothing listens
    /// on it, so until the app binds it, it could be handed out again to the next pod.
    app_ports: Arc<Mutex<HashSet<u16>>>,
    /// Where application ports come from, and the next one to try (see [`app_port_range`]).
    port_range: Option<(u16, u16)>,
    next_port: Mutex<u16>,
    /// Kills every container's process group if the agent dies (`keeper`); absent only if
    /// `sh` could not start.
    keeper: Option<Arc<GroupKeeper>>,
}

/// A random port of `(first, last)`: where a runtime starts walking the range, so two agents
/// on one machine (parallel tests, two `spawner dev`s) do not walk it in step.
fn random_port_in((first, last): (u16, u16)) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let span = u64::from(last - first) + 1;
    first + u16::try_from(random % span).unwrap_or(0)
}

/// Application ports are taken below the kernel's ephemeral range: a port found free there is
/// never given by the kernel to an outgoing connection (as its local port) in the moment
/// between the lease and the app's bind, which made an app fail at start with "address in
/// use" once in a few thousand spawns at 290 spawns/s (`just bench-spawn`). `None` (ports from
/// binding port 0) when the range cannot be read or leaves too little room below it.
fn app_port_range() -> Option<(u16, u16)> {
    const FIRST: u16 = 10_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (ephemeral_low > FIRST + 1_000).then(|| (FIRST, ephemeral_low - 1))
}

/// Whether nothing listens on `port`. Call it through [`launch::exclusive_of_starts`], so the
/// probe is closed for good when this returns.
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// An application port reserved for one pod until the pod is dropped.
struct PortLease {
    port: u16,
    leased: Arc<Mutex<HashSet<u16>>>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.leased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.port);
    }
}

/// How many ports the kernel may offer before one that no live pod holds is found.
const PORT_ATTEMPTS: usize = 64;

impl<S: InProcessSidecar> ProcessRuntime<S> {
    pub fn new(config: ProcessRuntimeConfig, sidecar: S) -> Self {
        let first = u32::from(config.first_pod_ip);
        let port_range = app_port_range();
        let keeper = match GroupKeeper::start() {
            Ok(keeper) => Some(Arc::new(keeper)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the process-group keeper: if the agent is killed, what its containers started lives on");
                None
            }
        };
        Self {
            config,
            next_ip: Mutex::new(first),
            sidecar: Arc::new(sidecar),
            app_ports: Arc::default(),
            port_range,
            next_port: Mutex::new(port_range.map_or(0, random_port_in)),
            keeper,
        }
    }

    /// The pid of the process-group keeper, if it runs.
    pub fn keeper_pid(&self) -> Option<u32> {
        self.keeper.as_ref().map(|k| k.pid())
    }

    /// The next port of the range that no live pod holds and nothing listens on.
    fn lease_from_range(&self, (first, last): (u16, u16)) -> Result<PortLease, RuntimeError> {
        let mut next = self.next_port.lock().unwrap_or_else(|e| e.into_inner());
        for _ in first..=last {
            let port = *next;
            *next = if port >= last { first } else { port + 1 };
            let mut leased = self.app_ports.lock().unwrap_or_else(|e| e.into_inner());
            if leased.contains(&port) || !launch::exclusive_of_starts(|| port_is_free(port)) {
                continue;
            }
            leased.insert(port);
            return Ok(PortLease {
                port,
                leased: self.app_ports.clone(),
            });
        }
        Err(RuntimeError::Other(format!(
            "no free application port in {first}-{last}"
        )))
    }

    /// A port no other process listens on and no live pod was given.
    fn lease_app_port(&self) -> Result<PortLease, RuntimeError> {
        if let Some(range) = self.port_range {
            return self.lease_from_range(range);
        }
        for _ in 0..PORT_ATTEMPTS {
            let port = launch::exclusive_of_starts(|| {
                std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?
                    .local_addr()
                    .map(|a| a.port())
            })
            .map_err(|e| RuntimeError::Other(format!("no free application port: {e}")))?;
            let mut leased = self.app_ports.lock().unwrap_or_else(|e| e.into_inner());
            if leased.insert(port) {
                return Ok(PortLease {
                    port,
                    leased: self.app_ports.clone(),
                });
            }
        }
        Err(RuntimeError::Other(format!(
            "no free application port: the kernel offered only ports of live pods ({PORT_ATTEMPTS} tries)"
        )))
    }

    /// The next candidate address: within 127.0.0.0/8, skipping `.0` and `.255`.
    fn next_address(&self) -> Ipv4Addr {
        let mut next = self.next_ip.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let candidate = *next;
            *next = if candidate >= u32::from(Ipv4Addr::new(127, 255, 255, 254)) {
                u32::from(Ipv4Addr::new(127, 0, 1, 1))
            } else {
                candidate + 1
            };
            let ip = Ipv4Addr::from(candidate);
            let last = ip.octets()[3];
            if ip.octets()[0] == 127 && last != 0 && last != 255 {
                return ip;
            }
        }
    }
}

/// A pod's address, its reserved listeners and its application port.
pub struct ProcessSandbox {
    ip: Ipv4Addr,
    app_port_lease: Option<PortLease>,
    listeners: HashMap<u16, std::net::TcpListener>,
    uid: String,
    log_name: String,
}

impl PodSandbox for ProcessSandbox {
    fn pod_ip(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }

    fn app_port(&self) -> Option<u16> {
        self.app_port_lease.as_ref().map(|lease| lease.port)
    }
}

enum Handle {
    NotStarted,
    Process {
        pgid: i32,
        exited: watch::Receiver<bool>,
    },
    Task {
        shutdown: CancellationToken,
        kill: CancellationToken,
        exited: watch::Receiver<bool>,
    },
}

/// One process container to start.
struct ProcessSpec<'a> {
    name: &'a str,
    argv: &'a [String],
    env: &'a [(String, String)],
    working_dir: Option<&'a str>,
}

/// A pod whose containers the process runtime started.
pub struct ProcessPod {
    ip: Ipv4Addr,
    /// Held for the pod's life: its application port is not given to another pod meanwhile.
    _app_port: Option<PortLease>,
    starts: Vec<ContainerStart>,
    handles: Vec<Handle>,
    exits: mpsc::UnboundedReceiver<ContainerExit>,
    outstanding: usize,
}

/// Send `signal` to every process of the group `pgid`. The group outlives its leader only while
/// a member lives, so this never reaches an unrelated process group.
fn signal_group(pgid: i32, signal: libc::c_int) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: killpg has no memory-safety preconditions; errors (ESRCH: the group is gone)
    // are expected and ignored.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

async fn wait_exited(exited: &mut watch::Receiver<bool>) {
    // An Err means the watcher task is gone, which it only is after sending the exit.
    let _ = exited.wait_for(|done| *done).await;
}

async fn all_exited(receivers: &mut [(usize, watch::Receiver<bool>)]) {
    futures::future::join_all(receivers.iter_mut().map(|(_, r)| wait_exited(r))).await;
}

/// Where a container's stdout and stderr go.
enum Output {
    /// Both to this log file.
    File(OwnedFd),
    /// To these pipes, whose read ends are forwarded to the agent's log.
    Piped {
        stdout: OwnedFd,
        stderr: OwnedFd,
        readers: (OwnedFd, OwnedFd),
    },
}

/// A pipe, both ends close-on-exec (the child gets the write end through dup2) and blocking
/// (the reader is made non-blocking when tokio takes it): (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which are then owned here.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

fn exit_of(index: usize, status: std::io::Result<std::process::ExitStatus>) -> ContainerExit {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ContainerExit {
                index,
                exit_code: code,
                signal: None,
                message: None,
            },
            (None, Some(signal)) => ContainerExit {
                index,
                exit_code: 128 + signal,
                signal: Some(signal),
                message: None,
            },
            (None, None) => ContainerExit {
                index,
                exit_code: 128,
                signal: None,
                message: Some("process ended without an exit status".into()),
            },
        },
        Err(e) => ContainerExit {
            index,
            exit_code: 128,
            signal: None,
            message: Some(format!("waiting for the process failed: {e}")),
        },
    }
}

fn forward_output<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    pod: String,
    container: String,
    stream: &'static str,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "spawner::pod", pod = %pod, container = %container, stream, "{line}");
        }
    });
}

impl<S: InProcessSidecar> ProcessRuntime<S> {
    /// The container's stdout and stderr: its log file (both), or two pipes whose read ends
    /// are forwarded to the agent's log when there is no log directory.
    fn output(&self, sandbox: &ProcessSandbox, container: &str) -> Result<Output, String> {
        let Some(dir) = &self.config.log_dir else {
            let (stdout_read, stdout) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
            let (stderr_read, stderr) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
            return Ok(Output::Piped {
                stdout,
                stderr,
                readers: (stdout_read, stderr_read),
            });
        };
        let path = dir.join(format!("{}_{container}.log", sandbox.log_name));
        // Logs may carry secrets of the app: readable by the user only.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        Ok(Output::File(OwnedFd::from(file)))
    }

    fn start_process(
        &self,
        sandbox: &ProcessSandbox,
        index: usize,
        process: ProcessSpec<'_>,
        exits: &mpsc::UnboundedSender<ContainerExit>,
    ) -> Result<(ContainerStart, Handle), String> {
        let ProcessSpec {
            name,
            argv,
            env,
            working_dir,
        } = process;
        let (program, _) = launch::command_line(argv, env, working_dir.map(std::path::Path::new))?;
        let stdin = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        let output = self.output(sandbox, name)?;
        let (stdout, stderr) = match &output {
            Output::File(file) => (file.as_raw_fd(), file.as_raw_fd()),
            Output::Piped { stdout, stderr, .. } => (stdout.as_raw_fd(), stderr.as_raw_fd()),
        };
        // Its own process group (so the whole tree can be signalled at once), the agent's
        // death signal, then exec (see `launch`).
        let child = launch::spawn(&launch::Launch {
            program: &program,
            argv,
            env,
            working_dir: working_dir.map(std::path::Path::new),
            stdio: [stdin.as_raw_fd(), stdout, stderr],
        })
        .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
        let pid = child.pid;
        let pgid = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
        // The child has its own copies now; the write ends must close here so the readers see
        // the end of the output when the process ends.
        drop(stdin);
        if let Output::Piped {
            readers: (stdout, stderr),
            stdout: stdout_write,
            stderr: stderr_write,
        } = output
        {
            drop((stdout_write, stderr_write));
            for (reader, stream) in [(stdout, "stdout"), (stderr, "stderr")] {
                match tokio::net::unix::pipe::Receiver::from_owned_fd(reader) {
                    Ok(reader) => {
                        forward_output(reader, sandbox.log_name.clone(), name.into(), stream)
                    }
                    Err(e) => tracing::warn!(error = %e, stream, "cannot forward the output"),
                }
            }
        }
        let keeper = self.keeper.clone();
        if let Some(keeper) = &keeper {
            keeper.track(pgid);
        }
        let (exited_tx, exited_rx) = watch::channel(false);
        let exits = exits.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The container is its process group: what the leader left behind goes with it.
            signal_group(pgid, libc::SIGKILL);
            if let Some(keeper) = keeper {
                keeper.forget(pgid);
            }
            let _ = exits.send(exit_of(index, status));
            let _ = exited_tx.send(true);
        });
        Ok((
            ContainerStart::Running {
                id: format!("spawner-process://{pid}"),
            },
            Handle::Process {
                pgid,
                exited: exited_rx,
            },
        ))
    }

    fn start_sidecar(
        &self,
        sandbox: &mut ProcessSandbox,
        uid: &str,
        index: usize,
        plan: SidecarPlan,
        exits: &mpsc::UnboundedSender<ContainerExit>,
    ) -> Result<(ContainerStart, Handle), String> {
        let listener = sandbox
            .listeners
            .remove(&plan.serve_port)
            .ok_or_else(|| format!("port {} was not reserved for the pod", plan.serve_port))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let listener = TcpListener::from_std(listener).map_err(|e| format!("listener: {e}"))?;
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, plan.upstream_port));
        let shutdown = CancellationToken::new();
        let kill = CancellationToken::new();
        let serve = self
            .sidecar
            .serve(listener, upstream, plan, shutdown.clone());
        let (exited_tx, exited_rx) = watch::channel(false);
        let exits = exits.clone();
        let killed = kill.clone();
        tokio::spawn(async move {
            let exit = tokio::select! {
                result = serve => match result {
                    Ok(()) => ContainerExit { index, exit_code: 0, signal: None, message: None },
                    Err(message) => ContainerExit { index, exit_code: 1, signal: None, message: Some(message) },
                },
                () = killed.cancelled() => ContainerExit {
                    index,
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    message: Some("did not stop within the grace period".into()),
                },
            };
            let _ = exits.send(exit);
            let _ = exited_tx.send(true);
        });
        Ok((
            ContainerStart::Running {
                id: format!("spawner-inprocess://{uid}/{index}"),
            },
            Handle::Task {
                shutdown,
                kill,
                exited: exited_rx,
            },
        ))
    }
}

async fn probe_http(host: IpAddr, port: u16, path: &str) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect((host, port)).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/spawner\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    // As the kubelet: 200 <= code < 400 is success.
    Ok(code.is_some_and(|c| (200..400).contains(&c)))
}

impl<S: InProcessSidecar> PodRuntime for ProcessRuntime<S> {
    type Sandbox = ProcessSandbox;
    type Pod = ProcessPod;

    fn create_sandbox(
        &self,
        request: SandboxRequest,
    ) -> impl Future<Output = Result<ProcessSandbox, RuntimeError>> + Send {
        let result = (|| {
            let app_port_lease = if request.wants_app_port {
                Some(self.lease_app_port()?)
            } else {
                None
            };
            let log_name = format!("{}_{}", request.namespace, request.name);
            'address: for _ in 0..ADDRESS_ATTEMPTS {
                let ip = self.next_address();
                let mut listeners = HashMap::new();
                for &port in &request.listen_ports {
                    match std::net::TcpListener::bind((ip, port)) {
                        Ok(listener) => {
                            listeners.insert(port, listener);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue 'address,
                        Err(e) => {
                            return Err(RuntimeError::NoAddress(format!(
                                "binding {ip}:{port}: {e}"
                            )));
                        }
                    }
                }
                return Ok(ProcessSandbox {
                    ip,
                    app_port_lease,
                    listeners,
                    uid: request.uid.clone(),
                    log_name,
                });
            }
            Err(RuntimeError::NoAddress(format!(
                "ports {:?} are taken on {ADDRESS_ATTEMPTS} loopback addresses",
                request.listen_ports
            )))
        })();
        std::future::ready(result)
    }

    fn start(
        &self,
        mut sandbox: ProcessSandbox,
        containers: Vec<ContainerPlan>,
    ) -> impl Future<Output = ProcessPod> + Send {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let mut starts = Vec::with_capacity(containers.len());
        let mut handles = Vec::with_capacity(containers.len());
        let uid = sandbox.uid.clone();
        for (index, container) in containers.into_iter().enumerate() {
            let started = match container.run {
                ContainerRun::Process {
                    argv,
                    env,
                    working_dir,
                } => self.start_process(
                    &sandbox,
                    index,
                    ProcessSpec {
                        name: &container.name,
                        argv: &argv,
                        env: &env,
                        working_dir: working_dir.as_deref(),
                    },
                    &exits_tx,
                ),
                ContainerRun::Sidecar(plan) => {
                    self.start_sidecar(&mut sandbox, &uid, index, plan, &exits_tx)
                }
            };
            match started {
                Ok((start, handle)) => {
                    starts.push(start);
                    handles.push(handle);
                }
                Err(message) => {
                    tracing::warn!(pod = %sandbox.log_name, container = %container.name, %message, "container failed to start");
                    starts.push(ContainerStart::Failed { message });
                    handles.push(Handle::NotStarted);
                }
            }
        }
        let outstanding = handles
            .iter()
            .filter(|h| !matches!(h, Handle::NotStarted))
            .count();
        std::future::ready(ProcessPod {
            ip: sandbox.ip,
            _app_port: sandbox.app_port_lease.take(),
            starts,
            handles,
            exits,
            outstanding,
        })
    }

    async fn probe(&self, target: ProbeTarget) -> bool {
        {
            match target {
                ProbeTarget::Http {
                    host,
                    port,
                    path,
                    timeout,
                } => matches!(
                    tokio::time::timeout(timeout, probe_http(host, port, &path)).await,
                    Ok(Ok(true))
                ),
                ProbeTarget::Tcp {
                    host,
                    port,
                    timeout,
                } => matches!(
                    tokio::time::timeout(timeout, TcpStream::connect((host, port))).await,
                    Ok(Ok(_))
                ),
            }
        }
    }
}

impl ProcessPod {
    /// Process group ids of the containers that run as processes (for inspection and tests).
    pub fn process_groups(&self) -> Vec<i32> {
        self.handles
            .iter()
            .filter_map(|h| match h {
                Handle::Process { pgid, .. } => Some(*pgid),
                _ => None,
            })
            .collect()
    }

    fn ask_to_stop(&self, index: usize) {
        match self.handles.get(index) {
            Some(Handle::Process { pgid, exited }) if !*exited.borrow() => {
                signal_group(*pgid, libc::SIGTERM);
            }
            Some(Handle::Task { shutdown, .. }) => shutdown.cancel(),
            _ => {}
        }
    }

    fn force_stop(&self, index: usize) {
        match self.handles.get(index) {
            Some(Handle::Process { pgid, exited }) if !*exited.borrow() => {
                signal_group(*pgid, libc::SIGKILL);
            }
            Some(Handle::Task { kill, .. }) => kill.cancel(),
            _ => {}
        }
    }

    fn exited_receiver(&self, index: usize) -> Option<watch::Receiver<bool>> {
        match self.handles.get(index) {
            Some(Handle::Process { exited, .. } | Handle::Task { exited, .. }) => {
                Some(exited.clone())
            }
            _ => None,
        }
    }

    async fn stop_indices(&mut self, indices: Vec<usize>, grace: Duration) {
        for &i in &indices {
            self.ask_to_stop(i);
        }
        let mut receivers: Vec<(usize, watch::Receiver<bool>)> = indices
            .iter()
            .filter_map(|&i| self.exited_receiver(i).map(|r| (i, r)))
            .collect();
        if tokio::time::timeout(grace, all_exited(&mut receivers))
            .await
            .is_err()
        {
            for &i in &indices {
                self.force_stop(i);
            }
            if tokio::time::timeout(KILL_WAIT, all_exited(&mut receivers))
                .await
                .is_err()
            {
                let stuck: Vec<usize> = receivers
                    .iter()
                    .filter(|(_, r)| !*r.borrow())
                    .map(|(i, _)| *i)
                    .collect();
                tracing::error!(?stuck, "containers did not exit after SIGKILL");
            }
        }
    }
}

impl RunningPod for ProcessPod {
    fn pod_ip(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }

    fn starts(&self) -> &[ContainerStart] {
        &self.starts
    }

    async fn next_exit(&mut self) -> Option<ContainerExit> {
        {
            if self.outstanding == 0 {
                return None;
            }
            let exit = self.exits.recv().await?;
            self.outstanding -= 1;
            Some(exit)
        }
    }

    fn stop_container(&mut self, index: usize, grace: Duration) -> impl Future<Output = ()> + Send {
        self.stop_indices(vec![index], grace)
    }

    fn stop_all(&mut self, grace: Duration) -> impl Future<Output = ()> + Send {
        let all = (0..self.handles.len()).collect();
        self.stop_indices(all, grace)
    }
}

impl Drop for ProcessPod {
    fn drop(&mut self) {
        for index in 0..self.handles.len() {
            self.force_stop(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpawnerSidecar;

    #[test]
    fn an_application_port_is_never_given_to_two_live_pods() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default(), SpawnerSidecar);
        let leases: Vec<PortLease> = (0..200)
            .map(|_| runtime.lease_app_port().expect("a free port"))
            .collect();
        let ports: HashSet<u16> = leases.iter().map(|l| l.port).collect();
        assert_eq!(ports.len(), leases.len(), "every live pod has its own port");
        assert_eq!(*runtime.app_ports.lock().unwrap(), ports);

        // A pod that is gone gives its port back.
        let first = leases[0].port;
        drop(leases);
        assert!(runtime.app_ports.lock().unwrap().is_empty());

        // A port a live pod holds is skipped even if it comes round again.
        runtime.app_ports.lock().unwrap().insert(first);
        for _ in 0..100 {
            let lease = runtime.lease_app_port().expect("a free port");
            assert_ne!(lease.port, first);
        }
    }

    /// Containers starting on other threads get a copy of the agent's file descriptors until
    /// they exec: the listener that probes a port must not be among them, or the port is still
    /// taken when the pod's app binds it.
    #[test]
    fn a_leased_port_is_free_for_the_app_while_other_containers_start() {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::{AtomicBool, Ordering};
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default(), SpawnerSidecar);
        let stop = Arc::new(AtomicBool::new(false));
        let starter = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let argv = vec!["true".to_string()];
                let (program, _) = launch::command_line(&argv, &[], None).expect("true");
                let null = std::fs::File::open("/dev/null").expect("/dev/null");
                let fd = null.as_raw_fd();
                let mut started = 0;
                while !stop.load(Ordering::Relaxed) {
                    let child = launch::spawn(&launch::Launch {
                        program: &program,
                        argv: &argv,
                        env: &[],
                        working_dir: None,
                        stdio: [fd, fd, fd],
                    })
                    .expect("start true");
                    let mut status = 0;
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(child.pid as i32, &mut status, 0) };
                    started += 1;
                }
                started
            }
        });
        let mut conflicts = Vec::new();
        for _ in 0..3_000 {
            let lease = runtime.lease_app_port().expect("a free port");
            if let Err(e) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, lease.port)) {
                conflicts.push((lease.port, e.to_string()));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let started = starter.join().expect("the starting thread");
        assert!(started > 0, "no process was started meanwhile");
        assert!(
            conflicts.is_empty(),
            "{started} starts; apps could not bind: {conflicts:?}"
        );
    }

    #[test]
    fn application_ports_stay_below_the_ephemeral_range_and_skip_ports_in_use() {
        let Some((first, last)) = app_port_range() else {
            // No range to read (not Linux's procfs): ports come from binding port 0.
            return;
        };
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default(), SpawnerSidecar);
        let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(last < ephemeral_low);
        // Something else listens on the port that would come next: it is skipped.
        let mut held = None;
        for _ in 0..1_000 {
            let next = *runtime.next_port.lock().unwrap();
            if let Ok(listener) = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, next)) {
                held = Some((next, listener));
                break;
            }
            // Taken by another process: let the runtime step past it.
            *runtime.next_port.lock().unwrap() = if next >= last { first } else { next + 1 };
        }
        let (busy, _listener) = held.expect("a port of the range to hold");
        let lease = runtime.lease_app_port().expect("a free port");
        assert_ne!(lease.port, busy);
        assert!((first..=last).contains(&lease.port), "{}", lease.port);
    }
}
