//! The world builder and its run loop: the production api, controller(s), node agents and
//! sweepers, and every backend's sidecar, talking to localcluster's API server over turmoil,
//! while simulated users replay a trace and the invariant checker watches every step.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use spawner_core::Phase;
use spawner_core::trace::Trace;

use crate::clock::{HostClocks, sim_epoch};
use crate::fault_runner::FaultRunner;
use crate::faults::Fault;
use crate::invariants::Violation;
use crate::observer::Observer;
use crate::user_checks::UserChecks;
use crate::users::{SharedReport, UsersReport};

pub(crate) const API_TOKEN: &str = "sim-api-token";
/// The key secret the api replicas share.
pub(crate) const KEY_SECRET: &str = "sim-key-secret";
pub const EVENTS_SECRET: &str = "sim-events-secret";
pub(crate) const NAMESPACE: &str = "default";
/// Latency of every link while no fault slows it: turmoil draws each message's delay between
/// these.
pub const LINK_MIN_LATENCY: Duration = Duration::from_micros(200);
pub const LINK_MAX_LATENCY: Duration = Duration::from_millis(5);
/// turmoil's accept queue and receive buffer, in segments (its default is 64).
const TCP_CAPACITY: usize = 4096;

/// The invariant the controllers' writes are held to when there are several replicas.
pub const ONLY_THE_LEADER_WRITES: &str = "only the controller holding the lease writes";
/// The controllers' Lease (the controller's default `--lease-name`).
pub(crate) const LEASE_NAME: &str = "spawner-controller";

/// The invariant a world's [`WorldConfig::allowed_user_failures`] holds it to.
pub const USERS_CONNECT: &str = "users connect to their backends";

pub use crate::user_checks::{
    NOT_LOST_WHILE_BACKEND_LIVES, ROUTED_BY_TOKEN, TERMINATED_ON_REQUEST,
};

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
    /// One user session in this many terminates its backend when it leaves (0: none).
    pub users_terminate_every: u64,
    /// The backends of one key (room) in this many run an app that crashes
    /// `apps_crash_after` after it started (0: none).
    pub apps_crash_every: u64,
    pub apps_crash_after: Duration,
    /// Router replicas (`router-0` ...; at least one): users reach backends only through
    /// them, each session through one, failing over to the next, as behind a load balancer.
    pub routers: usize,
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
            routers: 2,
            users_terminate_every: 0,
            apps_crash_every: 0,
            apps_crash_after: Duration::from_secs(15),
            user_hosts: 2,
            grace_seconds: 10,
            max_lifetime_seconds: None,
            workload,
            faults: Vec::new(),
            drain: Duration::from_secs(60),
            retention: Duration::from_secs(5),
            tick: Duration::from_millis(20),
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
    /// Requests the API server answered 429 (throttling faults), and the most one identity got
    /// within a second.
    pub throttled: u64,
    pub throttled_peak: u64,
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
            "seed {}: {} sessions, {} connections ({} failed, {} gave up waiting for Ready, {} retried), {} messages echoed, {} connections lost, {} tokens tried on another backend; {} backends ({} ready, {} swept, {} failed, {} terminated); {:.0}s simulated in {:.1}s wall; trace hash {:016x}",
            self.seed,
            self.users.sessions,
            self.users.connected,
            self.users.connect_failures,
            self.users.ready_timeouts,
            self.users.retries,
            self.users.messages_echoed,
            self.users.connections_lost,
            self.users.foreign_token_tries,
            self.backends,
            self.ready,
            self.swept,
            self.failed,
            self.terminated,
            self.sim_time.as_secs_f64(),
            self.wall_time.as_secs_f64(),
            self.trace_hash
        )?;
        if self.throttled > 0 {
            write!(
                f,
                "; {} requests answered 429 (at most {} to one identity within a second)",
                self.throttled, self.throttled_peak
            )?;
        }
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

pub(crate) fn node_name(i: usize) -> String {
    format!("node-{i}")
}

pub(crate) fn slot_name(node: usize, slot: usize) -> String {
    format!("node-{node}-pod-{slot}")
}

/// Every host of the world `config` builds, by name.
pub fn host_names(config: &WorldConfig) -> Vec<String> {
    let mut hosts = vec!["apiserver".to_string()];
    hosts.extend((0..config.apis.max(1)).map(api_name));
    hosts.extend((0..config.controllers).map(|i| format!("controller-{i}")));
    hosts.extend((0..config.routers.max(1)).map(crate::router_hosts::router_name));
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

    // Hosts are added in a fixed order: turmoil gives them addresses in that order.
    let clocks = HostClocks::default();
    let cluster = crate::hosts::add_apiserver(&mut sim, &clocks, config.audit.clone());
    let kube_url: http::Uri = "http://apiserver:6443".parse().expect("static uri");
    let writes = crate::hosts::add_controllers(&mut sim, &config, &kube_url, &clocks);
    crate::hosts::add_apis(&mut sim, &config, &kube_url, &clocks);
    crate::router_hosts::add_routers(
        &mut sim,
        config.routers.max(1),
        &kube_url,
        &clocks,
        config.mutant,
    );
    let sidecars = crate::hosts::add_nodes(&mut sim, &config, &kube_url, &clocks);
    let report = crate::hosts::add_users(&mut sim, &config, horizon);

    let mut world = Running {
        observer: Observer::new(cluster.clone(), sidecars, clocks.clone(), &config, writes),
        faults: FaultRunner::new(config.faults.clone(), host_names(&config), clocks, cluster),
        user_checks: UserChecks::default(),
        report,
        config,
    };
    world.step_to_end(&mut sim)?;
    world.finish(sim.elapsed(), wall)
}

/// A built world being stepped.
struct Running {
    config: WorldConfig,
    observer: Observer,
    faults: FaultRunner,
    user_checks: UserChecks,
    report: SharedReport,
}

impl Running {
    /// The run's failure: `violation`, with what reproduces it.
    fn fail(&self, violation: Violation) -> Box<Failure> {
        Box::new(Failure {
            seed: self.config.seed,
            violation,
            faults: self.config.faults.clone(),
            last_events: self.observer.last_events(),
            reproduce: self.config.reproduce.clone(),
            events: self.observer.events.clone(),
        })
    }

    /// Steps the simulation until every client is done, applying faults and checking every
    /// invariant after every step.
    fn step_to_end(&mut self, sim: &mut turmoil::Sim<'_>) -> Result<(), Box<Failure>> {
        loop {
            let done = sim.step().map_err(|e| {
                self.fail(Violation {
                    at: sim.elapsed(),
                    invariant: "the simulation runs",
                    detail: e.to_string(),
                })
            })?;
            let now = sim.elapsed();
            // What the controllers' clocks read during the step, before a fault steps one.
            self.observer.note_clocks(now);
            self.faults.apply(sim, now, &self.config);
            let deadlines_from = self.faults.deadlines_from(now);
            let observer = &mut self.observer;
            let checked = observer.observe(now, deadlines_from).and_then(|()| {
                self.user_checks
                    .check(&self.report, now, deadlines_from, |name| {
                        (observer.phase_of(name), observer.first_seen(name))
                    })
            });
            checked.map_err(|violation| self.fail(violation))?;
            if done {
                return Ok(());
            }
        }
    }

    /// The end-of-run checks (nothing left behind, users connected) and the summary.
    fn finish(self, now: Duration, wall: Instant) -> Result<Summary, Box<Failure>> {
        let (leftovers, retained) = self.observer.leftovers(now);
        self.observer
            .checker
            .check_drained(now, &leftovers)
            .map_err(|violation| self.fail(violation))?;
        let users = self.report.snapshot();
        if let Some(allowed) = self.config.allowed_user_failures
            && users.connect_failures > allowed
        {
            return Err(self.fail(Violation {
                at: now,
                invariant: USERS_CONNECT,
                detail: format!(
                    "{} of {} connections failed ({} gave up waiting for Ready, {} retried); at most {allowed} may",
                    users.connect_failures,
                    users.connect_failures + users.connected,
                    users.ready_timeouts,
                    users.retries,
                ),
            }));
        }
        let checker = &self.observer.checker;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.observer.events.hash(&mut hasher);
        Ok(Summary {
            seed: self.config.seed,
            users,
            backends: checker.backends(),
            ready: checker.reached(Phase::Ready),
            swept: checker.reached(Phase::Swept),
            failed: checker.reached(Phase::Failed),
            terminated: checker.reached(Phase::Terminated),
            retained,
            throttled: self.observer.throttled(),
            throttled_peak: self.observer.throttles.peak,
            sim_time: now,
            wall_time: wall.elapsed(),
            trace_hash: hasher.finish(),
            events: self.observer.events,
        })
    }
}
