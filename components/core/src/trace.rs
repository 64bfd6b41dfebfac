//! Session traces: recorded user sessions as JSON Lines, replayed by `spawner replay` against a
//! deployment and by the simulator deterministically.
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
    /// Who recorded it: `api`, `router`, `api+router`, `sim`, `synthetic` ...
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

/// Parses a header line and checks its format and version.
pub fn parse_header(line: &str) -> Result<TraceHeader, String> {
    let header: TraceHeader = serde_json::from_str(line).map_err(|e| format!("bad header: {e}"))?;
    if header.format != TRACE_FORMAT {
        return Err(format!(
            "format is {:?}, expected {TRACE_FORMAT:?}",
            header.format
        ));
    }
    if header.version == 0 || header.version > TRACE_VERSION {
        return Err(format!(
            "version {} is not supported (this release reads 1..={TRACE_VERSION})",
            header.version
        ));
    }
    Ok(header)
}

/// Parses one event line (unknown fields are ignored).
pub fn parse_event(line: &str) -> Result<TraceEvent, String> {
    serde_json::from_str(line).map_err(|e| e.to_string())
}

/// The rules that hold across a trace's events, checked one event at a time: times never
/// decrease, a connection is opened once and used only while open.
#[derive(Debug, Default)]
pub struct EventChecker {
    open: std::collections::HashSet<String>,
    last_t: u64,
}

impl EventChecker {
    /// Checks `event` after every event passed before it.
    pub fn check(&mut self, event: &TraceEvent) -> Result<(), String> {
        if event.t_ms < self.last_t {
            return Err(format!(
                "t_ms {} goes back in time (previous {})",
                event.t_ms, self.last_t
            ));
        }
        self.last_t = event.t_ms;
        match &event.kind {
            TraceEventKind::Spawn => {}
            TraceEventKind::Connect { conn } => {
                if !self.open.insert(conn.clone()) {
                    return Err(format!("connection {conn:?} opened twice"));
                }
            }
            TraceEventKind::Message { conn, .. } => {
                if !self.open.contains(conn) {
                    return Err(format!("message on connection {conn:?} that is not open"));
                }
            }
            TraceEventKind::Disconnect { conn, .. } => {
                if !self.open.remove(conn) {
                    return Err(format!(
                        "disconnect of connection {conn:?} that is not open"
                    ));
                }
            }
        }
        Ok(())
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
            break parse_header(&line).map_err(|e| invalid(i + 1, e))?;
        };
        let mut events = Vec::new();
        let mut checker = EventChecker::default();
        for (i, line) in lines {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let event = parse_event(&line).map_err(|e| invalid(i + 1, e))?;
            checker.check(&event).map_err(|e| invalid(i + 1, e))?;
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

/// The events of each session, in trace order, sessions ordered by id: what a replay plays, one
/// task per session (`spawner replay`, the simulator's users).
pub fn by_session(
    events: impl IntoIterator<Item = TraceEvent>,
) -> std::collections::BTreeMap<String, Vec<TraceEvent>> {
    let mut sessions: std::collections::BTreeMap<String, Vec<TraceEvent>> = Default::default();
    for event in events {
        sessions
            .entry(event.session.clone())
            .or_default()
            .push(event);
    }
    sessions
}

/// What a replay of a trace did, from the simulator (simulated time) or a live deployment
/// (`spawner replay`): the same fields, printed the same way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayReport {
    /// Where the times come from: `simulated time` or `wall time`.
    pub clock: String,
    pub sessions: u64,
    pub backends_created: u64,
    pub backends_swept: u64,
    pub connect_failures: u64,
    /// Time from a backend's creation to its Ready phase, one entry per backend that got Ready.
    pub spawn_to_ready_ms: Vec<u64>,
    /// Most backends alive (created, not yet ended) at once.
    pub peak_live_backends: u64,
    /// Seconds backends spent Ready with no connection, summed over backends.
    pub backend_idle_seconds: f64,
    /// Sessions that found their backend gone (ended, or sealed for its sweep) when they
    /// connected.
    pub sessions_found_backend_gone: u64,
}

/// The `q`-th percentile (0..=100) of `values` by the nearest-rank method; `None` when empty.
pub fn percentile(values: &[u64], q: u32) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (u64::from(q.min(100)) * sorted.len() as u64)
        .div_ceil(100)
        .max(1);
    sorted.get(rank as usize - 1).copied()
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |q| match percentile(&self.spawn_to_ready_ms, q) {
            Some(v) => format!("{v} ms"),
            None => "-".to_string(),
        };
        writeln!(f, "replay report ({})", self.clock)?;
        writeln!(f, "  sessions                      {}", self.sessions)?;
        writeln!(
            f,
            "  backends created              {}",
            self.backends_created
        )?;
        writeln!(f, "  backends swept                {}", self.backends_swept)?;
        writeln!(
            f,
            "  connect failures              {}",
            self.connect_failures
        )?;
        writeln!(
            f,
            "  spawn -> Ready p50 / p99      {} / {} ({} backends)",
            ms(50),
            ms(99),
            self.spawn_to_ready_ms.len()
        )?;
        writeln!(
            f,
            "  peak live backends            {}",
            self.peak_live_backends
        )?;
        writeln!(
            f,
            "  backend-seconds idle          {:.1}",
            self.backend_idle_seconds
        )?;
        write!(
            f,
            "  sessions found backend gone   {}",
            self.sessions_found_backend_gone
        )
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
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 99), Some(7));
        let values: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&values, 50), Some(50));
        assert_eq!(percentile(&values, 99), Some(99));
        assert_eq!(percentile(&values, 100), Some(100));
        assert_eq!(percentile(&[10, 20, 30], 50), Some(20));
        assert_eq!(percentile(&[10, 20, 30], 99), Some(30));
    }

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
        let mut two = trace.events.clone();
        two.insert(
            1,
            TraceEvent {
                t_ms: 10,
                session: "s0".into(),
                key: "room-1".into(),
                kind: TraceEventKind::Spawn,
            },
        );
        let sessions = by_session(two);
        assert_eq!(sessions.keys().collect::<Vec<_>>(), ["s0", "s1"]);
        assert_eq!(sessions["s1"], trace.events);
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
