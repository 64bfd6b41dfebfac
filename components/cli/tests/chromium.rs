//! The demo in a real browser: headless Chromium opens the launcher of `spawner dev --demo` in
//! two pages, both land on the same demo backend, a click in one shows in the other, and a
//! screenshot is saved to `target/screenshots/demo.png`. Driven over the DevTools protocol.
//!
//! Without Chromium (`chromium` or `chromium-browser` on PATH, or `SPAWNER_CHROMIUM`), the
//! test says so in one line and passes, unless `SPAWNER_REQUIRE_CHROMIUM=1` (CI) makes that a
//! failure.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dev, DevOptions, TempDir, descendants};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const DEMO_GRACE_SECONDS: u32 = 2;

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SPAWNER_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Headless Chromium with a DevTools endpoint, in its own process group; killed on drop.
struct Browser {
    child: Child,
    profile: TempDir,
}

impl Browser {
    fn start(binary: &Path) -> Browser {
        let profile = TempDir::new("chromium");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=900,700",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Browser { child, profile }
    }

    /// The browser's DevTools WebSocket URL, from the file Chromium writes once it listens.
    fn devtools_url(&self) -> String {
        let file = self.profile.0.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "Chromium wrote no DevToolsActivePort within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium closes its helper processes itself on SIGTERM; whatever is left is killed.
        let helpers = descendants(self.child.id());
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for process in helpers.iter().filter(|p| common::is_alive(p)) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(process.pid, libc::SIGKILL) };
        }
        // SAFETY: as above; a negative pid names the process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A DevTools protocol client: one command at a time, events skipped.
struct DevTools {
    ws: common::WebSocket,
    next_id: u64,
}

impl DevTools {
    async fn connect(url: &str) -> DevTools {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("DevTools WebSocket");
        DevTools { ws, next_id: 1 }
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        match self.try_call(session, method, params).await {
            Ok(result) => result,
            Err(error) => panic!("{method} failed: {error}"),
        }
    }

    /// A command's result, or the protocol's error (e.g. no page to evaluate in while the
    /// page navigates).
    async fn try_call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send a DevTools command");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let message = self
                    .ws
                    .next()
                    .await
                    .expect("DevTools socket open")
                    .expect("DevTools frame");
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools json");
                if value["id"] == id {
                    return value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} got no answer within 30 s"));
        if answer["error"].is_null() {
            Ok(answer["result"].clone())
        } else {
            Err(answer["error"].clone())
        }
    }

    /// Opens `url` in a new page and returns the page's session.
    async fn open(&mut self, url: &str) -> String {
        self.open_in(url, None).await
    }

    /// Opens `url` in a new page of a fresh browser context (its own cookies, as another
    /// browser would have) and returns the page's session.
    async fn open_elsewhere(&mut self, url: &str) -> String {
        let context = self
            .call(None, "Target.createBrowserContext", json!({}))
            .await;
        let id = context["browserContextId"]
            .as_str()
            .expect("browserContextId")
            .to_string();
        self.open_in(url, Some(&id)).await
    }

    async fn open_in(&mut self, url: &str, context: Option<&str>) -> String {
        let mut params = json!({"url": url});
        if let Some(id) = context {
            params["browserContextId"] = json!(id);
        }
        let target = self.call(None, "Target.createTarget", params).await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string()
    }

    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        match self.try_eval(session, expression).await {
            Ok(value) => value,
            Err(error) => panic!("evaluating `{expression}` failed: {error}"),
        }
    }

    async fn try_eval(&mut self, session: &str, expression: &str) -> Result<Value, Value> {
        let result = self
            .try_call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until it equals `expected`, at most `timeout`.
    async fn wait_for(
        &mut self,
        session: &str,
        expression: &str,
        expected: &Value,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            // Errors (no page yet while the launcher redirects) count as "not yet".
            let value = self
                .try_eval(session, expression)
                .await
                .unwrap_or_else(|error| error);
            if &value == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{expression}` is {value}, not {expected}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Standard base64 (what `Page.captureScreenshot` returns).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c);
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let produced = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&produced[..chunk.len() - 1]);
    }
    out
}

#[test]
fn base64_decodes_padding() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}

const STATUS: &str = "document.getElementById('status').textContent";
const PEERS: &str = "document.getElementById('peers').textContent";
const COUNT: &str = "document.getElementById('count').textContent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_share_the_demo_backend() {
    let Some(chromium) = find_chromium() else {
        let required = std::env::var("SPAWNER_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "SPAWNER_REQUIRE_CHROMIUM=1 but no chromium on PATH"
        );
        println!("chromium not found: skipping the browser test of the demo page");
        return;
    };
    // The api records the session trace of this run (target/traces/chromium-demo.jsonl; the
    // committed fixtures/traces/recorded-chromium-demo.jsonl is one such recording).
    let traces = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target directory")
        .join("traces");
    std::fs::create_dir_all(&traces).expect("create target/traces");
    let recording = traces.join("chromium-demo.jsonl");
    let mut dev = Dev::start(DevOptions {
        demo_grace_seconds: Some(DEMO_GRACE_SECONDS),
        record_trace: Some(recording.clone()),
        ..Default::default()
    });
    let launcher = dev.demo_url.clone().expect("the demo launcher URL");
    let browser = Browser::start(&chromium);
    let mut devtools = DevTools::connect(&browser.devtools_url()).await;

    let first = devtools.open(&launcher).await;
    let connected = json!("connected");
    devtools
        .wait_for(&first, STATUS, &connected, Duration::from_secs(30))
        .await;
    let second = devtools.open(&launcher).await;
    devtools
        .wait_for(&second, STATUS, &connected, Duration::from_secs(30))
        .await;

    // Both pages were redirected through the router to the one demo backend's URL (the
    // connect token swapped for a cookie and gone from the address).
    let api = dev.api();
    let (status, list) = api.call("GET", "/backends?key=demo", None).await;
    assert_eq!(status, 200, "{list}");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "one demo backend: {list}");
    let backend_url = items[0]["url"].as_str().expect("url").to_string();
    for session in [&first, &second] {
        let href = devtools.eval(session, "location.href").await;
        assert!(
            href.as_str().is_some_and(|h| h.starts_with(&backend_url)),
            "the page is served by the backend at {backend_url}: {href}"
        );
        assert!(
            href.as_str().is_some_and(|h| !h.contains("spawner_token")),
            "the token left the address: {href}"
        );
    }
    for session in [&first, &second] {
        devtools
            .wait_for(session, PEERS, &json!("2"), Duration::from_secs(10))
            .await;
    }

    // A click in the first page shows in the second.
    let before: u64 = devtools
        .eval(&second, COUNT)
        .await
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("a count");
    devtools
        .eval(&first, "document.getElementById('inc').click()")
        .await;
    let after = json!((before + 1).to_string());
    devtools
        .wait_for(&second, COUNT, &after, Duration::from_secs(10))
        .await;
    devtools
        .wait_for(&first, COUNT, &after, Duration::from_secs(10))
        .await;

    // Another browser (no cookie) that knows the backend's address but has no token: 401.
    let stranger = devtools.open_elsewhere(&backend_url).await;
    devtools
        .wait_for(
            &stranger,
            "JSON.parse(document.body.innerText).error.code",
            &json!("token_missing"),
            Duration::from_secs(10),
        )
        .await;
    devtools
        .call(Some(&stranger), "Page.close", json!({}))
        .await;

    // A picture for people.
    devtools
        .call(Some(&second), "Page.bringToFront", json!({}))
        .await;
    let shot = devtools
        .call(
            Some(&second),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        )
        .await;
    let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target directory")
        .join("screenshots");
    std::fs::create_dir_all(&target).expect("create target/screenshots");
    let path = target.join("demo.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("screenshot: {}", path.display());

    // Both tabs closed: the demo backend is swept after its grace period.
    let name = items[0]["name"].as_str().expect("name").to_string();
    for session in [&first, &second] {
        devtools.call(Some(session), "Page.close", json!({})).await;
    }
    api.wait_status(
        &name,
        Duration::from_secs(u64::from(DEMO_GRACE_SECONDS) + 15),
        |s| s["phase"] == "Swept" || s["phase"] == "Terminated",
    )
    .await;

    // The recording, under opaque ids, closed cleanly when `spawner dev` stops: each page's
    // visit is a session (the launcher's user `visitor-<n>`) that asked for the demo key (a
    // spawn) and opened its WebSocket through the router (a connect, in the same session); the
    // click is a message of the first page's connection.
    let exit = dev
        .interrupt(Duration::from_secs(40))
        .expect("spawner dev stops");
    assert!(exit.success(), "{exit:?}");
    let text = std::fs::read_to_string(&recording).expect("the recorded trace");
    let trace = spawner_core::trace::Trace::read(text.as_bytes()).expect("a valid trace");
    assert_eq!(trace.header.source, "api+router");
    assert_eq!(
        trace.keys().len(),
        1,
        "both pages ask for the demo key: {text}"
    );
    use spawner_core::trace::TraceEventKind;
    let sessions_of = |f: fn(&TraceEventKind) -> bool| {
        trace
            .events
            .iter()
            .filter(|e| f(&e.kind))
            .map(|e| e.session.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let spawned = sessions_of(|k| *k == TraceEventKind::Spawn);
    let connected = sessions_of(|k| matches!(k, TraceEventKind::Connect { .. }));
    assert_eq!(spawned.len(), 2, "one session per page: {text}");
    assert_eq!(
        connected, spawned,
        "each page's WebSocket is in its visit's session: {text}"
    );
    assert!(
        trace
            .events
            .iter()
            .any(|e| matches!(e.kind, TraceEventKind::Message { bytes, .. } if bytes > 0)),
        "the click: {text}"
    );
    assert!(
        !text.contains("\"demo\"") && !text.contains("visitor"),
        "{text}"
    );
    println!("recorded trace: {}", recording.display());
}
