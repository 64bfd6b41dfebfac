//! Traces end to end: `spawner dev --record-trace` records (its api the spawns, its router the
//! WebSockets) while `spawner replay` plays `fixtures/traces/agreement.jsonl` against it over
//! HTTP and WebSockets through the router; the simulator plays the same trace, and the
//! recording, in a deterministic world. All three agree exactly on the
//! backends created and swept: the trace has no timing races (every reconnect comes long after
//! a sweep or long before one, docs/traces.md).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Dev, DevOptions, SPAWNER, TempDir};
use spawner::replay::{ReplayArgs, replay};
use spawner_core::trace::{ReplayReport, Trace, TraceEventKind};

const GRACE_SECONDS: u32 = 2;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/traces/agreement.jsonl")
}

fn read(path: &std::path::Path) -> Trace {
    let file = std::fs::File::open(path).expect("trace file");
    Trace::read(std::io::BufReader::new(file)).expect("valid trace")
}

/// The trace in a simulated world whose backends have the same grace period.
fn simulate(trace: Trace) -> ReplayReport {
    let mut config = spawner_sim::world::WorldConfig::new(19, trace);
    config.grace_seconds = GRACE_SECONDS;
    // Its own thread: a world runs its own runtimes.
    let summary = std::thread::spawn(move || spawner_sim::world::run(config))
        .join()
        .expect("the world's thread")
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("{summary}");
    spawner_sim::report::report(&summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_replay_recording_and_simulator_agree_on_backends() {
    let scratch = TempDir::new("traces");
    let recording = scratch.0.join("recorded.jsonl");
    let mut dev = Dev::start(DevOptions {
        record_trace: Some(recording.clone()),
        ..DevOptions::default()
    });
    let args = ReplayArgs {
        trace: fixture(),
        target: spawner::client::ApiTarget {
            api: dev.api_url.clone(),
            token: Some(dev.token.clone()),
        },
        speed: 1.0,
        concurrency: 16,
        duration: None,
        grace: GRACE_SECONDS,
        spawn_body: Some(serde_json::json!({"command": [SPAWNER, "demo-backend"]}).to_string()),
        settle_seconds: 30,
        ready_timeout_seconds: 30,
    };
    let live = replay(&args, false).await.expect("replay");
    println!("{live}");
    let exit = dev
        .interrupt(Duration::from_secs(40))
        .expect("spawner dev stops on SIGINT");
    assert!(exit.success(), "{exit:?}");

    let simulated = simulate(read(&fixture()));
    println!("{simulated}");
    // Three keys; the notebook's session comes back 13 s after its backend was swept and gets a
    // second one.
    for report in [&live, &simulated] {
        assert_eq!(
            (
                report.sessions,
                report.backends_created,
                report.backends_swept
            ),
            (4, 4, 4),
            "{report}"
        );
        assert_eq!(report.connect_failures, 0, "{report}");
        assert_eq!(report.sessions_found_backend_gone, 1, "{report}");
        assert_eq!(report.spawn_to_ready_ms.len(), 4, "{report}");
    }

    // One recording of the api and the router: every answered /connect (the four sessions'
    // spawns and the notebook's second ask) and every WebSocket through the router, with the
    // fixture's message sizes, under opaque ids.
    let recorded = read(&recording);
    assert_eq!(recorded.header.source, "api+router");
    let count =
        |f: fn(&TraceEventKind) -> bool| recorded.events.iter().filter(|e| f(&e.kind)).count();
    assert_eq!(
        count(|k| *k == TraceEventKind::Spawn),
        5,
        "{:?}",
        recorded.events
    );
    assert_eq!(count(|k| matches!(k, TraceEventKind::Connect { .. })), 5);
    assert_eq!(
        count(|k| matches!(k, TraceEventKind::Disconnect { clean: true, .. })),
        5,
        "every replayed close is a clean disconnect: {:?}",
        recorded.events
    );
    let mut sizes: Vec<u64> = recorded
        .events
        .iter()
        .filter_map(|e| match e.kind {
            TraceEventKind::Message { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [40, 120], "the fixture's messages, by size");
    let sessions: std::collections::BTreeSet<_> =
        recorded.events.iter().map(|e| e.session.as_str()).collect();
    assert_eq!(
        sessions.len(),
        4,
        "the router's connections are in the api's sessions"
    );
    assert_eq!(recorded.keys().len(), 3);
    // A session's connections go to the key its spawn asked for.
    let mut asked: std::collections::BTreeMap<&str, &str> = Default::default();
    for event in &recorded.events {
        match event.kind {
            TraceEventKind::Spawn => {
                asked.insert(&event.session, &event.key);
            }
            _ => assert_eq!(
                asked.get(event.session.as_str()),
                Some(&event.key.as_str()),
                "{event:?}"
            ),
        }
    }
    let text = std::fs::read_to_string(&recording).expect("recording");
    assert!(!text.contains("nb-c") && !text.contains("\"s4\""), "{text}");
    // Replayed in the simulator, the recording makes the same backends.
    let from_recording = simulate(recorded);
    println!("{from_recording}");
    assert_eq!(
        (
            from_recording.backends_created,
            from_recording.backends_swept
        ),
        (live.backends_created, live.backends_swept),
        "{from_recording}"
    );
    assert_eq!(from_recording.connect_failures, 0, "{from_recording}");
}
