//! What a long-running server lets go of with time, run after every write (no background
//! task): Events expire (`StoreConfig::event_ttl`), as they do in a real cluster, where each
//! Event is written to etcd under a lease of `--event-ttl`; and the watch history keeps only
//! `StoreConfig::history_window`, as etcd compaction keeps only recent revisions. Without
//! them, a server that records Events and changes for every backend keeps them all.

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

    /// After a write at `now`: expires Events and compacts the watch history.
    pub(super) fn pass_time(&mut self, now: &str) {
        if self.last_write.0 != now {
            self.last_write = (now.to_string(), unix_seconds(now));
        }
        let Some(seconds) = self.last_write.1 else {
            return;
        };
        if self.config.history_window.is_some() {
            match self.time_marks.back_mut() {
                Some((at, rv)) if *at >= seconds => *rv = (*rv).max(self.rv),
                _ => self.time_marks.push_back((seconds, self.rv)),
            }
        }
        self.expire_events(seconds);
        self.compact_history(seconds);
    }

    /// Drops the changes made more than `history_window` before `now` (Unix seconds).
    fn compact_history(&mut self, now: i64) {
        let Some(window) = self.config.history_window else {
            return;
        };
        let cut = now.saturating_sub(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
        let mut cut_rv = None;
        while let Some(&(at, rv)) = self.time_marks.front() {
            if at > cut {
                break;
            }
            cut_rv = Some(rv);
            self.time_marks.pop_front();
        }
        let Some(cut_rv) = cut_rv else {
            return;
        };
        for ks in &mut self.kinds {
            while ks.history.front().is_some_and(|change| change.rv <= cut_rv) {
                if let Some(old) = ks.history.pop_front() {
                    ks.compacted_rv = old.rv;
                }
            }
        }
    }

    /// Deletes the Events whose time has come (a DELETED watch event each, as etcd's lease
    /// expiry gives); those deleted or replaced meanwhile are skipped.
    fn expire_events(&mut self, now: i64) {
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

    fn namespace(store: &mut Store, name: &str, now: &str) -> u64 {
        let created = store
            .create(
                resources::NAMESPACES,
                None,
                json!({"metadata": {"name": name}}),
                now,
                false,
            )
            .expect("namespace");
        crate::store::rv_of(&created).parse().expect("rv")
    }

    /// Changes older than the window leave the history (a watch from before them gets 410
    /// Expired, as after etcd compaction); newer ones stay and replay.
    #[test]
    fn the_watch_history_keeps_only_its_window() {
        let mut store = Store::new(
            Arc::new(resources::all()),
            StoreConfig {
                history_window: Some(Duration::from_secs(120)),
                ..StoreConfig::default()
            },
        );
        let first = namespace(&mut store, "a", "2030-01-01T00:00:00Z");
        let second = namespace(&mut store, "b", "2030-01-01T00:01:00Z");
        assert!(store.watch(resources::NAMESPACES, Some(first - 1)).is_ok());
        let third = namespace(&mut store, "c", "2030-01-01T00:02:30Z");
        let expired = store
            .watch(resources::NAMESPACES, Some(first - 1))
            .expect_err("compacted");
        assert_eq!(expired.code, 410);
        let (replayed, _) = store
            .watch(resources::NAMESPACES, Some(first))
            .expect("within the window");
        let versions: Vec<u64> = replayed.iter().map(|c| c.rv).collect();
        assert_eq!(versions, [second, third]);
        assert!(store.kinds[resources::NAMESPACES].history.len() == 2);
        assert!(store.time_marks.len() <= 2);
    }

    #[test]
    fn without_a_window_the_history_is_kept() {
        let mut store = store(None);
        let first = namespace(&mut store, "a", "2030-01-01T00:00:00Z");
        namespace(&mut store, "b", "2040-01-01T00:00:00Z");
        assert!(store.watch(resources::NAMESPACES, Some(first - 1)).is_ok());
        assert!(store.time_marks.is_empty());
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
