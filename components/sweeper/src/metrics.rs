//! The sweeper's Prometheus metrics, in atomics, rendered as exposition text on scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Backends with a subscription task (connected or reconnecting).
    pub subscriptions: AtomicI64,
    /// Event streams currently open.
    pub connected: AtomicI64,
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub stream_errors: AtomicU64,
    pub read_timeouts: AtomicU64,
    pub messages: AtomicU64,
    pub marked_ready: AtomicU64,
    pub swept: AtomicU64,
    pub write_errors: AtomicU64,
}

impl Metrics {
    pub fn render(&self, node: &str) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: i128| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{node=\"{node}\"}} {value}");
        };
        let g = |v: &AtomicI64| i128::from(v.load(Ordering::Relaxed));
        let c = |v: &AtomicU64| i128::from(v.load(Ordering::Relaxed));
        one(
            "spawner_sweeper_subscriptions",
            "gauge",
            "Backends this sweeper follows.",
            g(&self.subscriptions),
        );
        one(
            "spawner_sweeper_streams_connected",
            "gauge",
            "Sidecar event streams open now.",
            g(&self.connected),
        );
        one(
            "spawner_sweeper_connects_total",
            "counter",
            "Event stream connections opened.",
            c(&self.connects),
        );
        one(
            "spawner_sweeper_connect_errors_total",
            "counter",
            "Event stream connections that failed or were refused.",
            c(&self.connect_errors),
        );
        one(
            "spawner_sweeper_stream_errors_total",
            "counter",
            "Event streams that ended or broke.",
            c(&self.stream_errors),
        );
        one(
            "spawner_sweeper_read_timeouts_total",
            "counter",
            "Event streams dropped for staying silent past the read timeout.",
            c(&self.read_timeouts),
        );
        one(
            "spawner_sweeper_messages_total",
            "counter",
            "Sidecar events received.",
            c(&self.messages),
        );
        one(
            "spawner_sweeper_marked_ready_total",
            "counter",
            "Backends marked Ready.",
            c(&self.marked_ready),
        );
        one(
            "spawner_sweeper_swept_total",
            "counter",
            "Backends marked Swept.",
            c(&self.swept),
        );
        one(
            "spawner_sweeper_status_write_errors_total",
            "counter",
            "Status writes that failed.",
            c(&self.write_errors),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_the_node() {
        let m = Metrics::default();
        m.swept.fetch_add(2, Ordering::Relaxed);
        m.subscriptions.fetch_add(5, Ordering::Relaxed);
        let text = m.render("node-a");
        assert!(text.contains("spawner_sweeper_swept_total{node=\"node-a\"} 2\n"));
        assert!(text.contains("spawner_sweeper_subscriptions{node=\"node-a\"} 5\n"));
        assert!(text.contains("# TYPE spawner_sweeper_read_timeouts_total counter\n"));
    }
}
