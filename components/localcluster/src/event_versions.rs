//! `events.k8s.io/v1` Events are a second representation of core `v1` Events, as on the real
//! server: one stored object, visible (and writable) through both APIs.

use serde_json::{Map, Value};

/// `(events.k8s.io/v1 field, core/v1 field)` pairs that are renamed between the two.
const RENAMED: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(obj: &Value, from_new: bool, api_version: &str) -> Value {
    let Some(map) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::with_capacity(map.len());
    for (k, v) in map {
        let renamed = RENAMED.iter().find_map(|(new, core)| {
            if from_new && k == new {
                Some(*core)
            } else if !from_new && k == core {
                Some(*new)
            } else {
                None
            }
        });
        out.insert(renamed.unwrap_or(k).to_string(), v.clone());
    }
    if out.contains_key("apiVersion") || !from_new {
        out.insert("apiVersion".into(), Value::String(api_version.into()));
    }
    Value::Object(out)
}

/// An `events.k8s.io/v1` Event as the core `v1` Event it is stored as.
pub fn to_core(obj: &Value) -> Value {
    let mut v = rename(obj, true, "v1");
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::String("v1".into()));
    }
    v
}

/// A stored core Event as `events.k8s.io/v1`.
pub fn to_new(obj: &Value) -> Value {
    rename(obj, false, "events.k8s.io/v1")
}

/// Translates an `events.k8s.io` field selector into the core Event's fields.
pub fn field_selector_to_core(selector: &str) -> String {
    selector
        .split(',')
        .map(|part| {
            let part = part.trim();
            for (new, core) in RENAMED {
                if let Some(rest) = part.strip_prefix(new)
                    && (rest.starts_with('.') || rest.starts_with('=') || rest.starts_with('!'))
                {
                    return format!("{core}{rest}");
                }
            }
            part.to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn representations_round_trip() {
        let new = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"},
            "note": "hello", "reason": "R", "type": "Normal",
            "reportingController": "spawner.dev/controller", "reportingInstance": "c-1",
            "eventTime": "2026-01-01T00:00:00.000000Z", "action": "Spawn",
            "deprecatedCount": 2,
        });
        let core = to_core(&new);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "spawner.dev/controller");
        assert_eq!(core["count"], 2);
        assert_eq!(to_new(&core), new);
    }

    #[test]
    fn field_selectors_are_translated() {
        assert_eq!(
            field_selector_to_core("regarding.name=p,reason=R,reportingController!=x"),
            "involvedObject.name=p,reason=R,reportingComponent!=x"
        );
    }
}
