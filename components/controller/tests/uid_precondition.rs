//! The controller deletes a backend's pod on condition that it is still the pod it saw (its
//! uid): a pod replaced under the same name meanwhile — a newer backend's — is never deleted.
//! The test replaces the pod between the controller's decision and its DELETE reaching the
//! API server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use spawner_core::resource::{SessionLivedBackend, TERMINATE_ANNOTATION};
use spawner_localcluster::{Auth, Cluster, ServerConfig, SystemClock};
use tokio::sync::watch;
use tower::ServiceExt;

/// What became of the controller's first pod DELETE: the API server's status code.
type Answered = watch::Sender<Option<u16>>;

fn admin_client(cluster: &Cluster) -> Client {
    let router = spawner_localcluster::router(cluster.clone());
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        router.clone().oneshot(request.map(axum::body::Body::new))
    });
    Client::new(service, "default")
}

/// Starts the replacement of the pod (`go`) and finishes when it is done.
type Replacement = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// The controller's client: its first DELETE of a pod is held while `replace` runs, then sent.
fn controller_client(
    cluster: &Cluster,
    replace: Arc<Mutex<Option<Replacement>>>,
    answered: Arc<Answered>,
) -> Client {
    let router = spawner_localcluster::router(cluster.clone());
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let router = router.clone();
        let replace = replace.clone();
        let answered = answered.clone();
        async move {
            let pod_delete =
                request.method() == http::Method::DELETE && request.uri().path().contains("/pods/");
            let replacing = if pod_delete {
                replace.lock().expect("replace").take()
            } else {
                None
            };
            let Some((go, replacing)) = replacing else {
                return router.oneshot(request.map(axum::body::Body::new)).await;
            };
            let _ = go.send(());
            replacing.await.expect("replace the pod");
            let response = router.oneshot(request.map(axum::body::Body::new)).await?;
            let _ = answered.send(Some(response.status().as_u16()));
            Ok(response)
        }
    });
    Client::new(service, "default")
}

#[tokio::test]
async fn a_pod_replaced_under_the_same_name_is_not_deleted() {
    let cluster = Cluster::new(
        ServerConfig {
            auth: Auth::anyone_is_admin(),
            bookmark_interval: Duration::from_secs(1),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let admin = admin_client(&cluster);
    let backends: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");

    // Replaces pod b1 by a pod of the same name that the backend does not own.
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let replacement = {
        let pods = pods.clone();
        tokio::spawn(async move {
            if ready.await.is_err() {
                return;
            }
            pods.delete("b1", &DeleteParams::default().grace_period(0))
                .await
                .expect("delete the old pod");
            let newer: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "b1", "labels": {"newer": "true"}},
                "spec": {"containers": [{"name": "app", "image": "example/app:2"}]},
            }))
            .expect("pod");
            pods.create(&PostParams::default(), &newer)
                .await
                .expect("create the newer pod");
        })
    };
    let replace = Arc::new(Mutex::new(Some((go, replacement))));
    let (answered_tx, mut answered_rx) = watch::channel(None);
    let client = controller_client(&cluster, replace, Arc::new(answered_tx));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(spawner_controller::run(
        client,
        listener,
        common::config("uid-precondition", false),
        async move {
            let _ = stopped.await;
        },
    ));

    let backend: SessionLivedBackend = serde_json::from_value(serde_json::json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": "b1"},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}},
    }))
    .expect("backend");
    backends
        .create(&PostParams::default(), &backend)
        .await
        .expect("create backend");
    tokio::time::timeout(Duration::from_secs(30), async {
        while pods.get_opt("b1").await.expect("get pod").is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the controller creates the pod");

    // Terminate: the controller deletes the backend's children; its pod DELETE waits until
    // the pod was replaced.
    let patch = serde_json::json!({"metadata": {"annotations": {TERMINATE_ANNOTATION: "2030-01-01T00:00:00.000Z"}}});
    backends
        .patch("b1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("terminate");
    tokio::time::timeout(
        Duration::from_secs(30),
        answered_rx.wait_for(Option::is_some),
    )
    .await
    .expect("the controller deletes the pod")
    .expect("answered");
    let status = answered_rx.borrow().unwrap_or_default();

    assert_eq!(
        status, 409,
        "the DELETE carries the old pod's uid as a precondition"
    );
    let survivor = pods.get_opt("b1").await.expect("get pod");
    assert!(
        survivor.is_some_and(|p| p.metadata.labels.unwrap_or_default().contains_key("newer")),
        "the newer pod of the same name was deleted"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), controller).await;
}
