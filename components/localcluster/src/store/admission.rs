//! Admission: type and namespace checks, name and schema validation, defaults, and what an
//! update may change.

use serde_json::{Value, json};

use super::object::{is_deleting, meta_mut, name_of};
use super::{NAMESPACE_FINALIZER, Store};
use crate::error::{ApiError, FieldCause};
use crate::resources::{self, NameRule};

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

pub(super) fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Validates a name; returns the 422 causes (empty when valid).
pub fn name_causes(rule: NameRule, name: &str) -> Vec<FieldCause> {
    let field = "metadata.name";
    let mut causes = Vec::new();
    match rule {
        NameRule::Dns1123Subdomain => {
            if name.len() > 253 {
                causes.push(FieldCause::invalid_value(
                    field,
                    name,
                    "must be no more than 253 characters",
                ));
            }
            if !name.split('.').all(is_label) {
                causes.push(FieldCause::invalid_value(field, name, SUBDOMAIN_MSG));
            }
        }
        NameRule::Dns1123Label | NameRule::Dns1035Label => {
            if name.len() > 63 {
                causes.push(FieldCause::invalid_value(
                    field,
                    name,
                    "must be no more than 63 characters",
                ));
            }
            let ok = is_label(name)
                && (rule == NameRule::Dns1123Label || name.as_bytes()[0].is_ascii_lowercase());
            if !ok {
                let msg = if rule == NameRule::Dns1123Label {
                    LABEL_MSG
                } else {
                    DNS1035_MSG
                };
                causes.push(FieldCause::invalid_value(field, name, msg));
            }
        }
    }
    causes
}

/// Fields of a Pod spec that an update may change.
pub(super) const POD_MUTABLE_SPEC: &str = "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

pub(super) fn pod_spec_without_mutable(spec: &Value) -> Value {
    let mut s = spec.clone();
    if let Some(m) = s.as_object_mut() {
        m.remove("activeDeadlineSeconds");
        m.remove("tolerations");
        m.remove("terminationGracePeriodSeconds");
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = m.get_mut(list) {
                for c in cs {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
    }
    s
}

/// Whether `a` and `b` are equal in every top-level field but those `skip` names. Compares
/// in place: the store runs this on every write, and cloning whole objects to compare them
/// was a visible share of its CPU.
pub(super) fn equal_except(a: &Value, b: &Value, skip: &dyn Fn(&str) -> bool) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let fields =
                |m: &'_ serde_json::Map<String, Value>| m.iter().filter(|(k, _)| !skip(k)).count();
            fields(a) == fields(b)
                && a.iter()
                    .filter(|(k, _)| !skip(k))
                    .all(|(k, v)| b.get(k) == Some(v))
        }
        _ => a == b,
    }
}

/// Whether the spec part (all but metadata, status, kind and apiVersion) of two objects is the
/// same: a change there bumps `metadata.generation`.
pub(super) fn same_spec_part(a: &Value, b: &Value) -> bool {
    equal_except(a, b, &|k| {
        matches!(k, "metadata" | "status" | "kind" | "apiVersion")
    })
}

/// Whether `new` (which has no resourceVersion) equals `old` but for old's resourceVersion.
pub(super) fn same_but_resource_version(new: &Value, old: &Value) -> bool {
    equal_except(new, old, &|k| k == "metadata")
        && match (new.get("metadata"), old.get("metadata")) {
            (Some(n), Some(o)) => equal_except(n, o, &|k| k == "resourceVersion"),
            (n, o) => n == o,
        }
}

pub(super) fn qos_class(spec: &Value) -> &'static str {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let req = c.pointer("/resources/requests");
        let lim = c.pointer("/resources/limits");
        let has = |v: Option<&Value>| v.and_then(Value::as_object).is_some_and(|m| !m.is_empty());
        if has(req) || has(lim) {
            any = true;
        }
        for r in ["cpu", "memory"] {
            let l = lim.and_then(|l| l.get(r));
            let q = req.and_then(|q| q.get(r)).or(l);
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

impl Store {
    pub(super) fn check_namespace(&self, ns: &str) -> Result<(), ApiError> {
        let types = &self.types;
        match self.kinds[resources::NAMESPACES]
            .objects
            .get(&(String::new(), ns.to_string()))
        {
            None => Err(ApiError::not_found(&types[resources::NAMESPACES], ns)),
            Some(n) if is_deleting(n) => Err(ApiError::forbidden(
                format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
                Some(
                    json!({"causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Checks `kind`/`apiVersion` in a body against the URL's type.
    pub(super) fn check_type(&self, kind: usize, obj: &Value) -> Result<(), ApiError> {
        let rt = &self.types[kind];
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && !k.is_empty()
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        if let Some(v) = obj.get("apiVersion").and_then(Value::as_str)
            && !v.is_empty()
            && v != rt.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        Ok(())
    }

    /// Prunes, defaults and validates a custom resource against its schema, then validates
    /// names and the rest as the built-in registries do.
    pub(super) fn validate(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
        let rt = &self.types[kind];
        let schema_causes = match &rt.schema {
            Some(schema) => crate::schema::apply(schema, obj),
            None => Vec::new(),
        };
        let name = name_of(obj);
        let mut causes = name_causes(rt.name_rule, name);
        causes.extend(schema_causes);
        if let Some(refs) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        {
            for r in refs {
                for f in ["apiVersion", "kind", "name", "uid"] {
                    if r.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                        causes.push(FieldCause::invalid_value(
                            &format!("metadata.ownerReferences.{f}"),
                            "",
                            &format!("{f} must not be empty"),
                        ));
                    }
                }
            }
        }
        if kind == resources::PODS {
            let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
            match containers {
                None => causes.push(FieldCause::required("spec.containers", "")),
                Some(cs) if cs.is_empty() => {
                    causes.push(FieldCause::required("spec.containers", ""))
                }
                Some(cs) => {
                    for (i, c) in cs.iter().enumerate() {
                        if c.get("name")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                        {
                            causes.push(FieldCause::required(
                                &format!("spec.containers[{i}].name"),
                                "",
                            ));
                        }
                        if c.get("image")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                        {
                            causes.push(FieldCause::required(
                                &format!("spec.containers[{i}].image"),
                                "",
                            ));
                        }
                    }
                }
            }
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(rt, name, causes))
        }
    }

    pub(super) fn apply_defaults(&mut self, kind: usize, obj: &mut Value) {
        if kind == resources::PODS {
            let spec = &mut obj["spec"];
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("terminationGracePeriodSeconds", json!(30)),
                ("dnsPolicy", json!("ClusterFirst")),
                ("schedulerName", json!("default-scheduler")),
                ("securityContext", json!({})),
                ("enableServiceLinks", json!(true)),
            ] {
                if spec.get(k).is_none() {
                    spec[k] = v;
                }
            }
            if let Some(Value::Array(cs)) = spec.get_mut("containers") {
                for c in cs {
                    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
                    let tag = image.rsplit('/').next().unwrap_or("");
                    let policy = if !tag.contains(':') || tag.ends_with(":latest") {
                        "Always"
                    } else {
                        "IfNotPresent"
                    };
                    for (k, v) in [
                        ("terminationMessagePath", json!("/dev/termination-log")),
                        ("terminationMessagePolicy", json!("File")),
                        ("imagePullPolicy", json!(policy)),
                        ("resources", json!({})),
                    ] {
                        if c.get(k).is_none() {
                            c[k] = v;
                        }
                    }
                }
            }
        } else if kind == resources::SERVICES {
            let spec = &mut obj["spec"];
            if spec.get("type").is_none() {
                spec["type"] = json!("ClusterIP");
            }
            if spec.get("sessionAffinity").is_none() {
                spec["sessionAffinity"] = json!("None");
            }
            if spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                let n = self.next_service_ip;
                self.next_service_ip += 1;
                let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
            if spec.get("ipFamilies").is_none() {
                spec["ipFamilies"] = json!(["IPv4"]);
                spec["ipFamilyPolicy"] = json!("SingleStack");
            }
            if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                for p in ports {
                    if p.get("protocol").is_none() {
                        p["protocol"] = json!("TCP");
                    }
                    if p.get("targetPort").is_none()
                        && let Some(port) = p.get("port").cloned()
                    {
                        p["targetPort"] = port;
                    }
                }
            }
        } else if kind == resources::NAMESPACES {
            let name = name_of(obj).to_string();
            let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
            labels["kubernetes.io/metadata.name"] = json!(name);
            obj["spec"] = json!({"finalizers": [NAMESPACE_FINALIZER]});
        }
    }
}

#[cfg(test)]
mod comparison_tests {
    use super::*;

    #[test]
    fn the_spec_part_ignores_metadata_status_and_type() {
        let a = json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "a"},
                       "spec": {"x": 1}, "status": {"phase": "Running"}});
        let b = json!({"kind": "Pod", "metadata": {"name": "b"}, "spec": {"x": 1}});
        assert!(same_spec_part(&a, &b));
        let c = json!({"metadata": {"name": "a"}, "spec": {"x": 2}});
        assert!(!same_spec_part(&a, &c));
        // A field only one side has is a difference.
        let d = json!({"spec": {"x": 1}, "data": {}});
        assert!(!same_spec_part(&b, &d));
        assert!(!same_spec_part(&d, &b));
    }

    #[test]
    fn only_the_resource_version_may_differ() {
        let old = json!({"metadata": {"name": "a", "resourceVersion": "7"}, "spec": {"x": 1}});
        let same = json!({"metadata": {"name": "a"}, "spec": {"x": 1}});
        assert!(same_but_resource_version(&same, &old));
        let relabelled = json!({"metadata": {"name": "a", "labels": {}}, "spec": {"x": 1}});
        assert!(!same_but_resource_version(&relabelled, &old));
        let respecced = json!({"metadata": {"name": "a"}, "spec": {"x": 2}});
        assert!(!same_but_resource_version(&respecced, &old));
        let with_status = json!({"metadata": {"name": "a"}, "spec": {"x": 1}, "status": {}});
        assert!(!same_but_resource_version(&with_status, &old));
    }
}
