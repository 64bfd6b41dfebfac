//! Watch history: the change events a write publishes, each type's bounded history and its
//! live feed.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::broadcast;

use super::object::{namespace_of, rv_of};
use super::{Obj, Store};
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change, shared by every watcher; its JSON line is encoded once, on first use.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub etype: ChangeType,
    pub object: Obj,
    /// The object before the change (for selector transitions), when there was one.
    pub prev: Option<Obj>,
    encoded: OnceLock<Bytes>,
}

impl Change {
    pub fn new(rv: u64, etype: ChangeType, object: Obj, prev: Option<Obj>) -> Self {
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

/// The start of a watch: events to replay first, then the live feed.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

impl Store {
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
                    Arc::new(Change::new(rv, ChangeType::Added, o.clone(), None))
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

    pub(super) fn publish(&mut self, kind: usize, event: Change) {
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
}
