//! The same seed gives the same trace of observable events, across processes: the test runs a
//! world in two child processes per seed (each seeds every entropy source before its threads
//! exist, as `spawner-sim` does) and compares the trace hashes.

use std::process::Command;

use spawner_sim::scenario;

spawner_sim::install_entropy_hook!();

const CHILD_ENV: &str = "SPAWNER_SIM_DETERMINISM_CHILD";

/// (seed, users, faults): a fault-free world and one with crashes and partitions; with
/// `SPAWNER_SIM_SEEDS=N`, N more worlds with two faults each.
fn worlds() -> Vec<(u64, usize, usize)> {
    let mut worlds = vec![(11, 120, 0), (12, 120, 3)];
    let extra = std::env::var("SPAWNER_SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    worlds.extend((0..extra).map(|i| (1_000 + i, 120, 2)));
    worlds
}

fn run_child(world: (u64, usize, usize)) -> (String, Vec<String>) {
    let output = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "child_runs_one_world",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{},{},{}", world.0, world.1, world.2))
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("HASH:"))
        .expect("child printed its hash")
        .to_string();
    let events = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT:"))
        .map(str::to_string)
        .collect();
    (hash, events)
}

#[test]
fn child_runs_one_world() {
    // Only does something when started by `same_seed_same_trace`.
    let Ok(world) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<u64> = world
        .split(',')
        .map(|p| p.parse().expect("seed,users,faults"))
        .collect();
    let (seed, users, faults) = (parts[0], parts[1] as usize, parts[2] as usize);
    spawner_sim::entropy::seed(seed);
    // A fresh thread: std draws its hash keys per thread, from the seeded stream.
    let summary =
        std::thread::spawn(move || spawner_sim::world::run(scenario::world(seed, users, faults)))
            .join()
            .expect("world thread");
    match summary {
        Ok(summary) => {
            for event in &summary.events {
                println!("EVENT:{event}");
            }
            println!("{summary}");
            println!("HASH:{:016x}", summary.trace_hash);
        }
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn same_seed_same_trace() {
    for world in worlds() {
        let (hash_a, events_a) = run_child(world);
        let (hash_b, events_b) = run_child(world);
        if hash_a != hash_b {
            let first = events_a
                .iter()
                .zip(&events_b)
                .position(|(a, b)| a != b)
                .unwrap_or(events_a.len().min(events_b.len()));
            panic!(
                "world {world:?}: the same seed gave different traces; first difference at event {first}:\n  {:?}\n  {:?}",
                events_a.get(first),
                events_b.get(first)
            );
        }
        assert!(events_a.len() > 20, "the world did something: {events_a:?}");
    }
}
