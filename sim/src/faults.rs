//! Fault schedules: crashes and restarts of components, API server or whole nodes, and network
//! partitions between hosts, at chosen simulated times.

use std::time::Duration;

use crate::rng::SimRng;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Crash a host (`apiserver`, `api`, `controller-0`, `node-1` ...) and restart it after
    /// the fault's duration. The API server keeps its state across the restart.
    Crash { host: String },
    /// Crash a whole node — its agent, sweeper and every pod on it — and restart it.
    CrashNode { node: usize },
    /// Drop all traffic between two hosts (silently: no reset), then repair.
    Partition { a: String, b: String },
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
) -> Vec<Fault> {
    let span = end.saturating_sub(start).as_millis().max(1) as u64;
    (0..count)
        .map(|_| {
            let at = start + Duration::from_millis(rng.below(span));
            let duration = Duration::from_millis(1_000 + rng.below(14_000));
            let node = rng.below(nodes.max(1) as u64) as usize;
            let kind = match rng.below(6) {
                0 => FaultKind::Crash {
                    host: format!("controller-{}", rng.below(controllers.max(1) as u64)),
                },
                1 => FaultKind::Crash {
                    host: format!("node-{node}"),
                },
                2 => FaultKind::Crash { host: "api".into() },
                3 => FaultKind::Crash {
                    host: "apiserver".into(),
                },
                4 => FaultKind::Partition {
                    a: format!("node-{node}"),
                    b: format!("node-{node}-pod-{}", rng.below(4)),
                },
                _ => FaultKind::Partition {
                    a: format!("node-{node}"),
                    b: "apiserver".into(),
                },
            };
            Fault { at, duration, kind }
        })
        .collect()
}
