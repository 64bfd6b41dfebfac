//! The router's view of the backends: a watch cache (kube-rs reflector) of the namespace's
//! SessionLivedBackends, looked up by name in constant time, and a signal that wakes requests
//! waiting for a backend to become Ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use spawner_core::resource::is_public;
use spawner_core::{Phase, SessionLivedBackend};
use tokio::sync::watch;

/// Where a backend stands for the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not in the cache.
    Unknown,
    /// Swept, Terminated or Failed, or being deleted: 410.
    Ended(Phase),
    /// Still starting (or Ready without a URL yet).
    Starting { public: bool, phase: Phase },
    /// Ready: its sidecar's address (`host:port`).
    Ready { public: bool, upstream: String },
}

/// How the router sees `backend`.
pub fn classify(backend: &SessionLivedBackend) -> Lookup {
    let phase = backend.phase();
    let public = is_public(backend);
    if phase.is_terminal() || backend.metadata.deletion_timestamp.is_some() {
        return Lookup::Ended(phase);
    }
    let url = backend.status.as_ref().and_then(|s| s.url.as_deref());
    match (phase, url.and_then(upstream_address)) {
        (Phase::Ready, Some(upstream)) => Lookup::Ready { public, upstream },
        _ => Lookup::Starting { public, phase },
    }
}

/// `host:port` of a sidecar URL (`http://host:port[/]`), the only form the controller writes.
pub fn upstream_address(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let plausible = !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
    plausible.then(|| authority.to_string())
}

/// The cache: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Backends {
    store: Store<SessionLivedBackend>,
    namespace: String,
    changed: watch::Receiver<u64>,
    /// The first complete list arrived (until then every backend would look unknown).
    synced: Arc<AtomicBool>,
}

impl Backends {
    /// Starts watching `namespace`; the returned future keeps the cache current and must be
    /// polled (spawned) for as long as the cache is used.
    pub fn watch(
        client: kube::Client,
        namespace: &str,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + use<>) {
        let api: Api<SessionLivedBackend> = Api::namespaced(client, namespace);
        let (store, writer) = reflector::store();
        let (tick, changed) = watch::channel(0u64);
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        let synced = Arc::new(AtomicBool::new(false));
        let driver = {
            let synced = synced.clone();
            async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        // The reflector applied the whole first list (and every relist).
                        Ok(watcher::Event::InitDone) => synced.store(true, Ordering::Release),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "backend watch failed; retrying"),
                    }
                    tick.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        };
        (
            Self {
                store,
                namespace: namespace.to_string(),
                changed,
                synced,
            },
            driver,
        )
    }

    /// Waits until the cache holds a first complete list (false after `timeout`).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_synced() {
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.is_synced(),
            }
        }
        true
    }

    /// Whether the first complete list arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// How backend `name` stands now.
    pub fn lookup(&self, name: &str) -> Lookup {
        let key = ObjectRef::new(name).within(&self.namespace);
        self.store
            .get(&key)
            .map_or(Lookup::Unknown, |b| classify(&b))
    }

    /// The key a session trace names backend `name` by, as the api records it: its `key`, or
    /// its name when it has none.
    pub fn trace_key(&self, name: &str) -> Option<String> {
        let backend = self
            .store
            .get(&ObjectRef::new(name).within(&self.namespace))?;
        Some(backend.spec.key.clone().unwrap_or_else(|| name.to_string()))
    }

    /// Number of backends in the cache.
    pub fn len(&self) -> usize {
        self.store.state().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `name` is Ready or ended, or `timeout` passes; returns its last state. Also
    /// used for a backend the request's token vouches for but the cache has not seen yet (a
    /// watch lags its create a little).
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Lookup {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = self.lookup(name);
            if matches!(state, Lookup::Ready { .. } | Lookup::Ended(_)) {
                return state;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out, or the watch ended (shutdown).
                _ => return self.lookup(name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spawner_core::resource::{PUBLIC_ANNOTATION, SessionLivedBackendStatus};

    fn backend(phase: Phase, url: Option<&str>) -> SessionLivedBackend {
        let mut b: SessionLivedBackend =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "spawner.dev/v1",
                "kind": "SessionLivedBackend",
                "metadata": {"name": "sb-a", "namespace": "default"},
                "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}, "httpPort": 8080, "gracePeriodSeconds": 300}
            }))
            .expect("backend");
        b.status = Some(SessionLivedBackendStatus {
            phase,
            url: url.map(str::to_string),
            ..Default::default()
        });
        b
    }

    #[test]
    fn classification_follows_the_phase() {
        assert_eq!(
            classify(&backend(Phase::Ready, Some("http://10.1.2.3:9090"))),
            Lookup::Ready {
                public: false,
                upstream: "10.1.2.3:9090".into()
            }
        );
        assert_eq!(
            classify(&backend(Phase::Ready, None)),
            Lookup::Starting {
                public: false,
                phase: Phase::Ready
            }
        );
        assert_eq!(
            classify(&backend(Phase::Running, Some("http://10.1.2.3:9090"))),
            Lookup::Starting {
                public: false,
                phase: Phase::Running
            }
        );
        for phase in [Phase::Swept, Phase::Terminated, Phase::Failed] {
            assert_eq!(
                classify(&backend(phase, Some("http://10.1.2.3:9090"))),
                Lookup::Ended(phase)
            );
        }
        let mut public = backend(Phase::Ready, Some("http://sb-a.default.svc:9090/"));
        public
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(PUBLIC_ANNOTATION.into(), "true".into());
        assert_eq!(
            classify(&public),
            Lookup::Ready {
                public: true,
                upstream: "sb-a.default.svc:9090".into()
            }
        );
    }

    #[test]
    fn only_plain_sidecar_urls_are_upstreams() {
        assert_eq!(
            upstream_address("http://127.0.0.1:4000").as_deref(),
            Some("127.0.0.1:4000")
        );
        for bad in [
            "https://x:1",
            "http://x",
            "http://x:0",
            "http://x:99999",
            "http://x:1/path",
            "http://u@x:1",
            "http://:1",
            "",
        ] {
            assert_eq!(upstream_address(bad), None, "{bad}");
        }
    }
}
