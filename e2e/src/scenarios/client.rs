//! A black-box client of the api, over the wire only: JSON requests and the status stream
//! (Server-Sent Events). It deliberately does not reuse the api crate's types, so the suites
//! check the documented contract, not a shared struct.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;
use spawner_core::Phase;
use spawner_core::state_stream::SseParser;

use super::Failure;

/// Longest wait for one ordinary api answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The api sends a heartbeat every few seconds: a status stream silent this long is broken.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Answer of `POST /spawn` and `POST /connect`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spawned {
    pub name: String,
    /// The URL a browser opens (on the router, with a connect token, when the api has keys).
    #[serde(default)]
    pub url: Option<String>,
    pub spawned: bool,
    pub phase: Phase,
}

/// Answer of `GET /backend/{id}/status` and one item of `GET /backends`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub name: String,
    pub phase: Phase,
    pub url: Option<String>,
    pub node: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
}

#[derive(Debug, Deserialize)]
struct BackendList {
    items: Vec<BackendStatus>,
}

/// One `phase` event of the status stream.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseEvent {
    pub name: String,
    pub phase: Phase,
    pub url: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
}

/// The api at `base` (plain `http://`), authenticated by a bearer token.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<http::Response<hyper::body::Incoming>, Failure> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token));
        let bytes = match body {
            Some(json) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(bytes))
            .map_err(|e| Failure::new(format!("building {method} {path}: {e}")))?;
        tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| Failure::new(format!("{method} {path}: no answer within 30 s")))?
            .map_err(|e| Failure::new(format!("{method} {path}: {e:?}")))
    }

    /// Sends a request and returns the status and the JSON body (`null` when not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), Failure> {
        let response = self.send(method.clone(), path, body).await?;
        let status = response.status();
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| Failure::new(format!("{method} {path}: body not read within 30 s")))?
            .map_err(|e| Failure::new(format!("{method} {path}: reading the body: {e}")))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// `call`, expecting a 2xx answer of type `T`.
    async fn call_ok<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, Failure> {
        let (status, json) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(Failure::new(format!("{method} {path}: {status}: {json}")));
        }
        serde_json::from_value(json.clone())
            .map_err(|e| Failure::new(format!("{method} {path}: unexpected answer {json}: {e}")))
    }

    pub async fn spawn(&self, request: &Value) -> Result<Spawned, Failure> {
        self.call_ok(Method::POST, "/spawn", Some(request)).await
    }

    pub async fn connect(&self, request: &Value) -> Result<Spawned, Failure> {
        self.call_ok(Method::POST, "/connect", Some(request)).await
    }

    pub async fn status(&self, name: &str) -> Result<BackendStatus, Failure> {
        self.call_ok(Method::GET, &format!("/backend/{name}/status"), None)
            .await
    }

    pub async fn list_by_key(&self, key: &str) -> Result<Vec<BackendStatus>, Failure> {
        let path = format!("/backends?key={}", percent_encode(key));
        let list: BackendList = self.call_ok(Method::GET, &path, None).await?;
        Ok(list.items)
    }

    pub async fn terminate(&self, name: &str) -> Result<(), Failure> {
        let _: Value = self
            .call_ok(Method::DELETE, &format!("/backend/{name}"), None)
            .await?;
        Ok(())
    }

    /// Follows `name`'s status stream from its beginning (the api replays the phases reached so
    /// far) until a phase for which `stop` is true, a terminal phase, or `timeout`. Returns
    /// every phase event received, in order.
    pub async fn follow_phases(
        &self,
        name: &str,
        timeout: Duration,
        stop: impl Fn(Phase) -> bool,
    ) -> Result<Vec<PhaseEvent>, Failure> {
        let path = format!("/backend/{name}/status/stream");
        let mut seen = Vec::new();
        let outcome = tokio::time::timeout(timeout, async {
            let response = self.send(Method::GET, &path, None).await?;
            if !response.status().is_success() {
                return Err(Failure::new(format!("GET {path}: {}", response.status())));
            }
            let mut body = response.into_body();
            let mut parser = SseParser::new();
            loop {
                let frame = tokio::time::timeout(STREAM_READ_TIMEOUT, body.frame())
                    .await
                    .map_err(|_| Failure::new(format!("{path}: silent for 30 s (no heartbeat)")))?;
                let Some(frame) = frame else {
                    return Err(Failure::new(format!(
                        "{path} ended after {:?} without a terminal phase",
                        phases(&seen)
                    )));
                };
                let frame = frame.map_err(|e| Failure::new(format!("{path}: reading: {e}")))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let messages = parser
                    .push(data)
                    .map_err(|e| Failure::new(format!("{path}: {e:?}")))?;
                for message in messages {
                    match message.event.as_str() {
                        "phase" => {
                            let event: PhaseEvent =
                                serde_json::from_str(&message.data).map_err(|e| {
                                    Failure::new(format!(
                                        "{path}: bad phase event {}: {e}",
                                        message.data
                                    ))
                                })?;
                            let phase = event.phase;
                            seen.push(event);
                            if stop(phase) || phase.is_terminal() {
                                return Ok(());
                            }
                        }
                        "deleted" => {
                            return Err(Failure::new(format!(
                                "{name} was deleted after {:?}",
                                phases(&seen)
                            )));
                        }
                        _ => {}
                    }
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(seen),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::new(format!(
                "{name}: no phase to stop at within {timeout:?}; phases seen: {:?}",
                phases(&seen)
            ))),
        }
    }
}

/// What an open status stream gave next.
#[derive(Debug)]
pub enum StreamItem {
    /// A `phase` event, with its SSE `id`.
    Phase {
        id: Option<String>,
        event: PhaseEvent,
    },
    /// The backend disappeared without a terminal phase (event `deleted`).
    Deleted,
    /// The stream ended: the api closed it (it shuts down) or the connection broke.
    Ended,
}

/// One open `GET /backend/{id}/status/stream`, read event by event (so a client can reconnect
/// with `Last-Event-ID` when it ends, as a browser's `EventSource` does).
pub struct StatusStream {
    path: String,
    body: hyper::body::Incoming,
    parser: SseParser,
    pending: std::collections::VecDeque<StreamItem>,
}

impl StatusStream {
    /// The next phase or end. A stream silent past the heartbeat interval is an error: a stream
    /// that broke without a word would otherwise hang the caller.
    pub async fn next(&mut self) -> Result<StreamItem, Failure> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            let frame = tokio::time::timeout(STREAM_READ_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| {
                    Failure::new(format!("{}: silent for 30 s (no heartbeat)", self.path))
                })?;
            let data = match frame {
                None | Some(Err(_)) => return Ok(StreamItem::Ended),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            let messages = self
                .parser
                .push(&data)
                .map_err(|e| Failure::new(format!("{}: {e:?}", self.path)))?;
            for message in messages {
                match message.event.as_str() {
                    "phase" => {
                        let event: PhaseEvent =
                            serde_json::from_str(&message.data).map_err(|e| {
                                Failure::new(format!(
                                    "{}: bad phase event {}: {e}",
                                    self.path, message.data
                                ))
                            })?;
                        self.pending.push_back(StreamItem::Phase {
                            id: message.id,
                            event,
                        });
                    }
                    "deleted" => self.pending.push_back(StreamItem::Deleted),
                    _ => {}
                }
            }
        }
    }
}

impl ApiClient {
    /// Opens `name`'s status stream, after the event `last_event_id` when given.
    pub async fn open_stream(
        &self,
        name: &str,
        last_event_id: Option<&str>,
    ) -> Result<StatusStream, Failure> {
        let path = format!("/backend/{name}/status/stream");
        let mut builder = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token));
        if let Some(id) = last_event_id {
            builder = builder.header("last-event-id", id);
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .map_err(|e| Failure::new(format!("building GET {path}: {e}")))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| Failure::new(format!("GET {path}: no answer within 30 s")))?
            .map_err(|e| Failure::new(format!("GET {path}: {e:?}")))?;
        if !response.status().is_success() {
            return Err(Failure::new(format!("GET {path}: {}", response.status())));
        }
        Ok(StatusStream {
            path,
            body: response.into_body(),
            parser: SseParser::new(),
            pending: Default::default(),
        })
    }

    /// Follows `name`'s status stream as a browser's `EventSource` does: when the stream ends
    /// or cannot be opened (an api replica went away), it reconnects with `Last-Event-ID` (every
    /// `retry`) until a phase for which `stop` is true, a terminal phase, or `timeout`. Returns
    /// every phase event received, in order, and how many times it reconnected.
    pub async fn follow_phases_resuming(
        &self,
        name: &str,
        timeout: Duration,
        stop: impl Fn(Phase) -> bool,
    ) -> Result<(Vec<PhaseEvent>, usize), Failure> {
        const RETRY: Duration = Duration::from_millis(500);
        let mut seen: Vec<PhaseEvent> = Vec::new();
        let mut last_id: Option<String> = None;
        let mut reconnects = 0;
        let outcome = tokio::time::timeout(timeout, async {
            loop {
                let mut stream = match self.open_stream(name, last_id.as_deref()).await {
                    Ok(stream) => stream,
                    Err(_) => {
                        reconnects += 1;
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                };
                loop {
                    match stream.next().await {
                        Ok(StreamItem::Phase { id, event }) => {
                            let phase = event.phase;
                            last_id = id.or(last_id.take());
                            seen.push(event);
                            if stop(phase) || phase.is_terminal() {
                                return Ok(());
                            }
                        }
                        Ok(StreamItem::Deleted) => {
                            return Err(Failure::new(format!(
                                "{name} was deleted after {:?}",
                                phases(&seen)
                            )));
                        }
                        Ok(StreamItem::Ended) | Err(_) => break,
                    }
                }
                reconnects += 1;
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok((seen, reconnects)),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::new(format!(
                "{name}: no phase to stop at within {timeout:?}; phases seen: {:?}",
                phases(&seen)
            ))),
        }
    }
}

/// The phases of `events`, for messages.
pub fn phases(events: &[PhaseEvent]) -> Vec<Phase> {
    events.iter().map(|e| e.phase).collect()
}

fn percent_encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(percent_encode("room 42/a"), "room%2042%2Fa");
        assert_eq!(percent_encode("e2e-x_1.~"), "e2e-x_1.~");
    }
}
