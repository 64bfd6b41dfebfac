//! One resource request, by verb: get, list, create, update, patch, delete, bind.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::request::{Query, ResourcePath, delete_options, dry_run, parse_json, strict_check};
use super::response::{Repr, list_response, object_response, repr, value_response};
use super::watch::watch_response;
use crate::clock::format_time;
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Filter, Obj, PatchKind, Target, View};

pub(super) fn new_events_view() -> View {
    View {
        to_view: crate::event_versions::to_new,
        from_view: crate::event_versions::to_core,
    }
}

/// One request on a resource, as every verb sees it.
struct ResourceRequest<'a> {
    cluster: &'a Cluster,
    q: &'a Query,
    /// The stored type's index.
    kind: usize,
    /// The stored type.
    stored_rt: &'a ResourceType,
    /// The type the client sees (for list kinds, tables and bookmarks).
    rt: &'a ResourceType,
    /// The client sees the stored type through another representation.
    view: bool,
    namespace: Option<&'a str>,
    ns: String,
    now: String,
    field_selector: String,
}

impl ResourceRequest<'_> {
    /// An object as the client sees it.
    fn shown(&self, o: Obj) -> Obj {
        if self.view {
            Arc::new(crate::event_versions::to_new(&o))
        } else {
            o
        }
    }

    /// A body as it is stored.
    fn stored(&self, v: Value) -> Value {
        if self.view {
            crate::event_versions::to_core(&v)
        } else {
            v
        }
    }

    fn deletion_time(&self) -> impl Fn(i64) -> String + use<> {
        let clock = self.cluster.shared.clock.clone();
        move |secs| deletion_time(crate::clock::now(&*clock), secs)
    }

    fn list(&self, repr: Repr) -> Result<Response, ApiError> {
        let labels = LabelSelector::parse(self.q.get("labelSelector").unwrap_or(""))?;
        let fields = FieldSelector::parse(&self.field_selector, self.stored_rt)?;
        let filter = Filter {
            namespace: self.namespace,
            labels: &labels,
            fields: &fields,
        };
        let limit = self
            .q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let result = self.cluster.store().list(
            self.kind,
            &filter,
            limit,
            self.q.get("continue").filter(|c| !c.is_empty()),
        )?;
        let mut result = result;
        if self.view {
            result.items = result.items.into_iter().map(|o| self.shown(o)).collect();
        }
        Ok(list_response(self.cluster, self.rt, result, repr))
    }

    fn bind(&self, name: &str, body: &Bytes) -> Result<Response, ApiError> {
        let binding = parse_json(body, self.rt)?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                self.stored_rt,
                name,
                vec![crate::error::FieldCause::required("target.name", "")],
            ));
        }
        self.cluster
            .store()
            .bind_pod(&self.ns, name, &node, &self.now)?;
        Ok(value_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }

    fn patch(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: &Bytes,
        target: Target,
        repr: Repr,
    ) -> Result<Response, ApiError> {
        let (kind, patch) = decode_patch(headers, self.q, body)?;
        let patched = self.cluster.store().patch(
            self.kind,
            &self.ns,
            name,
            kind,
            &patch,
            target,
            &self.now,
            dry_run(self.q),
            self.view.then(new_events_view).as_ref(),
        )?;
        let patched = self.shown(patched);
        Ok(object_response(self.cluster, self.rt, 200, &patched, repr))
    }

    fn delete(&self, name: &str, body: &Bytes, repr: Repr) -> Result<Response, ApiError> {
        let opts = delete_options(self.q, body)?;
        let deleted = self.cluster.store().delete(
            self.kind,
            &self.ns,
            name,
            &opts,
            &self.now,
            self.deletion_time(),
        )?;
        let still_there = self.cluster.store().get(self.kind, &self.ns, name).is_ok();
        let deleted = self.shown(deleted);
        if !still_there && !self.rt.return_deleted_object {
            let mut details = self.rt.details(name);
            details["uid"] = deleted
                .pointer("/metadata/uid")
                .cloned()
                .unwrap_or_default();
            return Ok(value_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            ));
        }
        Ok(object_response(self.cluster, self.rt, 200, &deleted, repr))
    }

    fn delete_collection(&self, body: &Bytes) -> Result<Response, ApiError> {
        let opts = delete_options(self.q, body)?;
        let labels = LabelSelector::parse(self.q.get("labelSelector").unwrap_or(""))?;
        let fields = FieldSelector::parse(&self.field_selector, self.stored_rt)?;
        let filter = Filter {
            namespace: self.namespace,
            labels: &labels,
            fields: &fields,
        };
        let mut store = self.cluster.store();
        let listed = store.list(self.kind, &filter, None, None)?;
        let mut items = Vec::new();
        for obj in listed.items {
            let ns = crate::store::namespace_of(&obj).to_string();
            let name = crate::store::name_of(&obj).to_string();
            if let Ok(d) = store.delete(
                self.kind,
                &ns,
                &name,
                &opts,
                &self.now,
                self.deletion_time(),
            ) {
                items.push(self.shown(d));
            }
        }
        let rv = store.resource_version();
        drop(store);
        Ok(list_response(
            self.cluster,
            self.rt,
            crate::store::ListResult {
                items,
                resource_version: rv,
                continue_token: None,
                remaining: None,
            },
            Repr::Full,
        ))
    }
}

/// Serves a resource request; `view` is set when the client sees the stored type through
/// another representation (events.k8s.io Events).
pub(super) async fn serve_resource(
    cluster: &Cluster,
    headers: &HeaderMap,
    q: &Query,
    rp: ResourcePath,
    body: Bytes,
    verb: &'static str,
    view: Option<&ResourceType>,
) -> Result<Response, ApiError> {
    let types = cluster.shared.types.clone();
    let stored_rt = &types[rp.kind];
    let rt = view.unwrap_or(stored_rt);
    let field_selector = match (view, q.get("fieldSelector")) {
        (Some(_), Some(f)) => crate::event_versions::field_selector_to_core(f),
        (_, f) => f.unwrap_or("").to_string(),
    };
    let target = match rp.subresource.as_deref() {
        None => Target::Main,
        Some("status") if rt.status_subresource => Target::Status,
        Some("binding") if rp.kind == resources::PODS && verb == "create" => Target::Main,
        Some(_) => return Err(ApiError::resource_not_found()),
    };
    let repr = repr(headers, q.get("includeObject"));
    let request = ResourceRequest {
        cluster,
        q,
        kind: rp.kind,
        stored_rt,
        rt,
        view: view.is_some(),
        namespace: rp.namespace.as_deref(),
        ns: rp.namespace.clone().unwrap_or_default(),
        now: cluster.now(),
        field_selector,
    };
    let r = &request;
    match (verb, rp.name.as_deref()) {
        ("get", Some(name)) => {
            let obj = r.shown(cluster.store().get(r.kind, &r.ns, name)?);
            Ok(object_response(cluster, rt, 200, &obj, repr))
        }
        ("list", None) => r.list(repr),
        ("watch", _) => {
            let (field_selector, view) = (r.field_selector.clone(), r.view);
            drop(request);
            watch_response(cluster, rp, q, repr, &field_selector, view)
        }
        ("create", Some(name)) if rp.subresource.as_deref() == Some("binding") => {
            r.bind(name, &body)
        }
        ("create", None) => {
            let obj = r.stored(parse_json(&body, rt)?);
            strict_check(q, stored_rt, &obj)?;
            let created = cluster
                .store()
                .create(r.kind, r.namespace, obj, &r.now, dry_run(q))?;
            let created = r.shown(created);
            Ok(object_response(cluster, rt, 201, &created, repr))
        }
        ("update", Some(name)) => {
            let obj = r.stored(parse_json(&body, rt)?);
            strict_check(q, stored_rt, &obj)?;
            let updated =
                cluster
                    .store()
                    .update(r.kind, &r.ns, name, obj, target, &r.now, dry_run(q))?;
            let updated = r.shown(updated);
            Ok(object_response(cluster, rt, 200, &updated, repr))
        }
        ("patch", Some(name)) => r.patch(name, headers, &body, target, repr),
        ("delete", Some(name)) => r.delete(name, &body, repr),
        ("deletecollection", None) => r.delete_collection(&body),
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// The patch kind (from the Content-Type) and the decoded patch of a PATCH request.
fn decode_patch(
    headers: &HeaderMap,
    q: &Query,
    body: &Bytes,
) -> Result<(PatchKind, Value), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    let kind = match media {
        "application/merge-patch+json" => PatchKind::Merge,
        "application/json-patch+json" => PatchKind::Json,
        "application/strategic-merge-patch+json" => PatchKind::StrategicMerge,
        "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    let patch = if kind == PatchKind::Apply {
        if q.get("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
    };
    Ok((kind, patch))
}

/// `now` plus a grace period, as a Kubernetes time. Grace periods are bounded at admission
/// ([`crate::decode::MAX_GRACE_SECONDS`]); the saturation only keeps this total.
pub(super) fn deletion_time(now: chrono::DateTime<chrono::Utc>, secs: i64) -> String {
    let secs = secs.clamp(0, crate::decode::MAX_GRACE_SECONDS);
    let later = chrono::TimeDelta::try_seconds(secs)
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now);
    format_time(later)
}
