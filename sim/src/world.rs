//! The world builder and its run loop: the production api, controller(s), node agents and
//! sweepers, and every backend's sidecar, talking to localcluster's API server over turmoil,
//! while simulated users replay a trace and the invariant checker watches every step.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spawner_core::Phase;
use spawner_core::trace::Trace;
use spawner_localcluster::{Cluster, ServerConfig};

use crate::clock::{HostClocks, sim_epoch, sim_epoch_ms};
use crate::faults::{Fault, FaultKind, host_matches};
use crate::invariants::{InvariantChecker, Observation, Violation};
use crate::leadership::{RecordWrites, WriteLog, lease_holder};
use crate::mutants::{DuplicatePodCreates, ListsWithoutStatus, Mutant};
use crate::net::{KUBE_READ_TIMEOUT, SimConnector, SimListener, kube_client, kube_client_over};
use crate::pods::{APP_COMMAND, SidecarRegistry, SlotPool, SlotRuntime};
use crate::rbac::{CONTROLLER_TOKEN, NODE_AGENT_TOKEN, SWEEPER_TOKEN};
use crate::users::{SharedReport, UsersConfig, UsersReport};

const API_TOKEN: &str = "sim-api-token";
/// The key secret the api replicas share.
const KEY_SECRET: &str = "sim-key-secret";
pub const EVENTS_SECRET: &str = "sim-events-secret";
const NAMESPACE: &str = "default";
/// Latency of every link while no fault slows it: turmoil draws each message's delay between
/// these.
pub const LINK_MIN_LATENCY: Duration = Duration::from_micros(200);
pub const LINK_MAX_LATENCY: Duration = Duration::from_millis(5);
/// turmoil's accept queue and receive buffer, in segments (its default is 64).
const TCP_CAPACITY: usize = 4096;

/// The invariant the controllers' writes are held to when there are several replicas.
pub const ONLY_THE_LEADER_WRITES: &str = "only the controller holding the lease writes";
/// The controllers' Lease (the controller's default `--lease-name`).
const LEASE_NAME: &str = "spawner-controller";

/// The invariant a world's [`WorldConfig::allowed_user_failures`] holds it to.
pub const USERS_CONNECT: &str = "users connect to their backends";

/// What to build and run.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Pods each node can run at once (each slot is a turmoil host).
    pub slots_per_node: usize,
    /// Controller replicas (leader-elected when more than one; two by default, and every write
    /// a replica sends is checked against the lease holder).
    pub controllers: usize,
    /// api replicas (`api-0`, `api-1` ...); each user session talks to one, and fails over to
    /// the next when a request fails, as behind a load balancer.
    pub apis: usize,
    /// Client hosts the users are spread over.
    pub user_hosts: usize,
    /// Grace period of every backend, in seconds.
    pub grace_seconds: u32,
    /// `maxLifetimeSeconds` of every backend, if any.
    pub max_lifetime_seconds: Option<u32>,
    /// The sessions to replay.
    pub workload: Trace,
    pub faults: Vec<Fault>,
    /// Simulated time after the last trace event for sweeps and deletions to finish.
    pub drain: Duration,
    /// Simulated time a finished backend stays readable before the controller deletes it.
    pub retention: Duration,
    /// turmoil's step: the resolution of simulated time (and the main cost knob: every step
    /// polls every host).
    pub tick: Duration,
    /// How users wait for Ready: the interval of their status polls.
    pub poll_interval: Duration,
    /// The command-line arguments of `spawner-sim` that rebuild this world, for failure
    /// reports.
    pub reproduce: String,
    /// A deliberate bug to run with (tests of the simulator itself).
    pub mutant: Option<crate::mutants::Mutant>,
    /// How many users may fail to connect (giving up waiting for Ready included) before the
    /// run fails; `None` leaves what users see unchecked (a world built full on purpose).
    /// Fault-free worlds allow none.
    pub allowed_user_failures: Option<u64>,
    /// Records which permissions each component used at the API server (which enforces
    /// `deploy/rbac/` either way).
    pub audit: Option<spawner_localcluster::Audit>,
}

impl WorldConfig {
    pub fn new(seed: u64, workload: Trace) -> Self {
        Self {
            seed,
            nodes: 3,
            slots_per_node: 12,
            controllers: 2,
            apis: 2,
            user_hosts: 2,
            grace_seconds: 10,
            max_lifetime_seconds: None,
            workload,
            faults: Vec::new(),
            drain: Duration::from_secs(60),
            retention: Duration::from_secs(5),
            tick: Duration::from_millis(20),
            poll_interval: Duration::from_millis(250),
            reproduce: format!("--seed {seed} (a custom world: rerun the test that built it)"),
            mutant: None,
            allowed_user_failures: None,
            audit: None,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Summary {
    pub seed: u64,
    pub users: UsersReport,
    pub backends: usize,
    pub ready: usize,
    pub swept: usize,
    pub failed: usize,
    /// Stopped on request (a terminate, or the lifetime).
    pub terminated: usize,
    /// Finished backends still kept at the end because their retention is not over by the
    /// controller's clock (a clock ahead stamped their terminal phase).
    pub retained: usize,
    pub sim_time: Duration,
    pub wall_time: Duration,
    /// Hash of the observable events (phase transitions and deletions with their times).
    pub trace_hash: u64,
    /// The observable events, one line each.
    pub events: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {} sessions, {} connections ({} failed, {} gave up waiting for Ready, {} retried), {} messages echoed; {} backends ({} ready, {} swept, {} failed, {} terminated); {:.0}s simulated in {:.1}s wall; trace hash {:016x}",
            self.seed,
            self.users.sessions,
            self.users.connected,
            self.users.connect_failures,
            self.users.ready_timeouts,
            self.users.retries,
            self.users.messages_echoed,
            self.backends,
            self.ready,
            self.swept,
            self.failed,
            self.terminated,
            self.sim_time.as_secs_f64(),
            self.wall_time.as_secs_f64(),
            self.trace_hash
        )?;
        if self.retained > 0 {
            write!(
                f,
                "; {} finished backends kept for a retention stamped ahead",
                self.retained
            )?;
        }
        Ok(())
    }
}

/// A failed run: the violation, with what reproduces it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub violation: Violation,
    pub faults: Vec<Fault>,
    /// The last observable events before the violation.
    pub last_events: Vec<String>,
    /// `spawner-sim` arguments that rerun this world.
    pub reproduce: String,
    /// Every observable event of the run up to the violation.
    pub events: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "invariant violated with seed {}: {}",
            self.seed, self.violation
        )?;
        writeln!(
            f,
            "reproduce: cargo run -p spawner-sim -- {}",
            self.reproduce
        )?;
        writeln!(f, "faults: {:?}", self.faults)?;
        writeln!(f, "last events:")?;
        for event in &self.last_events {
            writeln!(f, "  {event}")?;
        }
        Ok(())
    }
}

/// The host of api replica `i`.
pub fn api_name(i: usize) -> String {
    format!("api-{i}")
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn slot_name(node: usize, slot: usize) -> String {
    format!("node-{node}-pod-{slot}")
}

/// Every host of the world `config` builds, by name.
pub fn host_names(config: &WorldConfig) -> Vec<String> {
    let mut hosts = vec!["apiserver".to_string()];
    hosts.extend((0..config.apis.max(1)).map(api_name));
    hosts.extend((0..config.controllers).map(|i| format!("controller-{i}")));
    for n in 0..config.nodes {
        hosts.push(node_name(n));
        hosts.extend((0..config.slots_per_node).map(|s| slot_name(n, s)));
    }
    hosts.extend((0..config.user_hosts.max(1)).map(|k| format!("users-{k}")));
    hosts.push("drain".into());
    hosts
}

/// Builds the world of `config` and runs it to the end.
pub fn run(config: WorldConfig) -> Result<Summary, Box<Failure>> {
    let wall = Instant::now();
    crate::entropy::seed(config.seed);
    // kube-runtime's watcher backoff (backon) draws jitter from fastrand's thread-local
    // generator, which seeds itself from the time; every host runs on this thread.
    fastrand::seed(config.seed);
    crate::mutants::switch_on(config.mutant);
    let mutant = config.mutant;
    let end_of_trace =
        Duration::from_millis(config.workload.events.last().map(|e| e.t_ms).unwrap_or(0));
    let horizon = end_of_trace + config.drain;
    let mut sim = turmoil::Builder::new()
        .epoch(sim_epoch())
        .rng_seed(config.seed)
        .simulation_duration(horizon + Duration::from_secs(60))
        .tick_duration(config.tick)
        // turmoil panics when a listener's accept queue overflows (a real one drops the SYN):
        // after the api restarts, hundreds of waiting users reconnect in the same step.
        .tcp_capacity(TCP_CAPACITY)
        .min_message_latency(LINK_MIN_LATENCY)
        .max_message_latency(LINK_MAX_LATENCY)
        .build();

    // The API server: its state lives outside the host, so crashing the host keeps it.
    let clocks = HostClocks::default();
    let cluster = Cluster::new(
        ServerConfig {
            auth: crate::rbac::auth(config.audit.clone()),
            bookmark_interval: crate::net::BOOKMARK_INTERVAL,
            ..ServerConfig::default()
        },
        Arc::new(clocks.of("apiserver")),
    );
    cluster
        .ensure_namespace(crate::rbac::SYSTEM_NAMESPACE)
        .expect("a fixed namespace in a fresh cluster");
    {
        let cluster = cluster.clone();
        sim.host("apiserver", move || {
            let cluster = cluster.clone();
            async move {
                let listener = SimListener::bind(("0.0.0.0", 6443)).await?;
                spawner_localcluster::serve(listener, cluster).await?;
                Ok(())
            }
        });
    }
    let kube_url: http::Uri = "http://apiserver:6443".parse().expect("static uri");

    let writes = WriteLog::default();
    for i in 0..config.controllers {
        let kube_url = kube_url.clone();
        let leader_election = config.controllers > 1
            && !(mutant == Some(Mutant::ReplicaWithoutLeaderElection)
                && i + 1 == config.controllers);
        let writes = writes.clone();
        let retention = config.retention;
        let clock = clocks.of(&format!("controller-{i}"));
        sim.host(format!("controller-{i}"), move || {
            let kube_url = kube_url.clone();
            let clock = clock.clone();
            let writes = writes.clone();
            async move {
                let replica = format!("controller-{i}");
                let client = if mutant == Some(Mutant::ControllerCreatesPodTwice) {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: DuplicatePodCreates(http),
                        replica,
                        log: writes,
                    })
                } else {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: http,
                        replica,
                        log: writes,
                    })
                };
                let config =
                    crate::components::controller_config(i, leader_election, retention, clock);
                let listener = SimListener::bind(("0.0.0.0", 8080)).await?;
                spawner_controller::run(client, listener, config, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    for i in 0..config.apis.max(1) {
        let kube_url = kube_url.clone();
        let name = api_name(i);
        let clock = clocks.of(&name);
        let base = format!("http://{name}:7070");
        // The mutant gives every replica a secret of its own, as replicas deployed without a
        // shared `SPAWNER_KEY_SECRET` would have.
        let key_secret = if mutant == Some(Mutant::ApiReplicasWithOwnKeySecrets) {
            format!("{KEY_SECRET}-{i}")
        } else {
            KEY_SECRET.to_string()
        };
        sim.host(name, move || {
            let kube_url = kube_url.clone();
            let clock = clock.clone();
            let base = base.clone();
            let key_secret = key_secret.clone();
            async move {
                let client = if mutant == Some(Mutant::ApiListsWithoutStatus) {
                    kube_client_over(
                        kube_url,
                        crate::rbac::API_TOKEN,
                        NAMESPACE,
                        ListsWithoutStatus,
                    )
                } else {
                    kube_client(kube_url, crate::rbac::API_TOKEN, NAMESPACE)
                };
                let config = crate::components::api_config(API_TOKEN, &base, &key_secret, clock)?;
                let listener = SimListener::bind(("0.0.0.0", 7070)).await?;
                if mutant == Some(Mutant::RacyKeyLookup) {
                    crate::mutants::racy_api(client, NAMESPACE, listener).await?;
                    return Ok(());
                }
                spawner_api::run(client, listener, config, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    let sidecars = SidecarRegistry::default();
    for n in 0..config.nodes {
        let pool = SlotPool::new(sidecars.clone());
        for s in 0..config.slots_per_node {
            let index = pool.add_slot();
            let pool = pool.clone();
            let name = slot_name(n, s);
            sim.host(name.clone(), move || {
                pool.clone().run_slot(index, name.clone())
            });
        }
        let kube_url = kube_url.clone();
        let slots = config.slots_per_node;
        let runtime = Arc::new(SlotRuntime::new(pool));
        let clock = clocks.of(&node_name(n));
        sim.host(node_name(n), move || {
            let kube_url = kube_url.clone();
            let runtime = runtime.clone();
            let clock = clock.clone();
            async move {
                let agent_client = kube_client(kube_url.clone(), NODE_AGENT_TOKEN, NAMESPACE);
                let agent_config =
                    crate::components::node_agent_config(&node_name(n), slots, clock.clone());
                tokio::spawn(spawner_node_agent::run(
                    agent_client,
                    agent_config,
                    runtime,
                    std::future::pending(),
                ));
                let client = kube_client(kube_url, SWEEPER_TOKEN, NAMESPACE);
                let http = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_max_idle_per_host(0)
                .build(SimConnector);
                let config = crate::components::sweeper_config(&node_name(n), EVENTS_SECRET, clock);
                let listener = SimListener::bind(("0.0.0.0", 8081)).await?;
                spawner_sweeper::run(client, listener, http, config, std::future::pending())
                    .await?;
                Ok(())
            }
        });
    }

    // Users, spread over client hosts by session.
    let report = SharedReport::default();
    let mut shares: Vec<Vec<_>> = vec![Vec::new(); config.user_hosts.max(1)];
    for event in &config.workload.events {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        event.session.hash(&mut h);
        let share = (h.finish() as usize) % shares.len();
        shares[share].push(event.clone());
    }
    let mut spawn_template = serde_json::json!({
        "command": [APP_COMMAND],
        "port": crate::pods::APP_PORT,
        "gracePeriodSeconds": config.grace_seconds,
    });
    if let Some(lifetime) = config.max_lifetime_seconds {
        spawn_template["maxLifetimeSeconds"] = lifetime.into();
    }
    let users_config = UsersConfig {
        apis: (0..config.apis.max(1))
            .map(|i| format!("http://{}:7070", api_name(i)))
            .collect(),
        token: API_TOKEN.into(),
        spawn_template,
        ready_timeout: Duration::from_secs(30),
        poll_interval: config.poll_interval,
    };
    for (k, share) in shares.into_iter().enumerate() {
        let users_config = users_config.clone();
        let report = report.clone();
        sim.client(format!("users-{k}"), async move {
            crate::users::play(share, users_config, report).await;
            Ok(())
        });
    }
    // Keeps the world running after the users are done, for sweeps and cleanup.
    sim.client("drain", async move {
        tokio::time::sleep(horizon).await;
        Ok(())
    });

    let mut observer = Observer::new(cluster.clone(), sidecars, clocks.clone(), &config, writes);
    let mut faults = FaultRunner::new(
        config.faults.clone(),
        host_names(&config),
        clocks.clone(),
        cluster,
    );
    loop {
        let done = match sim.step() {
            Ok(done) => done,
            Err(e) => {
                return Err(Box::new(Failure {
                    seed: config.seed,
                    violation: Violation {
                        at: sim.elapsed(),
                        invariant: "the simulation runs",
                        detail: e.to_string(),
                    },
                    faults: config.faults.clone(),
                    last_events: observer.last_events(),
                    reproduce: config.reproduce.clone(),
                    events: observer.events.clone(),
                }));
            }
        };
        let now = sim.elapsed();
        // What the controllers' clocks read during the step, before a fault steps one.
        observer.note_clocks(now);
        faults.apply(&mut sim, now, &config);
        if let Err(violation) = observer.observe(now, faults.deadlines_from(now)) {
            return Err(Box::new(Failure {
                seed: config.seed,
                violation,
                faults: config.faults.clone(),
                last_events: observer.last_events(),
                reproduce: config.reproduce.clone(),
                events: observer.events.clone(),
            }));
        }
        if done {
            break;
        }
    }
    let now = sim.elapsed();
    let (leftovers, retained) = observer.leftovers(now);
    if let Err(violation) = observer.checker.check_drained(now, &leftovers) {
        return Err(Box::new(Failure {
            seed: config.seed,
            violation,
            faults: config.faults.clone(),
            last_events: observer.last_events(),
            reproduce: config.reproduce.clone(),
            events: observer.events.clone(),
        }));
    }
    let users = report.snapshot();
    if let Some(allowed) = config.allowed_user_failures
        && users.connect_failures > allowed
    {
        return Err(Box::new(Failure {
            seed: config.seed,
            violation: Violation {
                at: now,
                invariant: USERS_CONNECT,
                detail: format!(
                    "{} of {} connections failed ({} gave up waiting for Ready, {} retried); at most {allowed} may",
                    users.connect_failures,
                    users.connect_failures + users.connected,
                    users.ready_timeouts,
                    users.retries,
                ),
            },
            faults: config.faults.clone(),
            last_events: observer.last_events(),
            reproduce: config.reproduce.clone(),
            events: observer.events.clone(),
        }));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    observer.events.hash(&mut hasher);
    Ok(Summary {
        seed: config.seed,
        users,
        backends: observer.checker.backends(),
        ready: observer.checker.reached(Phase::Ready),
        swept: observer.checker.reached(Phase::Swept),
        failed: observer.checker.reached(Phase::Failed),
        terminated: observer.checker.reached(Phase::Terminated),
        retained,
        sim_time: now,
        wall_time: wall.elapsed(),
        trace_hash: hasher.finish(),
        events: observer.events,
    })
}

/// Reads the API server's store and the sidecars after every step and feeds the checker.
struct Observer {
    cluster: Cluster,
    sidecars: SidecarRegistry,
    checker: InvariantChecker,
    last_rv: u64,
    known: BTreeMap<String, (Phase, Option<String>)>,
    live: BTreeMap<String, u64>,
    events: Vec<String>,
    clocks: HostClocks,
    controllers: Vec<String>,
    retention: Duration,
    slots_per_node: usize,
    /// The controllers' writes, checked against the lease holder when they are elected.
    writes: Option<WriteLog>,
}

impl Observer {
    fn new(
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
            live: BTreeMap::new(),
            events: Vec::new(),
            clocks,
            controllers: (0..config.controllers)
                .map(|i| format!("controller-{i}"))
                .collect(),
            retention: config.retention,
            slots_per_node: config.slots_per_node,
            writes: (config.controllers > 1).then_some(writes),
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
    fn note_clocks(&mut self, now: Duration) {
        if let Some(latest) = self.controller_clocks(now).max() {
            self.checker.note_controller_clock(latest);
        }
    }

    fn record(&mut self, now: Duration, line: String) {
        self.events
            .push(format!("{:>9.3} {line}", now.as_secs_f64()));
    }

    fn last_events(&self) -> Vec<String> {
        self.events.iter().rev().take(30).rev().cloned().collect()
    }

    fn observe(
        &mut self,
        now: Duration,
        deadlines_from: Option<Duration>,
    ) -> Result<(), Violation> {
        self.note_clocks(now);
        self.check_writers(now)?;
        // Sidecars first: a connection opened in this step counts before a sweep seen in it.
        for (pod, live) in self.sidecars.live() {
            let backend = pod.rsplit('/').next().unwrap_or(&pod).to_string();
            if self.live.get(&backend) != Some(&live) {
                self.live.insert(backend.clone(), live);
                self.record(now, format!("{backend} live={live}"));
                self.checker
                    .observe(now, Observation::Live { backend, live })?;
            }
        }
        let rv = self.cluster.resource_version();
        if rv != self.last_rv {
            self.last_rv = rv;
            let objects = self.cluster.snapshot("spawner.dev", "sessionlivedbackends");
            let mut present = BTreeSet::new();
            for object in &objects {
                let Some(name) = object["metadata"]["name"].as_str() else {
                    continue;
                };
                present.insert(name.to_string());
                let phase: Phase =
                    serde_json::from_value(object["status"]["phase"].clone()).unwrap_or_default();
                let reason = object["status"]["reason"].as_str().map(str::to_string);
                match self.known.get(name) {
                    None => {
                        let key = object["spec"]["key"].as_str().map(str::to_string);
                        let grace = object["spec"]["gracePeriodSeconds"].as_u64().unwrap_or(300);
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
                            object["metadata"]["creationTimestamp"]
                                .as_str()
                                .and_then(wall_ms),
                            object["spec"]["maxLifetimeSeconds"].as_i64(),
                        ) {
                            self.checker.observe(
                                now,
                                Observation::Lifetime {
                                    backend: name.to_string(),
                                    deadline_ms: created + lifetime * 1000,
                                },
                            )?;
                        }
                        self.known
                            .insert(name.to_string(), (Phase::Submitted, None));
                    }
                    Some((known, _)) if *known == phase => continue,
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
            }
            let gone: Vec<String> = self
                .known
                .keys()
                .filter(|n| !present.contains(*n))
                .cloned()
                .collect();
            for name in gone {
                self.known.remove(&name);
                self.live.remove(&name);
                self.sidecars.remove(&format!("{NAMESPACE}/{name}"));
                self.record(now, format!("{name} deleted"));
                self.checker
                    .observe(now, Observation::Deleted { backend: name })?;
            }
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
                .check_node_capacity(now, &bound, self.slots_per_node)?;
        }
        self.checker.check_deadlines(now, deadlines_from)
    }

    /// Backends, pods and services still in the API server, and how many finished backends the
    /// controller rightly still keeps.
    ///
    /// A finished backend the controller is right to keep is not left behind: its retention
    /// (counted from its terminal condition's time, which the host that wrote it stamped with
    /// its own clock) has not yet passed by the controller's clock. That happens when the writer's
    /// clock was ahead of the controller's (docs/simulation.md, clock steps). Its pod and
    /// service are never excused.
    fn leftovers(&self, now: Duration) -> (Vec<String>, usize) {
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
                if plural == "sessionlivedbackends"
                    && finished_at_ms(&object).is_some_and(|t| t + retention > controller_now)
                {
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

/// An RFC 3339 time in ms since the UNIX epoch.
fn wall_ms(time: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(time)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// When a finished backend reached its terminal phase, by its condition's time (ms since the
/// UNIX epoch); `None` while it is not finished.
fn finished_at_ms(backend: &serde_json::Value) -> Option<i64> {
    let phase: Phase = serde_json::from_value(backend["status"]["phase"].clone()).ok()?;
    if !phase.is_terminal() {
        return None;
    }
    backend["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"].as_str() == Some(phase.as_str()))
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(wall_ms)
}

/// How long after a fault that drops traffic (a crash, a partition) heals the world may still
/// be catching up, before sweeps are owed on time again.
///
/// Such a fault leaves the connections that carried traffic dead: turmoil, like a network that
/// loses segments for good, never delivers what it dropped, so a request or stream in flight
/// then only ends at its read timeout (the kube clients' and the sweeper's event streams',
/// 15 s), after which the sweeper's next reconnect (up to its longest backoff, 10 s + 25 %)
/// and the sidecar's next report (a heartbeat, 5 s) let it sweep.
fn stall_recovery() -> Duration {
    let sweeper =
        crate::components::sweeper_config("node", EVENTS_SECRET, crate::clock::SimClock::new());
    KUBE_READ_TIMEOUT.max(sweeper.read_timeout())
        + sweeper.reconnect_max.mul_f64(1.25)
        + sweeper.heartbeat
}

/// Applies a fault schedule as simulated time passes.
struct FaultRunner {
    pending: Vec<Fault>,
    active: Vec<(Fault, Duration)>,
    /// When the deadlines suspended by the faults that healed are owed again.
    owed_from: Option<Duration>,
    /// Every host of the world, for faults that name hosts by pattern.
    hosts: Vec<String>,
    clocks: HostClocks,
    stall_recovery: Duration,
    /// The API server's store, to find the controller that leads when a fault names `leader`.
    cluster: Cluster,
}

impl FaultRunner {
    fn new(
        mut faults: Vec<Fault>,
        hosts: Vec<String>,
        clocks: HostClocks,
        cluster: Cluster,
    ) -> Self {
        faults.sort_by_key(|f| std::cmp::Reverse(f.at));
        Self {
            pending: faults,
            active: Vec::new(),
            owed_from: None,
            hosts,
            clocks,
            stall_recovery: stall_recovery(),
            cluster,
        }
    }

    /// `kind` with the host name `leader` replaced by the replica holding the lease now
    /// (`controller-0` when none does).
    fn resolve(&self, kind: FaultKind) -> FaultKind {
        let leader = || {
            lease_holder(
                &self.cluster.snapshot("coordination.k8s.io", "leases"),
                LEASE_NAME,
            )
            .unwrap_or_else(|| "controller-0".into())
        };
        let host = |h: String| if h == "leader" { leader() } else { h };
        match kind {
            FaultKind::Crash { host: h } => FaultKind::Crash { host: host(h) },
            FaultKind::Partition { a, b } => FaultKind::Partition {
                a: host(a),
                b: host(b),
            },
            FaultKind::Hold { a, b } => FaultKind::Hold {
                a: host(a),
                b: host(b),
            },
            FaultKind::Latency { a, b, min, max } => FaultKind::Latency {
                a: host(a),
                b: host(b),
                min,
                max,
            },
            FaultKind::ClockStep { host: h, by_ms } => FaultKind::ClockStep {
                host: host(h),
                by_ms,
            },
            other @ FaultKind::CrashNode { .. } => other,
        }
    }

    /// How long after `fault` heals sweeps may still be late, or `None` when it does not
    /// suspend them: a slow link delays what is in flight by its longest latency; a clock step
    /// suspends nothing, because the sweeper counts idle time on monotonic time.
    fn recovery(&self, fault: &FaultKind) -> Option<Duration> {
        match fault {
            FaultKind::ClockStep { .. } => None,
            FaultKind::Latency { max, .. } => Some(*max),
            _ => Some(self.stall_recovery),
        }
    }

    /// Every pair of distinct hosts matching `a` and `b`.
    fn links(&self, a: &str, b: &str) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for x in self.hosts.iter().filter(|h| host_matches(a, h)) {
            for y in self.hosts.iter().filter(|h| host_matches(b, h)) {
                if x != y {
                    pairs.push((x.clone(), y.clone()));
                }
            }
        }
        pairs
    }

    fn set_latency(&self, sim: &turmoil::Sim<'_>, a: &str, b: &str, min: Duration, max: Duration) {
        for (x, y) in self.links(a, b) {
            // Sets min and max to `min`, then raises max.
            sim.set_link_latency(x.as_str(), y.as_str(), min);
            sim.set_link_max_message_latency(x.as_str(), y.as_str(), max);
        }
    }

    fn hosts(kind: &FaultKind, config: &WorldConfig) -> Vec<String> {
        match kind {
            FaultKind::CrashNode { node } => {
                let mut hosts = vec![node_name(*node)];
                hosts.extend((0..config.slots_per_node).map(|s| slot_name(*node, s)));
                hosts
            }
            FaultKind::Crash { host } => vec![host.clone()],
            FaultKind::Partition { .. }
            | FaultKind::Hold { .. }
            | FaultKind::Latency { .. }
            | FaultKind::ClockStep { .. } => Vec::new(),
        }
    }

    fn apply(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, config: &WorldConfig) {
        while self.pending.last().is_some_and(|f| f.at <= now) {
            let Some(mut fault) = self.pending.pop() else {
                break;
            };
            fault.kind = self.resolve(fault.kind);
            match &fault.kind {
                FaultKind::Partition { a, b } => {
                    for (x, y) in self.links(a, b) {
                        sim.partition(x.as_str(), y.as_str());
                    }
                }
                FaultKind::Hold { a, b } => {
                    for (x, y) in self.links(a, b) {
                        sim.hold(x.as_str(), y.as_str());
                    }
                }
                FaultKind::Latency { a, b, min, max } => self.set_latency(sim, a, b, *min, *max),
                FaultKind::ClockStep { host, by_ms } => self.clocks.step(host, *by_ms),
                kind => {
                    for host in Self::hosts(kind, config) {
                        sim.crash(host.as_str());
                    }
                }
            }
            self.active.push((fault.clone(), fault.at + fault.duration));
        }
        let mut still = Vec::new();
        let mut latency_healed = false;
        for (fault, until) in std::mem::take(&mut self.active) {
            if until > now {
                still.push((fault, until));
                continue;
            }
            match &fault.kind {
                FaultKind::Partition { a, b } => {
                    for (x, y) in self.links(a, b) {
                        sim.repair(x.as_str(), y.as_str());
                    }
                }
                FaultKind::Hold { a, b } => {
                    for (x, y) in self.links(a, b) {
                        sim.release(x.as_str(), y.as_str());
                    }
                }
                FaultKind::Latency { a, b, .. } => {
                    self.set_latency(sim, a, b, LINK_MIN_LATENCY, LINK_MAX_LATENCY);
                    latency_healed = true;
                }
                // Corrected: back by as much as it jumped.
                FaultKind::ClockStep { host, by_ms } => self.clocks.step(host, -by_ms),
                kind => {
                    for host in Self::hosts(kind, config) {
                        sim.bounce(host.as_str());
                    }
                }
            }
            if let Some(recovery) = self.recovery(&fault.kind) {
                let owed = now + recovery;
                self.owed_from = Some(self.owed_from.map_or(owed, |o| o.max(owed)));
            }
        }
        if latency_healed {
            // Links that another latency fault still slows keep its latency.
            for (fault, _) in &still {
                if let FaultKind::Latency { a, b, min, max } = &fault.kind {
                    self.set_latency(sim, a, b, *min, *max);
                }
            }
        }
        self.active = still;
    }

    /// `None` when no fault ever happened; otherwise when the idle deadlines are owed again
    /// (now, while a fault is active: deadlines are suspended during faults).
    fn deadlines_from(&self, now: Duration) -> Option<Duration> {
        if self
            .active
            .iter()
            .any(|(fault, _)| !matches!(fault.kind, FaultKind::ClockStep { .. }))
        {
            return Some(now);
        }
        self.owed_from
    }
}
