//! Leader election under a slow API server, in paused tokio time: two candidates against an
//! in-process localcluster whose answers to one of them can be delayed or refused. At no
//! instant may both lead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use spawner_controller::{LeaderElector, LeaseSettings, Metrics, TokioClock};
use spawner_localcluster::{Cluster, ServerConfig};
use tokio::sync::watch;
use tower::ServiceExt;

/// How the API server treats one candidate's requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    Normal,
    /// The next request is applied at once but its answer arrives this much later.
    SlowAnswerOnce(Duration),
    /// Every request fails (the API server is unreachable from this candidate).
    Down,
}

fn client(cluster: &Cluster, link: Arc<Mutex<Link>>) -> Client {
    let router = spawner_localcluster::router(cluster.clone());
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let router = router.clone();
        let link = link.clone();
        async move {
            let now = {
                let mut link = link.lock().expect("link");
                let now = *link;
                match now {
                    // Only the write is slow: the read before it is answered at once.
                    Link::SlowAnswerOnce(_) if request.method() != http::Method::PUT => {
                        Link::Normal
                    }
                    Link::SlowAnswerOnce(_) => {
                        *link = Link::Normal;
                        now
                    }
                    _ => now,
                }
            };
            if now == Link::Down {
                return Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(503)
                        .body(axum::body::Body::from("unreachable"))
                        .expect("response"),
                );
            }
            let response = router.oneshot(request.map(axum::body::Body::new)).await?;
            if let Link::SlowAnswerOnce(delay) = now {
                tokio::time::sleep(delay).await;
            }
            Ok(response)
        }
    });
    Client::new(service, "default")
}

fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: "spawner-controller".into(),
        namespace: "default".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(12),
        retry_period: Duration::from_secs(1),
    }
}

/// Leader A's renewal is applied but answered 9.5 s late, and then A loses the API server.
/// B saw the renewed record at once and may take over 15 s after it. A must have stepped
/// down by then: its term counts from when it SENT the renewal, not from the late answer.
#[tokio::test(start_paused = true)]
async fn a_slow_renewal_answer_never_lets_two_lead() {
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(spawner_localcluster::SystemClock),
    );
    // Renew times follow tokio's (paused) clock, so every renewal writes a new record.
    let clock: Arc<dyn spawner_controller::Clock> = Arc::new(TokioClock::starting_at(
        "2030-01-01T00:00:00Z".parse().expect("time"),
    ));
    let link_a = Arc::new(Mutex::new(Link::Normal));
    let link_b = Arc::new(Mutex::new(Link::Normal));
    let (stop_tx, stop) = watch::channel(false);
    let (a_tx, mut a) = watch::channel(false);
    let (b_tx, b) = watch::channel(false);
    let elector_a = LeaderElector::new(
        Api::<Lease>::namespaced(client(&cluster, link_a.clone()), "default"),
        settings("a"),
        clock.clone(),
    );
    let task_a = tokio::spawn(elector_a.run(a_tx, Arc::new(Metrics::default()), stop.clone()));
    a.wait_for(|l| *l).await.expect("a campaigns");

    let elector_b = LeaderElector::new(
        Api::<Lease>::namespaced(client(&cluster, link_b), "default"),
        settings("b"),
        clock.clone(),
    );
    let task_b = tokio::spawn(elector_b.run(b_tx, Arc::new(Metrics::default()), stop.clone()));

    // Watch both flags at every change.
    let both = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (mut a, mut b) = (a.clone(), b.clone());
        let both = both.clone();
        tokio::spawn(async move {
            loop {
                if *a.borrow_and_update() && *b.borrow_and_update() {
                    both.lock().expect("both").push(tokio::time::Instant::now());
                }
                tokio::select! {
                    r = a.changed() => if r.is_err() { return },
                    r = b.changed() => if r.is_err() { return },
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(*a.borrow() && !*b.borrow(), "a leads, b waits");
    *link_a.lock().expect("link") = Link::SlowAnswerOnce(Duration::from_millis(9_500));
    // Once the slow renewal is answered, A cannot reach the API server any more.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    *link_a.lock().expect("link") = Link::Down;

    let mut b_leads = b.clone();
    tokio::time::timeout(Duration::from_secs(60), b_leads.wait_for(|l| *l))
        .await
        .expect("b takes over")
        .expect("b campaigns");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!*a.borrow(), "a stepped down");
    assert_eq!(*both.lock().expect("both"), Vec::new(), "both led at once");

    stop_tx.send(true).expect("stop");
    let _ = task_a.await;
    let _ = task_b.await;
    watcher.abort();
}

/// Timings under which two could lead are refused before campaigning.
#[test]
fn a_renew_deadline_not_shorter_than_the_lease_is_refused() {
    let mut s = settings("a");
    s.renew_deadline = s.lease_duration;
    assert!(s.check().is_err());
}
