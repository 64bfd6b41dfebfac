//! The production components' configurations as the simulator runs them: built by
//! `spawner_assembly` from the same command-line arguments as in production, with their host's
//! simulated clock.

use std::sync::Arc;
use std::time::Duration;

use spawner_assembly::AssemblyError;

use crate::clock::SimClock;

/// The arguments are fixed by the simulator: a failure is a bug in this file.
fn built<T>(config: Result<T, AssemblyError>) -> T {
    config.unwrap_or_else(|e| panic!("simulator component arguments are invalid: {e}"))
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
        "--lease-namespace",
        crate::rbac::SYSTEM_NAMESPACE,
    ];
    if !leader_election {
        argv.push("--no-leader-election");
    }
    built(spawner_assembly::controller(&argv, Arc::new(clock)))
}

pub fn sweeper_config(
    node: &str,
    events_secret: &str,
    clock: SimClock,
) -> spawner_sweeper::SweeperConfig {
    built(spawner_assembly::sweeper(
        &["--node-name", node, "--events-secret", events_secret],
        Arc::new(clock),
    ))
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
    match spawner_assembly::api(
        &[
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
        ],
        Arc::new(clock),
    ) {
        Ok(config) => Ok(config),
        Err(AssemblyError::Api(e)) => Err(e),
        Err(e) => panic!("simulator component arguments are invalid: {e}"),
    }
}

/// A node agent for `node`, whose capacity is its `slots` pod slots: its scheduler binds no
/// more pods to it than the simulated node can run.
pub fn node_agent_config(
    node: &str,
    slots: usize,
    clock: SimClock,
) -> spawner_node_agent::NodeAgentConfig {
    let slots = slots.to_string();
    let (_, mut config) = built(spawner_assembly::node_agent(
        &["--node", node, "--max-pods", &slots],
        Arc::new(clock),
    ));
    config.host_ip = turmoil::lookup(node);
    config
}

/// A router replica in host mode under `domain`, verifying connect tokens with `connect_key`
/// (the api's), on its host's simulated clock.
pub fn router_config(
    domain: &str,
    connect_key: &str,
    clock: SimClock,
) -> spawner_router::RouterConfig {
    built(spawner_assembly::router(
        &["--domain", domain, "--connect-key", connect_key],
        Arc::new(clock),
    ))
}
