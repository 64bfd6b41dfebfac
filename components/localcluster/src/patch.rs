//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902), applied to JSON values.
//!
//! Strategic merge patches are applied as merge patches: maps merge the same way, but lists
//! are replaced wholesale instead of merged by key (documented gap in docs/localcluster.md).

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
