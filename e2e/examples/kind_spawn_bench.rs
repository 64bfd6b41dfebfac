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
use serde_json::{Value, json};
use spawner_core::phase::Phase;
use spawner_core::trace::percentile;
use spawner_e2e::scenarios::{self, Target};

const STEPS: [&str; 6] = [
    "request→Constructed",
    "Constructed→Scheduled",
    "Scheduled→Running",
    "Running→Ready",
    "Ready→client sees it",
    "total",
];

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn condition_time(status: &Value, phase: &str) -> Option<SystemTime> {
    let time = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == phase)?["lastTransitionTime"]
        .as_str()?;
    let parsed = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    let nanos = u64::try_from(parsed.timestamp_nanos_opt()?).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -(e.duration().as_secs_f64() * 1e3),
    }
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
    let seen_at = requested_at + total;
    if events.last().map(|e| e.phase) != Some(Phase::Ready) {
        return Err(format!("{} ended {:?}", spawned.name, events.last()));
    }
    let path = format!("/backend/{}/status", spawned.name);
    let (_, status) = target
        .api
        .call(Method::GET, &path, None)
        .await
        .map_err(|e| e.to_string())?;
    let times: Vec<SystemTime> = ["Constructed", "Scheduled", "Running", "Ready"]
        .iter()
        .map(|p| condition_time(&status, p).unwrap_or(requested_at))
        .collect();
    let mut steps = vec![ms_between(requested_at, times[0])];
    steps.extend(times.windows(2).map(|w| ms_between(w[0], w[1])));
    steps.push(ms_between(times[3], seen_at));
    steps.push(total.as_secs_f64() * 1e3);
    Ok((steps, spawned.name))
}

fn report(run: &str, samples: &[Vec<f64>]) {
    println!("\n{run}: {} spawns", samples.len());
    println!("| step | p50 ms | p99 ms |\n|---|---|---|");
    for (i, step) in STEPS.iter().enumerate() {
        // Whole milliseconds; a step the clocks of two pods put below zero counts as 0.
        let values: Vec<u64> = samples
            .iter()
            .map(|s| s[i].max(0.0).round() as u64)
            .collect();
        let at = |q| percentile(&values, q).map_or("-".to_string(), |v| v.to_string());
        println!("| {step} | {} | {} |", at(50), at(99));
    }
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
    report("sequential", &samples);

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
    report(&format!("bursts of {burst}"), &burst_samples);
    Ok(())
}
