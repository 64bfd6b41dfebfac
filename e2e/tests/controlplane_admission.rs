//! Admission on the REAL kube-apiserver (Pod Security and ResourceQuota are enabled by
//! default): the controller (its library `run`, as the `controller` ServiceAccount with the
//! roles of `deploy/rbac/`) builds backend pods that pass Pod Security `restricted`, and a pod
//! the API server forbids makes its backend `Failed` with the API server's reason after the
//! bounded retry, instead of leaving it in `Submitted` forever.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ResourceQuota};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use spawner_core::Phase;
use spawner_core::resource::SessionLivedBackend;
use spawner_e2e::controlplane::{ControlPlane, DEPLOY_RBAC, Identity, SYSTEM_NAMESPACE};
use spawner_e2e::scenarios::unique;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const PATIENCE: Duration = Duration::from_secs(90);

/// Runs the controller on `namespace` until the returned sender is dropped or fired.
async fn controller(cp: &ControlPlane, namespace: &str) -> oneshot::Sender<()> {
    let client = cp.client_for(Identity::Controller).await.unwrap();
    let secret = unique("events-secret");
    let args = spawner_assembly::args_of::<spawner_controller::ControllerArgs>(
        "controller",
        &[
            "--namespace",
            namespace,
            "--events-secret",
            &secret,
            "--no-leader-election",
            "--pod-refusal-retry-seconds",
            "2",
            "--identity",
            "admission-controller",
        ],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(spawner_controller::run(
        client,
        listener,
        args.into_config(),
        async move {
            let _ = stopped.await;
        },
    ));
    stop
}

fn backend(name: &str, app: serde_json::Value) -> SessionLivedBackend {
    serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [app]}},
            "gracePeriodSeconds": 30
        }
    }))
    .unwrap()
}

/// Polls the backend until `done` says so.
async fn wait_backend(
    api: &Api<SessionLivedBackend>,
    name: &str,
    what: &str,
    done: impl Fn(&SessionLivedBackend) -> bool,
) -> SessionLivedBackend {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let current = api.get(name).await.unwrap();
        if done(&current) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not {what} after {PATIENCE:?}: {:?}",
            current.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rbac_applied(cp: &ControlPlane, admin: &Client) {
    for (file, yaml) in DEPLOY_RBAC {
        cp.apply_yaml(admin, yaml, SYSTEM_NAMESPACE)
            .await
            .unwrap_or_else(|e| panic!("applying deploy/rbac/{file}: {e}"));
    }
    // Bindings take a moment to count: wait until the controller may list backends.
    let controller = cp.client_for(Identity::Controller).await.unwrap();
    let backends: Api<SessionLivedBackend> = Api::all(controller);
    let deadline = Instant::now() + Duration::from_secs(30);
    while backends.list(&Default::default()).await.is_err() {
        assert!(Instant::now() < deadline, "controller never authorized");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pod_security_restricted_and_quota_refusals_end_in_failed_with_the_servers_reason() {
    let Some(cp) = ControlPlane::shared_or_skip(
        "pod_security_restricted_and_quota_refusals_end_in_failed_with_the_servers_reason",
    )
    .await
    else {
        return;
    };
    let admin = cp.admin_client().await.unwrap();
    rbac_applied(cp, &admin).await;

    // A namespace under Pod Security `restricted`, as deploy/base labels spawner-backends.
    let restricted = cp.create_namespace("psa").await.unwrap();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            &restricted,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"
            }}})),
        )
        .await
        .unwrap();
    // A namespace whose ResourceQuota admits no pod. Its status is written here, as the quota
    // controller (not run by this control plane) would.
    let quota_ns = cp.create_namespace("quota").await.unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), &quota_ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}}
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    quotas
        .patch_status(
            "no-pods",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"hard": {"pods": "0"}, "used": {"pods": "0"}}})),
        )
        .await
        .unwrap();

    let _psa_controller = controller(cp, &restricted).await;
    let _quota_controller = controller(cp, &quota_ns).await;

    // An ordinary template: the pod the controller builds passes `restricted` as it is.
    let in_psa: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), &restricted);
    in_psa
        .create(
            &PostParams::default(),
            &backend("slab-plain", json!({"name": "app", "image": "acme/app:1"})),
        )
        .await
        .unwrap();
    wait_backend(&in_psa, "slab-plain", "Constructed", |b| {
        b.phase() == Phase::Constructed
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &restricted);
    assert!(pods.get_opt("slab-plain").await.unwrap().is_some());

    // A template that asks for root: Pod Security forbids its pod.
    in_psa
        .create(
            &PostParams::default(),
            &backend(
                "slab-root",
                json!({"name": "app", "image": "acme/app:1",
                    "securityContext": {"runAsNonRoot": false, "runAsUser": 0}}),
            ),
        )
        .await
        .unwrap();
    let failed = wait_backend(&in_psa, "slab-root", "Failed", |b| {
        b.phase() == Phase::Failed
    })
    .await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Forbidden"), "{status:?}");
    let message = status.message.unwrap_or_default();
    assert!(message.contains("PodSecurity"), "{message}");

    // The quota forbids every pod.
    let in_quota: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), &quota_ns);
    in_quota
        .create(
            &PostParams::default(),
            &backend("slab-quota", json!({"name": "app", "image": "acme/app:1"})),
        )
        .await
        .unwrap();
    let failed = wait_backend(&in_quota, "slab-quota", "Failed", |b| {
        b.phase() == Phase::Failed
    })
    .await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Forbidden"), "{status:?}");
    let message = status.message.unwrap_or_default();
    assert!(message.contains("exceeded quota"), "{message}");
}
