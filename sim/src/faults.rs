//! Fault schedules: crashes and restarts of components, API server or whole nodes, network
//! partitions between hosts, slow and jittery links, clock steps, watch compaction and API
//! server throttling, at chosen simulated times.

use std::time::Duration;

use crate::rng::SimRng;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Crash a host (`apiserver`, `api-0`, `controller-0`, `node-1` ...) and restart it after
    /// the fault's duration. The API server keeps its state across the restart.
    Crash { host: String },
    /// Crash a whole node — its agent, sweeper and every pod on it — and restart it.
    CrashNode { node: usize },
    /// Drop all traffic between two hosts (silently: no reset), then repair.
    Partition { a: String, b: String },
    /// Hold all traffic between two hosts and deliver it, late, when the fault ends: to the
    /// other side, `a` looks paused (a stop-the-world pause, a frozen VM) and then resumes with
    /// what it had sent meanwhile. `leader` names the controller replica holding the lease
    /// when the fault starts.
    Hold { a: String, b: String },
    /// Slow, jittery links between every host matching `a` and every host matching `b` (a
    /// host name, or a prefix ending in `*`: `node-0-pod-*`, `*`): each message takes between
    /// `min` and `max` (turmoil draws the delay from its exponential curve over that range,
    /// per message, so segments overtake each other), then the links return to the world's
    /// latency.
    Latency {
        a: String,
        b: String,
        min: Duration,
        max: Duration,
    },
    /// The wall clock of `host` jumps by `by_ms` milliseconds (negative: back), and is
    /// corrected (jumps back by as much) when the fault ends. Timers and countdowns run on
    /// monotonic time and do not move: only wall-clock readings do.
    ClockStep { host: String, by_ms: i64 },
    /// The API server compacts its watch history when the fault starts (its duration does not
    /// matter): every watch that resumes from an older version gets 410 Expired and must list
    /// again, as after an etcd compaction.
    Compact,
    /// The API server answers `per_mille` of the components' requests `429 Too Many
    /// Requests` with `Retry-After: 1` (a real server's priority and fairness under load)
    /// for the fault's duration.
    Throttle { per_mille: u32 },
    /// Every unfinished pod bound to the node is evicted when the fault starts (its duration
    /// does not matter), as `kubectl drain` evicts them through the Eviction API: deleted with
    /// their grace period, stopped by the node's agent. (Cordoning is not simulated: the node
    /// agent's scheduler does not read its Node's `spec.unschedulable`.)
    EvictNode { node: usize },
}

/// Whether host `name` matches `pattern`: the same name, or a prefix followed by `*`.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub at: Duration,
    pub duration: Duration,
    pub kind: FaultKind,
}

/// A random schedule of `count` faults within `[start, end)`, each lasting 1–15 s.
pub fn random_schedule(
    rng: &mut SimRng,
    count: usize,
    start: Duration,
    end: Duration,
    nodes: usize,
    controllers: usize,
    routers: usize,
) -> Vec<Fault> {
    let span = end.saturating_sub(start).as_millis().max(1) as u64;
    (0..count)
        .map(|_| {
            let at = start + Duration::from_millis(rng.below(span));
            let duration = Duration::from_millis(1_000 + rng.below(14_000));
            let node = rng.below(nodes.max(1) as u64) as usize;
            let router = format!("router-{}", rng.below(routers.max(1) as u64));
            let kind = match rng.below(12) {
                0 => FaultKind::Crash {
                    host: format!("controller-{}", rng.below(controllers.max(1) as u64)),
                },
                1 => FaultKind::Crash {
                    host: format!("node-{node}"),
                },
                2 => FaultKind::Crash {
                    host: "api-0".into(),
                },
                3 => FaultKind::Crash {
                    host: "apiserver".into(),
                },
                4 => FaultKind::Partition {
                    a: format!("node-{node}"),
                    b: format!("node-{node}-pod-{}", rng.below(4)),
                },
                5 => FaultKind::Partition {
                    a: format!("node-{node}"),
                    b: "apiserver".into(),
                },
                6 => FaultKind::Latency {
                    a: format!("node-{node}"),
                    b: format!("node-{node}-pod-*"),
                    min: Duration::from_millis(50 + rng.below(450)),
                    max: Duration::from_millis(500 + rng.below(1_500)),
                },
                7 => FaultKind::ClockStep {
                    host: match rng.below(4) {
                        0 => format!("controller-{}", rng.below(controllers.max(1) as u64)),
                        1 => format!("node-{node}"),
                        2 => "api-0".into(),
                        _ => "apiserver".into(),
                    },
                    // Up to ten minutes either way.
                    by_ms: rng.below(1_200_001) as i64 - 600_000,
                },
                8 => FaultKind::Crash { host: router },
                9 => FaultKind::Partition {
                    a: router,
                    b: if rng.below(2) == 0 {
                        "apiserver".into()
                    } else {
                        format!("node-{node}-pod-*")
                    },
                },
                10 => FaultKind::Hold {
                    a: "leader".into(),
                    b: "apiserver".into(),
                },
                _ => FaultKind::Latency {
                    a: match rng.below(3) {
                        0 => format!("controller-{}", rng.below(controllers.max(1) as u64)),
                        1 => format!("node-{node}"),
                        _ => "api-*".into(),
                    },
                    b: "apiserver".into(),
                    min: Duration::from_millis(50 + rng.below(450)),
                    max: Duration::from_millis(500 + rng.below(1_500)),
                },
            };
            Fault { at, duration, kind }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_names_or_prefixes() {
        assert!(host_matches("api", "api"));
        assert!(!host_matches("api", "apiserver"));
        assert!(host_matches("node-0-pod-*", "node-0-pod-11"));
        assert!(!host_matches("node-0-pod-*", "node-1-pod-0"));
        assert!(host_matches("*", "users-1"));
    }

    #[test]
    fn random_latency_ranges_are_ordered() {
        let mut rng = SimRng::new(7);
        let faults = random_schedule(
            &mut rng,
            200,
            Duration::from_secs(1),
            Duration::from_secs(100),
            2,
            1,
            2,
        );
        let latencies: Vec<_> = faults
            .iter()
            .filter_map(|f| match &f.kind {
                FaultKind::Latency { min, max, .. } => Some((*min, *max)),
                _ => None,
            })
            .collect();
        assert!(latencies.len() > 10, "{}", latencies.len());
        assert!(latencies.iter().all(|(min, max)| min < max));
    }
}
