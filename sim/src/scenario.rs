//! Ready-made worlds: the workload and world shapes the test suite, the soak knobs and the
//! command line share, so a failing seed from any of them is reproduced by the same code.

use std::time::Duration;

use crate::faults::{Fault, random_schedule};
use crate::rng::SimRng;
use crate::workload::{WorkloadParams, generate};
use crate::world::WorldConfig;

/// A dense workload of `users` sessions: many users per room (shared backends), short
/// heavy-tailed sessions, refresh storms and vanishing users, arriving fast enough that a world
/// holds tens of backends at once.
pub fn dense_workload(users: usize) -> WorkloadParams {
    WorkloadParams {
        users,
        mean_interarrival_ms: 250.0,
        burst_probability: 0.05,
        burst_size: 8,
        // A fixed number of open rooms, renewed every 60 arrivals: more users make a longer
        // run, not a wider one, so the world's pod slots always suffice; each room's backend
        // is swept once its users have left for the grace period.
        rooms: 8,
        rotate_rooms_every: 60,
        session_min_ms: 2_000.0,
        session_shape: 1.5,
        session_cap_ms: 30_000.0,
        mean_think_ms: 2_000.0,
        refresh_probability: 0.03,
        vanish_probability: 0.02,
    }
}

/// The world the suite and `spawner-sim --seed S --users N --faults F` run: a
/// [`dense_workload`] generated from the seed, and `faults` random faults scheduled while users
/// are active.
pub fn world(seed: u64, users: usize, faults: usize) -> WorldConfig {
    let params = dense_workload(users);
    let mut rng = SimRng::new(seed);
    let trace = generate(&params, &mut rng.fork(1));
    let mut config = WorldConfig::new(seed, trace);
    config.grace_seconds = 5;
    // turmoil links every pair of hosts and visits every link for every host at every step:
    // the cost of a step grows with the cube of the host count, so the world is as small as
    // the workload allows. The workload keeps about 21 backends alive at the median and up to
    // about 37 at its peaks (a vanished user holds a backend for up to 60 s): with 20 slots the
    // world was full 60 % of the time, pods waited for a slot and 1-2 % of users gave up
    // waiting for Ready; 32 slots cover the peaks (no user gives up in seeds 100-400), and the
    // run is faster than a full world's (no pending pods retried every second).
    config.nodes = 2;
    config.slots_per_node = 16;
    config.user_hosts = 2;
    // One session in 20 ends by terminating its backend (an "end session" button): the
    // room's other users then meet an ended backend and get a fresh one.
    config.users_terminate_every = 20;
    // A user who vanished is noticed by the sidecar's pings within 60 s of its last byte
    // (15 s interval, 2 missed pongs, checked on the ticks); then grace, sweep and retention.
    config.drain = Duration::from_secs(90);
    config.reproduce = format!("--seed {seed} --users {} --faults {faults}", params.users);
    config.allowed_user_failures = Some(allowed_user_failures(params.users, faults));
    let end = config
        .workload
        .events
        .last()
        .map_or(Duration::ZERO, |e| Duration::from_millis(e.t_ms));
    config.faults = random_schedule(
        &mut rng.fork(2),
        faults,
        Duration::from_secs(5),
        end.max(Duration::from_secs(6)),
        config.nodes,
        config.controllers,
        config.routers,
    );
    config
}

/// How many users of a world may fail to connect (giving up waiting for Ready included).
///
/// None without faults: the worlds' slots cover their workloads' peaks, and a refusal by a
/// sealed sidecar is retried through get-or-create. With faults, a quarter of the users: a
/// crashed node host kills its pods (their users retry and may meet the crash again), and a
/// crash or partition longer than a user's patience (30 s for Ready, four retries over 3.75 s)
/// fails every user caught in it. The fault suite's worlds lose up to 11 of 60 users (a node
/// host crash); the failures are in every run's summary.
pub fn allowed_user_failures(users: usize, faults: usize) -> u64 {
    if faults == 0 {
        0
    } else {
        (users as u64).div_ceil(4)
    }
}

/// A fault schedule, one fault per entry, for reports.
pub fn describe(faults: &[Fault]) -> String {
    faults
        .iter()
        .map(|f| {
            format!(
                "{:?} at {:.1}s for {:.1}s",
                f.kind,
                f.at.as_secs_f64(),
                f.duration.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `SPAWNER_SIM_SEEDS` (soaks) or `default`.
pub fn seeds_from_env(default: u64) -> u64 {
    env_number("SPAWNER_SIM_SEEDS").unwrap_or(default)
}

/// `SPAWNER_SIM_USERS` (soaks) or `default`.
pub fn users_from_env(default: usize) -> usize {
    env_number("SPAWNER_SIM_USERS").map_or(default, |n| n as usize)
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}
