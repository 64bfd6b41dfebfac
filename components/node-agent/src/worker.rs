//! The pod worker: one task per pod bound to the agent's nodes, doing what the kubelet does
//! for it. It starts the pod through the runtime, probes readiness, reports status through the
//! status subresource, and on graceful deletion stops the containers (SIGTERM, then SIGKILL
//! after the grace period), reports their final state and deletes the object with
//! `gracePeriodSeconds: 0`, so nothing outlives its pod.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::plan::{self, ReadinessProbe};
use super::runtime::{
    ContainerExit, ContainerStart, PodRuntime, PodSandbox, ProbeTarget, RunningPod,
};
use super::status::{
    Conditions, ContainerRecord, ContainerView, PHASE_RUNNING, PodRecord, is_terminal_phase,
    workload_finished,
};

/// How long a status write may take before the worker moves on (it retries later).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between retries of a failed status write or deletion.
const RETRY: Duration = Duration::from_secs(1);

/// Reason and message the kubelet gives pods it stops because its node shuts down.
pub const REASON_NODE_SHUTDOWN: &str = "Terminated";
pub const MESSAGE_NODE_SHUTDOWN: &str = "Pod was terminated in response to imminent node shutdown.";

/// The latest state of a pod, as the agent's watch sees it.
#[derive(Clone, Debug)]
pub(crate) enum PodUpdate {
    Present(Arc<Pod>),
    Gone,
}

/// What every pod worker shares.
pub(crate) struct WorkerContext<R> {
    pub client: Client,
    pub runtime: Arc<R>,
    pub clock: Arc<dyn Clock>,
    pub host_ip: String,
    /// Cancelled when the agent stops: every pod is stopped.
    pub shutdown: CancellationToken,
    /// Upper bound of a pod's grace period when the agent stops.
    pub shutdown_grace: Duration,
}

/// Writes a pod's status, remembering what it last wrote.
struct Reporter {
    api: Api<Pod>,
    name: String,
    last: Option<serde_json::Value>,
    dirty: bool,
}

impl Reporter {
    async fn report(&mut self, record: &mut PodRecord, clock: &dyn Clock) {
        record.refresh_conditions(clock.now());
        let status = match serde_json::to_value(record.to_status()) {
            Ok(status) => status,
            Err(e) => {
                tracing::error!(pod = %self.name, error = %e, "cannot serialise pod status");
                return;
            }
        };
        if !self.dirty && self.last.as_ref() == Some(&status) {
            return;
        }
        let patch = Patch::Merge(json!({ "status": status }));
        let params = PatchParams::default();
        let write = self.api.patch_status(&self.name, &params, &patch);
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => {
                self.last = Some(status);
                self.dirty = false;
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                self.dirty = false;
            }
            Ok(Err(e)) => {
                tracing::warn!(pod = %self.name, error = %e, "pod status write failed; retrying");
                self.dirty = true;
            }
            Err(_) => {
                tracing::warn!(pod = %self.name, "pod status write timed out; retrying");
                self.dirty = true;
            }
        }
    }
}

/// Delete the pod object now that nothing of it runs, as the kubelet does once a gracefully
/// deleted pod has stopped: `gracePeriodSeconds: 0`, only if it is still the same pod.
async fn delete_now(api: &Api<Pod>, name: &str, uid: &str, shutdown: &CancellationToken) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    for _ in 0..10 {
        match tokio::time::timeout(WRITE_TIMEOUT, api.delete(name, &params)).await {
            Ok(Ok(_)) => return,
            Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => return,
            Ok(Err(e)) => tracing::warn!(pod = %name, error = %e, "pod deletion failed; retrying"),
            Err(_) => tracing::warn!(pod = %name, "pod deletion timed out; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Readiness probing of one container.
struct ProbeState {
    probe: ReadinessProbe,
    next_at: Instant,
    successes: u32,
    failures: u32,
    ready: bool,
}

impl ProbeState {
    fn observe(&mut self, success: bool) {
        if success {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.probe.timing.success_threshold {
                self.ready = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= self.probe.timing.failure_threshold {
                self.ready = false;
            }
        }
    }
}

fn pod_grace(pod: &Pod) -> Duration {
    pod.metadata
        .deletion_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or_else(|| plan::termination_grace(pod))
}

/// Whether containers of this pod ran before this worker existed (an earlier agent started
/// them; their processes died with it).
fn ran_before(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some(PHASE_RUNNING)
        || status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
}

fn container_views(pod: &Pod) -> Vec<ContainerView> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| ContainerView {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            is_sidecar: c.name == spawner_core::children::SIDECAR_CONTAINER_NAME,
            record: ContainerRecord::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
        })
        .collect()
}

/// What ended a running pod's loop.
enum Outcome {
    /// Every container has stopped on its own.
    Finished,
    /// The pod object was deleted gracefully; delete it for good.
    Deleted,
    /// The pod object is gone.
    Gone,
    /// The agent stops.
    Shutdown,
}

/// Run one pod until its object is gone or the agent stops.
pub(crate) async fn run_pod<R: PodRuntime>(
    ctx: Arc<WorkerContext<R>>,
    mut updates: watch::Receiver<PodUpdate>,
) {
    let PodUpdate::Present(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut reporter = Reporter {
        api: api.clone(),
        name: name.clone(),
        last: None,
        dirty: false,
    };
    let now = ctx.clock.now();

    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if is_terminal_phase(phase.as_deref()) {
        wait_for_deletion(&ctx, &mut updates, &mut reporter, None, &name, &uid).await;
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        delete_now(&api, &name, &uid, &ctx.shutdown).await;
        return;
    }

    let mut conditions = Conditions::default();
    let scheduled_at = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    conditions.set("PodScheduled", true, None, None, scheduled_at);
    let mut record = PodRecord {
        containers: container_views(&pod),
        conditions,
        host_ip: ctx.host_ip.clone(),
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        start_time: Some(
            pod.status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0)
                .unwrap_or(now),
        ),
        failure: None,
    };

    if ran_before(&pod) {
        for container in &mut record.containers {
            container.record = ContainerRecord::Terminated {
                id: None,
                exit_code: 137,
                signal: None,
                reason: "ContainerStatusUnknown".into(),
                message: Some(
                    "The container could not be located when the pod was terminated".into(),
                ),
                started_at: None,
                finished_at: now,
            };
        }
        reporter.report(&mut record, ctx.clock.as_ref()).await;
        wait_for_deletion(
            &ctx,
            &mut updates,
            &mut reporter,
            Some(&mut record),
            &name,
            &uid,
        )
        .await;
        return;
    }

    let analysis = match plan::analyse(&pod) {
        Ok(analysis) => analysis,
        Err(error) => {
            tracing::warn!(pod = %format!("{namespace}/{name}"), reason = error.reason, message = %error.message, "pod cannot run");
            for container in &mut record.containers {
                container.record = if Some(&container.name) == error.container.as_ref() {
                    ContainerRecord::Terminated {
                        id: None,
                        exit_code: 128,
                        signal: None,
                        reason: error.reason.into(),
                        message: Some(error.message.clone()),
                        started_at: None,
                        finished_at: now,
                    }
                } else {
                    ContainerRecord::Waiting {
                        reason: "NotStarted".into(),
                        message: Some("the pod failed before its containers started".into()),
                    }
                };
            }
            record.failure = Some((error.reason.into(), error.message));
            reporter.report(&mut record, ctx.clock.as_ref()).await;
            wait_for_deletion(
                &ctx,
                &mut updates,
                &mut reporter,
                Some(&mut record),
                &name,
                &uid,
            )
            .await;
            return;
        }
    };

    let sandbox = match ctx.runtime.create_sandbox(analysis.sandbox_request()).await {
        Ok(sandbox) => sandbox,
        Err(error) => {
            record.failure = Some(("FailedCreatePodSandBox".into(), error.to_string()));
            reporter.report(&mut record, ctx.clock.as_ref()).await;
            wait_for_deletion(
                &ctx,
                &mut updates,
                &mut reporter,
                Some(&mut record),
                &name,
                &uid,
            )
            .await;
            return;
        }
    };
    let pod_ip = sandbox.pod_ip();
    let plan = analysis.plan(pod_ip, sandbox.app_port());
    record.pod_ip = Some(pod_ip.to_string());
    let mut running = ctx.runtime.start(sandbox, plan.containers).await;
    let started_at = ctx.clock.now();
    let mut probes: Vec<Option<ProbeState>> = Vec::with_capacity(plan.readiness.len());
    for (index, start) in running.starts().iter().enumerate() {
        let probe = plan.readiness.get(index).cloned().flatten();
        record.containers[index].record = match start {
            ContainerStart::Running { id } => ContainerRecord::Running {
                id: id.clone(),
                started_at,
                ready: probe.is_none(),
            },
            ContainerStart::Failed { message } => ContainerRecord::Terminated {
                id: None,
                exit_code: 128,
                signal: None,
                reason: "StartError".into(),
                message: Some(message.clone()),
                started_at: None,
                finished_at: started_at,
            },
        };
        probes.push(probe.map(|probe| ProbeState {
            next_at: Instant::now() + probe.timing.initial_delay,
            probe,
            successes: 0,
            failures: 0,
            ready: false,
        }));
    }
    tracing::info!(pod = %format!("{namespace}/{name}"), %pod_ip, "pod started");
    reporter.report(&mut record, ctx.clock.as_ref()).await;

    let grace = analysis.termination_grace;
    let outcome = loop {
        // Like a native sidecar, the sidecar stops once the application has finished.
        if workload_finished(&record.containers) {
            let sidecars: Vec<usize> = record
                .containers
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_sidecar && c.record.is_running())
                .map(|(i, _)| i)
                .collect();
            for index in sidecars {
                running.stop_container(index, grace).await;
            }
            drain_exits(&mut running, &mut record, ctx.clock.as_ref());
            if record.containers.iter().all(|c| c.record.is_terminated()) {
                break Outcome::Finished;
            }
        }
        let next_probe = probes
            .iter()
            .enumerate()
            .filter(|(i, _)| record.containers[*i].record.is_running())
            .filter_map(|(_, p)| p.as_ref().map(|p| p.next_at))
            .min();
        tokio::select! {
            exit = running.next_exit() => match exit {
                Some(exit) => apply_exit(&mut record, exit, ctx.clock.as_ref()),
                None => {
                    // Nothing left running that could still report.
                    for container in &mut record.containers {
                        if container.record.is_running() {
                            container.record = ContainerRecord::exited(&container.record, 137, None, Some("lost".into()), ctx.clock.now());
                        }
                    }
                }
            },
            changed = updates.changed() => {
                if changed.is_err() {
                    // The agent is gone without a word: stop as on shutdown.
                    running.stop_all(grace.min(ctx.shutdown_grace)).await;
                    break Outcome::Shutdown;
                }
                let update = updates.borrow_and_update().clone();
                match update {
                    PodUpdate::Gone => {
                        // Removed without graceful deletion (force delete): still stop gracefully.
                        tracing::info!(pod = %format!("{namespace}/{name}"), "pod removed; stopping it");
                        running.stop_all(grace).await;
                        break Outcome::Gone;
                    }
                    PodUpdate::Present(pod) if pod.metadata.deletion_timestamp.is_some() => {
                        let grace = pod_grace(&pod);
                        tracing::info!(pod = %format!("{namespace}/{name}"), ?grace, "pod deleted; stopping it");
                        running.stop_all(grace).await;
                        break Outcome::Deleted;
                    }
                    PodUpdate::Present(_) => {}
                }
            },
            () = sleep_until_opt(next_probe) => {
                let now = Instant::now();
                for (index, state) in probes.iter_mut().enumerate() {
                    let Some(state) = state else { continue };
                    if state.next_at > now || !record.containers[index].record.is_running() {
                        continue;
                    }
                    let target = match &state.probe.http_path {
                        Some(path) => ProbeTarget::Http { host: pod_ip, port: state.probe.port, path: path.clone(), timeout: state.probe.timing.timeout },
                        None => ProbeTarget::Tcp { host: pod_ip, port: state.probe.port, timeout: state.probe.timing.timeout },
                    };
                    let success = ctx.runtime.probe(target).await;
                    state.observe(success);
                    state.next_at = Instant::now() + state.probe.timing.period;
                    if let ContainerRecord::Running { ready, .. } = &mut record.containers[index].record {
                        *ready = state.ready;
                    }
                }
            },
            () = ctx.shutdown.cancelled() => {
                running.stop_all(grace.min(ctx.shutdown_grace)).await;
                break Outcome::Shutdown;
            },
            () = tokio::time::sleep(RETRY), if reporter.dirty => {},
        }
        reporter.report(&mut record, ctx.clock.as_ref()).await;
    };

    drain_exits(&mut running, &mut record, ctx.clock.as_ref());
    drop(running);
    match outcome {
        Outcome::Finished => {
            tracing::info!(pod = %format!("{namespace}/{name}"), phase = record.phase(), "pod finished");
            reporter.report(&mut record, ctx.clock.as_ref()).await;
            wait_for_deletion(
                &ctx,
                &mut updates,
                &mut reporter,
                Some(&mut record),
                &name,
                &uid,
            )
            .await;
        }
        Outcome::Deleted => {
            reporter.report(&mut record, ctx.clock.as_ref()).await;
            delete_now(&api, &name, &uid, &ctx.shutdown).await;
        }
        Outcome::Gone => {}
        Outcome::Shutdown => {
            record.failure = Some((REASON_NODE_SHUTDOWN.into(), MESSAGE_NODE_SHUTDOWN.into()));
            reporter.report(&mut record, ctx.clock.as_ref()).await;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn apply_exit(record: &mut PodRecord, exit: ContainerExit, clock: &dyn Clock) {
    let Some(container) = record.containers.get_mut(exit.index) else {
        return;
    };
    container.record = ContainerRecord::exited(
        &container.record,
        exit.exit_code,
        exit.signal,
        exit.message,
        clock.now(),
    );
}

/// Record the exits that are already known (after a stop, all of them are).
fn drain_exits<P: RunningPod>(running: &mut P, record: &mut PodRecord, clock: &dyn Clock) {
    while let Some(Some(exit)) = running.next_exit().now_or_never() {
        apply_exit(record, exit, clock);
    }
}

/// A pod whose containers have all stopped: keep its status written, and once it is deleted
/// gracefully, delete it for good.
async fn wait_for_deletion<R: PodRuntime>(
    ctx: &WorkerContext<R>,
    updates: &mut watch::Receiver<PodUpdate>,
    reporter: &mut Reporter,
    mut record: Option<&mut PodRecord>,
    name: &str,
    uid: &str,
) {
    loop {
        let update = updates.borrow_and_update().clone();
        match update {
            PodUpdate::Present(pod) if pod.metadata.deletion_timestamp.is_some() => {
                let api = reporter.api.clone();
                delete_now(&api, name, uid, &ctx.shutdown).await;
                return;
            }
            PodUpdate::Present(_) => {}
            PodUpdate::Gone => return,
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            () = ctx.shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY), if reporter.dirty => {
                if let Some(record) = record.as_deref_mut() {
                    reporter.report(record, ctx.clock.as_ref()).await;
                }
            },
        }
    }
}
