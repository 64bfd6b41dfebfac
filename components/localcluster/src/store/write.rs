//! Writes: create, update (PUT), patch and pod binding.

use std::sync::Arc;

use serde_json::{Value, json};

use super::admission::{
    POD_MUTABLE_SPEC, pod_spec_without_mutable, qos_class, same_but_resource_version,
    same_spec_part,
};
use super::gc::Work;
use super::object::{
    finalizers_of, is_deleting, meta_mut, name_of, name_suffix, namespace_of, new_uid, owner_uids,
    rv_of,
};
use super::watch::ChangeType;
use super::{Obj, ObjKey, Store};
use crate::error::{ApiError, FieldCause};
use crate::patch;
use crate::resources::{self, ResourceType, StatusOnCreate};

/// What a PUT or PATCH writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Main,
    Status,
}

/// The kind of patch in a PATCH request's Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    StrategicMerge,
    Apply,
}

/// Another representation of a stored type (events.k8s.io Events over core Events): patches
/// apply to the representation the client sees.
pub struct View {
    pub to_view: fn(&Value) -> Value,
    pub from_view: fn(&Value) -> Value,
}

impl Store {
    /// POST: creates an object (`namespace` is the URL's).
    pub fn create(
        &mut self,
        kind: usize,
        namespace: Option<&str>,
        mut obj: Value,
        now: &str,
        dry_run: bool,
    ) -> Result<Obj, ApiError> {
        let rt = self.types[kind].clone();
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!(
                "the object provided is unrecognized (must be of type {})",
                rt.kind
            )));
        }
        self.check_type(kind, &obj)?;
        let ns = if rt.namespaced {
            let url_ns = namespace.unwrap_or("");
            let body_ns = namespace_of(&obj).to_string();
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(url_ns));
            url_ns.to_string()
        } else {
            meta_mut(&mut obj).remove("namespace");
            String::new()
        };
        if name_of(&obj).is_empty() {
            self.generate_name(kind, &rt, &ns, &mut obj)?;
        }
        let name = name_of(&obj).to_string();
        if rt.status_on_create == StatusOnCreate::Drop
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        self.validate(kind, &mut obj)?;
        crate::decode::check(kind, &rt, &obj)?;
        if rt.namespaced {
            self.check_namespace(&ns)?;
        }
        if self.kinds[kind]
            .objects
            .contains_key(&(ns.clone(), name.clone()))
        {
            return Err(ApiError::already_exists(&rt, &name));
        }
        obj["kind"] = json!(rt.kind);
        obj["apiVersion"] = json!(rt.api_version());
        {
            let meta = meta_mut(&mut obj);
            meta.insert("uid".into(), json!(new_uid(self.rv)));
            meta.insert("creationTimestamp".into(), json!(now));
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
            meta.remove("selfLink");
            if rt.has_generation {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        match rt.status_on_create {
            StatusOnCreate::Keep => {}
            StatusOnCreate::Drop => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
            }
            StatusOnCreate::PodPending => {
                let qos = qos_class(&obj["spec"]);
                obj["status"] = json!({"phase": "Pending", "qosClass": qos});
            }
            StatusOnCreate::NamespaceActive => obj["status"] = json!({"phase": "Active"}),
        }
        if kind == resources::SERVICES {
            obj["status"] = json!({"loadBalancer": {}});
        }
        self.apply_defaults(kind, &mut obj);
        if dry_run {
            return Ok(Arc::new(obj));
        }
        let owners = owner_uids(&obj);
        let key = ObjKey { kind, ns, name };
        let stored = self.put(&key, obj, ChangeType::Added);
        if kind == resources::CORE_EVENTS {
            self.expire_later(&key, &stored, now);
        }
        // A dependent created after all its owners are gone is collected, as the real garbage
        // collector does once it notices.
        if !owners.is_empty() && owners.iter().all(|u| !self.uids.contains_key(u)) {
            self.pending.push_back(Work::OwnerGone(owners[0].clone()));
        }
        self.run_pending(now);
        Ok(stored)
    }

    /// Names an object that has only a `generateName`: the prefix and a random suffix.
    fn generate_name(
        &self,
        kind: usize,
        rt: &ResourceType,
        ns: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let generate = obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if generate.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                vec![FieldCause::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
        let mut generated = format!("{generate}{}", name_suffix());
        // Retry on the (rare) collision, as the server's generator effectively does.
        for _ in 0..8 {
            if !self.kinds[kind]
                .objects
                .contains_key(&(ns.to_string(), generated.clone()))
            {
                break;
            }
            generated = format!("{generate}{}", name_suffix());
        }
        meta_mut(obj).insert("name".into(), json!(generated));
        Ok(())
    }

    /// PUT (and the final step of PATCH): replaces an object, or its status.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        new: Value,
        target: Target,
        now: &str,
        dry_run: bool,
    ) -> Result<Obj, ApiError> {
        let rt = self.types[kind].clone();
        if !new.is_object() {
            return Err(ApiError::bad_request(format!(
                "the object provided is unrecognized (must be of type {})",
                rt.kind
            )));
        }
        self.check_type(kind, &new)?;
        crate::decode::check(kind, &rt, &new)?;
        let body_name = name_of(&new);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = namespace_of(&new);
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let old = match self.get(kind, ns, name) {
            Ok(o) => o,
            Err(e) => {
                if rt.create_on_update() && target == Target::Main {
                    let mut new = new;
                    meta_mut(&mut new).insert("name".into(), json!(name));
                    meta_mut(&mut new).remove("resourceVersion");
                    let ns = rt.namespaced.then_some(ns);
                    return self.create(kind, ns, new, now, dry_run);
                }
                return Err(e);
            }
        };
        let new_rv = rv_of(&new);
        if new_rv.is_empty() {
            if !rt.unconditional_update {
                return Err(ApiError::resource_version_required(&rt, name));
            }
        } else if new_rv != rv_of(&old) {
            return Err(ApiError::conflict(&rt, name));
        }
        let mut merged = merge_for_update(kind, &rt, &old, new, target);
        if is_deleting(&old) {
            let old_f = finalizers_of(&old);
            let added: Vec<String> = finalizers_of(&merged)
                .into_iter()
                .filter(|f| !old_f.contains(f))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    &rt,
                    name,
                    vec![FieldCause::forbidden(
                        "metadata.finalizers",
                        &format!(
                            "no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    )],
                ));
            }
        }
        if kind == resources::PODS
            && target == Target::Main
            && pod_spec_without_mutable(&merged["spec"]) != pod_spec_without_mutable(&old["spec"])
        {
            return Err(ApiError::invalid(
                &rt,
                name,
                vec![FieldCause::forbidden("spec", POD_MUTABLE_SPEC)],
            ));
        }
        self.validate(kind, &mut merged)?;
        if rt.has_generation && !same_spec_part(&merged, &old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut merged).insert("generation".into(), json!(g + 1));
        }
        if same_but_resource_version(&merged, &old) {
            return Ok(old);
        }
        if dry_run {
            return Ok(Arc::new(merged));
        }
        let key = ObjKey {
            kind,
            ns: ns.to_string(),
            name: name.to_string(),
        };
        if is_deleting(&merged)
            && finalizers_of(&merged).is_empty()
            && kind != resources::NAMESPACES
        {
            // The last finalizer is gone: the object goes away (one DELETED event).
            self.kinds[kind]
                .objects
                .insert((ns.to_string(), name.to_string()), Arc::new(merged));
            let last = self.remove(&key).unwrap_or(old);
            self.run_pending(now);
            return Ok(last);
        }
        let stored = self.put(&key, merged, ChangeType::Modified);
        self.run_pending(now);
        Ok(stored)
    }

    /// PATCH: applies the patch to the current object and stores the result like an update.
    /// A patch that sets `metadata.resourceVersion` is a precondition, as on the real server.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        patch_kind: PatchKind,
        body: &Value,
        target: Target,
        now: &str,
        dry_run: bool,
        view: Option<&View>,
    ) -> Result<Obj, ApiError> {
        let rt = self.types[kind].clone();
        let converted;
        let body = match view {
            Some(v) if patch_kind == PatchKind::Apply => {
                converted = (v.from_view)(body);
                &converted
            }
            _ => body,
        };
        let old = match self.get(kind, ns, name) {
            Ok(o) => o,
            Err(e) => {
                if patch_kind == PatchKind::Apply && target == Target::Main {
                    let mut obj = body.clone();
                    if !obj.is_object() {
                        return Err(ApiError::bad_request(
                            "the applied configuration is not an object",
                        ));
                    }
                    let body_name = name_of(&obj);
                    if !body_name.is_empty() && body_name != name {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({body_name}) does not match the name on the URL ({name})"
                        )));
                    }
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                    return self.create(kind, rt.namespaced.then_some(ns), obj, now, dry_run);
                }
                return Err(e);
            }
        };
        let mut doc = match view {
            Some(v) => (v.to_view)(&old),
            None => (*old).clone(),
        };
        match patch_kind {
            PatchKind::StrategicMerge => {
                // Custom resources have no patch strategies: the real server refuses these.
                if rt.schema.is_some() {
                    return Err(ApiError::unsupported_media_type(
                        "application/strategic-merge-patch+json",
                    ));
                }
                if !body.is_object() {
                    return Err(ApiError::bad_request("the patch is not a JSON object"));
                }
                patch::strategic_merge_patch(&mut doc, body);
            }
            PatchKind::Merge | PatchKind::Apply => {
                if !body.is_object() {
                    return Err(ApiError::bad_request("the patch is not a JSON object"));
                }
                if patch_kind == PatchKind::Apply {
                    self.check_type(kind, body)?;
                }
                patch::merge_patch(&mut doc, body);
            }
            PatchKind::Json => {
                if let Err(e) = patch::json_patch(&mut doc, body) {
                    return Err(match e {
                        patch::JsonPatchError::Malformed(_) => ApiError::bad_request(e.to_string()),
                        _ => ApiError::new(422, "Invalid", e.to_string()),
                    });
                }
            }
        }
        if let Some(v) = view {
            doc = (v.from_view)(&doc);
        }
        let patched_rv = rv_of(&doc).to_string();
        if patched_rv != rv_of(&old) {
            if patched_rv.is_empty() {
                meta_mut(&mut doc).insert("resourceVersion".into(), json!(rv_of(&old)));
            } else {
                return Err(ApiError::conflict(&rt, name));
            }
        }
        self.update(kind, ns, name, doc, target, now, dry_run)
    }

    /// POST pods/{name}/binding: assigns a pending pod to a node.
    pub fn bind_pod(
        &mut self,
        ns: &str,
        name: &str,
        node: &str,
        now: &str,
    ) -> Result<Obj, ApiError> {
        let rt = self.types[resources::PODS].clone();
        let old = self.get(resources::PODS, ns, name)?;
        if is_deleting(&old) {
            return Err(ApiError::conflict_because(
                &rt,
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        if let Some(cur) = old.pointer("/spec/nodeName").and_then(Value::as_str)
            && !cur.is_empty()
        {
            return Err(ApiError::conflict_because(
                &rt,
                name,
                &format!("pod {name} is already assigned to node \"{cur}\""),
            ));
        }
        let mut obj = (*old).clone();
        obj["spec"]["nodeName"] = json!(node);
        let conditions = obj["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
        if let Some(Value::Array(c)) = conditions {
            c.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            c.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now}));
        }
        let key = ObjKey {
            kind: resources::PODS,
            ns: ns.to_string(),
            name: name.to_string(),
        };
        let stored = self.put(&key, obj, ChangeType::Modified);
        self.run_pending(now);
        Ok(stored)
    }
}

impl ResourceType {
    /// Whether PUT on a missing object creates it (the registry's `AllowCreateOnUpdate`).
    pub fn create_on_update(&self) -> bool {
        matches!(self.kind, "Lease" | "Event" | "Service")
    }
}

/// What a PUT of `new` over `old` stores, before admission: the status (or, for the status
/// subresource, everything but the status) and the server-owned metadata stay as they were.
fn merge_for_update(
    kind: usize,
    rt: &ResourceType,
    old: &Value,
    new: Value,
    target: Target,
) -> Value {
    let mut merged = match target {
        Target::Main => {
            let mut m = new;
            if rt.status_subresource {
                match old.get("status") {
                    Some(s) => m["status"] = s.clone(),
                    None => {
                        if let Some(o) = m.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            if kind == resources::SERVICES {
                let old_ip = old.pointer("/spec/clusterIP").cloned();
                if let Some(ip) = old_ip
                    && m.pointer("/spec/clusterIP")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    m["spec"]["clusterIP"] = ip;
                    if let Some(ips) = old.pointer("/spec/clusterIPs") {
                        m["spec"]["clusterIPs"] = ips.clone();
                    }
                }
            }
            m
        }
        Target::Status => {
            let mut m = old.clone();
            match new.get("status") {
                Some(s) => m["status"] = s.clone(),
                None => {
                    if let Some(o) = m.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            m
        }
    };
    merged["kind"] = json!(rt.kind);
    merged["apiVersion"] = json!(rt.api_version());
    {
        let old_meta = old.get("metadata").cloned().unwrap_or_default();
        let meta = meta_mut(&mut merged);
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(f) {
                Some(v) => meta.insert(f.into(), v.clone()),
                None => meta.remove(f),
            };
        }
        meta.remove("resourceVersion");
    }
    merged
}
