//! Server-side printing: `meta.k8s.io/v1 Table` responses, which kubectl asks for.

use serde_json::{Value, json};

use crate::clock::human_age;
use crate::resources::ResourceType;

/// What a table row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

struct Column {
    name: &'static str,
    ty: &'static str,
    format: &'static str,
    priority: i32,
    description: &'static str,
}

const fn col(name: &'static str, ty: &'static str, priority: i32) -> Column {
    Column {
        name,
        ty,
        format: "",
        priority,
        description: "",
    }
}

const NAME: Column = Column {
    name: "Name",
    ty: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace.",
};

fn columns(rt: &ResourceType) -> Vec<Column> {
    match (rt.group, rt.kind) {
        ("", "Pod") => vec![
            NAME,
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ],
        ("", "Service") => vec![
            NAME,
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ],
        ("", "Namespace") => vec![NAME, col("Status", "string", 0), col("Age", "string", 0)],
        ("", "Node") => vec![
            NAME,
            col("Status", "string", 0),
            col("Roles", "string", 0),
            col("Age", "string", 0),
            col("Version", "string", 0),
        ],
        ("coordination.k8s.io", "Lease") => {
            vec![NAME, col("Holder", "string", 0), col("Age", "string", 0)]
        }
        (_, "Event") => vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ],
        ("spawner.dev", _) => vec![
            NAME,
            col("Phase", "string", 0),
            col("Node", "string", 0),
            col("Key", "string", 1),
            col("Age", "date", 0),
        ],
        _ => vec![NAME, col("Age", "string", 0)],
    }
}

fn s(obj: &Value, ptr: &str) -> String {
    obj.pointer(ptr)
        .map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn age(obj: &Value, field: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    match chrono::DateTime::parse_from_rfc3339(&s(obj, field)) {
        Ok(t) => human_age((now - t.with_timezone(&chrono::Utc)).num_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn cells(rt: &ResourceType, obj: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let name = json!(s(obj, "/metadata/name"));
    let created = age(obj, "/metadata/creationTimestamp", now);
    match (rt.group, rt.kind) {
        ("", "Pod") => {
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum();
            let mut status = s(obj, "/status/phase");
            for c in &statuses {
                let waiting = s(c, "/state/waiting/reason");
                let terminated = s(c, "/state/terminated/reason");
                if !waiting.is_empty() {
                    status = waiting;
                } else if !terminated.is_empty() && status != "Succeeded" {
                    status = terminated;
                }
            }
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                status = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                json!(created),
                json!(or_none(s(obj, "/status/podIP"))),
                json!(or_none(s(obj, "/spec/nodeName"))),
            ]
        }
        ("", "Service") => {
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| format!("{}/{}", s(p, "/port"), s(p, "/protocol")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let selector = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(s(obj, "/spec/type")),
                json!(or_none(s(obj, "/spec/clusterIP"))),
                json!("<none>"),
                json!(or_none(ports)),
                json!(created),
                json!(or_none(selector)),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(obj, "/status/phase")), json!(created)],
        ("", "Node") => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                })
                .map(|c| s(c, "/status") == "True");
            let status = match ready {
                Some(true) => "Ready",
                Some(false) => "NotReady",
                None => "Unknown",
            };
            vec![
                name,
                json!(status),
                json!("<none>"),
                json!(created),
                json!(s(obj, "/status/nodeInfo/kubeletVersion")),
            ]
        }
        ("coordination.k8s.io", "Lease") => {
            vec![name, json!(s(obj, "/spec/holderIdentity")), json!(created)]
        }
        (group, "Event") => {
            let (regarding, message) = if group.is_empty() {
                ("/involvedObject", "/message")
            } else {
                ("/regarding", "/note")
            };
            vec![
                json!(created),
                json!(s(obj, "/type")),
                json!(s(obj, "/reason")),
                json!(format!(
                    "{}/{}",
                    s(obj, &format!("{regarding}/kind")).to_lowercase(),
                    s(obj, &format!("{regarding}/name"))
                )),
                json!(s(obj, message)),
            ]
        }
        ("spawner.dev", _) => vec![
            name,
            json!(s(obj, "/status/phase")),
            json!(s(obj, "/status/nodeName")),
            json!(s(obj, "/spec/key")),
            json!(created),
        ],
        _ => vec![name, json!(created)],
    }
}

/// `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A Table of `objects`; `with_columns` is false for all but the first watch event.
pub fn table(
    rt: &ResourceType,
    objects: &[&Value],
    include: IncludeObject,
    list_meta: Value,
    with_columns: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(rt, o, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o),
                IncludeObject::Object => row["object"] = (*o).clone(),
            }
            row
        })
        .collect();
    let defs: Vec<Value> = if with_columns {
        columns(rt)
            .iter()
            .map(|c| {
                json!({"name": c.name, "type": c.ty, "format": c.format, "description": c.description, "priority": c.priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}
