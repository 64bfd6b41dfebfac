//! Crashes, partitions and slow links of every component while users come and go: every
//! invariant is checked at every step, sweeping resumes after the fault heals, and nothing
//! leaks.

use std::time::Duration;

use spawner_sim::faults::{Fault, FaultKind};
use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{Summary, WorldConfig, run};

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

fn with_faults(seed: u64, faults: Vec<(u64, u64, FaultKind)>) -> Summary {
    with_faults_in(seed, faults, |_| {})
}

/// Runs the standard fault world of `seed`, changed by `shape`, with `faults` (at, duration
/// in seconds, fault).
fn with_faults_in(
    seed: u64,
    faults: Vec<(u64, u64, FaultKind)>,
    shape: impl FnOnce(&mut WorldConfig),
) -> Summary {
    let trace = generate(&params(), &mut SimRng::new(seed));
    let mut config = WorldConfig::new(seed, trace);
    config.nodes = 2;
    // Vanished users are noticed within 60 s; then grace, sweep and retention.
    config.drain = Duration::from_secs(90);
    config.allowed_user_failures = Some(spawner_sim::scenario::allowed_user_failures(
        params().users,
        faults.len(),
    ));
    config.faults = faults
        .into_iter()
        .map(|(at, duration, kind)| Fault {
            at: Duration::from_secs(at),
            duration: Duration::from_secs(duration),
            kind,
        })
        .collect();
    shape(&mut config);
    match run(config) {
        Ok(summary) => {
            println!("{summary}");
            assert!(summary.ready > 0, "{summary}");
            assert_eq!(
                summary.swept + summary.failed + summary.terminated,
                summary.backends,
                "{summary}"
            );
            summary
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

fn clock_step(host: &str, by_seconds: i64) -> FaultKind {
    FaultKind::ClockStep {
        host: host.into(),
        by_ms: by_seconds * 1_000,
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
    // One of the two replicas: its users fail over to the other.
    with_faults(33, vec![(6, 5, crash("api-0"))]);
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
            (22, 6, partition("api-*", "apiserver")),
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
            (8, 20, latency("api-*", "apiserver", 200, 2_000)),
            (8, 20, latency("node-0", "apiserver", 200, 2_000)),
            (8, 20, latency("node-1", "apiserver", 200, 2_000)),
            (20, 15, latency("users-*", "*", 200, 2_000)),
        ],
    );
}

#[test]
fn the_controllers_clock_steps_forward_then_back() {
    // Backends live at most 5 minutes. With the controller's clock 10 minutes ahead, every
    // lifetime is over by its clock: the backends alive end at once (MaxLifetimeExceeded, with
    // their users connected: a lifetime is a hard bound the client asked for), and so does each
    // backend created meanwhile, before it is Ready. With the clock 10 minutes behind, nothing
    // ends early, and finished backends wait for their retention until the clock is corrected.
    // Sweeps stay on time throughout (a clock step suspends no deadline).
    let summary = with_faults_in(
        39,
        vec![
            (10, 10, clock_step("controller-0", 600)),
            (30, 20, clock_step("controller-0", -600)),
        ],
        |config| config.max_lifetime_seconds = Some(300),
    );
    assert!(
        summary.terminated > 0,
        "the step ended lifetimes: {summary}"
    );
}

#[test]
fn the_nodes_clocks_step_forward_and_back() {
    // The node agents and sweepers stamp pod statuses and Ready/Swept conditions with clocks
    // 10 minutes off. Idle countdowns are monotonic: sweeps stay on time. Backends swept by
    // the node ahead are stamped 10 minutes in the future, so the controller keeps them for
    // their retention counted from that stamp (their pods and services go at once).
    let summary = with_faults(
        40,
        vec![
            (8, 30, clock_step("node-0", 600)),
            (8, 30, clock_step("node-1", -600)),
        ],
    );
    assert!(summary.retained > 0, "swept with a clock ahead: {summary}");
}

#[test]
fn the_api_servers_and_the_apis_clocks_step() {
    // The API server stamps creation 10 minutes in the past: by the controller's clock, the
    // 5-minute lifetime of every backend created meanwhile is already over. The api's clock
    // only stamps terminate requests.
    let summary = with_faults_in(
        41,
        vec![
            (10, 10, clock_step("apiserver", -600)),
            (25, 20, clock_step("api-0", 600)),
        ],
        |config| config.max_lifetime_seconds = Some(300),
    );
    assert!(
        summary.terminated > 0,
        "the step ended lifetimes: {summary}"
    );
}

fn hold(a: &str, b: &str) -> FaultKind {
    FaultKind::Hold {
        a: a.into(),
        b: b.into(),
    }
}

#[test]
fn the_leader_is_paused_while_its_lease_runs_out() {
    // Everything between the leading controller and the API server is held for 30 s (twice the
    // lease) and then delivered: the other replica takes the lease over meanwhile, and the
    // paused one must have stopped writing by then (checked at every step).
    with_faults(42, vec![(10, 30, hold("leader", "apiserver"))]);
}

#[test]
fn the_leaders_api_server_link_is_slow_then_partitioned() {
    // Responses to the leader take up to 3 s (renewals barely fit the renew deadline), then the
    // link drops everything for 20 s.
    with_faults(
        43,
        vec![
            (6, 12, latency("leader", "apiserver", 500, 3_000)),
            (20, 20, partition("leader", "apiserver")),
        ],
    );
}

#[test]
fn a_router_crashes_and_restarts() {
    // The users relayed by router-0 lose their sockets with it (the sidecars notice by their
    // pings); new connections go to router-1 while it is down.
    with_faults(44, vec![(15, 10, crash("router-0"))]);
}

#[test]
fn routers_are_partitioned_from_the_api_server_the_pods_and_the_users() {
    // router-0's backend cache goes stale (it neither sees new backends nor ends), router-1
    // cannot reach the pods, and one users host cannot reach router-0 (its sessions fail over).
    with_faults(
        45,
        vec![
            (10, 12, partition("router-0", "apiserver")),
            (25, 10, partition("router-1", "node-*-pod-*")),
            (40, 10, partition("users-0", "router-0")),
        ],
    );
}

#[test]
fn watches_resume_after_the_api_server_compacts_its_history() {
    // The API server restarts (its clients' watches die with their connections and resume
    // after their read timeout, from the last version they saw), then compacts its history:
    // every resumed watch gets 410 Expired and must list again.
    with_faults(
        47,
        vec![(20, 1, crash("apiserver")), (22, 1, FaultKind::Compact)],
    );
}

#[test]
fn the_api_server_throttles() {
    // Half the components' requests are answered 429 with Retry-After: 1 for 15 s, then every
    // one for 10 s: every component waits and retries (never faster than the API server
    // allows, checked at every step), sweeps resume on time once it stops, and the users
    // caught in it are bounded and reported.
    let summary = with_faults(
        48,
        vec![
            (8, 15, FaultKind::Throttle { per_mille: 500 }),
            (30, 10, FaultKind::Throttle { per_mille: 1_000 }),
        ],
    );
    assert!(summary.throttled > 100, "{summary}");
}

#[test]
fn a_nodes_pods_are_evicted() {
    // Every pod of node-0 is evicted twice while users come and go (a drain's evictions):
    // their backends end Failed with reason Evicted, their users get a new backend through
    // get-or-create, and nothing is left behind.
    let summary = with_faults(
        49,
        vec![
            (15, 1, FaultKind::EvictNode { node: 0 }),
            (35, 1, FaultKind::EvictNode { node: 0 }),
        ],
    );
    let evicted = summary
        .events
        .iter()
        .filter(|e| e.contains(" Failed Evicted"))
        .count();
    assert!(evicted > 0, "{summary}");
    assert_eq!(evicted, summary.failed, "{summary}");
}
