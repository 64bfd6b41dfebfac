//! The application every simulated backend runs: an HTTP server with a WebSocket echo at
//! `/ws`, standing in for a user's session server. Every answer names the backend it belongs
//! to (its `SPAWNER_BACKEND_NAME`) in [`BACKEND_HEADER`], so a user can tell which backend the
//! router really took it to. When the app is killed (it crashed), its WebSockets end with it.

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Response header with the name of the backend that answered.
pub const BACKEND_HEADER: &str = "x-sim-backend";

/// The app of backend `backend`; its WebSockets end when `killed` is cancelled.
pub fn router(backend: &str, killed: CancellationToken) -> Router {
    let name = HeaderValue::from_str(backend).unwrap_or(HeaderValue::from_static("unnamed"));
    Router::new()
        .route("/", get(|| async { "sim app" }))
        .route(
            "/ws",
            get(move |upgrade: WebSocketUpgrade| websocket(upgrade, killed.clone())),
        )
        .layer(axum::middleware::map_response(
            move |mut response: Response| {
                let name = name.clone();
                async move {
                    response.headers_mut().insert(BACKEND_HEADER, name);
                    response
                }
            },
        ))
}

async fn websocket(upgrade: WebSocketUpgrade, killed: CancellationToken) -> impl IntoResponse {
    upgrade.on_upgrade(move |socket| async move {
        tokio::select! {
            () = echo(socket) => {}
            // The socket is dropped with the app: its connection is reset.
            () = killed.cancelled() => {}
        }
    })
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => Message::Text(text),
            Message::Binary(bytes) => Message::Binary(bytes),
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
