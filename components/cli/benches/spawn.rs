//! `just bench-spawn`: spawn-to-ready latency of `spawner dev` as a client sees it.
//!
//! Starts the release `spawner dev`, then spawns `spawner demo-backend` (binds its port at once)
//! over the api and follows each backend's status stream to Ready:
//! - sequential: 200 spawns, one at a time;
//! - concurrent: bursts of 50 spawns started together (`SPAWNER_BENCH_BURSTS`, default 5);
//! - sustained: 8 clients spawning back to back for 10 s (spawns/s).
//!
//! Latency is from just before `POST /spawn` to the Ready event on the stream. Each Ready
//! backend is then terminated (outside the measured time; in the burst, once all 50 are Ready)
//! so at most a few dozen processes run, and each run starts once the last run's backends are
//! gone.
//! The phase conditions' times split each spawn into steps, to show where the time goes.
//! Writes `target/bench/<name>.md` (table) and `target/bench/<name>.json`, where the name is
//! `SPAWNER_BENCH_NAME` or `spawn`.
//!
//! Knobs (environment): `SPAWNER_BENCH_BACKEND` (the backend's command line, split on spaces;
//! `$(PORT)` is expanded by the node agent; default `spawner demo-backend`),
//! `SPAWNER_BENCH_BURSTS` (default 5), `SPAWNER_BENCH_SUSTAINED_SECONDS` (default 10),
//! `SPAWNER_DEV_LOG` (a `RUST_LOG` filter for `spawner dev`, whose log then goes to
//! `target/bench/<name>-dev.log`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{Api, Dev, DevOptions, SPAWNER};
use serde_json::{Value, json};
use spawner::spawn_steps::{STEPS, StepStats, step_millis, step_stats, steps_table};

const SEQUENTIAL: usize = 200;
const CONCURRENT: usize = 50;
const SUSTAINED_CLIENTS: usize = 8;
/// How long the sustained run lasts: `SPAWNER_BENCH_SUSTAINED_SECONDS`, else 10 s.
fn sustained_for() -> Duration {
    let seconds = std::env::var("SPAWNER_BENCH_SUSTAINED_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(seconds)
}
/// How many bursts of `CONCURRENT` are measured: `SPAWNER_BENCH_BURSTS`, else 5. One burst's
/// p99 is its slowest spawn, which moves a lot from burst to burst on a shared machine.
fn bursts() -> usize {
    std::env::var("SPAWNER_BENCH_BURSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1)
}
const WARM_UP: usize = 5;
const TARGET_P99_MS: f64 = 150.0;

/// One spawn: the milliseconds of each of `STEPS` (the last is the total).
type Sample = Vec<f64>;

/// The backend to spawn: `SPAWNER_BENCH_BACKEND` (a command line, split on spaces) or
/// `spawner demo-backend`.
fn backend_command() -> Vec<String> {
    match std::env::var("SPAWNER_BENCH_BACKEND") {
        Ok(line) if !line.trim().is_empty() => line.split_whitespace().map(String::from).collect(),
        _ => vec![SPAWNER.to_string(), "demo-backend".to_string()],
    }
}

/// One spawn, followed to Ready, then terminated.
async fn spawn_once(api: &Api) -> Sample {
    let (sample, name) = spawn_to_ready(api).await;
    terminate(api, &name).await;
    sample
}

async fn terminate(api: &Api, name: &str) {
    let (code, answer) = api.call("DELETE", &format!("/backend/{name}"), None).await;
    assert!(code < 300, "terminating {name}: {code} {answer}");
}

/// One spawn, followed to Ready; the backend is left running.
async fn spawn_to_ready(api: &Api) -> (Sample, String) {
    let body = json!({"command": backend_command(), "gracePeriodSeconds": 60});
    let requested_at = SystemTime::now();
    let started = Instant::now();
    let name = api.spawn(&body).await;
    let events = api.follow(&name, Duration::from_secs(30)).await;
    let total = started.elapsed();
    let last = common::phases(&events).pop().unwrap_or_default();
    let status = api.status(&name).await;
    assert_eq!(
        last,
        "Ready",
        "{name} ended {last}; status: {status}\n{}",
        backend_logs(&name)
    );
    (step_millis(&status, requested_at, total), name)
}

/// Where `spawner dev` keeps the backends' output (set once it has started).
static LOG_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The output of the backend's containers, to explain a spawn that did not become Ready.
fn backend_logs(name: &str) -> String {
    let Some(dir) = LOG_DIR.get() else {
        return String::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return format!("(no log directory {})", dir.display());
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(name))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            format!("--- {} ---\n{text}", e.file_name().to_string_lossy())
        })
        .collect()
}

/// Waits until every earlier backend is gone (terminated and deleted after its retention), so
/// one run's teardown does not land on the next run's measurements.
async fn settle(api: &Api) {
    let started = Instant::now();
    loop {
        let (code, list) = api.call("GET", "/backends", None).await;
        assert_eq!(code, 200, "listing backends: {list}");
        let left = list["items"].as_array().map_or(0, Vec::len);
        if left == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{left} backends still there after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// CPU time used so far, in seconds: by `spawner dev` itself, by its reaped children (the
/// backends, once terminated) and by the whole machine (busy time of all cores).
#[derive(Clone, Copy)]
struct Cpu {
    dev: f64,
    backends: f64,
    machine: f64,
}

impl Cpu {
    fn now(dev_pid: u32) -> Cpu {
        // Both files count in clock ticks, which are 1/100 s on Linux.
        const TICK: f64 = 0.01;
        let stat = std::fs::read_to_string(format!("/proc/{dev_pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at the state, field 3.
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or_default()
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0.0);
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let cpu = s.lines().next()?.split_whitespace().skip(1);
                let v: Vec<f64> = cpu.map(|f| f.parse().unwrap_or(0.0)).collect();
                // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
                Some(v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?)
            })
            .unwrap_or(0.0);
        Cpu {
            dev: (field(14) + field(15)) * TICK,
            backends: (field(16) + field(17)) * TICK,
            machine: machine * TICK,
        }
    }

    /// Milliseconds per spawn between `self` and `later`: (dev, backends, machine).
    fn per_spawn(self, later: Cpu, spawns: usize) -> (f64, f64, f64) {
        let ms = |a: f64, b: f64| (b - a) * 1e3 / spawns.max(1) as f64;
        (
            ms(self.dev, later.dev),
            ms(self.backends, later.backends),
            ms(self.machine, later.machine),
        )
    }
}

struct Summary {
    name: &'static str,
    count: usize,
    wall_s: f64,
    /// Per step of `STEPS`.
    steps: Vec<StepStats>,
}

impl Summary {
    fn of(name: &'static str, samples: &[Sample], wall: Duration) -> Summary {
        Summary {
            name,
            count: samples.len(),
            wall_s: wall.as_secs_f64(),
            steps: step_stats(samples),
        }
    }

    fn total(&self) -> (f64, f64) {
        let total = self.steps[STEPS.len() - 1];
        (total.p50, total.p99)
    }

    fn json(&self) -> Value {
        let (p50, p99) = self.total();
        let steps: BTreeMap<&str, Value> = STEPS
            .iter()
            .zip(&self.steps)
            .map(|(name, step)| {
                (
                    *name,
                    json!({"p50_ms": round(step.p50), "p99_ms": round(step.p99), "mean_ms": round(step.mean)}),
                )
            })
            .collect();
        json!({
            "spawns": self.count,
            "wall_seconds": round(self.wall_s),
            "spawns_per_second": round(self.count as f64 / self.wall_s),
            "p50_ms": round(p50),
            "p99_ms": round(p99),
            "steps": steps,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

async fn sequential(api: &Api, count: usize) -> (Vec<Sample>, Duration) {
    let started = Instant::now();
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        samples.push(spawn_once(api).await);
    }
    (samples, started.elapsed())
}

/// `count` spawns at once; all are terminated once the last is Ready, so the burst is measured
/// alone rather than against the teardown of its own first backends.
async fn concurrent(api: &Arc<Api>, count: usize) -> (Vec<Sample>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { spawn_to_ready(&api).await })
        })
        .collect();
    let mut samples = Vec::with_capacity(count);
    let mut names = Vec::with_capacity(count);
    for task in tasks {
        let (sample, name) = task.await.expect("spawn task");
        samples.push(sample);
        names.push(name);
    }
    let wall = started.elapsed();
    for name in names {
        terminate(api, &name).await;
    }
    (samples, wall)
}

async fn sustained(api: &Arc<Api>, clients: usize, duration: Duration) -> (Vec<Sample>, Duration) {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < deadline {
                    samples.push(spawn_once(&api).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("client task"));
    }
    (samples, started.elapsed())
}

fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str("| run | spawns | p50 ms | p99 ms | spawns/s |\n|---|---:|---:|---:|---:|\n");
    for s in summaries {
        let (p50, p99) = s.total();
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |\n",
            s.name,
            s.count,
            p50,
            p99,
            s.count as f64 / s.wall_s
        ));
    }
    out.push_str("\nWhere the time goes (p50 / p99 / mean, ms):\n\n");
    let runs: Vec<(&str, &[StepStats])> =
        summaries.iter().map(|s| (s.name, &s.steps[..])).collect();
    out.push_str(&steps_table(&runs));
    out
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let dev = Dev::start(DevOptions {
            retention_seconds: Some(5),
            ..Default::default()
        });
        let api = Arc::new(dev.api());
        let _ = LOG_DIR.set(dev.state_dir().join("logs"));
        eprintln!("spawner dev at {}; warming up", dev.api_url);
        sequential(&api, WARM_UP).await;

        settle(&api).await;
        eprintln!("{SEQUENTIAL} sequential spawns…");
        let before = Cpu::now(dev.pid);
        let (samples, wall) = sequential(&api, SEQUENTIAL).await;
        let seq = Summary::of("sequential", &samples, wall);
        eprintln!("waiting for the sequential backends to be deleted…");
        settle(&api).await;
        // Spawn and teardown both, all the way to deletion after retention.
        let (cpu_dev, cpu_backends, cpu_machine) = before.per_spawn(Cpu::now(dev.pid), SEQUENTIAL);
        let bursts = bursts();
        let (mut burst_samples, mut burst_wall, mut burst_p99s) =
            (Vec::new(), Duration::ZERO, vec![]);
        for burst in 1..=bursts {
            eprintln!("{CONCURRENT} concurrent spawns (burst {burst} of {bursts})…");
            let (samples, wall) = concurrent(&api, CONCURRENT).await;
            burst_p99s.push(Summary::of("burst", &samples, wall).total().1);
            burst_samples.extend(samples);
            burst_wall += wall;
            settle(&api).await;
        }
        let conc = Summary::of("concurrent", &burst_samples, burst_wall);
        eprintln!("{SUSTAINED_CLIENTS} clients for {:?}…", sustained_for());
        let (samples, wall) = sustained(&api, SUSTAINED_CLIENTS, sustained_for()).await;
        let sust = Summary::of("sustained", &samples, wall);
        let summaries = [seq, conc, sust];

        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target directory")
            .join("bench");
        std::fs::create_dir_all(&dir).expect("create target/bench");
        // The machine may be shared: say how busy it was.
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let table = table(&summaries);
        let verdict = |s: &Summary| {
            if s.total().1 < TARGET_P99_MS {
                "met"
            } else {
                "missed"
            }
        };
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let backend = backend_command().join(" ");
        let report = format!(
            "# spawn-to-ready, `spawner dev` ({profile}), backend `{backend}`\n\n{table}\n\
             CPU per spawn (the sequential run, from the request to the backend's deletion): \
             `spawner dev` {cpu_dev:.2} ms, the backend process {cpu_backends:.2} ms, the whole \
             machine {cpu_machine:.2} ms (this client and anything else running included).\n\n\
             The concurrent run is {bursts} bursts of {CONCURRENT} spawns started together; \
             each burst's p99 (its slowest spawn): {}.\n\n\
             Target p99 < {TARGET_P99_MS} ms: sequential {}, concurrent {}. {cores} cores, \
             load average {load} at the end.\n",
            burst_p99s
                .iter()
                .map(|p| format!("{p:.1} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(&summaries[0]),
            verdict(&summaries[1]),
        );
        let json = json!({
            "backend": backend,
            "profile": profile,
            "cores": cores,
            "load_average_1m": load,
            "target_p99_ms": TARGET_P99_MS,
            "cpu_ms_per_spawn": {
                "spawner_dev": round(cpu_dev),
                "backend": round(cpu_backends),
                "machine": round(cpu_machine),
            },
            "sequential": summaries[0].json(),
            "concurrent": {
                "bursts": bursts,
                "spawns_per_burst": CONCURRENT,
                "p99_ms_per_burst": burst_p99s.iter().map(|p| round(*p)).collect::<Vec<_>>(),
                "result": summaries[1].json(),
            },
            "sustained": {
                "clients": SUSTAINED_CLIENTS,
                "result": summaries[2].json(),
            },
        });
        let stem = std::env::var("SPAWNER_BENCH_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "spawn".into());
        std::fs::write(dir.join(format!("{stem}.md")), &report).expect("write the table");
        if std::env::var_os("SPAWNER_DEV_LOG").is_some() {
            std::fs::write(dir.join(format!("{stem}-dev.log")), dev.stderr())
                .expect("write the log");
        }
        std::fs::write(
            dir.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&json).expect("json"),
        )
        .expect("write the json");
        println!("{report}");
        println!("written: {}/{stem}.md and {stem}.json", dir.display());
        drop(dev);
    });
}
