//! The Kubernetes API server of `bench/run.sh` (`just bench-router`): a localcluster on a
//! loopback port holding `<backends>` Ready backends `sb-bench-0`, `sb-bench-1`, ... whose
//! sidecar is at `<sidecar>`, so `spawner router` (the release binary, as the images run it)
//! fills its cache from it.
//!
//! `bench_cluster <kubeconfig> <backends> <sidecar host:port> <connect secret>` writes the
//! kubeconfig, creates the backends (`sb-bench-1` is public, the others need a token), prints
//! `ready <session cookie of sb-bench-0>` and serves until its standard input closes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use spawner_core::SessionLivedBackend;
use spawner_core::connect_token::{self, Claims, KeyRing, Purpose};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, kubeconfig, backends, sidecar, secret] = &args[..] else {
        eprintln!("usage: bench_cluster <kubeconfig> <backends> <sidecar host:port> <secret>");
        std::process::exit(2);
    };
    let backends: usize = backends.parse().expect("a number of backends");
    let cluster = spawner_localcluster::Cluster::new(
        spawner_localcluster::ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..Default::default()
        },
        Arc::new(spawner_localcluster::SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { spawner_localcluster::serve(listener, cluster).await });
    spawner_localcluster::write_kubeconfig(kubeconfig.as_ref(), &url, None, None, Some("default"))
        .expect("kubeconfig");
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = "default".into();
    let api: Api<SessionLivedBackend> =
        Api::namespaced(kube::Client::try_from(config).expect("client"), "default");

    let created = futures::stream::iter(0..backends)
        .map(|i| {
            let api = api.clone();
            let sidecar = sidecar.clone();
            async move { create(&api, i, &sidecar).await }
        })
        .buffer_unordered(16)
        .count()
        .await;
    let keys = KeyRing::parse([format!("bench:{secret}").as_str()], true).expect("key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let cookie = connect_token::sign(
        &keys,
        Purpose::Session,
        &Claims {
            backend: "sb-bench-0".into(),
            expires_at: now + 24 * 3600,
            user: None,
        },
    )
    .expect("session token");
    println!("ready {cookie}");
    eprintln!("bench cluster: {created} backends at {url}");
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
}

async fn create(api: &Api<SessionLivedBackend>, i: usize, sidecar: &str) {
    let name = format!("sb-bench-{i}");
    let mut metadata = json!({"name": name, "namespace": "default"});
    if i == 1 {
        metadata["annotations"] = json!({spawner_core::resource::PUBLIC_ANNOTATION: "true"});
    }
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": metadata,
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "bench"}]}},
                 "httpPort": 8080, "gracePeriodSeconds": 300}
    }))
    .expect("backend");
    for attempt in 0..5u64 {
        let done = async {
            api.create(&PostParams::default(), &backend).await?;
            let status = json!({"status": {"phase": "Ready", "url": format!("http://{sidecar}")}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
        };
        match done.await {
            Ok(_) => return,
            Err(e) if attempt < 4 => {
                eprintln!("{name}: {e}; retrying");
                let _ = api.delete(&name, &Default::default()).await;
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}
