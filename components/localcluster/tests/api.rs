//! localcluster-specific behaviour over HTTP with kube-rs: token authentication, RBAC,
//! compaction (410 Gone) recovery, and a bounded watch history.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;
use spawner_localcluster::{
    Auth, Cluster, Identity, Rbac, ServerConfig, StoreConfig, SystemClock, kubeconfig_yaml, serve,
};

async fn start(
    config: ServerConfig,
) -> (
    Cluster,
    String,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let cluster = Cluster::new(config, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener, cluster.clone()));
    (cluster, url, server)
}

async fn client(url: &str, token: Option<&str>) -> Client {
    let kubeconfig: Kubeconfig =
        serde_yaml::from_str(&kubeconfig_yaml(url, None, token, None)).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }))
    .unwrap()
}

fn backend(name: &str) -> SessionLivedBackend {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}},
    }))
    .unwrap()
}

const POLICY: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: sweeper}
rules:
- apiGroups: ["spawner.dev"]
  resources: ["sessionlivedbackends"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["spawner.dev"]
  resources: ["sessionlivedbackends/status"]
  verbs: ["patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sweeper}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: sweeper}
subjects:
- {kind: ServiceAccount, name: sweeper, namespace: spawner}
"#;

#[tokio::test]
async fn tokens_and_rbac_are_enforced() {
    let mut rbac = Rbac::default();
    rbac.load_yaml(POLICY).unwrap();
    let tokens = HashMap::from([
        ("admin-token".to_string(), Identity::admin()),
        (
            "sweeper-token".to_string(),
            Identity::service_account("spawner", "sweeper"),
        ),
    ]);
    let config = ServerConfig {
        auth: Auth {
            rbac: Some(rbac),
            ..Auth::tokens(tokens)
        },
        ..Default::default()
    };
    let (_cluster, url, server) = start(config).await;

    let admin = client(&url, Some("admin-token")).await;
    let admin_slabs: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), "default");
    admin_slabs
        .create(&PostParams::default(), &backend("b"))
        .await
        .unwrap();

    let sweeper = client(&url, Some("sweeper-token")).await;
    let slabs: Api<SessionLivedBackend> = Api::namespaced(sweeper.clone(), "default");
    slabs.list(&ListParams::default()).await.unwrap();
    slabs.get("b").await.unwrap();
    slabs
        .patch_status(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    let denied = slabs
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gracePeriodSeconds": 1}})),
        )
        .await;
    match denied {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert_eq!(s.reason, "Forbidden");
            assert_eq!(
                s.message,
                "sessionlivedbackends.spawner.dev \"b\" is forbidden: User \"system:serviceaccount:spawner:sweeper\" cannot patch resource \"sessionlivedbackends\" in API group \"spawner.dev\" in the namespace \"default\""
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let pods: Api<Pod> = Api::namespaced(sweeper, "default");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected 403, got {other:?}"),
    }

    let stranger = client(&url, Some("wrong")).await;
    let slabs: Api<SessionLivedBackend> = Api::namespaced(stranger, "default");
    match slabs.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized"));
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let anonymous = client(&url, None).await;
    // Health and version need no token.
    assert_eq!(anonymous.apiserver_version().await.unwrap().major, "1");
    let slabs: Api<SessionLivedBackend> = Api::namespaced(anonymous, "default");
    assert!(
        matches!(slabs.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 401)
    );
    server.abort();
}

#[tokio::test]
async fn compaction_makes_old_watches_gone_and_watcher_recovers() {
    let (cluster, url, server) = start(ServerConfig {
        auth: Auth::anyone_is_admin(),
        ..ServerConfig::default()
    })
    .await;
    let client = client(&url, None).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let first = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();

    // Before compaction the history serves a watch from that version ...
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    pods.create(&PostParams::default(), &pod("b"))
        .await
        .unwrap();
    let ev = stream.next().await.unwrap().unwrap();
    assert!(matches!(ev, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("b")));
    drop(stream);

    // ... after it, the same version is 410 Gone, sent as an ERROR event.
    cluster.compact();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await.unwrap().unwrap() {
        WatchEvent::Error(s) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
            assert!(
                s.message
                    .starts_with(&format!("too old resource version: {rv} (")),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // kube-runtime's watcher re-lists after a 410 and carries on.
    let watched = watcher(pods.clone(), watcher::Config::default().timeout(1))
        .applied_objects()
        .boxed();
    let names = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = names.clone();
    let task = tokio::spawn(async move {
        let mut watched = watched;
        while let Some(Ok(p)) = watched.next().await {
            sink.lock()
                .unwrap()
                .push(p.metadata.name.unwrap_or_default());
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        cluster.compact();
        pods.create(&PostParams::default(), &pod(&format!("after-{i}")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = names.lock().unwrap().clone();
        if (0..3).all(|i| seen.contains(&format!("after-{i}"))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher missed pods after compactions: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    server.abort();
}

#[tokio::test]
async fn bounded_history_expires_old_versions() {
    let config = ServerConfig {
        store: StoreConfig {
            history_per_type: 5,
            ..Default::default()
        },
        auth: Auth::anyone_is_admin(),
        ..Default::default()
    };
    let (_cluster, url, server) = start(config).await;
    let client = client(&url, None).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let first = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    for i in 0..3 {
        pods.patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"i": i.to_string()}}})),
        )
        .await
        .unwrap();
    }
    // Still retained: 3 events after `rv`.
    let mut stream = pods
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        stream.next().await.unwrap().unwrap(),
        WatchEvent::Modified(_)
    ));
    drop(stream);
    pods.create(&PostParams::default(), &pod("q"))
        .await
        .unwrap();
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    let token = page.metadata.continue_.clone().unwrap();
    for i in 3..10 {
        pods.patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"i": i.to_string()}}})),
        )
        .await
        .unwrap();
    }
    let mut stream = pods
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(stream.next().await.unwrap().unwrap(), WatchEvent::Error(s) if s.code == 410));
    // A continue token from before the retained history is expired too.
    match pods
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 for an expired continue token, got {other:?}"),
    }
    server.abort();
}
