//! JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch, applied to
//! JSON values.
//!
//! Strategic merge patches follow the built-in types' list strategies by field name (see
//! [`strategic_merge_patch`] and docs/localcluster.md for what is and is not covered).

use serde_json::Value;

/// RFC 7386: `null` deletes, objects merge recursively, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsonPatchError {
    #[error("the patch is not a list of operations: {0}")]
    Malformed(String),
    #[error("{op} operation does not apply: doc is missing path: \"{path}\"")]
    MissingPath { op: String, path: String },
    #[error("testing value {path} failed: test failed")]
    TestFailed { path: String },
}

fn unescape(seg: &str) -> String {
    seg.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, ()> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or(())?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, segs: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for seg in segs {
        cur = match cur {
            Value::Object(m) => m.get_mut(seg)?,
            Value::Array(a) => a.get_mut(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn get<'a>(doc: &'a Value, segs: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in segs {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn add(doc: &mut Value, segs: &[String], value: Value) -> Option<()> {
    let Some((last, parent)) = segs.split_last() else {
        *doc = value;
        return Some(());
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Some(())
        }
        Value::Array(a) => {
            let idx = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>().ok()?
            };
            if idx > a.len() {
                return None;
            }
            a.insert(idx, value);
            Some(())
        }
        _ => None,
    }
}

fn remove(doc: &mut Value, segs: &[String]) -> Option<Value> {
    let (last, parent) = segs.split_last()?;
    match parent_mut(doc, parent)? {
        Value::Object(m) => m.remove(last),
        Value::Array(a) => {
            let idx = last.parse::<usize>().ok()?;
            (idx < a.len()).then(|| a.remove(idx))
        }
        _ => None,
    }
}

/// Applies an RFC 6902 patch; on error `doc` may be partially modified (callers patch a copy).
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| JsonPatchError::Malformed(patch.to_string()))?;
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Malformed(op.to_string()))?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Malformed(op.to_string()))?;
        let segs = split_pointer(path).map_err(|_| JsonPatchError::Malformed(op.to_string()))?;
        let missing = || JsonPatchError::MissingPath {
            op: name.to_string(),
            path: path.to_string(),
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::Malformed(op.to_string()))
        };
        let from = || -> Result<Vec<String>, JsonPatchError> {
            op.get("from")
                .and_then(Value::as_str)
                .and_then(|f| split_pointer(f).ok())
                .ok_or_else(|| JsonPatchError::Malformed(op.to_string()))
        };
        match name {
            "add" => add(doc, &segs, value()?).ok_or_else(missing)?,
            "remove" => {
                remove(doc, &segs).ok_or_else(missing)?;
            }
            "replace" => {
                let v = value()?;
                if segs.is_empty() {
                    *doc = v;
                } else {
                    let slot = parent_mut(doc, &segs).ok_or_else(missing)?;
                    *slot = v;
                }
            }
            "move" => {
                let v = remove(doc, &from()?).ok_or_else(missing)?;
                add(doc, &segs, v).ok_or_else(missing)?;
            }
            "copy" => {
                let v = get(doc, &from()?).cloned().ok_or_else(missing)?;
                add(doc, &segs, v).ok_or_else(missing)?;
            }
            "test" => {
                let want = value()?;
                if get(doc, &segs) != Some(&want) {
                    return Err(JsonPatchError::TestFailed {
                        path: path.to_string(),
                    });
                }
            }
            _ => return Err(JsonPatchError::Malformed(op.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            doc,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
    }

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "add", "path": "/a/b/0", "value": 0},
                {"op": "remove", "path": "/a/b/1"},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e~1f"},
                {"op": "test", "path": "/c", "value": "y"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"b": [0, 2, 3]}, "c": "y", "e/f": "y"}));
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/c", "value": "n"}]),
        );
        assert!(matches!(err, Err(JsonPatchError::TestFailed { .. })));
        let err = json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}]));
        assert!(matches!(err, Err(JsonPatchError::MissingPath { .. })));
    }
}

/// The merge key of a list field in a strategic merge patch, as the built-in types declare it
/// (`patchMergeKey`); `None` for lists that are replaced.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        // Container ports merge on containerPort, Service ports on port.
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Primitive lists whose strategy is `merge` (union) rather than replace.
fn is_merged_primitive_list(field: &str) -> bool {
    field == "finalizers"
}

/// Applies a strategic merge patch the way the built-in types declare their strategies: maps
/// merge as in a JSON merge patch; lists of objects with a merge key (`containers` by `name`,
/// Service `ports` by `port`, ...) merge item by item; `$patch: delete|replace`,
/// `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` (ordering is ignored) are
/// understood; other lists are replaced.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = patch.clone();
            if let Some(m) = replaced.as_object_mut() {
                m.remove("$patch");
            }
            *target = replaced;
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(t) = target else {
        return;
    };
    for (k, v) in p {
        if k == "$patch" || k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(existing)), Value::Array(items)) => {
                if let Some(key) = merge_key(k, items) {
                    merge_list_by_key(existing, items, key);
                } else if is_merged_primitive_list(k) {
                    for item in items {
                        if !existing.contains(item) {
                            existing.push(item.clone());
                        }
                    }
                } else {
                    *existing = items.clone();
                }
            }
            (Some(existing @ Value::Object(_)), Value::Object(_)) => {
                strategic_merge_patch(existing, v);
                if existing.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                // New field: strip directives from the inserted value.
                let mut fresh = Value::Null;
                strategic_merge_patch_new(&mut fresh, v);
                t.insert(k.clone(), fresh);
            }
        }
    }
}

/// A patch value for a field that does not exist yet, with directives removed.
fn strategic_merge_patch_new(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(_) => {
            *target = Value::Object(Default::default());
            strategic_merge_patch(target, patch);
        }
        Value::Array(items) => {
            *target = Value::Array(
                items
                    .iter()
                    .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                    .map(|i| {
                        let mut v = Value::Null;
                        strategic_merge_patch_new(&mut v, i);
                        v
                    })
                    .collect(),
            );
        }
        other => *target = other.clone(),
    }
}

fn merge_list_by_key(existing: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let Some(id) = item.get(key) else {
            existing.push(item.clone());
            continue;
        };
        let pos = existing.iter().position(|e| e.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge_patch(&mut existing[i], item),
            (None, false) => {
                let mut fresh = Value::Null;
                strategic_merge_patch_new(&mut fresh, item);
                existing.push(fresh);
            }
        }
    }
}

#[cfg(test)]
mod strategic_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_merge_by_key_and_directives_apply() {
        let mut pod = json!({
            "metadata": {"labels": {"a": "1"}, "finalizers": ["x"]},
            "spec": {"containers": [
                {"name": "app", "image": "v1", "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "s1"},
            ]},
        });
        strategic_merge_patch(
            &mut pod,
            &json!({
                "metadata": {"labels": {"b": "2"}, "finalizers": ["y"]},
                "spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
                    "containers": [
                        {"name": "app", "image": "v2", "env": [{"name": "B", "value": "2"}]},
                        {"name": "side", "$patch": "delete"},
                        {"name": "new", "image": "n1"},
                    ],
                },
            }),
        );
        assert_eq!(
            pod,
            json!({
                "metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
                "spec": {"containers": [
                    {"name": "app", "image": "v2", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "ports": [{"containerPort": 80}]},
                    {"name": "new", "image": "n1"},
                ]},
            })
        );
        let mut svc = json!({"spec": {"ports": [{"name": "a", "port": 80}], "selector": {"x": "1", "y": "2"}}});
        strategic_merge_patch(
            &mut svc,
            &json!({"spec": {"ports": [{"name": "b", "port": 81}], "selector": {"$patch": "replace", "z": "3"}}}),
        );
        assert_eq!(
            svc,
            json!({"spec": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}], "selector": {"z": "3"}}})
        );
        let mut meta = json!({"metadata": {"finalizers": ["x", "y"]}});
        strategic_merge_patch(
            &mut meta,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        assert_eq!(meta, json!({"metadata": {"finalizers": ["y"]}}));
    }
}
