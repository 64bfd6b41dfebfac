//! The resource types localcluster serves, with what discovery, validation and printing need.

use std::sync::Arc;

use serde_json::{Value, json};

/// How the `status` of a new object is treated on create, as each real registry strategy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOnCreate {
    /// No status subresource: the object is stored as sent.
    Keep,
    /// Status is reset (custom resources with a status subresource, Services).
    Drop,
    /// Pods start `Pending`.
    PodPending,
    /// Namespaces start `Active`.
    NamespaceActive,
}

/// The rule a resource's names must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    Dns1123Subdomain,
    Dns1123Label,
    Dns1035Label,
}

/// One served resource type.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub namespaced: bool,
    pub status_subresource: bool,
    pub status_on_create: StatusOnCreate,
    /// `metadata.generation` is maintained (bumped on spec changes).
    pub has_generation: bool,
    /// PUT without `metadata.resourceVersion` is accepted (the registry's
    /// `AllowUnconditionalUpdate`).
    pub unconditional_update: bool,
    pub name_rule: NameRule,
    /// Field selector labels this type supports besides `metadata.name`/`metadata.namespace`.
    pub field_labels: &'static [&'static str],
    /// The structural schema of a custom resource (its CRD's `openAPIV3Schema`).
    pub schema: Option<Arc<Value>>,
    /// A completed DELETE answers with the deleted object (Pods, Services, Namespaces);
    /// otherwise with a `Status` of `Success` (the registry's `ReturnDeletedObject`).
    pub return_deleted_object: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `sessionlivedbackends.spawner.dev`: how messages name the resource.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Pod`, `SessionLivedBackend.spawner.dev`: how Invalid messages name the kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    pub fn details(&self, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": self.plural});
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }

    pub fn supports_field(&self, label: &str) -> bool {
        label == "metadata.name"
            || (label == "metadata.namespace" && self.namespaced)
            || self.field_labels.contains(&label)
    }

    /// The `APIResource` entries of discovery for this type (the resource and its status).
    pub fn discovery(&self) -> Vec<Value> {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];
const NEW_EVENT_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

/// Every served type; the index into this list identifies a type inside the store.
pub fn all() -> Vec<ResourceType> {
    let base = ResourceType {
        group: "",
        version: "v1",
        kind: "",
        plural: "",
        singular: "",
        short_names: &[],
        categories: &[],
        namespaced: true,
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        has_generation: false,
        unconditional_update: true,
        name_rule: NameRule::Dns1123Subdomain,
        field_labels: &[],
        schema: None,
        return_deleted_object: false,
    };
    vec![
        ResourceType {
            kind: "Namespace",
            return_deleted_object: true,
            plural: "namespaces",
            singular: "namespace",
            short_names: &["ns"],
            namespaced: false,
            status_subresource: true,
            status_on_create: StatusOnCreate::NamespaceActive,
            name_rule: NameRule::Dns1123Label,
            field_labels: &["status.phase"],
            ..base.clone()
        },
        ResourceType {
            kind: "Node",
            plural: "nodes",
            singular: "node",
            short_names: &["no"],
            namespaced: false,
            status_subresource: true,
            field_labels: &["spec.unschedulable"],
            ..base.clone()
        },
        ResourceType {
            kind: "Pod",
            return_deleted_object: true,
            plural: "pods",
            singular: "pod",
            short_names: &["po"],
            categories: &["all"],
            status_subresource: true,
            status_on_create: StatusOnCreate::PodPending,
            has_generation: true,
            field_labels: POD_FIELDS,
            ..base.clone()
        },
        ResourceType {
            kind: "Service",
            return_deleted_object: true,
            plural: "services",
            singular: "service",
            short_names: &["svc"],
            categories: &["all"],
            status_subresource: true,
            status_on_create: StatusOnCreate::Drop,
            name_rule: NameRule::Dns1035Label,
            field_labels: &["spec.clusterIP", "spec.type"],
            ..base.clone()
        },
        ResourceType {
            kind: "Event",
            plural: "events",
            singular: "event",
            short_names: &["ev"],
            field_labels: EVENT_FIELDS,
            ..base.clone()
        },
        ResourceType {
            group: "events.k8s.io",
            kind: "Event",
            plural: "events",
            singular: "event",
            short_names: &["ev"],
            field_labels: NEW_EVENT_FIELDS,
            ..base.clone()
        },
        ResourceType {
            group: "coordination.k8s.io",
            kind: "Lease",
            plural: "leases",
            singular: "lease",
            ..base.clone()
        },
        ResourceType {
            group: "spawner.dev",
            kind: "SessionLivedBackend",
            plural: "sessionlivedbackends",
            singular: "sessionlivedbackend",
            short_names: &["slab"],
            categories: &[],
            status_subresource: true,
            status_on_create: StatusOnCreate::Drop,
            has_generation: true,
            unconditional_update: false,
            schema: backend_schema(),
            ..base
        },
    ]
}

/// The SessionLivedBackend CRD's schema, from the CRD core generates (`deploy/crd.yaml`).
fn backend_schema() -> Option<Arc<Value>> {
    let yaml = spawner_core::resource::crd_yaml().ok()?;
    let crd: Value = serde_yaml::from_str(&yaml).ok()?;
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
        .cloned()
        .map(Arc::new)
}

/// Index of the Namespace type in [`all`].
pub const NAMESPACES: usize = 0;
/// Index of the Pod type in [`all`].
pub const PODS: usize = 2;
/// Index of the Service type in [`all`].
pub const SERVICES: usize = 3;
/// Index of the core/v1 Event type in [`all`].
pub const CORE_EVENTS: usize = 4;
/// Index of the events.k8s.io/v1 Event type in [`all`]: stored as core Events.
pub const NEW_EVENTS: usize = 5;

/// `(group, version)` pairs served under `/apis`, in discovery order.
pub fn groups(types: &[ResourceType]) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for t in types {
        if !t.group.is_empty() && !out.contains(&(t.group, t.version)) {
            out.push((t.group, t.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_name_the_right_types() {
        let types = all();
        assert_eq!(types[NAMESPACES].kind, "Namespace");
        assert_eq!(types[PODS].kind, "Pod");
        assert_eq!(types[SERVICES].kind, "Service");
        assert_eq!(
            (types[CORE_EVENTS].group, types[CORE_EVENTS].kind),
            ("", "Event")
        );
        assert_eq!(types[NEW_EVENTS].group, "events.k8s.io");
        let slab = types.iter().find(|t| t.group == "spawner.dev").unwrap();
        assert!(slab.schema.is_some(), "the backend CRD schema loads");
    }

    #[test]
    fn messages_name_grouped_resources_with_their_group() {
        let types = all();
        let slab = types.iter().find(|t| t.group == "spawner.dev").unwrap();
        assert_eq!(slab.qualified_plural(), "sessionlivedbackends.spawner.dev");
        assert_eq!(slab.qualified_kind(), "SessionLivedBackend.spawner.dev");
        assert_eq!(types[PODS].qualified_plural(), "pods");
    }
}
