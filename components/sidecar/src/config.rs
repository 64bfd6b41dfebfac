//! The sidecar's configuration: [`SidecarConfig`] (what [`crate::run`] takes) and
//! [`SidecarArgs`] (flags and environment variables of `spawner sidecar`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use spawner_core::children::{
    DEFAULT_SIDECAR_PORT, EVENTS_TOKEN_ENV, SIDECAR_SERVE_PORT_ENV, SIDECAR_UPSTREAM_PORT_ENV,
};

use crate::SidecarError;

/// Everything the sidecar needs besides its sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Address of the application, `host:port`, handed to the connector.
    pub upstream: String,
    /// The token the control paths (`/_spawner/events`, the seal) require (`x-spawner-token`
    /// or `Authorization: Bearer`): the token itself, or `sha256:` and its digest
    /// (`spawner_core::token::token_check`, what the controller puts in the pod spec).
    pub events_token: Option<String>,
    /// Without a token, the control paths are closed unless this is set (development only).
    pub allow_unauthenticated_control: bool,
    /// How often a quiet WebSocket client is pinged.
    pub ws_ping_interval: Duration,
    /// Consecutive unanswered pings after which a WebSocket client is dropped. A client that
    /// vanished is dropped within `ws_ping_interval × (ws_max_missed_pongs + 2)` of its last byte
    /// (the period it was seen in, a quiet period before the first ping, then the missed ones).
    pub ws_max_missed_pongs: u32,
    /// After one side of a WebSocket closed its connection, how long the other side gets to
    /// close too before the sidecar closes it.
    pub ws_close_linger: Duration,
    /// Period of the event stream's heartbeat.
    pub heartbeat_interval: Duration,
    /// First and longest pause between readiness probes while the application does not accept.
    /// The first is short because a loopback connect costs microseconds and most apps bind
    /// within milliseconds of starting: every millisecond here is spawn-to-ready latency.
    pub probe_backoff_min: Duration,
    pub probe_backoff_max: Duration,
    /// A readiness probe that has not connected by then counts as failed.
    pub probe_timeout: Duration,
    /// While ready, the application is probed this often (failed requests also trigger a probe).
    pub ready_check_interval: Duration,
    /// After shutdown is requested, live connections get this long to finish.
    pub drain_timeout: Duration,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields accepted in a request.
    pub max_headers: usize,
    /// Largest request body forwarded, if limited; larger gets 413.
    pub max_request_body_bytes: Option<u64>,
    /// A client must send a complete request head within this time (also closes idle
    /// keep-alive connections).
    pub header_read_timeout: Duration,
    /// State changes are published at most this often (a busy proxy changes state constantly).
    pub publish_coalesce: Duration,
}

impl SidecarConfig {
    /// Defaults, proxying to `upstream` (`host:port`).
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            events_token: None,
            allow_unauthenticated_control: false,
            ws_ping_interval: Duration::from_secs(15),
            ws_max_missed_pongs: 2,
            ws_close_linger: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(5),
            probe_backoff_min: Duration::from_millis(2),
            probe_backoff_max: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            ready_check_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(25),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_request_body_bytes: None,
            header_read_timeout: Duration::from_secs(30),
            publish_coalesce: Duration::from_millis(10),
        }
    }

    /// Defaults, proxying to the application on `127.0.0.1:port`.
    pub fn for_port(port: u16) -> Self {
        Self::new(format!("127.0.0.1:{port}"))
    }

    pub(crate) fn validate(&self) -> Result<(), SidecarError> {
        let nonzero = [
            ("ws_ping_interval", self.ws_ping_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("probe_backoff_min", self.probe_backoff_min),
            ("probe_timeout", self.probe_timeout),
            ("ready_check_interval", self.ready_check_interval),
            ("header_read_timeout", self.header_read_timeout),
        ];
        for (name, value) in nonzero {
            if value.is_zero() {
                return Err(SidecarError::InvalidConfig(format!(
                    "{name} must not be zero"
                )));
            }
        }
        if self.probe_backoff_max < self.probe_backoff_min {
            return Err(SidecarError::InvalidConfig(
                "probe_backoff_max must be at least probe_backoff_min".into(),
            ));
        }
        if self.ws_max_missed_pongs == 0 {
            return Err(SidecarError::InvalidConfig(
                "ws_max_missed_pongs must be at least 1".into(),
            ));
        }
        if self.upstream.is_empty() {
            return Err(SidecarError::InvalidConfig(
                "upstream must not be empty".into(),
            ));
        }
        Ok(())
    }
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self::for_port(8080)
    }
}

/// Command-line and environment configuration of `spawner sidecar`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct SidecarArgs {
    /// Port the sidecar serves on.
    #[arg(long, env = SIDECAR_SERVE_PORT_ENV, default_value_t = DEFAULT_SIDECAR_PORT)]
    pub serve_port: u16,
    /// Address the sidecar binds.
    #[arg(long, env = "SPAWNER_SERVE_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub serve_address: IpAddr,
    /// Port the application listens on.
    #[arg(long, env = SIDECAR_UPSTREAM_PORT_ENV, default_value_t = 8080)]
    pub upstream_port: u16,
    /// Host of the application.
    #[arg(long, env = "SPAWNER_UPSTREAM_HOST", default_value = "127.0.0.1")]
    pub upstream_host: String,
    /// Token required on the control paths (`/_spawner/events`, the seal): the token, or
    /// `sha256:` and its hex digest. Unset, they are closed.
    #[arg(long, env = EVENTS_TOKEN_ENV, hide_env_values = true)]
    pub events_token: Option<String>,
    /// Leave the control paths open when no token is set (local development only).
    #[arg(long, env = "SPAWNER_SIDECAR_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated_control: bool,
    /// Seconds between pings to a quiet WebSocket client.
    #[arg(long, env = "SPAWNER_WS_PING_SECONDS", default_value_t = 15)]
    pub ws_ping_seconds: u64,
    /// Unanswered pings after which a WebSocket client is dropped.
    #[arg(long, env = "SPAWNER_WS_MAX_MISSED_PONGS", default_value_t = 2)]
    pub ws_max_missed_pongs: u32,
    /// Seconds between heartbeats on the event stream.
    #[arg(long, env = "SPAWNER_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
    /// Seconds live connections get to finish after SIGTERM.
    #[arg(long, env = "SPAWNER_DRAIN_SECONDS", default_value_t = 25)]
    pub drain_seconds: u64,
    /// Largest request head in bytes.
    #[arg(long, env = "SPAWNER_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Largest request body in bytes (unlimited when unset).
    #[arg(long, env = "SPAWNER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Single-threaded runtimes serving connections (default: one per available core).
    #[arg(long, env = "SPAWNER_SIDECAR_THREADS")]
    pub threads: Option<usize>,
}

impl SidecarArgs {
    /// Where the sidecar listens.
    pub fn serve_addr(&self) -> SocketAddr {
        SocketAddr::new(self.serve_address, self.serve_port)
    }

    /// How many runtimes serve connections: `threads`, else the cores this process may use
    /// (its CPU affinity and cgroup quota), at least one.
    pub fn runtime_count(&self) -> usize {
        self.threads
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1)
            .max(1)
    }

    pub fn to_config(&self) -> SidecarConfig {
        let host = if self.upstream_host.contains(':') && !self.upstream_host.starts_with('[') {
            format!("[{}]", self.upstream_host)
        } else {
            self.upstream_host.clone()
        };
        SidecarConfig {
            events_token: self.events_token.clone().filter(|t| !t.is_empty()),
            allow_unauthenticated_control: self.allow_unauthenticated_control,
            ws_ping_interval: Duration::from_secs(self.ws_ping_seconds),
            ws_max_missed_pongs: self.ws_max_missed_pongs,
            heartbeat_interval: Duration::from_secs(self.heartbeat_seconds),
            drain_timeout: Duration::from_secs(self.drain_seconds),
            max_header_bytes: self.max_header_bytes,
            max_request_body_bytes: self.max_body_bytes,
            ..SidecarConfig::new(format!("{host}:{}", self.upstream_port))
        }
    }
}

impl From<&SidecarArgs> for SidecarConfig {
    fn from(args: &SidecarArgs) -> Self {
        args.to_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SidecarArgs,
    }

    #[test]
    fn args_have_the_documented_defaults_and_flags() {
        let cli = Cli::try_parse_from(["sidecar"]).expect("parse");
        assert_eq!(cli.args.serve_port, 9090);
        assert_eq!(cli.args.upstream_port, 8080);
        let config = cli.args.to_config();
        assert_eq!(config.upstream, "127.0.0.1:8080");
        assert_eq!(config.events_token, None);
        assert!(config.validate().is_ok());

        let cli = Cli::try_parse_from([
            "sidecar",
            "--serve-port",
            "7000",
            "--upstream-port",
            "3000",
            "--upstream-host",
            "::1",
            "--events-token",
            "s3cret",
        ])
        .expect("parse");
        assert_eq!(cli.args.serve_addr().port(), 7000);
        let config = cli.args.to_config();
        assert_eq!(config.upstream, "[::1]:3000");
        assert_eq!(config.events_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let config = SidecarConfig {
            ws_max_missed_pongs: 0,
            ..SidecarConfig::default()
        };
        assert!(config.validate().is_err());
        let config = SidecarConfig {
            probe_backoff_max: Duration::from_millis(1),
            ..SidecarConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
