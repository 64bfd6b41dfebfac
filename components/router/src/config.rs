//! Configuration: command-line arguments (with environment fallbacks) and the validated config
//! the router runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spawner_core::connect_token::{ConnectKeyArgs, DEFAULT_SESSION_TTL_SECONDS, KeyError, KeyRing};

use crate::route::Mode;
use crate::trust::{CidrError, TrustedProxies};

pub use spawner_core::clock::{Clock, SystemClock};

/// Command-line arguments of the router, each with an environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct RouterArgs {
    /// Address the binary binds (`run` itself receives a bound listener).
    #[arg(
        long = "listen",
        env = "SPAWNER_ROUTER_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Namespace the backends live in.
    #[arg(long, env = "SPAWNER_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Host mode: backends are `<name>.<domain>` (a wildcard DNS record points at the router).
    #[arg(long, env = "SPAWNER_ROUTER_DOMAIN", conflicts_with = "path_prefix")]
    pub domain: Option<String>,
    /// Path mode: backends are `/<prefix>/<name>/...` on any host.
    #[arg(long, env = "SPAWNER_ROUTER_PATH_PREFIX")]
    pub path_prefix: Option<String>,
    /// The keys that verify connect tokens (`--connect-key`, the same as the api's); the first
    /// also signs the router's session cookies.
    #[command(flatten)]
    pub connect_keys: ConnectKeyArgs,
    /// Accept connect keys shorter than 16 bytes (only for local development).
    #[arg(long, env = "SPAWNER_ROUTER_ALLOW_WEAK_KEYS")]
    pub allow_weak_keys: bool,
    /// How long a request for a backend that is still starting waits for it to be Ready.
    #[arg(long, env = "SPAWNER_ROUTER_WAIT_READY_SECONDS", default_value_t = 30)]
    pub wait_ready_seconds: u64,
    /// Lifetime of the session cookie set after a connect token was accepted.
    #[arg(long, env = "SPAWNER_ROUTER_SESSION_TTL_SECONDS", default_value_t = DEFAULT_SESSION_TTL_SECONDS)]
    pub session_ttl_seconds: u64,
    /// Browsers reach the router over HTTPS (set when a TLS-terminating load balancer is in
    /// front): cookies get `Secure`, `X-Forwarded-Proto` is `https`.
    #[arg(long, env = "SPAWNER_ROUTER_HTTPS")]
    pub https: bool,
    /// Serve HTTPS with this certificate chain (PEM; e.g. a wildcard `*.<domain>`); implies
    /// `--https`.
    #[arg(long, env = "SPAWNER_ROUTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "SPAWNER_ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A client that has not sent a whole request head by then is disconnected.
    #[arg(
        long,
        env = "SPAWNER_ROUTER_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    pub header_read_timeout_seconds: u64,
    /// Most client connections served at once; further ones wait in the accept queue.
    #[arg(long, env = "SPAWNER_ROUTER_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For/Proto/Host` are believed (kept, the peer appended to
    /// `X-Forwarded-For`): the load balancers in front, as address ranges (`10.0.0.0/8`,
    /// `2001:db8::/32`, `192.0.2.7`). Anyone else's copies are replaced.
    #[arg(
        long = "trusted-proxy",
        env = "SPAWNER_ROUTER_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Recording of WebSocket connections, messages and disconnects as a session trace
    /// (docs/traces.md); the caller starts the recorder and puts it in [`RouterConfig::trace`].
    #[command(flatten)]
    pub trace: spawner_trace_recorder::TraceRecordArgs,
}

impl RouterArgs {
    /// The validated configuration, with the system clock.
    pub fn config(&self) -> Result<RouterConfig, ConfigError> {
        let mode = match (&self.domain, &self.path_prefix) {
            (Some(domain), None) => Mode::Host {
                domain: domain.trim_matches('.').to_ascii_lowercase(),
            },
            (None, Some(prefix)) => Mode::Path {
                prefix: prefix.trim_matches('/').to_string(),
            },
            _ => return Err(ConfigError::Mode),
        };
        let keys = self.connect_keys.key_ring(self.allow_weak_keys)?;
        let mut config = RouterConfig::new(&self.namespace, mode, keys);
        config.wait_ready = Duration::from_secs(self.wait_ready_seconds);
        config.session_ttl = Duration::from_secs(self.session_ttl_seconds);
        config.https = self.https;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let read = |path: &PathBuf| {
                std::fs::read(path)
                    .map_err(|e| ConfigError::Tls(format!("{}: {e}", path.display())))
            };
            config.tls = Some(tls_config(&read(cert)?, &read(key)?)?);
            config.https = true;
        }
        config.header_read_timeout = Duration::from_secs(self.header_read_timeout_seconds);
        config.max_connections = self.max_connections;
        config.trusted_proxies =
            TrustedProxies::parse(self.trusted_proxies.iter().map(String::as_str))?;
        config.check()?;
        Ok(config)
    }
}

/// Everything the router runs with.
#[derive(Clone)]
pub struct RouterConfig {
    pub namespace: String,
    pub mode: Mode,
    pub keys: KeyRing,
    /// How long a request waits for a starting backend.
    pub wait_ready: Duration,
    pub session_ttl: Duration,
    /// Browsers reach the router over HTTPS (cookies `Secure`, `X-Forwarded-Proto: https`).
    pub https: bool,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// Peers whose forwarding headers are kept ([`crate::trust`]).
    pub trusted_proxies: TrustedProxies,
    /// Serve HTTPS with this configuration ([`tls_config`]).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Wall-clock time, for token expiry; injected so tests control it.
    pub clock: Arc<dyn Clock>,
    /// Where WebSocket connections, their messages and disconnects are recorded, if anywhere.
    pub trace: Option<spawner_trace_recorder::TraceRecorder>,
}

impl std::fmt::Debug for RouterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterConfig")
            .field("namespace", &self.namespace)
            .field("mode", &self.mode)
            .field("keys", &self.keys)
            .field("wait_ready", &self.wait_ready)
            .field("session_ttl", &self.session_ttl)
            .field("https", &self.https)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_connections", &self.max_connections)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("tls", &self.tls.is_some())
            .field("trace", &self.trace.is_some())
            .finish_non_exhaustive()
    }
}

impl RouterConfig {
    /// Defaults: wait 30 s for Ready, 12 h sessions, plain HTTP, the system clock.
    pub fn new(namespace: &str, mode: Mode, keys: KeyRing) -> Self {
        Self {
            namespace: namespace.to_string(),
            mode,
            keys,
            wait_ready: Duration::from_secs(30),
            session_ttl: Duration::from_secs(DEFAULT_SESSION_TTL_SECONDS),
            https: false,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            max_header_bytes: 64 * 1024,
            trusted_proxies: TrustedProxies::default(),
            tls: None,
            clock: Arc::new(SystemClock),
            trace: None,
        }
    }

    /// Refuses configurations that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.namespace.is_empty() {
            return Err(ConfigError::Namespace);
        }
        match &self.mode {
            Mode::Host { domain } => {
                if crate::route::host_name(domain).ok().as_deref() != Some(domain.as_str()) {
                    return Err(ConfigError::Domain(domain.clone()));
                }
            }
            Mode::Path { prefix } => {
                let ok = !prefix.is_empty()
                    && prefix.split('/').all(|s| {
                        !s.is_empty()
                            && s != "."
                            && s != ".."
                            && s.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
                            })
                    });
                if !ok {
                    return Err(ConfigError::PathPrefix(prefix.clone()));
                }
            }
        }
        if self.keys.is_empty() {
            return Err(ConfigError::Keys(KeyError::NoKeys));
        }
        if self.session_ttl.is_zero()
            || self.header_read_timeout.is_zero()
            || self.max_connections == 0
            || self.max_header_bytes == 0
        {
            return Err(ConfigError::Zero);
        }
        Ok(())
    }
}

/// A TLS server configuration from a PEM certificate chain and its PEM private key (HTTP/1.1
/// only, as the router serves).
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::Tls("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ConfigError::Tls(format!("private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("give exactly one of --domain (host mode) and --path-prefix (path mode)")]
    Mode,
    #[error("the namespace must not be empty")]
    Namespace,
    #[error("domain {0:?} is not a lower-case DNS name")]
    Domain(String),
    #[error(
        "path prefix {0:?} must be one or more path segments of letters, digits, '-', '_', '.'"
    )]
    PathPrefix(String),
    #[error("connect keys: {0}")]
    Keys(#[from] KeyError),
    #[error("trusted proxies: {0}")]
    TrustedProxy(#[from] CidrError),
    #[error(
        "session lifetime, header read timeout, connection cap and header size must be positive"
    )]
    Zero,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        router: RouterArgs,
    }

    fn parse(args: &[&str]) -> Result<RouterConfig, ConfigError> {
        let mut all = vec!["router"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").router.config()
    }

    #[test]
    fn arguments_become_a_checked_config() {
        let config = parse(&[
            "--domain",
            ".Rooms.Example.com.",
            "--connect-key",
            "k1:0123456789abcdef",
        ])
        .expect("valid");
        assert_eq!(
            config.mode,
            Mode::Host {
                domain: "rooms.example.com".into()
            }
        );
        assert!(!config.https);
        assert!(!format!("{config:?}").contains("0123"));
        let config = parse(&[
            "--path-prefix",
            "/b/",
            "--connect-key",
            "k:x",
            "--allow-weak-keys",
            "--https",
        ])
        .expect("valid");
        assert_eq!(config.mode, Mode::Path { prefix: "b".into() });
        assert!(config.https);
        assert!(config.trusted_proxies.is_empty());
        let config = parse(&[
            "--path-prefix",
            "b",
            "--connect-key",
            "k1:0123456789abcdef",
            "--trusted-proxy",
            "10.0.0.0/8,192.0.2.7",
        ])
        .expect("valid");
        assert!(
            config
                .trusted_proxies
                .trusts("10.9.8.7".parse().expect("ip"))
        );
        assert!(matches!(
            parse(&[
                "--path-prefix",
                "b",
                "--connect-key",
                "k1:0123456789abcdef",
                "--trusted-proxy",
                "10.0.0.0/99",
            ]),
            Err(ConfigError::TrustedProxy(_))
        ));
    }

    #[test]
    fn unusable_configurations_are_refused() {
        let key = ["--connect-key", "k1:0123456789abcdef"];
        assert!(matches!(parse(&key), Err(ConfigError::Mode)));
        assert!(matches!(
            parse(&["--domain", "x.com"]),
            Err(ConfigError::Keys(KeyError::NoKeys))
        ));
        assert!(matches!(
            parse(&["--domain", "x.com", "--connect-key", "k:short"]),
            Err(ConfigError::Keys(KeyError::ShortSecret(_)))
        ));
        assert!(matches!(
            parse(&[
                "--domain",
                "x.com",
                "--connect-key",
                "k:",
                "--allow-weak-keys"
            ]),
            Err(ConfigError::Keys(KeyError::EmptySecret(_)))
        ));
        for domain in ["a..b", "a b", "x.com:80"] {
            let mut args = vec!["--domain", domain];
            args.extend_from_slice(&key);
            assert!(
                matches!(parse(&args), Err(ConfigError::Domain(_))),
                "{domain}"
            );
        }
        for prefix in ["/", "a/../b", "a b", "a//b"] {
            let mut args = vec!["--path-prefix", prefix];
            args.extend_from_slice(&key);
            assert!(
                matches!(parse(&args), Err(ConfigError::PathPrefix(_))),
                "{prefix}"
            );
        }
    }
}
