//! The router and its handlers. Each handler is small: extract, call the Kubernetes API through
//! the backend store functions below, answer.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use spawner_core::SessionLivedBackend;
use spawner_core::connect_token::{self, Claims, Purpose};
use spawner_core::resource::{KEY_LABEL, is_public};
use tokio::sync::watch;

use crate::auth::Authenticated;
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::extract::{BackendName, JsonBody, QueryParams};
use crate::model::{
    BackendList, BackendStatus, ListQuery, SpawnRequest, SpawnResponse, TERMINATE_ANNOTATION,
    TerminateResponse, is_live, mark_public, new_backend, terminate_requested_at,
};
use crate::naming::{
    KEY_GENERATION_LABEL, KeyNames, MAX_GENERATION, api_urls, key_label_value, public_base,
    with_query_param,
};

/// What every handler shares.
pub struct AppState {
    pub(crate) backends: Api<SessionLivedBackend>,
    pub(crate) config: ApiConfig,
    /// Becomes `true` when the server shuts down, so status streams end and graceful shutdown
    /// does not wait for them forever.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The shared watch of status streams, and their cap.
    pub(crate) hub: Arc<crate::hub::StatusHub>,
    /// Names the trace sessions of requests that name none: a random prefix (unique to this
    /// replica, so merged replicas' traces do not share them) and a counter.
    anonymous_prefix: String,
    anonymous_sessions: std::sync::atomic::AtomicU64,
}

pub type SharedState = Arc<AppState>;

/// How often a get-or-create retries after losing a race before giving up with 503.
const GET_OR_CREATE_ATTEMPTS: usize = 8;

/// The api's routes over `backends`' namespace.
pub fn router(client: kube::Client, config: ApiConfig, shutdown: watch::Receiver<bool>) -> Router {
    let backends = Api::namespaced(client, &config.namespace);
    let body_limit = config.max_body_bytes;
    let hub = crate::hub::StatusHub::new(
        backends.clone(),
        config.watch_idle_timeout,
        config.max_status_streams,
        shutdown.clone(),
    );
    let state = Arc::new(AppState {
        backends,
        config,
        shutdown,
        hub,
        anonymous_prefix: spawner_core::id::new_backend_id("request-").unwrap_or_default(),
        anonymous_sessions: Default::default(),
    });
    Router::new()
        .route("/spawn", post(spawn))
        .route("/connect", post(connect))
        .route("/backends", get(list))
        .route("/backend/{id}", delete(terminate))
        .route("/backend/{id}/status", get(status))
        .route(
            "/backend/{id}/status/stream",
            get(crate::stream::status_stream),
        )
        .route("/backend/{id}/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", uri.path()),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

async fn openapi(State(state): State<SharedState>) -> Json<serde_json::Value> {
    Json(crate::openapi::document_with(&state.config.limits))
}

/// `POST /spawn`: a new backend; with a `key`, get-or-create as `/connect`.
async fn spawn(
    State(state): State<SharedState>,
    _auth: Authenticated,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SpawnRequest>,
) -> Result<(StatusCode, Json<SpawnResponse>), ApiError> {
    let spec = request.to_spec(&state.config.limits)?;
    let (backend, spawned) = if spec.key.is_some() {
        get_or_create(&state, spec, &request).await?
    } else {
        (create_new(&state, spec, &request).await?, true)
    };
    record_spawn(&state, &headers, &backend, request.user.as_deref());
    spawn_answer(&state, &headers, &backend, spawned, request.user.as_deref())
}

/// `POST /connect`: the live backend of `key`, created when there is none.
async fn connect(
    State(state): State<SharedState>,
    _auth: Authenticated,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SpawnRequest>,
) -> Result<(StatusCode, Json<SpawnResponse>), ApiError> {
    if request.key.is_none() {
        return Err(ApiError::validation(vec![crate::error::FieldProblem {
            field: "key".into(),
            message: "is required by /connect".into(),
        }]));
    }
    let spec = request.to_spec(&state.config.limits)?;
    let (backend, spawned) = get_or_create(&state, spec, &request).await?;
    record_spawn(&state, &headers, &backend, request.user.as_deref());
    spawn_answer(&state, &headers, &backend, spawned, request.user.as_deref())
}

/// Header by which a web app names the user session a request is made for (recorded as an
/// opaque id in session traces).
pub const SESSION_HEADER: &str = "x-spawner-session";

/// Records an answered spawn or connect in the session trace, if one is recorded: the session
/// (the `x-spawner-session` header, else the request's `user`, else one per request), and the
/// backend's key (its name when it has none).
fn record_spawn(
    state: &AppState,
    headers: &HeaderMap,
    backend: &SessionLivedBackend,
    user: Option<&str>,
) {
    let Some(trace) = &state.config.trace else {
        return;
    };
    let key = backend
        .spec
        .key
        .clone()
        .unwrap_or_else(|| backend.name_any());
    let kind = spawner_core::trace::TraceEventKind::Spawn;
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .or(user);
    match session {
        Some(session) => trace.record(session, &key, kind),
        None => {
            let n = state
                .anonymous_sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            trace.record(&format!("{}-{n}", state.anonymous_prefix), &key, kind);
        }
    }
}

fn spawn_answer(
    state: &AppState,
    headers: &HeaderMap,
    backend: &SessionLivedBackend,
    spawned: bool,
    user: Option<&str>,
) -> Result<(StatusCode, Json<SpawnResponse>), ApiError> {
    let name = backend.name_any();
    let base = public_base(state.config.public_base_url.as_deref(), headers);
    let (ready_url, status_url) = api_urls(&base, &name);
    let status_url_field = backend.status.as_ref().and_then(|s| s.url.as_deref());
    let mut url =
        state
            .config
            .url_template
            .render(&name, &state.config.namespace, status_url_field);
    if let (Some(keys), Some(plain)) = (&state.config.connect_keys, &url)
        && !is_public(backend)
    {
        let now = state.config.clock.now().as_second().max(0) as u64;
        let claims = Claims {
            backend: name.clone(),
            expires_at: now.saturating_add(state.config.connect_token_ttl.as_secs()),
            user: user.map(str::to_string),
        };
        let token = connect_token::sign(keys, Purpose::Connect, &claims).map_err(|e| {
            tracing::error!(error = %e, name, "cannot sign a connect token");
            ApiError::internal()
        })?;
        url = Some(with_query_param(plain, connect_token::QUERY_PARAM, &token));
    }
    let answer = SpawnResponse {
        url,
        name,
        ready_url,
        status_url,
        spawned,
        phase: backend.phase(),
        key: backend.spec.key.clone(),
    };
    let code = if spawned {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(answer)))
}

/// Creates a backend under a fresh random name.
async fn create_new(
    state: &AppState,
    spec: spawner_core::SessionLivedBackendSpec,
    request: &SpawnRequest,
) -> Result<SessionLivedBackend, ApiError> {
    // 100 random bits make a clash practically impossible; retry a few times anyway rather
    // than answering an error for it.
    for _ in 0..3 {
        let name = spawner_core::id::new_backend_id(&state.config.id_prefix).map_err(|e| {
            tracing::error!(error = %e, "cannot make a backend id");
            ApiError::internal()
        })?;
        let mut backend = new_backend(
            &name,
            &state.config.namespace,
            spec.clone(),
            &request.labels,
        );
        if request.public {
            mark_public(&mut backend);
        }
        match state
            .backends
            .create(&PostParams::default(), &backend)
            .await
        {
            Ok(created) => {
                tracing::info!(name, "spawned backend");
                return Ok(created);
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => continue,
            Err(e) => return Err(ApiError::from_kube("create", None, &e)),
        }
    }
    Err(ApiError::internal())
}

/// The generation of `backend` among `names`' backends, if it is one of them.
fn generation_in(names: &KeyNames<'_>, backend: &SessionLivedBackend) -> Option<u32> {
    let label = backend
        .labels()
        .get(KEY_GENERATION_LABEL)
        .map(String::as_str);
    names.generation_of(&backend.name_any(), label)
}

/// The live backends with `key`, and the highest generation of any backend of the key.
async fn backends_of_key(
    state: &AppState,
    key: &str,
    names: &KeyNames<'_>,
) -> Result<(Vec<SessionLivedBackend>, Option<u32>), ApiError> {
    let selector = format!("{KEY_LABEL}={}", key_label_value(key));
    let list = state
        .backends
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| ApiError::from_kube("list", None, &e))?;
    let of_key: Vec<_> = list
        .items
        .into_iter()
        .filter(|b| b.spec.key.as_deref() == Some(key))
        .collect();
    let highest = of_key.iter().filter_map(|b| generation_in(names, b)).max();
    let mut live: Vec<_> = of_key.into_iter().filter(is_live).collect();
    // The newest generation first; a backend someone created by hand under another name last.
    live.sort_by_key(|b| std::cmp::Reverse(generation_in(names, b)));
    Ok((live, highest))
}

/// Get-or-create by key. A key's backends are named `<prefix><keyed hash of key and
/// generation>` and labelled with their generation ([`KeyNames`]), and
/// the API server's AlreadyExists answer to a create is the lock: of all callers that try to
/// create the same generation, exactly one succeeds, and the others read the winner. A new
/// generation is only tried after every existing one was seen ended (terminal phase,
/// terminate requested, or being deleted). See docs/api.md.
async fn get_or_create(
    state: &AppState,
    spec: spawner_core::SessionLivedBackendSpec,
    request: &SpawnRequest,
) -> Result<(SessionLivedBackend, bool), ApiError> {
    let Some(key) = spec.key.clone() else {
        return Err(ApiError::internal());
    };
    let names = KeyNames::new(&state.config.id_prefix, &state.config.key_secret, &key);
    for attempt in 0..GET_OR_CREATE_ATTEMPTS {
        let (live, highest) = backends_of_key(state, &key, &names).await?;
        if let Some(existing) = live.into_iter().next() {
            return Ok((existing, false));
        }
        let generation = highest.map_or(0, |g| g + 1);
        if generation > MAX_GENERATION {
            tracing::error!(key, "key has used every generation");
            return Err(ApiError::unavailable());
        }
        let name = names.name(generation);
        let mut backend = new_backend(
            &name,
            &state.config.namespace,
            spec.clone(),
            &request.labels,
        );
        backend
            .labels_mut()
            .insert(KEY_GENERATION_LABEL.into(), generation.to_string());
        if request.public {
            mark_public(&mut backend);
        }
        match state
            .backends
            .create(&PostParams::default(), &backend)
            .await
        {
            Ok(created) => {
                tracing::info!(name, key, generation, "spawned backend for key");
                return settle_after_create(state, &key, &names, created, generation).await;
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                // Someone else created this generation first: theirs is the key's backend,
                // unless it already ended, in which case look again.
                match state.backends.get_opt(&name).await {
                    Ok(Some(winner)) if is_live(&winner) && winner.spec.key == spec.key => {
                        return Ok((winner, false));
                    }
                    Ok(_) => {
                        tracing::debug!(name, attempt, "lost a get-or-create race; retrying");
                    }
                    Err(e) => return Err(ApiError::from_kube("get", None, &e)),
                }
            }
            Err(e) => return Err(ApiError::from_kube("create", None, &e)),
        }
    }
    tracing::warn!(key, "get-or-create did not settle");
    Err(ApiError::unavailable())
}

/// After creating generation `generation`, one more look: a caller that read the key's
/// backends long ago (for longer than the retention of ended backends) could create a
/// generation that is no longer the newest. The newest live generation wins; a superseded one
/// is terminated at once by its creator and the newest is returned.
async fn settle_after_create(
    state: &AppState,
    key: &str,
    names: &KeyNames<'_>,
    created: SessionLivedBackend,
    generation: u32,
) -> Result<(SessionLivedBackend, bool), ApiError> {
    let (live, _) = backends_of_key(state, key, names).await?;
    let newer = live
        .into_iter()
        .find(|b| generation_in(names, b).is_some_and(|g| g > generation));
    match newer {
        None => Ok((created, true)),
        Some(newer) => {
            let name = created.name_any();
            tracing::warn!(name, newer = newer.name_any(), "superseded; terminating");
            request_terminate(state, &name).await?;
            Ok((newer, false))
        }
    }
}

/// `GET /backends`: every backend, or those of a key or matching a label selector.
async fn list(
    State(state): State<SharedState>,
    _auth: Authenticated,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<BackendList>, ApiError> {
    let mut selectors = Vec::new();
    if let Some(key) = &query.key {
        selectors.push(format!("{KEY_LABEL}={}", key_label_value(key)));
    }
    if let Some(selector) = query.label_selector.as_deref().filter(|s| !s.is_empty()) {
        selectors.push(selector.to_string());
    }
    let params = ListParams::default().labels(&selectors.join(","));
    let list = state.backends.list(&params).await.map_err(|e| {
        if matches!(&e, kube::Error::Api(s) if s.code == 400) {
            tracing::debug!(error = %e, "label selector refused");
            ApiError::invalid_request("labelSelector", "is not a valid label selector")
        } else {
            ApiError::from_kube("list", None, &e)
        }
    })?;
    let items = list
        .items
        .iter()
        .filter(|b| query.key.is_none() || b.spec.key == query.key)
        .map(|b| BackendStatus::of(b, &state.config.url_template, &state.config.namespace))
        .collect();
    Ok(Json(BackendList { items }))
}

/// `GET /backend/{id}/status`.
async fn status(
    State(state): State<SharedState>,
    BackendName(name): BackendName,
) -> Result<Json<BackendStatus>, ApiError> {
    let backend = get_backend(&state, &name).await?;
    Ok(Json(BackendStatus::of(
        &backend,
        &state.config.url_template,
        &state.config.namespace,
    )))
}

/// `GET /backend/{id}/ready`: 302 to the backend's URL when Ready, else 409 with the phase.
async fn ready(
    State(state): State<SharedState>,
    BackendName(name): BackendName,
) -> Result<Response, ApiError> {
    let backend = get_backend(&state, &name).await?;
    let phase = backend.phase();
    if phase != spawner_core::Phase::Ready {
        return Err(ApiError::not_ready(
            &name,
            phase,
            format!("backend {name} is {phase}, not Ready"),
        ));
    }
    let status_url = backend.status.as_ref().and_then(|s| s.url.as_deref());
    let Some(url) = state
        .config
        .url_template
        .render(&name, &state.config.namespace, status_url)
    else {
        return Err(ApiError::not_ready(
            &name,
            phase,
            format!("backend {name} is Ready but its URL is not known yet"),
        ));
    };
    Ok((StatusCode::FOUND, [(header::LOCATION, url)]).into_response())
}

/// `DELETE /backend/{id}`: records a terminate request; the controller terminates.
async fn terminate(
    State(state): State<SharedState>,
    _auth: Authenticated,
    BackendName(name): BackendName,
) -> Result<(StatusCode, Json<TerminateResponse>), ApiError> {
    let backend = request_terminate(&state, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TerminateResponse {
            phase: backend.phase(),
            terminate_requested_at: terminate_requested_at(&backend).map(str::to_string),
            name,
        }),
    ))
}

/// Sets the terminate annotation unless it is already set or the backend already ended. The
/// merge patch carries the resourceVersion read, so of two concurrent requests one wins and
/// the other re-reads and finds the annotation: the first request's time is kept.
async fn request_terminate(state: &AppState, name: &str) -> Result<SessionLivedBackend, ApiError> {
    for _ in 0..GET_OR_CREATE_ATTEMPTS {
        let backend = get_backend(state, name).await?;
        if terminate_requested_at(&backend).is_some() || backend.phase().is_terminal() {
            return Ok(backend);
        }
        let now = spawner_core::clock::to_chrono(state.config.clock.now())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": backend.resource_version(),
                "annotations": {TERMINATE_ANNOTATION: now},
            }
        });
        match state
            .backends
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(patched) => {
                tracing::info!(name, "terminate requested");
                return Ok(patched);
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => continue,
            Err(e) => return Err(ApiError::from_kube("patch", Some(name), &e)),
        }
    }
    Err(ApiError::unavailable())
}

pub(crate) async fn get_backend(
    state: &AppState,
    name: &str,
) -> Result<SessionLivedBackend, ApiError> {
    state
        .backends
        .get(name)
        .await
        .map_err(|e| ApiError::from_kube("get", Some(name), &e))
}
