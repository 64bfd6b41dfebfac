//! `just bench-soak`: `spawner dev` under a steady stream of spawns for a long time, its memory
//! sampled, to show that it stays flat (no map or history that only grows).
//!
//! Starts the release `spawner dev` and spawns backends at a steady rate (`POST /spawn`,
//! `spawner demo-backend`, a short grace period). Nobody connects, so each is swept once its
//! grace period has passed after Ready, and deleted after the retention. Every sample period
//! it records the resident memory (VmRSS) of `spawner dev` (every component runs in it: the
//! Kubernetes API with its event history, the controller, node agent, sweepers, api and
//! router), the number and memory of its backend processes, and the backends the api lists.
//! Writes `target/bench/soak.md` (table) and `target/bench/soak.json`.
//!
//! Knobs (environment): `SPAWNER_SOAK_PER_MINUTE` (default 1000), `SPAWNER_SOAK_MINUTES`
//! (default 30), `SPAWNER_SOAK_SAMPLE_SECONDS` (default 30), `SPAWNER_SOAK_GRACE_SECONDS`
//! (default 2), `SPAWNER_SOAK_RETENTION_SECONDS` (default 60, as `spawner dev`'s).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Api, Dev, DevOptions, SPAWNER, descendants};
use serde_json::json;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of `pid` in KiB (0 once it is gone).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    spawned: AtomicU64,
    refused: AtomicU64,
}

struct Row {
    minute: f64,
    dev_rss_mib: f64,
    backend_processes: usize,
    backends_rss_mib: f64,
    listed_backends: usize,
    /// Listed backends the controller has not moved past Submitted yet: its backlog.
    submitted: usize,
    /// The machine's 1-minute load average (the bench may share the machine).
    load: f64,
    spawned: u64,
    /// Refused, or not answered within 30 s.
    refused: u64,
}

async fn sample(api: &Api, dev_pid: u32, started: Instant, counts: &Counts) -> Row {
    let children = descendants(dev_pid);
    let backends_kib: u64 = children.iter().map(|p| rss_kib(p.pid)).sum();
    let (code, list) = api.call("GET", "/backends", None).await;
    let items = if code == 200 {
        list["items"].as_array().cloned().unwrap_or_default()
    } else {
        Vec::new()
    };
    let submitted = items.iter().filter(|b| b["phase"] == "Submitted").count();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Row {
        minute: started.elapsed().as_secs_f64() / 60.0,
        dev_rss_mib: rss_kib(dev_pid as i32) as f64 / 1024.0,
        backend_processes: children.len(),
        backends_rss_mib: backends_kib as f64 / 1024.0,
        listed_backends: items.len(),
        submitted,
        load,
        spawned: counts.spawned.load(Ordering::Relaxed),
        refused: counts.refused.load(Ordering::Relaxed),
    }
}

fn main() {
    let per_minute = knob("SPAWNER_SOAK_PER_MINUTE", 1000).max(1);
    let minutes = knob("SPAWNER_SOAK_MINUTES", 30).max(1);
    let sample_every = Duration::from_secs(knob("SPAWNER_SOAK_SAMPLE_SECONDS", 30).max(1));
    let grace = knob("SPAWNER_SOAK_GRACE_SECONDS", 2);
    let retention = knob("SPAWNER_SOAK_RETENTION_SECONDS", 60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let rows = runtime.block_on(async {
        let dev = Dev::start(DevOptions {
            retention_seconds: Some(retention),
            ..Default::default()
        });
        let api = Arc::new(dev.api());
        eprintln!(
            "spawner dev at {}; {per_minute} spawns/min for {minutes} min (grace {grace} s, retention {retention} s)",
            dev.api_url
        );
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let until = started + Duration::from_secs(minutes * 60);
        let spawner = {
            let (api, counts) = (api.clone(), counts.clone());
            tokio::spawn(async move {
                let body = json!({
                    "command": [SPAWNER, "demo-backend"],
                    "gracePeriodSeconds": grace,
                });
                // At most this many requests in flight: a slow api shows as a lower rate.
                let slots = Arc::new(tokio::sync::Semaphore::new(64));
                let mut tick =
                    tokio::time::interval(Duration::from_secs_f64(60.0 / per_minute as f64));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while Instant::now() < until {
                    tick.tick().await;
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let (api, counts, body) = (api.clone(), counts.clone(), body.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        // The harness's call panics after 30 s without an answer: a task of
                        // its own turns that into a count.
                        let call = tokio::spawn(async move {
                            api.call("POST", "/spawn", Some(&body)).await.0
                        });
                        let counter = if matches!(call.await, Ok(201)) {
                            &counts.spawned
                        } else {
                            &counts.refused
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    });
                }
            })
        };
        let mut rows = vec![sample(&api, dev.pid, started, &counts).await];
        while Instant::now() < until {
            tokio::time::sleep(sample_every).await;
            let row = sample(&api, dev.pid, started, &counts).await;
            eprintln!(
                "{:5.1} min: spawner dev {:6.1} MiB, {} backend processes ({:.1} MiB), {} listed ({} Submitted), {} spawned, {} refused, load {:.1}",
                row.minute,
                row.dev_rss_mib,
                row.backend_processes,
                row.backends_rss_mib,
                row.listed_backends,
                row.submitted,
                row.spawned,
                row.refused,
                row.load
            );
            rows.push(row);
        }
        let _ = spawner.await;
        rows
    });
    write_report(&rows, per_minute, minutes, grace, retention);
}

fn write_report(rows: &[Row], per_minute: u64, minutes: u64, grace: u64, retention: u64) {
    let mut md = format!(
        "# Soak: {per_minute} spawns/min for {minutes} min (grace {grace} s, retention {retention} s)\n\n\
         | minute | spawner dev RSS (MiB) | backend processes | their RSS (MiB) | backends listed | of which Submitted | spawned | refused or timed out | load average |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        md.push_str(&format!(
            "| {:.1} | {:.1} | {} | {:.1} | {} | {} | {} | {} | {:.1} |\n",
            r.minute,
            r.dev_rss_mib,
            r.backend_processes,
            r.backends_rss_mib,
            r.listed_backends,
            r.submitted,
            r.spawned,
            r.refused,
            r.load
        ));
    }
    // Flat after warm-up: the last third against the middle third.
    let third = rows.len() / 3;
    if third > 0 {
        let mean = |rs: &[Row]| rs.iter().map(|r| r.dev_rss_mib).sum::<f64>() / rs.len() as f64;
        let middle = mean(&rows[third..2 * third]);
        let last = mean(&rows[2 * third..]);
        md.push_str(&format!(
            "\nspawner dev's RSS: {middle:.1} MiB on average in the middle third, {last:.1} MiB in the last third ({:+.1} %).\n",
            (last - middle) / middle * 100.0
        ));
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({"minute": r.minute, "devRssMib": r.dev_rss_mib,
                "backendProcesses": r.backend_processes, "backendsRssMib": r.backends_rss_mib,
                "listedBackends": r.listed_backends, "submitted": r.submitted, "load": r.load,
                "spawned": r.spawned, "refused": r.refused})
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("soak.md"), &md);
    let _ = std::fs::write(
        dir.join("soak.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    println!("{md}");
}
