//! The demo backend's room (`spawner demo-backend`): its WebSocket through the sidecar (and the
//! router, where `status.url` is the router's) and the state it sends.

use std::time::Duration;

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::{BackendStatus, BoxedStream, Failure, Target, authority};

pub type WebSocket = tokio_tungstenite::WebSocketStream<BoxedStream>;

/// The demo room's state as the backend sends it.
#[derive(Debug, serde::Deserialize)]
pub struct RoomState {
    pub count: u64,
    pub peers: u64,
}

/// The next state the room sends (other frames are skipped), waiting at most 30 s.
pub async fn next_room_state(ws: &mut WebSocket) -> Result<RoomState, Failure> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| Failure::new("the demo backend sent nothing for 30 s"))?
            .ok_or_else(|| Failure::new("the WebSocket closed"))?
            .map_err(|e| Failure::new(format!("WebSocket: {e}")))?;
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str())
                .map_err(|e| Failure::new(format!("demo state {text:?}: {e}")));
        }
    }
}

/// Opens the demo room's WebSocket on `backend` through its sidecar (through the router when
/// `status.url` is the router's), with the connect token of `spawned_url` if it carries one.
pub async fn open_room(
    target: &Target,
    backend: &BackendStatus,
    spawned_url: Option<&str>,
) -> Result<WebSocket, Failure> {
    let url = backend
        .url
        .as_deref()
        .ok_or_else(|| Failure::new(format!("{} is Ready without a url", backend.name)))?;
    let host = authority(url)?;
    let query = spawned_url
        .and_then(|u| u.split_once('?'))
        .map_or(String::new(), |(_, q)| format!("?{q}"));
    let stream = target.connector.connect(backend).await?;
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::client_async(format!("ws://{host}/ws{query}"), stream),
    )
    .await
    .map_err(|_| Failure::new("WebSocket handshake through the sidecar: no answer in 30 s"))?
    .map_err(|e| Failure::new(format!("WebSocket handshake through the sidecar: {e}")))?;
    Ok(ws)
}
