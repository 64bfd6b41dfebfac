//! The container images, run by a real Docker engine (docs/images.md).
//!
//! The images are built from the Dockerfile with this test's `spawner` binary
//! (`scripts/images.sh --binary … --tag test`; cached layers make a rebuild take seconds), then:
//! - the sidecar image in front of an application container on a Docker network: HTTP and
//!   WebSocket through it, the live-connection count and readiness on its event stream, and a
//!   drain on SIGTERM that keeps a live WebSocket until the drain window ends;
//! - every component image (controller, api, sweeper against a Kubernetes API in another
//!   container; the sidecar in front of an app) as it runs in a cluster: UID 65532, read-only
//!   root filesystem, all capabilities dropped; it answers its health endpoint, its Docker
//!   health check turns healthy, and it exits 0 within 5 s of SIGTERM;
//! - `spawner --version` in the image prints this commit.
//!
//! Containers are started with testcontainers (its CLI client: Debian's Docker 20.10 speaks API
//! 1.41, older than the API of testcontainers' newer HTTP clients). testcontainers cannot set a
//! read-only root filesystem or drop capabilities in that version, so the hardened component
//! runs use `docker run` directly. Traffic goes only to these containers, through ports published
//! on loopback.
//!
//! Without an engine the tests say so and pass; `SPAWNER_REQUIRE_DOCKER=1` (CI) makes that a
//! failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use spawner_core::state_stream::{SidecarState, SseParser, StateMessage};
use testcontainers::clients::Cli;
use testcontainers::{GenericImage, RunnableImage};
use tokio_tungstenite::tungstenite::{self, Message};

/// The compiled `spawner` binary under test, which goes into the images.
const SPAWNER: &str = env!("CARGO_BIN_EXE_spawner");
const TAG: &str = "test";
/// What the image's `spawner --version` must print.
const VERSION: &str = spawner::VERSION;

// ---------------------------------------------------------------------------------------------
// The engine and the images

/// True when a Docker engine answers; otherwise says why the test is skipped, or panics in CI.
fn engine_available() -> bool {
    static ANSWER: OnceLock<Result<(), String>> = OnceLock::new();
    let answer = ANSWER.get_or_init(|| {
        let out = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")),
            Err(e) => Err(format!("cannot run the docker client: {e}")),
        }
    });
    match answer {
        Ok(()) => true,
        Err(why) => {
            let hint = "start one with: eval \"$(scripts/docker-engine.sh start)\"";
            if std::env::var("SPAWNER_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!("SPAWNER_REQUIRE_DOCKER=1 but no Docker engine answers ({why}); {hint}");
            }
            eprintln!("skipped: no Docker engine answers ({why}); {hint}");
            false
        }
    }
}

/// Builds every image from this test's binary, once per test process.
fn images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/images.sh");
        let started = Instant::now();
        let out = Command::new(&script)
            .args(["--binary", SPAWNER, "--tag", TAG])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        eprintln!(
            "scripts/images.sh took {:.1} s:\n{}",
            started.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/images.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image(component: &str) -> String {
    match component {
        "spawner" => format!("spawner:{TAG}"),
        c => format!("spawner-{c}:{TAG}"),
    }
}

/// A name no other test (or test process) uses at the same time.
fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "spawner-test-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs the docker CLI; its stdout, trimmed. Panics with its stderr when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker client");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container started with `docker run -d`, removed (with its volumes) when dropped.
struct Container {
    id: String,
    /// Removed on drop (false for a container testcontainers owns).
    owned: bool,
}

impl Container {
    /// `docker run -d ARGS`. Docker picks a published port from the kernel's ephemeral range
    /// without checking that nothing on the host holds it, so on a busy machine (the rest of the
    /// suite has thousands of client sockets open) its proxy can fail to bind with "address
    /// already in use"; the container is then left created under its name. That is Docker's
    /// allocation racing other processes, not the image: remove it and run again.
    fn run(args: &[&str]) -> Self {
        let mut full = vec!["run", "-d"];
        full.extend_from_slice(args);
        let name = args
            .windows(2)
            .find(|pair| pair[0] == "--name")
            .map(|pair| pair[1]);
        for _ in 0..4 {
            let out = Command::new("docker")
                .args(&full)
                .output()
                .expect("run the docker client");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success()
                && stderr.contains("address already in use")
                && let Some(name) = name
            {
                docker(&["rm", "-f", "-v", name]);
                continue;
            }
            assert!(
                out.status.success(),
                "docker {}: {}",
                full.join(" "),
                stderr.trim()
            );
            return Self {
                id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                owned: true,
            };
        }
        Self {
            id: docker(&full),
            owned: true,
        }
    }

    fn borrowed(id: &str) -> Self {
        Self {
            id: id.to_string(),
            owned: false,
        }
    }

    /// The loopback port Docker published for `port`.
    fn host_port(&self, port: u16) -> u16 {
        let mapping = docker(&["port", &self.id, &format!("{port}/tcp")]);
        mapping
            .lines()
            .find_map(|l| l.strip_prefix("127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no loopback port for {port}: {mapping}"))
    }

    fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "--format", format, &self.id])
    }

    fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "40", &self.id])
            .output()
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Sends SIGTERM and returns how long the container took to exit, and its exit code.
    fn terminate(&self, limit: Duration) -> (Duration, i64) {
        let sent = Instant::now();
        docker(&["kill", "--signal", "TERM", &self.id]);
        loop {
            if self.inspect("{{.State.Running}}") == "false" {
                let elapsed = sent.elapsed();
                let code = self
                    .inspect("{{.State.ExitCode}}")
                    .parse()
                    .expect("exit code");
                return (elapsed, code);
            }
            assert!(
                sent.elapsed() < limit,
                "still running {limit:?} after SIGTERM; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", &self.id])
                .output();
        }
    }
}

/// A Docker network for one test, removed when dropped (after its containers).
struct Network(String);

impl Network {
    fn new(label: &str) -> Self {
        let name = unique(label);
        docker(&["network", "create", &name]);
        Self(name)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP, SSE and WebSocket clients (std only: these tests are synchronous)

/// One HTTP/1.0 GET: status code and body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// Polls `path` until it answers `code`.
fn wait_for_status(port: u16, path: &str, code: u16, container: &Container) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((got, _)) = get(port, path)
            && got == code
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} on port {port} never answered {code}; logs:\n{}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sidecar's events token in these tests (the controller injects one into every pod; the
/// control paths are closed without it).
const EVENTS_TOKEN: &str = "events-token-for-image-tests";

/// Follows the sidecar's event stream on a thread; its states arrive on the receiver.
fn follow_events(port: u16) -> mpsc::Receiver<SidecarState> {
    let (tx, rx) = mpsc::channel();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sidecar");
    // HTTP/1.0: the stream is close-delimited, no chunked framing to undo.
    write!(
        stream,
        "GET /_spawner/events HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {EVENTS_TOKEN}\r\n\r\n"
    )
    .expect("request the event stream");
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        // Skip the response head.
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let mut parser = SseParser::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                return;
            }
            let Ok(messages) = parser.push(&buf[..n]) else {
                return;
            };
            for message in messages {
                if let Ok(Some(event)) = StateMessage::from_message(&message)
                    && tx.send(*event.state()).is_err()
                {
                    return;
                }
            }
        }
    });
    rx
}

/// Waits for a state on the event stream that satisfies `want`.
fn wait_for_state(
    events: &mpsc::Receiver<SidecarState>,
    what: &str,
    want: impl Fn(&SidecarState) -> bool,
) -> SidecarState {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(state) if want(&state) => return state,
            Ok(state) => last = Some(state),
            Err(_) => panic!("the event stream never showed {what}; last state: {last:?}"),
        }
    }
}

type WebSocket = tungstenite::WebSocket<TcpStream>;

fn websocket(port: u16, path: &str) -> WebSocket {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sidecar");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream)
        .expect("WebSocket handshake through the sidecar");
    ws
}

/// The demo backend's next state message.
fn next_room_state(ws: &mut WebSocket) -> serde_json::Value {
    loop {
        match ws.read().expect("a WebSocket frame") {
            Message::Text(text) => return serde_json::from_str(&text).expect("room state json"),
            _ => continue,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn the_sidecar_image_proxies_http_and_websockets_reports_connections_and_drains_on_sigterm() {
    if !engine_available() {
        return;
    }
    images();
    let cli = Cli::default();
    let network = unique("sidecar-net");
    let app_name = unique("app");
    // The application: the demo backend (HTTP page + WebSocket room) from the spawner image.
    let app = RunnableImage::from((
        GenericImage::new("spawner", TAG),
        // The app has a container of its own here (in a pod it shares the sidecar's network
        // namespace and keeps the default loopback address).
        vec![
            "demo-backend".to_string(),
            "--port".into(),
            "8080".into(),
            "--bind".into(),
            "0.0.0.0".into(),
        ],
    ))
    .with_network(network.clone())
    .with_container_name(app_name.clone());
    let _app = cli.run(app);
    // The sidecar image as the controller injects it: its own CMD (`sidecar`), the app's
    // address from the environment, a short drain window for the test.
    let sidecar = RunnableImage::from(
        GenericImage::new("spawner-sidecar", TAG)
            .with_env_var("SPAWNER_UPSTREAM_HOST", app_name.as_str())
            .with_env_var("SPAWNER_UPSTREAM_PORT", "8080")
            .with_env_var("SPAWNER_DRAIN_SECONDS", "3")
            .with_env_var("SPAWNER_EVENTS_TOKEN", EVENTS_TOKEN)
            .with_exposed_port(9090),
    )
    .with_network(network.clone())
    .with_container_name(unique("sidecar"));
    let sidecar = cli.run(sidecar);
    let port = sidecar.get_host_port_ipv4(9090);
    let handle = Container::borrowed(sidecar.id());

    wait_for_status(port, "/_spawner/health", 200, &handle);
    let events = follow_events(port);
    wait_for_state(&events, "a ready app with no connection", |s| {
        s.ready && s.live_connections == 0
    });

    let (code, page) = get(port, "/").expect("GET / through the sidecar");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<html") || page.contains("<!DOCTYPE"),
        "{page}"
    );

    let mut ws = websocket(port, "/ws");
    assert_eq!(next_room_state(&mut ws)["peers"], 1);
    wait_for_state(&events, "one live connection", |s| s.live_connections == 1);
    ws.send(Message::Text(r#"{"op":"increment"}"#.into()))
        .expect("send");
    assert_eq!(next_room_state(&mut ws)["count"], 1);

    // SIGTERM: the live WebSocket keeps working through the drain window, then the sidecar
    // exits 0 at its end (3 s), not at once and not later.
    let sent = Instant::now();
    docker_kill_term(&handle);
    ws.send(Message::Text(r#"{"op":"increment"}"#.into()))
        .expect("send while draining");
    assert_eq!(next_room_state(&mut ws)["count"], 2);
    let (_, code) = handle.terminate(Duration::from_secs(10));
    let took = sent.elapsed();
    assert_eq!(code, 0, "sidecar exit code; logs:\n{}", handle.logs());
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "the drain of a live WebSocket took {took:?}, the window is 3 s"
    );
}

/// SIGTERM without waiting (the drain test keeps using a connection meanwhile).
fn docker_kill_term(container: &Container) {
    docker(&["kill", "--signal", "TERM", &container.id]);
}

#[test]
fn every_component_image_runs_hardened_answers_health_and_stops_on_sigterm() {
    if !engine_available() {
        return;
    }
    images();
    let cli = Cli::default();
    let network = Network::new("components-net");

    // A Kubernetes API for the controller, api and sweeper: `spawner dev`'s embedded one, in a
    // container of the all-in-one image on the same network. Its kubeconfig (with the admin
    // token) appears in a directory shared with the host.
    let state = TempState::new();
    let kube_name = unique("kube");
    let kube = RunnableImage::from((
        GenericImage::new("spawner", TAG)
            .with_volume(state.0.display().to_string(), "/state")
            .with_env_var("SPAWNER_TOKEN", "test-token"),
        vec![
            "dev".to_string(),
            "--kube-listen".into(),
            "0.0.0.0:6443".into(),
            // The components dial it by its container name: that name goes into its
            // certificate (HTTPS, checked against the CA in the kubeconfig).
            "--kube-tls-san".into(),
            kube_name.clone(),
            // A directory `spawner dev` creates itself, as its user: it refuses one that
            // another user (here root, who made the shared mount) owns.
            "--state-dir".into(),
            "/state/dev".into(),
            "--nodes".into(),
            "1".into(),
        ],
    ))
    .with_network(network.0.clone())
    .with_container_name(kube_name.clone());
    let kube = cli.run(kube);
    let kubeconfig = state.kubeconfig_for(&format!("https://{kube_name}:6443"), kube.id());

    let kube_env = "KUBECONFIG=/etc/spawner/kubeconfig";
    let kube_mount = format!("{}:/etc/spawner/kubeconfig:ro", kubeconfig.display());
    // An application for the sidecar to stand in front of.
    let app_name = unique("app");
    let _app = cli.run(
        RunnableImage::from((
            GenericImage::new("spawner", TAG),
            // The app has a container of its own here (in a pod it shares the sidecar's network
            // namespace and keeps the default loopback address).
            vec![
                "demo-backend".to_string(),
                "--port".into(),
                "8080".into(),
                "--bind".into(),
                "0.0.0.0".into(),
            ],
        ))
        .with_network(network.0.clone())
        .with_container_name(app_name.clone()),
    );
    let upstream = format!("SPAWNER_UPSTREAM_HOST={app_name}");

    let components: [(&str, u16, &str, Vec<&str>); 4] = [
        (
            "controller",
            8080,
            "/healthz",
            vec![
                "-e",
                kube_env,
                "-v",
                &kube_mount,
                "-e",
                "SPAWNER_EVENTS_SECRET=s",
            ],
        ),
        (
            "api",
            8080,
            "/healthz",
            vec![
                "-e",
                kube_env,
                "-v",
                &kube_mount,
                "-e",
                "SPAWNER_API_TOKENS=t",
                "-e",
                "SPAWNER_KEY_SECRET=key-secret-for-image-tests",
            ],
        ),
        (
            "sweeper",
            8081,
            "/healthz",
            vec![
                "-e",
                kube_env,
                "-v",
                &kube_mount,
                "-e",
                "NODE_NAME=node-1",
                "-e",
                "SPAWNER_EVENTS_SECRET=s",
            ],
        ),
        ("sidecar", 9090, "/_spawner/health", vec!["-e", &upstream]),
    ];
    for (component, port, health, extra) in components {
        let name = unique(component);
        let publish = format!("127.0.0.1::{port}");
        let image = image(component);
        let mut args = vec![
            "--name",
            &name,
            "--network",
            &network.0,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            // The image's own health check, run often enough for a test.
            "--health-interval",
            "1s",
            "-p",
            &publish,
        ];
        args.extend(extra.iter().copied());
        args.push(&image);
        let container = Container::run(&args);

        assert_eq!(container.inspect("{{.Config.User}}"), "65532:65532");
        let pid = container.inspect("{{.State.Pid}}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| {
            panic!(
                "{component}: /proc/{pid}/status: {e}; logs:\n{}",
                container.logs()
            )
        });
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(
            field("Uid:"),
            ["65532"; 4],
            "{component}: real, effective, saved and fs UID"
        );
        assert_eq!(field("Gid:"), ["65532"; 4], "{component}: GIDs");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                field(caps),
                ["0000000000000000"],
                "{component}: {caps} capabilities"
            );
        }

        let host_port = container.host_port(port);
        wait_for_status(host_port, health, 200, &container);
        let deadline = Instant::now() + Duration::from_secs(30);
        while container.inspect("{{.State.Health.Status}}") != "healthy" {
            assert!(
                Instant::now() < deadline,
                "{component}: the image's health check never passed: {}\nlogs:\n{}",
                container.inspect("{{json .State.Health}}"),
                container.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        let (took, code) = container.terminate(Duration::from_secs(5));
        assert_eq!(
            code,
            0,
            "{component}: exit code after SIGTERM; logs:\n{}",
            container.logs()
        );
        eprintln!("{component}: healthy, exited 0 {took:?} after SIGTERM");
    }
}

#[test]
fn the_images_print_this_commits_version_and_carry_it_as_labels() {
    if !engine_available() {
        return;
    }
    images();
    assert!(
        !VERSION.contains("unknown"),
        "this build knows no commit: {VERSION}"
    );
    for component in [
        "spawner",
        "controller",
        "api",
        "router",
        "sweeper",
        "sidecar",
    ] {
        let image = image(component);
        let printed = docker(&["run", "--rm", "--read-only", &image, "--version"]);
        assert_eq!(printed, format!("spawner {VERSION}"), "{image}");
        let revision = docker(&[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
            &image,
        ]);
        assert!(
            VERSION.contains(&format!("({revision})")),
            "{image}: {revision}"
        );
    }
}

/// A directory the `spawner dev` container (UID 65532) writes its state into.
struct TempState(PathBuf);

impl TempState {
    fn new() -> Self {
        let path = std::env::temp_dir().join(unique("state"));
        std::fs::create_dir_all(&path).expect("create the state directory");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .expect("chmod the state directory");
        Self(path)
    }

    /// Waits for `spawner dev`'s kubeconfig and writes a copy that names `server`, readable by
    /// the components' UID.
    fn kubeconfig_for(&self, server: &str, container: &str) -> PathBuf {
        let written = self.0.join("dev").join("kubeconfig");
        let deadline = Instant::now() + Duration::from_secs(60);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&written)
                && text.contains("server:")
            {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "spawner dev wrote no kubeconfig; logs:\n{}",
                Container::borrowed(container).logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix("server:") {
                Some(_) => format!("{}server: {server}", &l[..l.len() - l.trim_start().len()]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let copy = self.0.join("kubeconfig-for-components");
        std::fs::write(&copy, text).expect("write the kubeconfig copy");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644))
            .expect("chmod the kubeconfig copy");
        copy
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
