//! `spawner spawn | status | ls | rm`: a client of the api's JSON over HTTP.
//!
//! Every failure is one line on stderr and a non-zero exit: the api unreachable, a bad token,
//! an unknown backend, a spec the api refuses (with its field paths).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use spawner_core::state_stream::SseParser;

/// Where the api is and how to authenticate; shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiTarget {
    /// Base URL of the Spawner api (`spawner dev` prints it).
    #[arg(
        long = "api",
        env = "SPAWNER_API_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    pub api: String,
    /// Bearer token of the api (`spawner dev` prints it).
    #[arg(long, env = "SPAWNER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SpawnArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Container image of the application (Kubernetes).
    #[arg(long)]
    pub image: Option<String>,
    /// Port the application listens on (given to it as PORT).
    #[arg(long)]
    pub port: Option<u16>,
    /// Seconds without any connection before the backend is swept.
    #[arg(long = "grace")]
    pub grace_period_seconds: Option<u32>,
    /// Hard limit on the backend's life, in seconds.
    #[arg(long = "max-lifetime")]
    pub max_lifetime_seconds: Option<u32>,
    /// Get-or-create key: the same key reaches the same live backend.
    #[arg(long)]
    pub key: Option<String>,
    /// Environment variable of the application, NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Follow the backend until it is Ready (or fails).
    #[arg(long)]
    pub wait: bool,
    /// Command of the application, after `--` (process backends in `spawner dev`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Name of the backend.
    pub name: String,
    /// Follow the phases as they happen; exit 0 at Ready, 1 if it fails or ends first.
    #[arg(long, short)]
    pub watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Only the backend of this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Label selector, e.g. `team=docs`.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Names of the backends to terminate.
    #[arg(required = true)]
    pub names: Vec<String>,
}

fn parse_pair(input: &str) -> Result<(String, String), String> {
    input
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected NAME=VALUE, got {input:?}"))
}

/// A small HTTP client of the api.
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(target: &ApiTarget) -> anyhow::Result<Self> {
        let base = target.api.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!(
                "the api URL must start with http:// (got {base:?}); for an https endpoint use `kubectl port-forward` to the api service"
            );
        }
        Ok(Self {
            base,
            token: target.token.clone(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(b) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        Ok(builder.body(Full::new(body))?)
    }

    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let response = tokio::time::timeout(Duration::from_secs(30), self.http.request(request))
            .await
            .map_err(|_| anyhow!("the api at {} did not answer within 30 s", self.base))?
            .map_err(|e| anyhow!("cannot reach the api at {}: {}", self.base, root_cause(&e)))?;
        Ok(response)
    }

    /// Sends a request and returns the JSON answer of a 2xx, or the api's error as one line.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let response = self.send(self.request(method, path, body)?).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading the api's answer")?
            .to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        Err(anyhow!(error_line(status, &json)))
    }

    /// Follows the backend's phase stream, printing each phase; `Ok(true)` at Ready.
    pub async fn watch(&self, name: &str, out: &mut (dyn Write + Send)) -> anyhow::Result<bool> {
        let path = format!("/backend/{name}/status/stream");
        let response = self
            .send(self.request(http::Method::GET, &path, None)?)
            .await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!(error_line(status, &json));
        }
        let mut parser = SseParser::new();
        let spinner = Spinner::new(std::io::stderr().is_terminal());
        let mut last_phase = String::new();
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = tokio::time::sleep(Duration::from_millis(120)) => {
                    spinner.tick(&last_phase);
                    continue;
                }
            };
            let Some(frame) = frame else {
                spinner.clear();
                bail!("the status stream of {name} ended before it was Ready");
            };
            let frame = frame.context("reading the status stream")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for message in parser.push(data)? {
                if message.event == "deleted" {
                    spinner.clear();
                    bail!("{name} was deleted before it was Ready");
                }
                if message.event != "phase" {
                    continue;
                }
                let event: Value = serde_json::from_str(&message.data)
                    .context("the api sent a phase event that is not JSON")?;
                let phase = event["phase"].as_str().unwrap_or("?").to_string();
                spinner.clear();
                writeln!(out, "{}", describe_phase(&event))?;
                out.flush()?;
                match phase.as_str() {
                    "Ready" => return Ok(true),
                    "Failed" | "Swept" | "Terminated" => return Ok(false),
                    _ => {}
                }
                last_phase = phase;
            }
        }
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// One line for an api error: its message, the field problems, and what to do about a 401.
pub fn error_line(status: http::StatusCode, body: &Value) -> String {
    let message = body["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("the api answered {status}"));
    let fields: Vec<String> = body["error"]["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some(format!(
                "{}: {}",
                f["field"].as_str()?,
                f["message"].as_str()?
            ))
        })
        // The api's message may already spell the problems out; say each once.
        .filter(|problem| !message.contains(problem.as_str()))
        .collect();
    let mut line = message;
    if !fields.is_empty() {
        line.push_str(&format!(" ({})", fields.join("; ")));
    }
    if status == http::StatusCode::UNAUTHORIZED {
        line.push_str(" — pass the api token with --token or SPAWNER_TOKEN");
    }
    line
}

fn describe_phase(event: &Value) -> String {
    let phase = event["phase"].as_str().unwrap_or("?");
    let mut line = format!("{phase:<12}");
    if let Some(time) = event["time"].as_str() {
        line.push_str(&format!(" {time}"));
    }
    for field in ["node", "url", "reason", "message"] {
        if let Some(v) = event[field].as_str() {
            line.push_str(&format!("  {field}={v}"));
        }
    }
    if let Some(code) = event["exitCode"].as_i64() {
        line.push_str(&format!("  exitCode={code}"));
    }
    line
}

/// A one-line spinner on stderr while waiting, only on a terminal.
struct Spinner {
    enabled: bool,
    frame: std::sync::atomic::AtomicUsize,
}

impl Spinner {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            frame: Default::default(),
        }
    }

    fn tick(&self, phase: &str) {
        if !self.enabled {
            return;
        }
        const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
        let i = self
            .frame
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let label = if phase.is_empty() { "waiting" } else { phase };
        eprint!("\r{} {label}…   ", FRAMES[i % FRAMES.len()]);
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

/// The spawn request of `args`.
pub fn spawn_body(args: &SpawnArgs) -> Value {
    let mut body = json!({});
    if let Some(image) = &args.image {
        body["image"] = json!(image);
    }
    if !args.command.is_empty() {
        body["command"] = json!(args.command);
    }
    if let Some(port) = args.port {
        body["port"] = json!(port);
    }
    if let Some(grace) = args.grace_period_seconds {
        body["gracePeriodSeconds"] = json!(grace);
    }
    if let Some(lifetime) = args.max_lifetime_seconds {
        body["maxLifetimeSeconds"] = json!(lifetime);
    }
    if let Some(key) = &args.key {
        body["key"] = json!(key);
    }
    if !args.env.is_empty() {
        body["env"] = args
            .env
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    body
}

pub async fn spawn(args: SpawnArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.target)?;
    let body = spawn_body(&args);
    let path = if args.key.is_some() {
        "/connect"
    } else {
        "/spawn"
    };
    let answer = client.call(http::Method::POST, path, Some(&body)).await?;
    let name = answer["name"]
        .as_str()
        .ok_or_else(|| anyhow!("the api's answer has no backend name"))?
        .to_string();
    writeln!(out, "{name}")?;
    if let Some(url) = answer["url"].as_str() {
        // On stderr: stdout stays the name alone, for scripts.
        eprintln!("open {url}");
    }
    if answer["spawned"].as_bool() == Some(false) {
        eprintln!(
            "(the live backend of key {:?})",
            args.key.unwrap_or_default()
        );
    }
    if args.wait && !client.watch(&name, out).await? {
        bail!("{name} did not become Ready");
    }
    Ok(())
}

pub async fn status(args: StatusArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.target)?;
    if args.watch {
        if client.watch(&args.name, out).await? {
            return Ok(());
        }
        bail!("{} did not become Ready", args.name);
    }
    let status = client
        .call(
            http::Method::GET,
            &format!("/backend/{}/status", args.name),
            None,
        )
        .await?;
    writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    Ok(())
}

pub async fn ls(args: LsArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.target)?;
    let mut query = Vec::new();
    if let Some(key) = &args.key {
        query.push(format!("key={}", encode(key)));
    }
    if let Some(selector) = &args.selector {
        query.push(format!("labelSelector={}", encode(selector)));
    }
    let path = if query.is_empty() {
        "/backends".to_string()
    } else {
        format!("/backends?{}", query.join("&"))
    };
    let list = client.call(http::Method::GET, &path, None).await?;
    let items = list["items"]
        .as_array()
        .or_else(|| list.as_array())
        .cloned()
        .unwrap_or_default();
    writeln!(out, "{:<28} {:<12} {:<14} URL", "NAME", "PHASE", "NODE")?;
    for item in items {
        writeln!(
            out,
            "{:<28} {:<12} {:<14} {}",
            item["name"].as_str().unwrap_or("-"),
            item["phase"].as_str().unwrap_or("-"),
            item["node"].as_str().unwrap_or("-"),
            item["url"].as_str().unwrap_or("-"),
        )?;
    }
    Ok(())
}

pub async fn rm(args: RmArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.target)?;
    for name in &args.names {
        client
            .call(http::Method::DELETE, &format!("/backend/{name}"), None)
            .await
            .with_context(|| format!("terminating {name}"))?;
        writeln!(out, "{name} terminating")?;
    }
    Ok(())
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_carry_fields_and_token_hint() {
        let body = json!({"error": {"code": "invalid", "message": "invalid spawn request",
            "fields": [{"field": "port", "message": "must be between 1 and 65535"}]}});
        assert_eq!(
            error_line(http::StatusCode::UNPROCESSABLE_ENTITY, &body),
            "invalid spawn request (port: must be between 1 and 65535)"
        );
        let body = json!({"error": {"code": "unauthorized", "message": "missing or wrong token", "fields": []}});
        assert!(error_line(http::StatusCode::UNAUTHORIZED, &body).ends_with("SPAWNER_TOKEN"));
        assert_eq!(
            error_line(http::StatusCode::BAD_GATEWAY, &Value::Null),
            "the api answered 502 Bad Gateway"
        );
    }

    #[test]
    fn field_problems_already_in_the_message_are_not_repeated() {
        let body = json!({"error": {"code": "invalid",
            "message": "invalid request: port: must be between 1 and 65535",
            "fields": [{"field": "port", "message": "must be between 1 and 65535"}]}});
        assert_eq!(
            error_line(http::StatusCode::UNPROCESSABLE_ENTITY, &body),
            "invalid request: port: must be between 1 and 65535"
        );
    }

    #[test]
    fn spawn_body_has_only_what_was_given() {
        let args = SpawnArgs {
            target: ApiTarget {
                api: "http://x".into(),
                token: None,
            },
            image: None,
            port: Some(3000),
            grace_period_seconds: Some(30),
            max_lifetime_seconds: None,
            key: Some("room".into()),
            env: vec![("A".into(), "1".into())],
            wait: false,
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
        };
        assert_eq!(
            spawn_body(&args),
            json!({"command": ["python3", "-m", "http.server"], "port": 3000,
                   "gracePeriodSeconds": 30, "key": "room", "env": {"A": "1"}})
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("team=docs,a b"), "team%3Ddocs%2Ca%20b");
    }
}
