//! The demo backend: a small multiplayer page served by the backend itself over HTTP and a
//! WebSocket. Every tab that opens a backend's URL joins the same room: a shared counter and a
//! log of who joined, left and clicked. It is what `spawner dev --demo` spawns, so a newcomer can
//! see a backend start, be shared by two tabs and be swept when both close.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};

const PAGE: &str = include_str!("page.html");

/// What every tab sees.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomState {
    pub count: u64,
    pub peers: u64,
    /// What just happened, for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ClientMessage {
    Increment,
}

struct Room {
    name: String,
    state: Mutex<RoomState>,
    updates: broadcast::Sender<RoomState>,
    next_peer: std::sync::atomic::AtomicU64,
}

impl Room {
    async fn change(&self, f: impl FnOnce(&mut RoomState) -> String) {
        let mut state = self.state.lock().await;
        let event = f(&mut state);
        state.event = Some(event);
        // No receiver is fine: nobody is connected.
        let _ = self.updates.send(state.clone());
    }
}

/// The demo backend's router; `name` is shown on the page (the backend's name, from its
/// environment).
pub fn router(name: &str) -> Router {
    let (updates, _) = broadcast::channel(256);
    let room = Arc::new(Room {
        name: name.to_string(),
        state: Mutex::new(RoomState::default()),
        updates,
        next_peer: std::sync::atomic::AtomicU64::new(1),
    });
    Router::new()
        .route("/", get(page))
        .route("/ws", get(websocket))
        .with_state(room)
}

async fn page(State(room): State<Arc<Room>>) -> Html<String> {
    Html(PAGE.replace("{{BACKEND}}", &html_escape(&room.name)))
}

pub fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

async fn websocket(State(room): State<Arc<Room>>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(move |socket| peer(room, socket))
}

async fn peer(room: Arc<Room>, mut socket: WebSocket) {
    let id = room
        .next_peer
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut updates = room.updates.subscribe();
    room.change(|s| {
        s.peers += 1;
        format!("tab {id} joined")
    })
    .await;
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Ok(state) => {
                    let Ok(text) = serde_json::to_string(&state) else { continue };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                // A slow tab missed updates: the next one carries the whole state anyway.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(ClientMessage::Increment) = serde_json::from_str(&text) {
                        room.change(|s| {
                            s.count += 1;
                            format!("tab {id} clicked: {}", s.count)
                        })
                        .await;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    room.change(|s| {
        s.peers = s.peers.saturating_sub(1);
        format!("tab {id} left")
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    async fn next_state(
        ws: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> RoomState {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                WsMessage::Text(text) => return serde_json::from_str(&text).expect("state json"),
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn two_tabs_see_each_others_clicks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router("slab-demo")).await });

        let page = tokio::net::TcpStream::connect(addr).await.expect("connect");
        drop(page);
        let (mut a, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("tab a");
        assert_eq!(next_state(&mut a).await.peers, 1);
        let (mut b, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("tab b");
        assert_eq!(next_state(&mut a).await.peers, 2);
        assert_eq!(next_state(&mut b).await.peers, 2);

        a.send(WsMessage::Text(r#"{"op":"increment"}"#.into()))
            .await
            .expect("send");
        let seen_by_b = next_state(&mut b).await;
        assert_eq!(seen_by_b.count, 1);
        assert_eq!(seen_by_b.event.as_deref(), Some("tab 1 clicked: 1"));

        drop(a);
        let after = next_state(&mut b).await;
        assert_eq!(after.peers, 1);
    }

    #[test]
    fn page_names_the_backend_escaped() {
        assert_eq!(html_escape("<a&\">"), "&lt;a&amp;&quot;&gt;");
        assert!(PAGE.contains("{{BACKEND}}"));
    }
}
