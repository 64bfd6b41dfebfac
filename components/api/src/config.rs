//! Configuration: command-line arguments (with environment fallbacks) and the validated config
//! the router runs with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spawner_core::connect_token::{ConnectKeyArgs, DEFAULT_CONNECT_TTL_SECONDS, KeyError, KeyRing};
use spawner_core::id::{DEFAULT_PREFIX, MAX_PREFIX_LEN};
use spawner_core::validation::Limits;

use crate::auth::TokenSet;
use crate::naming::{KEY_NAME_SUFFIX_MAX_LEN, UrlTemplate, UrlTemplateError};

/// Longest id prefix: a get-or-create name (prefix, key hash, generation) must fit a DNS label.
pub const MAX_ID_PREFIX_LEN: usize = if MAX_PREFIX_LEN < 63 - KEY_NAME_SUFFIX_MAX_LEN {
    MAX_PREFIX_LEN
} else {
    63 - KEY_NAME_SUFFIX_MAX_LEN
};

/// The source of wall-clock timestamps (terminate-request times): the workspace's one clock
/// contract, injected so that tests and the simulator control it; waiting always uses
/// `tokio::time`.
pub use spawner_core::clock::{Clock, SystemClock};

/// Command-line arguments of the api, each with an environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct ApiArgs {
    /// Address the binary binds (`run` itself receives a bound listener).
    #[arg(
        long = "listen",
        env = "SPAWNER_API_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Namespace the backends live in.
    #[arg(long, env = "SPAWNER_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Bearer tokens accepted on the routes that start, stop or list backends (repeat the flag,
    /// or separate them with commas in the environment variable).
    #[arg(
        long = "token",
        env = "SPAWNER_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<String>,
    /// Serve without any token (only for local development).
    #[arg(long, env = "SPAWNER_API_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Template of the URL handed to clients: `{name}`, `{namespace}` and `{url}` (the backend's
    /// `status.url` once the controller has written it).
    #[arg(long, env = "SPAWNER_URL_TEMPLATE", default_value = "{url}")]
    pub url_template: String,
    /// Public base URL of this api, used in `readyUrl` and `statusUrl` (default: `http://` and
    /// the request's Host header).
    #[arg(long, env = "SPAWNER_PUBLIC_BASE_URL")]
    pub public_base_url: Option<String>,
    /// Prefix of backend names.
    #[arg(long, env = "SPAWNER_ID_PREFIX", default_value = DEFAULT_PREFIX)]
    pub id_prefix: String,
    /// Secret mixed into the names derived from get-or-create keys, so a name cannot be
    /// computed from a guessed key (share it between replicas). Required, and not the
    /// `CHANGE-ME` placeholder, unless `--allow-unauthenticated` (local development).
    #[arg(long, env = "SPAWNER_KEY_SECRET", hide_env_values = true)]
    pub key_secret: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SPAWNER_API_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// Largest `gracePeriodSeconds` accepted.
    #[arg(long, env = "SPAWNER_MAX_GRACE_PERIOD_SECONDS", default_value_t = Limits::default().max_grace_period_seconds)]
    pub max_grace_period_seconds: u32,
    /// Largest `maxLifetimeSeconds` accepted.
    #[arg(long, env = "SPAWNER_MAX_LIFETIME_SECONDS", default_value_t = Limits::default().max_lifetime_seconds)]
    pub max_lifetime_seconds: u32,
    /// Interval of heartbeats on status streams, in seconds.
    #[arg(long, env = "SPAWNER_API_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
    /// A watch that delivers nothing (not even a bookmark) for this long is restarted from a
    /// fresh read, so a silent partition is noticed quickly.
    #[arg(
        long,
        env = "SPAWNER_API_WATCH_IDLE_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    pub watch_idle_timeout_seconds: u64,
    /// Most status streams open at once on this replica; past it a stream request gets 503.
    #[arg(long, env = "SPAWNER_API_MAX_STATUS_STREAMS", default_value_t = 1024)]
    pub max_status_streams: usize,
    /// The keys that sign connect tokens (`--connect-key`, shared with the router).
    #[command(flatten)]
    pub connect_keys: ConnectKeyArgs,
    /// How long a connect token may wait for its first use, in seconds.
    #[arg(
        long,
        env = "SPAWNER_CONNECT_TOKEN_TTL_SECONDS",
        default_value_t = DEFAULT_CONNECT_TTL_SECONDS
    )]
    pub connect_token_ttl_seconds: u64,
    /// Recording of spawns and connects as a session trace (docs/traces.md).
    #[command(flatten)]
    pub trace: spawner_trace_recorder::TraceRecordArgs,
}

impl ApiArgs {
    /// The validated configuration, with the system clock.
    pub fn config(&self) -> Result<ApiConfig, ConfigError> {
        let mut config = ApiConfig::new(&self.namespace);
        config.tokens = TokenSet::new(&self.tokens);
        config.allow_unauthenticated = self.allow_unauthenticated;
        config.url_template = UrlTemplate::parse(&self.url_template)?;
        config.public_base_url = self.public_base_url.clone();
        config.id_prefix = self.id_prefix.clone();
        config.key_secret = self.key_secret.clone().unwrap_or_default().into_bytes();
        config.max_body_bytes = self.max_body_bytes;
        config.limits.max_grace_period_seconds = self.max_grace_period_seconds;
        config.limits.max_lifetime_seconds = self.max_lifetime_seconds;
        config.heartbeat = Duration::from_secs(self.heartbeat_seconds);
        config.watch_idle_timeout = Duration::from_secs(self.watch_idle_timeout_seconds);
        config.max_status_streams = self.max_status_streams;
        if !self.connect_keys.is_empty() {
            // Short secrets only for local development (where the api runs unauthenticated).
            config.connect_keys = Some(self.connect_keys.key_ring(self.allow_unauthenticated)?);
        }
        config.connect_token_ttl = Duration::from_secs(self.connect_token_ttl_seconds);
        config.check()?;
        // Placeholders from deploy/base and an empty key secret are refused outside local
        // development: anyone who read the repository would hold them.
        for token in &self.tokens {
            spawner_core::token::check_secret("api token", token.as_bytes())
                .map_err(ConfigError::WeakSecret)?;
        }
        if !self.allow_unauthenticated {
            spawner_core::token::check_secret("key secret", &config.key_secret)
                .map_err(ConfigError::WeakSecret)?;
        }
        Ok(config)
    }
}

/// Everything the api runs with.
#[derive(Clone)]
pub struct ApiConfig {
    pub namespace: String,
    pub tokens: TokenSet,
    pub allow_unauthenticated: bool,
    pub url_template: UrlTemplate,
    pub public_base_url: Option<String>,
    pub id_prefix: String,
    pub key_secret: Vec<u8>,
    pub max_body_bytes: usize,
    pub limits: Limits,
    pub heartbeat: Duration,
    pub watch_idle_timeout: Duration,
    pub max_status_streams: usize,
    /// Keys of the connect tokens put in `url`; `None`: no tokens.
    pub connect_keys: Option<KeyRing>,
    pub connect_token_ttl: Duration,
    pub clock: Arc<dyn Clock>,
    /// Where spawns and connects are recorded, if anywhere (the caller starts the recorder and
    /// finishes it after `run`).
    pub trace: Option<spawner_trace_recorder::TraceRecorder>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and the key secret stay out of logs.
        f.debug_struct("ApiConfig")
            .field("namespace", &self.namespace)
            .field("tokens", &self.tokens.len())
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("url_template", &self.url_template)
            .field("public_base_url", &self.public_base_url)
            .field("id_prefix", &self.id_prefix)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("limits", &self.limits)
            .field("heartbeat", &self.heartbeat)
            .field("watch_idle_timeout", &self.watch_idle_timeout)
            .field("max_status_streams", &self.max_status_streams)
            .field("connect_keys", &self.connect_keys)
            .field("connect_token_ttl", &self.connect_token_ttl)
            .field("trace", &self.trace.is_some())
            .finish_non_exhaustive()
    }
}

impl ApiConfig {
    /// Defaults for `namespace`: no tokens (so it refuses to run until tokens are added or
    /// `allow_unauthenticated` is set), the `{url}` template and the system clock.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            tokens: TokenSet::default(),
            allow_unauthenticated: false,
            url_template: UrlTemplate::default(),
            public_base_url: None,
            id_prefix: DEFAULT_PREFIX.to_string(),
            key_secret: Vec::new(),
            max_body_bytes: 256 * 1024,
            limits: Limits::default(),
            heartbeat: Duration::from_secs(5),
            watch_idle_timeout: Duration::from_secs(10),
            max_status_streams: 1024,
            connect_keys: None,
            connect_token_ttl: Duration::from_secs(DEFAULT_CONNECT_TTL_SECONDS),
            clock: Arc::new(SystemClock),
            trace: None,
        }
    }

    /// Refuses configurations that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.tokens.is_empty() && !self.allow_unauthenticated {
            return Err(ConfigError::NoTokens);
        }
        if self.namespace.is_empty() {
            return Err(ConfigError::Namespace);
        }
        // Backend names also name Services, which must start with a letter: an empty prefix
        // would give names starting with a digit.
        let prefix_ok = !self.id_prefix.is_empty()
            && self.id_prefix.len() <= MAX_ID_PREFIX_LEN
            && spawner_core::id::new_backend_id(&self.id_prefix).is_ok();
        if !prefix_ok {
            return Err(ConfigError::IdPrefix(self.id_prefix.clone()));
        }
        if let Some(base) = &self.public_base_url
            && !(base.starts_with("http://") || base.starts_with("https://"))
        {
            return Err(ConfigError::PublicBaseUrl(base.clone()));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::BodyLimit);
        }
        if self.heartbeat.is_zero()
            || self.watch_idle_timeout.is_zero()
            || self.connect_token_ttl.is_zero()
        {
            return Err(ConfigError::ZeroInterval);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no api token configured: pass --token / SPAWNER_API_TOKENS, or --allow-unauthenticated for local development"
    )]
    NoTokens,
    #[error("the namespace must not be empty")]
    Namespace,
    #[error(
        "id prefix {0:?} must be 1 to {max} lower-case letters, digits and '-', starting with a letter",
        max = MAX_ID_PREFIX_LEN
    )]
    IdPrefix(String),
    #[error("public base URL {0:?} must start with http:// or https://")]
    PublicBaseUrl(String),
    #[error("the body limit must be at least one byte")]
    BodyLimit,
    #[error("heartbeat, watch idle timeout and connect token lifetime must be positive")]
    ZeroInterval,
    #[error("connect keys: {0}")]
    ConnectKeys(#[from] KeyError),
    #[error(transparent)]
    UrlTemplate(#[from] UrlTemplateError),
    #[error("{0}")]
    WeakSecret(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: ApiArgs,
    }

    #[test]
    fn arguments_become_a_checked_config() {
        let cli = Cli::try_parse_from([
            "api",
            "--token",
            "a",
            "--token",
            "b",
            "--url-template",
            "https://{name}.example.com",
            "--id-prefix",
            "room-",
            "--key-secret",
            "k3y",
        ])
        .expect("parses");
        let config = cli.api.config().expect("valid");
        assert_eq!(config.tokens.len(), 2);
        assert_eq!(config.id_prefix, "room-");
        assert_eq!(
            config.url_template.render("x", "ns", None).as_deref(),
            Some("https://x.example.com")
        );
        assert!(!format!("{config:?}").contains("\"a\""));
    }

    #[test]
    fn unusable_configurations_are_refused() {
        let no_token = Cli::try_parse_from(["api"]).expect("parses");
        assert!(matches!(no_token.api.config(), Err(ConfigError::NoTokens)));
        let open = Cli::try_parse_from(["api", "--allow-unauthenticated"]).expect("parses");
        assert!(open.api.config().is_ok());
        for prefix in ["", "1x-", "Slab-", &format!("a{}", "b".repeat(45))] {
            let mut config = ApiConfig::new("default");
            config.allow_unauthenticated = true;
            config.id_prefix = prefix.to_string();
            assert!(
                matches!(config.check(), Err(ConfigError::IdPrefix(_))),
                "{prefix}"
            );
        }
        for weak in [
            &["api", "--token", "t"][..],
            &["api", "--token", "t", "--key-secret", "CHANGE-ME"],
            &["api", "--token", "CHANGE-ME", "--key-secret", "k3y"],
        ] {
            let cli = Cli::try_parse_from(weak).expect("parses");
            assert!(
                matches!(cli.api.config(), Err(ConfigError::WeakSecret(_))),
                "{weak:?}"
            );
        }
        let bad_template = Cli::try_parse_from(["api", "--token", "t", "--url-template", "{nam}"])
            .expect("parses");
        assert!(matches!(
            bad_template.api.config(),
            Err(ConfigError::UrlTemplate(_))
        ));
        let bad_base = Cli::try_parse_from(["api", "--token", "t", "--public-base-url", "x.com"])
            .expect("parses");
        assert!(matches!(
            bad_base.api.config(),
            Err(ConfigError::PublicBaseUrl(_))
        ));
    }

    #[test]
    fn connect_keys_are_parsed_and_short_ones_refused_outside_development() {
        let cli = Cli::try_parse_from([
            "api",
            "--token",
            "t",
            "--connect-key",
            "new:0123456789abcdef,old:fedcba9876543210",
            "--key-secret",
            "k3y",
        ])
        .expect("parses");
        let config = cli.api.config().expect("valid");
        let ring = config.connect_keys.as_ref().expect("keys");
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.signing_key().map(|k| k.id()), Some("new"));
        assert!(!format!("{config:?}").contains("0123"));
        let short =
            Cli::try_parse_from(["api", "--token", "t", "--connect-key", "k:dev"]).expect("parses");
        assert!(matches!(
            short.api.config(),
            Err(ConfigError::ConnectKeys(KeyError::ShortSecret(_)))
        ));
        let dev = Cli::try_parse_from(["api", "--allow-unauthenticated", "--connect-key", "k:dev"])
            .expect("parses");
        assert!(dev.api.config().is_ok());
        let empty = Cli::try_parse_from(["api", "--allow-unauthenticated", "--connect-key", "k:"])
            .expect("parses");
        assert!(matches!(
            empty.api.config(),
            Err(ConfigError::ConnectKeys(KeyError::EmptySecret(_)))
        ));
        let none =
            Cli::try_parse_from(["api", "--token", "t", "--key-secret", "k3y"]).expect("parses");
        assert!(none.api.config().expect("valid").connect_keys.is_none());
    }
}
