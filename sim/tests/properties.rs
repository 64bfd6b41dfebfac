//! Property tests over workload and fault parameters and seeds: whatever the users do and
//! whatever fails (crashes, partitions, slow links, clock steps: `faults::random_schedule`),
//! every invariant holds at every step. Each case is one world; a failing case
//! prints its world's seed and parameters. `SPAWNER_SIM_SEEDS=N` runs N cases (default 3) and
//! `SPAWNER_SIM_USERS=N` sets the largest user count (default 60).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use spawner_sim::faults::random_schedule;
use spawner_sim::rng::SimRng;
use spawner_sim::scenario::{seeds_from_env, users_from_env};
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::WorldConfig;
use std::time::Duration;

mod common;

spawner_sim::install_entropy_hook!();

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    params: WorkloadParams,
    faults: usize,
}

fn cases() -> impl Strategy<Value = Case> {
    let max_users = users_from_env(60).max(2);
    (
        any::<u64>(),
        1..max_users,
        1usize..12,
        0.0f64..0.3,
        0.0f64..0.2,
        100.0f64..1000.0,
        0usize..4,
    )
        .prop_map(
            |(seed, users, rooms, vanish, refresh, interarrival, faults)| Case {
                seed,
                params: WorkloadParams {
                    users,
                    rooms,
                    vanish_probability: vanish,
                    refresh_probability: refresh,
                    mean_interarrival_ms: interarrival,
                    session_cap_ms: 30_000.0,
                    ..WorkloadParams::default()
                },
                faults,
            },
        )
}

#[test]
fn invariants_hold_for_any_workload_and_faults() {
    let mut runner = TestRunner::new(Config {
        cases: seeds_from_env(3) as u32,
        // A case is a whole world: shrinking would rerun many of them.
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&cases(), |case| {
            let mut rng = SimRng::new(case.seed);
            let trace = generate(&case.params, &mut rng.fork(1));
            let end = Duration::from_millis(trace.events.last().map_or(0, |e| e.t_ms));
            let mut config = WorldConfig::new(case.seed, trace);
            config.nodes = 2;
            config.slots_per_node = 10;
            config.drain = Duration::from_secs(90);
            config.faults = random_schedule(
                &mut rng.fork(2),
                case.faults,
                Duration::from_secs(3),
                end.max(Duration::from_secs(4)),
                config.nodes,
                config.controllers,
                config.routers,
            );
            config.reproduce = format!("(property case {case:?})");
            // Without faults every user connects; with faults, what users saw is reported in
            // the summary (random small worlds can lose most of their few users to one fault).
            if case.faults == 0 {
                config.allowed_user_failures = Some(0);
            }
            let summary = common::run_world(config);
            prop_assert_eq!(summary.users.sessions, case.params.users as u64);
            prop_assert_eq!(
                summary.swept + summary.failed + summary.terminated,
                summary.backends
            );
            Ok(())
        })
        .expect("every case holds");
}
