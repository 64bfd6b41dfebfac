//! The pod worker: one task per pod bound to the agent's nodes, doing what the kubelet does
//! for it. It starts the pod through the runtime, probes readiness, reports status through the
//! status subresource, and on graceful deletion stops the containers (SIGTERM, then SIGKILL
//! after the grace period), reports their final state and deletes the object with
//! `gracePeriodSeconds: 0`, so nothing outlives its pod.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
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

/// One pod's worker: what each step of its life needs.
struct Worker<R> {
    ctx: Arc<WorkerContext<R>>,
    updates: watch::Receiver<PodUpdate>,
    reporter: Reporter,
    api: Api<Pod>,
    name: String,
    uid: String,
    /// `namespace/name`, for logs.
    label: String,
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
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut worker = Worker {
        reporter: Reporter {
            api: api.clone(),
            name: name.clone(),
            last: None,
            dirty: false,
        },
        api,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        label: format!("{namespace}/{name}"),
        name,
        ctx,
        updates,
    };
    let now = worker.ctx.clock.now();

    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if is_terminal_phase(phase.as_deref()) {
        worker.wait_for_deletion(None).await;
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        worker.delete_now().await;
        return;
    }
    let mut record = initial_record(&pod, &worker.ctx.host_ip, now);
    if ran_before(&pod) {
        lost_with_an_earlier_agent(&mut record, now);
        return worker.report_and_wait(record).await;
    }
    let analysis = match plan::analyse(&pod) {
        Ok(analysis) => analysis,
        Err(error) => {
            tracing::warn!(pod = %worker.label, reason = error.reason, message = %error.message, "pod cannot run");
            cannot_run(&mut record, error, now);
            return worker.report_and_wait(record).await;
        }
    };
    let sandbox = match worker
        .ctx
        .runtime
        .create_sandbox(analysis.sandbox_request())
        .await
    {
        Ok(sandbox) => sandbox,
        Err(error) => {
            record.failure = Some(("FailedCreatePodSandBox".into(), error.to_string()));
            return worker.report_and_wait(record).await;
        }
    };
    worker.run(sandbox, &analysis, record).await;
}

/// The status of a pod this worker is about to run: scheduled, its containers waiting.
fn initial_record(pod: &Pod, host_ip: &str, now: Timestamp) -> PodRecord {
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
    PodRecord {
        containers: container_views(pod),
        conditions,
        host_ip: host_ip.to_string(),
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        start_time: Some(
            pod.status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0)
                .unwrap_or(now),
        ),
        failure: None,
    }
}

/// Containers an earlier agent ran: their processes died with it, as the kubelet reports them.
fn lost_with_an_earlier_agent(record: &mut PodRecord, now: Timestamp) {
    for container in &mut record.containers {
        container.record = ContainerRecord::Terminated {
            id: None,
            exit_code: 137,
            signal: None,
            reason: "ContainerStatusUnknown".into(),
            message: Some("The container could not be located when the pod was terminated".into()),
            started_at: None,
            finished_at: now,
        };
    }
}

/// A pod that cannot run here: the container at fault terminated, the others never started.
fn cannot_run(record: &mut PodRecord, error: plan::PlanError, now: Timestamp) {
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
}

/// Each container's status once started, and its readiness probe state.
fn started(
    starts: &[ContainerStart],
    readiness: &[Option<ReadinessProbe>],
    record: &mut PodRecord,
    started_at: Timestamp,
) -> Vec<Option<ProbeState>> {
    let mut probes = Vec::with_capacity(readiness.len());
    for (index, start) in starts.iter().enumerate() {
        let probe = readiness.get(index).cloned().flatten();
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
    probes
}

impl<R: PodRuntime> Worker<R> {
    async fn report(&mut self, record: &mut PodRecord) {
        self.reporter.report(record, self.ctx.clock.as_ref()).await;
    }

    /// Nothing of the pod runs (any more): report it and wait for its deletion.
    async fn report_and_wait(mut self, mut record: PodRecord) {
        self.report(&mut record).await;
        self.wait_for_deletion(Some(&mut record)).await;
    }

    async fn wait_for_deletion(&mut self, record: Option<&mut PodRecord>) {
        wait_for_deletion(
            &self.ctx,
            &mut self.updates,
            &mut self.reporter,
            record,
            &self.name,
            &self.uid,
        )
        .await;
    }

    async fn delete_now(&self) {
        delete_now(&self.api, &self.name, &self.uid, &self.ctx.shutdown).await;
    }

    /// Start the pod in `sandbox`, supervise it until it ends, and conclude.
    async fn run(
        mut self,
        sandbox: R::Sandbox,
        analysis: &plan::PodAnalysis,
        mut record: PodRecord,
    ) {
        let pod_ip = sandbox.pod_ip();
        let plan = analysis.plan(pod_ip, sandbox.app_port());
        record.pod_ip = Some(pod_ip.to_string());
        let mut running = self.ctx.runtime.start(sandbox, plan.containers).await;
        let started_at = self.ctx.clock.now();
        let mut probes = started(running.starts(), &plan.readiness, &mut record, started_at);
        tracing::info!(pod = %self.label, %pod_ip, "pod started");
        self.report(&mut record).await;

        let grace = analysis.termination_grace;
        let outcome = self
            .supervise(&mut running, &mut record, &mut probes, grace, pod_ip)
            .await;
        drain_exits(&mut running, &mut record, self.ctx.clock.as_ref());
        drop(running);
        match outcome {
            Outcome::Finished => {
                tracing::info!(pod = %self.label, phase = record.phase(), "pod finished");
                self.report_and_wait(record).await;
            }
            Outcome::Deleted => {
                self.report(&mut record).await;
                self.delete_now().await;
            }
            Outcome::Gone => {}
            Outcome::Shutdown => {
                record.failure = Some((REASON_NODE_SHUTDOWN.into(), MESSAGE_NODE_SHUTDOWN.into()));
                self.report(&mut record).await;
            }
        }
    }

    /// Follow the running pod (exits, probes, its object) until it ends, reporting each change.
    async fn supervise(
        &mut self,
        running: &mut R::Pod,
        record: &mut PodRecord,
        probes: &mut [Option<ProbeState>],
        grace: Duration,
        pod_ip: std::net::IpAddr,
    ) -> Outcome {
        let clock = self.ctx.clock.clone();
        loop {
            if self.workload_done(running, record, grace).await {
                return Outcome::Finished;
            }
            let next_probe = probes
                .iter()
                .enumerate()
                .filter(|(i, _)| record.containers[*i].record.is_running())
                .filter_map(|(_, p)| p.as_ref().map(|p| p.next_at))
                .min();
            tokio::select! {
                exit = running.next_exit() => match exit {
                    Some(exit) => apply_exit(record, exit, clock.as_ref()),
                    None => {
                        // Nothing left running that could still report.
                        for container in &mut record.containers {
                            if container.record.is_running() {
                                container.record = ContainerRecord::exited(&container.record, 137, None, Some("lost".into()), clock.now());
                            }
                        }
                    }
                },
                changed = self.updates.changed() => {
                    if let Some(outcome) = self.on_update(changed.is_ok(), running, grace).await {
                        return outcome;
                    }
                },
                () = sleep_until_opt(next_probe) => {
                    probe_due(self.ctx.runtime.as_ref(), probes, record, pod_ip).await;
                },
                () = self.ctx.shutdown.cancelled() => {
                    running.stop_all(grace.min(self.ctx.shutdown_grace)).await;
                    return Outcome::Shutdown;
                },
                () = tokio::time::sleep(RETRY), if self.reporter.dirty => {},
            }
            self.report(record).await;
        }
    }

    /// Like a native sidecar, the sidecar stops once the application has finished. Whether
    /// every container has stopped.
    async fn workload_done(
        &self,
        running: &mut R::Pod,
        record: &mut PodRecord,
        grace: Duration,
    ) -> bool {
        if !workload_finished(&record.containers) {
            return false;
        }
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
        drain_exits(running, record, self.ctx.clock.as_ref());
        record.containers.iter().all(|c| c.record.is_terminated())
    }

    /// The pod object changed (or the agent's watch is gone): whether that ends the pod.
    async fn on_update(
        &mut self,
        watched: bool,
        running: &mut R::Pod,
        grace: Duration,
    ) -> Option<Outcome> {
        if !watched {
            // The agent is gone without a word: stop as on shutdown.
            running.stop_all(grace.min(self.ctx.shutdown_grace)).await;
            return Some(Outcome::Shutdown);
        }
        let update = self.updates.borrow_and_update().clone();
        match update {
            PodUpdate::Gone => {
                // Removed without graceful deletion (force delete): still stop gracefully.
                tracing::info!(pod = %self.label, "pod removed; stopping it");
                running.stop_all(grace).await;
                Some(Outcome::Gone)
            }
            PodUpdate::Present(pod) if pod.metadata.deletion_timestamp.is_some() => {
                let grace = pod_grace(&pod);
                tracing::info!(pod = %self.label, ?grace, "pod deleted; stopping it");
                running.stop_all(grace).await;
                Some(Outcome::Deleted)
            }
            PodUpdate::Present(_) => None,
        }
    }
}

/// Run the readiness probes that are due and record what they found.
async fn probe_due<R: PodRuntime>(
    runtime: &R,
    probes: &mut [Option<ProbeState>],
    record: &mut PodRecord,
    pod_ip: std::net::IpAddr,
) {
    let now = Instant::now();
    for (index, state) in probes.iter_mut().enumerate() {
        let Some(state) = state else { continue };
        if state.next_at > now || !record.containers[index].record.is_running() {
            continue;
        }
        let (port, timeout) = (state.probe.port, state.probe.timing.timeout);
        let target = match &state.probe.http_path {
            Some(path) => ProbeTarget::Http {
                host: pod_ip,
                port,
                path: path.clone(),
                timeout,
            },
            None => ProbeTarget::Tcp {
                host: pod_ip,
                port,
                timeout,
            },
        };
        let success = runtime.probe(target).await;
        state.observe(success);
        state.next_at = Instant::now() + state.probe.timing.period;
        if let ContainerRecord::Running { ready, .. } = &mut record.containers[index].record {
            *ready = state.ready;
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
