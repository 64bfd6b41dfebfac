//! The `SessionLivedBackend` custom resource (`spawner.dev/v1`, short name `slab`).

use std::borrow::Cow;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::phase::Phase;

/// API group of every Spawner resource.
pub const GROUP: &str = "spawner.dev";
/// Label carried by a backend's Pod and Service and used as the Service selector.
pub const BACKEND_LABEL: &str = "spawner.dev/backend";
/// Label set on a backend once it is scheduled, so each node's sweeper watches only its own.
pub const NODE_LABEL: &str = "spawner.dev/node";
/// Label carrying the get-or-create key (hashed when it is not a valid label value).
pub const KEY_LABEL: &str = "spawner.dev/key";

/// Annotation by which the api asks the controller to terminate a backend (RFC 3339 time of
/// the first request). The controller observes it as `Observation::TerminateRequested`.
pub const TERMINATE_ANNOTATION: &str = "spawner.dev/terminate-requested";

/// Annotation (value `"true"`) of a backend that the router lets in without a connect token
/// (the api sets it for `public: true`).
pub const PUBLIC_ANNOTATION: &str = "spawner.dev/public";

/// Whether the router lets anyone into `backend`, token or not.
pub fn is_public(backend: &SessionLivedBackend) -> bool {
    backend
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PUBLIC_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Default port the application listens on.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Default time a backend may stay without any connection before it is swept.
pub const DEFAULT_GRACE_PERIOD_SECONDS: u32 = 300;

/// One session-lived backend: a dedicated HTTP/WebSocket server for one session.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "spawner.dev",
    version = "v1",
    kind = "SessionLivedBackend",
    plural = "sessionlivedbackends",
    singular = "sessionlivedbackend",
    shortname = "slab",
    namespaced,
    status = "SessionLivedBackendStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SessionLivedBackendSpec {
    /// Pod template of the application. The first container is the application.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,
    /// Port the application listens on; also given to it as `PORT`.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: u16,
    /// How long the backend may stay without any connection before it is swept.
    #[serde(default = "default_grace_period_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub grace_period_seconds: u32,
    /// Hard deadline from creation, whatever the activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub max_lifetime_seconds: Option<u32>,
    /// A user-level name: at most one live backend per key (get-or-create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

fn default_http_port() -> u16 {
    DEFAULT_HTTP_PORT
}

fn default_grace_period_seconds() -> u32 {
    DEFAULT_GRACE_PERIOD_SECONDS
}

/// The API server checks the parts of the template Spawner relies on (at least one named
/// container); the rest of the PodSpec is passed through unchanged and checked by the Pod API
/// when the controller creates the Pod. Embedding the whole PodSpec schema would make the CRD
/// hundreds of kilobytes for no gain.
fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "Pod template of the application; the first container is the application.",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": true,
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1, "maxLength": 63},
                                "image": {"type": "string"},
                                "command": {"type": "array", "items": {"type": "string"}},
                                "args": {"type": "array", "items": {"type": "string"}}
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Observed state of a backend, written by the controller and the sweeper on the status
/// subresource with merge patches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionLivedBackendStatus {
    /// Lifecycle phase; only moves forward.
    #[serde(default)]
    pub phase: Phase,
    /// Node the backend's pod was scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// In-cluster URL of the backend's sidecar (through its Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Machine-readable reason of the last transition (always set on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation of the last transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Exit code of the application container when it terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One condition per phase reached, with the time it was reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<BackendCondition>,
}

/// A phase reached by a backend, with its time: `type` is the phase name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// Always `"True"`: a phase once reached stays reached.
    pub status: String,
    /// RFC 3339 time the phase was reached.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl SessionLivedBackend {
    /// Current phase, `Submitted` when no status was written yet.
    pub fn phase(&self) -> Phase {
        self.status.as_ref().map(|s| s.phase).unwrap_or_default()
    }

    /// The application container (the first container of the template), if any.
    pub fn app_container(&self) -> Option<&k8s_openapi::api::core::v1::Container> {
        self.spec.template.spec.as_ref()?.containers.first()
    }
}

/// The CustomResourceDefinition as YAML, exactly what `spawner crd` prints and `deploy/crd.yaml`
/// holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let crd = SessionLivedBackend::crd();
    let yaml = serde_yaml::to_string(&crd)?;
    Ok(format!(
        "# Generated by `spawner crd`; do not edit by hand.\n{}",
        yaml
    ))
}

/// Name of the CRD (`sessionlivedbackends.spawner.dev`).
pub fn crd_name() -> Cow<'static, str> {
    Cow::Owned(format!("sessionlivedbackends.{GROUP}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_fields_are_missing() {
        let spec: SessionLivedBackendSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "nginx"}]}}
        }))
        .expect("minimal spec parses");
        assert_eq!(spec.http_port, DEFAULT_HTTP_PORT);
        assert_eq!(spec.grace_period_seconds, DEFAULT_GRACE_PERIOD_SECONDS);
        assert_eq!(spec.max_lifetime_seconds, None);
        assert_eq!(spec.key, None);
    }

    #[test]
    fn crd_has_status_subresource_short_name_and_columns() {
        use kube::CustomResourceExt;
        let crd = SessionLivedBackend::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("sessionlivedbackends.spawner.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["slab".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Phase", "Node", "Key", "Age"]);
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = SessionLivedBackendStatus {
            phase: Phase::Running,
            node_name: Some("node-1".into()),
            observed_generation: Some(3),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).expect("serialize");
        assert_eq!(json["nodeName"], "node-1");
        assert_eq!(json["observedGeneration"], 3);
        assert_eq!(json["phase"], "Running");
        let back: SessionLivedBackendStatus = serde_json::from_value(json).expect("parse");
        assert_eq!(back, status);
    }
}
