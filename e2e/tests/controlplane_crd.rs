//! The SessionLivedBackend CRD against a real kube-apiserver: installation, defaults, schema
//! validation (422 from the real server), the status subresource, and owner references honoured
//! by the real garbage collector.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use spawner_core::resource::SessionLivedBackend;
use spawner_e2e::controlplane::ControlPlane;

fn slab_resource() -> ApiResource {
    ApiResource::erase::<SessionLivedBackend>(&())
}

fn dynamic_slabs(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &slab_resource())
}

/// A SessionLivedBackend as raw JSON, so the test controls exactly which fields are sent (the
/// typed struct would fill in defaults client-side).
fn slab(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn minimal_spec() -> Value {
    json!({"template": {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}})
}

/// Waits (bounded) until `done` returns true.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn crd_is_established_with_status_subresource() {
    let Some(cp) = ControlPlane::shared_or_skip("crd_is_established_with_status_subresource").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let crd = Api::<CustomResourceDefinition>::all(admin.clone())
        .get("sessionlivedbackends.spawner.dev")
        .await
        .unwrap();
    let conditions = crd.status.unwrap().conditions.unwrap();
    for wanted in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == wanted && c.status == "True"),
            "{wanted} missing in {conditions:?}"
        );
    }
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["slab".to_string()][..])
    );
    // The short name resolves through the real discovery documents.
    let discovery = kube::Discovery::new(admin)
        .filter(&["spawner.dev"])
        .run()
        .await
        .unwrap();
    let (resource, capabilities) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.kind == "SessionLivedBackend")
        .expect("SessionLivedBackend is discoverable");
    assert_eq!(resource.plural, "sessionlivedbackends");
    assert_eq!(capabilities.scope, kube::discovery::Scope::Namespaced);
    // kube names a subresource by its own name (`status`), not `<plural>/status`.
    assert!(
        capabilities
            .subresources
            .iter()
            .any(|(r, _)| r.plural == "status"),
        "{:?}",
        capabilities.subresources
    );
    // kubectl finds the short name with the written kubeconfig.
    if let Ok(output) = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args(["api-resources", "--api-group=spawner.dev", "--no-headers"])
        .output()
    {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("slab"), "kubectl api-resources: {stdout}");
    }
}

#[tokio::test]
async fn valid_backend_is_accepted_with_defaults_applied() {
    let Some(cp) =
        ControlPlane::shared_or_skip("valid_backend_is_accepted_with_defaults_applied").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let namespace = cp.create_namespace("crd-valid").await.unwrap();
    let api = dynamic_slabs(&admin, &namespace);

    let created = api
        .create(&PostParams::default(), &slab("minimal", minimal_spec()))
        .await
        .unwrap();
    // Defaults come from the CRD's structural schema, applied by the server.
    assert_eq!(created.data["spec"]["httpPort"], json!(8080));
    assert_eq!(created.data["spec"]["gracePeriodSeconds"], json!(300));
    assert!(created.data["spec"].get("maxLifetimeSeconds").is_none());
    // Fields the schema does not know inside the template are preserved, not pruned.
    let full = api
        .create(
            &PostParams::default(),
            &slab(
                "full",
                json!({
                    "template": {
                        "metadata": {"labels": {"team": "a"}},
                        "spec": {
                            "containers": [{
                                "name": "app",
                                "image": "example/app:1",
                                "env": [{"name": "MODE", "value": "demo"}],
                                "resources": {"limits": {"memory": "64Mi"}}
                            }],
                            "nodeSelector": {"disk": "ssd"}
                        }
                    },
                    "httpPort": 3000,
                    "gracePeriodSeconds": 30,
                    "maxLifetimeSeconds": 3600,
                    "key": "document-42"
                }),
            ),
        )
        .await
        .unwrap();
    let spec = &full.data["spec"];
    assert_eq!(spec["httpPort"], json!(3000));
    assert_eq!(spec["key"], json!("document-42"));
    assert_eq!(
        spec["template"]["spec"]["nodeSelector"]["disk"],
        json!("ssd")
    );
    assert_eq!(
        spec["template"]["spec"]["containers"][0]["env"][0]["value"],
        json!("demo")
    );

    // The typed resource reads what the server stored.
    let typed: Api<SessionLivedBackend> = Api::namespaced(admin, &namespace);
    let minimal = typed.get("minimal").await.unwrap();
    assert_eq!(minimal.spec.http_port, 8080);
    assert_eq!(minimal.spec.grace_period_seconds, 300);
    assert!(minimal.status.is_none());
    let full = typed.get("full").await.unwrap();
    assert_eq!(full.spec.max_lifetime_seconds, Some(3600));
    assert_eq!(
        typed.list(&Default::default()).await.unwrap().items.len(),
        2
    );
}

/// Creates `spec` and expects the real API server's 422 Invalid naming `field`.
async fn assert_rejected(api: &Api<DynamicObject>, name: &str, spec: Value, field: &str) {
    match api.create(&PostParams::default(), &slab(name, spec)).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{name}: {status:?}");
            assert_eq!(status.reason, "Invalid", "{name}: {status:?}");
            assert!(
                status.message.contains(field),
                "{name}: expected {field} in {:?}",
                status.message
            );
        }
        other => panic!("{name}: expected 422, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_backends_are_rejected_by_the_api_server() {
    let Some(cp) =
        ControlPlane::shared_or_skip("invalid_backends_are_rejected_by_the_api_server").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let namespace = cp.create_namespace("crd-invalid").await.unwrap();
    let api = dynamic_slabs(&admin, &namespace);
    let with = |field: &str, value: Value| {
        let mut spec = minimal_spec();
        spec[field] = value;
        spec
    };

    assert_rejected(
        &api,
        "no-containers",
        json!({"template": {"spec": {"containers": []}}}),
        "spec.template.spec.containers",
    )
    .await;
    assert_rejected(
        &api,
        "no-template",
        json!({"httpPort": 8080}),
        "spec.template",
    )
    .await;
    assert_rejected(
        &api,
        "unnamed-container",
        json!({"template": {"spec": {"containers": [{"image": "x"}]}}}),
        "spec.template.spec.containers[0].name",
    )
    .await;
    assert_rejected(
        &api,
        "port-zero",
        with("httpPort", json!(0)),
        "spec.httpPort",
    )
    .await;
    assert_rejected(
        &api,
        "port-too-big",
        with("httpPort", json!(65536)),
        "spec.httpPort",
    )
    .await;
    assert_rejected(
        &api,
        "port-string",
        with("httpPort", json!("eighty")),
        "spec.httpPort",
    )
    .await;
    assert_rejected(
        &api,
        "grace-zero",
        with("gracePeriodSeconds", json!(0)),
        "spec.gracePeriodSeconds",
    )
    .await;
    assert_rejected(
        &api,
        "grace-fraction",
        with("gracePeriodSeconds", json!(1.5)),
        "spec.gracePeriodSeconds",
    )
    .await;
    assert_rejected(
        &api,
        "lifetime-too-long",
        with("maxLifetimeSeconds", json!(2_592_001)),
        "spec.maxLifetimeSeconds",
    )
    .await;
    assert_rejected(&api, "empty-key", with("key", json!("")), "spec.key").await;
    assert_rejected(
        &api,
        "template-not-object",
        json!({"template": "app:latest"}),
        "spec.template",
    )
    .await;
    assert_rejected(&api, "no-spec-fields", json!({}), "spec.template").await;

    // Nothing invalid was stored.
    assert!(
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn status_subresource_keeps_spec_and_status_apart() {
    let Some(cp) =
        ControlPlane::shared_or_skip("status_subresource_keeps_spec_and_status_apart").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let namespace = cp.create_namespace("crd-status").await.unwrap();
    let api = dynamic_slabs(&admin, &namespace);
    let created = api
        .create(&PostParams::default(), &slab("b", minimal_spec()))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    // Status written through the main resource is ignored.
    let patched = api
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    assert!(patched.data.get("status").is_none(), "{:?}", patched.data);

    // Spec written through /status is ignored, status is stored, generation unchanged.
    let patched = api
        .patch_status(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "spec": {"httpPort": 9999},
                "status": {"phase": "Constructed", "observedGeneration": 1, "conditions": [
                    {"type": "Constructed", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ]}
            })),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["httpPort"], json!(8080));
    assert_eq!(patched.data["status"]["phase"], json!("Constructed"));
    assert_eq!(patched.metadata.generation, Some(1));

    // A spec change bumps the generation and leaves the status alone.
    let patched = api
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gracePeriodSeconds": 60}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(patched.data["status"]["phase"], json!("Constructed"));

    // The status schema is enforced too.
    match api
        .patch_status(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Sleeping"}})),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("status.phase"), "{status:?}");
        }
        other => panic!("expected 422 for an unknown phase, got {other:?}"),
    }
    let typed: Api<SessionLivedBackend> = Api::namespaced(admin, &namespace);
    let stored = typed.get_status("b").await.unwrap();
    assert_eq!(
        stored.status.unwrap().phase,
        spawner_core::phase::Phase::Constructed
    );
}

#[tokio::test]
async fn children_are_garbage_collected_with_their_backend() {
    let Some(cp) =
        ControlPlane::shared_or_skip("children_are_garbage_collected_with_their_backend").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let namespace = cp.create_namespace("crd-gc").await.unwrap();
    let slabs: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), &namespace);
    let backend = slabs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "spawner.dev/v1",
                "kind": "SessionLivedBackend",
                "metadata": {"name": "owner"},
                "spec": minimal_spec(),
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let owner = backend.controller_owner_ref(&()).unwrap();

    // The children the controller creates: a Pod (never scheduled here) and a Service.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(admin.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "owner-pod", "ownerReferences": [owner]},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "owner-svc", "ownerReferences": [owner]},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 9090}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    // An unrelated Pod stays.
    let bystander: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bystander"},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &bystander)
        .await
        .unwrap();

    slabs
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "the garbage collector to delete the owned Pod and Service",
        || {
            let (pods, services) = (pods.clone(), services.clone());
            async move {
                pods.get_opt("owner-pod").await.unwrap().is_none()
                    && services.get_opt("owner-svc").await.unwrap().is_none()
            }
        },
    )
    .await;
    assert!(pods.get_opt("bystander").await.unwrap().is_some());
    assert_eq!(backend.meta().name.as_deref(), Some("owner"));
    assert!(backend.uid().is_some());
}

#[tokio::test]
async fn deleting_a_namespace_removes_its_backends() {
    let Some(cp) = ControlPlane::shared_or_skip("deleting_a_namespace_removes_its_backends").await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let namespace = cp.create_namespace("crd-ns").await.unwrap();
    let api = dynamic_slabs(&admin, &namespace);
    api.create(&PostParams::default(), &slab("doomed", minimal_spec()))
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .unwrap();
    // The namespace controller empties the namespace (including custom resources) before the
    // namespace itself goes away.
    eventually("the namespace controller to remove the namespace", || {
        let namespaces = namespaces.clone();
        let namespace = namespace.clone();
        async move { namespaces.get_opt(&namespace).await.unwrap().is_none() }
    })
    .await;
    let everywhere: Api<DynamicObject> = Api::all_with(admin, &slab_resource());
    let left: Vec<String> = everywhere
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace.as_str()))
        .map(|o| o.name_any())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `with_real_server` hands a check an admin client of the shared control plane.
#[tokio::test]
async fn checks_run_against_the_real_server_through_with_real_server() {
    let version = spawner_e2e::controlplane::with_real_server(
        "checks_run_against_the_real_server_through_with_real_server",
        |client: Client| async move { client.apiserver_version().await.unwrap() },
    )
    .await;
    if let Some(version) = version {
        assert_eq!(
            version.git_version,
            spawner_e2e::controlplane::kubernetes_version()
        );
    }
}
