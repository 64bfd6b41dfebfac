//! Deliberate bugs, to prove that the simulator catches real ones. Each mutant changes one
//! behaviour of one component; `tests/mutants.rs` runs a world with it and expects the
//! invariant it breaks to be reported.
//!
//! Most live here, around the production components' inputs and outputs (wrappers of their
//! API server clients, a racy api, hosts deployed wrongly); the rest are switches inside the
//! sweeper, the sidecar, the router and the WebSocket relay behind their `sim-mutants` feature,
//! which only this crate enables, set per thread (every host of a world runs on the thread
//! stepping it).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use spawner_core::SessionLivedBackend;
use tower::{Service, ServiceExt};

use crate::net::SimListener;

/// A deliberate bug to run a world with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// The sweeper takes a broken event stream as idleness and sweeps the backend.
    SweepOnLostStream,
    /// The sidecar never counts down a WebSocket that ended abnormally (reset, dead client).
    SidecarForgetsAbnormalEnds,
    /// The controller creates a backend's pod a second time, under another name, as a retry
    /// that does not check what exists would.
    ControllerCreatesPodTwice,
    /// The api's get-or-create by key looks the key up, then creates under a fresh name: two
    /// users arriving together both miss and both create.
    RacyKeyLookup,
    /// The api lists a key's backends without their status (as a metadata-only list would), so
    /// it takes a swept backend for the key's live one until it is deleted: users are handed a
    /// backend that has ended and fail to connect. No store invariant breaks; only what users
    /// see does.
    ApiListsWithoutStatus,
    /// The last controller replica runs without leader election (deployed with
    /// `--no-leader-election` next to elected replicas): it reconciles beside the leader.
    ReplicaWithoutLeaderElection,
    /// Every api replica has a key secret of its own (deployed without a shared
    /// `SPAWNER_KEY_SECRET`): replicas name a key's backends differently, so two users of one
    /// room who reach different replicas both create.
    ApiReplicasWithOwnKeySecrets,
    /// The router dials, every fourth time, an address it dialled before for another backend
    /// (a stale upstream): users reach a backend their token does not name.
    RouterDialsAnotherBackend,
    /// The router checks a connect token against the backend the token names, not the one the
    /// request is routed to: a token for backend A opens backend B.
    RouterAcceptsTokensForAnyBackend,
    /// The api answers a terminate request as accepted but its patch records nothing (an
    /// empty merge patch): the backend lives on.
    ApiDropsTerminateRequests,
    /// The node's runtime never reports an app that crashed: the pod looks running, the
    /// backend stays Ready with its app dead (as a runtime that lost a container's exit).
    AppCrashesUnreported,
    /// The controller's API server client drops a watch's 410 Expired error (the watch just
    /// ends), so it resumes from the same expired version again and again and never lists:
    /// after a compaction it sees no change any more.
    ControllerSwallowsExpiredWatches,
    /// The controller's API server client sends a request answered 429 again at once,
    /// ignoring `Retry-After` (a hot loop), below the retry layer that would wait.
    ControllerRetriesThrottledAtOnce,
    /// The WebSocket relays (sidecar and router) hear a client only when it sends bytes they
    /// relay: the pongs an idle user answers their pings with do not count, and the user is
    /// dropped as dead while its backend lives.
    RelayIgnoresPongs,
    /// The controller's API server client loses pod deletions from its watches (a cache that
    /// misses deletions): a pod evicted under a backend still looks present and running to it.
    ControllerMissesPodDeletions,
}

/// Switches the per-thread mutants of the production crates for the calling thread.
pub fn switch_on(mutant: Option<Mutant>) {
    spawner_sweeper::mutants::sweep_on_lost_stream(mutant == Some(Mutant::SweepOnLostStream));
    spawner_sidecar::mutants::forget_abnormal_countdown(
        mutant == Some(Mutant::SidecarForgetsAbnormalEnds),
    );
    spawner_proxy::mutants::only_relayed_bytes_heard(mutant == Some(Mutant::RelayIgnoresPongs));
    spawner_router::mutants::accept_tokens_for_any_backend(
        mutant == Some(Mutant::RouterAcceptsTokensForAnyBackend),
    );
}

type Request = http::Request<kube::client::Body>;

/// Wraps the controller's connection to the API server: every successful pod create is sent
/// again with `-retry` appended to the pod's name.
#[derive(Clone)]
pub struct DuplicatePodCreates<S>(pub S);

impl<S> Service<Request> for DuplicatePodCreates<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let is_pod_create =
            request.method() == http::Method::POST && request.uri().path().ends_with("/pods");
        if !is_pod_create {
            return Box::pin(self.0.call(request));
        }
        let again = self.0.clone();
        let mut first = std::mem::replace(&mut self.0, again.clone());
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let rebuild = |body: bytes::Bytes| {
                let mut builder = http::Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone());
                for (name, value) in &parts.headers {
                    builder = builder.header(name, value);
                }
                builder.body(kube::client::Body::from(body))
            };
            let Ok(original) = rebuild(bytes.clone()) else {
                unreachable!("the parts came from a valid request")
            };
            let response = first.call(original).await?;
            if let Ok(mut pod) = serde_json::from_slice::<Value>(&bytes)
                && let Some(name) = pod["metadata"]["name"].as_str()
            {
                pod["metadata"]["name"] = Value::String(format!("{name}-retry"));
                if let Ok(body) = serde_json::to_vec(&pod)
                    && let Ok(duplicate) = rebuild(body.into())
                    && let Ok(service) = again.ready_oneshot().await
                {
                    let _ = service.oneshot(duplicate).await;
                }
            }
            Ok(response)
        })
    }
}

/// Wraps the api's connection to the API server: backend lists (not watches) come back with
/// every item's `status` removed.
#[derive(Clone)]
pub struct ListsWithoutStatus<S>(pub S);

type Buffered = http_body_util::Full<bytes::Bytes>;

impl<S, B> Service<Request> for ListsWithoutStatus<S>
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = http::Response<Buffered>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let is_backend_list = request.method() == http::Method::GET
            && request.uri().path().ends_with("/sessionlivedbackends")
            && !request.uri().query().unwrap_or("").contains("watch=");
        let call = self.0.call(request);
        Box::pin(async move {
            use http_body_util::BodyExt;
            let response = call.await?;
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let bytes = match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut list) if is_backend_list => {
                    if let Some(items) = list["items"].as_array_mut() {
                        for item in items {
                            if let Some(item) = item.as_object_mut() {
                                item.remove("status");
                            }
                        }
                    }
                    serde_json::to_vec(&list).map_or(bytes, Into::into)
                }
                _ => bytes,
            };
            Ok(http::Response::from_parts(parts, Buffered::new(bytes)))
        })
    }
}

/// Wraps the api's connection to the API server: every patch of a backend is sent as an
/// empty merge patch (the API server answers the unchanged backend).
#[derive(Clone)]
pub struct EmptyBackendPatches<S>(pub S);

impl<S> Service<Request> for EmptyBackendPatches<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let is_backend_patch = request.method() == http::Method::PATCH
            && request.uri().path().contains("/sessionlivedbackends/");
        if !is_backend_patch {
            return self.0.call(request);
        }
        let (mut parts, _) = request.into_parts();
        parts.headers.remove(http::header::CONTENT_LENGTH);
        self.0.call(Request::from_parts(
            parts,
            kube::client::Body::from(b"{}".to_vec()),
        ))
    }
}

/// Wraps a client's connection to the API server: a watch's `ERROR` event with code 410 is
/// dropped from the stream, so the watch ends as if it timed out.
#[derive(Clone)]
pub struct SwallowsExpiredWatches<S>(pub S);

impl<S, B> Service<Request> for SwallowsExpiredWatches<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<WithoutEvents<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let call = self.0.call(request);
        Box::pin(async move {
            Ok(call.await?.map(|body| WithoutEvents {
                body,
                drops: is_expiry,
            }))
        })
    }
}

/// Wraps a client's connection to the API server: a watch's events of pods being deleted
/// (the update that sets `deletionTimestamp`, and `DELETED`) are dropped from the stream.
#[derive(Clone)]
pub struct MissesPodDeletions<S>(pub S);

impl<S, B> Service<Request> for MissesPodDeletions<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<WithoutEvents<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let call = self.0.call(request);
        Box::pin(async move {
            Ok(call.await?.map(|body| WithoutEvents {
                body,
                drops: is_pod_deletion,
            }))
        })
    }
}

/// A pod's deletion: its `DELETED` event, or the update that began it (graceful deletion sets
/// `deletionTimestamp` first).
fn is_pod_deletion(text: &str) -> bool {
    text.contains("\"kind\":\"Pod\"")
        && (text.contains("\"type\":\"DELETED\"") || text.contains("\"deletionTimestamp\""))
}

fn is_expiry(text: &str) -> bool {
    text.contains("\"type\":\"ERROR\"") && text.contains("\"code\":410")
}

/// A response body without the data frames `drops` picks (by their text): watch events.
pub struct WithoutEvents<B> {
    body: B,
    drops: fn(&str) -> bool,
}

impl<B> http_body::Body for WithoutEvents<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        loop {
            let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
            let drops = self.drops;
            let dropped = frame
                .as_ref()
                .and_then(|f| f.as_ref().ok())
                .and_then(|f| f.data_ref())
                .is_some_and(|data| drops(&String::from_utf8_lossy(data)));
            if !dropped {
                return Poll::Ready(frame);
            }
        }
    }
}

/// Wraps a client's connection to the API server: a request answered 429 is sent again at
/// once, until it is answered otherwise.
#[derive(Clone)]
pub struct RetriesThrottledAtOnce<S>(pub S);

impl<S, B> Service<Request> for RetriesThrottledAtOnce<S>
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let again = self.0.clone();
        let mut first = std::mem::replace(&mut self.0, again.clone());
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let rebuild = || {
                let mut builder = http::Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone());
                for (name, value) in &parts.headers {
                    builder = builder.header(name, value);
                }
                let Ok(request) = builder.body(kube::client::Body::from(bytes.clone())) else {
                    unreachable!("the parts came from a valid request")
                };
                request
            };
            let mut response = first.call(rebuild()).await?;
            while response.status() == http::StatusCode::TOO_MANY_REQUESTS {
                response = again.clone().ready_oneshot().await?.call(rebuild()).await?;
            }
            Ok(response)
        })
    }
}

#[derive(Clone)]
struct RacyState {
    backends: Api<SessionLivedBackend>,
    namespace: String,
}

/// An "api" with the two endpoints simulated users call, whose get-or-create is a lookup
/// followed by a create under a fresh name: nothing makes the lookup and the create one step.
pub async fn racy_api(
    client: kube::Client,
    namespace: &str,
    listener: SimListener,
) -> std::io::Result<()> {
    let state = RacyState {
        backends: Api::namespaced(client, namespace),
        namespace: namespace.to_string(),
    };
    let app = axum::Router::new()
        .route("/connect", post(racy_connect))
        .route("/backend/{name}/status", get(racy_status))
        .with_state(state);
    axum::serve(listener, app).await
}

fn is_live(backend: &SessionLivedBackend) -> bool {
    let phase = backend.status.as_ref().map(|s| s.phase).unwrap_or_default();
    !phase.is_terminal() && backend.metadata.deletion_timestamp.is_none()
}

async fn racy_connect(
    State(state): State<RacyState>,
    Json(request): Json<Value>,
) -> Result<Json<Value>, http::StatusCode> {
    let unavailable = |_| http::StatusCode::SERVICE_UNAVAILABLE;
    let key = request["key"].as_str().unwrap_or_default().to_string();
    let existing = state
        .backends
        .list(&ListParams::default())
        .await
        .map_err(unavailable)?
        .items
        .into_iter()
        .find(|b| b.spec.key.as_deref() == Some(key.as_str()) && is_live(b));
    if let Some(backend) = existing {
        return Ok(Json(
            json!({"name": backend.metadata.name, "spawned": false}),
        ));
    }
    let name = spawner_core::id::new_backend_id("racy-")
        .map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name, "namespace": state.namespace},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "command": request["command"]}]}},
            "httpPort": request["port"],
            "gracePeriodSeconds": request["gracePeriodSeconds"],
            "key": key,
        }
    }))
    .map_err(|_| http::StatusCode::BAD_REQUEST)?;
    state
        .backends
        .create(&PostParams::default(), &backend)
        .await
        .map_err(unavailable)?;
    Ok(Json(json!({"name": name, "spawned": true})))
}

async fn racy_status(
    State(state): State<RacyState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, http::StatusCode> {
    let backend = state
        .backends
        .get_opt(&name)
        .await
        .map_err(|_| http::StatusCode::SERVICE_UNAVAILABLE)?
        .ok_or(http::StatusCode::NOT_FOUND)?;
    let status = backend.status.unwrap_or_default();
    Ok(Json(
        json!({"name": name, "phase": status.phase, "url": status.url}),
    ))
}
