//! One assembly of the whole system. Every host that runs Spawner's components together —
//! `spawner dev`, the simulator, the e2e suites — configures them here: from the same
//! command-line arguments each component's own command parses (so defaults cannot drift
//! between hosts), with the host's clock passed in, and with one rule for the Kubernetes
//! clients' read timeout. How a host reaches the API server (loopback TCP, in process,
//! turmoil) stays the host's: it builds the client with its transport and passes it to `run`.

use std::sync::Arc;
use std::time::Duration;

use spawner_core::clock::Clock;

/// A component's configuration could not be built from its arguments.
#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    #[error("{component} arguments {argv:?}: {source}")]
    Args {
        component: &'static str,
        argv: Vec<String>,
        source: clap::Error,
    },
    #[error("api: {0}")]
    Api(#[from] spawner_api::ConfigError),
    #[error("router: {0}")]
    Router(#[from] spawner_router::ConfigError),
}

#[derive(clap::Parser)]
struct ArgsOf<T: clap::Args> {
    #[command(flatten)]
    inner: T,
}

/// Parses a component's clap arguments from a list, exactly as its own command line would
/// (defaults and validation included; environment variables are read as there too).
pub fn args_of<T: clap::Args>(component: &'static str, argv: &[&str]) -> Result<T, AssemblyError> {
    use clap::Parser as _;
    let full = std::iter::once("spawner").chain(argv.iter().copied());
    ArgsOf::<T>::try_parse_from(full)
        .map(|args| args.inner)
        .map_err(|source| AssemblyError::Args {
            component,
            argv: argv.iter().map(|a| a.to_string()).collect(),
            source,
        })
}

pub fn controller(
    argv: &[&str],
    clock: Arc<dyn Clock>,
) -> Result<spawner_controller::ControllerConfig, AssemblyError> {
    let mut config =
        args_of::<spawner_controller::ControllerArgs>("controller", argv)?.into_config();
    config.clock = clock;
    Ok(config)
}

pub fn sweeper(
    argv: &[&str],
    clock: Arc<dyn Clock>,
) -> Result<spawner_sweeper::SweeperConfig, AssemblyError> {
    let mut config = args_of::<spawner_sweeper::SweeperArgs>("sweeper", argv)?.into_config();
    config.clock = clock;
    Ok(config)
}

pub fn api(argv: &[&str], clock: Arc<dyn Clock>) -> Result<spawner_api::ApiConfig, AssemblyError> {
    let mut config = args_of::<spawner_api::ApiArgs>("api", argv)?.config()?;
    config.clock = clock;
    Ok(config)
}

pub fn router(
    argv: &[&str],
    clock: Arc<dyn Clock>,
) -> Result<spawner_router::RouterConfig, AssemblyError> {
    let mut config = args_of::<spawner_router::RouterArgs>("router", argv)?.config()?;
    config.clock = clock;
    Ok(config)
}

/// The node agent's arguments (a host that runs pods as processes builds its runtime from
/// them) and its configuration.
pub fn node_agent(
    argv: &[&str],
    clock: Arc<dyn Clock>,
) -> Result<
    (
        spawner_node_agent::NodeAgentArgs,
        spawner_node_agent::NodeAgentConfig,
    ),
    AssemblyError,
> {
    let args = args_of::<spawner_node_agent::NodeAgentArgs>("node agent", argv)?;
    let mut config = args.config();
    config.clock = clock;
    Ok((args, config))
}

/// How often a real API server sends a watch bookmark (about once a minute).
pub const API_SERVER_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// How long a Kubernetes connection may stay silent before it is dropped and re-established,
/// for an API server that sends watch bookmarks every `bookmark_interval`: a healthy watch is
/// never silent longer than that, so a silently partitioned one is noticed after three missed
/// bookmarks, or 15 s after the first missed one, whichever comes first — instead of when the
/// server's watch timeout (up to ~5 minutes) ends it. A real API server: 75 s; the simulator's
/// (bookmarks every 5 s): 15 s.
pub const fn kube_read_timeout(bookmark_interval: Duration) -> Duration {
    let three_missed = bookmark_interval.as_millis() * 3;
    let one_missed_late = bookmark_interval.as_millis() + 15_000;
    let ms = if three_missed < one_missed_late {
        three_missed
    } else {
        one_missed_late
    };
    Duration::from_millis(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_timeouts_follow_the_bookmark_interval() {
        assert_eq!(
            kube_read_timeout(API_SERVER_BOOKMARK_INTERVAL),
            Duration::from_secs(75)
        );
        assert_eq!(
            kube_read_timeout(Duration::from_secs(5)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn components_are_configured_as_their_commands_would_be() {
        let clock: Arc<dyn Clock> = Arc::new(spawner_core::clock::SystemClock);
        let controller = controller(
            &["--events-secret", "s", "--no-leader-election"],
            clock.clone(),
        )
        .expect("controller");
        assert!(controller.lease.is_none());
        let refused = sweeper(&["--no-such-flag"], clock);
        assert!(
            matches!(
                refused,
                Err(AssemblyError::Args {
                    component: "sweeper",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}
