//! Runs the API conformance suite against localcluster, in-process on a loopback port, and,
//! when `SPAWNER_CONFORMANCE_KUBECONFIG` names a kubeconfig, against that cluster as well.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use spawner_core::resource::SessionLivedBackend;
use spawner_e2e::conformance::{self, CheckError};
use spawner_localcluster::{Cluster, ServerConfig, SystemClock, serve, write_kubeconfig};

async fn client_from_kubeconfig(path: &std::path::Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("kubeconfig readable");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(config).expect("client")
}

/// Runs every check (concurrently, each in its own namespace) and fails with all failures.
async fn run_suite(client: Client, prefix: &str) {
    let checks = conformance::all();
    let runs = checks.iter().enumerate().map(|(i, check)| {
        let client = client.clone();
        let ns = format!("{prefix}-{i}");
        async move {
            let result = tokio::time::timeout(
                Duration::from_secs(240),
                conformance::run_check(&client, check, &ns),
            )
            .await
            .unwrap_or_else(|_| Err(CheckError::Timeout(format!("check {}", check.name))));
            (check.name, result)
        }
    });
    let results = futures::future::join_all(runs).await;
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    for (name, r) in &results {
        eprintln!("{} {name}", if r.is_ok() { "ok  " } else { "FAIL" });
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_localcluster() {
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, cluster));
    let dir = std::env::temp_dir().join(format!("spawner-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("http://{addr}"), None, None, None).unwrap();
    let client = client_from_kubeconfig(&kubeconfig).await;
    run_suite(client, "conf").await;
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Installs the SessionLivedBackend CRD on a real cluster and waits until it is served.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = SessionLivedBackend::crd();
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("installing the CRD: {e}"),
    }
    let slabs: Api<SessionLivedBackend> = Api::namespaced(client.clone(), "default");
    for _ in 0..100 {
        if slabs.list(&Default::default()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the SessionLivedBackend CRD is not served");
}

/// The same suite against kube-apiserver + etcd + kube-controller-manager from the control-plane
/// harness (skips with a message where the binaries cannot be built): every difference from
/// localcluster is a localcluster bug or a documented gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_kube_apiserver() {
    let Some(control_plane) = spawner_e2e::controlplane::ControlPlane::shared_or_skip(
        "conformance_against_kube_apiserver",
    )
    .await
    else {
        return;
    };
    let client = control_plane.admin_client().await.expect("admin client");
    install_crd(&client).await;
    run_suite(client, &format!("conf-real-{}", std::process::id())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_configured_cluster() {
    let Ok(path) = std::env::var("SPAWNER_CONFORMANCE_KUBECONFIG") else {
        eprintln!(
            "SPAWNER_CONFORMANCE_KUBECONFIG is not set: the suite runs against localcluster only"
        );
        return;
    };
    let client = client_from_kubeconfig(std::path::Path::new(&path)).await;
    install_crd(&client).await;
    let prefix = format!("conf-{}", std::process::id());
    run_suite(client, &prefix).await;
}
