//! API conformance suite: the Kubernetes API semantics Spawner relies on, checked with kube-rs
//! `Api<K>` against any cluster (localcluster in CI, a real kube-apiserver when
//! `SPAWNER_CONFORMANCE_KUBECONFIG` is set).
//!
//! Every check is a `pub async fn(Client, String) -> CheckResult` that works inside the
//! namespace it is given, which [`run_check`] creates fresh and deletes afterwards.

pub mod bad_input;
pub mod crud;
pub mod gc;
pub mod runtime;
pub mod watch;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Failed(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

pub type CheckResult = Result<(), CheckError>;

/// Fails the check with a message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::conformance::CheckError::Failed(format!($($msg)+)));
        }
    };
}

type CheckFn = fn(Client, String) -> Pin<Box<dyn Future<Output = CheckResult> + Send>>;

/// One named check.
pub struct Check {
    pub name: &'static str,
    pub run: CheckFn,
}

macro_rules! checks {
    ($($path:path),* $(,)?) => {
        vec![$(Check {
            name: stringify!($path),
            run: |client, ns| Box::pin($path(client, ns)),
        }),*]
    };
}

/// Every check of the suite.
pub fn all() -> Vec<Check> {
    checks![
        crud::discovery,
        crud::create_get_list,
        crud::generate_name,
        crud::resource_version_is_global_and_monotonic,
        crud::update_with_stale_version_conflicts,
        crud::merge_json_and_strategic_patches,
        crud::strategic_merge_patches,
        crud::server_side_apply,
        crud::status_subresource_and_generation,
        crud::label_selectors,
        crud::field_selectors,
        crud::pagination,
        crud::delete_collection,
        crud::delete_responses,
        crud::leases_and_events,
        crud::pod_binding_and_graceful_deletion,
        gc::finalizers_hold_deletion,
        gc::owned_pods_and_services_are_collected,
        gc::foreground_and_orphan_propagation,
        gc::namespace_deletion_removes_content,
        watch::watch_sees_every_change_in_order,
        watch::watch_resumes_after_disconnect,
        watch::watch_too_old_version_is_gone_then_relist,
        watch::watch_selector_transitions,
        watch::watch_timeout_and_bookmarks,
        bad_input::malformed_json_is_bad_request,
        bad_input::unknown_resource_is_not_found,
        bad_input::invalid_names_are_invalid,
        bad_input::oversized_objects_are_too_large,
        bad_input::bad_selectors_are_bad_requests,
        bad_input::missing_namespace_is_not_found,
        bad_input::custom_resource_schema_prunes_defaults_and_validates,
        runtime::watcher_and_reflector,
        runtime::controller_reconciles_and_requeues,
        runtime::event_recorder_publishes_and_counts,
    ]
}

/// Creates `namespace`, runs the check in it, then deletes the namespace (best effort).
pub async fn run_check(client: &Client, check: &Check, namespace: &str) -> CheckResult {
    create_namespace(client, namespace).await?;
    let result = (check.run)(client.clone(), namespace.to_string()).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
    result
}

/// Creates a namespace and waits until pods can be created in it (a real cluster needs its
/// `default` service account first; localcluster has no service accounts).
pub async fn create_namespace(client: &Client, name: &str) -> CheckResult {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))
        .map_err(|e| CheckError::Failed(e.to_string()))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match accounts.get("default").await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 && !s.message.contains("serviceaccounts") => {
                return Ok(());
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Polls `probe` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<T, CheckError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, CheckError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CheckError::Timeout(what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API error of a result that should have failed.
pub fn api_error<T: std::fmt::Debug>(
    r: Result<T, kube::Error>,
    what: &str,
) -> Result<kube::core::Status, CheckError> {
    match r {
        Err(kube::Error::Api(s)) => Ok(*s),
        Err(e) => Err(CheckError::Failed(format!(
            "{what}: expected an API error, got {e}"
        ))),
        Ok(v) => Err(CheckError::Failed(format!(
            "{what}: expected an API error, got success {v:?}"
        ))),
    }
}

/// A pod with one container and the given labels (never run: no node is assigned).
pub fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }))
    .unwrap_or_default()
}

/// A SessionLivedBackend with a one-container template.
pub fn backend(name: &str) -> SessionLivedBackend {
    serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "command": ["app"]}]}},
            "httpPort": 8080,
            "gracePeriodSeconds": 30,
        },
    }))
    .expect("a valid backend literal")
}

/// Parses a resourceVersion as the integer both servers use.
pub fn rv_number(rv: Option<&String>) -> Result<u64, CheckError> {
    rv.and_then(|r| r.parse().ok())
        .ok_or_else(|| CheckError::Failed(format!("resourceVersion {rv:?} is not a number")))
}
