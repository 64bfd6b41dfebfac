use std::io::Read;

use spawner_core::trace::{Trace, TraceEventKind};

use super::*;

const KEY: &[u8] = b"operator-key";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spawner-trace-recorder-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn config(path: &Path) -> RecorderConfig {
    RecorderConfig::new(path, KEY, "api", "2026-12-05T00:00:00Z")
}

fn read(path: &Path) -> Trace {
    let file = File::open(path).expect("trace file");
    Trace::read(std::io::BufReader::new(file)).expect("a valid trace")
}

#[tokio::test(start_paused = true)]
async fn writes_a_valid_trace_with_opaque_ids_and_times_from_the_start() {
    let dir = scratch("basic");
    let path = dir.join("api.jsonl");
    let (recorder, handle) = TraceRecorder::start(config(&path)).expect("starts");
    recorder.record("alice", "doc-42", TraceEventKind::Spawn);
    tokio::time::advance(std::time::Duration::from_millis(1500)).await;
    recorder.record(
        "alice",
        "doc-42",
        TraceEventKind::Connect {
            conn: "alice-tab-1".into(),
        },
    );
    recorder.record("bob", "doc-42", TraceEventKind::Spawn);
    recorder.record(
        "alice",
        "doc-42",
        TraceEventKind::Message {
            conn: "alice-tab-1".into(),
            bytes: 77,
        },
    );
    recorder.record(
        "alice",
        "doc-42",
        TraceEventKind::Disconnect {
            conn: "alice-tab-1".into(),
            clean: false,
        },
    );
    let stats = handle.finish();
    assert_eq!(
        stats,
        RecorderStats {
            accepted: 5,
            written: 5,
            files: 1,
            ..RecorderStats::default()
        }
    );
    let text = std::fs::read_to_string(&path).expect("read");
    for raw in ["alice", "bob", "doc-42", "tab"] {
        assert!(!text.contains(raw), "{raw} leaked into {text}");
    }
    let trace = read(&path);
    assert_eq!(trace.header.source, "api");
    assert_eq!(trace.header.started_at, "2026-12-05T00:00:00Z");
    let times: Vec<u64> = trace.events.iter().map(|e| e.t_ms).collect();
    assert_eq!(times, [0, 1500, 1500, 1500, 1500]);
    let alice = opaque_id(KEY, "alice");
    assert_eq!(alice.len(), 24);
    assert_eq!(trace.events[0].session, alice);
    assert_eq!(trace.events[2].session, opaque_id(KEY, "bob"));
    assert_eq!(trace.events[0].key, trace.events[2].key, "one key, one id");
    assert_eq!(
        trace.events[4].kind,
        TraceEventKind::Disconnect {
            conn: opaque_id(KEY, "alice-tab-1"),
            clean: false
        }
    );
    assert_eq!(
        trace.events[3].kind,
        TraceEventKind::Message {
            conn: opaque_id(KEY, "alice-tab-1"),
            bytes: 77
        }
    );
    // Another operator key gives unrelated ids.
    assert_ne!(opaque_id(b"another-key", "alice"), alice);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn rotates_by_size_each_file_a_trace_keeping_the_newest() {
    let dir = scratch("rotate");
    let path = dir.join("api.jsonl");
    let mut config = config(&path);
    config.rotate_bytes = 1000;
    config.buffer_events = 1000;
    let (recorder, handle) = TraceRecorder::start(config.clone()).expect("starts");
    for i in 0..100 {
        recorder.record(
            &format!("s{i}"),
            &format!("k{}", i % 7),
            TraceEventKind::Spawn,
        );
    }
    let stats = handle.finish();
    assert_eq!(stats.written, 100, "{stats:?}");
    assert!(stats.files >= 3, "{stats:?}");
    let mut events = 0;
    for index in 0..stats.files {
        let segment = segment_path(&path, index);
        let trace = read(&segment);
        assert_eq!(trace.header.source, "api", "{}", segment.display());
        events += trace.events.len();
        // A file ends at the first line that reaches the limit.
        let size = std::fs::metadata(&segment).expect("segment").len();
        assert!(size < 1000 + 200, "{size}");
    }
    assert_eq!(events, 100);
    assert_eq!(segment_path(&path, 2), dir.join("api.2.jsonl"));

    // With keep_files, only the newest files stay.
    let path = dir.join("kept.jsonl");
    let mut config = RecorderConfig {
        path: path.clone(),
        ..config
    };
    config.keep_files = 2;
    let (recorder, handle) = TraceRecorder::start(config).expect("starts");
    for i in 0..100 {
        recorder.record(&format!("s{i}"), "k", TraceEventKind::Spawn);
    }
    let stats = handle.finish();
    let present: Vec<u64> = (0..stats.files)
        .filter(|i| segment_path(&path, *i).exists())
        .collect();
    assert_eq!(present, [stats.files - 2, stats.files - 1], "{stats:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The writer is stuck (a FIFO nobody reads: a hung disk). Recording goes on without waiting:
/// the buffer fills, further events are dropped and counted, and once the writer can write
/// again every accepted event reaches the file.
#[test]
fn a_full_buffer_drops_and_counts_and_never_blocks() {
    let dir = scratch("full");
    let path = dir.join("stuck.jsonl");
    let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || {
            // Opens when the recorder opens the other end, then reads nothing until told.
            let mut fifo = File::open(&path).expect("fifo");
            let _ = wait.recv();
            let mut text = String::new();
            fifo.read_to_string(&mut text).expect("read");
            text
        })
    };
    let mut config = config(&path);
    config.buffer_events = 8;
    config.rotate_bytes = 0;
    let (recorder, handle) = TraceRecorder::start(config).expect("starts");
    let attempts = 5000;
    for i in 0..attempts {
        recorder.record(&format!("s{i}"), "k", TraceEventKind::Spawn);
    }
    // Every record call returned while the pipe (64 KiB, about 700 lines) was full.
    let during = recorder.stats();
    assert!(during.dropped_full > 0, "{during:?}");
    assert_eq!(during.accepted + during.dropped_full, attempts);
    go.send(()).expect("reader");
    let stats = handle.finish();
    let text = reader.join().expect("reader thread");
    let trace = Trace::read(text.as_bytes()).expect("valid trace");
    assert_eq!(trace.events.len() as u64, stats.written);
    assert_eq!(stats.written, stats.accepted, "{stats:?}");
    assert_eq!(stats.accepted + stats.dropped_full, attempts, "{stats:?}");
    assert_eq!(stats.dropped_io, 0);
    // After the writer stopped, events are dropped too, not queued forever.
    recorder.record("late", "k", TraceEventKind::Spawn);
    assert_eq!(recorder.stats().dropped_full, stats.dropped_full + 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// Every write fails (`/dev/full`: no space left on device): events are dropped and counted,
/// recording goes on.
#[test]
fn a_failing_disk_drops_and_counts() {
    let mut config = config(Path::new("/dev/full"));
    config.rotate_bytes = 0;
    let (recorder, handle) = TraceRecorder::start(config).expect("opens /dev/full");
    for i in 0..50 {
        recorder.record(&format!("s{i}"), "k", TraceEventKind::Spawn);
    }
    let stats = handle.finish();
    assert_eq!(stats.written, 0, "{stats:?}");
    assert_eq!(stats.accepted + stats.dropped_full, 50, "{stats:?}");
    assert_eq!(stats.dropped_io, stats.accepted, "{stats:?}");
}

#[test]
fn refuses_an_empty_key_an_empty_buffer_and_an_unwritable_path() {
    let dir = scratch("refuse");
    let mut no_key = config(&dir.join("a.jsonl"));
    no_key.key.clear();
    assert!(matches!(
        TraceRecorder::start(no_key),
        Err(RecorderError::EmptyKey)
    ));
    let mut no_buffer = config(&dir.join("a.jsonl"));
    no_buffer.buffer_events = 0;
    assert!(matches!(
        TraceRecorder::start(no_buffer),
        Err(RecorderError::NoBuffer)
    ));
    let missing = config(&dir.join("missing/a.jsonl"));
    let error = TraceRecorder::start(missing).expect_err("no directory");
    assert!(error.to_string().contains("missing/a.jsonl"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A `connect` lost to a full buffer must not leave its connection's later events in the file:
/// the trace would name a connection it never opened, and readers refuse such a trace.
#[test]
fn events_of_connections_never_opened_are_dropped_and_counted() {
    let dir = scratch("unopened");
    let path = dir.join("router.jsonl");
    let (recorder, handle) = TraceRecorder::start(config(&path)).expect("starts");
    let conn = |c: &str| c.to_string();
    // `lost`'s connect never reached the recorder (as when the buffer was full).
    recorder.record(
        "s",
        "k",
        TraceEventKind::Message {
            conn: conn("lost"),
            bytes: 5,
        },
    );
    recorder.record("s", "k", TraceEventKind::Connect { conn: conn("kept") });
    recorder.record("s", "k", TraceEventKind::Connect { conn: conn("kept") });
    recorder.record(
        "s",
        "k",
        TraceEventKind::Message {
            conn: conn("kept"),
            bytes: 9,
        },
    );
    recorder.record(
        "s",
        "k",
        TraceEventKind::Disconnect {
            conn: conn("lost"),
            clean: true,
        },
    );
    recorder.record(
        "s",
        "k",
        TraceEventKind::Disconnect {
            conn: conn("kept"),
            clean: true,
        },
    );
    recorder.record(
        "s",
        "k",
        TraceEventKind::Message {
            conn: conn("kept"),
            bytes: 1,
        },
    );
    let stats = handle.finish();
    assert_eq!(
        stats,
        RecorderStats {
            accepted: 7,
            written: 3,
            dropped_unopened: 4,
            files: 1,
            ..RecorderStats::default()
        }
    );
    let trace = read(&path);
    let kinds: Vec<&str> = trace
        .events
        .iter()
        .map(|e| match e.kind {
            TraceEventKind::Connect { .. } => "connect",
            TraceEventKind::Message { .. } => "message",
            TraceEventKind::Disconnect { .. } => "disconnect",
            TraceEventKind::Spawn => "spawn",
        })
        .collect();
    assert_eq!(kinds, ["connect", "message", "disconnect"]);
    let _ = std::fs::remove_dir_all(dir);
}
