//! Watches over HTTP: the replayed backlog, the live feed, selector transitions, bookmarks and
//! the deadline.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::request::{Query, ResourcePath};
use super::response::Repr;
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::resources;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Change, ChangeType, Filter, encode_watch_line};
use crate::table;

/// The longest watch served, whatever `timeoutSeconds` asks (one year).
const MAX_WATCH_SECONDS: u64 = 365 * 24 * 3600;

pub(super) struct WatchState {
    cluster: Cluster,
    backlog: VecDeque<Arc<Change>>,
    rx: broadcast::Receiver<Arc<Change>>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    deadline: tokio::time::Instant,
    bookmarks: Option<tokio::time::Interval>,
    initial_events_end: Option<u64>,
    last_rv: u64,
    repr: Repr,
    /// Objects are shown in another representation (events.k8s.io Events).
    convert: bool,
    /// The type the client watches (for bookmarks and tables).
    view_kind: usize,
    first: bool,
    done: bool,
}

impl WatchState {
    fn filter(&self) -> Filter<'_> {
        Filter {
            namespace: self.namespace.as_deref(),
            labels: &self.labels,
            fields: &self.fields,
        }
    }

    /// The line to send for an event, if this watcher sees it (with selector transitions).
    fn line(&mut self, ev: &Change) -> Option<Bytes> {
        self.last_rv = self.last_rv.max(ev.rv);
        let f = self.filter();
        let now_matches = f.matches(&ev.object);
        let was_matching = ev.prev.as_deref().is_some_and(|p| f.matches(p));
        let etype = match ev.etype {
            ChangeType::Added if now_matches => ChangeType::Added,
            ChangeType::Modified if now_matches && was_matching => ChangeType::Modified,
            ChangeType::Modified if now_matches => ChangeType::Added,
            ChangeType::Modified if was_matching => ChangeType::Deleted,
            ChangeType::Deleted if was_matching || now_matches => ChangeType::Deleted,
            _ => return None,
        };
        if etype == ev.etype && self.repr == Repr::Full && !self.convert {
            return Some(ev.encoded().clone());
        }
        if self.convert {
            let shown = crate::event_versions::to_new(&ev.object);
            return Some(self.encode(etype.as_str(), &shown));
        }
        Some(self.encode(etype.as_str(), &ev.object))
    }

    fn encode(&mut self, etype: &str, obj: &Value) -> Bytes {
        match self.repr {
            Repr::Full => encode_watch_line(etype, obj),
            Repr::Metadata => encode_watch_line(etype, &table::partial_metadata(obj)),
            Repr::Table(include) => {
                let rt = &self.cluster.shared.types[self.view_kind];
                let t = table::table(
                    rt,
                    &[obj],
                    include,
                    json!({"resourceVersion": crate::store::rv_of(obj)}),
                    self.first,
                    crate::clock::now(&*self.cluster.shared.clock),
                );
                self.first = false;
                encode_watch_line(etype, &t)
            }
        }
    }

    fn bookmark(&mut self, rv: u64, initial_end: bool) -> Bytes {
        let rt = &self.cluster.shared.types[self.view_kind];
        let mut obj = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
        if initial_end {
            obj["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        encode_watch_line("BOOKMARK", &obj)
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        while let Some(ev) = self.backlog.pop_front() {
            if let Some(line) = self.line(&ev) {
                return Some(line);
            }
        }
        if let Some(rv) = self.initial_events_end.take() {
            let rv = rv.max(self.last_rv);
            return Some(self.bookmark(rv, true));
        }
        loop {
            let tick = async {
                match &mut self.bookmarks {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.done = true;
                    return None;
                }
                ev = self.rx.recv() => match ev {
                    Ok(ev) => {
                        if let Some(line) = self.line(&ev) {
                            return Some(line);
                        }
                    }
                    // A watcher that fell behind the broadcast buffer is ended; the client
                    // resumes from its last resourceVersion, as after any dropped watch.
                    Err(_) => {
                        self.done = true;
                        return None;
                    }
                },
                _ = tick => {
                    // Everything of this type up to the store's version has been received once
                    // the channel is empty (events are published under the store lock).
                    let rv = {
                        let store = self.cluster.store();
                        if self.rx.is_empty() { Some(store.resource_version()) } else { None }
                    };
                    if let Some(rv) = rv {
                        self.last_rv = self.last_rv.max(rv);
                        let rv = self.last_rv;
                        return Some(self.bookmark(rv, false));
                    }
                }
            }
        }
    }
}

pub(super) fn watch_response(
    cluster: &Cluster,
    rp: ResourcePath,
    q: &Query,
    repr: Repr,
    field_selector: &str,
    convert: bool,
) -> Result<Response, ApiError> {
    let types = cluster.shared.types.clone();
    let rt = &types[rp.kind];
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let mut fields = FieldSelector::parse(field_selector, rt)?;
    if let Some(name) = &rp.name {
        // GET .../watch/pods/name watches one object.
        fields = FieldSelector::parse(&format!("metadata.name={name}"), rt)?;
    }
    let from = match q.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v}")))?,
        ),
    };
    let send_initial = q.flag("sendInitialEvents");
    // Any timeout is accepted, as by the real server; past a year it is a year (a deadline
    // must stay representable).
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Duration::from_secs(t.min(MAX_WATCH_SECONDS)))
        .unwrap_or(cluster.shared.config.default_watch_timeout);
    let bookmarks_wanted = q.flag("allowWatchBookmarks");
    let from = if send_initial { None } else { from };
    let started = {
        let store = cluster.store();
        store
            .watch(rp.kind, from)
            .map(|(b, rx)| (b, rx, store.resource_version()))
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let (backlog, rx, start_rv) = match started {
        Ok(x) => x,
        Err(e) => {
            // The real server accepts the watch and sends the error as an ERROR event.
            let line = encode_watch_line("ERROR", &e.to_status());
            return Ok((headers, Body::from(line)).into_response());
        }
    };
    let interval = cluster.shared.config.bookmark_interval;
    let bookmarks = bookmarks_wanted.then(|| {
        // Like the real watch cache, a watch with a deadline gets a bookmark shortly before
        // it ends, so that the client resumes from a recent version.
        let first = if timeout > Duration::from_secs(3) {
            interval.min(timeout - Duration::from_secs(2))
        } else {
            interval
        };
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let state = WatchState {
        cluster: cluster.clone(),
        backlog: backlog.into(),
        rx,
        namespace: rp.namespace.clone(),
        labels,
        fields,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarks,
        initial_events_end: (send_initial && bookmarks_wanted).then_some(start_rv),
        last_rv: from.unwrap_or(0),
        repr,
        convert,
        view_kind: if convert {
            resources::NEW_EVENTS
        } else {
            rp.kind
        },
        first: true,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        let line = s.next_line().await?;
        Some((Ok::<Bytes, std::io::Error>(line), s))
    });
    Ok((headers, Body::from_stream(stream)).into_response())
}
