//! Applies a fault schedule to the turmoil simulation as simulated time passes, and says when
//! the deadlines the faults suspended are owed again.

use std::time::Duration;

use spawner_localcluster::{Cluster, Throttle};

use crate::clock::HostClocks;
use crate::faults::{Fault, FaultKind, host_matches};
use crate::leadership::lease_holder;
use crate::net::KUBE_READ_TIMEOUT;
use crate::world::{
    EVENTS_SECRET, LEASE_NAME, LINK_MAX_LATENCY, LINK_MIN_LATENCY, WorldConfig, node_name,
    slot_name,
};

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

/// The `Retry-After` of a throttled API server's answers (what a real one sends).
pub(crate) const THROTTLE_RETRY_AFTER_SECONDS: u32 = 1;

/// Applies a fault schedule as simulated time passes.
pub(crate) struct FaultRunner {
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
    pub(crate) fn new(
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
            other @ (FaultKind::CrashNode { .. }
            | FaultKind::Compact
            | FaultKind::Throttle { .. }
            | FaultKind::EvictNode { .. }) => other,
        }
    }

    /// How long after `fault` heals sweeps may still be late, or `None` when it does not
    /// suspend them: a slow link delays what is in flight by its longest latency; a clock step
    /// suspends nothing, because the sweeper counts idle time on monotonic time.
    fn recovery(&self, fault: &FaultKind) -> Option<Duration> {
        match fault {
            // A client relists at once after 410 Expired: nothing is suspended. Evicted
            // backends fail, and failed backends owe no sweep.
            FaultKind::ClockStep { .. } | FaultKind::Compact | FaultKind::EvictNode { .. } => None,
            FaultKind::Latency { max, .. } => Some(*max),
            // A request refused throughout waits out its client's exponential backoff, whose
            // last wait is about as long as all the earlier ones: a fault up to 15 s long
            // leaves waits up to about as long, within the stall recovery.
            FaultKind::Throttle { .. } => Some(self.stall_recovery),
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
            | FaultKind::ClockStep { .. }
            | FaultKind::Compact
            | FaultKind::Throttle { .. }
            | FaultKind::EvictNode { .. } => Vec::new(),
        }
    }

    pub(crate) fn apply(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now: Duration,
        config: &WorldConfig,
    ) {
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
                FaultKind::Compact => self.cluster.compact(),
                FaultKind::EvictNode { node } => {
                    self.cluster.evict_pods_on(&node_name(*node));
                }
                FaultKind::Throttle { per_mille } => self.cluster.throttle(Throttle {
                    per_mille: *per_mille,
                    retry_after_seconds: THROTTLE_RETRY_AFTER_SECONDS,
                }),
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
                FaultKind::Compact | FaultKind::EvictNode { .. } => {}
                FaultKind::Throttle { .. } => self.cluster.stop_throttling(),
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
    pub(crate) fn deadlines_from(&self, now: Duration) -> Option<Duration> {
        if self
            .active
            .iter()
            .any(|(fault, _)| self.recovery(&fault.kind).is_some())
        {
            return Some(now);
        }
        self.owed_from
    }
}
