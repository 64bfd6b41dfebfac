//! Session traces: recorded user sessions as JSON Lines, replayed deterministically by the
//! simulator (`spawner-sim --trace FILE`, `sim/tests/replay.rs`).
//!
//! The first line is a [`TraceHeader`]; every other line is a [`TraceEvent`], ordered by `t_ms`
//! (milliseconds from the start of the trace). See `docs/trace-format.md`.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// Value of the header's `format` field.
pub const TRACE_FORMAT: &str = "spawner-trace";
/// Version of the trace format written by this release.
pub const TRACE_VERSION: u32 = 1;

/// First line of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Always `spawner-trace`.
    pub format: String,
    pub version: u32,
    /// Who recorded it: `sidecar`, `api`, `sim`, `synthetic` ...
    pub source: String,
    /// RFC 3339 time the recording started.
    pub started_at: String,
}

impl TraceHeader {
    pub fn new(source: impl Into<String>, started_at: impl Into<String>) -> Self {
        Self {
            format: TRACE_FORMAT.into(),
            version: TRACE_VERSION,
            source: source.into(),
            started_at: started_at.into(),
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TraceEventKind {
    /// A session asked for its backend (get-or-create by `key`).
    Spawn,
    /// A connection (a WebSocket) to the session's backend opened.
    Connect { conn: String },
    /// A message on a connection.
    Message {
        conn: String,
        #[serde(default)]
        bytes: u64,
    },
    /// A connection ended; `clean: false` when the client vanished without closing.
    Disconnect {
        conn: String,
        #[serde(default = "yes")]
        clean: bool,
    },
}

fn yes() -> bool {
    true
}

/// One line after the header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub t_ms: u64,
    /// The user session.
    pub session: String,
    /// The backend key the session belongs to (sessions sharing a key share a backend).
    pub key: String,
    #[serde(flatten)]
    pub kind: TraceEventKind,
}

/// A whole trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub header: TraceHeader,
    pub events: Vec<TraceEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(line: usize, message: impl Into<String>) -> TraceError {
    TraceError::Invalid {
        line,
        message: message.into(),
    }
}

impl Trace {
    /// Parses and checks a trace: header first, known format and version, events ordered by
    /// time, every connection opened once before its messages and its disconnect.
    pub fn read(input: impl BufRead) -> Result<Self, TraceError> {
        let mut lines = input.lines().enumerate();
        let header = loop {
            let Some((i, line)) = lines.next() else {
                return Err(invalid(1, "empty trace: the first line must be a header"));
            };
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let header: TraceHeader = serde_json::from_str(&line)
                .map_err(|e| invalid(i + 1, format!("bad header: {e}")))?;
            if header.format != TRACE_FORMAT {
                return Err(invalid(
                    i + 1,
                    format!("format is {:?}, expected {TRACE_FORMAT:?}", header.format),
                ));
            }
            if header.version == 0 || header.version > TRACE_VERSION {
                return Err(invalid(
                    i + 1,
                    format!(
                        "version {} is not supported (this release reads 1..={TRACE_VERSION})",
                        header.version
                    ),
                ));
            }
            break header;
        };
        let mut events = Vec::new();
        let mut open = std::collections::HashSet::new();
        let mut last_t = 0;
        for (i, line) in lines {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let event: TraceEvent =
                serde_json::from_str(&line).map_err(|e| invalid(i + 1, e.to_string()))?;
            if event.t_ms < last_t {
                return Err(invalid(
                    i + 1,
                    format!("t_ms {} goes back in time (previous {last_t})", event.t_ms),
                ));
            }
            last_t = event.t_ms;
            match &event.kind {
                TraceEventKind::Spawn => {}
                TraceEventKind::Connect { conn } => {
                    if !open.insert(conn.clone()) {
                        return Err(invalid(i + 1, format!("connection {conn:?} opened twice")));
                    }
                }
                TraceEventKind::Message { conn, .. } => {
                    if !open.contains(conn) {
                        return Err(invalid(
                            i + 1,
                            format!("message on connection {conn:?} that is not open"),
                        ));
                    }
                }
                TraceEventKind::Disconnect { conn, .. } => {
                    if !open.remove(conn) {
                        return Err(invalid(
                            i + 1,
                            format!("disconnect of connection {conn:?} that is not open"),
                        ));
                    }
                }
            }
            events.push(event);
        }
        Ok(Trace { header, events })
    }

    /// Writes the trace as JSON Lines.
    pub fn write(&self, mut out: impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut out, &self.header)?;
        out.write_all(b"\n")?;
        for event in &self.events {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Distinct backend keys, in order of first appearance.
    pub fn keys(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.events
            .iter()
            .filter(|e| seen.insert(e.key.as_str()))
            .map(|e| e.key.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"format":"spawner-trace","version":1,"source":"synthetic","started_at":"2026-11-29T00:00:00Z"}
{"t_ms":0,"session":"s1","key":"room-1","type":"spawn"}
{"t_ms":40,"session":"s1","key":"room-1","type":"connect","conn":"c1"}
{"t_ms":90,"session":"s1","key":"room-1","type":"message","conn":"c1","bytes":12}
{"t_ms":5000,"session":"s1","key":"room-1","type":"disconnect","conn":"c1","clean":false}
"#;

    #[test]
    fn reads_and_writes_the_same_trace() {
        let trace = Trace::read(SAMPLE.as_bytes()).expect("valid trace");
        assert_eq!(trace.events.len(), 4);
        assert_eq!(
            trace.events[3].kind,
            TraceEventKind::Disconnect {
                conn: "c1".into(),
                clean: false
            }
        );
        let mut out = Vec::new();
        trace.write(&mut out).expect("write");
        assert_eq!(Trace::read(&out[..]).expect("reread"), trace);
        assert_eq!(trace.keys(), ["room-1"]);
    }

    #[test]
    fn rejects_broken_traces_with_the_line() {
        let cases = [
            ("", "line 1: empty trace"),
            (
                r#"{"format":"other","version":1,"source":"x","started_at":"t"}"#,
                "line 1: format",
            ),
            (
                r#"{"format":"spawner-trace","version":9,"source":"x","started_at":"t"}"#,
                "line 1: version 9",
            ),
        ];
        for (input, expected) in cases {
            let error = Trace::read(input.as_bytes()).expect_err(input).to_string();
            assert!(error.starts_with(expected), "{error}");
        }
        let header = SAMPLE.lines().next().expect("header");
        let bad_order = format!(
            "{header}\n{}\n{}\n",
            r#"{"t_ms":10,"session":"s","key":"k","type":"spawn"}"#,
            r#"{"t_ms":5,"session":"s","key":"k","type":"spawn"}"#
        );
        let error = Trace::read(bad_order.as_bytes())
            .expect_err("order")
            .to_string();
        assert!(error.starts_with("line 3: t_ms 5 goes back"), "{error}");
        let stray = format!(
            "{header}\n{}\n",
            r#"{"t_ms":10,"session":"s","key":"k","type":"disconnect","conn":"x"}"#
        );
        let error = Trace::read(stray.as_bytes())
            .expect_err("stray")
            .to_string();
        assert!(error.contains("not open"), "{error}");
    }
}
