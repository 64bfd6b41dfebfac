//! Crashes, partitions and slow links of every component while users come and go: every
//! invariant is checked at every step, sweeping resumes after the fault heals, and nothing
//! leaks.

use std::time::Duration;

use spawner_sim::faults::{Fault, FaultKind};
use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

fn params() -> WorkloadParams {
    WorkloadParams {
        users: 60,
        rooms: 15,
        mean_interarrival_ms: 400.0,
        session_cap_ms: 30_000.0,
        ..WorkloadParams::default()
    }
}

fn with_faults(seed: u64, faults: Vec<(u64, u64, FaultKind)>) {
    let trace = generate(&params(), &mut SimRng::new(seed));
    let mut config = WorldConfig::new(seed, trace);
    config.nodes = 2;
    // Vanished users are noticed within 60 s; then grace, sweep and retention.
    config.drain = Duration::from_secs(90);
    config.faults = faults
        .into_iter()
        .map(|(at, duration, kind)| Fault {
            at: Duration::from_secs(at),
            duration: Duration::from_secs(duration),
            kind,
        })
        .collect();
    match run(config) {
        Ok(summary) => {
            println!("{summary}");
            assert!(summary.ready > 0, "{summary}");
            assert_eq!(
                summary.swept + summary.failed,
                summary.backends,
                "{summary}"
            );
        }
        Err(failure) => {
            let path = std::env::temp_dir().join(format!("spawner-sim-faults-{seed}.events"));
            let _ = std::fs::write(&path, failure.events.join("\n"));
            panic!("{failure}\nall events: {}", path.display())
        }
    }
}

fn crash(host: &str) -> FaultKind {
    FaultKind::Crash { host: host.into() }
}

fn latency(a: &str, b: &str, min_ms: u64, max_ms: u64) -> FaultKind {
    FaultKind::Latency {
        a: a.into(),
        b: b.into(),
        min: Duration::from_millis(min_ms),
        max: Duration::from_millis(max_ms),
    }
}

fn partition(a: &str, b: &str) -> FaultKind {
    FaultKind::Partition {
        a: a.into(),
        b: b.into(),
    }
}

#[test]
fn controller_crashes_and_restarts() {
    with_faults(31, vec![(8, 6, crash("controller-0"))]);
}

#[test]
fn a_sweepers_node_host_crashes_and_restarts() {
    // The node host runs the node agent and the sweeper; its pods (slot hosts) keep running.
    with_faults(32, vec![(10, 8, crash("node-0"))]);
}

#[test]
fn the_api_crashes_and_restarts() {
    with_faults(33, vec![(6, 5, crash("api"))]);
}

#[test]
fn the_api_server_crashes_and_restarts_with_its_state() {
    with_faults(34, vec![(9, 6, crash("apiserver"))]);
}

#[test]
fn a_whole_node_crashes_and_restarts() {
    with_faults(35, vec![(12, 10, FaultKind::CrashNode { node: 1 })]);
}

#[test]
fn sweeper_and_sidecar_are_partitioned() {
    with_faults(
        36,
        vec![
            (8, 12, partition("node-0", "node-0-pod-0")),
            (10, 12, partition("node-1", "node-1-pod-1")),
        ],
    );
}

#[test]
fn components_are_partitioned_from_the_api_server() {
    with_faults(
        37,
        vec![
            (6, 10, partition("node-0", "apiserver")),
            (14, 8, partition("controller-0", "apiserver")),
            (22, 6, partition("api", "apiserver")),
        ],
    );
}

#[test]
fn links_are_slow_and_jittery() {
    // 200 ms to 2 s per message, drawn per message (segments overtake each other): between the
    // sweepers and their sidecars, between every component and the API server, and then
    // between the users and everything, in overlapping windows.
    with_faults(
        38,
        vec![
            (5, 25, latency("node-0", "node-0-pod-*", 200, 2_000)),
            (5, 25, latency("node-1", "node-1-pod-*", 200, 2_000)),
            (8, 20, latency("controller-0", "apiserver", 200, 2_000)),
            (8, 20, latency("api", "apiserver", 200, 2_000)),
            (8, 20, latency("node-0", "apiserver", 200, 2_000)),
            (8, 20, latency("node-1", "apiserver", 200, 2_000)),
            (20, 15, latency("users-*", "*", 200, 2_000)),
        ],
    );
}
