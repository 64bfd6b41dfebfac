//! Extractors that reject in the api's error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use spawner_core::validation::is_dns1035_label;

use crate::error::ApiError;
use crate::routes::SharedState;

/// A JSON body. Malformed JSON → 400 `malformed_json`; a wrong type, a missing or unknown
/// field → 400 `invalid_request` with the field's path; a body over the limit → 413.
/// The Content-Type is not checked: older clients send JSON without it.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.config.max_body_bytes)
            } else {
                ApiError::malformed_json("the request body could not be read")
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// `bytes` (a JSON object) as a `T`, with the api's errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| malformed(&e))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("body", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { "body" } else { path.as_str() };
        ApiError::invalid_request(field, data_error_message(error.inner()))
    })
}

fn malformed(error: &serde_json::Error) -> ApiError {
    ApiError::malformed_json(format!("the request body is not valid JSON: {error}"))
}

/// serde's message without the " at line L column C" suffix, which means nothing to a client
/// that gets the field's path.
fn data_error_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// A backend name from the path. A name that cannot be a backend's answers 404 without asking
/// the Kubernetes API.
pub struct BackendName(pub String);

impl FromRequestParts<SharedState> for BackendName {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found(""))?;
        if is_dns1035_label(&name) {
            Ok(BackendName(name))
        } else {
            Err(ApiError::not_found(&name))
        }
    }
}

/// A query string, with unknown or mistyped parameters answered 400 `invalid_request`.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<SharedState> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|rejection| ApiError::invalid_request("query", rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpawnRequest;

    fn error(body: &str) -> ApiError {
        match parse_json::<SpawnRequest>(body.as_bytes()) {
            Ok(_) => panic!("{body} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn malformed_json_is_a_400() {
        for body in [
            "{",
            "",
            "not json",
            "{\"image\": \"x\"} trailing",
            "{\"image\": }",
        ] {
            let e = error(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.code(), "malformed_json", "{body}");
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, field) in [
            (r#"{"gracePeriodSeconds": "30"}"#, "gracePeriodSeconds"),
            (r#"{"port": 70000}"#, "port"),
            (r#"{"port": -1}"#, "port"),
            (r#"{"env": {"A": 1}}"#, "env.A"),
            (r#"{"command": "python3"}"#, "command"),
            (r#"{"imagee": "x"}"#, "imagee"),
            ("[]", "body"),
        ] {
            let e = error(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.code(), "invalid_request", "{body}");
            assert_eq!(e.body.error.fields[0].field, field, "{body}");
            assert!(!e.body.error.fields[0].message.contains("line"), "{body}");
        }
    }

    #[test]
    fn valid_json_parses() {
        let req: SpawnRequest = parse_json(br#"{"image": "x", "env": {}}"#).expect("parses");
        assert_eq!(req.image.as_deref(), Some("x"));
    }
}
