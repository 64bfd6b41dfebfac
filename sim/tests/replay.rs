//! Recorded and synthetic session traces (`fixtures/*.jsonl`) replay in a world: every
//! session, connection and message of the trace happens, every invariant holds, and every
//! backend ends swept.

use std::collections::BTreeSet;
use std::path::PathBuf;

use spawner_core::trace::{Trace, TraceEventKind};
use spawner_sim::world::WorldConfig;

mod common;

spawner_sim::install_entropy_hook!();

/// `fixtures/*.jsonl` and `fixtures/traces/*.jsonl`.
fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("traces")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        files.extend(
            entries
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl")),
        );
    }
    files.sort();
    files
}

/// The generated fixtures are exactly their documented generators' output.
#[test]
fn generated_fixtures_match_their_generators() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/traces");
    for (name, trace) in spawner_sim::generators::fixtures() {
        let file = std::fs::File::open(dir.join(name)).expect("fixture opens");
        let committed = Trace::read(std::io::BufReader::new(file)).expect("valid trace");
        assert!(
            committed == trace,
            "fixtures/traces/{name} differs from its generator: cargo run -p spawner-sim --example generate_traces"
        );
    }
}

#[test]
fn every_fixture_replays_completely() {
    let files = fixtures();
    assert!(files.len() >= 2, "fixtures: {files:?}");
    for (i, path) in files.iter().enumerate() {
        let file = std::fs::File::open(path).expect("fixture opens");
        let trace = Trace::read(std::io::BufReader::new(file)).expect("fixture is a valid trace");
        let count = |f: fn(&TraceEventKind) -> bool| {
            trace.events.iter().filter(|e| f(&e.kind)).count() as u64
        };
        let sessions: BTreeSet<_> = trace.events.iter().map(|e| e.session.clone()).collect();
        let connects = count(|k| matches!(k, TraceEventKind::Connect { .. }));
        let messages = count(|k| matches!(k, TraceEventKind::Message { .. }));
        let mut config = WorldConfig::new(40 + i as u64, trace);
        config.drain = std::time::Duration::from_secs(90);
        println!("{}", path.display());
        let summary = common::run_world(config);
        assert_eq!(summary.users.sessions, sessions.len() as u64, "{summary}");
        assert_eq!(
            summary.users.connected, connects,
            "every connection opened: {summary}"
        );
        assert_eq!(
            summary.users.messages_echoed, messages,
            "every message echoed: {summary}"
        );
        assert!(
            summary.backends > 0 && summary.swept == summary.backends,
            "{summary}"
        );
        // The replay report agrees with the world's own counts.
        let report = spawner_sim::report::report(&summary);
        println!("{report}");
        assert_eq!(report.backends_created, summary.backends as u64);
        assert_eq!(report.backends_swept, summary.swept as u64);
        assert_eq!(report.spawn_to_ready_ms.len(), summary.ready, "{report}");
        assert!(
            report.peak_live_backends >= 1 && report.peak_live_backends <= summary.backends as u64,
            "{report}"
        );
        assert_eq!(report.connect_failures, 0, "{report}");
    }
}
