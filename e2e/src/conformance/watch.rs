//! Watches: ordering, resumption from a resourceVersion, 410 Gone, selectors, timeouts and
//! bookmarks.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;

use super::{CheckError, CheckResult, backend, pod};
use crate::ensure;

/// A compact rendering of an event: `ADDED name`, `BOOKMARK`, `ERROR 410`.
fn describe<K: ResourceExt>(ev: &WatchEvent<K>) -> String {
    match ev {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        WatchEvent::Bookmark(_) => "BOOKMARK".into(),
        WatchEvent::Error(s) => format!("ERROR {}", s.code),
    }
}

/// Reads events (skipping bookmarks) until `n` were seen or `timeout` passes.
async fn take_events<K, S>(
    stream: &mut S,
    n: usize,
    timeout: Duration,
) -> Result<Vec<WatchEvent<K>>, CheckError>
where
    K: ResourceExt,
    S: Stream<Item = Result<WatchEvent<K>, kube::Error>> + Unpin,
{
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                return Err(CheckError::Timeout(format!(
                    "{n} watch events, got {:?}",
                    out.iter().map(describe).collect::<Vec<_>>()
                )));
            }
            Ok(None) => return Err(CheckError::Failed("watch ended early".into())),
            Ok(Some(ev)) => {
                let ev = ev?;
                if !matches!(ev, WatchEvent::Bookmark(_)) {
                    out.push(ev);
                }
            }
        }
    }
    Ok(out)
}

fn rv_of<K: ResourceExt>(ev: &WatchEvent<K>) -> Option<String> {
    match ev {
        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
            o.resource_version()
        }
        WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
        WatchEvent::Error(_) => None,
    }
}

pub async fn watch_sees_every_change_in_order(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let start = backends.list(&ListParams::default()).await?;
    let rv = start.metadata.resource_version.unwrap_or_default();
    let mut stream = backends
        .watch(&WatchParams::default().timeout(30), &rv)
        .await?
        .boxed();
    backends
        .create(&PostParams::default(), &backend("w1"))
        .await?;
    backends
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gracePeriodSeconds": 7}})),
        )
        .await?;
    backends
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Constructed"}})),
        )
        .await?;
    backends.delete("w1", &Default::default()).await?;
    let events = take_events(&mut stream, 4, Duration::from_secs(20)).await?;
    let seen: Vec<String> = events.iter().map(describe).collect();
    ensure!(
        seen == ["ADDED w1", "MODIFIED w1", "MODIFIED w1", "DELETED w1"],
        "events {seen:?}"
    );
    let rvs: Vec<u64> = events
        .iter()
        .filter_map(rv_of)
        .filter_map(|r| r.parse().ok())
        .collect();
    ensure!(
        rvs.windows(2).all(|w| w[0] < w[1]),
        "event versions not increasing: {rvs:?}"
    );
    if let WatchEvent::Modified(b) = &events[2] {
        ensure!(b.status.is_some(), "status change not in the event");
    }
    Ok(())
}

pub async fn watch_resumes_after_disconnect(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let rv = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(30), &rv)
        .await?
        .boxed();
    pods.create(&PostParams::default(), &pod("r1", json!({})))
        .await?;
    let first = take_events(&mut stream, 1, Duration::from_secs(20)).await?;
    let last_rv =
        rv_of(&first[0]).ok_or_else(|| CheckError::Failed("event without version".into()))?;
    drop(stream);
    // Changes while disconnected are delivered on resumption, and nothing before them.
    pods.create(&PostParams::default(), &pod("r2", json!({})))
        .await?;
    pods.patch(
        "r1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await?;
    pods.delete("r2", &Default::default()).await?;
    let mut resumed = pods
        .watch(&WatchParams::default().timeout(30), &last_rv)
        .await?
        .boxed();
    // Deleting a pod first records its deletionTimestamp (MODIFIED), then removes it.
    let events = take_events(&mut resumed, 4, Duration::from_secs(20)).await?;
    let seen: Vec<String> = events.iter().map(describe).collect();
    ensure!(
        seen == ["ADDED r2", "MODIFIED r1", "MODIFIED r2", "DELETED r2"],
        "resumed events {seen:?}"
    );
    // Without a version, a watch starts with the current objects as ADDED.
    let mut fresh = pods
        .watch(&WatchParams::default().timeout(30), "0")
        .await?
        .boxed();
    let initial = take_events(&mut fresh, 1, Duration::from_secs(20)).await?;
    ensure!(
        describe(&initial[0]) == "ADDED r1",
        "initial event {}",
        describe(&initial[0])
    );
    Ok(())
}

/// A watch from a version the server no longer retains is answered with 410 Gone; a client
/// recovers by listing again and watching from the list's version. Neither server has
/// necessarily compacted anything yet (kube-apiserver compacts etcd every 5 minutes,
/// localcluster when its bounded history overflows or `Cluster::compact` is called), so a
/// watch from version 1 either gets 410 or replays the history from the start; both are
/// checked. The localcluster tests force compaction to check the 410 path itself.
pub async fn watch_too_old_version_is_gone_then_relist(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod("old", json!({})))
        .await?;
    match pods.watch(&WatchParams::default().timeout(10), "1").await {
        Err(kube::Error::Api(s)) => ensure!(s.code == 410, "watch from version 1: {s:?}"),
        Err(e) => return Err(e.into()),
        Ok(stream) => {
            // Replays cover every namespace's history: look for this namespace's pod.
            let mut stream = stream.boxed();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(WatchEvent::Error(s)))) => {
                        ensure!(
                            s.code == 410 && s.reason == "Expired",
                            "watch from version 1: {s:?}"
                        );
                        break;
                    }
                    Ok(Some(Ok(WatchEvent::Added(p)))) if p.name_any() == "old" => break,
                    Ok(Some(Ok(_))) => continue,
                    other => {
                        return Err(CheckError::Failed(format!(
                            "watch from version 1: expected 410 or a replay, got {:?}",
                            other.map(|o| o.map(|e| e.map(|e| describe(&e))))
                        )));
                    }
                }
            }
        }
    }
    let list = pods.list(&ListParams::default()).await?;
    ensure!(list.items.len() == 1, "re-list found {}", list.items.len());
    let rv = list.metadata.resource_version.unwrap_or_default();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(30), &rv)
        .await?
        .boxed();
    pods.create(&PostParams::default(), &pod("new", json!({})))
        .await?;
    let events = take_events(&mut stream, 1, Duration::from_secs(20)).await?;
    ensure!(
        describe(&events[0]) == "ADDED new",
        "after re-list: {}",
        describe(&events[0])
    );
    Ok(())
}

pub async fn watch_selector_transitions(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let rv = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=sel").timeout(30), &rv)
        .await?
        .boxed();
    pods.create(&PostParams::default(), &pod("t1", json!({"app": "other"})))
        .await?;
    pods.patch(
        "t1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "sel"}}})),
    )
    .await?;
    pods.patch(
        "t1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await?;
    pods.patch(
        "t1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "gone"}}})),
    )
    .await?;
    pods.create(&PostParams::default(), &pod("t2", json!({"app": "sel"})))
        .await?;
    let events = take_events(&mut stream, 4, Duration::from_secs(20)).await?;
    let seen: Vec<String> = events.iter().map(describe).collect();
    ensure!(
        seen == ["ADDED t1", "MODIFIED t1", "DELETED t1", "ADDED t2"],
        "selector transitions {seen:?}"
    );
    Ok(())
}

pub async fn watch_timeout_and_bookmarks(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let rv = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let started = tokio::time::Instant::now();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await?
        .boxed();
    let mut bookmarks = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Err(_) => {
                return Err(CheckError::Failed(
                    "watch with timeoutSeconds=5 still open after 30 s".into(),
                ));
            }
            Ok(None) => break,
            Ok(Some(ev)) => {
                if let WatchEvent::Bookmark(b) = ev? {
                    bookmarks.push(b.metadata.resource_version.clone());
                }
            }
        }
    }
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_secs(4),
        "watch ended after {took:?}, before its timeout"
    );
    ensure!(
        !bookmarks.is_empty(),
        "no bookmark during a 5 s watch that asked for them"
    );
    for b in &bookmarks {
        let n: u64 = b
            .parse()
            .map_err(|_| CheckError::Failed(format!("bookmark version {b:?}")))?;
        ensure!(
            n >= rv.parse::<u64>().unwrap_or(0),
            "bookmark {n} older than the watch start {rv}"
        );
    }
    Ok(())
}
