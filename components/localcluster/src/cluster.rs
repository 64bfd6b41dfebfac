//! The cluster: one store, its clock and its settings, shared by every connection.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::auth::Auth;
use crate::clock::{Clock, format_time};
use crate::error::ApiError;
use crate::resources::{self, ResourceType};
use crate::store::{Store, StoreConfig};

/// The largest request body the real API server accepts (3 MiB).
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// Settings of one server.
#[derive(Clone)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Watch duration when the client gives no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    pub max_request_bytes: usize,
    pub auth: Auth,
    /// Header-read/idle timeout and connection cap of [`crate::serve`].
    pub limits: spawner_serve::Limits,
    /// Reported by `/version`.
    pub git_version: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            max_request_bytes: MAX_REQUEST_BYTES,
            auth: Auth::default(),
            limits: spawner_serve::Limits::default(),
            git_version: "v1.34.0-localcluster".into(),
        }
    }
}

impl ServerConfig {
    /// For tests and examples on one machine: anyone is admin, and a watch gets a bookmark
    /// every second, so a client's short read timeout never fires on a healthy watch.
    pub fn for_tests() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            auth: Auth::anyone_is_admin(),
            ..Self::default()
        }
    }
}

pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) types: Arc<Vec<ResourceType>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: ServerConfig,
    pub(crate) throttler: crate::throttle::Throttler,
}

/// A localcluster API server's state; cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

impl Cluster {
    /// A fresh cluster with the `default`, `kube-system`, `kube-public` and `kube-node-lease`
    /// namespaces.
    pub fn new(config: ServerConfig, clock: Arc<dyn Clock>) -> Self {
        let types = Arc::new(resources::all());
        let mut store = Store::new(types.clone(), config.store.clone());
        let now = format_time(crate::clock::now(&*clock));
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // Creating a fixed, valid namespace in an empty store cannot fail.
            let _ = store.create(
                resources::NAMESPACES,
                None,
                json!({"metadata": {"name": ns}}),
                &now,
                false,
            );
        }
        Self {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                types,
                clock,
                config,
                throttler: Default::default(),
            }),
        }
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every write is one insert),
        // so a poisoned lock is still usable.
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn now(&self) -> String {
        format_time(crate::clock::now(&*self.shared.clock))
    }

    /// Drops every type's retained watch history, as etcd compaction does.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Answers `429 Too Many Requests` to `throttle.per_mille` of the requests (every caller
    /// but the administrators, health checks aside) until [`Cluster::stop_throttling`], as a
    /// real API server's priority and fairness does under load.
    pub fn throttle(&self, throttle: crate::throttle::Throttle) {
        self.shared.throttler.set(Some(throttle));
    }

    pub fn stop_throttling(&self) {
        self.shared.throttler.set(None);
    }

    /// How many requests each user was answered 429, since the cluster started.
    pub fn throttled_requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared.throttler.throttled()
    }

    /// Evicts every pod bound to `node` that has not finished, as `kubectl drain` does through
    /// the Eviction API (there are no PodDisruptionBudgets here): each gets the condition
    /// `DisruptionTarget` (reason `EvictionByEvictionAPI`) and is deleted with its own grace
    /// period, so the node's agent stops it and then removes it. Returns the evicted pods as
    /// `namespace/name`.
    pub fn evict_pods_on(&self, node: &str) -> Vec<String> {
        let now = crate::clock::now(&*self.shared.clock);
        let later = |secs: i64| {
            chrono::TimeDelta::try_seconds(secs.clamp(0, crate::decode::MAX_GRACE_SECONDS))
                .and_then(|d| now.checked_add_signed(d))
                .map_or_else(|| format_time(now), format_time)
        };
        let mut evicted = Vec::new();
        for pod in self.snapshot("", "pods") {
            let on_node = pod["spec"]["nodeName"].as_str() == Some(node);
            let finished = matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            );
            let deleting = pod["metadata"].get("deletionTimestamp").is_some();
            let (Some(namespace), Some(name)) = (
                pod["metadata"]["namespace"].as_str(),
                pod["metadata"]["name"].as_str(),
            ) else {
                continue;
            };
            if !on_node || finished || deleting {
                continue;
            }
            // As the real Eviction API does, the pod is marked first, so that its owners can
            // tell an eviction from other deletions.
            let mut store = self.store();
            let _ = store.patch(
                resources::PODS,
                namespace,
                name,
                crate::store::PatchKind::StrategicMerge,
                &json!({"status": {"conditions": [{
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "Eviction API: evicting",
                    "lastTransitionTime": format_time(now),
                }]}}),
                crate::store::Target::Status,
                &format_time(now),
                false,
                None,
            );
            let deleted = store.delete(
                resources::PODS,
                namespace,
                name,
                &crate::store::DeleteOptions::default(),
                &format_time(now),
                later,
            );
            if deleted.is_ok() {
                evicted.push(format!("{namespace}/{name}"));
            }
        }
        evicted
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Creates the namespace `name` unless it exists: a deployment's own namespace, made before
    /// its components start.
    pub fn ensure_namespace(&self, name: &str) -> Result<(), ApiError> {
        let now = self.now();
        let namespace = json!({"metadata": {"name": name}});
        match self
            .store()
            .create(resources::NAMESPACES, None, namespace, &now, false)
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.shared.types
    }

    /// Every stored object of the resource `plural` in API group `group` (`""` for core), in
    /// key order. For in-process observers — the simulator's invariant checker — that must see
    /// the store as it is at this instant, not through a watch.
    pub fn snapshot(&self, group: &str, plural: &str) -> Vec<Arc<serde_json::Value>> {
        let Some(kind) = self
            .types()
            .iter()
            .position(|t| t.group == group && t.plural == plural)
        else {
            return Vec::new();
        };
        // events.k8s.io Events are stored as core Events and shown converted.
        let stored = if kind == resources::NEW_EVENTS {
            resources::CORE_EVENTS
        } else {
            kind
        };
        let labels = crate::selector::LabelSelector::default();
        let fields = crate::selector::FieldSelector::default();
        let filter = crate::store::Filter {
            namespace: None,
            labels: &labels,
            fields: &fields,
        };
        let items = self
            .store()
            .list(stored, &filter, None, None)
            .map(|list| list.items)
            .unwrap_or_default();
        if kind == resources::NEW_EVENTS {
            items
                .into_iter()
                .map(|o| Arc::new(crate::event_versions::to_new(&o)))
                .collect()
        } else {
            items
        }
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn snapshot_sees_stored_objects_of_one_type() {
        let cluster = Cluster::new(ServerConfig::default(), Arc::new(crate::SystemClock));
        let namespaces = cluster.snapshot("", "namespaces");
        let names: Vec<_> = namespaces
            .iter()
            .map(|n| {
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            ["default", "kube-node-lease", "kube-public", "kube-system"]
        );
        assert!(cluster.snapshot("", "pods").is_empty());
        assert!(cluster.snapshot("nope", "things").is_empty());
    }
}
