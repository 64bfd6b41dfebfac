//! Request and response bodies, and the pure mapping from a spawn request to a
//! `SessionLivedBackend`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use spawner_core::resource::{
    BackendCondition, DEFAULT_GRACE_PERIOD_SECONDS, DEFAULT_HTTP_PORT, KEY_LABEL,
    PUBLIC_ANNOTATION, SessionLivedBackend, SessionLivedBackendSpec,
};
use spawner_core::validation::{Limits, validate_spec};
use spawner_core::{Phase, resource::SessionLivedBackendStatus};

use crate::error::{ApiError, FieldProblem, from_validation};
use crate::naming::{
    UrlTemplate, is_label_key, is_label_value, is_reserved_label_key, key_label_value,
};

pub use spawner_core::resource::TERMINATE_ANNOTATION;

/// Name of the application container the api builds.
pub const APP_CONTAINER_NAME: &str = "app";

/// `POST /spawn` and `POST /connect`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpawnRequest {
    /// Container image of the application (Kubernetes mode). An image or a command is required.
    #[serde(default)]
    pub image: Option<String>,
    /// Command of the application (replaces the image's entrypoint; required for process
    /// backends in local mode).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Arguments of the command.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Port the application listens on (given to it as `PORT`); default 8080.
    #[serde(default, deserialize_with = "whole_number")]
    pub port: Option<u16>,
    /// Environment variables of the application.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds the backend may stay without any connection before it is swept; default 300.
    #[serde(
        default,
        alias = "grace_period_seconds",
        deserialize_with = "whole_number"
    )]
    pub grace_period_seconds: Option<u32>,
    /// Hard deadline from creation, in seconds, whatever the activity.
    #[serde(
        default,
        alias = "max_lifetime_seconds",
        deserialize_with = "whole_number"
    )]
    pub max_lifetime_seconds: Option<u32>,
    /// Get-or-create key: at most one live backend per key. Required by `/connect`.
    #[serde(default)]
    pub key: Option<String>,
    /// Labels of the backend (and its pod); keys under `spawner.dev/` are reserved.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Identity of the user this URL is for: carried by the connect token and handed to the
    /// application as `X-Spawner-User` (1-256 printable ASCII characters).
    #[serde(default)]
    pub user: Option<String>,
    /// Let anyone in through the router without a connect token (demos, public rooms).
    #[serde(default)]
    pub public: bool,
}

/// A whole number for an integer field, `null` for none. JSON Schema's `integer` (what the
/// document says) is any number without a fraction, `30.0` too, which serde's integers refuse.
fn whole_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64> + num_bounds::Max,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=T::MAX as f64).contains(f))
            .map(|f| f as u64)
    });
    whole
        .and_then(|w| T::try_from(w).ok())
        .map(Some)
        .ok_or_else(|| {
            D::Error::custom(format!(
                "invalid value: {number}, expected a whole number from 0 to {}",
                T::MAX
            ))
        })
}

mod num_bounds {
    /// The largest value of an unsigned integer type.
    pub trait Max {
        const MAX: u64;
    }
    impl Max for u16 {
        const MAX: u64 = u16::MAX as u64;
    }
    impl Max for u32 {
        const MAX: u64 = u32::MAX as u64;
    }
}

impl SpawnRequest {
    /// The backend's spec, checked with core's validator and the label rules; problems are
    /// reported in request field names.
    pub fn to_spec(&self, limits: &Limits) -> Result<SessionLivedBackendSpec, ApiError> {
        let env_names: Vec<String> = self.env.keys().cloned().collect();
        let container = Container {
            name: APP_CONTAINER_NAME.to_string(),
            image: self.image.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            env: (!self.env.is_empty()).then(|| {
                self.env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: Some(value.clone()),
                        value_from: None,
                    })
                    .collect()
            }),
            ..Default::default()
        };
        let spec = SessionLivedBackendSpec {
            template: PodTemplateSpec {
                metadata: (!self.labels.is_empty()).then(|| ObjectMeta {
                    labels: Some(self.labels.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            http_port: self.port.unwrap_or(DEFAULT_HTTP_PORT),
            grace_period_seconds: self
                .grace_period_seconds
                .unwrap_or(DEFAULT_GRACE_PERIOD_SECONDS),
            max_lifetime_seconds: self.max_lifetime_seconds,
            key: self.key.clone(),
        };
        let mut problems = match validate_spec(&spec, limits) {
            Ok(()) => Vec::new(),
            Err(errors) => from_validation(errors, &env_names),
        };
        problems.extend(label_problems(&self.labels));
        if let Some(user) = &self.user
            && !spawner_core::connect_token::is_valid_user(user)
        {
            problems.push(FieldProblem {
                field: "user".into(),
                message: format!(
                    "must be 1 to {} printable ASCII characters",
                    spawner_core::connect_token::MAX_USER_LEN
                ),
            });
        }
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(ApiError::validation(problems))
        }
    }
}

fn label_problems(labels: &BTreeMap<String, String>) -> Vec<FieldProblem> {
    let mut problems = Vec::new();
    for (key, value) in labels {
        let field = format!("labels.{key}");
        if !is_label_key(key) {
            problems.push(FieldProblem {
                field,
                message: "must be a label key: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into(),
            });
        } else if is_reserved_label_key(key) {
            problems.push(FieldProblem {
                field,
                message: "labels under spawner.dev/ are reserved".into(),
            });
        } else if !is_label_value(value) {
            problems.push(FieldProblem {
                field,
                message: "the value must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into(),
            });
        }
    }
    problems
}

/// The object to create for `spec` under `name`: the user's labels, plus the key label when
/// the spec has a key.
pub fn new_backend(
    name: &str,
    namespace: &str,
    spec: SessionLivedBackendSpec,
    labels: &BTreeMap<String, String>,
) -> SessionLivedBackend {
    let mut labels = labels.clone();
    if let Some(key) = &spec.key {
        labels.insert(KEY_LABEL.to_string(), key_label_value(key));
    }
    let mut backend = SessionLivedBackend::new(name, spec);
    backend.metadata.namespace = Some(namespace.to_string());
    backend.metadata.labels = (!labels.is_empty()).then_some(labels);
    backend
}

/// Marks `backend` as open to anyone through the router.
pub fn mark_public(backend: &mut SessionLivedBackend) {
    backend
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(PUBLIC_ANNOTATION.to_string(), "true".to_string());
}

/// The time a terminate was requested, if it was.
pub fn terminate_requested_at(backend: &SessionLivedBackend) -> Option<&str> {
    backend
        .metadata
        .annotations
        .as_ref()?
        .get(TERMINATE_ANNOTATION)
        .map(String::as_str)
}

/// Whether `backend` may still serve: not in a terminal phase, no terminate requested, not
/// being deleted.
pub fn is_live(backend: &SessionLivedBackend) -> bool {
    !backend.phase().is_terminal()
        && terminate_requested_at(backend).is_none()
        && backend.metadata.deletion_timestamp.is_none()
}

/// Answer of `POST /spawn` and `POST /connect`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpawnResponse {
    /// The backend's name (its id in every other route).
    pub name: String,
    /// The URL a browser opens, from the URL template; when the api has connect keys and the
    /// backend is not public, it carries a connect token in its query (`spawner_token`).
    /// Appending a relative path to its path (before the query) reaches that path on the
    /// backend. `null` while the template needs the backend's `status.url` and the controller
    /// has not written it yet.
    pub url: Option<String>,
    /// Redirects (302) to the backend's URL (without a token) once the backend is Ready; 409
    /// with the phase before.
    pub ready_url: String,
    /// The backend's status.
    pub status_url: String,
    /// Whether this call created the backend (`false`: an existing live backend for the key).
    pub spawned: bool,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Answer of `GET /backend/{id}/status`, and one item of `GET /backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub name: String,
    pub phase: Phase,
    /// Node the backend runs on, once scheduled.
    pub node: Option<String>,
    /// The URL clients connect to (see `SpawnResponse.url`).
    pub url: Option<String>,
    /// Machine-readable reason of the last transition (always set on failure).
    pub reason: Option<String>,
    pub message: Option<String>,
    /// Exit code of the application when it terminated.
    pub exit_code: Option<i32>,
    /// One condition per phase reached, with its time.
    pub conditions: Vec<BackendCondition>,
    pub key: Option<String>,
    /// The backend's labels (Spawner's own included).
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 creation time.
    pub created_at: Option<String>,
    /// RFC 3339 time a terminate was first requested.
    pub terminate_requested_at: Option<String>,
}

impl BackendStatus {
    pub fn of(backend: &SessionLivedBackend, template: &UrlTemplate, namespace: &str) -> Self {
        let status = backend.status.clone().unwrap_or_default();
        let SessionLivedBackendStatus {
            phase,
            node_name,
            url,
            reason,
            message,
            exit_code,
            conditions,
            ..
        } = status;
        let name = backend.metadata.name.clone().unwrap_or_default();
        Self {
            url: template.render(&name, namespace, url.as_deref()),
            name,
            phase,
            node: node_name,
            reason,
            message,
            exit_code,
            conditions,
            key: backend.spec.key.clone(),
            labels: backend.metadata.labels.clone().unwrap_or_default(),
            created_at: backend
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            terminate_requested_at: terminate_requested_at(backend).map(str::to_string),
        }
    }
}

/// Answer of `GET /backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackendList {
    pub items: Vec<BackendStatus>,
}

/// Query of `GET /backends`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListQuery {
    /// Only the backends of this get-or-create key.
    pub key: Option<String>,
    /// A Kubernetes label selector (`team=a,tier!=x`).
    pub label_selector: Option<String>,
}

/// Answer of `DELETE /backend/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerminateResponse {
    pub name: String,
    /// The phase when the request was recorded; the controller moves it to Terminated.
    pub phase: Phase,
    /// RFC 3339 time of the first terminate request (`null` when the backend had already
    /// ended on its own).
    pub terminate_requested_at: Option<String>,
}

/// The data of one event of `GET /backend/{id}/status/stream`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseEvent {
    pub name: String,
    pub phase: Phase,
    /// RFC 3339 time the phase was reached, when known.
    pub time: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub node: Option<String>,
    pub url: Option<String>,
    pub exit_code: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn request(json: serde_json::Value) -> SpawnRequest {
        serde_json::from_value(json).expect("request parses")
    }

    #[test]
    fn a_spawn_request_becomes_a_backend() {
        let req = request(serde_json::json!({
            "image": "ghcr.io/acme/room:1",
            "port": 3000,
            "env": {"B": "2", "A": "1"},
            "gracePeriodSeconds": 30,
            "maxLifetimeSeconds": 3600,
            "key": "room 42",
            "labels": {"team": "a"}
        }));
        let spec = req.to_spec(&Limits::default()).expect("valid");
        let backend = new_backend("slab-x", "ns", spec, &req.labels);
        assert_eq!(backend.metadata.name.as_deref(), Some("slab-x"));
        assert_eq!(backend.metadata.namespace.as_deref(), Some("ns"));
        let labels = backend.metadata.labels.clone().expect("labels");
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[KEY_LABEL], key_label_value("room 42"));
        assert_eq!(backend.spec.http_port, 3000);
        assert_eq!(backend.spec.grace_period_seconds, 30);
        assert_eq!(backend.spec.max_lifetime_seconds, Some(3600));
        assert_eq!(backend.spec.key.as_deref(), Some("room 42"));
        let pod_labels = backend.spec.template.metadata.as_ref().expect("metadata");
        assert_eq!(pod_labels.labels.as_ref().expect("labels")["team"], "a");
        let app = backend.app_container().expect("app container");
        assert_eq!(app.name, APP_CONTAINER_NAME);
        assert_eq!(app.image.as_deref(), Some("ghcr.io/acme/room:1"));
        let env: Vec<_> = app
            .env
            .as_ref()
            .expect("env")
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(env, [("A", Some("1")), ("B", Some("2"))]);
    }

    #[test]
    fn defaults_and_process_backends() {
        let req = request(serde_json::json!({
            "command": ["python3", "-m", "http.server"],
            "args": ["--bind", "0.0.0.0"]
        }));
        let spec = req.to_spec(&Limits::default()).expect("valid");
        assert_eq!(spec.http_port, DEFAULT_HTTP_PORT);
        assert_eq!(spec.grace_period_seconds, DEFAULT_GRACE_PERIOD_SECONDS);
        let backend = new_backend("slab-y", "ns", spec, &BTreeMap::new());
        assert_eq!(backend.metadata.labels, None);
        let app = backend.app_container().expect("app");
        assert_eq!(app.image, None);
        assert_eq!(
            app.args.as_deref(),
            Some(&["--bind".to_string(), "0.0.0.0".to_string()][..])
        );
    }

    /// JSON Schema's `integer`, which the document gives these fields, includes `30.0`; a
    /// fraction or a value out of the type's range is still refused (400).
    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let req = request(serde_json::json!({
            "image": "x", "port": 3000.0, "gracePeriodSeconds": 30.0, "maxLifetimeSeconds": 6e1
        }));
        assert_eq!(req.port, Some(3000));
        assert_eq!(req.grace_period_seconds, Some(30));
        assert_eq!(req.max_lifetime_seconds, Some(60));
        let req = request(serde_json::json!({"image": "x", "gracePeriodSeconds": null}));
        assert_eq!(req.grace_period_seconds, None);
        for body in [
            serde_json::json!({"port": 30.5}),
            serde_json::json!({"port": 65536.0}),
            serde_json::json!({"port": -1.0}),
            serde_json::json!({"gracePeriodSeconds": 4294967296u64}),
            serde_json::json!({"gracePeriodSeconds": 1e300}),
            serde_json::json!({"maxLifetimeSeconds": "60"}),
        ] {
            let error = crate::extract::parse_json::<SpawnRequest>(body.to_string().as_bytes())
                .expect_err("refused");
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[test]
    fn snake_case_fields_of_older_clients_are_accepted() {
        let req = request(serde_json::json!({"image": "x", "grace_period_seconds": 5}));
        assert_eq!(req.grace_period_seconds, Some(5));
    }

    #[test]
    fn invalid_requests_report_request_fields() {
        let req = request(serde_json::json!({
            "port": 9090,
            "env": {"1BAD": "x", "OK": "y", "PORT": "1"},
            "gracePeriodSeconds": 0,
            "labels": {"spawner.dev/key": "x", "bad key": "y", "ok": "-bad"}
        }));
        let error = req.to_spec(&Limits::default()).expect_err("invalid");
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        let fields: Vec<_> = error
            .body
            .error
            .fields
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(
            fields,
            [
                "port",
                "gracePeriodSeconds",
                "image",
                "env.1BAD",
                "env.PORT",
                "labels.bad key",
                "labels.ok",
                "labels.spawner.dev/key",
            ]
        );
    }

    #[test]
    fn liveness_of_a_backend() {
        let req = request(serde_json::json!({"image": "x"}));
        let mut backend = new_backend(
            "slab-z",
            "ns",
            req.to_spec(&Limits::default()).expect("valid"),
            &BTreeMap::new(),
        );
        assert!(is_live(&backend));
        backend.status = Some(SessionLivedBackendStatus {
            phase: Phase::Ready,
            ..Default::default()
        });
        assert!(is_live(&backend));
        backend.metadata.annotations = Some(BTreeMap::from([(
            TERMINATE_ANNOTATION.to_string(),
            "2030-01-01T00:00:00Z".to_string(),
        )]));
        assert!(!is_live(&backend));
        assert_eq!(
            terminate_requested_at(&backend),
            Some("2030-01-01T00:00:00Z")
        );
        backend.metadata.annotations = None;
        for phase in [Phase::Swept, Phase::Failed, Phase::Terminated] {
            backend.status.as_mut().expect("status").phase = phase;
            assert!(!is_live(&backend), "{phase}");
        }
    }

    #[test]
    fn status_of_a_backend_renders_its_url() {
        let req = request(serde_json::json!({"image": "x", "key": "k"}));
        let mut backend = new_backend(
            "slab-s",
            "ns",
            req.to_spec(&Limits::default()).expect("valid"),
            &BTreeMap::new(),
        );
        let template = UrlTemplate::default();
        let status = BackendStatus::of(&backend, &template, "ns");
        assert_eq!(status.phase, Phase::Submitted);
        assert_eq!(status.url, None);
        assert_eq!(status.key.as_deref(), Some("k"));
        backend.status = Some(SessionLivedBackendStatus {
            phase: Phase::Failed,
            node_name: Some("node-1".into()),
            url: Some("http://127.0.1.1:9090".into()),
            reason: Some("ApplicationExited".into()),
            exit_code: Some(3),
            ..Default::default()
        });
        let status = BackendStatus::of(&backend, &template, "ns");
        assert_eq!(status.url.as_deref(), Some("http://127.0.1.1:9090"));
        assert_eq!(status.exit_code, Some(3));
        assert_eq!(status.node.as_deref(), Some("node-1"));
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["exitCode"], 3);
        assert_eq!(json["reason"], "ApplicationExited");
    }
}
