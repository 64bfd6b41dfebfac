//! Shared by the simulator's test binaries (each binary is its own process, so the suite's
//! worlds run in parallel).

use spawner_sim::world::{Summary, WorldConfig, run};

/// Runs `config`; a violation fails the test with the seed, the faults and the last events.
pub fn run_world(config: WorldConfig) -> Summary {
    match run(config) {
        Ok(summary) => {
            println!("{summary}");
            summary
        }
        Err(failure) => panic!("{failure}"),
    }
}

/// One world of the default scale suite: `users` users of the dense workload.
#[allow(dead_code)]
pub fn scale_world(seed: u64, users: usize) {
    let users = spawner_sim::scenario::users_from_env(users);
    for seed in seed..seed + spawner_sim::scenario::seeds_from_env(1) {
        let summary = run_world(spawner_sim::scenario::world(seed, users, 0));
        assert_eq!(summary.users.sessions, users as u64, "{summary}");
        assert!(
            summary.ready * 2 > summary.backends,
            "most backends became Ready: {summary}"
        );
        assert!(
            summary.backends * 10 >= users,
            "at least one backend per 10 users: {summary}"
        );
        // Swept, or terminated by the users who end their sessions (one in 20).
        assert_eq!(
            summary.swept + summary.failed + summary.terminated,
            summary.backends,
            "{summary}"
        );
        assert!(summary.users.terminated_by_users > 0, "{summary}");
        // Without faults nothing makes a pod fail: a failure is a bug (a pod bound past its
        // node's capacity failed for a slot before the node agent kept its bindings).
        assert_eq!(summary.failed, 0, "{summary}");
    }
}
