//! The entropy hook makes std's `HashMap` iteration order a function of the seed, across
//! processes: the test runs itself as a child process twice per seed and compares.

use std::collections::HashMap;
use std::process::Command;

spawner_sim::install_entropy_hook!();

const CHILD_ENV: &str = "SPAWNER_SIM_ENTROPY_CHILD_SEED";

fn hash_order() -> String {
    let map: HashMap<u32, ()> = (0..64).map(|i| (i, ())).collect();
    map.keys()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn run_child(seed: u64) -> String {
    let output = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "child_prints_hash_order",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, seed.to_string())
        .output()
        .expect("child runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("ORDER:").map(|(_, order)| order))
        .expect("child printed its order")
        .to_string()
}

#[test]
fn child_prints_hash_order() {
    // Only does something when started by `hash_order_follows_the_seed`.
    if let Ok(seed) = std::env::var(CHILD_ENV) {
        spawner_sim::entropy::seed(seed.parse().expect("seed"));
        // A fresh thread draws fresh keys, from the seeded stream.
        let order = std::thread::spawn(hash_order).join().expect("thread");
        println!("ORDER:{order}");
    }
}

#[test]
fn hash_order_follows_the_seed() {
    let a1 = run_child(1);
    let a2 = run_child(1);
    assert_eq!(a1, a2, "same seed, same order");
    let differs = (2..6).any(|s| run_child(s) != a1);
    assert!(differs, "different seeds should give different orders");
}
