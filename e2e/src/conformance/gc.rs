//! Finalizers, owner-reference garbage collection and namespace deletion.
//!
//! On a real cluster these need kube-controller-manager (the garbage collector and the
//! namespace controller); localcluster does both itself.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use spawner_core::children::{ChildrenConfig, build_pod, build_service};
use spawner_core::resource::SessionLivedBackend;

use super::{CheckError, CheckResult, backend, eventually, pod};
use crate::ensure;

const GC_WAIT: Duration = Duration::from_secs(60);

pub async fn finalizers_hold_deletion(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let mut b = backend("fin");
    b.metadata.finalizers = Some(vec!["spawner.dev/cleanup".into()]);
    backends.create(&PostParams::default(), &b).await?;
    let deleted = backends.delete("fin", &DeleteParams::default()).await?;
    ensure!(
        deleted.is_left(),
        "deletion with a finalizer returned a Status"
    );
    let held = backends.get("fin").await?;
    ensure!(
        held.metadata.deletion_timestamp.is_some(),
        "no deletionTimestamp while finalizing"
    );
    ensure!(
        held.metadata.generation == Some(2),
        "deletion generation {:?}",
        held.metadata.generation
    );
    // Adding a finalizer to an object being deleted is refused.
    let add = backends
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["spawner.dev/cleanup", "other/x"]}})),
        )
        .await;
    let err = super::api_error(add, "adding a finalizer while deleting")?;
    ensure!(
        err.code == 422,
        "adding a finalizer while deleting: {err:?}"
    );
    // Other writes still work while the finalizer holds the object.
    backends
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"still": "here"}}})),
        )
        .await?;
    backends
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    eventually(
        "the finalized backend to go",
        Duration::from_secs(10),
        || async { Ok(backends.get_opt("fin").await?.is_none().then_some(())) },
    )
    .await
}

async fn backend_with_children(client: &Client, ns: &str, name: &str) -> Result<(), CheckError> {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), ns);
    let created = backends
        .create(&PostParams::default(), &backend(name))
        .await?;
    let config = ChildrenConfig::default();
    let child =
        build_pod(&created, &config, "token").map_err(|e| CheckError::Failed(e.to_string()))?;
    let svc = build_service(&created, &config).map_err(|e| CheckError::Failed(e.to_string()))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &child)
        .await?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    Ok(())
}

pub async fn owned_pods_and_services_are_collected(client: Client, ns: String) -> CheckResult {
    backend_with_children(&client, &ns, "owner").await?;
    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    // A pod with an extra, live owner survives losing one of its owners.
    let other = backends
        .create(&PostParams::default(), &backend("other"))
        .await?;
    let owner = backends.get("owner").await?;
    let mut shared = pod("shared", json!({}));
    shared.metadata.owner_references = Some(vec![
        owner
            .controller_owner_ref(&())
            .ok_or_else(|| CheckError::Failed("no owner ref".into()))?,
        other
            .controller_owner_ref(&())
            .map(|mut r| {
                r.controller = Some(false);
                r
            })
            .ok_or_else(|| CheckError::Failed("no owner ref".into()))?,
    ]);
    pods.create(&PostParams::default(), &shared).await?;

    backends.delete("owner", &DeleteParams::default()).await?;
    eventually(
        "the owned pod and service to be collected",
        GC_WAIT,
        || async {
            let pod_gone = pods.get_opt("owner").await?.is_none();
            let svc_gone = services.get_opt("owner").await?.is_none();
            Ok((pod_gone && svc_gone).then_some(()))
        },
    )
    .await?;
    let survivor = eventually("the shared pod to drop its dead owner", GC_WAIT, || async {
        let p = pods.get("shared").await?;
        Ok((p.owner_references().len() == 1).then_some(p))
    })
    .await?;
    ensure!(
        survivor.owner_references()[0].name == "other",
        "kept the wrong owner"
    );
    Ok(())
}

pub async fn foreground_and_orphan_propagation(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);

    backend_with_children(&client, &ns, "orphaner").await?;
    backends.delete("orphaner", &DeleteParams::orphan()).await?;
    eventually("the orphaning owner to go", GC_WAIT, || async {
        Ok(backends.get_opt("orphaner").await?.is_none().then_some(()))
    })
    .await?;
    let orphan = pods.get("orphaner").await?;
    ensure!(
        orphan.owner_references().is_empty(),
        "orphan keeps owner refs {:?}",
        orphan.owner_references()
    );
    ensure!(
        services.get_opt("orphaner").await?.is_some(),
        "orphaned service deleted"
    );

    // Foreground: the owner stays (with the foregroundDeletion finalizer) until its
    // dependents are gone; a finalizer on a dependent keeps the owner waiting.
    backend_with_children(&client, &ns, "fg").await?;
    // Only dependents whose reference has blockOwnerDeletion hold a foreground owner.
    let block: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/ownerReferences/0/blockOwnerDeletion", "value": true},
        {"op": "add", "path": "/metadata/finalizers", "value": ["spawner.dev/hold"]},
    ]))
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    pods.patch("fg", &PatchParams::default(), &Patch::Json::<()>(block))
        .await?;
    backends.delete("fg", &DeleteParams::foreground()).await?;
    let waiting = backends.get("fg").await?;
    ensure!(
        waiting.metadata.deletion_timestamp.is_some(),
        "foreground owner not marked"
    );
    ensure!(
        waiting
            .finalizers()
            .iter()
            .any(|f| f == "foregroundDeletion"),
        "no foregroundDeletion finalizer: {:?}",
        waiting.finalizers()
    );
    eventually(
        "the held dependent to be marked for deletion",
        GC_WAIT,
        || async {
            Ok(pods
                .get("fg")
                .await?
                .metadata
                .deletion_timestamp
                .is_some()
                .then_some(()))
        },
    )
    .await?;
    ensure!(
        backends.get_opt("fg").await?.is_some(),
        "owner went before its dependents"
    );
    pods.patch(
        "fg",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    eventually(
        "the foreground owner to go after its dependents",
        GC_WAIT,
        || async {
            let owner_gone = backends.get_opt("fg").await?.is_none();
            let pod_gone = pods.get_opt("fg").await?.is_none();
            let svc_gone = services.get_opt("fg").await?.is_none();
            Ok((owner_gone && pod_gone && svc_gone).then_some(()))
        },
    )
    .await
}

pub async fn namespace_deletion_removes_content(client: Client, ns: String) -> CheckResult {
    let inner = format!("{ns}-x");
    super::create_namespace(&client, &inner).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &inner);
    pods.create(&PostParams::default(), &pod("inside", json!({})))
        .await?;
    let created = namespaces.get(&inner).await?;
    let phase = created.status.as_ref().and_then(|s| s.phase.clone());
    ensure!(
        phase.as_deref() == Some("Active"),
        "namespace phase {phase:?}"
    );
    ensure!(
        created.labels().get("kubernetes.io/metadata.name") == Some(&inner),
        "namespace name label missing"
    );
    namespaces.delete(&inner, &DeleteParams::default()).await?;
    let terminating = namespaces.get_opt(&inner).await?;
    if let Some(t) = terminating {
        let phase = t.status.as_ref().and_then(|s| s.phase.clone());
        ensure!(
            phase.as_deref() == Some("Terminating"),
            "deleting namespace phase {phase:?}"
        );
        let refused = pods
            .create(&PostParams::default(), &pod("late", json!({})))
            .await;
        if let Err(kube::Error::Api(s)) = &refused {
            ensure!(
                s.code == 403 || s.code == 404,
                "create in terminating namespace: {s:?}"
            );
        }
    }
    eventually(
        "the namespace and its pod to go",
        Duration::from_secs(120),
        || async { Ok(namespaces.get_opt(&inner).await?.is_none().then_some(())) },
    )
    .await?;
    let err = super::api_error(pods.get("inside").await, "pod in deleted namespace")?;
    ensure!(err.code == 404, "pod of deleted namespace: {err:?}");
    let names: Vec<String> = namespaces
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    ensure!(!names.contains(&inner), "namespace still listed");
    Ok(())
}
