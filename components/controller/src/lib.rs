//! Spawner controller: turns each `SessionLivedBackend` into a Pod (with the sidecar injected)
//! and a Service, advances its phase from what the Pod shows, enforces its maximum lifetime,
//! honours terminate requests, and deletes finished backends after a retention period.
//!
//! One replica leads (a Lease, see [`leader`]); only the leader reconciles. `/metrics` and
//! `/healthz` are served on the listener the caller passes in (DESIGN.md rule 2).

pub mod clock;
pub mod leader;
pub mod metrics;
pub mod observe;
mod reconcile;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as RuntimeConfig, Controller};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use spawner_core::children::{ChildrenConfig, DEFAULT_SIDECAR_PORT, SidecarResources};
use spawner_core::phase::Phase;
use spawner_core::policy::{PodAllowance, PodPolicy};
use spawner_core::resource::{BACKEND_LABEL, SessionLivedBackend};
use spawner_core::transition_event::EventReporter;
use spawner_core::validation::Limits;
use spawner_kube_events::EventPublisher;
use tokio::sync::watch;

pub use clock::{Clock, SystemClock, TokioClock};
pub use leader::{LeaderElector, LeaseSettings};
pub use metrics::Metrics;
pub use reconcile::{ChildCaches, Context, Error, TERMINATE_ANNOTATION, error_policy, reconcile};

/// Name the controller reports in Events.
pub const CONTROLLER_NAME: &str = "spawner-controller";

/// How long a stopping controller waits for its queued Events to be posted.
const EVENTS_FLUSH: Duration = Duration::from_secs(2);

/// How often the controller drops what it remembers of backends that are gone
/// ([`Context::forget_gone`]).
const FORGET_GONE_EVERY: Duration = Duration::from_secs(60);

/// Where `status.url` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UrlMode {
    /// The backend's Service DNS name (in a cluster).
    Service,
    /// `http://<podIP>:<sidecar port>` (localcluster, where each pod has its own loopback IP).
    PodIp,
}

/// Command-line and environment configuration of the controller.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Namespace to watch; all namespaces when absent.
    #[arg(long, env = "SPAWNER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the /metrics and /healthz server (bound by the binary, not the library).
    #[arg(
        long,
        env = "SPAWNER_CONTROLLER_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: std::net::SocketAddr,
    /// Secret the events tokens are derived from (shared with the sweeper). Refused when empty
    /// or the `CHANGE-ME` placeholder.
    #[arg(long, env = "SPAWNER_EVENTS_SECRET", hide_env_values = true)]
    pub events_secret: String,
    /// Pod template fields the backend pod policy lets through (comma-separated; refused by
    /// default): privileged, host-namespaces, host-path, host-ports, capabilities, node-name,
    /// service-account, unconfined. `service-account` also lets a template ask for a token.
    #[arg(long, env = "SPAWNER_BACKEND_POD_ALLOW", value_delimiter = ',')]
    pub backend_pod_allow: Vec<PodAllowance>,
    /// How long the controller keeps retrying a pod the API server forbids (Pod Security, a
    /// ResourceQuota, a LimitRange) before the backend fails with the API server's reason.
    #[arg(long, env = "SPAWNER_POD_REFUSAL_RETRY_SECONDS", default_value_t = 30)]
    pub pod_refusal_retry_seconds: u64,
    /// CPU request of the injected sidecar.
    #[arg(long, env = "SPAWNER_SIDECAR_CPU_REQUEST", default_value = "50m")]
    pub sidecar_cpu_request: String,
    /// Memory request of the injected sidecar.
    #[arg(long, env = "SPAWNER_SIDECAR_MEMORY_REQUEST", default_value = "32Mi")]
    pub sidecar_memory_request: String,
    /// CPU limit of the injected sidecar (none when unset).
    #[arg(long, env = "SPAWNER_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,
    /// Memory limit of the injected sidecar.
    #[arg(long, env = "SPAWNER_SIDECAR_MEMORY_LIMIT", default_value = "256Mi")]
    pub sidecar_memory_limit: String,
    /// Image of the sidecar container injected into every backend pod.
    #[arg(
        long,
        env = "SPAWNER_SIDECAR_IMAGE",
        default_value = "ghcr.io/spawner-dev/spawner:latest"
    )]
    pub sidecar_image: String,
    /// Port the sidecar serves on inside the pod.
    #[arg(long, env = "SPAWNER_SIDECAR_PORT", default_value_t = DEFAULT_SIDECAR_PORT)]
    pub sidecar_port: u16,
    /// Cluster DNS domain used in Service URLs.
    #[arg(long, env = "SPAWNER_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// What `status.url` points at.
    #[arg(long, env = "SPAWNER_URL_MODE", value_enum, default_value = "service")]
    pub url_mode: UrlMode,
    /// How long an image may fail to pull before the backend fails.
    #[arg(
        long,
        env = "SPAWNER_IMAGE_PULL_TIMEOUT_SECONDS",
        default_value_t = 120
    )]
    pub image_pull_timeout_seconds: u64,
    /// How long a backend's pod may run before its application accepts connections: a backend
    /// not Ready this long after it became Running fails with `StartTimeout` (0: no limit).
    #[arg(long, env = "SPAWNER_START_TIMEOUT_SECONDS", default_value_t = 300)]
    pub start_timeout_seconds: u64,
    /// How long a finished (Swept, Failed, Terminated) backend stays readable before deletion.
    #[arg(long, env = "SPAWNER_RETENTION_SECONDS", default_value_t = 300)]
    pub retention_seconds: u64,
    /// Reconcile every backend at least this often, whatever the watches say.
    #[arg(long, env = "SPAWNER_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Reconciliations run at once.
    #[arg(long, env = "SPAWNER_CONTROLLER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Run without leader election (exactly one replica).
    #[arg(long, env = "SPAWNER_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "SPAWNER_LEASE_NAME", default_value = "spawner-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease and in Events (the pod name). Without one, a
    /// random identity: two replicas must never share one, or both would lead.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "SPAWNER_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    #[arg(
        long,
        env = "SPAWNER_LEASE_RENEW_DEADLINE_SECONDS",
        default_value_t = 10
    )]
    pub lease_renew_deadline_seconds: u64,
    #[arg(long, env = "SPAWNER_LEASE_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub lease_retry_period_seconds: u64,
}

/// Everything the controller needs to run, built from [`ControllerArgs`] or by a test.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub namespace: Option<String>,
    pub children: ChildrenConfig,
    pub events_secret: Vec<u8>,
    pub url_mode: UrlMode,
    pub image_pull_timeout: Duration,
    /// How long a Running backend may take to become Ready before it fails; `None`: no limit.
    pub start_timeout: Option<Duration>,
    pub retention: Duration,
    pub resync: Duration,
    pub concurrency: u16,
    pub limits: Limits,
    /// What backend pod templates may ask for beyond the default.
    pub pod_policy: PodPolicy,
    /// How long a forbidden pod is retried before its backend fails.
    pub pod_refusal_retry: Duration,
    /// `None` runs without leader election.
    pub lease: Option<LeaseSettings>,
    /// Reporter identity in Events.
    pub identity: String,
    pub clock: Arc<dyn Clock>,
}

/// A fresh identity for a replica that was given none.
fn random_identity() -> String {
    spawner_core::id::new_backend_id("spawner-controller-")
        .unwrap_or_else(|_| format!("spawner-controller-{}", std::process::id()))
}

impl ControllerArgs {
    pub fn into_config(self) -> ControllerConfig {
        let identity = self
            .identity
            .filter(|i| !i.is_empty())
            .unwrap_or_else(random_identity);
        let pod_policy = PodPolicy::allowing(self.backend_pod_allow);
        let lease = (!self.no_leader_election).then(|| LeaseSettings {
            name: self.lease_name,
            namespace: self.lease_namespace,
            identity: identity.clone(),
            lease_duration: Duration::from_secs(self.lease_duration_seconds),
            renew_deadline: Duration::from_secs(self.lease_renew_deadline_seconds),
            retry_period: Duration::from_secs(self.lease_retry_period_seconds),
        });
        let limits = Limits {
            reserved_ports: vec![self.sidecar_port],
            ..Limits::default()
        };
        ControllerConfig {
            namespace: self.namespace,
            children: ChildrenConfig {
                sidecar_image: self.sidecar_image,
                sidecar_port: self.sidecar_port,
                cluster_domain: self.cluster_domain,
                sidecar_resources: SidecarResources {
                    cpu_request: self.sidecar_cpu_request,
                    memory_request: self.sidecar_memory_request,
                    cpu_limit: self.sidecar_cpu_limit,
                    memory_limit: self.sidecar_memory_limit,
                },
                allow_service_account_token: pod_policy.allows(PodAllowance::ServiceAccount),
            },
            events_secret: self.events_secret.into_bytes(),
            url_mode: self.url_mode,
            image_pull_timeout: Duration::from_secs(self.image_pull_timeout_seconds),
            start_timeout: (self.start_timeout_seconds > 0)
                .then(|| Duration::from_secs(self.start_timeout_seconds)),
            retention: Duration::from_secs(self.retention_seconds),
            resync: Duration::from_secs(self.resync_seconds.max(1)),
            concurrency: self.concurrency,
            limits,
            pod_policy,
            pod_refusal_retry: Duration::from_secs(self.pod_refusal_retry_seconds),
            lease,
            identity,
            clock: Arc::new(SystemClock),
        }
    }
}

/// State shared by the HTTP handlers.
#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    store: Arc<Mutex<Option<Store<SessionLivedBackend>>>>,
}

fn backends_by_phase(store: &Store<SessionLivedBackend>) -> BTreeMap<Phase, u64> {
    let mut counts = BTreeMap::new();
    for backend in store.state() {
        *counts.entry(backend.phase()).or_insert(0) += 1;
    }
    counts
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    let store = state.store.lock().ok().and_then(|s| s.clone());
    let counts = store.as_ref().map(backends_by_phase).unwrap_or_default();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&counts),
    )
}

/// The HTTP surface: `/metrics` and `/healthz`.
fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Runs the controller until `shutdown` completes: serves `/metrics` and `/healthz` on
/// `listener`, campaigns for the lease (unless disabled) and reconciles while leading.
pub async fn run<L>(
    client: Client,
    listener: L,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    spawner_core::token::check_secret("events secret", &config.events_secret)
        .map_err(Error::Config)?;
    if let Some(lease) = &config.lease {
        lease.check().map_err(Error::Config)?;
    }
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(Mutex::new(None));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let http = {
        let mut stop = stop_rx.clone();
        let app = router(HttpState {
            metrics: metrics.clone(),
            store: store.clone(),
        });
        tokio::spawn(async move {
            let limits = spawner_serve::Limits::default();
            spawner_serve::serve(listener, app, limits, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let (leading_tx, mut leading_rx) = watch::channel(config.lease.is_none());
    let elector = match &config.lease {
        Some(settings) => {
            let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
            let elector = LeaderElector::new(api, settings.clone(), config.clock.clone());
            Some(tokio::spawn(elector.run(
                leading_tx,
                metrics.clone(),
                stop_rx.clone(),
            )))
        }
        None => {
            metrics
                .is_leader
                .store(true, std::sync::atomic::Ordering::Relaxed);
            drop(leading_tx);
            None
        }
    };

    let reporter = EventReporter {
        controller: CONTROLLER_NAME.into(),
        instance: config.identity.clone(),
    };
    let (events, publishing) = EventPublisher::start(client.clone());
    let ctx = Arc::new(Context::new(
        client.clone(),
        config.clone(),
        metrics.clone(),
        reporter,
        events,
    ));

    let mut stop = stop_rx.clone();
    loop {
        // Wait for leadership (or shutdown).
        tokio::select! {
            r = leading_rx.wait_for(|l| *l) => {
                if r.is_err() && config.lease.is_some() {
                    break;
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
        if *stop.borrow() {
            break;
        }
        lead_one_term(&client, &config, &ctx, &store, &leading_rx, &stop_rx).await;
        tracing::info!(identity = %config.identity, "stopped reconciling");
        if *stop.borrow() || config.lease.is_none() {
            break;
        }
    }

    // What the last reconciles queued is posted before the controller ends.
    drop(ctx);
    let _ = tokio::time::timeout(EVENTS_FLUSH, publishing).await;
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    http.await
        .map_err(|e| Error::Serve(std::io::Error::other(e)))
}

/// One term of leadership (the whole run when leader election is off): builds the controller
/// and its child caches, publishes them to `/metrics` and the reconcilers, reconciles — each
/// reconcile fenced by leadership — until leadership is lost or the controller stops, then
/// takes the caches back.
async fn lead_one_term(
    client: &Client,
    config: &ControllerConfig,
    ctx: &Arc<Context>,
    store: &Mutex<Option<Store<SessionLivedBackend>>>,
    leading_rx: &watch::Receiver<bool>,
    stop_rx: &watch::Receiver<bool>,
) {
    tracing::info!(identity = %config.identity, "leading: starting to reconcile");
    let (controller, caches) = build_controller(client, config);
    if let Ok(mut slot) = store.lock() {
        *slot = Some(controller.store());
    }
    if let Ok(mut slot) = ctx.children.lock() {
        *slot = Some(caches);
    }
    let forgetting = tokio::spawn(forget_gone_periodically(ctx.clone(), controller.store()));
    let mut lost = leading_rx.clone();
    let mut stop_inner = stop_rx.clone();
    let lease_enabled = config.lease.is_some();
    // A reconcile in flight when leadership is lost is stopped at once: another replica
    // may already lead, and two must never write at the same time.
    let fence = leading_rx.clone();
    let fenced = move |backend: Arc<SessionLivedBackend>, ctx: Arc<Context>| {
        let mut fence = fence.clone();
        async move {
            if !lease_enabled {
                return reconcile(backend, ctx).await;
            }
            tokio::select! {
                biased;
                _ = fence.wait_for(|l| !*l) => Err(Error::LostLeadership),
                r = reconcile(backend, ctx) => r,
            }
        }
    };
    let stream = controller
        .graceful_shutdown_on(async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l), if lease_enabled => {}
                _ = stop_inner.wait_for(|s| *s) => {}
            }
        })
        .run(fenced, error_policy, ctx.clone());
    stream
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller stream item");
            }
        })
        .await;
    // Awaited, so that its clone of the context is dropped before the Events are flushed.
    forgetting.abort();
    let _ = forgetting.await;
    if let Ok(mut slot) = store.lock() {
        *slot = None;
    }
    if let Ok(mut slot) = ctx.children.lock() {
        *slot = None;
    }
}

/// Every [`FORGET_GONE_EVERY`], drops the per-backend entries of backends no longer in
/// `store`, once it holds its first full list (before, empty would mean "all gone").
async fn forget_gone_periodically(ctx: Arc<Context>, store: Store<SessionLivedBackend>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let mut every = tokio::time::interval(FORGET_GONE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let dropped = ctx.forget_gone(&store);
        if dropped > 0 {
            tracing::debug!(dropped, "forgot backends that are gone");
        }
    }
}

/// The controller of one leadership term, and the caches of children its watches fill.
fn build_controller(
    client: &Client,
    config: &ControllerConfig,
) -> (Controller<SessionLivedBackend>, ChildCaches) {
    let (backends, pods, services): (
        Api<SessionLivedBackend>,
        Api<Pod>,
        Api<PartialObjectMeta<Service>>,
    ) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let children = watcher::Config::default().labels(BACKEND_LABEL);
    // The pod watch keeps whole pods (the reconciler reads their status from the cache); the
    // service watch only metadata (the reconciler only asks whether one exists).
    let (pod_cache, pod_writer) = reflector::store();
    let pod_events = reflector(pod_writer, watcher(pods, children.clone()))
        .default_backoff()
        .touched_objects();
    let (service_cache, service_writer) = reflector::store();
    let service_events = reflector(service_writer, watcher(services, children))
        .default_backoff()
        .touched_objects();
    let controller = Controller::new(backends, watcher::Config::default())
        .owns_stream(pod_events)
        .owns_stream(service_events)
        .with_config(RuntimeConfig::default().concurrency(config.concurrency));
    let caches = ChildCaches {
        pods: pod_cache,
        services: service_cache,
    };
    (controller, caches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn args_parse_into_a_config() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "controller",
            "--events-secret",
            "s3cret",
            "--url-mode",
            "pod-ip",
            "--retention-seconds",
            "7",
            "--lease-namespace",
            "spawner",
        ])
        .expect("parses");
        let config = cli.args.into_config();
        assert_eq!(config.url_mode, UrlMode::PodIp);
        assert_eq!(config.retention, Duration::from_secs(7));
        assert_eq!(config.start_timeout, Some(Duration::from_secs(300)));
        assert_eq!(config.events_secret, b"s3cret");
        assert_eq!(config.limits.reserved_ports, vec![DEFAULT_SIDECAR_PORT]);
        let lease = config.lease.expect("leader election on by default");
        assert_eq!(lease.namespace, "spawner");
        assert!(lease.renew_deadline < lease.lease_duration);
        assert_eq!(lease.check(), Ok(()));
        assert_eq!(config.pod_policy, PodPolicy::default());
        assert!(!config.children.allow_service_account_token);
    }

    #[test]
    fn a_zero_start_timeout_means_none() {
        let cli = Cli::try_parse_from([
            "controller",
            "--events-secret",
            "s3cret",
            "--start-timeout-seconds",
            "0",
        ])
        .expect("parses");
        assert_eq!(cli.args.into_config().start_timeout, None);
    }

    #[test]
    fn two_replicas_without_an_identity_never_share_one() {
        let parse = || {
            Cli::try_parse_from(["controller", "--events-secret", "s3cret"])
                .expect("parses")
                .args
        };
        let (a, b) = (parse(), parse());
        // POD_NAME may be set in the environment the tests run in; only check without it.
        if a.identity.is_none() {
            let (a, b) = (a.into_config(), b.into_config());
            assert_ne!(a.identity, b.identity);
            assert_eq!(
                a.lease.expect("lease").identity,
                a.identity,
                "the lease holder is the replica's identity"
            );
        }
    }

    #[test]
    fn the_pod_policy_is_configured_by_name() {
        let cli = Cli::try_parse_from([
            "controller",
            "--events-secret",
            "s3cret",
            "--backend-pod-allow",
            "host-path,service-account",
        ])
        .expect("parses");
        let config = cli.args.into_config();
        assert_eq!(
            config.pod_policy,
            PodPolicy::allowing([PodAllowance::HostPath, PodAllowance::ServiceAccount])
        );
        assert!(config.children.allow_service_account_token);
        assert!(
            Cli::try_parse_from([
                "controller",
                "--events-secret",
                "s",
                "--backend-pod-allow",
                "root"
            ])
            .is_err()
        );
    }
}
