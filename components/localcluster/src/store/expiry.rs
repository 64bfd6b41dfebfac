//! Events expire (`StoreConfig::event_ttl`), as they do in a real cluster, where each Event is
//! written to etcd under a lease of `--event-ttl`: a server that records Events for every
//! backend would otherwise keep them all.

use super::object::uid_of;
use super::{Obj, ObjKey, Store};

/// `now` (the RFC 3339 time every write is given) as Unix seconds.
fn unix_seconds(now: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(now)
        .ok()
        .map(|t| t.timestamp())
}

impl Store {
    /// Schedules the expiry of the Event just created as `stored` under `key`.
    pub(super) fn expire_later(&mut self, key: &ObjKey, stored: &Obj, now: &str) {
        let (Some(ttl), Some(now)) = (self.config.event_ttl, unix_seconds(now)) else {
            return;
        };
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        self.event_expiry.push_back((
            now.saturating_add(ttl),
            key.clone(),
            uid_of(stored).to_string(),
        ));
    }

    /// Deletes the Events whose time has come (a DELETED watch event each, as etcd's lease
    /// expiry gives); those deleted or replaced meanwhile are skipped.
    pub(super) fn expire_events(&mut self, now: &str) {
        if self.event_expiry.is_empty() {
            return;
        }
        let Some(now) = unix_seconds(now) else {
            return;
        };
        while let Some((at, _, _)) = self.event_expiry.front() {
            if *at > now {
                break;
            }
            let Some((_, key, uid)) = self.event_expiry.pop_front() else {
                break;
            };
            let same = self.kinds[key.kind]
                .objects
                .get(&(key.ns.clone(), key.name.clone()))
                .is_some_and(|obj| uid_of(obj) == uid);
            if same {
                self.remove(&key);
            }
        }
    }

    /// Events waiting for their expiry.
    #[cfg(test)]
    pub(super) fn expiring_events(&self) -> usize {
        self.event_expiry.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::super::{Store, StoreConfig};
    use crate::resources;

    fn store(event_ttl: Option<Duration>) -> Store {
        let mut store = Store::new(
            Arc::new(resources::all()),
            StoreConfig {
                event_ttl,
                ..StoreConfig::default()
            },
        );
        store
            .create(
                resources::NAMESPACES,
                None,
                json!({"metadata": {"name": "default"}}),
                "2030-01-01T00:00:00Z",
                false,
            )
            .expect("namespace");
        store
    }

    fn event(name: &str) -> serde_json::Value {
        json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reason": "Started"
        })
    }

    fn create_event(store: &mut Store, name: &str, now: &str) {
        store
            .create(
                resources::CORE_EVENTS,
                Some("default"),
                event(name),
                now,
                false,
            )
            .expect("event");
    }

    /// An Event is gone (with a DELETED watch event) once its time-to-live has passed, and
    /// its expiry entry with it; one that has not lived that long stays.
    #[test]
    fn events_expire_after_their_ttl() {
        let mut store = store(Some(Duration::from_secs(600)));
        create_event(&mut store, "old", "2030-01-01T00:00:00Z");
        let mut watch = store.kinds[resources::CORE_EVENTS].tx.subscribe();
        create_event(&mut store, "young", "2030-01-01T00:09:00Z");
        assert_eq!(store.object_count(resources::CORE_EVENTS), 2);
        create_event(&mut store, "newest", "2030-01-01T00:10:00Z");
        assert_eq!(store.object_count(resources::CORE_EVENTS), 2);
        assert!(store.get(resources::CORE_EVENTS, "default", "old").is_err());
        assert!(
            store
                .get(resources::CORE_EVENTS, "default", "young")
                .is_ok()
        );
        assert_eq!(store.expiring_events(), 2);
        let kinds: Vec<_> = std::iter::from_fn(|| watch.try_recv().ok())
            .map(|change| {
                (
                    change.etype,
                    crate::store::name_of(&change.object).to_string(),
                )
            })
            .collect();
        assert!(
            kinds.contains(&(crate::store::ChangeType::Deleted, "old".to_string())),
            "{kinds:?}"
        );
    }

    /// An Event deleted and created again under its name lives its own time, not the first's.
    #[test]
    fn a_recreated_event_lives_its_own_time() {
        let mut store = store(Some(Duration::from_secs(600)));
        create_event(&mut store, "e", "2030-01-01T00:00:00Z");
        store
            .delete(
                resources::CORE_EVENTS,
                "default",
                "e",
                &Default::default(),
                "2030-01-01T00:01:00Z",
                |_| "2030-01-01T00:01:00Z".to_string(),
            )
            .expect("delete");
        create_event(&mut store, "e", "2030-01-01T00:05:00Z");
        create_event(&mut store, "later", "2030-01-01T00:10:00Z");
        assert!(store.get(resources::CORE_EVENTS, "default", "e").is_ok());
        create_event(&mut store, "latest", "2030-01-01T00:15:00Z");
        assert!(store.get(resources::CORE_EVENTS, "default", "e").is_err());
    }

    #[test]
    fn without_a_ttl_events_stay() {
        let mut store = store(None);
        create_event(&mut store, "old", "2030-01-01T00:00:00Z");
        create_event(&mut store, "new", "2040-01-01T00:00:00Z");
        assert_eq!(store.object_count(resources::CORE_EVENTS), 2);
        assert_eq!(store.expiring_events(), 0);
    }
}
