//! The controller split brain the simulator found before the leader election was fixed
//! (issue 17; docs/simulation.md, findings): a world of 16 users in 4 rooms on one node whose
//! leading controller's link to the API server gets 3–6 s of latency per message from 8 s to
//! 48 s. With renewals counted from when their response arrived (not from when they were sent)
//! and reconciles running on after leadership was lost, `controller-0 sent DELETE
//! …/sessionlivedbackends/slab-… while the lease is held by controller-1` at 35.64 s. The
//! controller now counts a term from the renewal request it sent, checks its renew deadline,
//! and fences reconciles on lost leadership; this world must pass.
//!
//! One world in this process, on a fresh thread, so it runs exactly as the binary does.

use std::time::Duration;

use spawner_sim::faults::{Fault, FaultKind};
use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

#[test]
fn a_leader_behind_a_slow_link_stops_writing_before_another_takes_over() {
    let seed = 26;
    let params = WorkloadParams {
        users: 16,
        rooms: 4,
        session_cap_ms: 8_000.0,
        ..WorkloadParams::default()
    };
    let trace = generate(&params, &mut SimRng::new(seed));
    let mut config = WorldConfig::new(seed, trace);
    config.nodes = 1;
    config.slots_per_node = 6;
    config.grace_seconds = 3;
    config.controllers = 2;
    // Vanished users are noticed within 60 s; then grace, sweep and retention.
    config.drain = Duration::from_secs(90);
    config.allowed_user_failures = Some(spawner_sim::scenario::allowed_user_failures(16, 1));
    config.faults = vec![Fault {
        at: Duration::from_secs(8),
        duration: Duration::from_secs(40),
        kind: FaultKind::Latency {
            a: "leader".into(),
            b: "apiserver".into(),
            min: Duration::from_millis(3_000),
            max: Duration::from_millis(6_000),
        },
    }];
    let result = std::thread::spawn(move || run(config))
        .join()
        .expect("world thread");
    match result {
        Ok(summary) => {
            println!("{summary}");
            assert_eq!(summary.users.sessions, 16, "{summary}");
        }
        Err(failure) => panic!("{failure}"),
    }
}
