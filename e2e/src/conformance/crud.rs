//! Create, read, update, patch, delete, selectors and pagination.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;

use super::{CheckError, CheckResult, api_error, backend, pod, rv_number};
use crate::ensure;

pub async fn discovery(client: Client, _ns: String) -> CheckResult {
    let version = client.apiserver_version().await?;
    ensure!(version.major == "1", "major version {}", version.major);
    let groups = client.list_api_groups().await?;
    for g in ["spawner.dev", "coordination.k8s.io", "events.k8s.io"] {
        ensure!(
            groups.groups.iter().any(|x| x.name == g),
            "group {g} not discovered"
        );
    }
    let core = client.list_core_api_resources("v1").await?;
    for r in [
        "pods",
        "pods/status",
        "services",
        "events",
        "namespaces",
        "nodes",
    ] {
        ensure!(
            core.resources.iter().any(|x| x.name == r),
            "core resource {r} missing"
        );
    }
    let gvk = GroupVersionKind::gvk("spawner.dev", "v1", "SessionLivedBackend");
    let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk).await?;
    ensure!(ar.plural == "sessionlivedbackends", "plural {}", ar.plural);
    ensure!(
        caps.subresources
            .iter()
            .any(|(s, _)| s.plural == "sessionlivedbackends/status" || s.plural == "status"),
        "status subresource not discovered: {:?}",
        caps.subresources
            .iter()
            .map(|(s, _)| s.plural.clone())
            .collect::<Vec<_>>()
    );
    Ok(())
}

pub async fn create_get_list(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let created = pods
        .create(&PostParams::default(), &pod("web", json!({"app": "web"})))
        .await?;
    ensure!(created.uid().is_some(), "no uid");
    ensure!(
        created.creation_timestamp().is_some(),
        "no creationTimestamp"
    );
    ensure!(created.resource_version().is_some(), "no resourceVersion");
    ensure!(
        created.namespace().as_deref() == Some(ns.as_str()),
        "namespace not set"
    );
    let phase = created.status.as_ref().and_then(|s| s.phase.clone());
    ensure!(
        phase.as_deref() == Some("Pending"),
        "new pod phase {phase:?}"
    );
    let got = pods.get("web").await?;
    ensure!(got.uid() == created.uid(), "get returned another object");
    let list = pods.list(&ListParams::default()).await?;
    ensure!(
        list.items.iter().any(|p| p.name_any() == "web"),
        "list misses the pod"
    );
    ensure!(
        list.metadata.resource_version.is_some(),
        "list has no resourceVersion"
    );

    let dup = api_error(
        pods.create(&PostParams::default(), &pod("web", json!({})))
            .await,
        "duplicate create",
    )?;
    ensure!(
        dup.code == 409 && dup.reason == "AlreadyExists",
        "duplicate: {dup:?}"
    );
    ensure!(
        dup.message == "pods \"web\" already exists",
        "message {:?}",
        dup.message
    );

    let missing = api_error(pods.get("nope").await, "get missing")?;
    ensure!(
        missing.code == 404 && missing.reason == "NotFound",
        "missing: {missing:?}"
    );
    ensure!(
        missing.message == "pods \"nope\" not found",
        "message {:?}",
        missing.message
    );

    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let missing = api_error(backends.get("x").await, "get missing backend")?;
    ensure!(
        missing.message == "sessionlivedbackends.spawner.dev \"x\" not found",
        "message {:?}",
        missing.message
    );
    let created = backends
        .create(&PostParams::default(), &backend("b1"))
        .await?;
    ensure!(
        created.metadata.generation == Some(1),
        "generation {:?}",
        created.metadata.generation
    );
    let dry = backends
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &backend("dry"),
        )
        .await?;
    ensure!(
        dry.name_any() == "dry",
        "dry run returned {}",
        dry.name_any()
    );
    ensure!(
        backends.get_opt("dry").await?.is_none(),
        "dry run created the object"
    );
    Ok(())
}

pub async fn generate_name(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let mut b = backend("");
    b.metadata.name = None;
    b.metadata.generate_name = Some("gen-".into());
    let one = backends.create(&PostParams::default(), &b).await?;
    let two = backends.create(&PostParams::default(), &b).await?;
    let (n1, n2) = (one.name_any(), two.name_any());
    ensure!(
        n1.starts_with("gen-") && n1.len() == 9,
        "generated name {n1}"
    );
    ensure!(n1 != n2, "two creates generated the same name {n1}");
    ensure!(one.uid() != two.uid(), "same uid twice");
    Ok(())
}

pub async fn resource_version_is_global_and_monotonic(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let a = pods
        .create(&PostParams::default(), &pod("a", json!({})))
        .await?;
    let b = backends
        .create(&PostParams::default(), &backend("b"))
        .await?;
    let c = pods
        .create(&PostParams::default(), &pod("c", json!({})))
        .await?;
    let (ra, rb, rc) = (
        rv_number(a.metadata.resource_version.as_ref())?,
        rv_number(b.metadata.resource_version.as_ref())?,
        rv_number(c.metadata.resource_version.as_ref())?,
    );
    ensure!(
        ra < rb && rb < rc,
        "versions not increasing across types: {ra} {rb} {rc}"
    );
    let list = pods.list(&ListParams::default()).await?;
    let rl = rv_number(list.metadata.resource_version.as_ref())?;
    ensure!(rl >= rc, "list version {rl} older than last write {rc}");
    Ok(())
}

pub async fn update_with_stale_version_conflicts(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let created = backends
        .create(&PostParams::default(), &backend("c1"))
        .await?;
    let mut first = created.clone();
    first.spec.grace_period_seconds = 60;
    let updated = backends
        .replace("c1", &PostParams::default(), &first)
        .await?;
    ensure!(
        updated.spec.grace_period_seconds == 60,
        "update not applied"
    );
    ensure!(
        updated.resource_version() != created.resource_version(),
        "update kept the resourceVersion"
    );
    let mut stale = created.clone();
    stale.spec.grace_period_seconds = 90;
    let err = api_error(
        backends.replace("c1", &PostParams::default(), &stale).await,
        "stale update",
    )?;
    ensure!(
        err.code == 409 && err.reason == "Conflict",
        "stale update: {err:?}"
    );
    ensure!(
        err.message
            == "Operation cannot be fulfilled on sessionlivedbackends.spawner.dev \"c1\": the object has been modified; please apply your changes to the latest version and try again",
        "message {:?}",
        err.message
    );
    // A merge patch carrying a stale resourceVersion is a precondition and conflicts too.
    let patch = json!({"metadata": {"resourceVersion": created.resource_version()}, "spec": {"gracePeriodSeconds": 5}});
    let err = api_error(
        backends
            .patch("c1", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
        "stale patch",
    )?;
    ensure!(
        err.code == 409 && err.reason == "Conflict",
        "stale patch: {err:?}"
    );
    // An update that changes nothing keeps the resourceVersion.
    let again = backends
        .replace("c1", &PostParams::default(), &updated)
        .await?;
    ensure!(
        again.resource_version() == updated.resource_version(),
        "no-op update changed the resourceVersion"
    );
    let missing = api_error(
        backends
            .replace("ghost", &PostParams::default(), &{
                let mut g = updated.clone();
                g.metadata.name = Some("ghost".into());
                g
            })
            .await,
        "update missing",
    )?;
    ensure!(
        missing.code == 404,
        "update of a missing object: {missing:?}"
    );
    Ok(())
}

pub async fn merge_json_and_strategic_patches(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(
        &PostParams::default(),
        &pod("p", json!({"a": "1", "b": "2"})),
    )
    .await?;
    let merged = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": null, "c": "3"}}})),
        )
        .await?;
    let labels = merged.labels();
    ensure!(
        !labels.contains_key("a")
            && labels.get("b").map(String::as_str) == Some("2")
            && labels.get("c").map(String::as_str) == Some("3"),
        "merge patch labels {labels:?}"
    );
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
        {"op": "replace", "path": "/metadata/labels/b", "value": "20"},
        {"op": "test", "path": "/metadata/labels/c", "value": "3"},
    ]))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await?;
    ensure!(
        patched.annotations().get("x").map(String::as_str) == Some("y"),
        "json patch annotation"
    );
    ensure!(
        patched.labels().get("b").map(String::as_str) == Some("20"),
        "json patch replace"
    );
    let strategic = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"d": "4"}}})),
        )
        .await?;
    ensure!(
        strategic.labels().len() == 3,
        "strategic patch labels {:?}",
        strategic.labels()
    );
    let missing = api_error(
        pods.patch("nope", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
        "patch missing",
    )?;
    ensure!(missing.code == 404, "patch missing: {missing:?}");
    Ok(())
}

pub async fn server_side_apply(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let params = PatchParams::apply("conformance");
    let applied = backends
        .patch("ssa", &params, &Patch::Apply(backend("ssa")))
        .await?;
    ensure!(
        applied.spec.grace_period_seconds == 30,
        "apply did not create"
    );
    let mut changed = backend("ssa");
    changed.spec.grace_period_seconds = 45;
    let applied = backends
        .patch("ssa", &params, &Patch::Apply(changed))
        .await?;
    ensure!(
        applied.spec.grace_period_seconds == 45,
        "apply did not update"
    );
    ensure!(
        applied.metadata.generation == Some(2),
        "generation after apply {:?}",
        applied.metadata.generation
    );
    Ok(())
}

pub async fn status_subresource_and_generation(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let mut b = backend("s");
    b.status = Some(
        serde_json::from_value(json!({"phase": "Ready"}))
            .map_err(|e| CheckError::Failed(e.to_string()))?,
    );
    let created = backends.create(&PostParams::default(), &b).await?;
    ensure!(
        created.status.is_none(),
        "status was stored on create: {:?}",
        created.status
    );
    ensure!(
        created.metadata.generation == Some(1),
        "generation {:?}",
        created.metadata.generation
    );

    let s = backends
        .patch_status("s", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Constructed", "observedGeneration": 1}, "spec": {"gracePeriodSeconds": 1}})))
        .await?;
    ensure!(
        s.spec.grace_period_seconds == 30,
        "status patch changed the spec"
    );
    ensure!(
        s.status.as_ref().map(|s| s.observed_generation) == Some(Some(1)),
        "status not written"
    );
    ensure!(
        s.metadata.generation == Some(1),
        "status write bumped generation"
    );

    let spec = backends
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"gracePeriodSeconds": 99}, "status": {"phase": "Failed"}}),
            ),
        )
        .await?;
    ensure!(
        spec.metadata.generation == Some(2),
        "spec change generation {:?}",
        spec.metadata.generation
    );
    let phase = spec.status.as_ref().map(|s| s.phase.to_string());
    ensure!(
        phase.as_deref() == Some("Constructed"),
        "main resource write changed status: {phase:?}"
    );

    let labels = backends
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await?;
    ensure!(
        labels.metadata.generation == Some(2),
        "metadata change bumped generation"
    );

    let mut whole = labels.clone();
    whole.status = Some(
        serde_json::from_value(json!({"phase": "Scheduled"}))
            .map_err(|e| CheckError::Failed(e.to_string()))?,
    );
    let replaced = backends
        .replace_status("s", &PostParams::default(), &whole)
        .await?;
    let phase = replaced.status.as_ref().map(|s| s.phase.to_string());
    ensure!(
        phase.as_deref() == Some("Scheduled"),
        "replace_status: {phase:?}"
    );
    Ok(())
}

pub async fn label_selectors(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    for (name, labels) in [
        ("l1", json!({"app": "web", "tier": "front"})),
        ("l2", json!({"app": "web", "tier": "back"})),
        ("l3", json!({"app": "db"})),
        ("l4", json!({})),
    ] {
        pods.create(&PostParams::default(), &pod(name, labels))
            .await?;
    }
    let cases = [
        ("app=web", vec!["l1", "l2"]),
        ("app==web", vec!["l1", "l2"]),
        ("app!=web", vec!["l3", "l4"]),
        ("app in (db,web)", vec!["l1", "l2", "l3"]),
        ("app notin (web)", vec!["l3", "l4"]),
        ("tier", vec!["l1", "l2"]),
        ("!tier", vec!["l3", "l4"]),
        ("app=web,tier=back", vec!["l2"]),
    ];
    for (selector, want) in cases {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        let mut got: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
        got.sort();
        ensure!(
            got == want,
            "selector {selector:?}: got {got:?}, want {want:?}"
        );
    }
    Ok(())
}

pub async fn field_selectors(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod("f1", json!({})))
        .await?;
    let mut bound = pod("f2", json!({}));
    if let Some(spec) = bound.spec.as_mut() {
        spec.node_name = Some("node-a".into());
    }
    pods.create(&PostParams::default(), &bound).await?;
    let names = |list: kube::core::ObjectList<Pod>| {
        let mut v: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
        v.sort();
        v
    };
    let by_name = names(
        pods.list(&ListParams::default().fields("metadata.name=f1"))
            .await?,
    );
    ensure!(by_name == ["f1"], "metadata.name: {by_name:?}");
    let by_node = names(
        pods.list(&ListParams::default().fields("spec.nodeName=node-a"))
            .await?,
    );
    ensure!(by_node == ["f2"], "spec.nodeName: {by_node:?}");
    let unbound = names(
        pods.list(&ListParams::default().fields("spec.nodeName="))
            .await?,
    );
    ensure!(unbound == ["f1"], "spec.nodeName empty: {unbound:?}");
    let pending = names(
        pods.list(&ListParams::default().fields("status.phase=Pending,metadata.name!=f1"))
            .await?,
    );
    ensure!(pending == ["f2"], "status.phase: {pending:?}");
    let all: Api<Pod> = Api::all(client);
    let in_ns = names(
        all.list(&ListParams::default().fields(&format!("metadata.namespace={ns}")))
            .await?,
    );
    ensure!(in_ns == ["f1", "f2"], "metadata.namespace: {in_ns:?}");
    Ok(())
}

pub async fn pagination(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    for i in 0..7 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("page-{i}"), json!({})),
        )
        .await?;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(3);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = pods.list(&lp).await?;
        pages += 1;
        ensure!(page.items.len() <= 3, "page of {}", page.items.len());
        seen.extend(page.items.iter().map(|p| p.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
        ensure!(pages < 10, "pagination does not end");
    }
    ensure!(pages == 3, "7 items in pages of 3 took {pages} pages");
    seen.sort();
    let want: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    ensure!(seen == want, "paginated list {seen:?}");
    Ok(())
}

pub async fn delete_collection(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    for (name, app) in [("d1", "x"), ("d2", "x"), ("d3", "y")] {
        pods.create(&PostParams::default(), &pod(name, json!({"app": app})))
            .await?;
    }
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=x"),
    )
    .await?;
    let left: Vec<String> = pods
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    ensure!(left == ["d3"], "after delete_collection: {left:?}");
    Ok(())
}

pub async fn leases_and_events(client: Client, ns: String) -> CheckResult {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"},
    }))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    let mut renewed = created.clone();
    if let Some(spec) = renewed.spec.as_mut() {
        spec.holder_identity = Some("b".into());
    }
    let replaced = leases
        .replace("leader", &PostParams::default(), &renewed)
        .await?;
    let holder = replaced.spec.and_then(|s| s.holder_identity);
    ensure!(holder.as_deref() == Some("b"), "lease holder {holder:?}");
    let err = api_error(
        leases
            .replace("leader", &PostParams::default(), &created)
            .await,
        "stale lease",
    )?;
    ensure!(err.code == 409, "stale lease update: {err:?}");

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"name": "ev1"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "spawner.dev/conformance",
        "reportingInstance": "conformance-1",
        "action": "Check",
        "reason": "Checked",
        "type": "Normal",
        "note": "an events.k8s.io event",
        "regarding": {"kind": "Pod", "name": "x", "namespace": ns, "apiVersion": "v1"},
    }))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    events.create(&PostParams::default(), &ev).await?;
    ensure!(
        events.get("ev1").await?.reason.as_deref() == Some("Checked"),
        "event reason"
    );

    let core: Api<CoreEvent> = Api::namespaced(client, &ns);
    let ev: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "ev2"},
        "involvedObject": {"kind": "Pod", "name": "x", "namespace": ns, "apiVersion": "v1"},
        "reason": "Checked", "message": "a core event", "type": "Normal",
        "source": {"component": "conformance"},
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z", "count": 1,
    }))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    core.create(&PostParams::default(), &ev).await?;
    // Both APIs show the same stored events, each in its own representation.
    let as_core = core.get("ev1").await?;
    ensure!(
        as_core.message.as_deref() == Some("an events.k8s.io event")
            && as_core.involved_object.name.as_deref() == Some("x"),
        "events.k8s.io event seen through core/v1: {as_core:?}"
    );
    let as_new = events.get("ev2").await?;
    ensure!(
        as_new.note.as_deref() == Some("a core event")
            && as_new.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("x"),
        "core event seen through events.k8s.io/v1: {as_new:?}"
    );
    let regarding = events
        .list(&ListParams::default().fields("regarding.name=x"))
        .await?;
    ensure!(
        regarding.items.len() == 2,
        "events.k8s.io field selector found {}",
        regarding.items.len()
    );
    let list = core
        .list(&ListParams::default().fields("involvedObject.name=x,reason=Checked"))
        .await?;
    ensure!(
        list.items
            .iter()
            .any(|e| e.metadata.name.as_deref() == Some("ev2")),
        "core event by field selector"
    );
    Ok(())
}

pub async fn pod_binding_and_graceful_deletion(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod("bound", json!({})))
        .await?;
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "bound"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
    });
    let _: serde_json::Value = pods
        .create_subresource("binding", "bound", &PostParams::default(), &binding)
        .await?;
    let got = pods.get("bound").await?;
    let node = got.spec.as_ref().and_then(|s| s.node_name.clone());
    ensure!(
        node.as_deref() == Some("node-1"),
        "binding set nodeName {node:?}"
    );
    let again: Result<serde_json::Value, _> = pods
        .create_subresource("binding", "bound", &PostParams::default(), &binding)
        .await;
    let err = api_error(again, "second binding")?;
    ensure!(err.code == 409, "second binding: {err:?}");
    let moved = api_error(
        pods.patch(
            "bound",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "node-2"}})),
        )
        .await,
        "moving a bound pod",
    )?;
    ensure!(
        moved.code == 422 && moved.reason == "Invalid",
        "spec update of a pod: {moved:?}"
    );

    // A pod on a node terminates gracefully: marked, left for the node to stop.
    pods.delete("bound", &DeleteParams::default()).await?;
    let terminating = pods.get("bound").await?;
    ensure!(
        terminating.metadata.deletion_timestamp.is_some(),
        "no deletionTimestamp"
    );
    ensure!(
        terminating.metadata.deletion_grace_period_seconds == Some(30),
        "grace {:?}",
        terminating.metadata.deletion_grace_period_seconds
    );
    pods.delete("bound", &DeleteParams::default().grace_period(0))
        .await?;
    super::eventually(
        "the pod to go",
        std::time::Duration::from_secs(10),
        || async { Ok(pods.get_opt("bound").await?.is_none().then_some(())) },
    )
    .await?;
    // An unbound pod goes at once.
    pods.create(&PostParams::default(), &pod("loose", json!({})))
        .await?;
    pods.delete("loose", &DeleteParams::default()).await?;
    ensure!(
        pods.get_opt("loose").await?.is_none(),
        "unbound pod still there"
    );
    Ok(())
}

pub async fn delete_responses(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), &ns);
    backends
        .create(&PostParams::default(), &backend("gone"))
        .await?;
    let deleted = backends.delete("gone", &DeleteParams::default()).await?;
    match deleted {
        either::Either::Right(status) => {
            let details = status
                .details
                .clone()
                .ok_or_else(|| CheckError::Failed("delete Status without details".into()))?;
            ensure!(
                details.name == "gone"
                    && details.kind == "sessionlivedbackends"
                    && details.group == "spawner.dev",
                "delete Status details {details:?}"
            );
        }
        either::Either::Left(_) => {
            return Err(CheckError::Failed(
                "custom resource delete returned the object, not a Status".into(),
            ));
        }
    }
    let mut held = backend("held");
    held.metadata.finalizers = Some(vec!["spawner.dev/hold".into()]);
    backends.create(&PostParams::default(), &held).await?;
    match backends.delete("held", &DeleteParams::default()).await? {
        either::Either::Left(b) => ensure!(
            b.metadata.deletion_timestamp.is_some(),
            "pending delete returned no deletionTimestamp"
        ),
        either::Either::Right(s) => {
            return Err(CheckError::Failed(format!(
                "pending delete returned a Status {s:?}"
            )));
        }
    }
    backends
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod("gone", json!({})))
        .await?;
    ensure!(
        pods.delete("gone", &DeleteParams::default())
            .await?
            .is_left(),
        "pod delete returned a Status"
    );
    let missing = super::api_error(
        pods.delete("gone", &DeleteParams::default()).await,
        "delete missing",
    )?;
    ensure!(missing.code == 404, "delete of a missing pod: {missing:?}");
    Ok(())
}

pub async fn strategic_merge_patches(client: Client, ns: String) -> CheckResult {
    use k8s_openapi::api::core::v1::Service;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "smp"},
        "spec": {"ports": [{"name": "a", "port": 80}], "selector": {"app": "x"}},
    }))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    services.create(&PostParams::default(), &svc).await?;
    // Service ports merge by `port`; kubectl's ordering directive is understood.
    let patched = services
        .patch(
            "smp",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {
                "$setElementOrder/ports": [{"port": 80}, {"port": 81}],
                "ports": [{"name": "b", "port": 81}],
            }})),
        )
        .await?;
    let ports: Vec<i32> = patched
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| ps.iter().map(|p| p.port).collect())
        .unwrap_or_default();
    ensure!(
        ports == [80, 81],
        "service ports after strategic merge: {ports:?}"
    );
    // Pod containers merge by `name`: changing one image keeps everything else.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut p = pod("smp", json!({}));
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[0].command = Some(vec!["app".into()]);
    }
    pods.create(&PostParams::default(), &p).await?;
    let patched = pods
        .patch(
            "smp",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "image": "registry.invalid/app:2"}]}})),
        )
        .await?;
    let c = patched
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    ensure!(
        c.len() == 1
            && c[0].image.as_deref() == Some("registry.invalid/app:2")
            && c[0].command.as_deref() == Some(&["app".to_string()][..]),
        "pod containers after strategic merge: {c:?}"
    );
    // Custom resources have no patch strategies: 415.
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    backends
        .create(&PostParams::default(), &backend("smp"))
        .await?;
    let err = api_error(
        backends
            .patch(
                "smp",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"gracePeriodSeconds": 5}})),
            )
            .await,
        "strategic merge patch of a custom resource",
    )?;
    ensure!(
        err.code == 415 && err.reason == "UnsupportedMediaType",
        "strategic merge of a backend: {err:?}"
    );
    Ok(())
}
