//! The local target: `spawner dev` started as a separate process (the whole system on this
//! machine, backends as local processes), reached over loopback.
//!
//! Which binary: `SPAWNER_BIN` when set, else the one the caller passes (the suites pass
//! `CARGO_BIN_EXE_spawner-e2e-cli`, the `spawner` CLI that `cargo test -p spawner-e2e` builds).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{
    ApiClient, App, Apps, BackendStatus, BoxFuture, BoxedStream, Connect, Failure, Target,
    authority, unique,
};

/// How long `spawner dev` may take to print its api URL.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to stop its backends and itself after SIGTERM.
/// The dev controller's start timeout (`SPAWNER_START_TIMEOUT_SECONDS`): long enough for any
/// app of the suite to listen on a loaded machine, short enough to wait for a never-ready one.
const LOCAL_START_TIMEOUT: Duration = Duration::from_secs(30);

const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// Connects straight to `status.url`'s host and port: `spawner dev`'s router
/// (`http://<name>.localhost:<port>/`; `*.localhost` is loopback, as browsers resolve it).
pub struct DirectTcp;

impl Connect for DirectTcp {
    fn connect<'a>(
        &'a self,
        backend: &'a BackendStatus,
    ) -> BoxFuture<'a, Result<BoxedStream, Failure>> {
        Box::pin(async move {
            let url = backend
                .url
                .as_deref()
                .ok_or_else(|| Failure::new(format!("{} has no url", backend.name)))?;
            let authority = authority(url)?;
            let address = match authority.rsplit_once(':') {
                Some((host, port)) if host == "localhost" || host.ends_with(".localhost") => {
                    format!("127.0.0.1:{port}")
                }
                _ => authority.to_string(),
            };
            let stream =
                tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&address))
                    .await
                    .map_err(|_| Failure::new(format!("connecting to {address}: timed out")))?
                    .map_err(|e| Failure::new(format!("connecting to {address}: {e}")))?;
            Ok(Box::new(stream) as BoxedStream)
        })
    }
}

/// A running `spawner dev`; dropping it stops it (SIGTERM: it stops its backends first) and
/// removes its state directory.
pub struct LocalDev {
    child: Child,
    binary: PathBuf,
    state_dir: PathBuf,
    api_url: String,
    token: String,
}

impl LocalDev {
    /// Starts `spawner dev` on free loopback ports and waits for its api URL.
    pub fn start(binary: &Path) -> Result<Self, Failure> {
        let binary = std::env::var_os("SPAWNER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| binary.to_path_buf());
        let state_dir = std::env::temp_dir().join(unique("spawner-e2e-dev"));
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| Failure::new(format!("creating {}: {e}", state_dir.display())))?;
        let log_path = state_dir.join("dev.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Failure::new(format!("creating {}: {e}", log_path.display())))?;
        let token = unique("e2e-token");
        let mut child = Command::new(&binary)
            .args(["dev", "--api-listen", "127.0.0.1:0"])
            .args(["--kube-listen", "127.0.0.1:0"])
            .args(["--router-listen", "127.0.0.1:0"])
            .args(["--token", &token])
            .args(["--retention-seconds", "30"])
            // The controller reads its flags' environment fallbacks: a never-ready app fails
            // within the suite's patience, not after the 300 s default.
            .env(
                "SPAWNER_START_TIMEOUT_SECONDS",
                LOCAL_START_TIMEOUT.as_secs().to_string(),
            )
            .arg("--state-dir")
            .arg(&state_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| Failure::new(format!("starting {}: {e}", binary.display())))?;

        // Read stdout on a thread (for the whole run, so the pipe never fills).
        let (lines_tx, lines_rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if lines_tx.send(line).is_err() {
                        // Nobody listens any more: keep draining.
                        continue;
                    }
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let mut api_url = None;
        while api_url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("SPAWNER_API_URL=") {
                        api_url = Some(url.trim().to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let _ = std::fs::remove_dir_all(&state_dir);
                    return Err(Failure::new(format!(
                        "`{} dev` printed no SPAWNER_API_URL within {START_TIMEOUT:?}; its log:\n{log}",
                        binary.display()
                    )));
                }
            }
        }
        Ok(Self {
            child,
            binary,
            state_dir,
            api_url: api_url.unwrap_or_default(),
            token,
        })
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The log of `spawner dev` so far (its stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("dev.log")).unwrap_or_default()
    }

    /// The scenarios' target: the api on loopback, backends reached directly, test apps as
    /// local commands.
    pub fn target(&self) -> Target {
        let spawner = self.binary.display().to_string();
        Target {
            name: "local".into(),
            api: ApiClient::new(&self.api_url, &self.token),
            connector: Arc::new(DirectTcp),
            apps: Apps {
                demo: App {
                    image: None,
                    command: vec![spawner, "demo-backend".into()],
                },
                crash: App {
                    image: None,
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        format!("exit {}", super::CRASH_EXIT_CODE),
                    ],
                },
                never_ready: App {
                    image: None,
                    command: vec!["sleep".into(), "3600".into()],
                },
            },
            ready_timeout: Duration::from_secs(60),
            start_timeout: LOCAL_START_TIMEOUT,
        }
    }
}

impl Drop for LocalDev {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals our own child, which has not been reaped yet (so the pid is its).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("spawner dev did not stop within {STOP_TIMEOUT:?}: killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
