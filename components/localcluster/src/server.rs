//! The HTTP layer: Kubernetes REST paths, verbs, content types, watches and discovery.

mod discovery;
mod request;
mod resource;
mod response;
mod watch;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::auth::{Attributes, Identity};
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::resources;

use discovery::discovery;
use request::{Query, ResourcePath, parse_query, parse_resource_path};
use resource::serve_resource;

/// The server as an axum router, to be served over any transport.
pub fn router(cluster: Cluster) -> Router {
    Router::new().fallback(handle).with_state(cluster)
}

/// Serves the API on `listener` forever (DESIGN.md rule 2: the caller binds), with the
/// configured [`crate::ServerConfig::limits`].
pub async fn serve<L>(listener: L, cluster: Cluster) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let limits = cluster.shared.config.limits;
    spawner_serve::serve(listener, router(cluster), limits, std::future::pending()).await;
    Ok(())
}

/// Serves `cluster` on a fresh loopback port in a task of its own, for tests and examples on
/// one machine: its address, and the task (aborting it stops the server).
pub async fn serve_on_loopback(
    cluster: Cluster,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = serve(listener, cluster).await;
    });
    Ok((addr, task))
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
    // Priority and fairness comes after authentication, before anything is read or served.
    if let Some(e) = cluster.shared.throttler.check(&who) {
        return e.into_response();
    }
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
    serve_resource(cluster, headers, q, rp, body, verb, None).await
}
