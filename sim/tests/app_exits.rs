//! Apps that crash while their users are connected: the backend ends Failed, its users' sockets
//! end, and they reconnect (through `/connect`) to a fresh backend of their room; none fails to
//! connect.

use std::time::Duration;

use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

#[test]
fn apps_that_crash_under_their_users_end_failed_and_their_users_reconnect() {
    let params = WorkloadParams {
        users: 40,
        rooms: 8,
        mean_interarrival_ms: 500.0,
        session_min_ms: 20_000.0,
        session_cap_ms: 40_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let seed = 46;
    let trace = generate(&params, &mut SimRng::new(seed));
    let mut config = WorldConfig::new(seed, trace);
    config.nodes = 2;
    config.drain = Duration::from_secs(90);
    // Half the rooms' apps crash 10 s after they start, every time.
    config.apps_crash_every = 2;
    config.apps_crash_after = Duration::from_secs(10);
    config.allowed_user_failures = Some(0);
    match run(config) {
        Ok(summary) => {
            println!("{summary}");
            assert!(summary.failed > 0, "some apps crashed: {summary}");
            assert!(
                summary.users.connections_lost > 0,
                "users saw their app crash: {summary}"
            );
            assert_eq!(
                summary.swept + summary.failed,
                summary.backends,
                "{summary}"
            );
        }
        Err(failure) => panic!("{failure}"),
    }
}
