//! Discovery: health, version, API groups and resource lists, and the OpenAPI v3 stubs kubectl
//! looks up.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::response::value_response;
use crate::cluster::Cluster;
use crate::resources::{self, ResourceType};

pub(super) fn discovery(cluster: &Cluster, path: &str) -> Option<Response> {
    let types = &cluster.shared.types;
    let path = path.trim_end_matches('/');
    let ok = |v: Value| Some(value_response(200, &v));
    match path {
        "/healthz" | "/livez" | "/readyz" => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Some(r)
        }
        "/version" => ok(json!({
            "major": "1", "minor": "34",
            "gitVersion": cluster.shared.config.git_version,
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
            "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
        })),
        "/openapi/v3" => {
            let mut paths = serde_json::Map::new();
            let mut gvs = vec![("", "v1")];
            gvs.extend(resources::groups(types));
            for (g, v) in gvs {
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                paths.insert(
                    key.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=localcluster")}),
                );
            }
            ok(json!({"paths": paths}))
        }
        "/api" => ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        })),
        "/apis" => {
            let groups: Vec<Value> = resources::groups(types)
                .into_iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        _ if path.starts_with("/openapi/v3/") => openapi_v3(types, &path["/openapi/v3/".len()..]),
        _ => {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let (group, version) = match segs.as_slice() {
                ["api", "v1"] => ("", "v1"),
                ["apis", g, v] => (*g, *v),
                ["apis", g] => {
                    let (_, v) = resources::groups(types).into_iter().find(|(x, _)| x == g)?;
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    return ok(
                        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv}),
                    );
                }
                _ => return None,
            };
            let list: Vec<Value> = types
                .iter()
                .filter(|t| t.group == group && t.version == version)
                .flat_map(|t| t.discovery())
                .collect();
            if list.is_empty() {
                return None;
            }
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            ok(
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
            )
        }
    }
}

/// A minimal OpenAPI v3 document of one group/version: for each type, its PATCH operation
/// with the `fieldValidation` parameter. That is what kubectl looks up to decide that the
/// server validates fields itself (then it sends `fieldValidation=Strict` and needs no schema).
pub(super) fn openapi_v3(types: &[ResourceType], gv: &str) -> Option<Response> {
    let segs: Vec<&str> = gv.trim_matches('/').split('/').collect();
    let (group, version) = match segs.as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(value_response(
        200,
        &json!({"openapi": "3.0.0", "info": {"title": "localcluster", "version": "v1.34.0"}, "paths": paths, "components": {"schemas": {}}}),
    ))
}
