//! Reading a request: query parameters, the resource path, bodies and delete options.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::resources::ResourceType;
use crate::store::{DeleteOptions, Propagation};

pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str())
    }

    pub(super) fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

pub(super) fn parse_query(raw: Option<&str>) -> Query {
    let mut out = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(k), percent_decode(v)));
    }
    Query(out)
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unknown resources of built-in groups get a `Status`; paths under custom-resource or
/// unknown groups fall through to the plain-text `404 page not found` of the real server.
pub(super) fn not_found_for_group(group: &str) -> ApiError {
    if matches!(group, "" | "coordination.k8s.io" | "events.k8s.io") {
        ApiError::resource_not_found()
    } else {
        ApiError::page_not_found()
    }
}

/// A parsed resource path.
#[derive(Debug)]
pub(super) struct ResourcePath {
    pub(super) kind: usize,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
    pub(super) watch_prefix: bool,
}

pub(super) fn parse_resource_path(
    types: &[ResourceType],
    path: &str,
) -> Option<Result<ResourcePath, ApiError>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", "v1", rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return None,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let find = |plural: &str| {
        types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    };
    let namespaced_plural = |p: &str| find(p).is_some_and(|k| types[k].namespaced);
    let (ns, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, plural, r @ ..] if namespaced_plural(plural) => {
            (Some(percent_decode(ns)), &rest[2..])
        }
        r => {
            let _ = r;
            (None, rest)
        }
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(percent_decode(n)), None),
        [p, n, s] => (*p, Some(percent_decode(n)), Some(s.to_string())),
        _ => return Some(Err(not_found_for_group(group))),
    };
    let Some(kind) = find(plural) else {
        return Some(Err(not_found_for_group(group)));
    };
    if types[kind].namespaced != ns.is_some() && !(types[kind].namespaced && name.is_none()) {
        return Some(Err(ApiError::resource_not_found()));
    }
    Some(Ok(ResourcePath {
        kind,
        namespace: ns,
        name,
        subresource: sub,
        watch_prefix,
    }))
}

/// `fieldValidation=Strict` (what kubectl sends): unknown fields of a custom resource are a
/// 400 instead of being pruned.
pub(super) fn strict_check(q: &Query, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let (Some("Strict"), Some(schema)) = (q.get("fieldValidation"), &rt.schema) else {
        return Ok(());
    };
    let mut unknown = Vec::new();
    let mut body = obj.clone();
    if let Some(m) = body.as_object_mut() {
        for k in ["apiVersion", "kind", "metadata"] {
            m.remove(k);
        }
    }
    crate::schema::unknown_fields(schema, &body, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(());
    }
    let list = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::bad_request(format!(
        "{kind} in version \"{}\" cannot be handled as a {kind}: strict decoding error: {list}",
        rt.version,
        kind = rt.kind
    )))
}

pub(super) fn parse_json(body: &Bytes, rt: &ResourceType) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: {e} ({})",
            rt.kind,
            String::from_utf8_lossy(&body[..body.len().min(64)])
        ))
    })
}

pub(super) fn dry_run(q: &Query) -> bool {
    q.get("dryRun") == Some("All")
}

pub(super) fn delete_options(q: &Query, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions::default();
    let parsed: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?
    };
    let policy = parsed
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or(q.get("propagationPolicy"));
    opts.propagation = match policy {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                ),
            ));
        }
    };
    if parsed.get("orphanDependents").and_then(Value::as_bool) == Some(true)
        || q.flag("orphanDependents")
    {
        opts.propagation = Propagation::Orphan;
    }
    opts.grace_period_seconds = parsed
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    crate::decode::check_delete_grace(opts.grace_period_seconds)?;
    opts.precondition_uid = parsed
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    opts.precondition_rv = parsed
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    opts.dry_run = parsed
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v == "All"))
        || dry_run(q);
    Ok(opts)
}
