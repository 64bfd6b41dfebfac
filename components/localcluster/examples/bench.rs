//! Benchmark (not a test): creates/s, patches/s and watch fan-out latency against an
//! in-process localcluster over loopback HTTP, through kube-rs clients.
//!
//! `cargo run --release -p spawner-localcluster --example bench [objects] [watchers]`
//! (defaults: 10,000 objects, 20 watchers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use spawner_localcluster::{Cluster, ServerConfig, SystemClock, kubeconfig_yaml, serve};

const CONCURRENCY: usize = 32;

async fn client(url: &str) -> Client {
    let kubeconfig: Kubeconfig =
        serde_yaml::from_str(&kubeconfig_yaml(url, None, None, None)).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("bench-{i}"), "labels": {"app": "bench", "spawner.dev/backend": format!("b{i}")}},
        "spec": {"containers": [
            {"name": "app", "image": "registry.invalid/app:1", "command": ["app"], "env": [{"name": "PORT", "value": "8080"}]},
            {"name": "spawner-sidecar", "image": "registry.invalid/spawner:1", "args": ["sidecar"]},
        ]},
    }))
    .unwrap()
}

/// Per-object start time of the write being measured, keyed by object name.
type Starts = Arc<Mutex<HashMap<String, Instant>>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(what: &str, mut lat: Vec<Duration>) {
    lat.sort();
    println!(
        "  {what}: {} deliveries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let objects: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let watchers: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);

    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener, cluster));
    let client = client(&url).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    println!(
        "localcluster bench: {objects} pods, {watchers} watchers, {CONCURRENCY} concurrent writers"
    );

    let create_starts: Starts = Arc::default();
    let patch_starts: Starts = Arc::default();
    let paced_starts: Starts = Arc::default();
    let added: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let modified: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let paced: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let rv = pods
        .list(&ListParams::default().limit(1))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut watch_tasks = Vec::new();
    for _ in 0..watchers {
        // Each watcher has its own client (connection), as separate components would.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let stream = pods
            .watch(&WatchParams::default().timeout(3600), &rv)
            .await
            .unwrap();
        let (cs, ps, a, m) = (
            create_starts.clone(),
            patch_starts.clone(),
            added.clone(),
            modified.clone(),
        );
        let (qs, q) = (paced_starts.clone(), paced.clone());
        watch_tasks.push(tokio::spawn(async move {
            let mut stream = stream.boxed();
            // Only the first MODIFIED per object and round is the measured write.
            let mut seen = std::collections::HashSet::new();
            while let Some(Ok(ev)) = stream.next().await {
                let now = Instant::now();
                match ev {
                    WatchEvent::Added(p) => {
                        let name = p.metadata.name.unwrap_or_default();
                        if name == "bench-end" {
                            break;
                        }
                        if let Some(t) = cs.lock().unwrap().get(&name) {
                            a.lock().unwrap().push(now - *t);
                        }
                    }
                    WatchEvent::Modified(p) => {
                        let round = p
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("round").cloned());
                        let name = p.metadata.name.unwrap_or_default();
                        let (starts, out) = match round.as_deref() {
                            Some("bulk") => (&ps, &m),
                            Some("paced") => (&qs, &q),
                            _ => continue,
                        };
                        if !seen.insert((name.clone(), round)) {
                            continue;
                        }
                        if let Some(t) = starts.lock().unwrap().get(&name) {
                            out.lock().unwrap().push(now - *t);
                        }
                    }
                    _ => {}
                }
            }
        }));
    }

    let started = Instant::now();
    futures::stream::iter(0..objects)
        .for_each_concurrent(CONCURRENCY, |i| {
            let pods = pods.clone();
            let starts = create_starts.clone();
            async move {
                let p = pod(i);
                starts
                    .lock()
                    .unwrap()
                    .insert(format!("bench-{i}"), Instant::now());
                pods.create(&PostParams::default(), &p).await.unwrap();
            }
        })
        .await;
    let took = started.elapsed();
    println!(
        "creates: {objects} in {:.2} s = {:.0} creates/s",
        took.as_secs_f64(),
        objects as f64 / took.as_secs_f64()
    );

    let started = Instant::now();
    futures::stream::iter(0..objects)
        .for_each_concurrent(CONCURRENCY, |i| {
            let pods = pods.clone();
            let starts = patch_starts.clone();
            async move {
                let name = format!("bench-{i}");
                starts.lock().unwrap().insert(name.clone(), Instant::now());
                let patch = json!({"metadata": {"labels": {"round": "bulk"}}});
                pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
            }
        })
        .await;
    let took = started.elapsed();
    println!(
        "patches: {objects} in {:.2} s = {:.0} patches/s",
        took.as_secs_f64(),
        objects as f64 / took.as_secs_f64()
    );

    // Paced writes (200/s): the latency of one event when the server is not saturated.
    let paced_count = objects.min(500);
    for i in 0..paced_count {
        let name = format!("bench-{i}");
        paced_starts
            .lock()
            .unwrap()
            .insert(name.clone(), Instant::now());
        let patch = json!({"metadata": {"labels": {"round": "paced"}}});
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let status_started = Instant::now();
    futures::stream::iter(0..objects)
        .for_each_concurrent(CONCURRENCY, |i| {
            let pods = pods.clone();
            async move {
                let patch = json!({"status": {"phase": "Running"}});
                pods.patch_status(
                    &format!("bench-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .unwrap();
            }
        })
        .await;
    let status_took = status_started.elapsed();

    pods.create(&PostParams::default(), &{
        let mut end = pod(0);
        end.metadata.name = Some("bench-end".into());
        end
    })
    .await
    .unwrap();
    let drained = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join_all(watch_tasks),
    )
    .await;
    if drained.is_err() {
        println!("watchers did not see every event within 120 s");
    }
    println!(
        "watch fan-out latency (write request start -> event at each of {watchers} watchers):"
    );
    report("ADDED", added.lock().unwrap().clone());
    report("MODIFIED", modified.lock().unwrap().clone());
    report("MODIFIED, paced at 200/s", paced.lock().unwrap().clone());
    println!(
        "status patches: {objects} in {:.2} s = {:.0} patches/s",
        status_took.as_secs_f64(),
        objects as f64 / status_took.as_secs_f64()
    );

    let started = Instant::now();
    let list = pods.list(&ListParams::default()).await.unwrap();
    println!(
        "list of {} pods: {:.1} ms",
        list.items.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let started = Instant::now();
    let page = pods
        .list(&ListParams::default().labels("round=bulk").limit(500))
        .await
        .unwrap();
    println!(
        "list with label selector, page of {}: {:.1} ms",
        page.items.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    server.abort();
}
