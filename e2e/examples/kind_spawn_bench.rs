//! `just bench-kind`: spawn-to-ready latency on the kind cluster `scripts/e2e-kind.sh` deploys
//! (keep it with `SPAWNER_E2E_KEEP=1`), as a web app sees it through the api:
//! - sequential: `SPAWNER_BENCH_SEQUENTIAL` spawns (default 50), one at a time;
//! - bursts: `SPAWNER_BENCH_BURSTS` bursts (default 3) of `SPAWNER_BENCH_BURST` spawns (default
//!   20) started together.
//!
//! Each spawn runs the demo backend in `spawner:dev`, is followed on its status stream to Ready,
//! then terminated (outside the measured time). The phase conditions' times split each spawn
//! into the steps `just bench-spawn` reports. Configuration of the target: see
//! `spawner_e2e::scenarios::kind` (the api URL and token, `KUBECONFIG`).

use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use http::Method;
use serde_json::json;
use spawner::spawn_steps::{step_millis, step_stats, steps_table};
use spawner_core::phase::Phase;
use spawner_e2e::scenarios::{self, Target};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// One spawn followed to Ready: the milliseconds of each of `STEPS`, and the backend's name.
async fn spawn_to_ready(target: &Target) -> Result<(Vec<f64>, String), String> {
    let request = target
        .apps
        .demo
        .request(json!({ "gracePeriodSeconds": 60 }));
    let requested_at = SystemTime::now();
    let started = Instant::now();
    let spawned = target
        .api
        .spawn(&request)
        .await
        .map_err(|e| e.to_string())?;
    let events = target
        .api
        .follow_phases(&spawned.name, target.ready_timeout, |p| p == Phase::Ready)
        .await
        .map_err(|e| e.to_string())?;
    let total = started.elapsed();
    if events.last().map(|e| e.phase) != Some(Phase::Ready) {
        return Err(format!("{} ended {:?}", spawned.name, events.last()));
    }
    let path = format!("/backend/{}/status", spawned.name);
    let (_, status) = target
        .api
        .call(Method::GET, &path, None)
        .await
        .map_err(|e| e.to_string())?;
    // A step the clocks of two pods put below zero counts as 0.
    let steps = step_millis(&status, requested_at, total)
        .into_iter()
        .map(|ms| ms.max(0.0))
        .collect();
    Ok((steps, spawned.name))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = scenarios::kind::target().await?;
    let sequential = env_count("SPAWNER_BENCH_SEQUENTIAL", 50);
    let burst = env_count("SPAWNER_BENCH_BURST", 20);
    let bursts = env_count("SPAWNER_BENCH_BURSTS", 3);

    let mut samples = Vec::new();
    for _ in 0..sequential {
        let (steps, name) = spawn_to_ready(&target).await?;
        target.api.terminate(&name).await?;
        samples.push(steps);
    }

    let mut burst_samples = Vec::new();
    for _ in 0..bursts {
        let results = join_all((0..burst).map(|_| spawn_to_ready(&target))).await;
        let mut names = Vec::new();
        for result in results {
            let (steps, name) = result?;
            burst_samples.push(steps);
            names.push(name);
        }
        for name in names {
            target.api.terminate(&name).await?;
        }
        // Let the terminated pods go before the next burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let bursts_name = format!("{bursts} bursts of {burst}");
    println!(
        "{} sequential spawns, {} in bursts; where the time goes (p50 / p99 / mean, ms):\n",
        samples.len(),
        burst_samples.len()
    );
    print!(
        "{}",
        steps_table(&[
            ("sequential", &step_stats(&samples)),
            (&bursts_name, &step_stats(&burst_samples)),
        ])
    );
    Ok(())
}
