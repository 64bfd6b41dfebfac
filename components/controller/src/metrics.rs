//! The controller's Prometheus metrics, rendered in the text exposition format.
//!
//! A handful of counters and two histograms do not justify a metrics framework: this module
//! keeps them in atomics and renders them on scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use spawner_core::phase::Phase;

/// A cumulative histogram with fixed bucket bounds (in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds, so it fits an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub reconcile_duration: Histogram,
    pub spawn_to_ready: Histogram,
    pub transitions: Mutex<BTreeMap<Phase, u64>>,
    pub is_leader: AtomicBool,
    pub leader_transitions: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            reconcile_duration: Histogram::new(&[
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            spawn_to_ready: Histogram::new(&[
                0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            transitions: Mutex::new(BTreeMap::new()),
            is_leader: AtomicBool::new(false),
            leader_transitions: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn count_transition(&self, to: Phase) {
        if let Ok(mut map) = self.transitions.lock() {
            *map.entry(to).or_default() += 1;
        }
    }

    /// The exposition text, with `backends` the current number of backends in each phase (as
    /// the controller's cache sees them; empty on a replica that is not the leader).
    pub fn render(&self, backends: &BTreeMap<Phase, u64>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP spawner_backends Session-lived backends by phase, as the controller's cache sees them."
        );
        let _ = writeln!(out, "# TYPE spawner_backends gauge");
        for phase in Phase::ALL {
            let n = backends.get(&phase).copied().unwrap_or(0);
            let _ = writeln!(out, "spawner_backends{{phase=\"{phase}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "spawner_controller_reconciles_total",
            "Reconciliations run.",
            &self.reconciles,
        );
        counter(
            &mut out,
            "spawner_controller_reconcile_errors_total",
            "Reconciliations that ended in an error.",
            &self.reconcile_errors,
        );
        self.reconcile_duration.render(
            &mut out,
            "spawner_controller_reconcile_duration_seconds",
            "Time one reconciliation took.",
        );
        self.spawn_to_ready.render(
            &mut out,
            "spawner_spawn_to_ready_seconds",
            "Time from a backend's creation to its Ready condition.",
        );
        let _ = writeln!(
            out,
            "# HELP spawner_controller_transitions_total Phase transitions written by this controller."
        );
        let _ = writeln!(out, "# TYPE spawner_controller_transitions_total counter");
        if let Ok(map) = self.transitions.lock() {
            for (phase, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "spawner_controller_transitions_total{{to=\"{phase}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP spawner_controller_leader Whether this replica holds the leader lease."
        );
        let _ = writeln!(out, "# TYPE spawner_controller_leader gauge");
        let _ = writeln!(
            out,
            "spawner_controller_leader {}",
            u8::from(self.is_leader.load(Ordering::Relaxed))
        );
        counter(
            &mut out,
            "spawner_controller_leadership_changes_total",
            "Times this replica gained or lost the leader lease.",
            &self.leader_transitions,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_millis(1500));
        h.observe(Duration::from_secs(9));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 11\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn render_lists_every_phase_and_counters() {
        let m = Metrics::default();
        m.reconciles.fetch_add(4, Ordering::Relaxed);
        m.count_transition(Phase::Running);
        let backends = BTreeMap::from([(Phase::Ready, 7)]);
        let text = m.render(&backends);
        assert!(text.contains("spawner_backends{phase=\"Ready\"} 7\n"));
        assert!(text.contains("spawner_backends{phase=\"Swept\"} 0\n"));
        assert!(text.contains("spawner_controller_reconciles_total 4\n"));
        assert!(text.contains("spawner_controller_transitions_total{to=\"Running\"} 1\n"));
        assert!(text.contains("spawner_controller_leader 0\n"));
    }
}
