//! kube-runtime's `watcher`, `reflector` and `Controller` against the server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;

use super::{CheckError, CheckResult, backend, eventually, pod};
use crate::ensure;

const WAIT: Duration = Duration::from_secs(30);

/// Aborts the task when dropped, so a failing check leaves nothing running.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn reflect(pods: Api<Pod>, config: watcher::Config, label: &str) -> CheckResult {
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector(writer, watcher(pods.clone(), config)).applied_objects();
    let _task = AbortOnDrop(tokio::spawn(async move {
        stream.for_each(|_| futures::future::ready(())).await;
    }));
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("{label}-{i}"), json!({"set": label})),
        )
        .await?;
    }
    let count = |n: usize| {
        let reader = reader.clone();
        move || {
            let reader = reader.clone();
            async move {
                let have = reader
                    .state()
                    .iter()
                    .filter(|p| p.labels().get("set").map(String::as_str) == Some(label))
                    .count();
                Ok::<_, CheckError>((have == n).then_some(()))
            }
        }
    };
    eventually("the reflector to see 3 pods", WAIT, count(3)).await?;
    // The watches time out every 2 s; the watcher restarts them from its last version.
    tokio::time::sleep(Duration::from_secs(5)).await;
    pods.create(
        &PostParams::default(),
        &pod(&format!("{label}-late"), json!({"set": label})),
    )
    .await?;
    eventually(
        "the reflector to see a pod created after watch restarts",
        WAIT,
        count(4),
    )
    .await?;
    pods.delete(&format!("{label}-0"), &Default::default())
        .await?;
    eventually("the reflector to drop a deleted pod", WAIT, count(3)).await?;
    let updated = pods
        .patch(
            &format!("{label}-1"),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"seen": "yes"}}})),
        )
        .await?;
    eventually("the reflector to see an update", WAIT, || {
        let reader = reader.clone();
        let rv = updated.resource_version();
        async move {
            let found = reader.state().iter().any(|p| p.resource_version() == rv);
            Ok::<_, CheckError>(found.then_some(()))
        }
    })
    .await
}

pub async fn watcher_and_reflector(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    reflect(
        pods.clone(),
        watcher::Config::default().timeout(2).page_size(2),
        "listed",
    )
    .await?;
    // Streaming lists: `sendInitialEvents` with the initial-events-end bookmark.
    reflect(
        pods,
        watcher::Config::default().timeout(2).streaming_lists(),
        "streamed",
    )
    .await
}

struct Context {
    api: Api<SessionLivedBackend>,
    reconciles: Mutex<HashMap<String, usize>>,
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

async fn reconcile(
    obj: Arc<SessionLivedBackend>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let name = obj.name_any();
    if let Ok(mut counts) = ctx.reconciles.lock() {
        *counts.entry(name.clone()).or_default() += 1;
    }
    let status =
        json!({"status": {"phase": "Constructed", "observedGeneration": obj.metadata.generation}});
    ctx.api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(Action::requeue(Duration::from_millis(300)))
}

fn error_policy(
    _obj: Arc<SessionLivedBackend>,
    _err: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    Action::requeue(Duration::from_millis(500))
}

pub async fn controller_reconciles_and_requeues(client: Client, ns: String) -> CheckResult {
    let api: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let ctx = Arc::new(Context {
        api: api.clone(),
        reconciles: Mutex::new(HashMap::new()),
    });
    let controller = Controller::new(api.clone(), watcher::Config::default().timeout(2)).run(
        reconcile,
        error_policy,
        ctx.clone(),
    );
    let _task = AbortOnDrop(tokio::spawn(async move {
        controller.for_each(|_| futures::future::ready(())).await;
    }));
    let observed = |name: &'static str, generation: i64| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                let b = api.get(name).await?;
                let seen = b.status.as_ref().and_then(|s| s.observed_generation);
                Ok::<_, CheckError>((seen == Some(generation)).then_some(()))
            }
        }
    };
    api.create(&PostParams::default(), &backend("ctl-a"))
        .await?;
    eventually("reconcile after create", WAIT, observed("ctl-a", 1)).await?;
    api.patch(
        "ctl-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"gracePeriodSeconds": 11}})),
    )
    .await?;
    eventually("reconcile after a spec change", WAIT, observed("ctl-a", 2)).await?;
    let count = |ctx: &Context, name: &str| {
        ctx.reconciles
            .lock()
            .map(|c| c.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    };
    let before = count(&ctx, "ctl-a");
    eventually("requeues", WAIT, || {
        let now = count(&ctx, "ctl-a");
        async move { Ok::<_, CheckError>((now >= before + 3).then_some(())) }
    })
    .await?;
    // Past several watch timeouts the controller still sees new objects.
    tokio::time::sleep(Duration::from_secs(5)).await;
    api.create(&PostParams::default(), &backend("ctl-b"))
        .await?;
    eventually("reconcile after watch restarts", WAIT, observed("ctl-b", 1)).await?;
    ensure!(count(&ctx, "ctl-b") >= 1, "ctl-b never reconciled");
    Ok(())
}

pub async fn event_recorder_publishes_and_counts(client: Client, ns: String) -> CheckResult {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event;
    use kube::Resource;
    use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder};

    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), &ns);
    let b = backends
        .create(&PostParams::default(), &backend("recorded"))
        .await?;
    let recorder = Recorder::new(client.clone(), "spawner-conformance".into());
    let event = RecordedEvent {
        type_: EventType::Normal,
        reason: "Constructed".into(),
        note: Some("pod and service created".into()),
        action: "Construct".into(),
        secondary: None,
    };
    let reference = b.object_ref(&());
    recorder.publish(&event, &reference).await?;
    recorder.publish(&event, &reference).await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let list = events.list(&Default::default()).await?;
    ensure!(
        list.items.len() == 1,
        "recorder made {} events, want 1 with a series",
        list.items.len()
    );
    let ev = &list.items[0];
    ensure!(
        ev.reason.as_deref() == Some("Constructed"),
        "reason {:?}",
        ev.reason
    );
    ensure!(
        ev.series.as_ref().map(|s| s.count) == Some(2),
        "series {:?}",
        ev.series
    );
    ensure!(
        ev.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("recorded"),
        "regarding {:?}",
        ev.regarding
    );
    // `kubectl get events` reads core/v1: the same event is there.
    let core: Api<CoreEvent> = Api::namespaced(client, &ns);
    let core_list = core
        .list(&kube::api::ListParams::default().fields("involvedObject.name=recorded"))
        .await?;
    ensure!(
        core_list.items.len() == 1,
        "core/v1 view has {} events",
        core_list.items.len()
    );
    ensure!(
        core_list.items[0].message.as_deref() == Some("pod and service created"),
        "core message {:?}",
        core_list.items[0].message
    );
    Ok(())
}
