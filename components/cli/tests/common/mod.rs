//! What the integration tests share: `spawner dev` as a child process (killed with everything it
//! started when the test ends, however it ends), a small HTTP client of the api, the status
//! stream, and process checks through `/proc`.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use spawner_core::state_stream::SseParser;

/// The compiled `spawner` binary under test.
pub const SPAWNER: &str = env!("CARGO_BIN_EXE_spawner");

/// How long `spawner dev` may take to print its URLs (a debug build on a busy machine).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The phases of a backend that becomes Ready, in order.
pub const PHASES_TO_READY: [&str; 5] =
    ["Submitted", "Constructed", "Scheduled", "Running", "Ready"];

/// A free loopback port (bound then released; the test binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "spawner-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
pub struct DevOptions {
    /// `--demo` with this grace period (seconds).
    pub demo_grace_seconds: Option<u32>,
    pub retention_seconds: Option<u64>,
    /// `--record-trace` to this file.
    pub record_trace: Option<PathBuf>,
}

/// A running `spawner dev`, in its own process group. Dropping it kills the process, every
/// process it started (backends are in their own groups) and removes its state directory.
pub struct Dev {
    child: Option<Child>,
    pub pid: u32,
    pub api_url: String,
    pub token: String,
    pub kubeconfig: PathBuf,
    pub demo_url: Option<String>,
    pub router_url: String,
    /// The `kubectl` command line printed after "Watch the objects: ".
    pub kubectl_command: String,
    stderr: Arc<Mutex<String>>,
    state: TempDir,
}

impl Dev {
    /// Starts `spawner dev` on free loopback ports and waits for its printed URLs.
    pub fn start(options: DevOptions) -> Dev {
        let state = TempDir::new("dev");
        let mut command = Command::new(SPAWNER);
        command
            .arg("dev")
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--kube-listen", "127.0.0.1:0"])
            .arg("--router-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--state-dir")
            .arg(&state.0);
        if let Some(grace) = options.demo_grace_seconds {
            command
                .arg("--demo")
                .arg("--demo-listen")
                .arg(format!("127.0.0.1:{}", free_port()))
                .arg("--demo-grace-seconds")
                .arg(grace.to_string());
        }
        if let Some(path) = &options.record_trace {
            command.arg("--record-trace").arg(path);
        }
        if let Some(retention) = options.retention_seconds {
            command
                .arg("--retention-seconds")
                .arg(retention.to_string());
        }
        command
            .env_remove("SPAWNER_TOKEN")
            .env_remove("SPAWNER_API_URL")
            // `SPAWNER_DEV_LOG` (a `RUST_LOG` filter) to see more of what `spawner dev` does.
            .env(
                "RUST_LOG",
                std::env::var("SPAWNER_DEV_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().expect("start spawner dev");
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = stderr.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        {
            let pipe = child.stdout.take().expect("stdout");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut dev = Dev {
            child: Some(child),
            pid,
            api_url: String::new(),
            token: String::new(),
            kubeconfig: PathBuf::new(),
            demo_url: None,
            router_url: String::new(),
            kubectl_command: String::new(),
            stderr,
            state,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let want_demo = options.demo_grace_seconds.is_some();
        loop {
            let done = !dev.api_url.is_empty()
                && !dev.router_url.is_empty()
                && !dev.token.is_empty()
                && !dev.kubeconfig.as_os_str().is_empty()
                && !dev.kubectl_command.is_empty()
                && (dev.demo_url.is_some() || !want_demo);
            if done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "spawner dev printed no URLs within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    dev.stderr()
                ),
            };
            if let Some(v) = line.strip_prefix("SPAWNER_API_URL=") {
                dev.api_url = v.to_string();
            } else if let Some(v) = line.strip_prefix("SPAWNER_TOKEN=") {
                dev.token = v.to_string();
            } else if let Some(v) = line.strip_prefix("KUBECONFIG=") {
                dev.kubeconfig = PathBuf::from(v);
            } else if let Some(v) = line.strip_prefix("SPAWNER_ROUTER_URL=") {
                dev.router_url = v.to_string();
            } else if let Some(v) = line.strip_prefix("Watch the objects: ") {
                dev.kubectl_command = v.to_string();
            } else if let Some(v) = line.strip_prefix("SPAWNER_DEMO_URL=") {
                dev.demo_url = Some(v.to_string());
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || while lines_rx.recv().is_ok() {});
        dev
    }

    /// What `spawner dev` wrote on stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// An api client authenticated with the printed token.
    pub fn api(&self) -> Api {
        Api::new(&self.api_url, Some(&self.token))
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit, at most `timeout`.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `spawner` client command aimed at this dev's api.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(SPAWNER);
        command
            .env("SPAWNER_API_URL", &self.api_url)
            .env("SPAWNER_TOKEN", &self.token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    pub fn state_dir(&self) -> &Path {
        &self.state.0
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Backends run in their own process groups: kill them by pid, then the dev group.
        for process in descendants(self.pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(process.pid, libc::SIGKILL) };
        }
        // SAFETY: as above; a negative pid names the process group.
        unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("--- spawner dev stderr ---\n{}", self.stderr());
        }
    }
}

/// A small client of the api's JSON over HTTP.
pub struct Api {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> http::Request<Full<Bytes>> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(body) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        builder.body(Full::new(bytes)).expect("request")
    }

    /// Status and JSON body (`null` when the body is not JSON).
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            self.http.request(self.request(method, path, body)),
        )
        .await
        .expect("the api answers within 30 s")
        .expect("the api is reachable");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Spawns a backend and returns its name.
    pub async fn spawn(&self, body: &Value) -> String {
        let (status, answer) = self.call("POST", "/spawn", Some(body)).await;
        assert_eq!(status, 201, "spawn answered {status}: {answer}");
        answer["name"].as_str().expect("name").to_string()
    }

    pub async fn status(&self, name: &str) -> Value {
        let (status, answer) = self
            .call("GET", &format!("/backend/{name}/status"), None)
            .await;
        assert_eq!(status, 200, "status of {name} answered {status}: {answer}");
        answer
    }

    /// Follows `/backend/<name>/status/stream` until a Ready or terminal phase (at most
    /// `timeout`) and returns the phase events in the order received.
    pub async fn follow(&self, name: &str, timeout: Duration) -> Vec<Value> {
        let mut events = Vec::new();
        let result = tokio::time::timeout(timeout, async {
            let response = self
                .http
                .request(self.request("GET", &format!("/backend/{name}/status/stream"), None))
                .await
                .expect("status stream");
            assert_eq!(response.status().as_u16(), 200, "status stream of {name}");
            let mut body = response.into_body();
            let mut parser = SseParser::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("stream frame");
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                for message in parser.push(data).expect("valid SSE") {
                    if message.event != "phase" {
                        continue;
                    }
                    let event: Value = serde_json::from_str(&message.data).expect("phase json");
                    let phase = event["phase"].as_str().unwrap_or_default().to_string();
                    events.push(event);
                    if matches!(phase.as_str(), "Ready" | "Failed" | "Swept" | "Terminated") {
                        return;
                    }
                }
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "{name} reached neither Ready nor a terminal phase within {timeout:?}; phases: {:?}",
            phases(&events)
        );
        events
    }

    /// Polls the status until `done` holds, at most `timeout`; returns the last status.
    pub async fn wait_status(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(name).await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: condition not met within {timeout:?}; last status {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The phase names of phase events.
pub fn phases(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The pid of the application process of backend `name`, from its pod's container status
/// (the node agent reports `spawner-process://<pid>`), read through the printed kubeconfig.
pub async fn app_pid(kubeconfig: &Path, name: &str) -> i32 {
    let text = std::fs::read_to_string(kubeconfig).expect("read kubeconfig");
    // As any kube-rs program would: HTTPS, checked against the kubeconfig's CA, and its token.
    let config = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig yaml");
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .expect("kubeconfig");
    let client = kube::Client::try_from(config).expect("kube client");
    let path =
        format!("/api/v1/namespaces/default/pods?labelSelector=spawner.dev%2Fbackend%3D{name}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = http::Request::get(&path).body(Vec::new()).expect("request");
        let text = client.request_text(request).await.expect("listing pods");
        let pods: Value = serde_json::from_str(&text).expect("pod list");
        let container_id = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|pod| {
                pod["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .find(|c| c["name"] == "app")
            .and_then(|c| c["containerID"].as_str().map(str::to_string));
        if let Some(pid) = container_id
            .as_deref()
            .and_then(|id| id.strip_prefix("spawner-process://"))
            .and_then(|pid| pid.parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no app container pid for {name}: {pods}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One process from `/proc`.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    /// Start time in clock ticks since boot: with the pid, names one process even after reuse.
    pub start_time: u64,
    pub cmdline: String,
}

fn read_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    // Field 22 of stat; `fields` starts at field 3.
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, ppid, start_time))
}

/// Every live process on the machine.
pub fn processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (state, ppid, start_time) = read_stat(pid)?;
            if state == 'Z' {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            Some(ProcessInfo {
                pid,
                ppid,
                start_time,
                cmdline,
            })
        })
        .collect()
}

/// Every live descendant of `root` (children, grandchildren, …).
pub fn descendants(root: u32) -> Vec<ProcessInfo> {
    let all = processes();
    let mut found: Vec<ProcessInfo> = Vec::new();
    let mut frontier = vec![root as i32];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            frontier.push(p.pid);
            found.push(p.clone());
        }
    }
    found
}

/// Whether `process` still runs (the same pid and start time, not a zombie).
pub fn is_alive(process: &ProcessInfo) -> bool {
    matches!(read_stat(process.pid), Some((state, _, start)) if state != 'Z' && start == process.start_time)
}

/// The process `pid` as it is now.
pub fn process(pid: i32) -> Option<ProcessInfo> {
    processes().into_iter().find(|p| p.pid == pid)
}

/// Waits until none of `processes` is alive, at most `timeout`; returns those still alive.
pub fn wait_gone(processes: &[ProcessInfo], timeout: Duration) -> Vec<ProcessInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<ProcessInfo> = processes.iter().filter(|p| is_alive(p)).cloned().collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose environment contains `marker` (an `env` entry of a spawn request), wherever
/// they were reparented to.
pub fn processes_with_env(marker: &str) -> Vec<ProcessInfo> {
    processes()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .map(|env| {
                    env.split(|b| *b == 0)
                        .any(|entry| entry == marker.as_bytes())
                })
                .unwrap_or(false)
        })
        .collect()
}

/// A connected WebSocket client.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message of `ws` as JSON, at most 10 s away.
pub async fn next_json(ws: &mut WebSocket) -> Value {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                tokio_tungstenite::tungstenite::Message::Text(text) => {
                    return serde_json::from_str(&text).expect("json message");
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a message within 10 s")
}

/// A connection to the router of `spawner dev` (`router_url` is `http://localhost:<port>`):
/// tests dial loopback themselves rather than rely on the resolver knowing `*.localhost`.
#[allow(dead_code)]
pub async fn dial_router(router_url: &str) -> tokio::net::TcpStream {
    let port = router_url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("router port");
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the router")
}

/// `GET url` through the router (the Host header from `url`), with `extra` header lines;
/// the answer's status code and body.
#[allow(dead_code)]
pub async fn get_via_router(router_url: &str, url: &str, extra: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = dial_router(router_url).await;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}
