//! The simulator catches real bugs: each test runs a world with one deliberate bug
//! (`spawner_sim::mutants`) and expects the invariant that bug breaks to be reported, and runs
//! the same world without the bug, which must pass — so the catch is the bug's doing.

use std::time::Duration;

use spawner_sim::faults::{Fault, FaultKind};
use spawner_sim::mutants::Mutant;
use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

fn world(seed: u64, params: WorkloadParams) -> WorldConfig {
    let trace = generate(&params, &mut SimRng::new(seed));
    let mut config = WorldConfig::new(seed, trace);
    config.nodes = 1;
    config.slots_per_node = 6;
    // Vanished users are noticed within 60 s; then grace, sweep and retention.
    config.drain = Duration::from_secs(90);
    config
}

/// Runs `config` as is (it must pass) and with `mutant` (it must fail with `invariant`).
fn caught(config: WorldConfig, mutant: Mutant, invariant: &str) {
    if let Err(failure) = run(config.clone()) {
        panic!("the world without {mutant:?} must pass:\n{failure}");
    }
    let mutated = WorldConfig {
        mutant: Some(mutant),
        ..config
    };
    match run(mutated) {
        Ok(summary) => panic!("{mutant:?} went unnoticed: {summary}"),
        Err(failure) => {
            println!("{mutant:?} caught: {}", failure.violation);
            assert_eq!(failure.violation.invariant, invariant, "{failure}");
        }
    }
}

#[test]
fn a_sweeper_that_sweeps_when_its_event_stream_breaks_is_caught() {
    // Users stay connected to one room's backend (on the node's first slot) while the sweeper
    // loses its event stream to that pod: a silent partition, not idleness.
    let params = WorkloadParams {
        users: 3,
        rooms: 1,
        mean_interarrival_ms: 200.0,
        session_min_ms: 50_000.0,
        session_cap_ms: 50_000.0,
        vanish_probability: 0.0,
        refresh_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(21, params);
    config.faults = vec![Fault {
        at: Duration::from_secs(15),
        duration: Duration::from_secs(20),
        kind: FaultKind::Partition {
            a: "node-0".into(),
            b: "node-0-pod-0".into(),
        },
    }];
    caught(
        config,
        Mutant::SweepOnLostStream,
        "no backend is swept or terminated with a live connection",
    );
}

#[test]
fn a_sidecar_that_forgets_to_count_down_a_dead_connection_is_caught() {
    // Every user vanishes without closing: only the sidecar's pings notice, and the mutant
    // never counts those connections down, so their backends are never swept.
    let params = WorkloadParams {
        users: 6,
        rooms: 3,
        session_min_ms: 3_000.0,
        session_cap_ms: 8_000.0,
        vanish_probability: 1.0,
        refresh_probability: 0.0,
        ..WorkloadParams::default()
    };
    caught(
        world(22, params),
        Mutant::SidecarForgetsAbnormalEnds,
        "no leaks when the workload drains",
    );
}

#[test]
fn a_controller_that_creates_the_pod_twice_is_caught() {
    let params = WorkloadParams {
        users: 4,
        rooms: 2,
        session_cap_ms: 6_000.0,
        ..WorkloadParams::default()
    };
    caught(
        world(23, params),
        Mutant::ControllerCreatesPodTwice,
        "at most one pod per backend",
    );
}

#[test]
fn a_key_lookup_that_races_is_caught() {
    // A burst of users of one room arrives at once: every get-or-create overlaps.
    let params = WorkloadParams {
        users: 8,
        rooms: 1,
        burst_probability: 1.0,
        burst_size: 8,
        session_cap_ms: 6_000.0,
        ..WorkloadParams::default()
    };
    caught(
        world(24, params),
        Mutant::RacyKeyLookup,
        "at most one live backend per key",
    );
}

#[test]
fn an_api_that_hands_out_ended_backends_is_caught_by_what_users_see() {
    // One room whose users come and go with pauses longer than the grace period: its backend is
    // swept between visits and kept 30 s before deletion. A user arriving meanwhile must get a
    // fresh backend; the mutant hands out the swept one, the user's connection fails, and no
    // store invariant notices.
    let params = WorkloadParams {
        users: 12,
        rooms: 1,
        mean_interarrival_ms: 6_000.0,
        burst_probability: 0.0,
        session_min_ms: 1_000.0,
        session_cap_ms: 3_000.0,
        vanish_probability: 0.0,
        refresh_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(25, params);
    config.grace_seconds = 2;
    config.retention = Duration::from_secs(30);
    config.allowed_user_failures = Some(0);
    caught(
        config,
        Mutant::ApiListsWithoutStatus,
        spawner_sim::world::USERS_CONNECT,
    );
}

#[test]
fn a_controller_replica_that_runs_without_leader_election_is_caught() {
    // Two replicas; the mutant starts the second without leader election, so it reconciles
    // beside the leader: its first write is sent while the lease names the other.
    let params = WorkloadParams {
        users: 6,
        rooms: 2,
        session_cap_ms: 6_000.0,
        ..WorkloadParams::default()
    };
    let mut config = world(26, params);
    config.controllers = 2;
    caught(
        config,
        Mutant::ReplicaWithoutLeaderElection,
        spawner_sim::world::ONLY_THE_LEADER_WRITES,
    );
}

#[test]
fn api_replicas_that_name_keys_differently_are_caught() {
    // A burst of one room's users spread over the two api replicas: with a shared key secret
    // both replicas try to create the same name and the API server lets one win; with secrets
    // of their own, each replica creates a backend for the key.
    let params = WorkloadParams {
        users: 8,
        rooms: 1,
        burst_probability: 1.0,
        burst_size: 8,
        session_cap_ms: 6_000.0,
        ..WorkloadParams::default()
    };
    caught(
        world(27, params),
        Mutant::ApiReplicasWithOwnKeySecrets,
        "at most one live backend per key",
    );
}

#[test]
fn a_router_that_dials_another_backend_is_caught() {
    // Four rooms at once: the router dials several backends, and the mutant sends every fourth
    // handshake to an address it dialled for another one. The app names itself; the user's
    // token names the backend it must reach.
    let params = WorkloadParams {
        users: 16,
        rooms: 4,
        session_cap_ms: 8_000.0,
        ..WorkloadParams::default()
    };
    caught(
        world(28, params),
        Mutant::RouterDialsAnotherBackend,
        spawner_sim::world::ROUTED_BY_TOKEN,
    );
}

#[test]
fn a_router_that_accepts_a_token_for_another_backend_is_caught() {
    // Long sessions in four rooms: the sessions that try their token on another room's live
    // backend must be refused; the mutant checks a token against the backend it names itself.
    let params = WorkloadParams {
        users: 24,
        rooms: 4,
        session_min_ms: 20_000.0,
        session_cap_ms: 30_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    caught(
        world(29, params),
        Mutant::RouterAcceptsTokensForAnyBackend,
        spawner_sim::world::ROUTED_BY_TOKEN,
    );
}

#[test]
fn an_api_that_drops_terminate_requests_is_caught() {
    // Every other session ends by terminating its backend; the mutant's api answers the
    // DELETE as accepted but records nothing, so the backend lives on past the bound.
    let params = WorkloadParams {
        users: 12,
        rooms: 3,
        session_cap_ms: 8_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(30, params);
    config.users_terminate_every = 2;
    config.grace_seconds = 30;
    caught(
        config,
        Mutant::ApiDropsTerminateRequests,
        spawner_sim::world::TERMINATED_ON_REQUEST,
    );
}

#[test]
fn a_runtime_that_loses_an_apps_crash_is_caught_by_what_users_see() {
    // Half the rooms' apps crash 10 s after they start; the mutant never reports the crash, so
    // the backend stays Ready with its app dead, its users' connections lost under it.
    let params = WorkloadParams {
        users: 16,
        rooms: 4,
        session_min_ms: 20_000.0,
        session_cap_ms: 30_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(31, params);
    config.apps_crash_every = 2;
    config.apps_crash_after = Duration::from_secs(10);
    config.allowed_user_failures = Some(0);
    // The users lose their sockets with the app and their backend stays Ready: caught at once
    // (then their reconnects would fail too).
    caught(
        config,
        Mutant::AppCrashesUnreported,
        spawner_sim::world::NOT_LOST_WHILE_BACKEND_LIVES,
    );
}

#[test]
fn a_controller_that_swallows_expired_watches_is_caught() {
    // The API server restarts, then compacts: the controller's watches resume from versions
    // it no longer has. The mutant drops the 410 and resumes from the same version forever,
    // so it never sees the backends created afterwards.
    let params = WorkloadParams {
        users: 24,
        rooms: 6,
        mean_interarrival_ms: 2_000.0,
        session_cap_ms: 8_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(32, params);
    config.faults = vec![
        Fault {
            at: Duration::from_secs(10),
            duration: Duration::from_secs(1),
            kind: FaultKind::Crash {
                host: "apiserver".into(),
            },
        },
        Fault {
            at: Duration::from_secs(12),
            duration: Duration::from_secs(1),
            kind: FaultKind::Compact,
        },
    ];
    caught(
        config,
        Mutant::ControllerSwallowsExpiredWatches,
        "every spawn ends Ready or Failed",
    );
}

#[test]
fn a_controller_that_retries_throttled_requests_at_once_is_caught() {
    // The API server answers every request 429 (Retry-After: 1) for 10 s while users come and
    // go: the mutant sends each refused request again at once, a round trip (a few ms) later.
    let params = WorkloadParams {
        users: 24,
        rooms: 6,
        mean_interarrival_ms: 1_000.0,
        session_cap_ms: 8_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(33, params);
    config.faults = vec![Fault {
        at: Duration::from_secs(5),
        duration: Duration::from_secs(10),
        kind: FaultKind::Throttle { per_mille: 1_000 },
    }];
    caught(
        config,
        Mutant::ControllerRetriesThrottledAtOnce,
        spawner_sim::throttling::BACKS_OFF_WHEN_THROTTLED,
    );
}

#[test]
fn a_relay_that_ignores_pongs_is_caught_by_what_users_see() {
    // Users stay connected for minutes and send a message only every minute or so, answering
    // the relays' pings meanwhile. The mutant does not count those pongs as hearing from them
    // and drops them as dead while their backends live.
    let params = WorkloadParams {
        users: 6,
        rooms: 2,
        mean_interarrival_ms: 1_000.0,
        session_min_ms: 150_000.0,
        session_cap_ms: 150_000.0,
        mean_think_ms: 70_000.0,
        vanish_probability: 0.0,
        refresh_probability: 0.0,
        ..WorkloadParams::default()
    };
    caught(
        world(34, params),
        Mutant::RelayIgnoresPongs,
        spawner_sim::world::NOT_LOST_WHILE_BACKEND_LIVES,
    );
}

#[test]
fn a_controller_that_misses_pod_deletions_is_caught_after_an_eviction() {
    // Every pod of the node is evicted while users are connected. The mutant's cache keeps
    // the evicted pods, so their backends never fail: they stay Ready with no pod behind them.
    let params = WorkloadParams {
        users: 16,
        rooms: 4,
        mean_interarrival_ms: 500.0,
        session_min_ms: 20_000.0,
        session_cap_ms: 30_000.0,
        vanish_probability: 0.0,
        ..WorkloadParams::default()
    };
    let mut config = world(35, params);
    config.faults = vec![Fault {
        at: Duration::from_secs(12),
        duration: Duration::from_secs(1),
        kind: FaultKind::EvictNode { node: 0 },
    }];
    caught(
        config,
        Mutant::ControllerMissesPodDeletions,
        "idle backends are swept within grace + 2 s",
    );
}
