//! The world's hosts, added to a turmoil simulation: the API server, the controller and api
//! replicas, the nodes (agent, sweeper and pod slots) and the users' client hosts. (The router
//! replicas are in `router_hosts.rs`.)

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use spawner_localcluster::{Cluster, ServerConfig};

use crate::clock::HostClocks;
use crate::leadership::{RecordWrites, WriteLog};
use crate::mutants::{
    DuplicatePodCreates, EmptyBackendPatches, ListsWithoutStatus, MissesPodDeletions, Mutant,
    RetriesThrottledAtOnce, SwallowsExpiredWatches,
};
use crate::net::{SimConnector, SimListener, kube_client, kube_client_over};
use crate::pods::{APP_COMMAND, SidecarRegistry, SlotPool, SlotRuntime};
use crate::rbac::{API_TOKEN as KUBE_API_TOKEN, CONTROLLER_TOKEN, NODE_AGENT_TOKEN, SWEEPER_TOKEN};
use crate::users::{SharedReport, UsersConfig};
use crate::world::{
    API_TOKEN, EVENTS_SECRET, KEY_SECRET, NAMESPACE, WorldConfig, api_name, node_name, slot_name,
};

/// The API server: its state lives outside the host, so crashing the host keeps it.
/// It enforces `deploy/rbac/` with each component's own token (`rbac.rs`), recording what each
/// used in `audit`.
pub(crate) fn add_apiserver(
    sim: &mut turmoil::Sim<'_>,
    clocks: &HostClocks,
    audit: Option<spawner_localcluster::Audit>,
) -> Cluster {
    let cluster = Cluster::new(
        ServerConfig {
            auth: crate::rbac::auth(audit),
            bookmark_interval: crate::net::BOOKMARK_INTERVAL,
            ..ServerConfig::default()
        },
        Arc::new(clocks.of("apiserver")),
    );
    cluster
        .ensure_namespace(crate::rbac::SYSTEM_NAMESPACE)
        .expect("a fixed namespace in a fresh cluster");
    {
        let cluster = cluster.clone();
        sim.host("apiserver", move || {
            let cluster = cluster.clone();
            async move {
                let listener = SimListener::bind(("0.0.0.0", 6443)).await?;
                spawner_localcluster::serve(listener, cluster).await?;
                Ok(())
            }
        });
    }
    cluster
}

/// The controller replicas; every write they send is recorded in the returned log.
pub(crate) fn add_controllers(
    sim: &mut turmoil::Sim<'_>,
    config: &WorldConfig,
    kube_url: &http::Uri,
    clocks: &HostClocks,
) -> WriteLog {
    let mutant = config.mutant;
    let writes = WriteLog::default();
    for i in 0..config.controllers {
        let kube_url = kube_url.clone();
        let leader_election = config.controllers > 1
            && !(mutant == Some(Mutant::ReplicaWithoutLeaderElection)
                && i + 1 == config.controllers);
        let writes = writes.clone();
        let retention = config.retention;
        let clock = clocks.of(&format!("controller-{i}"));
        sim.host(format!("controller-{i}"), move || {
            let kube_url = kube_url.clone();
            let clock = clock.clone();
            let writes = writes.clone();
            async move {
                let replica = format!("controller-{i}");
                let client = if mutant == Some(Mutant::ControllerCreatesPodTwice) {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: DuplicatePodCreates(http),
                        replica,
                        log: writes,
                    })
                } else if mutant == Some(Mutant::ControllerMissesPodDeletions) {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: MissesPodDeletions(http),
                        replica,
                        log: writes,
                    })
                } else if mutant == Some(Mutant::ControllerRetriesThrottledAtOnce) {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: RetriesThrottledAtOnce(http),
                        replica,
                        log: writes,
                    })
                } else if mutant == Some(Mutant::ControllerSwallowsExpiredWatches) {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: SwallowsExpiredWatches(http),
                        replica,
                        log: writes,
                    })
                } else {
                    kube_client_over(kube_url, CONTROLLER_TOKEN, NAMESPACE, |http| RecordWrites {
                        inner: http,
                        replica,
                        log: writes,
                    })
                };
                let config =
                    crate::components::controller_config(i, leader_election, retention, clock);
                let listener = SimListener::bind(("0.0.0.0", 8080)).await?;
                spawner_controller::run(client, listener, config, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    writes
}

/// The api replicas.
pub(crate) fn add_apis(
    sim: &mut turmoil::Sim<'_>,
    config: &WorldConfig,
    kube_url: &http::Uri,
    clocks: &HostClocks,
) {
    let mutant = config.mutant;
    for i in 0..config.apis.max(1) {
        let kube_url = kube_url.clone();
        let name = api_name(i);
        let clock = clocks.of(&name);
        let base = format!("http://{name}:7070");
        // The mutant gives every replica a secret of its own, as replicas deployed without a
        // shared `SPAWNER_KEY_SECRET` would have.
        let key_secret = if mutant == Some(Mutant::ApiReplicasWithOwnKeySecrets) {
            format!("{KEY_SECRET}-{i}")
        } else {
            KEY_SECRET.to_string()
        };
        sim.host(name, move || {
            let kube_url = kube_url.clone();
            let clock = clock.clone();
            let base = base.clone();
            let key_secret = key_secret.clone();
            async move {
                let client = match mutant {
                    Some(Mutant::ApiListsWithoutStatus) => {
                        kube_client_over(kube_url, KUBE_API_TOKEN, NAMESPACE, ListsWithoutStatus)
                    }
                    Some(Mutant::ApiDropsTerminateRequests) => {
                        kube_client_over(kube_url, KUBE_API_TOKEN, NAMESPACE, EmptyBackendPatches)
                    }
                    _ => kube_client(kube_url, KUBE_API_TOKEN, NAMESPACE),
                };
                let config = crate::components::api_config(
                    API_TOKEN,
                    &base,
                    &key_secret,
                    &crate::router_hosts::url_template(),
                    crate::router_hosts::CONNECT_KEY,
                    clock,
                )?;
                let listener = SimListener::bind(("0.0.0.0", 7070)).await?;
                if mutant == Some(Mutant::RacyKeyLookup) {
                    crate::mutants::racy_api(client, NAMESPACE, listener).await?;
                    return Ok(());
                }
                spawner_api::run(client, listener, config, std::future::pending()).await?;
                Ok(())
            }
        });
    }
}

/// Every node: its host (node agent and sweeper) and its pod slots.
pub(crate) fn add_nodes(
    sim: &mut turmoil::Sim<'_>,
    config: &WorldConfig,
    kube_url: &http::Uri,
    clocks: &HostClocks,
) -> SidecarRegistry {
    let sidecars = SidecarRegistry::default();
    for n in 0..config.nodes {
        let mut pool = SlotPool::new(sidecars.clone());
        if config.mutant == Some(Mutant::AppCrashesUnreported) {
            pool = pool.hiding_app_crashes();
        }
        for s in 0..config.slots_per_node {
            let index = pool.add_slot();
            let pool = pool.clone();
            let name = slot_name(n, s);
            sim.host(name.clone(), move || {
                pool.clone().run_slot(index, name.clone())
            });
        }
        let kube_url = kube_url.clone();
        let slots = config.slots_per_node;
        let runtime = Arc::new(SlotRuntime::new(pool));
        let clock = clocks.of(&node_name(n));
        sim.host(node_name(n), move || {
            let kube_url = kube_url.clone();
            let runtime = runtime.clone();
            let clock = clock.clone();
            async move {
                let agent_client = kube_client(kube_url.clone(), NODE_AGENT_TOKEN, NAMESPACE);
                let agent_config =
                    crate::components::node_agent_config(&node_name(n), slots, clock.clone());
                tokio::spawn(spawner_node_agent::run(
                    agent_client,
                    agent_config,
                    runtime,
                    std::future::pending(),
                ));
                let client = kube_client(kube_url, SWEEPER_TOKEN, NAMESPACE);
                let http = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_max_idle_per_host(0)
                .build(SimConnector);
                let config = crate::components::sweeper_config(&node_name(n), EVENTS_SECRET, clock);
                let listener = SimListener::bind(("0.0.0.0", 8081)).await?;
                spawner_sweeper::run(client, listener, http, config, std::future::pending())
                    .await?;
                Ok(())
            }
        });
    }

    sidecars
}

/// The users' client hosts, each playing its share of the trace's sessions, and a client that
/// keeps the world running until `horizon`.
pub(crate) fn add_users(
    sim: &mut turmoil::Sim<'_>,
    config: &WorldConfig,
    horizon: Duration,
) -> SharedReport {
    // Users, spread over client hosts by session.
    let report = SharedReport::default();
    let mut shares: Vec<Vec<_>> = vec![Vec::new(); config.user_hosts.max(1)];
    for event in &config.workload.events {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        event.session.hash(&mut h);
        let share = (h.finish() as usize) % shares.len();
        shares[share].push(event.clone());
    }
    let mut spawn_template = serde_json::json!({
        "command": [APP_COMMAND],
        "port": crate::pods::APP_PORT,
        "gracePeriodSeconds": config.grace_seconds,
    });
    if let Some(lifetime) = config.max_lifetime_seconds {
        spawn_template["maxLifetimeSeconds"] = lifetime.into();
    }
    let users_config = UsersConfig {
        apis: (0..config.apis.max(1))
            .map(|i| format!("http://{}:7070", api_name(i)))
            .collect(),
        token: API_TOKEN.into(),
        spawn_template,
        ready_timeout: Duration::from_secs(30),
        routers: crate::router_hosts::router_addresses(config.routers.max(1)),
        terminate_every: config.users_terminate_every,
        crash_every: config.apps_crash_every,
        crash_after: config.apps_crash_after,
    };
    for (k, share) in shares.into_iter().enumerate() {
        let users_config = users_config.clone();
        let report = report.clone();
        sim.client(format!("users-{k}"), async move {
            crate::users::play(share, users_config, report).await;
            Ok(())
        });
    }
    // Keeps the world running after the users are done, for sweeps and cleanup.
    sim.client("drain", async move {
        tokio::time::sleep(horizon).await;
        Ok(())
    });

    report
}
