//! The observer: reads the API server's store and the sidecars' live counts after every step
//! and feeds the invariant checker, and records the observable trace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use spawner_core::{Phase, SessionLivedBackend};
use spawner_localcluster::Cluster;

use crate::clock::{HostClocks, sim_epoch_ms};
use crate::invariants::{InvariantChecker, Observation, Violation};
use crate::leadership::{WriteLog, lease_holder};
use crate::pods::SidecarRegistry;
use crate::throttling::ThrottleWatch;
use crate::world::{LEASE_NAME, NAMESPACE, ONLY_THE_LEADER_WRITES, WorldConfig};

/// The invariant the API server's objects are held to when the observer reads them.
pub const WELL_FORMED: &str = "the API server's backends are well-formed";

/// Reads the API server's store and the sidecars after every step and feeds the checker.
pub(crate) struct Observer {
    cluster: Cluster,
    sidecars: SidecarRegistry,
    pub(crate) checker: InvariantChecker,
    last_rv: u64,
    known: BTreeMap<String, (Phase, Option<String>)>,
    /// When the world first saw each known backend: a name comes back once its backend is
    /// deleted (a key's generation restarts), and this tells the incarnations apart.
    first_seen: BTreeMap<String, Duration>,
    live: BTreeMap<String, u64>,
    /// Backends seen ending (terminate requested or deletion begun).
    ending: BTreeSet<String>,
    pub(crate) events: Vec<String>,
    clocks: HostClocks,
    controllers: Vec<String>,
    retention: Duration,
    slots_per_node: usize,
    /// The controllers' writes, checked against the lease holder when they are elected.
    writes: Option<WriteLog>,
    /// The API server's 429 answers per identity, held to a rate.
    pub(crate) throttles: ThrottleWatch,
}

impl Observer {
    pub(crate) fn new(
        cluster: Cluster,
        sidecars: SidecarRegistry,
        clocks: HostClocks,
        config: &WorldConfig,
        writes: WriteLog,
    ) -> Self {
        Self {
            cluster,
            sidecars,
            checker: InvariantChecker::new(),
            last_rv: 0,
            known: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            live: BTreeMap::new(),
            ending: BTreeSet::new(),
            events: Vec::new(),
            clocks,
            controllers: (0..config.controllers)
                .map(|i| format!("controller-{i}"))
                .collect(),
            retention: config.retention,
            slots_per_node: config.slots_per_node,
            writes: (config.controllers > 1).then_some(writes),
            throttles: ThrottleWatch::default(),
        }
    }

    /// No split brain: every write a controller replica sent during the step was sent while
    /// the API server's lease named it (a replica takes the lease over only after the record
    /// stayed unchanged for the lease's duration, and a leader must have stepped down by its
    /// renew deadline, which is shorter).
    fn check_writers(&mut self, now: Duration) -> Result<(), Violation> {
        let Some(writes) = &self.writes else {
            return Ok(());
        };
        let sent = writes.take();
        if sent.is_empty() {
            return Ok(());
        }
        let holder = lease_holder(
            &self.cluster.snapshot("coordination.k8s.io", "leases"),
            LEASE_NAME,
        );
        for (replica, request) in sent {
            if holder.as_deref() != Some(replica.as_str()) {
                self.record(now, format!("{replica} wrote without the lease: {request}"));
                return Err(Violation {
                    at: now,
                    invariant: ONLY_THE_LEADER_WRITES,
                    detail: format!(
                        "{replica} sent {request} while the lease is held by {}",
                        holder.as_deref().unwrap_or("nobody")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The controllers' wall clocks at sim time `now`, in ms since the UNIX epoch (at the end
    /// of the step: no reading made during it was later).
    fn controller_clocks(&self, now: Duration) -> impl Iterator<Item = i64> + '_ {
        let world = sim_epoch_ms() + now.as_millis() as i64;
        self.controllers
            .iter()
            .map(move |c| world + self.clocks.offset_ms(c))
    }

    /// Tells the checker what the controllers' clocks can have read by `now`.
    pub(crate) fn note_clocks(&mut self, now: Duration) {
        if let Some(latest) = self.controller_clocks(now).max() {
            self.checker.note_controller_clock(latest);
        }
    }

    /// How many requests the API server answered 429, in all.
    pub(crate) fn throttled(&self) -> u64 {
        self.cluster.throttled_requests().values().sum()
    }

    /// Backend `name`'s phase as last read from the API server (`None`: not there).
    pub(crate) fn phase_of(&self, name: &str) -> Option<Phase> {
        self.known.get(name).map(|(phase, _)| *phase)
    }

    /// When the world first saw the backend now named `name`.
    pub(crate) fn first_seen(&self, name: &str) -> Option<Duration> {
        self.first_seen.get(name).copied()
    }

    fn record(&mut self, now: Duration, line: String) {
        self.events
            .push(format!("{:>9.3} {line}", now.as_secs_f64()));
    }

    pub(crate) fn last_events(&self) -> Vec<String> {
        self.events.iter().rev().take(30).rev().cloned().collect()
    }

    pub(crate) fn observe(
        &mut self,
        now: Duration,
        deadlines_from: Option<Duration>,
    ) -> Result<(), Violation> {
        self.note_clocks(now);
        self.check_writers(now)?;
        self.throttles
            .observe(now, self.cluster.throttled_requests())?;
        // Sidecars first: a connection opened in this step counts before a sweep seen in it.
        self.observe_sidecars(now)?;
        let rv = self.cluster.resource_version();
        if rv != self.last_rv {
            self.last_rv = rv;
            self.observe_backends(now)?;
            self.observe_pods(now)?;
        }
        self.checker.check_deadlines(now, deadlines_from)
    }

    /// Every sidecar's live connection count, where it changed.
    fn observe_sidecars(&mut self, now: Duration) -> Result<(), Violation> {
        for (pod, live) in self.sidecars.live() {
            let backend = pod.rsplit('/').next().unwrap_or(&pod).to_string();
            if self.live.get(&backend) != Some(&live) {
                self.live.insert(backend.clone(), live);
                self.record(now, format!("{backend} live={live}"));
                self.checker
                    .observe(now, Observation::Live { backend, live })?;
            }
        }
        Ok(())
    }

    /// Every backend in the API server (as the typed resource): created, changed phase, or
    /// deleted since the last read.
    fn observe_backends(&mut self, now: Duration) -> Result<(), Violation> {
        let mut present = BTreeSet::new();
        for object in self.cluster.snapshot("spawner.dev", "sessionlivedbackends") {
            let backend: SessionLivedBackend =
                SessionLivedBackend::deserialize(&*object).map_err(|e| Violation {
                    at: now,
                    invariant: WELL_FORMED,
                    detail: format!("a SessionLivedBackend does not parse: {e}"),
                })?;
            let Some(name) = backend.metadata.name.clone() else {
                continue;
            };
            self.observe_backend(now, &name, &backend)?;
            present.insert(name);
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            self.first_seen.remove(&name);
            self.ending.remove(&name);
            self.live.remove(&name);
            self.sidecars.remove(&format!("{NAMESPACE}/{name}"));
            self.record(now, format!("{name} deleted"));
            self.checker
                .observe(now, Observation::Deleted { backend: name })?;
        }
        Ok(())
    }

    fn observe_backend(
        &mut self,
        now: Duration,
        name: &str,
        backend: &SessionLivedBackend,
    ) -> Result<(), Violation> {
        let phase = backend.phase();
        let reason = backend.status.as_ref().and_then(|s| s.reason.clone());
        let ending = backend.metadata.deletion_timestamp.is_some()
            || backend
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(spawner_core::resource::TERMINATE_ANNOTATION));
        if self.known.contains_key(name) {
            self.note_ending(now, name, ending)?;
        }
        match self.known.get(name) {
            None => {
                let key = backend.spec.key.clone();
                let grace = u64::from(backend.spec.grace_period_seconds);
                self.record(now, format!("{name} created key={key:?}"));
                self.checker.observe(
                    now,
                    Observation::Created {
                        backend: name.to_string(),
                        key,
                        grace: Duration::from_secs(grace),
                    },
                )?;
                if let (Some(created), Some(lifetime)) = (
                    backend.metadata.creation_timestamp.as_ref(),
                    backend.spec.max_lifetime_seconds,
                ) {
                    self.checker.observe(
                        now,
                        Observation::Lifetime {
                            backend: name.to_string(),
                            deadline_ms: created.0.as_millisecond() + i64::from(lifetime) * 1000,
                        },
                    )?;
                }
                self.known
                    .insert(name.to_string(), (Phase::Submitted, None));
                self.first_seen.insert(name.to_string(), now);
                self.note_ending(now, name, ending)?;
            }
            Some((known, _)) if *known == phase => return Ok(()),
            Some(_) => {}
        }
        if phase != Phase::Submitted {
            self.record(
                now,
                format!("{name} {phase} {}", reason.as_deref().unwrap_or("")),
            );
            self.checker.observe(
                now,
                Observation::Phase {
                    backend: name.to_string(),
                    phase,
                    reason: reason.clone(),
                },
            )?;
        }
        self.known.insert(name.to_string(), (phase, reason));
        Ok(())
    }

    /// Tells the checker, once, that backend `name` is `ending` (terminate requested or being
    /// deleted): no longer live for its key.
    fn note_ending(&mut self, now: Duration, name: &str, ending: bool) -> Result<(), Violation> {
        if ending && self.ending.insert(name.to_string()) {
            self.checker.observe(
                now,
                Observation::Ending {
                    backend: name.to_string(),
                },
            )?;
        }
        Ok(())
    }

    /// At most one pod per backend, and no node over its capacity.
    fn observe_pods(&mut self, now: Duration) -> Result<(), Violation> {
        let mut pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut bound: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pod in self.cluster.snapshot("", "pods") {
            let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
            if let (Some(node), Some(name)) = (
                pod["spec"]["nodeName"].as_str(),
                pod["metadata"]["name"].as_str(),
            ) && !matches!(phase, "Succeeded" | "Failed")
            {
                bound
                    .entry(node.to_string())
                    .or_default()
                    .push(name.to_string());
            }
            if let (Some(backend), Some(name)) = (
                pod["metadata"]["labels"][spawner_core::resource::BACKEND_LABEL].as_str(),
                pod["metadata"]["name"].as_str(),
            ) {
                pods.entry(backend.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
        self.checker.check_pods(now, &pods)?;
        self.checker
            .check_node_capacity(now, &bound, self.slots_per_node)
    }

    /// Backends, pods and services still in the API server, and how many finished backends the
    /// controller rightly still keeps.
    ///
    /// A finished backend the controller is right to keep is not left behind: its retention
    /// (counted from its terminal condition's time, which the host that wrote it stamped with
    /// its own clock) has not yet passed by the controller's clock. That happens when the writer's
    /// clock was ahead of the controller's (docs/simulation.md, clock steps). Its pod and
    /// service are never excused.
    pub(crate) fn leftovers(&self, now: Duration) -> (Vec<String>, usize) {
        let controller_now = self.controller_clocks(now).min().unwrap_or(i64::MAX);
        let retention = self.retention.as_millis() as i64;
        let mut left = Vec::new();
        let mut retained = 0;
        for (group, plural) in [
            ("spawner.dev", "sessionlivedbackends"),
            ("", "pods"),
            ("", "services"),
        ] {
            for object in self.cluster.snapshot(group, plural) {
                if object["metadata"]["namespace"].as_str() != Some(NAMESPACE) {
                    continue;
                }
                let kept = plural == "sessionlivedbackends"
                    && SessionLivedBackend::deserialize(&*object)
                        .ok()
                        .and_then(|b| finished_at_ms(&b))
                        .is_some_and(|t| t + retention > controller_now);
                if kept {
                    retained += 1;
                    continue;
                }
                left.push(format!(
                    "{plural}/{}",
                    object["metadata"]["name"].as_str().unwrap_or("?")
                ));
            }
        }
        (left, retained)
    }
}

/// When a finished backend reached its terminal phase, by its condition's time (ms since the
/// UNIX epoch); `None` while it is not finished.
fn finished_at_ms(backend: &SessionLivedBackend) -> Option<i64> {
    let phase = backend.phase();
    if !phase.is_terminal() {
        return None;
    }
    let condition = backend
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == phase.as_str())?;
    chrono::DateTime::parse_from_rfc3339(&condition.last_transition_time)
        .ok()
        .map(|t| t.timestamp_millis())
}
