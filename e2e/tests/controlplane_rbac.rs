//! `deploy/rbac/` against the real RBAC authorizer: each component's ServiceAccount gets exactly
//! the verbs its role lists (checked verb by verb with SubjectAccessReviews, and with real
//! requests for samples), and a deliberately wrong Role makes a component operation fail with 403.

use std::collections::BTreeSet;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;
use spawner_e2e::controlplane::{ControlPlane, DEPLOY_RBAC, Identity, SYSTEM_NAMESPACE};
use tokio::sync::OnceCell;

/// The sweeper's role with one verb missing: no `patch` on `sessionlivedbackends/status`.
const WRONG_SWEEPER_ROLE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: sweeper-without-status-patch
rules:
- apiGroups: ["spawner.dev"]
  resources: ["sessionlivedbackends"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
"#;

/// The control plane of this test binary with `deploy/rbac/` applied, exactly as deployed.
async fn control_plane(test: &str) -> Option<&'static ControlPlane> {
    static APPLIED: OnceCell<()> = OnceCell::const_new();
    let cp = ControlPlane::shared_or_skip(test).await?;
    APPLIED
        .get_or_init(|| async {
            let admin = cp.admin_client().await.unwrap();
            for (file, yaml) in DEPLOY_RBAC {
                cp.apply_yaml(&admin, yaml, SYSTEM_NAMESPACE)
                    .await
                    .unwrap_or_else(|e| panic!("applying deploy/rbac/{file}: {e}"));
            }
            for identity in [
                Identity::Controller,
                Identity::Sweeper,
                Identity::Api,
                Identity::Router,
            ] {
                wait_allowed(&admin, identity, "default").await;
            }
        })
        .await;
    Some(cp)
}

/// One permission: `verb` on `group/resource[/subresource]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    verb: &'static str,
}

const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// Everything the matrix probes: our resources, the children, and neighbours nobody should touch.
const RESOURCES: [(&str, &str, &str); 11] = [
    ("spawner.dev", "sessionlivedbackends", ""),
    ("spawner.dev", "sessionlivedbackends", "status"),
    ("", "pods", ""),
    ("", "pods", "status"),
    ("", "pods", "exec"),
    ("", "services", ""),
    ("", "events", ""),
    ("events.k8s.io", "events", ""),
    ("", "secrets", ""),
    ("", "configmaps", ""),
    ("coordination.k8s.io", "leases", ""),
];

/// What each component may do in any namespace, written from the design (not from the YAML):
/// the matrix test compares the real authorizer's answers with this table.
fn expected_grants(identity: Identity) -> BTreeSet<Permission> {
    let grant = |group, resource, subresource, verbs: &[&'static str]| {
        verbs
            .iter()
            .map(move |&verb| Permission {
                group,
                resource,
                subresource,
                verb,
            })
            .collect::<Vec<_>>()
    };
    let rules: Vec<Vec<Permission>> = match identity {
        Identity::Controller => vec![
            // A watch cache of backends: never a `get`.
            grant(
                "spawner.dev",
                "sessionlivedbackends",
                "",
                &["list", "watch", "patch", "delete"],
            ),
            grant("spawner.dev", "sessionlivedbackends", "status", &["patch"]),
            grant(
                "",
                "pods",
                "",
                &["create", "get", "list", "watch", "delete"],
            ),
            grant(
                "",
                "services",
                "",
                &["create", "get", "list", "watch", "delete"],
            ),
            // Posted through spawner-kube-events: create only.
            grant("events.k8s.io", "events", "", &["create"]),
        ],
        Identity::Sweeper => vec![
            grant(
                "spawner.dev",
                "sessionlivedbackends",
                "",
                &["get", "list", "watch"],
            ),
            grant("spawner.dev", "sessionlivedbackends", "status", &["patch"]),
            grant("events.k8s.io", "events", "", &["create"]),
        ],
        // `patch`: terminate sets an annotation with a metadata merge patch; the controller
        // carries it out, so the api never deletes.
        Identity::Api => vec![grant(
            "spawner.dev",
            "sessionlivedbackends",
            "",
            &["create", "get", "list", "watch", "patch"],
        )],
        // A watch cache of backends; it writes nothing.
        Identity::Router => vec![grant(
            "spawner.dev",
            "sessionlivedbackends",
            "",
            &["list", "watch"],
        )],
        _ => vec![],
    };
    rules.into_iter().flatten().collect()
}

async fn allowed(admin: &Client, identity: Identity, namespace: &str, p: Permission) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(identity.username()),
            groups: Some(identity.groups()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                group: Some(p.group.to_string()),
                resource: Some(p.resource.to_string()),
                subresource: Some(p.subresource.to_string()),
                verb: Some(p.verb.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn each_component_gets_its_verbs_and_nothing_more() {
    let Some(cp) = control_plane("each_component_gets_its_verbs_and_nothing_more").await else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let mut mismatches = Vec::new();
    for identity in [
        Identity::Controller,
        Identity::Sweeper,
        Identity::Api,
        Identity::Router,
        Identity::Unprivileged,
    ] {
        let expected = expected_grants(identity);
        // An arbitrary tenant namespace (it need not exist for an access review).
        for namespace in ["tenant-a"] {
            for (group, resource, subresource) in RESOURCES {
                for verb in VERBS {
                    let p = Permission {
                        group,
                        resource,
                        subresource,
                        verb,
                    };
                    let actual = allowed(&admin, identity, namespace, p).await;
                    if actual != expected.contains(&p) {
                        mismatches.push(format!(
                            "{}: {verb} {group}/{resource}/{subresource} in {namespace}: allowed={actual}",
                            identity.name()
                        ));
                    }
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    // Leader election: the controller may take a Lease in its own namespace and nowhere else.
    let lease = |verb| Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        subresource: "",
        verb,
    };
    for verb in ["get", "create", "update"] {
        assert!(allowed(&admin, Identity::Controller, SYSTEM_NAMESPACE, lease(verb)).await);
        assert!(!allowed(&admin, Identity::Controller, "tenant-a", lease(verb)).await);
        assert!(!allowed(&admin, Identity::Sweeper, SYSTEM_NAMESPACE, lease(verb)).await);
    }
    assert!(
        !allowed(
            &admin,
            Identity::Controller,
            SYSTEM_NAMESPACE,
            lease("delete")
        )
        .await
    );
}

fn backend(name: &str) -> SessionLivedBackend {
    serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}},
    }))
    .unwrap()
}

fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            assert_eq!(status.reason, "Forbidden", "{what}: {status:?}");
        }
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn real_requests_follow_the_roles() {
    let Some(cp) = control_plane("real_requests_follow_the_roles").await else {
        return;
    };
    let namespace = cp.create_namespace("rbac-requests").await.unwrap();
    let api = cp.client_for(Identity::Api).await.unwrap();
    let controller = cp.client_for(Identity::Controller).await.unwrap();
    let sweeper = cp.client_for(Identity::Sweeper).await.unwrap();
    let unprivileged = cp.client_for(Identity::Unprivileged).await.unwrap();

    // api: creates and lists backends, may not write their status or touch pods.
    let as_api: Api<SessionLivedBackend> = Api::namespaced(api.clone(), &namespace);
    as_api
        .create(&PostParams::default(), &backend("b1"))
        .await
        .unwrap();
    assert_eq!(
        as_api.list(&Default::default()).await.unwrap().items.len(),
        1
    );
    assert_forbidden(
        "api patches status",
        as_api
            .patch_status(
                "b1",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Ready"}})),
            )
            .await,
    );
    assert_forbidden(
        "api lists pods",
        Api::<Pod>::namespaced(api.clone(), &namespace)
            .list(&Default::default())
            .await,
    );

    // controller: creates the children and moves the phase, may not read secrets.
    let as_controller: Api<SessionLivedBackend> = Api::namespaced(controller.clone(), &namespace);
    let owner = as_api
        .get("b1")
        .await
        .unwrap()
        .controller_owner_ref(&())
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "b1", "ownerReferences": [owner]},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(controller.clone(), &namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "b1", "ownerReferences": [owner]},
        "spec": {"selector": {"spawner.dev/backend": "b1"}, "ports": [{"port": 80, "targetPort": 9090}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(controller.clone(), &namespace)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    as_controller
        .patch_status(
            "b1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Constructed"}})),
        )
        .await
        .unwrap();
    assert_forbidden(
        "controller lists secrets",
        Api::<Secret>::namespaced(controller.clone(), &namespace)
            .list(&Default::default())
            .await,
    );
    assert_forbidden(
        "controller replaces a backend",
        as_controller
            .replace(
                "b1",
                &PostParams::default(),
                &as_api.get("b1").await.unwrap(),
            )
            .await,
    );

    // sweeper: marks the backend Ready, may not delete it or read pods.
    let as_sweeper: Api<SessionLivedBackend> = Api::namespaced(sweeper.clone(), &namespace);
    let swept = as_sweeper
        .patch_status(
            "b1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        swept.status.unwrap().phase,
        spawner_core::phase::Phase::Ready
    );
    assert_forbidden(
        "sweeper deletes a backend",
        as_sweeper.delete("b1", &DeleteParams::default()).await,
    );
    assert_forbidden(
        "sweeper gets a pod",
        Api::<Pod>::namespaced(sweeper.clone(), &namespace)
            .get("b1")
            .await,
    );

    // Nobody bound: nothing.
    assert_forbidden(
        "unprivileged lists backends",
        Api::<SessionLivedBackend>::namespaced(unprivileged, &namespace)
            .list(&Default::default())
            .await,
    );

    // The api never deletes (a terminate is the controller's to carry out); the controller
    // does, and its pod goes with the backend (owner reference).
    assert_forbidden(
        "api deletes a backend",
        as_api.delete("b1", &DeleteParams::default()).await,
    );
    as_controller
        .delete("b1", &DeleteParams::default())
        .await
        .unwrap();
}

/// What the sweeper does to one backend: read it, list and watch, then write the status.
async fn sweep(client: Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
    let slabs: Api<SessionLivedBackend> = Api::namespaced(client, namespace);
    slabs.get(name).await?;
    slabs.list(&Default::default()).await?;
    slabs
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Swept"}})),
        )
        .await?;
    Ok(())
}

async fn bind(admin: &Client, namespace: &str, kind: &str, role: &str) {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("unprivileged-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [{
            "kind": "ServiceAccount",
            "name": Identity::Unprivileged.service_account().unwrap(),
            "namespace": SYSTEM_NAMESPACE
        }]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    wait_allowed(admin, Identity::Unprivileged, namespace).await;
}

/// RBAC is served from informer caches: wait until `identity` may list backends in `namespace`
/// (every component's role grants that) before relying on a binding just written.
async fn wait_allowed(admin: &Client, identity: Identity, namespace: &str) {
    let list_backends = Permission {
        group: "spawner.dev",
        resource: "sessionlivedbackends",
        subresource: "",
        verb: "list",
    };
    for _ in 0..300 {
        if allowed(admin, identity, namespace, list_backends).await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "{} never became allowed to list backends in {namespace}",
        identity.name()
    );
}

#[tokio::test]
async fn a_wrong_role_fails_where_the_right_role_succeeds() {
    let Some(cp) = control_plane("a_wrong_role_fails_where_the_right_role_succeeds").await else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let right = cp.create_namespace("rbac-right").await.unwrap();
    let wrong = cp.create_namespace("rbac-wrong").await.unwrap();
    for namespace in [&right, &wrong] {
        Api::<SessionLivedBackend>::namespaced(admin.clone(), namespace)
            .create(&PostParams::default(), &backend("b"))
            .await
            .unwrap();
    }
    // The same identity, bound to deploy/rbac's sweeper ClusterRole in one namespace and to the
    // fixture Role (missing the status patch) in the other.
    bind(&admin, &right, "ClusterRole", "spawner-sweeper").await;
    cp.apply_yaml(&admin, WRONG_SWEEPER_ROLE, &wrong)
        .await
        .unwrap();
    bind(&admin, &wrong, "Role", "sweeper-without-status-patch").await;

    let client = cp.client_for(Identity::Unprivileged).await.unwrap();
    sweep(client.clone(), &right, "b")
        .await
        .expect("the sweeper's ClusterRole allows sweeping");
    assert_forbidden(
        "sweeping with the wrong Role",
        sweep(client, &wrong, "b").await,
    );

    let stored = Api::<SessionLivedBackend>::namespaced(admin.clone(), &wrong)
        .get("b")
        .await
        .unwrap();
    assert!(
        stored.status.is_none(),
        "the forbidden patch changed nothing"
    );
}

#[tokio::test]
async fn bindings_name_the_component_service_accounts() {
    let Some(cp) = control_plane("bindings_name_the_component_service_accounts").await else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    for (identity, role) in [
        (Identity::Controller, "spawner-controller"),
        (Identity::Sweeper, "spawner-sweeper"),
        (Identity::Api, "spawner-api"),
        (Identity::Router, "spawner-router"),
    ] {
        let binding = Api::<ClusterRoleBinding>::all(admin.clone())
            .get(role)
            .await
            .unwrap();
        assert_eq!(binding.role_ref.name, role);
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1, "{role}: {subjects:?}");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].namespace.as_deref(), Some(SYSTEM_NAMESPACE));
        assert_eq!(Some(subjects[0].name.as_str()), identity.service_account());
        // The ServiceAccount the binding names exists.
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
        let account = accounts.get(&subjects[0].name).await.unwrap();
        assert_eq!(account.name_any(), subjects[0].name);
    }
}

#[tokio::test]
async fn node_agent_can_register_bind_and_report() {
    let Some(cp) = control_plane("node_agent_can_register_bind_and_report").await else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    let agent = cp.client_for(Identity::NodeAgent).await.unwrap();
    let namespace = cp.create_namespace("rbac-node-agent").await.unwrap();
    let node_name = format!("node-{namespace}");

    // Registers its Node and reports it Ready.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(agent.clone());
    let node = serde_json::from_value(json!({"metadata": {"name": node_name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    nodes
        .patch_status(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "AgentReady",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]}})),
        )
        .await
        .unwrap();

    // Binds a pending Pod (created by someone else) to itself and reports it Running.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(agent.clone(), &namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "p"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node_name}
    });
    let _: serde_json::Value = pods
        .create_subresource("binding", "p", &PostParams::default(), &binding)
        .await
        .unwrap();
    let running = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        running.spec.unwrap().node_name.as_deref(),
        Some(node_name.as_str())
    );
    assert_eq!(running.status.unwrap().phase.as_deref(), Some("Running"));

    // It is no admin: Spawner's own resources and Secrets' writes are out of reach.
    assert_forbidden(
        "node agent lists backends",
        Api::<SessionLivedBackend>::namespaced(agent.clone(), &namespace)
            .list(&Default::default())
            .await,
    );
    assert_forbidden(
        "node agent creates a secret",
        Api::<Secret>::namespaced(agent, &namespace)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap(),
            )
            .await,
    );
    Api::<k8s_openapi::api::core::v1::Node>::all(admin)
        .delete(&node_name, &DeleteParams::default())
        .await
        .unwrap();
}
