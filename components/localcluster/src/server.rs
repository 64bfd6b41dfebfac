//! The HTTP layer: Kubernetes REST paths, verbs, content types, watches and discovery.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::auth::{Attributes, Auth, Identity};
use crate::clock::{Clock, format_time};
use crate::error::ApiError;
use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOptions, Event, EventType, Filter, Obj, PatchKind, Propagation, Store, StoreConfig,
    Target, View, encode_watch_line,
};
use crate::table::{self, IncludeObject};

/// The largest request body the real API server accepts (3 MiB).
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// The longest watch served, whatever `timeoutSeconds` asks (one year).
const MAX_WATCH_SECONDS: u64 = 365 * 24 * 3600;

/// Settings of one server.
#[derive(Clone)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Watch duration when the client gives no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    pub max_request_bytes: usize,
    pub auth: Auth,
    /// Header-read/idle timeout and connection cap of [`serve`].
    pub limits: spawner_serve::Limits,
    /// Reported by `/version`.
    pub git_version: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            max_request_bytes: MAX_REQUEST_BYTES,
            auth: Auth::default(),
            limits: spawner_serve::Limits::default(),
            git_version: "v1.34.0-localcluster".into(),
        }
    }
}

struct Shared {
    store: Mutex<Store>,
    types: Arc<Vec<ResourceType>>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
}

/// A localcluster API server's state; cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl Cluster {
    /// A fresh cluster with the `default`, `kube-system`, `kube-public` and `kube-node-lease`
    /// namespaces.
    pub fn new(config: ServerConfig, clock: Arc<dyn Clock>) -> Self {
        let types = Arc::new(resources::all());
        let mut store = Store::new(types.clone(), config.store.clone());
        let now = format_time(clock.now());
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // Creating a fixed, valid namespace in an empty store cannot fail.
            let _ = store.create(
                resources::NAMESPACES,
                None,
                json!({"metadata": {"name": ns}}),
                &now,
                false,
            );
        }
        Self {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                types,
                clock,
                config,
            }),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every write is one insert),
        // so a poisoned lock is still usable.
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> String {
        format_time(self.shared.clock.now())
    }

    /// Drops every type's retained watch history, as etcd compaction does.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.shared.types
    }
}

/// The server as an axum router, to be served over any transport.
pub fn router(cluster: Cluster) -> Router {
    Router::new().fallback(handle).with_state(cluster)
}

/// Serves the API on `listener` forever (DESIGN.md rule 2: the caller binds), with the
/// configured [`ServerConfig::limits`].
pub async fn serve<L>(listener: L, cluster: Cluster) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let limits = cluster.shared.config.limits;
    spawner_serve::serve(listener, router(cluster), limits, std::future::pending()).await;
    Ok(())
}

fn json_response(code: u16, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn value_response(code: u16, v: &Value) -> Response {
    json_response(code, serde_json::to_vec(v).unwrap_or_default())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.reason == crate::error::PAGE_NOT_FOUND {
            let mut r = Response::new(Body::from("404 page not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return r;
        }
        value_response(self.code, &self.to_status())
    }
}

/// How the client wants objects represented (from `Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repr {
    Full,
    Table(IncludeObject),
    Metadata,
}

fn repr(headers: &HeaderMap, include: Option<&str>) -> Repr {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The first acceptable alternative wins, as content negotiation does.
    for alt in accept.split(',') {
        if alt.contains("as=Table") {
            return Repr::Table(IncludeObject::parse(include));
        }
        if alt.contains("as=PartialObjectMetadata") {
            return Repr::Metadata;
        }
        if alt.trim().starts_with("application/json") || alt.trim().starts_with("*/*") {
            return Repr::Full;
        }
    }
    Repr::Full
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

fn parse_query(raw: Option<&str>) -> Query {
    let mut out = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(k), percent_decode(v)));
    }
    Query(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unknown resources of built-in groups get a `Status`; paths under custom-resource or
/// unknown groups fall through to the plain-text `404 page not found` of the real server.
fn not_found_for_group(group: &str) -> ApiError {
    if matches!(group, "" | "coordination.k8s.io" | "events.k8s.io") {
        ApiError::resource_not_found()
    } else {
        ApiError::page_not_found()
    }
}

/// A parsed resource path.
#[derive(Debug)]
struct ResourcePath {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_prefix: bool,
}

fn parse_resource_path(
    types: &[ResourceType],
    path: &str,
) -> Option<Result<ResourcePath, ApiError>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", "v1", rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return None,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let find = |plural: &str| {
        types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    };
    let namespaced_plural = |p: &str| find(p).is_some_and(|k| types[k].namespaced);
    let (ns, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, plural, r @ ..] if namespaced_plural(plural) => {
            (Some(percent_decode(ns)), &rest[2..])
        }
        r => {
            let _ = r;
            (None, rest)
        }
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(percent_decode(n)), None),
        [p, n, s] => (*p, Some(percent_decode(n)), Some(s.to_string())),
        _ => return Some(Err(not_found_for_group(group))),
    };
    let Some(kind) = find(plural) else {
        return Some(Err(not_found_for_group(group)));
    };
    if types[kind].namespaced != ns.is_some() && !(types[kind].namespaced && name.is_none()) {
        return Some(Err(ApiError::resource_not_found()));
    }
    Some(Ok(ResourcePath {
        kind,
        namespace: ns,
        name,
        subresource: sub,
        watch_prefix,
    }))
}

/// Logs every request at debug level (`RUST_LOG=spawner_localcluster::server=debug`), like the
/// real server's audit log at level Metadata: who asked what, and the answer.
async fn handle(State(cluster): State<Cluster>, req: Request) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return serve_request(cluster, req).await;
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    let started = std::time::Instant::now();
    let response = serve_request(cluster, req).await;
    tracing::debug!(
        %method,
        %uri,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

async fn serve_request(cluster: Cluster, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let auth = &cluster.shared.config.auth;
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let path = parts.uri.path().to_string();
    // Health and version are public, as the real server's system:public-info-viewer role
    // makes them.
    if matches!(
        path.trim_end_matches('/'),
        "/healthz" | "/livez" | "/readyz" | "/version"
    ) && let Some(r) = discovery(&cluster, &path)
    {
        return r;
    }
    let who = match auth.authenticate(authorization) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    // The body is read only for an authenticated caller, and refused unread when its announced
    // length is over the limit.
    let limit = cluster.shared.config.max_request_bytes;
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced.filter(|&n| n > limit as u64) {
        // A client still sending its body sees a reset, not the 413, when the connection
        // closes under it; so a body up to twice the limit is read and dropped first, as
        // nginx's lingering close does, and only a larger one is refused unread.
        if n <= (limit as u64).saturating_mul(2) {
            let _ = axum::body::to_bytes(body, limit.saturating_mul(2)).await;
        }
        return ApiError::too_large(limit).into_response();
    }
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return ApiError::too_large(limit).into_response(),
    };
    let query = parse_query(parts.uri.query());
    if let Some(r) = discovery(&cluster, &path) {
        return r;
    }
    let rp = match parse_resource_path(&cluster.shared.types, &path) {
        None => return ApiError::page_not_found().into_response(),
        Some(Err(e)) => return e.into_response(),
        Some(Ok(rp)) => rp,
    };
    match handle_resource(
        &cluster,
        &who,
        &parts.method,
        &parts.headers,
        &query,
        rp,
        body,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn discovery(cluster: &Cluster, path: &str) -> Option<Response> {
    let types = &cluster.shared.types;
    let path = path.trim_end_matches('/');
    let ok = |v: Value| Some(value_response(200, &v));
    match path {
        "/healthz" | "/livez" | "/readyz" => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Some(r)
        }
        "/version" => ok(json!({
            "major": "1", "minor": "34",
            "gitVersion": cluster.shared.config.git_version,
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
            "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
        })),
        "/openapi/v3" => {
            let mut paths = serde_json::Map::new();
            let mut gvs = vec![("", "v1")];
            gvs.extend(resources::groups(types));
            for (g, v) in gvs {
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                paths.insert(
                    key.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=localcluster")}),
                );
            }
            ok(json!({"paths": paths}))
        }
        "/api" => ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        })),
        "/apis" => {
            let groups: Vec<Value> = resources::groups(types)
                .into_iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        _ if path.starts_with("/openapi/v3/") => openapi_v3(types, &path["/openapi/v3/".len()..]),
        _ => {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let (group, version) = match segs.as_slice() {
                ["api", "v1"] => ("", "v1"),
                ["apis", g, v] => (*g, *v),
                ["apis", g] => {
                    let (_, v) = resources::groups(types).into_iter().find(|(x, _)| x == g)?;
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    return ok(
                        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv}),
                    );
                }
                _ => return None,
            };
            let list: Vec<Value> = types
                .iter()
                .filter(|t| t.group == group && t.version == version)
                .flat_map(|t| t.discovery())
                .collect();
            if list.is_empty() {
                return None;
            }
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            ok(
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
            )
        }
    }
}

/// A minimal OpenAPI v3 document of one group/version: for each type, its PATCH operation
/// with the `fieldValidation` parameter. That is what kubectl looks up to decide that the
/// server validates fields itself (then it sends `fieldValidation=Strict` and needs no schema).
fn openapi_v3(types: &[ResourceType], gv: &str) -> Option<Response> {
    let segs: Vec<&str> = gv.trim_matches('/').split('/').collect();
    let (group, version) = match segs.as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(value_response(
        200,
        &json!({"openapi": "3.0.0", "info": {"title": "localcluster", "version": "v1.34.0"}, "paths": paths, "components": {"schemas": {}}}),
    ))
}

/// `fieldValidation=Strict` (what kubectl sends): unknown fields of a custom resource are a
/// 400 instead of being pruned.
fn strict_check(q: &Query, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let (Some("Strict"), Some(schema)) = (q.get("fieldValidation"), &rt.schema) else {
        return Ok(());
    };
    let mut unknown = Vec::new();
    let mut body = obj.clone();
    if let Some(m) = body.as_object_mut() {
        for k in ["apiVersion", "kind", "metadata"] {
            m.remove(k);
        }
    }
    crate::schema::unknown_fields(schema, &body, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(());
    }
    let list = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::bad_request(format!(
        "{kind} in version \"{}\" cannot be handled as a {kind}: strict decoding error: {list}",
        rt.version,
        kind = rt.kind
    )))
}

fn parse_json(body: &Bytes, rt: &ResourceType) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: {e} ({})",
            rt.kind,
            String::from_utf8_lossy(&body[..body.len().min(64)])
        ))
    })
}

fn verb_of(method: &Method, has_name: bool, watch: bool) -> Option<&'static str> {
    Some(match (method.as_str(), has_name) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    })
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun") == Some("All")
}

#[allow(clippy::too_many_arguments)]
async fn handle_resource(
    cluster: &Cluster,
    who: &Identity,
    method: &Method,
    headers: &HeaderMap,
    q: &Query,
    rp: ResourcePath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let types = cluster.shared.types.clone();
    let rt = &types[rp.kind];
    let watch = rp.watch_prefix || q.flag("watch");
    let verb =
        verb_of(method, rp.name.is_some(), watch).ok_or_else(ApiError::method_not_allowed)?;
    let resource = match &rp.subresource {
        Some(s) => format!("{}/{s}", rt.plural),
        None => rt.plural.to_string(),
    };
    let attrs = Attributes {
        verb,
        api_group: rt.group,
        resource,
        namespace: rp.namespace.as_deref(),
        name: rp.name.as_deref(),
    };
    cluster
        .shared
        .config
        .auth
        .authorize(who, &attrs, (rt.plural, rt.group))?;
    if rp.kind == resources::NEW_EVENTS {
        let new_rt = types[rp.kind].clone();
        let mut rp = rp;
        rp.kind = resources::CORE_EVENTS;
        let result = Box::pin(serve_resource(
            cluster,
            method,
            headers,
            q,
            rp,
            body,
            verb,
            Some(&new_rt),
        ))
        .await;
        return result.map_err(|mut e| {
            // Errors name the resource the client asked for.
            e.message = e
                .message
                .replacen("events \"", "events.events.k8s.io \"", 1);
            e.message = e.message.replacen("Event \"", "Event.events.k8s.io \"", 1);
            if let Some(d) = e.details.as_mut()
                && d.get("kind").is_some()
            {
                d["group"] = json!("events.k8s.io");
            }
            e
        });
    }
    serve_resource(cluster, method, headers, q, rp, body, verb, None).await
}

fn new_events_view() -> View {
    View {
        to_view: crate::events::to_new,
        from_view: crate::events::to_core,
    }
}

/// Serves a resource request; `view` is set when the client sees the stored type through
/// another representation (events.k8s.io Events).
#[allow(clippy::too_many_arguments)]
async fn serve_resource(
    cluster: &Cluster,
    method: &Method,
    headers: &HeaderMap,
    q: &Query,
    rp: ResourcePath,
    body: Bytes,
    verb: &'static str,
    view: Option<&ResourceType>,
) -> Result<Response, ApiError> {
    let _ = method;
    let types = cluster.shared.types.clone();
    let stored_rt = &types[rp.kind];
    // The type the client sees (for list kinds, tables and bookmarks).
    let rt = view.unwrap_or(stored_rt);
    let convert_in = |v: Value| {
        if view.is_some() {
            crate::events::to_core(&v)
        } else {
            v
        }
    };
    let convert_out = |o: Obj| -> Obj {
        if view.is_some() {
            Arc::new(crate::events::to_new(&o))
        } else {
            o
        }
    };
    let field_selector = match (view, q.get("fieldSelector")) {
        (Some(_), Some(f)) => crate::events::field_selector_to_core(f),
        (_, f) => f.unwrap_or("").to_string(),
    };
    let ns = rp.namespace.clone().unwrap_or_default();
    let now = cluster.now();
    let target = match rp.subresource.as_deref() {
        None => Target::Main,
        Some("status") if rt.status_subresource => Target::Status,
        Some("binding") if rp.kind == resources::PODS && verb == "create" => Target::Main,
        Some(_) => return Err(ApiError::resource_not_found()),
    };
    let repr = repr(headers, q.get("includeObject"));
    match (verb, rp.name.as_deref()) {
        ("get", Some(name)) => {
            let obj = convert_out(cluster.store().get(rp.kind, &ns, name)?);
            Ok(object_response(cluster, rt, 200, &obj, repr))
        }
        ("list", None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
            let fields = FieldSelector::parse(&field_selector, stored_rt)?;
            let filter = Filter {
                namespace: rp.namespace.as_deref(),
                labels: &labels,
                fields: &fields,
            };
            let limit = q
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0);
            let result = cluster.store().list(
                rp.kind,
                &filter,
                limit,
                q.get("continue").filter(|c| !c.is_empty()),
            )?;
            let mut result = result;
            if view.is_some() {
                result.items = result.items.into_iter().map(convert_out).collect();
            }
            Ok(list_response(cluster, rt, result, repr))
        }
        ("watch", _) => watch_response(cluster, rp, q, repr, &field_selector, view.is_some()),
        ("create", Some(name)) if rp.subresource.as_deref() == Some("binding") => {
            let binding = parse_json(&body, rt)?;
            let node = binding
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if node.is_empty() {
                return Err(ApiError::invalid(
                    &types[rp.kind],
                    name,
                    vec![crate::error::FieldCause::required("target.name", "")],
                ));
            }
            cluster.store().bind_pod(&ns, name, &node, &now)?;
            Ok(value_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("create", None) => {
            let obj = convert_in(parse_json(&body, rt)?);
            strict_check(q, stored_rt, &obj)?;
            let created =
                cluster
                    .store()
                    .create(rp.kind, rp.namespace.as_deref(), obj, &now, dry_run(q))?;
            let created = convert_out(created);
            Ok(object_response(cluster, rt, 201, &created, repr))
        }
        ("update", Some(name)) => {
            let obj = convert_in(parse_json(&body, rt)?);
            strict_check(q, stored_rt, &obj)?;
            let updated =
                cluster
                    .store()
                    .update(rp.kind, &ns, name, obj, target, &now, dry_run(q))?;
            let updated = convert_out(updated);
            Ok(object_response(cluster, rt, 200, &updated, repr))
        }
        ("patch", Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let media = content_type.split(';').next().unwrap_or("").trim();
            let kind = match media {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                "application/strategic-merge-patch+json" => PatchKind::StrategicMerge,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let patch = if kind == PatchKind::Apply {
                if q.get("fieldManager").is_none_or(str::is_empty) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ));
                }
                serde_yaml::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
            } else {
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
            };
            let patched = cluster.store().patch(
                rp.kind,
                &ns,
                name,
                kind,
                &patch,
                target,
                &now,
                dry_run(q),
                view.map(|_| new_events_view()).as_ref(),
            )?;
            let patched = convert_out(patched);
            Ok(object_response(cluster, rt, 200, &patched, repr))
        }
        ("delete", Some(name)) => {
            let opts = delete_options(q, &body)?;
            let clock = cluster.shared.clock.clone();
            let deleted = cluster
                .store()
                .delete(rp.kind, &ns, name, &opts, &now, |secs| {
                    deletion_time(clock.now(), secs)
                })?;
            let still_there = cluster.store().get(rp.kind, &ns, name).is_ok();
            let deleted = convert_out(deleted);
            if !still_there && !rt.return_deleted_object {
                let mut details = rt.details(name);
                details["uid"] = deleted
                    .pointer("/metadata/uid")
                    .cloned()
                    .unwrap_or_default();
                return Ok(value_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                ));
            }
            Ok(object_response(cluster, rt, 200, &deleted, repr))
        }
        ("deletecollection", None) => {
            let opts = delete_options(q, &body)?;
            let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
            let fields = FieldSelector::parse(&field_selector, stored_rt)?;
            let filter = Filter {
                namespace: rp.namespace.as_deref(),
                labels: &labels,
                fields: &fields,
            };
            let clock = cluster.shared.clock.clone();
            let mut store = cluster.store();
            let listed = store.list(rp.kind, &filter, None, None)?;
            let mut items = Vec::new();
            for obj in listed.items {
                let ns = crate::store::namespace_of(&obj).to_string();
                let name = crate::store::name_of(&obj).to_string();
                if let Ok(d) = store.delete(rp.kind, &ns, &name, &opts, &now, |secs| {
                    deletion_time(clock.now(), secs)
                }) {
                    items.push(convert_out(d));
                }
            }
            let rv = store.resource_version();
            drop(store);
            Ok(list_response(
                cluster,
                rt,
                crate::store::ListResult {
                    items,
                    resource_version: rv,
                    continue_token: None,
                    remaining: None,
                },
                Repr::Full,
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// `now` plus a grace period, as a Kubernetes time. Grace periods are bounded at admission
/// ([`crate::decode::MAX_GRACE_SECONDS`]); the saturation only keeps this total.
fn deletion_time(now: chrono::DateTime<chrono::Utc>, secs: i64) -> String {
    let secs = secs.clamp(0, crate::decode::MAX_GRACE_SECONDS);
    let later = chrono::TimeDelta::try_seconds(secs)
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now);
    format_time(later)
}

fn delete_options(q: &Query, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions::default();
    let parsed: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?
    };
    let policy = parsed
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or(q.get("propagationPolicy"));
    opts.propagation = match policy {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                ),
            ));
        }
    };
    if parsed.get("orphanDependents").and_then(Value::as_bool) == Some(true)
        || q.flag("orphanDependents")
    {
        opts.propagation = Propagation::Orphan;
    }
    opts.grace_period_seconds = parsed
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    crate::decode::check_delete_grace(opts.grace_period_seconds)?;
    opts.precondition_uid = parsed
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    opts.precondition_rv = parsed
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    opts.dry_run = parsed
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v == "All"))
        || dry_run(q);
    Ok(opts)
}

fn object_response(
    cluster: &Cluster,
    rt: &ResourceType,
    code: u16,
    obj: &Obj,
    repr: Repr,
) -> Response {
    match repr {
        Repr::Full => json_response(code, serde_json::to_vec(&**obj).unwrap_or_default()),
        Repr::Metadata => value_response(code, &table::partial_metadata(obj)),
        Repr::Table(include) => value_response(
            code,
            &table::table(
                rt,
                &[obj],
                include,
                json!({"resourceVersion": crate::store::rv_of(obj)}),
                true,
                cluster.shared.clock.now(),
            ),
        ),
    }
}

fn list_response(
    cluster: &Cluster,
    rt: &ResourceType,
    result: crate::store::ListResult,
    repr: Repr,
) -> Response {
    let mut meta = json!({"resourceVersion": result.resource_version.to_string()});
    if let Some(c) = &result.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(n) = result.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    match repr {
        Repr::Table(include) => {
            let objs: Vec<&Value> = result.items.iter().map(|o| &**o).collect();
            value_response(
                200,
                &table::table(rt, &objs, include, meta, true, cluster.shared.clock.now()),
            )
        }
        Repr::Metadata => {
            let items: Vec<Value> = result
                .items
                .iter()
                .map(|o| table::partial_metadata(o))
                .collect();
            value_response(
                200,
                &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
            )
        }
        Repr::Full => {
            // Written by hand so that 10,000 shared objects are serialized, never cloned.
            let mut out = Vec::with_capacity(64 + result.items.len() * 512);
            out.extend_from_slice(b"{\"kind\":\"");
            out.extend_from_slice(rt.kind.as_bytes());
            out.extend_from_slice(b"List\",\"apiVersion\":\"");
            out.extend_from_slice(rt.api_version().as_bytes());
            out.extend_from_slice(b"\",\"metadata\":");
            let _ = serde_json::to_writer(&mut out, &meta);
            out.extend_from_slice(b",\"items\":[");
            for (i, item) in result.items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut out, &**item);
            }
            out.extend_from_slice(b"]}");
            json_response(200, out)
        }
    }
}

struct WatchState {
    cluster: Cluster,
    backlog: VecDeque<Arc<Event>>,
    rx: broadcast::Receiver<Arc<Event>>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    deadline: tokio::time::Instant,
    bookmarks: Option<tokio::time::Interval>,
    initial_events_end: Option<u64>,
    last_rv: u64,
    repr: Repr,
    /// Objects are shown in another representation (events.k8s.io Events).
    convert: bool,
    /// The type the client watches (for bookmarks and tables).
    view_kind: usize,
    first: bool,
    done: bool,
}

impl WatchState {
    fn filter(&self) -> Filter<'_> {
        Filter {
            namespace: self.namespace.as_deref(),
            labels: &self.labels,
            fields: &self.fields,
        }
    }

    /// The line to send for an event, if this watcher sees it (with selector transitions).
    fn line(&mut self, ev: &Event) -> Option<Bytes> {
        self.last_rv = self.last_rv.max(ev.rv);
        let f = self.filter();
        let now_matches = f.matches(&ev.object);
        let was_matching = ev.prev.as_deref().is_some_and(|p| f.matches(p));
        let etype = match ev.etype {
            EventType::Added if now_matches => EventType::Added,
            EventType::Modified if now_matches && was_matching => EventType::Modified,
            EventType::Modified if now_matches => EventType::Added,
            EventType::Modified if was_matching => EventType::Deleted,
            EventType::Deleted if was_matching || now_matches => EventType::Deleted,
            _ => return None,
        };
        if etype == ev.etype && self.repr == Repr::Full && !self.convert {
            return Some(ev.encoded().clone());
        }
        if self.convert {
            let shown = crate::events::to_new(&ev.object);
            return Some(self.encode(etype.as_str(), &shown));
        }
        Some(self.encode(etype.as_str(), &ev.object))
    }

    fn encode(&mut self, etype: &str, obj: &Value) -> Bytes {
        match self.repr {
            Repr::Full => encode_watch_line(etype, obj),
            Repr::Metadata => encode_watch_line(etype, &table::partial_metadata(obj)),
            Repr::Table(include) => {
                let rt = &self.cluster.shared.types[self.view_kind];
                let t = table::table(
                    rt,
                    &[obj],
                    include,
                    json!({"resourceVersion": crate::store::rv_of(obj)}),
                    self.first,
                    self.cluster.shared.clock.now(),
                );
                self.first = false;
                encode_watch_line(etype, &t)
            }
        }
    }

    fn bookmark(&mut self, rv: u64, initial_end: bool) -> Bytes {
        let rt = &self.cluster.shared.types[self.view_kind];
        let mut obj = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
        if initial_end {
            obj["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        encode_watch_line("BOOKMARK", &obj)
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        while let Some(ev) = self.backlog.pop_front() {
            if let Some(line) = self.line(&ev) {
                return Some(line);
            }
        }
        if let Some(rv) = self.initial_events_end.take() {
            let rv = rv.max(self.last_rv);
            return Some(self.bookmark(rv, true));
        }
        loop {
            let tick = async {
                match &mut self.bookmarks {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.done = true;
                    return None;
                }
                ev = self.rx.recv() => match ev {
                    Ok(ev) => {
                        if let Some(line) = self.line(&ev) {
                            return Some(line);
                        }
                    }
                    // A watcher that fell behind the broadcast buffer is ended; the client
                    // resumes from its last resourceVersion, as after any dropped watch.
                    Err(_) => {
                        self.done = true;
                        return None;
                    }
                },
                _ = tick => {
                    // Everything of this type up to the store's version has been received once
                    // the channel is empty (events are published under the store lock).
                    let rv = {
                        let store = self.cluster.store();
                        if self.rx.is_empty() { Some(store.resource_version()) } else { None }
                    };
                    if let Some(rv) = rv {
                        self.last_rv = self.last_rv.max(rv);
                        let rv = self.last_rv;
                        return Some(self.bookmark(rv, false));
                    }
                }
            }
        }
    }
}

fn watch_response(
    cluster: &Cluster,
    rp: ResourcePath,
    q: &Query,
    repr: Repr,
    field_selector: &str,
    convert: bool,
) -> Result<Response, ApiError> {
    let types = cluster.shared.types.clone();
    let rt = &types[rp.kind];
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let mut fields = FieldSelector::parse(field_selector, rt)?;
    if let Some(name) = &rp.name {
        // GET .../watch/pods/name watches one object.
        fields = FieldSelector::parse(&format!("metadata.name={name}"), rt)?;
    }
    let from = match q.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v}")))?,
        ),
    };
    let send_initial = q.flag("sendInitialEvents");
    // Any timeout is accepted, as by the real server; past a year it is a year (a deadline
    // must stay representable).
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Duration::from_secs(t.min(MAX_WATCH_SECONDS)))
        .unwrap_or(cluster.shared.config.default_watch_timeout);
    let bookmarks_wanted = q.flag("allowWatchBookmarks");
    let from = if send_initial { None } else { from };
    let started = {
        let store = cluster.store();
        store
            .watch(rp.kind, from)
            .map(|(b, rx)| (b, rx, store.resource_version()))
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let (backlog, rx, start_rv) = match started {
        Ok(x) => x,
        Err(e) => {
            // The real server accepts the watch and sends the error as an ERROR event.
            let line = encode_watch_line("ERROR", &e.to_status());
            return Ok((headers, Body::from(line)).into_response());
        }
    };
    let interval = cluster.shared.config.bookmark_interval;
    let bookmarks = bookmarks_wanted.then(|| {
        // Like the real watch cache, a watch with a deadline gets a bookmark shortly before
        // it ends, so that the client resumes from a recent version.
        let first = if timeout > Duration::from_secs(3) {
            interval.min(timeout - Duration::from_secs(2))
        } else {
            interval
        };
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let state = WatchState {
        cluster: cluster.clone(),
        backlog: backlog.into(),
        rx,
        namespace: rp.namespace.clone(),
        labels,
        fields,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarks,
        initial_events_end: (send_initial && bookmarks_wanted).then_some(start_rv),
        last_rv: from.unwrap_or(0),
        repr,
        convert,
        view_kind: if convert {
            resources::NEW_EVENTS
        } else {
            rp.kind
        },
        first: true,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        let line = s.next_line().await?;
        Some((Ok::<Bytes, std::io::Error>(line), s))
    });
    Ok((headers, Body::from_stream(stream)).into_response())
}

impl Cluster {
    /// Every stored object of the resource `plural` in API group `group` (`""` for core), in
    /// key order. For in-process observers — the simulator's invariant checker — that must see
    /// the store as it is at this instant, not through a watch.
    pub fn snapshot(&self, group: &str, plural: &str) -> Vec<Arc<serde_json::Value>> {
        let Some(kind) = self
            .types()
            .iter()
            .position(|t| t.group == group && t.plural == plural)
        else {
            return Vec::new();
        };
        // events.k8s.io Events are stored as core Events and shown converted.
        let stored = if kind == resources::NEW_EVENTS {
            resources::CORE_EVENTS
        } else {
            kind
        };
        let labels = crate::selector::LabelSelector::default();
        let fields = crate::selector::FieldSelector::default();
        let filter = crate::store::Filter {
            namespace: None,
            labels: &labels,
            fields: &fields,
        };
        let items = self
            .store()
            .list(stored, &filter, None, None)
            .map(|list| list.items)
            .unwrap_or_default();
        if kind == resources::NEW_EVENTS {
            items
                .into_iter()
                .map(|o| Arc::new(crate::events::to_new(&o)))
                .collect()
        } else {
            items
        }
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn snapshot_sees_stored_objects_of_one_type() {
        let cluster = Cluster::new(ServerConfig::default(), Arc::new(crate::SystemClock));
        let namespaces = cluster.snapshot("", "namespaces");
        let names: Vec<_> = namespaces
            .iter()
            .map(|n| {
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            ["default", "kube-node-lease", "kube-public", "kube-system"]
        );
        assert!(cluster.snapshot("", "pods").is_empty());
        assert!(cluster.snapshot("nope", "things").is_empty());
    }
}
