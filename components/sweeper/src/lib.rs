//! Spawner sweeper: runs on every node, follows the backends scheduled there, and writes the
//! two phases only the sidecar can reveal: Ready (the app accepts connections) and Swept
//! (nobody connected for longer than the grace period).
//!
//! It watches the backends labelled `spawner.dev/node=<its node>` and keeps one small task per
//! Running or Ready backend ([`subscription`]), subscribed to the sidecar's event stream through
//! the HTTP client the caller passes in (DESIGN.md rule 2). `/metrics` and `/healthz` are served
//! on the listener the caller passes in.

pub mod clock;
pub mod metrics;
#[cfg(feature = "sim-mutants")]
pub mod mutants;
pub mod subscription;
pub mod tracker;
pub mod write;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use spawner_core::phase::Phase;
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend};
use spawner_core::transition_event::EventReporter;
use spawner_kube_events::EventPublisher;
use tokio::sync::watch;

pub use clock::{Clock, SystemClock, TokioClock};
pub use metrics::Metrics;
pub use subscription::{EventsClient, Target};
pub use write::TransitionEvents;

/// Name the sweeper reports in Events.
pub const SWEEPER_NAME: &str = "spawner-sweeper";

/// How long a stopping sweeper waits for its queued Events to be posted.
const EVENTS_FLUSH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metrics server failed: {0}")]
    Serve(std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// Command-line and environment configuration of the sweeper.
#[derive(Clone, Debug, clap::Args)]
pub struct SweeperArgs {
    /// The node this sweeper runs on (from the downward API in production).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Namespace to watch; all namespaces when absent.
    #[arg(long, env = "SPAWNER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the /metrics and /healthz server (bound by the binary, not the library).
    #[arg(long, env = "SPAWNER_SWEEPER_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: std::net::SocketAddr,
    /// Secret the events tokens are derived from (shared with the controller).
    #[arg(long, env = "SPAWNER_EVENTS_SECRET", hide_env_values = true)]
    pub events_secret: String,
    /// The sidecars' heartbeat interval (the sidecar's default is 5 s; lower both together).
    #[arg(long, env = "SPAWNER_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
    /// A stream silent for this many heartbeat intervals is dropped and reconnected.
    #[arg(long, env = "SPAWNER_READ_TIMEOUT_HEARTBEATS", default_value_t = 3)]
    pub read_timeout_heartbeats: u32,
    /// First reconnect delay, in milliseconds.
    #[arg(long, env = "SPAWNER_RECONNECT_MIN_MS", default_value_t = 200)]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    #[arg(long, env = "SPAWNER_RECONNECT_MAX_MS", default_value_t = 10_000)]
    pub reconnect_max_ms: u64,
    /// This sweeper's identity in Events (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "spawner-sweeper")]
    pub identity: String,
}

/// Everything the sweeper needs to run, built from [`SweeperArgs`] or by a test.
#[derive(Clone, Debug)]
pub struct SweeperConfig {
    pub node_name: String,
    pub namespace: Option<String>,
    pub events_secret: Vec<u8>,
    pub heartbeat: Duration,
    pub read_timeout_heartbeats: u32,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub identity: String,
    pub clock: Arc<dyn Clock>,
}

impl SweeperConfig {
    /// A stream silent for this long is dropped.
    pub fn read_timeout(&self) -> Duration {
        self.heartbeat
            .saturating_mul(self.read_timeout_heartbeats.max(1))
    }

    /// How old the last report may be for the countdown between reports to be trusted: one
    /// heartbeat interval and a half.
    pub fn freshness(&self) -> Duration {
        self.heartbeat + self.heartbeat / 2
    }
}

impl SweeperArgs {
    pub fn into_config(self) -> SweeperConfig {
        SweeperConfig {
            node_name: self.node_name,
            namespace: self.namespace,
            events_secret: self.events_secret.into_bytes(),
            heartbeat: Duration::from_secs(self.heartbeat_seconds.max(1)),
            read_timeout_heartbeats: self.read_timeout_heartbeats,
            reconnect_min: Duration::from_millis(self.reconnect_min_ms.max(1)),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_min_ms)),
            identity: self.identity,
            clock: Arc::new(SystemClock),
        }
    }
}

/// An HTTP client over plain TCP for production: one connection per stream, none kept idle
/// (a stream holds its connection for the backend's whole life).
pub fn tcp_transport() -> EventsClient<HttpConnector> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// What every subscription task shares.
pub struct Shared<C> {
    pub http: EventsClient<C>,
    pub kube: Client,
    pub config: SweeperConfig,
    pub metrics: Arc<Metrics>,
    /// The Events of the written transitions: their reporter and the queue they go through.
    pub events: TransitionEvents,
}

struct Subscription {
    url: String,
    /// Dropping it ends the task at its next wait.
    _cancel: watch::Sender<()>,
}

/// The set of subscriptions, kept in step with the watched backends.
struct Subscriptions<C> {
    shared: Arc<Shared<C>>,
    by_uid: HashMap<String, Subscription>,
}

/// The subscription target for `backend`, or `None` when it should not be followed: only
/// Running and Ready backends with a URL, not being deleted.
pub fn target_of(backend: &SessionLivedBackend) -> Option<Target> {
    let status = backend.status.as_ref()?;
    if !matches!(status.phase, Phase::Running | Phase::Ready)
        || backend.metadata.deletion_timestamp.is_some()
    {
        return None;
    }
    Some(Target {
        namespace: backend.namespace()?,
        name: backend.name_any(),
        uid: backend.uid()?,
        url: status.url.clone()?,
        grace: Duration::from_secs(u64::from(backend.spec.grace_period_seconds)),
        ready: status.phase >= Phase::Ready,
        seen: Arc::new(backend.clone()),
    })
}

impl<C> Subscriptions<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn apply(&mut self, backend: &SessionLivedBackend) {
        let Some(uid) = backend.uid() else {
            return;
        };
        match target_of(backend) {
            Some(target) => {
                if let Some(existing) = self.by_uid.get(&uid)
                    && existing.url == target.url
                {
                    // Already followed (a finished task stays until the watch shows the
                    // backend finished, so it is not restarted in between).
                    return;
                }
                self.remove(&uid);
                let url = target.url.clone();
                let (cancel, cancelled) = watch::channel(());
                tokio::spawn(subscription::follow(target, self.shared.clone(), cancelled));
                self.shared
                    .metrics
                    .subscriptions
                    .fetch_add(1, Ordering::Relaxed);
                self.by_uid.insert(
                    uid,
                    Subscription {
                        url,
                        _cancel: cancel,
                    },
                );
            }
            None => self.remove(&uid),
        }
    }

    fn remove(&mut self, uid: &str) {
        if self.by_uid.remove(uid).is_some() {
            self.shared
                .metrics
                .subscriptions
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn retain(&mut self, keep: &HashSet<String>) {
        let gone: Vec<String> = self
            .by_uid
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.remove(&uid);
        }
    }

    fn clear(&mut self) {
        let all: Vec<String> = self.by_uid.keys().cloned().collect();
        for uid in all {
            self.remove(&uid);
        }
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    node: String,
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.node),
    )
}

/// Runs the sweeper until `shutdown` completes.
pub async fn run<L, C>(
    client: Client,
    listener: L,
    http: EventsClient<C>,
    config: SweeperConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    C: Connect + Clone + Send + Sync + 'static,
{
    // As the api and the controller do: an empty or placeholder secret would let anyone who
    // reads deploy/base derive every backend's token.
    spawner_core::token::check_secret("events secret", &config.events_secret)
        .map_err(Error::Config)?;
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let server = {
        let mut stop = stop_rx.clone();
        let app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(HttpState {
                metrics: metrics.clone(),
                node: config.node_name.clone(),
            });
        tokio::spawn(async move {
            let limits = spawner_serve::Limits::default();
            spawner_serve::serve(listener, app, limits, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let (publisher, publishing) = EventPublisher::start(client.clone());
    let events = TransitionEvents {
        reporter: EventReporter {
            controller: SWEEPER_NAME.into(),
            instance: config.identity.clone(),
        },
        publisher,
    };
    let api: Api<SessionLivedBackend> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("{NODE_LABEL}={}", config.node_name);
    let node = config.node_name.clone();
    let mut subscriptions = Subscriptions {
        shared: Arc::new(Shared {
            http,
            kube: client,
            config,
            metrics: metrics.clone(),
            events,
        }),
        by_uid: HashMap::new(),
    };

    let events = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut stop = stop_rx.clone();
    let mut listed: Option<HashSet<String>> = None;
    tracing::info!(node = %node, "sweeper watching backends labelled {selector}");
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = stop.wait_for(|s| *s) => break,
        };
        match event {
            Some(Ok(watcher::Event::Init)) => listed = Some(HashSet::new()),
            Some(Ok(watcher::Event::InitApply(backend))) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), backend.uid()) {
                    seen.insert(uid);
                }
                subscriptions.apply(&backend);
            }
            Some(Ok(watcher::Event::InitDone)) => {
                if let Some(seen) = listed.take() {
                    subscriptions.retain(&seen);
                }
            }
            Some(Ok(watcher::Event::Apply(backend))) => subscriptions.apply(&backend),
            Some(Ok(watcher::Event::Delete(backend))) => {
                if let Some(uid) = backend.uid() {
                    subscriptions.remove(&uid);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "backend watch failed; retrying"),
            None => break,
        }
    }
    subscriptions.clear();
    drop(subscriptions);
    // The subscriptions' tasks let go of the queue as they end; what it holds is posted.
    let _ = tokio::time::timeout(EVENTS_FLUSH, publishing).await;
    server
        .await
        .map_err(|e| Error::Serve(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend(phase: &str, url: Option<&str>) -> SessionLivedBackend {
        let mut status = json!({"phase": phase});
        if let Some(url) = url {
            status["url"] = json!(url);
        }
        serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": "b", "namespace": "ns", "uid": "u1"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}, "gracePeriodSeconds": 7},
            "status": status
        }))
        .expect("backend")
    }

    #[test]
    fn only_running_and_ready_backends_with_a_url_are_followed() {
        let t = target_of(&backend("Running", Some("http://127.0.0.9:9090"))).expect("followed");
        assert_eq!(t.grace, Duration::from_secs(7));
        assert!(!t.ready);
        assert!(
            target_of(&backend("Ready", Some("http://x")))
                .expect("ready")
                .ready
        );
        assert_eq!(target_of(&backend("Running", None)), None);
        for phase in ["Submitted", "Scheduled", "Swept", "Failed", "Terminated"] {
            assert_eq!(
                target_of(&backend(phase, Some("http://x"))),
                None,
                "{phase}"
            );
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweeperArgs,
    }

    #[test]
    fn args_parse_into_a_config() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "sweeper",
            "--node-name",
            "node-7",
            "--events-secret",
            "s3cret",
            "--heartbeat-seconds",
            "2",
        ])
        .expect("parses");
        let config = cli.args.into_config();
        assert_eq!(config.node_name, "node-7");
        assert_eq!(config.read_timeout(), Duration::from_secs(6));
        assert!(config.reconnect_min <= config.reconnect_max);
    }

    #[tokio::test]
    async fn run_refuses_an_empty_or_placeholder_events_secret() {
        for secret in ["", "CHANGE-ME", " change-me "] {
            let config = SweeperConfig {
                node_name: "n".into(),
                namespace: None,
                events_secret: secret.as_bytes().to_vec(),
                heartbeat: Duration::from_secs(2),
                read_timeout_heartbeats: 3,
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(1),
                identity: "s".into(),
                clock: Arc::new(SystemClock),
            };
            // Nothing listens there: a sweeper that started would retry forever.
            let kube = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
            let client = Client::try_from(kube).expect("client");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let ran = tokio::time::timeout(
                Duration::from_secs(10),
                run(
                    client,
                    listener,
                    tcp_transport(),
                    config,
                    std::future::pending(),
                ),
            )
            .await;
            match ran {
                Ok(Err(Error::Config(message))) => {
                    assert!(message.contains("events secret"), "{message}")
                }
                Ok(other) => panic!("{secret:?}: expected a configuration error, got {other:?}"),
                Err(_) => panic!("{secret:?}: the sweeper started with it"),
            }
        }
    }

    #[test]
    fn read_timeout_and_freshness_follow_the_heartbeat() {
        let config = SweeperConfig {
            node_name: "n".into(),
            namespace: None,
            events_secret: vec![],
            heartbeat: Duration::from_secs(2),
            read_timeout_heartbeats: 3,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            identity: "s".into(),
            clock: Arc::new(SystemClock),
        };
        assert_eq!(config.read_timeout(), Duration::from_secs(6));
        assert_eq!(config.freshness(), Duration::from_secs(3));
    }
}
