//! The one error shape every route answers with:
//! `{"error": {"code", "message", "fields": [{"field", "message"}]}}`, plus `name` and `phase`
//! where a backend's state is the reason (409 from `/ready`).
//!
//! Kubernetes error text never reaches a client: it is logged here with `tracing` and replaced
//! by a fixed message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::Serialize;
use spawner_core::Phase;
use spawner_core::validation::ValidationErrors;

/// One problem with one field of the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct FieldProblem {
    /// Path of the field in the request (`gracePeriodSeconds`, `env.MY_VAR`, `labels.team`).
    pub field: String,
    pub message: String,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The backend concerned, when the error is about its state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The backend's phase, when the error is about its state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, stable across releases (see docs/api.md).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Problems with individual fields (empty when the error is not about a field).
    pub fields: Vec<FieldProblem>,
}

/// An error answered to a client.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_string(),
                    message: message.into(),
                    fields: Vec::new(),
                },
                name: None,
                phase: None,
            },
        }
    }

    pub fn with_fields(mut self, fields: Vec<FieldProblem>) -> Self {
        self.body.error.fields = fields;
        self
    }

    pub fn code(&self) -> &str {
        &self.body.error.code
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no backend named {name:?}"),
        )
    }

    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    pub fn invalid_request(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        )
        .with_fields(vec![FieldProblem {
            field: field.to_string(),
            message,
        }])
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 422 with every field problem.
    pub fn validation(fields: Vec<FieldProblem>) -> Self {
        let summary = fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("invalid request: {summary}"),
        )
        .with_fields(fields)
    }

    pub fn not_ready(name: &str, phase: Phase, message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::CONFLICT, "not_ready", message);
        error.body.name = Some(name.to_string());
        error.body.phase = Some(phase);
        error
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the api's log has the details",
        )
    }

    /// The client-facing error for a failed Kubernetes call made while doing `action`. The
    /// Kubernetes error itself is logged, never returned.
    pub fn from_kube(action: &str, name: Option<&str>, error: &kube::Error) -> Self {
        let status = match error {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        };
        match status {
            Some(404) if name.is_some() => {
                tracing::debug!(action, name, "backend not found");
                Self::not_found(name.unwrap_or_default())
            }
            Some(400 | 422) => {
                tracing::warn!(action, name, %error, "the Kubernetes API rejected a request");
                Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "rejected",
                    "the backend store rejected the request",
                )
            }
            Some(429) => {
                tracing::warn!(action, name, %error, "the Kubernetes API is throttling");
                Self::unavailable()
            }
            Some(401 | 403) => {
                // Retrying cannot help: the api's ServiceAccount lacks a grant (deploy/rbac).
                tracing::error!(action, name, %error, "the Kubernetes API refused the api's credentials or role");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "misconfigured",
                    "the api is not allowed to do this in its cluster; its operator must fix its RBAC (the api's log names the call)",
                )
            }
            _ => {
                tracing::error!(action, name, %error, "Kubernetes API call failed");
                Self::unavailable()
            }
        }
    }

    /// Every status stream slot of this replica is taken.
    pub fn too_many_streams() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many status streams are open; try again shortly",
        )
    }

    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the backend store is unavailable; try again",
        )
    }
}

/// Field paths of `validate_spec` are spec paths; a client sent request fields. `env_names`
/// are the request's env keys in the order they were put in the container.
pub fn request_field(spec_path: &str, env_names: &[String]) -> String {
    const CONTAINER: &str = "spec.template.spec.containers[0]";
    let simple = [
        ("spec.httpPort", "port"),
        ("spec.gracePeriodSeconds", "gracePeriodSeconds"),
        ("spec.maxLifetimeSeconds", "maxLifetimeSeconds"),
        ("spec.key", "key"),
        ("spec", "body"),
    ];
    if let Some((_, field)) = simple.iter().find(|(path, _)| *path == spec_path) {
        return field.to_string();
    }
    if let Some(rest) = spec_path.strip_prefix(CONTAINER) {
        if rest == ".image" {
            return "image".into();
        }
        if rest == ".env" {
            return "env".into();
        }
        if let Some(index) = rest
            .strip_prefix(".env[")
            .and_then(|r| r.strip_suffix("].name"))
            .and_then(|i| i.parse::<usize>().ok())
            && let Some(name) = env_names.get(index)
        {
            return format!("env.{name}");
        }
    }
    spec_path.to_string()
}

/// The 422 for a spec that `validate_spec` refused, in request field names.
pub fn from_validation(errors: ValidationErrors, env_names: &[String]) -> Vec<FieldProblem> {
    errors
        .errors
        .into_iter()
        .map(|e| FieldProblem {
            field: request_field(&e.field, env_names),
            message: e.message,
        })
        .collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, Json(self.body)).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"spawner\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn kube_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            Status::failure(message, "Whatever").with_code(code),
        ))
    }

    #[test]
    fn kubernetes_errors_are_mapped_without_their_text() {
        let secret = "etcdserver: leader changed at 10.0.0.7";
        for (code, status, api_code) in [
            (404, StatusCode::NOT_FOUND, "not_found"),
            (422, StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            (400, StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            (429, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (500, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (403, StatusCode::INTERNAL_SERVER_ERROR, "misconfigured"),
            (401, StatusCode::INTERNAL_SERVER_ERROR, "misconfigured"),
        ] {
            let error = ApiError::from_kube("get", Some("slab-x"), &kube_error(code, secret));
            assert_eq!(error.status, status, "{code}");
            assert_eq!(error.code(), api_code);
            let body = serde_json::to_string(&error.body).expect("json");
            assert!(!body.contains("etcd"), "{body}");
        }
    }

    #[test]
    fn error_body_shape() {
        let error = ApiError::validation(vec![FieldProblem {
            field: "port".into(),
            message: "must be between 1 and 65535".into(),
        }]);
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            serde_json::to_value(&error.body).expect("json"),
            serde_json::json!({"error": {
                "code": "validation_failed",
                "message": "invalid request: port: must be between 1 and 65535",
                "fields": [{"field": "port", "message": "must be between 1 and 65535"}]
            }})
        );
        let not_ready = ApiError::not_ready("slab-a", Phase::Running, "not ready");
        let json = serde_json::to_value(&not_ready.body).expect("json");
        assert_eq!(json["phase"], "Running");
        assert_eq!(json["name"], "slab-a");
        assert_eq!(json["error"]["code"], "not_ready");
    }

    #[test]
    fn unauthorized_answers_carry_a_challenge() {
        let response = ApiError::unauthorized("missing bearer token").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn spec_paths_become_request_fields() {
        let env = vec!["A".to_string(), "1BAD".to_string()];
        for (path, field) in [
            ("spec.httpPort", "port"),
            ("spec.gracePeriodSeconds", "gracePeriodSeconds"),
            ("spec.maxLifetimeSeconds", "maxLifetimeSeconds"),
            ("spec.key", "key"),
            ("spec", "body"),
            ("spec.template.spec.containers[0].image", "image"),
            ("spec.template.spec.containers[0].env", "env"),
            ("spec.template.spec.containers[0].env[1].name", "env.1BAD"),
            (
                "spec.template.spec.containers[0].env[7].name",
                "spec.template.spec.containers[0].env[7].name",
            ),
            ("spec.template.spec", "spec.template.spec"),
        ] {
            assert_eq!(request_field(path, &env), field, "{path}");
        }
    }
}
