//! Deletion and garbage collection: DELETE with preconditions, graceful deletion and
//! finalizers, and the collector and namespace finalizer that run inline after every write.

use std::sync::Arc;

use serde_json::{Value, json};

use super::object::{finalizers_of, is_deleting, meta_mut, owner_uids, rv_of, uid_of};
use super::watch::ChangeType;
use super::{FOREGROUND, ORPHAN, Obj, ObjKey, Store};
use crate::error::ApiError;
use crate::resources::{self, ResourceType};

/// How a DELETE propagates to dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

/// The parsed `DeleteOptions`.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

pub(super) enum Work {
    /// The object with this uid is gone: collect its dependents.
    OwnerGone(String),
    /// The object with this uid is being deleted with foreground/orphan finalizers.
    OwnerDeleting(String),
    /// The namespace may be terminating: delete content, finalize when empty.
    Namespace(String),
}

impl Store {
    /// DELETE: removes at once, or marks for deletion while finalizers (or a pod's grace
    /// period on its node) hold it.
    pub fn delete(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
        now: &str,
        now_plus: impl Fn(i64) -> String,
    ) -> Result<Obj, ApiError> {
        let rt = self.types[kind].clone();
        let old = self.get(kind, ns, name)?;
        check_preconditions(&rt, name, &old, opts)?;
        let key = ObjKey {
            kind,
            ns: ns.to_string(),
            name: name.to_string(),
        };
        let mut finalizers = finalizers_of(&old);
        let extra = match opts.propagation {
            Propagation::Foreground => Some(FOREGROUND),
            Propagation::Orphan => Some(ORPHAN),
            Propagation::Background => None,
        };
        if let Some(f) = extra
            && !finalizers.iter().any(|x| x == f)
        {
            finalizers.push(f.to_string());
        }
        // Pods bound to a node terminate gracefully: the node's agent stops the containers and
        // then deletes the pod with a zero grace period.
        let grace = if kind == resources::PODS {
            pod_grace(&old, opts)
        } else {
            0
        };
        let is_namespace = kind == resources::NAMESPACES;
        if finalizers.is_empty() && grace == 0 && !is_namespace {
            if opts.dry_run {
                return Ok(old);
            }
            if kind == resources::PODS && !is_deleting(&old) {
                // Pods support graceful deletion: even a zero grace period is first written
                // (deletionTimestamp set, one MODIFIED event) and then removed, as the real
                // registry does.
                let mut marked = (*old).clone();
                let meta = meta_mut(&mut marked);
                meta.insert("deletionTimestamp".into(), json!(now_plus(0)));
                meta.insert("deletionGracePeriodSeconds".into(), json!(0));
                self.put(&key, marked, ChangeType::Modified);
            }
            let last = self.remove(&key).unwrap_or(old);
            self.run_pending(now);
            return Ok(last);
        }
        let mut obj = (*old).clone();
        if is_deleting(&old) {
            let old_grace = old
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let unchanged_finalizers = finalizers == finalizers_of(&old);
            if grace >= old_grace && unchanged_finalizers {
                return Ok(old);
            }
            if grace < old_grace {
                meta_mut(&mut obj).insert("deletionTimestamp".into(), json!(now_plus(grace)));
                meta_mut(&mut obj).insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            if grace == 0 && finalizers.is_empty() && !is_namespace {
                if opts.dry_run {
                    return Ok(old);
                }
                let last = self.remove(&key).unwrap_or(old);
                self.run_pending(now);
                return Ok(last);
            }
        } else {
            let meta = meta_mut(&mut obj);
            meta.insert("deletionTimestamp".into(), json!(now_plus(grace)));
            meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            if rt.has_generation {
                let g = meta.get("generation").and_then(Value::as_i64).unwrap_or(0);
                meta.insert("generation".into(), json!(g + 1));
            }
            if is_namespace {
                obj["status"] = json!({"phase": "Terminating"});
            }
        }
        meta_mut(&mut obj).insert("finalizers".into(), json!(finalizers));
        if finalizers.is_empty() {
            meta_mut(&mut obj).remove("finalizers");
        }
        if opts.dry_run {
            return Ok(Arc::new(obj));
        }
        let stored = self.put(&key, obj, ChangeType::Modified);
        self.run_pending(now);
        Ok(stored)
    }

    fn blocks_owner(&self, dep: &ObjKey, owner_uid: &str) -> bool {
        self.kinds[dep.kind]
            .objects
            .get(&(dep.ns.clone(), dep.name.clone()))
            .and_then(|o| o.pointer("/metadata/ownerReferences"))
            .and_then(Value::as_array)
            .is_some_and(|refs| {
                refs.iter().any(|r| {
                    r.get("uid").and_then(Value::as_str) == Some(owner_uid)
                        && r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
                })
            })
    }

    fn lookup_uid(&self, uid: &str) -> Option<(ObjKey, Obj)> {
        let key = self.uids.get(uid)?.clone();
        let obj = self.kinds[key.kind]
            .objects
            .get(&(key.ns.clone(), key.name.clone()))?
            .clone();
        Some((key, obj))
    }

    fn remove_finalizer(&mut self, key: &ObjKey, obj: &Obj, finalizer: &str, now: &str) {
        let mut f = finalizers_of(obj);
        f.retain(|x| x != finalizer);
        let mut new = (**obj).clone();
        if f.is_empty() {
            meta_mut(&mut new).remove("finalizers");
        } else {
            meta_mut(&mut new).insert("finalizers".into(), json!(f));
        }
        if is_deleting(&new) && f.is_empty() {
            self.kinds[key.kind]
                .objects
                .insert((key.ns.clone(), key.name.clone()), Arc::new(new));
            self.remove(key);
        } else {
            self.put(key, new, ChangeType::Modified);
        }
        let _ = now;
    }

    fn strip_owner(&mut self, key: &ObjKey, uids_to_strip: &[String]) {
        let Some(obj) = self.kinds[key.kind]
            .objects
            .get(&(key.ns.clone(), key.name.clone()))
            .cloned()
        else {
            return;
        };
        let mut new = (*obj).clone();
        if let Some(Value::Array(refs)) = new.pointer_mut("/metadata/ownerReferences") {
            refs.retain(|r| {
                r.get("uid")
                    .and_then(Value::as_str)
                    .is_none_or(|u| !uids_to_strip.iter().any(|s| s == u))
            });
            if refs.is_empty() {
                meta_mut(&mut new).remove("ownerReferences");
            }
        }
        if new != *obj {
            self.put(key, new, ChangeType::Modified);
        }
    }

    /// The garbage collector and namespace finalizer, run to completion after each write.
    pub(super) fn run_pending(&mut self, now: &str) {
        if self.collecting {
            return;
        }
        // What has outlived its time goes first (its deletions are collected below).
        self.pass_time(now);
        self.collecting = true;
        self.collect(now);
        self.collecting = false;
    }

    fn collect(&mut self, now: &str) {
        let mut steps = 0usize;
        while let Some(work) = self.pending.pop_front() {
            steps += 1;
            if steps > 1_000_000 {
                tracing::error!("garbage collection did not settle; giving up this round");
                self.pending.clear();
                break;
            }
            match work {
                Work::OwnerGone(uid) => self.collect_dependents(uid, now),
                Work::OwnerDeleting(uid) => self.finish_owner_deletion(uid, now),
                Work::Namespace(ns) => self.finalize_namespace(ns, now),
            }
        }
    }

    /// The object with `uid` is gone: its dependents lose the reference, and are deleted when
    /// no owner is left.
    fn collect_dependents(&mut self, uid: String, now: &str) {
        let deps: Vec<ObjKey> = self
            .dependents
            .get(&uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for dep in deps {
            let Some(obj) = self.kinds[dep.kind]
                .objects
                .get(&(dep.ns.clone(), dep.name.clone()))
                .cloned()
            else {
                continue;
            };
            let owners = owner_uids(&obj);
            let (alive, dead): (Vec<String>, Vec<String>) =
                owners.into_iter().partition(|u| self.uids.contains_key(u));
            if alive.is_empty() {
                if !is_deleting(&obj) {
                    let _ = self.delete(
                        dep.kind,
                        &dep.ns,
                        &dep.name,
                        &DeleteOptions::default(),
                        now,
                        |_| now.to_string(),
                    );
                }
            } else {
                self.strip_owner(&dep, &dead);
            }
        }
    }

    /// The object with `uid` is being deleted with the orphan or foreground finalizer:
    /// orphans its dependents, or deletes them and lets it go once none blocks it.
    fn finish_owner_deletion(&mut self, uid: String, now: &str) {
        let Some((key, obj)) = self.lookup_uid(&uid) else {
            return;
        };
        if !is_deleting(&obj) {
            return;
        }
        let f = finalizers_of(&obj);
        let deps: Vec<ObjKey> = self
            .dependents
            .get(&uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        if f.iter().any(|x| x == ORPHAN) {
            for dep in &deps {
                self.strip_owner(dep, std::slice::from_ref(&uid));
            }
            self.remove_finalizer(&key, &obj, ORPHAN, now);
        } else if f.iter().any(|x| x == FOREGROUND) {
            for dep in &deps {
                let deleting = self.kinds[dep.kind]
                    .objects
                    .get(&(dep.ns.clone(), dep.name.clone()))
                    .is_some_and(|o| is_deleting(o));
                if !deleting {
                    let opts = DeleteOptions {
                        propagation: Propagation::Foreground,
                        ..Default::default()
                    };
                    let _ = self.delete(dep.kind, &dep.ns, &dep.name, &opts, now, |_| {
                        now.to_string()
                    });
                }
            }
            // Only dependents whose reference has `blockOwnerDeletion` hold the owner.
            let blocking = self
                .dependents
                .get(&uid)
                .is_some_and(|deps| deps.iter().any(|d| self.blocks_owner(d, &uid)));
            if !blocking && let Some((key, obj)) = self.lookup_uid(&uid) {
                self.remove_finalizer(&key, &obj, FOREGROUND, now);
            }
        }
    }

    /// A terminating namespace: deletes its content, and finalizes it once it is empty.
    fn finalize_namespace(&mut self, ns: String, now: &str) {
        let Some(nsobj) = self.kinds[resources::NAMESPACES]
            .objects
            .get(&(String::new(), ns.clone()))
            .cloned()
        else {
            return;
        };
        if !is_deleting(&nsobj) {
            return;
        }
        let mut left = 0usize;
        for kind in 0..self.kinds.len() {
            if !self.types[kind].namespaced {
                continue;
            }
            let keys: Vec<(String, Obj)> = self.kinds[kind]
                .objects
                .range((ns.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == ns)
                .map(|((_, name), o)| (name.clone(), o.clone()))
                .collect();
            for (name, o) in keys {
                if !is_deleting(&o) {
                    let _ = self.delete(kind, &ns, &name, &DeleteOptions::default(), now, |_| {
                        now.to_string()
                    });
                }
            }
            left += self.kinds[kind]
                .objects
                .range((ns.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == ns)
                .count();
        }
        if left == 0 {
            let key = ObjKey {
                kind: resources::NAMESPACES,
                ns: String::new(),
                name: ns.clone(),
            };
            if finalizers_of(&nsobj).is_empty() {
                self.remove(&key);
            } else {
                let mut new = (*nsobj).clone();
                new["spec"] = json!({});
                self.put(&key, new, ChangeType::Modified);
            }
        }
    }
}

/// Checks a DELETE's uid and resourceVersion preconditions against the stored object.
fn check_preconditions(
    rt: &ResourceType,
    name: &str,
    old: &Value,
    opts: &DeleteOptions,
) -> Result<(), ApiError> {
    if let Some(uid) = &opts.precondition_uid
        && uid != uid_of(old)
    {
        return Err(ApiError::conflict_because(
            rt,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                uid_of(old)
            ),
        ));
    }
    if let Some(rv) = &opts.precondition_rv
        && rv != rv_of(old)
    {
        return Err(ApiError::conflict_because(
            rt,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                rv_of(old)
            ),
        ));
    }
    Ok(())
}

/// The grace period of a pod's deletion: a pod bound to a node and still running gets its
/// (or the request's) grace period; any other pod goes at once.
fn pod_grace(old: &Value, opts: &DeleteOptions) -> i64 {
    let bound = old
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = old
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    let terminal = phase == "Succeeded" || phase == "Failed";
    if !bound || terminal {
        return 0;
    }
    let grace = opts.grace_period_seconds.unwrap_or_else(|| {
        old.pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
    });
    if grace < 0 { 1 } else { grace }
}
