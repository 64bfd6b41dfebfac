//! The reconciler: level-triggered and idempotent, so running it twice, late, or on a stale
//! copy of the backend is harmless. Every status write carries the resourceVersion it was
//! computed from; a concurrent writer (the sweeper) makes it fail with 409 and it runs again
//! from a fresh read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use spawner_core::children::{BuildError, build_pod, build_service, service_url};
use spawner_core::phase::{Observation, Phase, Transition, run as run_phases};
use spawner_core::policy::{POLICY_VIOLATION_REASON, check_pod_policy};
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend, SessionLivedBackendStatus};
use spawner_core::status::{apply_transition, phase_time, status_patch};
use spawner_core::token::{events_token, token_check};
use spawner_core::transition_event::{EventReporter, transition_event};
use spawner_core::validation::validate_spec;
use spawner_kube_events::EventPublisher;

use crate::metrics::Metrics;
use crate::observe::{
    add, earliest, expects_pod, lifetime_deadline, observe_pod, retention_deadline, start_deadline,
    until,
};
use crate::{ControllerConfig, UrlMode};

pub use spawner_core::resource::TERMINATE_ANNOTATION;

/// Field manager of the controller's writes.
const MANAGER: &str = "spawner-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot build the backend's children: {0}")]
    Build(#[from] BuildError),
    #[error("backend {0} has no namespace")]
    MissingNamespace(String),
    #[error("metrics server failed: {0}")]
    Serve(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("leadership was lost; the reconcile was stopped")]
    LostLeadership,
}

impl Error {
    /// A write lost a race with another writer; retrying from a fresh read is the fix.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.is_conflict())
    }
}

/// The controller's watch caches of the backends' children (kube-runtime reflectors fed by the
/// same watches that trigger reconciles). A reconcile reads a child from here and asks the API
/// server only when the cache cannot answer safely: a pod missing from the cache may just not
/// have arrived yet, so "missing" is always confirmed with a read before it counts.
#[derive(Clone)]
pub struct ChildCaches {
    pub pods: Store<Pod>,
    pub services: Store<PartialObjectMeta<Service>>,
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub metrics: Arc<Metrics>,
    pub reporter: EventReporter,
    /// The queue the transitions' Events are posted from.
    pub events: EventPublisher,
    /// The caches of the current leadership term; `None` reads everything from the API server.
    pub children: Mutex<Option<ChildCaches>>,
    /// What is remembered per backend between reconciles.
    per_backend: PerBackend,
}

/// What the controller remembers per backend uid between its reconciles. kube-runtime calls
/// no reconcile for a backend that is gone, so an entry of a backend deleted by someone else
/// (or while its reconciles failed) would stay for ever: [`PerBackend::forget_gone`], run
/// periodically against the watch cache, drops them.
#[derive(Default)]
pub(crate) struct PerBackend {
    /// Consecutive failures per backend uid, for the error policy's backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Backends whose spawn-to-ready time was recorded, so it is recorded once.
    ready_recorded: Mutex<HashSet<String>>,
    /// When the API server first forbade each backend's pod (by uid), for the bounded retry.
    refused_since: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl PerBackend {
    /// Drops the entries of every uid not in `present()`. The three maps are locked before
    /// `present` is read, so a reconcile that records a new backend (one the cache already
    /// holds: reconciles start from it) cannot fall between the read and the pruning.
    pub(crate) fn forget_gone(&self, present: impl FnOnce() -> HashSet<String>) -> usize {
        let (Ok(mut failures), Ok(mut ready), Ok(mut refused)) = (
            self.failures.lock(),
            self.ready_recorded.lock(),
            self.refused_since.lock(),
        ) else {
            return 0;
        };
        let present = present();
        let before = failures.len() + ready.len() + refused.len();
        failures.retain(|uid, _| present.contains(uid));
        ready.retain(|uid| present.contains(uid));
        refused.retain(|uid, _| present.contains(uid));
        before - (failures.len() + ready.len() + refused.len())
    }

    /// Entries held, all maps together.
    #[cfg(test)]
    fn len(&self) -> usize {
        let count = |n: Option<usize>| n.unwrap_or(0);
        count(self.failures.lock().ok().map(|m| m.len()))
            + count(self.ready_recorded.lock().ok().map(|s| s.len()))
            + count(self.refused_since.lock().ok().map(|m| m.len()))
    }
}

impl Context {
    pub fn new(
        client: Client,
        config: ControllerConfig,
        metrics: Arc<Metrics>,
        reporter: EventReporter,
        events: EventPublisher,
    ) -> Self {
        Self {
            client,
            config,
            metrics,
            reporter,
            events,
            children: Mutex::new(None),
            per_backend: PerBackend::default(),
        }
    }

    /// Drops what is remembered of backends the watch cache no longer holds (see
    /// [`PerBackend`]); how many entries went.
    pub fn forget_gone(
        &self,
        store: &kube::runtime::reflector::Store<SessionLivedBackend>,
    ) -> usize {
        self.per_backend.forget_gone(|| {
            store
                .state()
                .iter()
                .filter_map(|b| b.metadata.uid.clone())
                .collect()
        })
    }
}

/// Backoff after `failures` consecutive errors: 200 ms doubling up to 60 s; a lost write race
/// retries at once.
pub fn backoff(failures: u32, conflict: bool) -> Duration {
    if conflict && failures <= 3 {
        return Duration::from_millis(50);
    }
    let exp = failures.saturating_sub(1).min(9);
    Duration::from_millis(200u64 << exp).min(Duration::from_secs(60))
}

/// kube-runtime's error policy: back off per backend.
pub fn error_policy(backend: Arc<SessionLivedBackend>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = backend.uid().unwrap_or_default();
    let failures = match ctx.per_backend.failures.lock() {
        Ok(mut map) => {
            let n = map.entry(uid).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    if error.is_conflict() {
        tracing::debug!(backend = %backend.name_any(), "status write conflict; retrying");
    } else {
        tracing::warn!(backend = %backend.name_any(), failures, error = %error, "reconcile failed");
    }
    Action::requeue(backoff(failures, error.is_conflict()))
}

/// Reconciles one backend.
pub async fn reconcile(
    backend: Arc<SessionLivedBackend>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = tokio::time::Instant::now();
    ctx.metrics
        .reconciles
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = reconcile_backend(&backend, &ctx).await;
    ctx.metrics.reconcile_duration.observe(started.elapsed());
    match &result {
        Ok(_) => {
            if let (Ok(mut map), Some(uid)) = (ctx.per_backend.failures.lock(), backend.uid()) {
                map.remove(&uid);
            }
        }
        Err(_) => {
            ctx.metrics
                .reconcile_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    result
}

fn is_status(e: &kube::Error, check: fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if check(s))
}

/// Creates `object` unless it exists already; whether it was created.
async fn create_if_absent<K>(api: &Api<K>, object: &K) -> Result<bool, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, object).await {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, kube::core::Status::is_already_exists) => Ok(false),
        Err(e) => Err(e),
    }
}

impl ChildCaches {
    fn pod(&self, name: &str, namespace: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    fn service(&self, name: &str, namespace: &str) -> Option<Arc<PartialObjectMeta<Service>>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    fn has_service(&self, name: &str, namespace: &str) -> bool {
        self.service(name, namespace).is_some()
    }
}

/// The backend's pod. The cache answers when it holds this backend's pod (a later change of it
/// triggers another reconcile) or when no pod is expected yet (creating one then tells if it
/// exists); otherwise the API server does.
async fn current_pod(
    pods: &Api<Pod>,
    caches: Option<&ChildCaches>,
    (name, namespace, uid): (&str, &str, &str),
    phase: Phase,
) -> Result<Option<Pod>, kube::Error> {
    if let Some(caches) = caches {
        match caches.pod(name, namespace) {
            Some(pod) if owned_by(&pod, uid) => return Ok(Some(Pod::clone(&pod))),
            None if !expects_pod(phase) => return Ok(None),
            _ => {}
        }
    }
    pods.get_opt(name).await
}

/// Whether a child may still exist and is not already on its way out. Without a cache, always:
/// deleting what is gone costs a 404.
fn may_need_delete<K: Resource>(cached: Option<Arc<K>>, caches: Option<&ChildCaches>) -> bool {
    match (caches, cached) {
        (None, _) => true,
        (Some(_), Some(child)) => child.meta().deletion_timestamp.is_none(),
        // Not cached: gone, or its creation is still on the way, and its arrival in the cache
        // triggers another reconcile of its owner.
        (Some(_), None) => false,
    }
}

/// Deletes the backend's pod and service unless the caches know them gone or going. Only
/// children this backend owns are deleted, each with its uid as a precondition: a pod or
/// service of the same name that belongs to a newer backend is never touched.
async fn delete_children(
    (pods, services): (&Api<Pod>, &Api<Service>),
    caches: Option<&ChildCaches>,
    (name, namespace, owner): (&str, &str, &str),
) -> Result<(), kube::Error> {
    let cached_pod = caches.and_then(|c| c.pod(name, namespace));
    if may_need_delete(cached_pod.clone(), caches) {
        let pod = match cached_pod {
            Some(pod) => Some(Pod::clone(&pod)),
            None => pods.get_opt(name).await?,
        };
        delete_owned(pods, pod.as_ref().map(|p| &p.metadata), owner).await?;
    }
    let cached_service = caches.and_then(|c| c.service(name, namespace));
    if may_need_delete(cached_service.clone(), caches) {
        let service = match cached_service {
            Some(service) => Some(service.metadata.clone()),
            None => services.get_opt(name).await?.map(|s| s.metadata),
        };
        delete_owned(services, service.as_ref(), owner).await?;
    }
    Ok(())
}

/// Deletes the object `meta` describes if `owner` owns it, on condition that it is still the
/// same object (its uid); gone or replaced meanwhile is fine.
async fn delete_owned<K>(
    api: &Api<K>,
    meta: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    owner: &str,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(meta) = meta else {
        return Ok(());
    };
    let owned = meta
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.uid == owner);
    let (Some(name), true) = (meta.name.as_deref(), owned) else {
        return Ok(());
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: meta.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, kube::core::Status::is_not_found) => Ok(()),
        Err(e) if is_status(&e, kube::core::Status::is_conflict) => Ok(()),
        Err(e) => Err(e),
    }
}

fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.uid == uid)
}

/// Records that the API server forbade `uid`'s pod; whether it has been forbidding it for
/// longer than the configured retry.
fn refusal_outlasted(ctx: &Context, uid: &str) -> bool {
    let now = tokio::time::Instant::now();
    let Ok(mut map) = ctx.per_backend.refused_since.lock() else {
        return true;
    };
    let since = *map.entry(uid.to_string()).or_insert(now);
    if now.duration_since(since) >= ctx.config.pod_refusal_retry {
        map.remove(uid);
        true
    } else {
        false
    }
}

fn forget_refusal(ctx: &Context, uid: &str) {
    if let Ok(mut map) = ctx.per_backend.refused_since.lock() {
        map.remove(uid);
    }
}

/// Everything the reconciler decided about one backend, before writing it.
#[derive(Debug, Default)]
struct Plan {
    observations: Vec<Observation>,
    node: Option<String>,
    pod_ip: Option<String>,
    recheck_at: Vec<Option<Timestamp>>,
}

async fn reconcile_backend(backend: &SessionLivedBackend, ctx: &Context) -> Result<Action, Error> {
    if backend.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children; nothing left to do.
        return Ok(Action::await_change());
    }
    let name = backend.name_any();
    let namespace = backend
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let uid = backend.uid().unwrap_or_default();
    let backends: Api<SessionLivedBackend> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let config = &ctx.config;
    let now = config.clock.now();
    let status = backend.status.clone().unwrap_or_default();
    let phase = status.phase;
    let caches = ctx.children.lock().ok().and_then(|c| c.clone());
    let caches = caches.as_ref();

    if phase.is_terminal() {
        return finish(backend, ctx, (&backends, &pods, &services), caches, now).await;
    }
    record_spawn_to_ready(backend, ctx);

    let mut plan = Plan::default();
    let lifetime = lifetime_deadline(backend);
    if let Err(errors) = validate_spec(&backend.spec, &config.limits) {
        plan.observations.push(Observation::PodUnstartable {
            reason: "InvalidSpec".into(),
            message: errors.to_string(),
        });
    } else if let (Err(refused), true) = (
        check_pod_policy(&backend.spec, &config.pod_policy),
        phase == Phase::Submitted,
    ) {
        // Only before the pod exists: a policy tightened later does not fail running backends.
        plan.observations.push(Observation::PodUnstartable {
            reason: POLICY_VIOLATION_REASON.into(),
            message: refused.to_string(),
        });
    } else if backend.annotations().contains_key(TERMINATE_ANNOTATION) {
        plan.observations.push(Observation::TerminateRequested);
    } else if let (Some(deadline), Some(lifetime_seconds)) =
        (lifetime, backend.spec.max_lifetime_seconds)
        && now >= deadline
    {
        plan.observations
            .push(Observation::LifetimeExceeded { lifetime_seconds });
    } else {
        plan.recheck_at.push(lifetime);
        match current_pod(&pods, caches, (&name, &namespace, &uid), phase).await? {
            Some(pod) if !owned_by(&pod, &uid) => {
                // A pod of an earlier backend with the same name, on its way out.
                tracing::info!(backend = %name, "waiting for a foreign pod of the same name to go");
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Some(pod) => {
                if phase <= Phase::Constructed
                    && !caches.is_some_and(|c| c.has_service(&name, &namespace))
                {
                    create_if_absent(&services, &build_service(backend, &config.children)?).await?;
                }
                plan.observations.push(Observation::ChildrenCreated);
                let app = backend
                    .app_container()
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                let report = observe_pod(&pod, &app, now, config.image_pull_timeout);
                plan.observations.extend(report.observations);
                plan.recheck_at.push(report.recheck_at);
                plan.pod_ip = report.pod_ip;
            }
            None if expects_pod(phase) => plan.observations.push(Observation::PodMissing),
            None => {
                let token = token_check(&events_token(&config.events_secret, &uid));
                if !caches.is_some_and(|c| c.has_service(&name, &namespace)) {
                    create_if_absent(&services, &build_service(backend, &config.children)?).await?;
                }
                match create_if_absent(&pods, &build_pod(backend, &config.children, &token)?).await
                {
                    Ok(true) => {
                        forget_refusal(ctx, &uid);
                        plan.observations.push(Observation::ChildrenCreated)
                    }
                    // A pod of that name exists after all (the cache had not seen it yet).
                    Ok(false) => match pods.get_opt(&name).await? {
                        Some(pod) if owned_by(&pod, &uid) => {
                            plan.observations.push(Observation::ChildrenCreated)
                        }
                        Some(_) => {
                            tracing::info!(backend = %name,
                                "waiting for a foreign pod of the same name to go");
                            return Ok(Action::requeue(Duration::from_secs(1)));
                        }
                        None => return Ok(Action::requeue(Duration::from_millis(100))),
                    },
                    // The API server will never accept this pod: retrying cannot help.
                    Err(kube::Error::Api(s)) if s.is_invalid() => {
                        plan.observations.push(Observation::PodUnstartable {
                            reason: "PodRejected".into(),
                            message: s.message.clone(),
                        })
                    }
                    // Forbidden by admission (Pod Security, a ResourceQuota, a LimitRange):
                    // retried for a while (a quota may free up), then the backend fails with
                    // the API server's reason, so nobody waits on it forever.
                    Err(kube::Error::Api(s)) if s.is_forbidden() => {
                        if !refusal_outlasted(ctx, &uid) {
                            return Err(kube::Error::Api(s).into());
                        }
                        let reason = if s.reason.is_empty() {
                            "Forbidden".to_string()
                        } else {
                            s.reason.clone()
                        };
                        plan.observations.push(Observation::PodUnstartable {
                            reason,
                            message: s.message.clone(),
                        })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    // After the pod's own observations, so a crash or a refusal reported meanwhile wins.
    if let Some(deadline) = start_deadline(&status, config.start_timeout) {
        if now >= deadline {
            plan.observations.push(Observation::StartTimedOut {
                waited_seconds: config.start_timeout.unwrap_or_default().as_secs(),
                port: backend.spec.http_port,
            });
        } else {
            plan.recheck_at.push(Some(deadline));
        }
    }
    plan.node = plan.observations.iter().find_map(|o| match o {
        Observation::PodScheduled { node } => Some(node.clone()),
        _ => None,
    });

    let (new_phase, transitions) = run_phases(phase, &plan.observations);
    let new_status = next_status(backend, &status, &transitions, &plan, config, now);
    if new_status != status {
        let patch = status_patch(backend.resource_version().as_deref(), &new_status);
        backends
            .patch_status(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await?;
        for transition in &transitions {
            ctx.metrics.count_transition(transition.to);
            ctx.events
                .publish(transition_event(backend, transition, &ctx.reporter, now));
            tracing::info!(backend = %name, from = %transition.from, to = %transition.to,
                reason = %transition.reason, "phase transition");
        }
    }
    if let Some(node) = &new_status.node_name
        && backend.labels().get(NODE_LABEL) != Some(node)
    {
        // The sweeper of that node watches backends by this label.
        let patch = json!({"metadata": {"labels": {NODE_LABEL: node}}});
        backends
            .patch(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await?;
    }
    if new_phase.is_terminal() {
        // Stop the pod now rather than on the next reconcile.
        delete_children((&pods, &services), caches, (&name, &namespace, &uid)).await?;
        return Ok(Action::requeue(
            config.retention.max(Duration::from_millis(100)),
        ));
    }
    // A backend that became Running just now: its start deadline counts from this write.
    plan.recheck_at
        .push(start_deadline(&new_status, config.start_timeout));
    let next = earliest(plan.recheck_at)
        .map(|d| until(now, d).max(Duration::from_millis(100)))
        .unwrap_or(config.resync)
        .min(config.resync);
    Ok(Action::requeue(next))
}

/// The status to write: the transitions applied, node and URL recorded, the Submitted
/// condition backfilled from the creation time, and `observedGeneration`.
fn next_status(
    backend: &SessionLivedBackend,
    status: &SessionLivedBackendStatus,
    transitions: &[Transition],
    plan: &Plan,
    config: &ControllerConfig,
    now: Timestamp,
) -> SessionLivedBackendStatus {
    let mut new = status.clone();
    let at = now.to_string();
    if phase_time(&new, Phase::Submitted).is_none() {
        let created = backend
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| at.clone());
        new.conditions.insert(
            0,
            spawner_core::resource::BackendCondition {
                type_: Phase::Submitted.as_str().into(),
                status: "True".into(),
                last_transition_time: created,
                reason: Some("Submitted".into()),
                message: Some("backend accepted".into()),
            },
        );
    }
    for transition in transitions {
        apply_transition(&mut new, transition, &at);
    }
    if new.node_name.is_none() {
        new.node_name = plan.node.clone();
    }
    if new.url.is_none() && !new.phase.is_terminal() {
        new.url = match config.url_mode {
            UrlMode::Service if new.phase >= Phase::Constructed => {
                let ns = backend.namespace().unwrap_or_default();
                Some(service_url(&backend.name_any(), &ns, &config.children))
            }
            UrlMode::PodIp => plan
                .pod_ip
                .as_ref()
                .map(|ip| pod_ip_url(ip, config.children.sidecar_port)),
            UrlMode::Service => None,
        };
    }
    new.observed_generation = backend.metadata.generation.or(new.observed_generation);
    new
}

/// `http://<podIP>:<port>`, with an IPv6 address in brackets.
fn pod_ip_url(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// A finished backend: make sure its pod and service are gone, and delete the backend itself
/// once its retention period has passed.
async fn finish(
    backend: &SessionLivedBackend,
    ctx: &Context,
    (backends, pods, services): (&Api<SessionLivedBackend>, &Api<Pod>, &Api<Service>),
    caches: Option<&ChildCaches>,
    now: Timestamp,
) -> Result<Action, Error> {
    let name = backend.name_any();
    let namespace = backend.namespace().unwrap_or_default();
    let uid = backend.uid().unwrap_or_default();
    delete_children((pods, services), caches, (&name, &namespace, &uid)).await?;
    let deadline = retention_deadline(backend, ctx.config.retention)
        .unwrap_or_else(|| add(now, ctx.config.retention));
    if now < deadline {
        // Never later than one retention period from now: a deadline further away means a
        // clock is off (ours stepped back, or the terminal phase was stamped by a clock ahead),
        // and once it is corrected the backend is due within a period, not after the error.
        return Ok(Action::requeue(
            until(now, deadline)
                .min(ctx.config.retention)
                .max(Duration::from_millis(100)),
        ));
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: backend.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match backends.delete(&name, &params).await {
        Ok(_) => {}
        Err(e) if is_status(&e, kube::core::Status::is_not_found) => {}
        Err(e) if is_status(&e, kube::core::Status::is_conflict) => {}
        Err(e) => return Err(e.into()),
    }
    if let (Ok(mut set), Some(uid)) = (ctx.per_backend.ready_recorded.lock(), backend.uid()) {
        set.remove(&uid);
    }
    tracing::info!(backend = %name, phase = %backend.phase(), "deleted after retention");
    Ok(Action::await_change())
}

fn record_spawn_to_ready(backend: &SessionLivedBackend, ctx: &Context) {
    let Some(status) = backend.status.as_ref() else {
        return;
    };
    let (Some(ready), Some(created), Some(uid)) = (
        phase_time(status, Phase::Ready).and_then(|t| t.parse::<Timestamp>().ok()),
        backend.metadata.creation_timestamp.as_ref(),
        backend.uid(),
    ) else {
        return;
    };
    let Ok(mut set) = ctx.per_backend.ready_recorded.lock() else {
        return;
    };
    if set.insert(uid) {
        ctx.metrics.spawn_to_ready.observe(until(created.0, ready));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend deleted behind the controller's back (no reconcile follows) loses its
    /// entries at the next pruning; a backend still cached keeps them.
    #[test]
    fn a_removed_backends_entries_go() {
        let memory = PerBackend::default();
        for uid in ["kept", "gone"] {
            memory
                .failures
                .lock()
                .expect("lock")
                .insert(uid.to_string(), 3);
            memory
                .ready_recorded
                .lock()
                .expect("lock")
                .insert(uid.to_string());
            memory
                .refused_since
                .lock()
                .expect("lock")
                .insert(uid.to_string(), tokio::time::Instant::now());
        }
        assert_eq!(memory.len(), 6);
        let dropped = memory.forget_gone(|| HashSet::from(["kept".to_string()]));
        assert_eq!(dropped, 3);
        assert_eq!(memory.len(), 3);
        assert_eq!(memory.failures.lock().expect("lock").get("kept"), Some(&3));
        assert!(memory.ready_recorded.lock().expect("lock").contains("kept"));
        assert!(
            memory
                .refused_since
                .lock()
                .expect("lock")
                .contains_key("kept")
        );
        assert_eq!(memory.forget_gone(HashSet::new), 3);
        assert_eq!(memory.len(), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1, false), Duration::from_millis(200));
        assert_eq!(backoff(2, false), Duration::from_millis(400));
        assert_eq!(backoff(50, false), Duration::from_secs(60));
        assert_eq!(backoff(1, true), Duration::from_millis(50));
        assert_eq!(backoff(10, true), Duration::from_secs(60));
    }

    #[test]
    fn pod_ip_urls_bracket_ipv6() {
        assert_eq!(pod_ip_url("10.244.1.7", 9090), "http://10.244.1.7:9090");
        assert_eq!(
            pod_ip_url("fd00:10:244::7", 9090),
            "http://[fd00:10:244::7]:9090"
        );
    }
}
