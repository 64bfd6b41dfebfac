//! The sidecar's state stream: what `/_spawner/events` streams as Server-Sent Events (the path
//! keeps its first name for compatibility; "events" in Spawner otherwise means Kubernetes
//! Events, see docs/architecture.md#words).
//!
//! Each SSE message has an event name (`state` on every change, `heartbeat` every few seconds)
//! and a JSON body, [`SidecarState`]. Compatibility rules, so a sweeper and a sidecar of
//! different releases interoperate:
//! - `v` is the protocol version. Version 1 is this one. A reader accepts any version whose
//!   fields it understands: new fields are added with defaults and old readers ignore them.
//! - An incompatible change would use new event names, which old readers skip.

use serde::{Deserialize, Serialize};

/// Protocol version written by this release.
pub const PROTOCOL_VERSION: u32 = 1;
/// SSE event name of a state change (also sent once when a subscriber connects).
pub const STATE_MESSAGE: &str = "state";
/// SSE event name of the periodic heartbeat.
pub const HEARTBEAT_MESSAGE: &str = "heartbeat";
/// Path of the state stream on the sidecar's serve port.
pub const STATE_STREAM_PATH: &str = "/_spawner/events";
/// Path where the sweeper seals a backend before it sweeps it (`POST`, with the events token):
/// the sidecar answers `200` and refuses every new connection from then on (for
/// [`SEAL_HOLD_SECONDS`]) if it has no live connection, or `409` if it has one. Sealing closes
/// the race between the sweeper deciding a backend is idle and a user connecting to it while
/// the sweep is written: no connection can be accepted once the sweep is decided. A seal in
/// force is renewed by the same request (it never fails then), so the sweeper keeps it while
/// its write is in flight.
pub const SEAL_PATH: &str = "/_spawner/seal";
/// Makes the seal permanent (`POST`, with the events token): the sweep was written, the backend
/// never takes a connection again. `200`, or `409` when no seal was in force and a connection
/// is live.
pub const SEAL_PERMANENT_PATH: &str = "/_spawner/seal/permanent";
/// Releases a seal that is not permanent (`POST`, with the events token): the sweep was
/// decided against (its write failed), so users may connect again at once. `200`, or `409` when
/// the seal is permanent.
pub const UNSEAL_PATH: &str = "/_spawner/unseal";
/// How long a seal holds unless renewed: a sweeper that vanished mid-sweep does not leave the
/// backend refusing users for good.
pub const SEAL_HOLD_SECONDS: u64 = 30;
/// How often the sweeper renews a seal while its Swept write is in flight: well within
/// [`SEAL_HOLD_SECONDS`].
pub const SEAL_RENEW_SECONDS: u64 = 10;
/// Header carrying the events token (`Authorization: Bearer <token>` works too).
pub const CONTROL_TOKEN_HEADER: &str = "x-spawner-token";

/// What a sidecar knows about its backend at one moment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SidecarState {
    /// Protocol version of the writer.
    #[serde(default = "default_version")]
    pub v: u32,
    /// The application accepts TCP connections on its port.
    pub ready: bool,
    /// Open WebSockets plus HTTP requests in flight.
    pub live_connections: u64,
    /// Whole seconds since the last connect, disconnect or request.
    pub seconds_since_active: u64,
    /// The same in milliseconds, from writers that know it (readers fall back to
    /// `seconds_since_active`, which loses up to a second of the countdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis_since_active: Option<u64>,
}

impl SidecarState {
    /// Time since the last activity, as precisely as the writer reported it.
    pub fn idle(&self) -> std::time::Duration {
        match self.millis_since_active {
            Some(ms) => std::time::Duration::from_millis(ms),
            None => std::time::Duration::from_secs(self.seconds_since_active),
        }
    }
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

/// One message of the state stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateMessage {
    State(SidecarState),
    Heartbeat(SidecarState),
}

impl StateMessage {
    pub fn state(&self) -> &SidecarState {
        match self {
            StateMessage::State(s) | StateMessage::Heartbeat(s) => s,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            StateMessage::State(_) => STATE_MESSAGE,
            StateMessage::Heartbeat(_) => HEARTBEAT_MESSAGE,
        }
    }

    /// The message in SSE wire format, terminated by its blank line.
    pub fn to_sse(&self) -> String {
        // Serializing a struct of plain numbers and bools cannot fail.
        let data = serde_json::to_string(self.state()).unwrap_or_default();
        format!("event: {}\ndata: {}\n\n", self.name(), data)
    }

    /// Interprets one parsed SSE message. `Ok(None)` for event names this release does not know.
    pub fn from_message(message: &SseMessage) -> Result<Option<Self>, serde_json::Error> {
        let wrap: fn(SidecarState) -> StateMessage = match message.event.as_str() {
            STATE_MESSAGE => StateMessage::State,
            HEARTBEAT_MESSAGE => StateMessage::Heartbeat,
            _ => return Ok(None),
        };
        Ok(Some(wrap(serde_json::from_str(&message.data)?)))
    }
}

/// One Server-Sent-Events message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// `message` when the stream named none.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Incremental SSE parser: feed it bytes as they arrive, get whole messages back.
///
/// Follows the HTML living standard's rules: `\n`, `\r\n` or `\r` end lines, lines starting with
/// `:` are comments, `data` lines are joined with `\n`, a blank line dispatches.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    current: SseMessage,
    has_data: bool,
    /// Longest line accepted before the stream is considered broken.
    max_line: usize,
}

/// The stream sent a line longer than the parser accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("server-sent event line longer than {0} bytes")]
pub struct SseLineTooLong(pub usize);

impl SseParser {
    pub fn new() -> Self {
        Self::with_max_line(64 * 1024)
    }

    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            max_line,
            ..Self::default()
        }
    }

    /// Adds bytes and returns the messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseMessage>, SseLineTooLong> {
        self.buffer.extend_from_slice(bytes);
        let mut messages = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buffer.len() {
            let b = self.buffer[i];
            if b == b'\n' || b == b'\r' {
                // A `\r` at the end of the buffer may be the first half of `\r\n`: wait for more.
                if b == b'\r' && i + 1 == self.buffer.len() {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buffer[start..i]).into_owned();
                if b == b'\r' && self.buffer.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                i += 1;
                start = i;
                if let Some(message) = self.line(&line) {
                    messages.push(message);
                }
                continue;
            }
            i += 1;
        }
        self.buffer.drain(..start);
        if self.buffer.len() > self.max_line {
            return Err(SseLineTooLong(self.max_line));
        }
        Ok(messages)
    }

    fn line(&mut self, line: &str) -> Option<SseMessage> {
        if line.is_empty() {
            let mut message = std::mem::take(&mut self.current);
            let had_data = std::mem::take(&mut self.has_data);
            if !had_data {
                // Keep the last event id, as the standard asks; drop everything else.
                self.current.id = message.id;
                return None;
            }
            if message.event.is_empty() {
                message.event = "message".into();
            }
            self.current.id = message.id.clone();
            return Some(message);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.current.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.current.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SidecarState {
        SidecarState {
            v: PROTOCOL_VERSION,
            ready: true,
            live_connections: 2,
            seconds_since_active: 0,
            millis_since_active: Some(250),
        }
    }

    #[test]
    fn event_round_trips_through_sse() {
        for event in [
            StateMessage::State(sample()),
            StateMessage::Heartbeat(sample()),
        ] {
            let mut parser = SseParser::new();
            let messages = parser.push(event.to_sse().as_bytes()).expect("parse");
            assert_eq!(messages.len(), 1);
            let back = StateMessage::from_message(&messages[0]).expect("json");
            assert_eq!(back, Some(event));
        }
    }

    #[test]
    fn newer_writer_with_extra_fields_is_understood() {
        let message = SseMessage {
            event: STATE_MESSAGE.into(),
            data:
                r#"{"v":7,"ready":false,"live_connections":1,"seconds_since_active":4,"cpu":0.5}"#
                    .into(),
            id: None,
        };
        let event = StateMessage::from_message(&message)
            .expect("json")
            .expect("known");
        assert_eq!(event.state().v, 7);
        assert_eq!(event.state().live_connections, 1);
    }

    #[test]
    fn older_writer_without_version_defaults_to_current() {
        let state: SidecarState =
            serde_json::from_str(r#"{"ready":true,"live_connections":0,"seconds_since_active":9}"#)
                .expect("json");
        assert_eq!(state.v, PROTOCOL_VERSION);
    }

    #[test]
    fn unknown_event_names_are_skipped() {
        let message = SseMessage {
            event: "state-v2".into(),
            data: "{}".into(),
            id: None,
        };
        assert_eq!(StateMessage::from_message(&message).expect("ok"), None);
    }

    #[test]
    fn parser_handles_comments_crlf_multiline_and_ids() {
        let mut parser = SseParser::new();
        let input =
            b": keep-alive\r\nid: 7\r\nevent: phase\r\ndata: a\r\ndata: b\r\n\r\ndata: c\n\n";
        let messages = parser.push(input).expect("parse");
        assert_eq!(
            messages,
            vec![
                SseMessage {
                    event: "phase".into(),
                    data: "a\nb".into(),
                    id: Some("7".into())
                },
                SseMessage {
                    event: "message".into(),
                    data: "c".into(),
                    id: Some("7".into())
                },
            ]
        );
    }

    #[test]
    fn parser_rejects_endless_lines() {
        let mut parser = SseParser::with_max_line(8);
        assert_eq!(parser.push(b"data: 0123456789"), Err(SseLineTooLong(8)));
    }

    proptest! {
        #[test]
        fn any_split_of_the_stream_gives_the_same_messages(
            states in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..100_000), 1..10),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let events: Vec<_> = states
                .iter()
                .map(|&(ready, live, idle)| StateMessage::State(SidecarState {
                    v: PROTOCOL_VERSION, ready, live_connections: live, seconds_since_active: idle,
                    millis_since_active: Some(idle * 1000),
                }))
                .collect();
            let wire: String = events.iter().map(StateMessage::to_sse).collect();
            let bytes = wire.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len())).collect();
            points.sort();
            let mut parser = SseParser::new();
            let mut parsed = Vec::new();
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                parsed.extend(parser.push(&bytes[last..p]).expect("parse"));
                last = p;
            }
            let back: Vec<_> = parsed
                .iter()
                .map(|m| StateMessage::from_message(m).expect("json").expect("known"))
                .collect();
            prop_assert_eq!(back, events);
        }
    }
}
