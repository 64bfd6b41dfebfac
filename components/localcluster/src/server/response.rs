//! Responses: JSON bodies, errors as `Status`, and objects and lists in the representation the
//! client asked for (full, table, metadata only).

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::resources::ResourceType;
use crate::store::{ListResult, Obj};
use crate::table::{self, IncludeObject};

pub(super) fn json_response(code: u16, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn value_response(code: u16, v: &Value) -> Response {
    json_response(code, serde_json::to_vec(v).unwrap_or_default())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.reason == crate::error::PAGE_NOT_FOUND {
            let mut r = Response::new(Body::from("404 page not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return r;
        }
        let mut response = value_response(self.code, &self.to_status());
        // A 429 says when to come back, in the header clients read and in the Status.
        if let Some(seconds) = self
            .details
            .as_ref()
            .and_then(|d| d.get("retryAfterSeconds"))
            .and_then(|s| s.as_u64())
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// How the client wants objects represented (from `Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repr {
    Full,
    Table(IncludeObject),
    Metadata,
}

pub(super) fn repr(headers: &HeaderMap, include: Option<&str>) -> Repr {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The first acceptable alternative wins, as content negotiation does.
    for alt in accept.split(',') {
        if alt.contains("as=Table") {
            return Repr::Table(IncludeObject::parse(include));
        }
        if alt.contains("as=PartialObjectMetadata") {
            return Repr::Metadata;
        }
        if alt.trim().starts_with("application/json") || alt.trim().starts_with("*/*") {
            return Repr::Full;
        }
    }
    Repr::Full
}

pub(super) fn object_response(
    cluster: &Cluster,
    rt: &ResourceType,
    code: u16,
    obj: &Obj,
    repr: Repr,
) -> Response {
    match repr {
        Repr::Full => json_response(code, serde_json::to_vec(&**obj).unwrap_or_default()),
        Repr::Metadata => value_response(code, &table::partial_metadata(obj)),
        Repr::Table(include) => value_response(
            code,
            &table::table(
                rt,
                &[obj],
                include,
                json!({"resourceVersion": crate::store::rv_of(obj)}),
                true,
                crate::clock::now(&*cluster.shared.clock),
            ),
        ),
    }
}

pub(super) fn list_response(
    cluster: &Cluster,
    rt: &ResourceType,
    result: ListResult,
    repr: Repr,
) -> Response {
    let mut meta = json!({"resourceVersion": result.resource_version.to_string()});
    if let Some(c) = &result.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(n) = result.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    match repr {
        Repr::Table(include) => {
            let objs: Vec<&Value> = result.items.iter().map(|o| &**o).collect();
            value_response(
                200,
                &table::table(
                    rt,
                    &objs,
                    include,
                    meta,
                    true,
                    crate::clock::now(&*cluster.shared.clock),
                ),
            )
        }
        Repr::Metadata => {
            let items: Vec<Value> = result
                .items
                .iter()
                .map(|o| table::partial_metadata(o))
                .collect();
            value_response(
                200,
                &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
            )
        }
        Repr::Full => {
            // Written by hand so that 10,000 shared objects are serialized, never cloned.
            let mut out = Vec::with_capacity(64 + result.items.len() * 512);
            out.extend_from_slice(b"{\"kind\":\"");
            out.extend_from_slice(rt.kind.as_bytes());
            out.extend_from_slice(b"List\",\"apiVersion\":\"");
            out.extend_from_slice(rt.api_version().as_bytes());
            out.extend_from_slice(b"\",\"metadata\":");
            let _ = serde_json::to_writer(&mut out, &meta);
            out.extend_from_slice(b",\"items\":[");
            for (i, item) in result.items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut out, &**item);
            }
            out.extend_from_slice(b"]}");
            json_response(200, out)
        }
    }
}
