//! The object store: per-type maps, one global monotonic resourceVersion, a bounded per-type
//! event history for watches, and the garbage collector / namespace finalizer that run inline
//! after every write.
//!
//! All state sits behind one lock held only for in-memory work (no I/O, no awaiting): every
//! operation is a few map lookups plus a JSON comparison, so a single lock is not a bottleneck
//! (see docs/localcluster.md for measured numbers). Events are published under the lock, so a
//! watcher that replays history and subscribes in one locked section never misses or repeats
//! an event.

mod admission;
mod expiry;
mod gc;
mod list;
mod object;
mod watch;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::resources::{self, ResourceType};

pub use admission::name_causes;
pub use gc::{DeleteOptions, Propagation};
pub use list::{Filter, ListResult};
pub use object::{name_of, namespace_of, rv_of};
pub use watch::{Change, ChangeType, WatchStart, encode_watch_line};
pub use write::{PatchKind, Target, View};

use gc::Work;
use object::{finalizers_of, is_deleting, meta_mut, owner_uids, uid_of};

/// A stored object. Shared, never mutated in place: writers store a new `Arc`.
pub type Obj = Arc<Value>;

/// Identifies one object: type index, namespace ("" for cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub kind: usize,
    pub ns: String,
    pub name: String,
}

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
const NAMESPACE_FINALIZER: &str = "kubernetes";

struct KindStore {
    objects: BTreeMap<(String, String), Obj>,
    history: VecDeque<Arc<Change>>,
    /// Events with `rv <= compacted_rv` are no longer retained.
    compacted_rv: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

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
    /// How long a change stays in the watch history whatever `history_per_type` allows, as
    /// etcd compaction drops old revisions (kube-apiserver compacts every 5 min; its watch
    /// cache keeps about 75 s); `None`: only the count bounds it. A watch from a version older
    /// than the window gets 410 Expired and lists again. Without it, history costs memory in
    /// proportion to the count, however old: at 1,000 spawns a minute, gigabytes.
    pub history_window: Option<std::time::Duration>,
    /// How long an Event lives after its creation (kube-apiserver's `--event-ttl`, 1 h there);
    /// `None`: for ever. Without it a server that records Events for every backend grows
    /// without bound.
    pub event_ttl: Option<std::time::Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            history_per_type: 50_000,
            initial_resource_version: 1000,
            watch_buffer: 16_384,
            // Tests read every Event they caused, and may watch from any version they saw;
            // `spawner dev` sets both.
            history_window: None,
            event_ttl: None,
        }
    }
}

/// The in-memory state of the API server.
pub struct Store {
    types: Arc<Vec<ResourceType>>,
    rv: u64,
    kinds: Vec<KindStore>,
    uids: HashMap<String, ObjKey>,
    dependents: HashMap<String, BTreeSet<ObjKey>>,
    pending: VecDeque<Work>,
    /// Stored Events in creation order with the Unix second they expire at, and their uid
    /// (an Event deleted and created again under its name is not the one that expires).
    event_expiry: VecDeque<(i64, ObjKey, String)>,
    /// The global resourceVersion at the end of a write, once per second of the writes' time
    /// (Unix second, version), oldest first: which changes are older than `history_window`.
    time_marks: VecDeque<(i64, u64)>,
    /// The time of the last write, as given and in Unix seconds.
    last_write: (String, Option<i64>),
    config: StoreConfig,
    next_service_ip: u32,
    /// Set while the collector runs, so writes it makes do not start it again.
    collecting: bool,
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
            event_expiry: VecDeque::new(),
            time_marks: VecDeque::new(),
            last_write: (String::new(), None),
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
    fn put(&mut self, key: &ObjKey, mut obj: Value, etype: ChangeType) -> Obj {
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
        let event = Change::new(self.rv, etype, obj.clone(), prev);
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
        let event = Change::new(self.rv, ChangeType::Deleted, last.clone(), Some(prev));
        self.publish(key.kind, event);
        Some(last)
    }
}
