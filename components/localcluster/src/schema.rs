//! Structural-schema handling of custom resources, as the real API server applies a CRD's
//! `openAPIV3Schema`: prune unknown fields, apply defaults, then validate (types, required
//! fields, numeric bounds, string lengths, item counts, enums).

use serde_json::{Map, Value};

use crate::error::FieldCause;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        Value::Null => "\"null\"".into(),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(a) => a.len().to_string(),
        other => other.to_string(),
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt_bound(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{}", b as i64)
    } else {
        b.to_string()
    }
}

/// Prunes unknown fields and fills defaults in `value` following `schema`.
pub fn prune_and_default(schema: &Value, value: &mut Value) {
    let Some(obj) = value.as_object_mut() else {
        if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
            for item in items {
                prune_and_default(item_schema, item);
            }
        }
        return;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let additional = schema.get("additionalProperties");
    if let Some(props) = props {
        if !preserve && additional.is_none() {
            obj.retain(|k, _| props.contains_key(k));
        }
        for (k, sub) in props {
            // A null for a field with a default is replaced by the default.
            if obj.get(k).is_some_and(Value::is_null) && sub.get("default").is_some() {
                obj.remove(k);
            }
            if !obj.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                obj.insert(k.clone(), d.clone());
            }
            if let Some(child) = obj.get_mut(k) {
                prune_and_default(sub, child);
            }
        }
    } else if let Some(sub) = additional.filter(|a| a.is_object()) {
        for child in obj.values_mut() {
            prune_and_default(sub, child);
        }
    }
}

/// The fields `prune_and_default` would drop, as paths (`bar`, `spec.foo`), depth first in key
/// order: what `fieldValidation=Strict` reports.
pub fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                == Some(true);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in obj {
                let child = join(path, k);
                match (props.and_then(|p| p.get(k)), additional) {
                    (Some(sub), _) | (None, Some(sub)) => unknown_fields(sub, v, &child, out),
                    (None, None) if props.is_some() && !preserve => out.push(child),
                    (None, None) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(sub, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Validates `value` at `path` against `schema`, appending 422 causes.
pub fn validate(schema: &Value, value: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = type_name(value);
        let ok = got == want || (want == "number" && got == "integer");
        if !ok {
            causes.push(FieldCause {
                reason: "FieldValueTypeInvalid",
                field: path.to_string(),
                // The server shows the value's type, not the value, in this message.
                message: format!(
                    "Invalid value: \"{got}\": {path} in body must be of type {want}: \"{got}\""
                ),
            });
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list = options
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        causes.push(FieldCause {
            reason: "FieldValueNotSupported",
            field: path.to_string(),
            message: format!(
                "Unsupported value: {}: supported values: {list}",
                shown(value)
            ),
        });
    }
    let invalid = |why: String| FieldCause {
        reason: "FieldValueInvalid",
        field: path.to_string(),
        message: format!("Invalid value: {}: {path} in body {why}", shown(value)),
    };
    if let Some(n) = number(value) {
        if let Some(max) = schema.get("maximum").and_then(number)
            && n > max
        {
            causes.push(invalid(format!(
                "should be less than or equal to {}",
                fmt_bound(max)
            )));
        }
        if let Some(min) = schema.get("minimum").and_then(number)
            && n < min
        {
            causes.push(invalid(format!(
                "should be greater than or equal to {}",
                fmt_bound(min)
            )));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            causes.push(invalid(format!("should be at most {max} chars long")));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            causes.push(invalid(format!("should be at least {min} chars long")));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && (items.len() as u64) < min
        {
            causes.push(invalid(format!("should have at least {min} items")));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && (items.len() as u64) > max
        {
            causes.push(invalid(format!("should have at most {max} items")));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"), causes);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        let empty = Map::new();
        let props = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    causes.push(FieldCause::required(&join(path, r), ""));
                }
            }
        }
        for (k, v) in obj {
            if let Some(sub) = props.get(k) {
                validate(sub, v, &join(path, k), causes);
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Applies a CRD's top-level schema to a custom resource: everything but `apiVersion`, `kind`
/// and `metadata`, which the server handles itself.
pub fn apply(schema: &Value, obj: &mut Value) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        return causes;
    };
    let meta = map.remove("metadata");
    let api_version = map.remove("apiVersion");
    let kind = map.remove("kind");
    prune_and_default(schema, obj);
    validate(schema, obj, "", &mut causes);
    if let Some(map) = obj.as_object_mut() {
        for (k, v) in [
            ("metadata", meta),
            ("apiVersion", api_version),
            ("kind", kind),
        ] {
            if let Some(v) = v {
                map.insert(k.to_string(), v);
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["template"],
                    "properties": {
                        "port": {"type": "integer", "minimum": 1.0, "maximum": 65535.0, "default": 8080},
                        "key": {"type": "string", "minLength": 1, "nullable": true},
                        "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                            "properties": {"list": {"type": "array", "minItems": 1, "items": {"type": "string"}}}},
                    }
                },
                "status": {"type": "object", "properties": {"phase": {"type": "string", "enum": ["A", "B"]}}},
            }
        })
    }

    #[test]
    fn prunes_defaults_and_keeps_preserved_fields() {
        let mut obj = json!({"metadata": {"name": "x"}, "spec": {"template": {"extra": 1, "list": ["a"]}, "unknown": true}, "bogus": 1});
        let causes = apply(&schema(), &mut obj);
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(
            obj,
            json!({"metadata": {"name": "x"}, "spec": {"port": 8080, "template": {"extra": 1, "list": ["a"]}}})
        );
    }

    #[test]
    fn strict_validation_lists_unknown_fields() {
        let obj = json!({"bar": 1, "spec": {"foo": 2, "template": {"kept": 3}}});
        let mut unknown = Vec::new();
        let mut top = schema();
        top["properties"]["metadata"] = json!({"type": "object"});
        unknown_fields(&top, &obj, "", &mut unknown);
        assert_eq!(unknown, ["bar", "spec.foo"]);
    }

    #[test]
    fn reports_causes_like_the_real_server() {
        let mut obj = json!({"spec": {"port": 70000, "key": "", "template": {"list": []}}, "status": {"phase": "C"}});
        let causes = apply(&schema(), &mut obj);
        let messages: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        assert!(messages.contains(&"spec.port: Invalid value: 70000: spec.port in body should be less than or equal to 65535".to_string()), "{messages:?}");
        assert!(
            messages.contains(
                &"spec.key: Invalid value: \"\": spec.key in body should be at least 1 chars long"
                    .to_string()
            ),
            "{messages:?}"
        );
        assert!(messages.contains(&"spec.template.list: Invalid value: 0: spec.template.list in body should have at least 1 items".to_string()), "{messages:?}");
        assert!(
            messages.contains(
                &"status.phase: Unsupported value: \"C\": supported values: \"A\", \"B\""
                    .to_string()
            ),
            "{messages:?}"
        );
        let mut missing = json!({"spec": {"port": "x"}});
        let causes = apply(&schema(), &mut missing);
        let messages: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        assert!(
            messages.contains(&"spec.template: Required value".to_string()),
            "{messages:?}"
        );
        assert!(messages.contains(&"spec.port: Invalid value: \"string\": spec.port in body must be of type integer: \"string\"".to_string()), "{messages:?}");
    }
}
