//! The object store: per-type maps, one global monotonic resourceVersion, a bounded per-type
//! event history for watches, and the garbage collector / namespace finalizer that run inline
//! after every write.
//!
//! All state sits behind one lock held only for in-memory work (no I/O, no awaiting): every
//! operation is a few map lookups plus a JSON comparison, so a single lock is not a bottleneck
//! (see docs/localcluster.md for measured numbers). Events are published under the lock, so a
//! watcher that replays history and subscribes in one locked section never misses or repeats
//! an event.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, FieldCause};
use crate::patch;
use crate::resources::{self, NameRule, ResourceType, StatusOnCreate};

/// A stored object. Shared, never mutated in place: writers store a new `Arc`.
pub type Obj = Arc<Value>;

/// Identifies one object: type index, namespace ("" for cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub kind: usize,
    pub ns: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, shared by every watcher; its JSON line is encoded once, on first use.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub etype: EventType,
    pub object: Obj,
    /// The object before the change (for selector transitions), when there was one.
    pub prev: Option<Obj>,
    encoded: OnceLock<Bytes>,
}

impl Event {
    pub fn new(rv: u64, etype: EventType, object: Obj, prev: Option<Obj>) -> Self {
        Self {
            rv,
            etype,
            object,
            prev,
            encoded: OnceLock::new(),
        }
    }

    /// `{"type":"ADDED","object":{...}}\n`, encoded once for all watchers.
    pub fn encoded(&self) -> &Bytes {
        self.encoded
            .get_or_init(|| encode_watch_line(self.etype.as_str(), &self.object))
    }

    pub fn namespace(&self) -> &str {
        namespace_of(&self.object)
    }
}

pub fn encode_watch_line(etype: &str, object: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(etype.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    // Serializing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn rv_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn finalizers_of(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|o| o.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
const NAMESPACE_FINALIZER: &str = "kubernetes";

struct KindStore {
    objects: BTreeMap<(String, String), Obj>,
    history: VecDeque<Arc<Event>>,
    /// Events with `rv <= compacted_rv` are no longer retained.
    compacted_rv: u64,
    tx: broadcast::Sender<Arc<Event>>,
}

/// The start of a watch: events to replay first, then the live feed.
pub type WatchStart = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Events retained per resource type for watches that resume from a resourceVersion.
    pub history_per_type: usize,
    /// The first resourceVersion; watches from older versions get 410 Gone, as they do from a
    /// real server whose watch cache started after them.
    pub initial_resource_version: u64,
    /// Buffer of each type's broadcast channel; a watcher that falls further behind is ended
    /// and resumes from its last resourceVersion.
    pub watch_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            history_per_type: 50_000,
            initial_resource_version: 1000,
            watch_buffer: 16_384,
        }
    }
}

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

/// The result of a list.
#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Obj>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// Selection of a list or watch.
pub struct Filter<'a> {
    pub namespace: Option<&'a str>,
    pub labels: &'a crate::selector::LabelSelector,
    pub fields: &'a crate::selector::FieldSelector,
}

impl Filter<'_> {
    pub fn matches(&self, obj: &Value) -> bool {
        self.namespace.is_none_or(|ns| namespace_of(obj) == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

enum Work {
    /// The object with this uid is gone: collect its dependents.
    OwnerGone(String),
    /// The object with this uid is being deleted with foreground/orphan finalizers.
    OwnerDeleting(String),
    /// The namespace may be terminating: delete content, finalize when empty.
    Namespace(String),
}

/// The in-memory state of the API server.
pub struct Store {
    types: Arc<Vec<ResourceType>>,
    rv: u64,
    kinds: Vec<KindStore>,
    uids: HashMap<String, ObjKey>,
    dependents: HashMap<String, BTreeSet<ObjKey>>,
    pending: VecDeque<Work>,
    config: StoreConfig,
    next_service_ip: u32,
    /// Set while the collector runs, so writes it makes do not start it again.
    collecting: bool,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all; a zeroed uid is then
    // still unique enough for one process because it is mixed with the resourceVersion below.
    let _ = getrandom::fill(&mut buf);
    buf
}

fn new_uid(salt: u64) -> String {
    let mut b: [u8; 16] = random_bytes();
    for (i, s) in salt.to_le_bytes().iter().enumerate() {
        b[8 + i] ^= s;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
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
const POD_MUTABLE_SPEC: &str = "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

fn pod_spec_without_mutable(spec: &Value) -> Value {
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
fn equal_except(a: &Value, b: &Value, skip: &dyn Fn(&str) -> bool) -> bool {
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
fn same_spec_part(a: &Value, b: &Value) -> bool {
    equal_except(a, b, &|k| {
        matches!(k, "metadata" | "status" | "kind" | "apiVersion")
    })
}

/// Whether `new` (which has no resourceVersion) equals `old` but for old's resourceVersion.
fn same_but_resource_version(new: &Value, old: &Value) -> bool {
    equal_except(new, old, &|k| k == "metadata")
        && match (new.get("metadata"), old.get("metadata")) {
            (Some(n), Some(o)) => equal_except(n, o, &|k| k == "resourceVersion"),
            (n, o) => n == o,
        }
}

fn qos_class(spec: &Value) -> &'static str {
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
    pub fn new(types: Arc<Vec<ResourceType>>, config: StoreConfig) -> Self {
        let kinds = types
            .iter()
            .map(|_| KindStore {
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                // Nothing is compacted until history overflows or `compact` is called: like a
                // fresh etcd, a watch from any earlier version replays everything.
                compacted_rv: 0,
                tx: broadcast::channel(config.watch_buffer.max(16)).0,
            })
            .collect();
        Self {
            rv: config.initial_resource_version,
            types,
            kinds,
            uids: HashMap::new(),
            dependents: HashMap::new(),
            pending: VecDeque::new(),
            config,
            next_service_ip: 1,
            collecting: false,
        }
    }

    pub fn types(&self) -> &Arc<Vec<ResourceType>> {
        &self.types
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn object_count(&self, kind: usize) -> usize {
        self.kinds[kind].objects.len()
    }

    pub fn get(&self, kind: usize, ns: &str, name: &str) -> Result<Obj, ApiError> {
        self.kinds[kind]
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&self.types[kind], name))
    }

    /// Lists in key order; `limit`/`continue` paginate (continuing at the first page's version).
    pub fn list(
        &self,
        kind: usize,
        filter: &Filter<'_>,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListResult, ApiError> {
        let ks = &self.kinds[kind];
        let (list_rv, start) = match continue_token {
            Some(tok) => {
                let (rv, ns, name) = decode_continue(tok)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < ks.compacted_rv {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some((ns, name)))
            }
            None => (self.rv, None),
        };
        let range: Box<dyn Iterator<Item = (&(String, String), &Obj)>> =
            match (&start, filter.namespace) {
                (Some(s), _) => Box::new(ks.objects.range((
                    std::ops::Bound::Excluded(s.clone()),
                    std::ops::Bound::Unbounded,
                ))),
                (None, Some(ns)) => Box::new(ks.objects.range((ns.to_string(), String::new())..)),
                (None, None) => Box::new(ks.objects.iter()),
            };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = false;
        let mut remaining = 0usize;
        for (key, obj) in range {
            if let Some(ns) = filter.namespace
                && key.0 != ns
            {
                if key.0.as_str() > ns {
                    break;
                }
                continue;
            }
            if !filter.matches(obj) {
                continue;
            }
            if let Some(l) = limit
                && items.len() >= l
            {
                more = true;
                remaining += 1;
                continue;
            }
            last_key = Some(key.clone());
            items.push(obj.clone());
        }
        let continue_token = match (more, last_key) {
            (true, Some((ns, name))) => Some(encode_continue(list_rv, &ns, &name)),
            _ => None,
        };
        let selective = !filter.labels.is_empty() || !filter.fields.is_empty();
        Ok(ListResult {
            items,
            resource_version: list_rv,
            remaining: (continue_token.is_some() && !selective).then_some(remaining),
            continue_token,
        })
    }

    /// Subscribes to a type's changes. Without a version, the current objects come back as
    /// synthetic ADDED events; with one, the retained events after it (or 410 Expired).
    pub fn watch(&self, kind: usize, from: Option<u64>) -> Result<WatchStart, ApiError> {
        let ks = &self.kinds[kind];
        let backlog = match from {
            None => ks
                .objects
                .values()
                .map(|o| {
                    let rv = rv_of(o).parse().unwrap_or(0);
                    Arc::new(Event::new(rv, EventType::Added, o.clone(), None))
                })
                .collect(),
            Some(rv) => {
                if rv < ks.compacted_rv {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {rv} ({})",
                        ks.compacted_rv + 1
                    )));
                }
                let start = ks.history.partition_point(|e| e.rv <= rv);
                ks.history.range(start..).cloned().collect()
            }
        };
        Ok((backlog, ks.tx.subscribe()))
    }

    fn publish(&mut self, kind: usize, event: Event) {
        let event = Arc::new(event);
        let ks = &mut self.kinds[kind];
        ks.history.push_back(event.clone());
        while ks.history.len() > self.config.history_per_type {
            if let Some(old) = ks.history.pop_front() {
                ks.compacted_rv = old.rv;
            }
        }
        // No receivers is fine: nobody is watching this type.
        let _ = ks.tx.send(event);
    }

    /// Drops the retained history of every type, as etcd compaction does; later watches from
    /// older versions get 410 Gone.
    pub fn compact(&mut self) {
        let rv = self.rv;
        for ks in &mut self.kinds {
            ks.history.clear();
            ks.compacted_rv = rv;
        }
    }

    fn index_owners(&mut self, key: &ObjKey, old: Option<&Value>, new: Option<&Value>) {
        for uid in old.map(owner_uids).unwrap_or_default() {
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(&uid);
                }
            }
        }
        for uid in new.map(owner_uids).unwrap_or_default() {
            self.dependents.entry(uid).or_default().insert(key.clone());
        }
    }

    /// Stores a new version of an object and publishes the event.
    fn put(&mut self, key: &ObjKey, mut obj: Value, etype: EventType) -> Obj {
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let prev = self.kinds[key.kind]
            .objects
            .insert((key.ns.clone(), key.name.clone()), obj.clone());
        self.index_owners(key, prev.as_deref(), Some(&obj));
        let uid = uid_of(&obj).to_string();
        if prev.is_none() {
            self.uids.insert(uid.clone(), key.clone());
        }
        let entered_deletion = is_deleting(&obj) && !prev.as_deref().is_some_and(is_deleting);
        if is_deleting(&obj) {
            let f = finalizers_of(&obj);
            if f.iter().any(|f| f == FOREGROUND || f == ORPHAN) {
                self.pending.push_back(Work::OwnerDeleting(uid.clone()));
            }
        }
        if entered_deletion && key.kind == resources::NAMESPACES {
            self.pending.push_back(Work::Namespace(key.name.clone()));
        }
        let event = Event::new(self.rv, etype, obj.clone(), prev);
        self.publish(key.kind, event);
        obj
    }

    /// Removes an object for good and publishes DELETED.
    fn remove(&mut self, key: &ObjKey) -> Option<Obj> {
        let prev = self.kinds[key.kind]
            .objects
            .remove(&(key.ns.clone(), key.name.clone()))?;
        self.rv += 1;
        let mut last = (*prev).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let last = Arc::new(last);
        self.index_owners(key, Some(&prev), None);
        let uid = uid_of(&prev).to_string();
        self.uids.remove(&uid);
        self.pending.push_back(Work::OwnerGone(uid));
        for owner in owner_uids(&prev) {
            self.pending.push_back(Work::OwnerDeleting(owner));
        }
        if !key.ns.is_empty() {
            self.pending.push_back(Work::Namespace(key.ns.clone()));
        }
        let event = Event::new(self.rv, EventType::Deleted, last.clone(), Some(prev));
        self.publish(key.kind, event);
        Some(last)
    }

    fn check_namespace(&self, ns: &str) -> Result<(), ApiError> {
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
    fn check_type(&self, kind: usize, obj: &Value) -> Result<(), ApiError> {
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
    fn validate(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
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

    fn apply_defaults(&mut self, kind: usize, obj: &mut Value) {
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
        let name = name_of(&obj).to_string();
        if name.is_empty() {
            let generate = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if generate.is_empty() {
                return Err(ApiError::invalid(
                    &rt,
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
                    .contains_key(&(ns.clone(), generated.clone()))
                {
                    break;
                }
                generated = format!("{generate}{}", name_suffix());
            }
            meta_mut(&mut obj).insert("name".into(), json!(generated));
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
        let stored = self.put(&key, obj, EventType::Added);
        // A dependent created after all its owners are gone is collected, as the real garbage
        // collector does once it notices.
        if !owners.is_empty() && owners.iter().all(|u| !self.uids.contains_key(u)) {
            self.pending.push_back(Work::OwnerGone(owners[0].clone()));
        }
        self.run_pending(now);
        Ok(stored)
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
                let mut m = (*old).clone();
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
        let stored = self.put(&key, merged, EventType::Modified);
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
        if let Some(uid) = &opts.precondition_uid
            && uid != uid_of(&old)
        {
            return Err(ApiError::conflict_because(
                &rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    uid_of(&old)
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv != rv_of(&old)
        {
            return Err(ApiError::conflict_because(
                &rt,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rv_of(&old)
                ),
            ));
        }
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
        let mut grace = 0i64;
        if kind == resources::PODS {
            let bound = old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let phase = old
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("");
            let terminal = phase == "Succeeded" || phase == "Failed";
            if bound && !terminal {
                grace = opts.grace_period_seconds.unwrap_or_else(|| {
                    old.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30)
                });
                if grace < 0 {
                    grace = 1;
                }
            }
        }
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
                self.put(&key, marked, EventType::Modified);
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
        let stored = self.put(&key, obj, EventType::Modified);
        self.run_pending(now);
        Ok(stored)
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
        let stored = self.put(&key, obj, EventType::Modified);
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
            self.put(key, new, EventType::Modified);
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
            self.put(key, new, EventType::Modified);
        }
    }

    /// The garbage collector and namespace finalizer, run to completion after each write.
    fn run_pending(&mut self, now: &str) {
        if self.collecting {
            return;
        }
        self.collecting = true;
        self.collect(now);
        self.collecting = false;
    }

    fn collect(&mut self, now: &str) {
        let background = DeleteOptions::default();
        let mut steps = 0usize;
        while let Some(work) = self.pending.pop_front() {
            steps += 1;
            if steps > 1_000_000 {
                tracing::error!("garbage collection did not settle; giving up this round");
                self.pending.clear();
                break;
            }
            match work {
                Work::OwnerGone(uid) => {
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
                                    &background,
                                    now,
                                    |_| now.to_string(),
                                );
                            }
                        } else {
                            self.strip_owner(&dep, &dead);
                        }
                    }
                }
                Work::OwnerDeleting(uid) => {
                    let Some((key, obj)) = self.lookup_uid(&uid) else {
                        continue;
                    };
                    if !is_deleting(&obj) {
                        continue;
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
                                let _ =
                                    self.delete(dep.kind, &dep.ns, &dep.name, &opts, now, |_| {
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
                Work::Namespace(ns) => {
                    let Some(nsobj) = self.kinds[resources::NAMESPACES]
                        .objects
                        .get(&(String::new(), ns.clone()))
                        .cloned()
                    else {
                        continue;
                    };
                    if !is_deleting(&nsobj) {
                        continue;
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
                                let _ = self.delete(kind, &ns, &name, &background, now, |_| {
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
                            self.put(&key, new, EventType::Modified);
                        }
                    }
                }
            }
        }
    }
}

impl ResourceType {
    /// Whether PUT on a missing object creates it (the registry's `AllowCreateOnUpdate`).
    pub fn create_on_update(&self) -> bool {
        matches!(self.kind, "Lease" | "Event" | "Service")
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    hex(&format!("{rv}\n{ns}\n{name}"))
}

fn decode_continue(tok: &str) -> Option<(u64, String, String)> {
    let s = unhex(tok)?;
    let mut parts = s.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
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
