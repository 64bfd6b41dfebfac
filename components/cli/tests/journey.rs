//! A new user's first minutes, driven from outside as they would: start `spawner dev`, read the
//! URL and token it prints, spawn a backend over HTTP, follow its status stream to Ready, talk
//! to it over a WebSocket through the router with the URL's connect token, leave, see it swept after the grace period with its
//! process gone, and stop everything with Ctrl-C.

mod common;

use std::time::{Duration, Instant};

use common::{
    Dev, DevOptions, PHASES_TO_READY, ProcessInfo, SPAWNER, app_pid, descendants, dial_router,
    get_via_router, next_json, phases, process, processes_with_env, wait_gone,
};
use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const GRACE_SECONDS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_talk_leave_swept_then_ctrl_c_leaves_nothing() {
    let mut dev = Dev::start(DevOptions::default());
    let api = dev.api();
    let marker = format!("SPAWNER_JOURNEY_MARK={}-{}", std::process::id(), dev.pid);
    let (mark_name, mark_value) = marker.split_once('=').expect("marker");

    // A backend running the demo app (HTTP page + WebSocket room), swept 2 s after its last
    // connection closes.
    let (status, answer) = api
        .call(
            "POST",
            "/spawn",
            Some(&json!({
                "command": [SPAWNER, "demo-backend"],
                "env": {mark_name: mark_value, "SPAWNER_BACKEND_NAME": "journey"},
                "gracePeriodSeconds": GRACE_SECONDS,
                "user": "journey-user",
            })),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let name = answer["name"].as_str().expect("name").to_string();
    // The URL a browser opens: the backend on the router, with a connect token.
    let url_with_token = answer["url"].as_str().expect("url").to_string();
    let (plain, token) = url_with_token
        .split_once("?spawner_token=")
        .expect("the url carries a connect token");
    let events = api.follow(&name, Duration::from_secs(30)).await;
    assert_eq!(
        phases(&events),
        PHASES_TO_READY,
        "phases of {name} on its status stream"
    );
    let url = events
        .last()
        .and_then(|ready| ready["url"].as_str())
        .expect("the Ready event carries the URL")
        .to_string();
    assert_eq!(
        url, plain,
        "the status URL is the token's URL without the token"
    );
    assert!(
        url.starts_with(&format!("http://{name}.localhost:")),
        "the backend's address on the router: {url}"
    );

    // The application process, as the node agent reports it in the pod.
    let pid = app_pid(&dev.kubeconfig, &name).await;
    let app = process(pid).expect("the app process runs while the backend is Ready");
    assert!(
        app.cmdline.contains("demo-backend"),
        "pid {pid} is the app: {}",
        app.cmdline
    );

    // The page, through the router (which proxies to the sidecar, which proxies to the app):
    // with the token, and never without.
    let (status, body) = get_via_router(
        &dev.router_url,
        &url,
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "the page at {url}: {body}");
    let (status, body) = get_via_router(&dev.router_url, &url, "").await;
    assert_eq!(status, 401, "no token: {body}");

    // The WebSocket room, through the same URL (the token in the query of the upgrade).
    let ws_url = format!(
        "{}ws?spawner_token={token}",
        url.replacen("http://", "ws://", 1)
    );
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(dial_router(&dev.router_url).await);
    let (mut ws, _) = tokio_tungstenite::client_async(ws_url.as_str(), stream)
        .await
        .expect("WebSocket through the router");
    let joined = next_json(&mut ws).await;
    assert_eq!(joined["peers"], 1, "{joined}");
    ws.send(Message::Text(r#"{"op":"increment"}"#.into()))
        .await
        .expect("send");
    let clicked = next_json(&mut ws).await;
    assert_eq!(clicked["count"], 1, "{clicked}");

    // Connected for longer than the grace period: never swept while someone is there.
    tokio::time::sleep(Duration::from_secs(GRACE_SECONDS + 2)).await;
    let during = api.status(&name).await;
    assert_eq!(
        during["phase"], "Ready",
        "a backend with a live connection stays Ready: {during}"
    );

    // Leave; the backend is swept after the grace period and its process ends.
    ws.close(None).await.expect("close");
    drop(ws);
    let left_at = Instant::now();
    let swept = api
        .wait_status(&name, Duration::from_secs(GRACE_SECONDS + 15), |s| {
            s["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Swept"))
        })
        .await;
    let after = left_at.elapsed();
    assert!(
        after >= Duration::from_secs(GRACE_SECONDS) - Duration::from_millis(200),
        "swept only after the grace period ({after:?}): {swept}"
    );
    assert_eq!(swept["reason"], "IdlePastGracePeriod", "{swept}");
    let still = wait_gone(std::slice::from_ref(&app), Duration::from_secs(10));
    assert!(
        still.is_empty(),
        "the app process of a swept backend ends: {still:?}"
    );

    // A second backend, in python, left running for Ctrl-C to stop; `$(PORT)` is expanded by
    // the node agent.
    let python = api
        .spawn(&json!({
            "command": ["python3", "-m", "http.server", "$(PORT)", "--bind", "0.0.0.0"],
            "env": {mark_name: mark_value},
            "gracePeriodSeconds": 300,
        }))
        .await;
    let events = api.follow(&python, Duration::from_secs(30)).await;
    assert_eq!(phases(&events).last().map(String::as_str), Some("Ready"));
    let python_pid = app_pid(&dev.kubeconfig, &python).await;
    let python_process = process(python_pid).expect("python runs");
    assert!(python_process.cmdline.contains("http.server"));

    // Ctrl-C: everything `spawner dev` started goes away, and it exits successfully.
    let started = descendants(dev.pid);
    assert!(
        started.iter().any(|p| p.pid == python_pid),
        "python is a child of spawner dev: {started:?}"
    );
    let exit = dev
        .interrupt(Duration::from_secs(40))
        .expect("spawner dev exits within 40 s of SIGINT");
    assert!(exit.success(), "spawner dev exits 0 after Ctrl-C: {exit:?}");
    let left = wait_gone(&started, Duration::from_secs(5));
    assert!(left.is_empty(), "processes left after Ctrl-C: {left:?}");
    let marked = processes_with_env(&marker);
    assert!(marked.is_empty(), "backend processes left: {marked:?}");
}

/// A backend whose app starts a process of its own (`sleep`, a grandchild of `spawner dev`),
/// Ready: (its app, that child).
async fn backend_with_a_child(dev: &Dev) -> (String, ProcessInfo, ProcessInfo) {
    let api = dev.api();
    let name = api
        .spawn(&json!({
            "command": ["sh", "-c", "sleep 600 & exec \"$0\" demo-backend", SPAWNER],
            "gracePeriodSeconds": 60
        }))
        .await;
    let events = api.follow(&name, Duration::from_secs(30)).await;
    assert_eq!(phases(&events), PHASES_TO_READY, "phases of {name}");
    let pid = app_pid(&dev.kubeconfig, &name).await;
    let app = process(pid).expect("the app process runs while the backend is Ready");
    let child = descendants(pid as u32)
        .into_iter()
        .find(|p| p.cmdline.starts_with("sleep"))
        .expect("the app's own child runs");
    (name, app, child)
}

/// Every process a backend started ends with its pod, and with `spawner dev` even when that is
/// killed outright (SIGKILL: no chance to stop its pods): the app by its parent-death signal
/// (`PR_SET_PDEATHSIG`, set between the clone and the exec), what the app started by the node
/// agent's process-group keeper, which sees the agent's end of a pipe close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_spawner_dev_outright_takes_its_backends_with_it() {
    let dev = Dev::start(DevOptions::default());

    // A terminated backend: its app and the app's child go.
    let (name, app, child) = backend_with_a_child(&dev).await;
    let (code, body) = dev
        .api()
        .call("DELETE", &format!("/backend/{name}"), None)
        .await;
    assert!(
        (200..300).contains(&code),
        "terminate {name}: {code} {body}"
    );
    let alive = wait_gone(&[app, child], Duration::from_secs(30));
    assert!(alive.is_empty(), "left after the pod ended: {alive:?}");

    let (_, app, child) = backend_with_a_child(&dev).await;
    assert_eq!(
        app.ppid, dev.pid as i32,
        "the app is spawner dev's own child"
    );
    // SAFETY: kill has no memory-safety preconditions; only the dev process, not its group.
    unsafe { libc::kill(dev.pid as i32, libc::SIGKILL) };
    let alive = wait_gone(&[app, child], Duration::from_secs(10));
    assert!(
        alive.is_empty(),
        "backend processes outlived a killed spawner dev: {alive:?}"
    );
}

/// Whether `kubectl` runs here; its absence fails the test when SPAWNER_REQUIRE_KUBECTL is set.
fn kubectl_available() -> bool {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found || std::env::var_os("SPAWNER_REQUIRE_KUBECTL").is_none(),
        "kubectl is required (SPAWNER_REQUIRE_KUBECTL is set) but does not run"
    );
    found
}

/// The kubectl command `spawner dev` prints, run exactly as printed, follows a spawned backend
/// to Ready (kubectl sends the kubeconfig's token only over TLS: over plain HTTP it got 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_kubectl_command_watches_backends() {
    if !kubectl_available() {
        eprintln!("kubectl is not installed: skipping the printed kubectl command");
        return;
    }
    let dev = Dev::start(DevOptions::default());
    let words: Vec<&str> = dev.kubectl_command.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"kubectl"), "{}", dev.kubectl_command);
    let mut kubectl = tokio::process::Command::new(words[0])
        .args(&words[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl starts");
    let name = dev
        .api()
        .spawn(&json!({"command": [SPAWNER, "demo-backend"], "gracePeriodSeconds": 60}))
        .await;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut stdout = tokio::io::BufReader::new(kubectl.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The backend's row, up to Ready (the table's phase column).
    while !seen
        .iter()
        .any(|l: &String| l.starts_with(&format!("{name} ")) && l.contains(" Ready "))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stdout.next_line()).await {
            Ok(Ok(Some(line))) => seen.push(line),
            ended => {
                let _ = kubectl.start_kill();
                let mut stderr = String::new();
                if let Some(mut pipe) = kubectl.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                panic!(
                    "`{}` did not show {name} Ready ({ended:?}); stdout:\n{}\nstderr:\n{stderr}",
                    dev.kubectl_command,
                    seen.join("\n")
                );
            }
        }
    }
    let _ = kubectl.start_kill();
}
