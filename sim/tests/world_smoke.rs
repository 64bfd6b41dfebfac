//! A small world runs end to end: users spawn backends by key, talk to them through their
//! sidecars, leave, and every backend is swept and cleaned up, with every invariant checked at
//! every step.

use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

#[test]
fn a_small_world_drains_cleanly() {
    let params = WorkloadParams {
        users: 20,
        rooms: 6,
        mean_interarrival_ms: 500.0,
        session_cap_ms: 20_000.0,
        ..WorkloadParams::default()
    };
    let trace = generate(&params, &mut SimRng::new(1));
    let config = WorldConfig::new(1, trace);
    match run(config) {
        Ok(summary) => {
            println!("{summary}");
            assert_eq!(summary.users.sessions, 20);
            assert!(summary.backends > 0);
            assert_eq!(
                summary.swept + summary.failed,
                summary.backends,
                "{summary}"
            );
        }
        Err(failure) => panic!("{failure}"),
    }
}
