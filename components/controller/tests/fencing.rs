//! A reconcile in flight when leadership is lost stops there: another replica may already
//! lead, and two must never write at once. The leader's reconcile is held in the middle of a
//! write (its Service create) while its Lease renewals start failing; once it steps down the
//! held write is abandoned, and the reconcile never goes on to create the pod.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use spawner_core::resource::SessionLivedBackend;
use spawner_localcluster::{Auth, Cluster, ServerConfig, SystemClock};
use tokio::sync::watch;
use tower::ServiceExt;

/// What the test does to the leader's requests.
#[derive(Default)]
struct Gate {
    /// Lease requests fail (the leader cannot renew).
    lease_down: AtomicBool,
    /// Set once the held request is waiting; cleared again if it is dropped.
    held: Mutex<Option<watch::Sender<Held>>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Held {
    Waiting,
    /// The caller dropped the request before it was sent on.
    Dropped,
}

/// Reports a dropped request.
struct OnDrop(watch::Sender<Held>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Held::Dropped);
    }
}

fn gated_client(cluster: &Cluster, gate: Arc<Gate>) -> Client {
    let router = spawner_localcluster::router(cluster.clone());
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let router = router.clone();
        let gate = gate.clone();
        async move {
            let path = request.uri().path().to_string();
            if path.contains("/leases") && gate.lease_down.load(Ordering::SeqCst) {
                return Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(503)
                        .body(axum::body::Body::from("unreachable"))
                        .expect("response"),
                );
            }
            let hold = request.method() == http::Method::POST && path.ends_with("/services");
            let held = if hold {
                gate.held.lock().expect("gate").take()
            } else {
                None
            };
            if let Some(held) = held {
                let _ = held.send(Held::Waiting);
                // Never sent on: the request waits here until its caller gives up on it.
                let _guard = OnDrop(held);
                std::future::pending::<()>().await;
            }
            router.oneshot(request.map(axum::body::Body::new)).await
        }
    });
    Client::new(service, "default")
}

fn backend(name: &str) -> SessionLivedBackend {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}},
    }))
    .expect("backend")
}

#[tokio::test]
async fn a_reconcile_in_flight_stops_when_leadership_is_lost() {
    let cluster = Cluster::new(
        ServerConfig {
            auth: Auth::anyone_is_admin(),
            bookmark_interval: Duration::from_secs(1),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let gate = Arc::new(Gate::default());
    let (held_tx, mut held_rx) = watch::channel(Held::Dropped);
    *gate.held.lock().expect("gate") = Some(held_tx);
    let leader = gated_client(&cluster, gate.clone());
    let admin = gated_client(&cluster, Arc::new(Gate::default()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(spawner_controller::run(
        leader,
        listener,
        common::config("fenced", true),
        async move {
            let _ = stopped.await;
        },
    ));

    let backends: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), "default");
    backends
        .create(&PostParams::default(), &backend("b1"))
        .await
        .expect("create backend");
    tokio::time::timeout(
        Duration::from_secs(30),
        held_rx.wait_for(|h| *h == Held::Waiting),
    )
    .await
    .expect("the leader reconciles the backend")
    .expect("held");

    // The leader can no longer renew its Lease: it steps down after its renew deadline (2 s),
    // and the reconcile held in its Service create must be dropped then.
    gate.lease_down.store(true, Ordering::SeqCst);
    tokio::time::timeout(
        Duration::from_secs(30),
        held_rx.wait_for(|h| *h == Held::Dropped),
    )
    .await
    .expect("the reconcile in flight is stopped when leadership is lost")
    .expect("dropped");

    // The reconcile did not go on to its next write.
    let pods: Api<Pod> = Api::namespaced(admin, "default");
    assert!(
        pods.get_opt("b1").await.expect("get pod").is_none(),
        "a reconcile went on writing after leadership was lost"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), controller).await;
}
