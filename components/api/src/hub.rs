//! One watch of every backend in the api's namespace, shared by all status streams of this
//! replica (a watch per stream would let unauthenticated clients open one Kubernetes watch
//! each), and the cap on concurrent streams.
//!
//! The watch runs only while some stream listens. A watch that stays silent longer than the
//! idle timeout may lead into a partition: it is replaced after a fresh list, which every
//! stream catches up from. A backend missing from a list is read before a stream calls it
//! deleted: the list may have started before the backend was created.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use spawner_core::SessionLivedBackend;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

/// Server-side timeout asked of each watch; the client-side idle timeout is much shorter.
const WATCH_SERVER_TIMEOUT_SECONDS: u32 = 240;
/// Pause before retrying after the Kubernetes API failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Changes buffered per listener; one that falls further behind catches up from a read.
const BUFFER: usize = 1024;

/// What the shared watch saw.
#[derive(Clone, Debug)]
pub enum Change {
    Applied(Arc<SessionLivedBackend>),
    Deleted(Arc<SessionLivedBackend>),
    /// A fresh list after the watch was lost: every backend that exists, by name.
    Relisted(Arc<HashMap<String, Arc<SessionLivedBackend>>>),
}

/// The shared watch and the stream cap.
pub struct StatusHub {
    backends: Api<SessionLivedBackend>,
    changes: broadcast::Sender<Change>,
    watching: AtomicBool,
    idle_timeout: Duration,
    shutdown: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    /// The running watch task, kept so that it is not detached silently.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// One stream's place: its receiver of changes and its slot under the cap.
pub struct Subscription {
    pub changes: broadcast::Receiver<Change>,
    _slot: OwnedSemaphorePermit,
}

impl StatusHub {
    pub fn new(
        backends: Api<SessionLivedBackend>,
        idle_timeout: Duration,
        max_streams: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(BUFFER);
        Arc::new(Self {
            backends,
            changes,
            watching: AtomicBool::new(false),
            idle_timeout,
            shutdown,
            slots: Arc::new(Semaphore::new(max_streams)),
            task: Mutex::new(None),
        })
    }

    /// A place for one more stream, or `None` when the cap is reached. Starts the shared
    /// watch if it is not running. Subscribe before reading the backend, so that no change
    /// between the read and the subscription is missed.
    pub fn subscribe(self: &Arc<Self>) -> Option<Subscription> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let changes = self.changes.subscribe();
        self.ensure_watching();
        Some(Subscription {
            changes,
            _slot: slot,
        })
    }

    /// Streams open now.
    pub fn listeners(&self) -> usize {
        self.changes.receiver_count()
    }

    fn ensure_watching(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let hub = Arc::clone(self);
        let task = tokio::spawn(async move { hub.run().await });
        if let Ok(mut slot) = self.task.lock() {
            *slot = Some(task);
        }
    }

    async fn run(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = self.watch_while_listened() => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            self.watching.store(false, Ordering::Release);
            // A stream may have subscribed after the last check and before the flag fell.
            if *self.shutdown.borrow()
                || self.listeners() == 0
                || self.watching.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
    }

    /// Lists, then watches from the list's version; after any loss lists again. Returns when
    /// no stream listens.
    async fn watch_while_listened(&self) {
        while self.listeners() > 0 {
            let Some(version) = self.relist().await else {
                tokio::time::sleep(RETRY_DELAY).await;
                continue;
            };
            self.follow(version).await;
        }
    }

    /// A fresh list, sent to every stream; the list's resourceVersion.
    async fn relist(&self) -> Option<String> {
        let listed = tokio::time::timeout(
            self.idle_timeout,
            self.backends.list(&ListParams::default()),
        )
        .await;
        match listed {
            Ok(Ok(list)) => {
                let version = list.metadata.resource_version.unwrap_or_default();
                let by_name = list
                    .items
                    .into_iter()
                    .map(|b| (b.name_any(), Arc::new(b)))
                    .collect();
                let _ = self.changes.send(Change::Relisted(Arc::new(by_name)));
                Some(version)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list backends for status streams");
                None
            }
            Err(_) => {
                tracing::warn!("listing backends for status streams timed out");
                None
            }
        }
    }

    /// Follows one watch from `version` until it ends, fails, stays silent past the idle
    /// timeout, or no stream listens.
    async fn follow(&self, mut version: String) {
        loop {
            let params = WatchParams::default().timeout(WATCH_SERVER_TIMEOUT_SECONDS);
            let started =
                tokio::time::timeout(self.idle_timeout, self.backends.watch(&params, &version))
                    .await;
            let mut events = match started {
                Ok(Ok(events)) => events.boxed(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch backends for status streams");
                    return;
                }
                Err(_) => return,
            };
            loop {
                if self.listeners() == 0 {
                    return;
                }
                let next = tokio::time::timeout(self.idle_timeout, events.next()).await;
                let event = match next {
                    Ok(Some(Ok(event))) => event,
                    // The server ended the watch (its timeout): continue from where it was.
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(error = %e, "backend watch failed; relisting");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("backend watch silent past the idle timeout; relisting");
                        return;
                    }
                };
                match event {
                    WatchEvent::Added(b) | WatchEvent::Modified(b) => {
                        version = b.resource_version().unwrap_or(version);
                        let _ = self.changes.send(Change::Applied(Arc::new(b)));
                    }
                    WatchEvent::Deleted(b) => {
                        version = b.resource_version().unwrap_or(version);
                        let _ = self.changes.send(Change::Deleted(Arc::new(b)));
                    }
                    WatchEvent::Bookmark(bookmark) => {
                        version = bookmark.metadata.resource_version;
                    }
                    // Typically 410 Gone: the version is too old. Start over from a list.
                    WatchEvent::Error(status) => {
                        tracing::debug!(code = status.code, "backend watch error; relisting");
                        return;
                    }
                }
            }
        }
    }
}
