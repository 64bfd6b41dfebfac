//! The production components' configurations as the simulator runs them: parsed from the same
//! command-line arguments as in production, then given their host's simulated clock.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::clock::SimClock;

#[derive(Parser)]
struct ArgsOf<T: clap::Args> {
    #[command(flatten)]
    inner: T,
}

fn args_of<T: clap::Args>(argv: &[&str]) -> T {
    let argv = std::iter::once("sim").chain(argv.iter().copied());
    match ArgsOf::<T>::try_parse_from(argv) {
        Ok(args) => args.inner,
        // The arguments are fixed by the simulator: a failure is a bug in this file.
        Err(e) => panic!("simulator component arguments are invalid: {e}"),
    }
}

pub fn controller_config(
    replica: usize,
    leader_election: bool,
    retention: Duration,
    clock: SimClock,
) -> spawner_controller::ControllerConfig {
    let identity = format!("controller-{replica}");
    let retention = retention.as_secs().max(1).to_string();
    let mut argv = vec![
        "--events-secret",
        crate::world::EVENTS_SECRET,
        "--url-mode",
        "pod-ip",
        "--retention-seconds",
        &retention,
        "--identity",
        &identity,
    ];
    if !leader_election {
        argv.push("--no-leader-election");
    }
    let mut config = args_of::<spawner_controller::ControllerArgs>(&argv).into_config();
    config.clock = Arc::new(clock);
    config
}

pub fn sweeper_config(
    node: &str,
    events_secret: &str,
    clock: SimClock,
) -> spawner_sweeper::SweeperConfig {
    let mut config = args_of::<spawner_sweeper::SweeperArgs>(&[
        "--node-name",
        node,
        "--events-secret",
        events_secret,
    ])
    .into_config();
    config.clock = Arc::new(clock);
    config
}

/// An api replica: replicas share the key secret, so they name a key's backends alike and the
/// API server's AlreadyExists answer settles get-or-create races between them. The `url` it
/// answers is `url_template` (the routers' address of a backend) with a connect token signed
/// with `connect_key`, the routers' key.
pub fn api_config(
    token: &str,
    public_base_url: &str,
    key_secret: &str,
    url_template: &str,
    connect_key: &str,
    clock: SimClock,
) -> Result<spawner_api::ApiConfig, spawner_api::ConfigError> {
    let mut config = args_of::<spawner_api::ApiArgs>(&[
        "--token",
        token,
        "--public-base-url",
        public_base_url,
        "--key-secret",
        key_secret,
        "--url-template",
        url_template,
        "--connect-key",
        connect_key,
    ])
    .config()?;
    config.clock = Arc::new(clock);
    Ok(config)
}

/// A node agent for `node`, whose capacity is its `slots` pod slots: its scheduler binds no
/// more pods to it than the simulated node can run.
pub fn node_agent_config(
    node: &str,
    slots: usize,
    clock: SimClock,
) -> spawner_node_agent::NodeAgentConfig {
    let slots = slots.to_string();
    let mut config =
        args_of::<spawner_node_agent::NodeAgentArgs>(&["--node", node, "--max-pods", &slots])
            .config();
    config.clock = Arc::new(clock);
    config.host_ip = turmoil::lookup(node);
    config
}

/// A router replica in host mode under `domain`, verifying connect tokens with `connect_key`
/// (the api's), on its host's simulated clock.
pub fn router_config(
    domain: &str,
    connect_key: &str,
    clock: SimClock,
) -> Result<spawner_router::RouterConfig, spawner_router::ConfigError> {
    let mut config =
        args_of::<spawner_router::RouterArgs>(&["--domain", domain, "--connect-key", connect_key])
            .config()?;
    config.clock = Arc::new(move || (clock.now_ms().max(0) / 1000) as u64);
    Ok(config)
}
