//! The router's metrics, as Prometheus text at `/metrics`: requests and WebSocket upgrades by
//! outcome, routing latency (request head read to upstream dispatch) and live connections.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the backend at once.
    Routed,
    /// Forwarded after waiting for the backend to become Ready.
    Waited,
    /// The connect token was swapped for a cookie (302).
    Redirected,
    /// 401: no valid token.
    Unauthorized,
    /// 404: unknown backend or not our host/path.
    NotFound,
    /// 410: the backend ended.
    Gone,
    /// 400: bad Host header or path.
    BadRequest,
    /// 503: still not Ready when the wait ended.
    NotReady,
    /// 502: the backend's sidecar could not be reached.
    UpstreamError,
}

const OUTCOMES: [Outcome; 9] = [
    Outcome::Routed,
    Outcome::Waited,
    Outcome::Redirected,
    Outcome::Unauthorized,
    Outcome::NotFound,
    Outcome::Gone,
    Outcome::BadRequest,
    Outcome::NotReady,
    Outcome::UpstreamError,
];

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::Waited => "waited",
            Outcome::Redirected => "redirected",
            Outcome::Unauthorized => "unauthorized",
            Outcome::NotFound => "not_found",
            Outcome::Gone => "gone",
            Outcome::BadRequest => "bad_request",
            Outcome::NotReady => "not_ready",
            Outcome::UpstreamError => "upstream_error",
        }
    }

    fn index(self) -> usize {
        OUTCOMES.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Upper bounds of the routing-latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1, 1.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; 9],
    upgrades: [AtomicU64; 9],
    latency_buckets: [AtomicU64; 10],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
    connections: AtomicI64,
    websockets: AtomicI64,
}

impl Metrics {
    pub fn count(&self, upgrade: bool, outcome: Outcome) {
        let counters = if upgrade {
            &self.upgrades
        } else {
            &self.requests
        };
        counters[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time from request head to dispatch of a routed request.
    pub fn routing_latency(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn websocket_opened(&self) {
        self.websockets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn websocket_closed(&self) {
        self.websockets.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests[outcome.index()].load(Ordering::Relaxed)
    }

    pub fn upgrades(&self, outcome: Outcome) -> u64 {
        self.upgrades[outcome.index()].load(Ordering::Relaxed)
    }

    pub fn live_connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition; `backends` is the size of the cache.
    pub fn render(&self, backends: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP spawner_router_requests_total HTTP requests by outcome.\n# TYPE spawner_router_requests_total counter"
        );
        for o in OUTCOMES {
            let _ = writeln!(
                out,
                "spawner_router_requests_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.requests(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP spawner_router_websocket_upgrades_total WebSocket upgrades by outcome.\n# TYPE spawner_router_websocket_upgrades_total counter"
        );
        for o in OUTCOMES {
            let _ = writeln!(
                out,
                "spawner_router_websocket_upgrades_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.upgrades(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP spawner_router_routing_seconds Time from request head to upstream dispatch.\n# TYPE spawner_router_routing_seconds histogram"
        );
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "spawner_router_routing_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "spawner_router_routing_seconds_bucket{{le=\"+Inf\"}} {count}\nspawner_router_routing_seconds_sum {}\nspawner_router_routing_seconds_count {count}",
            self.latency_sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "# HELP spawner_router_connections Live client connections.\n# TYPE spawner_router_connections gauge\nspawner_router_connections {}",
            self.live_connections()
        );
        let _ = writeln!(
            out,
            "# HELP spawner_router_websockets Live relayed WebSockets.\n# TYPE spawner_router_websockets gauge\nspawner_router_websockets {}",
            self.websockets.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP spawner_router_backends Backends in the watch cache.\n# TYPE spawner_router_backends gauge\nspawner_router_backends {backends}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::default();
        m.count(false, Outcome::Routed);
        m.count(false, Outcome::Routed);
        m.count(true, Outcome::Unauthorized);
        m.routing_latency(Duration::from_micros(200));
        m.connection_opened();
        let text = m.render(7);
        assert!(text.contains("spawner_router_requests_total{outcome=\"routed\"} 2\n"));
        assert!(
            text.contains("spawner_router_websocket_upgrades_total{outcome=\"unauthorized\"} 1\n")
        );
        assert!(text.contains("spawner_router_routing_seconds_bucket{le=\"0.0001\"} 0\n"));
        assert!(text.contains("spawner_router_routing_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(text.contains("spawner_router_routing_seconds_count 1\n"));
        assert!(text.contains("spawner_router_connections 1\n"));
        assert!(text.contains("spawner_router_backends 7\n"));
    }
}
