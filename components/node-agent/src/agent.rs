//! The agent's main loop: one watch of all pods feeds the scheduler (pending pods → binding to
//! one of the agent's nodes) and the pod workers (pods bound to the agent's nodes).

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Future, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::registration::{self, NodeSettings};
use super::runtime::PodRuntime;
use super::schedule::{self, NodeLoad};
use super::worker::{self, PodUpdate, WorkerContext};
use super::{NodeAgentConfig, NodeAgentError};

/// Pause between retries of scheduling and registration.
const RETRY: Duration = Duration::from_secs(1);

struct Agent<R> {
    client: Client,
    config: NodeAgentConfig,
    nodes: Vec<NodeSettings>,
    ctx: Arc<WorkerContext<R>>,
    /// Every pod the watch has shown, by uid.
    pods: HashMap<String, Arc<Pod>>,
    /// Pods with a running worker.
    workers: HashMap<String, watch::Sender<PodUpdate>>,
    /// Pods whose worker is done while the object still exists (never run twice).
    finished: HashSet<String>,
    /// Uids seen during a re-list, to find pods deleted while the watch was down.
    relist: Option<HashSet<String>>,
    /// Pending pods whose scheduling failed and is retried.
    retry_scheduling: HashSet<String>,
    /// Pods already reported Unschedulable.
    unschedulable: HashSet<String>,
    /// Pods this agent bound, by uid, with their node, until the watch shows the binding (as
    /// kube-scheduler's assume cache): an event written before the binding (another agent's
    /// Unschedulable mark, say) can arrive after it, and must not make the pod look unbound,
    /// or the node would get more pods than its capacity.
    assumed: HashMap<String, String>,
    round_robin: usize,
    /// Pods whose binding request is in flight, by uid, with the node they are bound to: they
    /// count as that node's load, and are not scheduled again meanwhile.
    binding: HashMap<String, String>,
    /// The bindings in flight. Binding is concurrent because one request per pod, one after the
    /// other in the watch loop, was the slowest step of a burst of spawns (docs/node-agent.md).
    bindings: JoinSet<BindOutcome>,
    binding_supported: Arc<AtomicBool>,
    tasks: JoinSet<String>,
}

/// How one binding request ended.
struct BindOutcome {
    uid: String,
    node: String,
    result: Result<(), kube::Error>,
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl<R: PodRuntime> Agent<R> {
    fn is_mine(&self, pod: &Pod) -> bool {
        node_of(pod).is_some_and(|n| self.nodes.iter().any(|s| s.name == n))
    }

    fn apply(&mut self, mut pod: Pod) {
        let uid = uid_of(&pod);
        if node_of(&pod).is_some_and(|n| !n.is_empty()) {
            self.assumed.remove(&uid);
        } else if let (Some(node), Some(spec)) = (self.assumed.get(&uid), pod.spec.as_mut()) {
            // Older than our binding: a pod's node never changes once bound.
            spec.node_name = Some(node.clone());
        }
        let pod = Arc::new(pod);
        self.pods.insert(uid.clone(), pod.clone());
        if !self.is_mine(&pod) {
            return;
        }
        self.retry_scheduling.remove(&uid);
        if let Some(sender) = self.workers.get(&uid) {
            sender.send_replace(PodUpdate::Present(pod));
        } else if !self.finished.contains(&uid) {
            let (sender, receiver) = watch::channel(PodUpdate::Present(pod));
            self.workers.insert(uid.clone(), sender);
            let ctx = self.ctx.clone();
            self.tasks.spawn(async move {
                worker::run_pod(ctx, receiver).await;
                uid
            });
        }
    }

    fn remove(&mut self, uid: &str) {
        self.pods.remove(uid);
        self.assumed.remove(uid);
        self.finished.remove(uid);
        self.retry_scheduling.remove(uid);
        self.unschedulable.remove(uid);
        if let Some(sender) = self.workers.remove(uid) {
            sender.send_replace(PodUpdate::Gone);
        }
    }

    fn worker_done(&mut self, uid: String) {
        self.workers.remove(&uid);
        if self.pods.contains_key(&uid) {
            self.finished.insert(uid);
        }
    }

    fn loads(&self) -> Vec<NodeLoad> {
        self.nodes
            .iter()
            .map(|node| NodeLoad {
                name: node.name.clone(),
                labels: node.all_labels(),
                pods: self
                    .pods
                    .iter()
                    .filter(|(uid, p)| {
                        let on_node = match node_of(p) {
                            Some(bound) => bound == node.name,
                            None => self.binding.get(*uid) == Some(&node.name),
                        };
                        on_node && schedule::counts_as_load(p)
                    })
                    .count()
                    .try_into()
                    .unwrap_or(u32::MAX),
                max_pods: node.max_pods,
            })
            .collect()
    }

    /// Bind `uid` to one of the agent's nodes, as kube-scheduler does: POST to the pod's
    /// `binding` subresource (the API server sets spec.nodeName and PodScheduled). The request
    /// runs as its own task; [`Agent::bound`] takes its outcome.
    fn schedule(&mut self, uid: &str) {
        let Some(policy) = self.config.scheduling else {
            return;
        };
        let Some(pod) = self.pods.get(uid).cloned() else {
            return;
        };
        if !schedule::wants_scheduling(&pod, &self.config.scheduler_name) {
            self.retry_scheduling.remove(uid);
            return;
        }
        if self.binding.contains_key(uid) {
            return;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let loads = self.loads();
        let Some(chosen) = schedule::choose_node(policy, &pod, &loads, &mut self.round_robin)
        else {
            self.retry_scheduling.insert(uid.to_string());
            if self.unschedulable.insert(uid.to_string()) {
                let message = format!(
                    "0/{} nodes are available: no node matches the pod's node selector or has room for it.",
                    loads.len()
                );
                let patch = json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": message,
                    "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(self.ctx.clock.now()),
                }]}});
                tokio::spawn(async move {
                    if let Err(e) = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        tracing::debug!(pod = %name, error = %e, "cannot mark pod unschedulable");
                    }
                });
            }
            return;
        };
        let node = loads[chosen].name.clone();
        self.retry_scheduling.remove(uid);
        self.binding.insert(uid.to_string(), node.clone());
        let supported = self.binding_supported.clone();
        let uid = uid.to_string();
        self.bindings.spawn(async move {
            let result = bind(&api, &name, &uid, &node, &supported).await;
            let pod = format!("{namespace}/{name}");
            match &result {
                Ok(()) => tracing::info!(%pod, %node, "pod scheduled"),
                // Another scheduler bound it first; the watch will show where.
                Err(e) if api_code(e) == Some(409) => {}
                Err(e) => tracing::warn!(%pod, error = %e, "binding failed; retrying"),
            }
            BindOutcome { uid, node, result }
        });
    }

    /// Takes the outcome of a binding request.
    fn bound(&mut self, outcome: BindOutcome) {
        let BindOutcome { uid, node, result } = outcome;
        self.binding.remove(&uid);
        match result {
            Ok(()) => {
                // Count it on its node before the watch shows the binding (unless it already
                // did, or the pod is gone), and keep it there against events older than the
                // binding that may still arrive.
                if let Some(pod) = self.pods.get(&uid).cloned()
                    && node_of(&pod).is_none_or(str::is_empty)
                {
                    self.assumed.insert(uid, node);
                    self.apply((*pod).clone());
                }
            }
            Err(e) if api_code(&e) == Some(409) => {}
            Err(_) => {
                if self.pods.contains_key(&uid) {
                    self.retry_scheduling.insert(uid);
                }
            }
        }
    }

    fn retry_pending(&mut self) {
        let mut pending: Vec<String> = self.retry_scheduling.iter().cloned().collect();
        pending.sort();
        for uid in pending {
            self.schedule(&uid);
        }
    }

    fn handle(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.relist = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(seen) = self.relist.as_mut() {
                    seen.insert(uid_of(&pod));
                }
                self.apply(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.relist.take() {
                    let gone: Vec<String> = self
                        .pods
                        .keys()
                        .filter(|uid| !seen.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.remove(&uid);
                    }
                }
                let mut pending: Vec<(Option<_>, String)> = self
                    .pods
                    .values()
                    .filter(|p| schedule::wants_scheduling(p, &self.config.scheduler_name))
                    .map(|p| {
                        (
                            p.metadata.creation_timestamp.clone().map(|t| t.0),
                            uid_of(p),
                        )
                    })
                    .collect();
                pending.sort();
                for (_, uid) in pending {
                    self.schedule(&uid);
                }
            }
            Event::Apply(pod) => {
                let uid = uid_of(&pod);
                let pending = schedule::wants_scheduling(&pod, &self.config.scheduler_name);
                self.apply(pod);
                if pending && self.relist.is_none() {
                    self.schedule(&uid);
                }
            }
            Event::Delete(pod) => self.remove(&uid_of(&pod)),
        }
    }
}

/// Binds pod `name` (with `uid`) to `node`: through `pods/binding` while the server has it,
/// else by patching `spec.nodeName` (then `supported` turns false for every later binding).
async fn bind(
    api: &Api<Pod>,
    name: &str,
    uid: &str,
    node: &str,
    supported: &AtomicBool,
) -> Result<(), kube::Error> {
    if supported.load(Ordering::Relaxed) {
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if matches!(api_code(&e), Some(404 | 405)) => {
                // Either the pod is gone or the server has no binding subresource.
                let current = api.get_opt(name).await?;
                if current.as_ref().and_then(|p| p.metadata.uid.as_deref()) != Some(uid) {
                    return Err(e);
                }
                if supported.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "the API server has no pods/binding; scheduling by patching spec.nodeName"
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    let patch = json!({"metadata": {"uid": uid}, "spec": {"nodeName": node}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn register_all(
    client: &Client,
    nodes: &[NodeSettings],
    config: &NodeAgentConfig,
    shutdown: &CancellationToken,
) -> Option<Vec<String>> {
    let mut uids = Vec::with_capacity(nodes.len());
    for node in nodes {
        loop {
            match registration::register(client, node, config.clock.now()).await {
                Ok(uid) => {
                    tracing::info!(node = %node.name, "node registered");
                    uids.push(uid);
                    break;
                }
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "node registration failed; retrying")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
    Some(uids)
}

async fn heartbeat(
    client: Client,
    nodes: Vec<(NodeSettings, String)>,
    config: NodeAgentConfig,
    shutdown: CancellationToken,
) {
    let mut lease_tick = tokio::time::interval(config.heartbeat_interval);
    let mut status_tick = tokio::time::interval(config.node_status_interval);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The status was just posted by the registration.
    status_tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = lease_tick.tick() => {
                for (node, uid) in &nodes {
                    if let Err(e) = registration::renew_lease(&client, &node.name, uid, config.lease_duration, config.clock.now()).await {
                        tracing::warn!(node = %node.name, error = %e, "lease renewal failed");
                    }
                }
            }
            _ = status_tick.tick() => {
                for (node, _) in &nodes {
                    if let Err(e) = registration::post_node_status(&client, node, true, "node agent is posting ready status", config.clock.now()).await {
                        tracing::warn!(node = %node.name, error = %e, "node status update failed");
                    }
                }
            }
        }
    }
}

pub(crate) async fn run<R: PodRuntime>(
    client: Client,
    config: NodeAgentConfig,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeAgentError> {
    if config.nodes.is_empty() {
        return Err(NodeAgentError::NoNodes);
    }
    let nodes: Vec<NodeSettings> = config.node_settings();
    let stop = CancellationToken::new();
    let mut shutdown = pin!(shutdown);

    let uids = tokio::select! {
        uids = register_all(&client, &nodes, &config, &stop) => uids,
        () = &mut shutdown => None,
    };
    let Some(uids) = uids else {
        return Ok(());
    };
    let beating = tokio::spawn(heartbeat(
        client.clone(),
        nodes.iter().cloned().zip(uids).collect(),
        config.clone(),
        stop.clone(),
    ));

    let ctx = Arc::new(WorkerContext {
        client: client.clone(),
        runtime,
        clock: config.clock.clone(),
        host_ip: config.host_ip.to_string(),
        shutdown: stop.clone(),
        shutdown_grace: config.shutdown_grace,
    });
    let mut agent = Agent {
        client: client.clone(),
        config: config.clone(),
        nodes: nodes.clone(),
        ctx,
        pods: HashMap::new(),
        workers: HashMap::new(),
        finished: HashSet::new(),
        relist: None,
        retry_scheduling: HashSet::new(),
        unschedulable: HashSet::new(),
        assumed: HashMap::new(),
        round_robin: 0,
        binding: HashMap::new(),
        bindings: JoinSet::new(),
        binding_supported: Arc::new(AtomicBool::new(true)),
        tasks: JoinSet::new(),
    };

    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = pin!(watcher::watcher(pods, watcher::Config::default()).default_backoff());
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => match event {
                Some(Ok(event)) => agent.handle(event),
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; restarting it"),
                None => break,
            },
            Some(done) = agent.tasks.join_next() => match done {
                Ok(uid) => agent.worker_done(uid),
                Err(e) => tracing::error!(error = %e, "pod worker failed"),
            },
            Some(done) = agent.bindings.join_next() => match done {
                Ok(outcome) => agent.bound(outcome),
                Err(e) => tracing::error!(error = %e, "binding task failed"),
            },
            _ = retry.tick(), if !agent.retry_scheduling.is_empty() => agent.retry_pending(),
        }
    }

    tracing::info!("node agent stopping: stopping its pods");
    stop.cancel();
    while let Some(done) = agent.tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "pod worker failed");
        }
    }
    let _ = beating.await;
    for node in &nodes {
        let post = registration::post_node_status(
            &client,
            node,
            false,
            "node agent stopped",
            config.clock.now(),
        );
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), post).await {
            tracing::debug!(node = %node.name, error = %e, "cannot mark node not ready");
        }
    }
    Ok(())
}
