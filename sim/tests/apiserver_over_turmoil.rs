//! localcluster's API server and kube-rs's client, `Api` and `watcher` run unchanged over
//! turmoil's simulated network.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use spawner_core::SessionLivedBackend;
use spawner_localcluster::{Cluster, ServerConfig};
use spawner_sim::clock::{SimClock, sim_epoch};
use spawner_sim::net::{SimListener, kube_client};

spawner_sim::install_entropy_hook!();

fn backend(name: &str) -> SessionLivedBackend {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "command": ["x"]}]}}}
    }))
    .expect("backend")
}

#[test]
fn kube_client_and_watcher_against_localcluster_in_turmoil() -> turmoil::Result {
    let mut sim = turmoil::Builder::new()
        .epoch(sim_epoch())
        .simulation_duration(Duration::from_secs(60))
        .rng_seed(1)
        .build();
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(SimClock::new()),
    );
    sim.host("apiserver", move || {
        let cluster = cluster.clone();
        async move {
            let listener = SimListener::bind(("0.0.0.0", 6443)).await?;
            spawner_localcluster::serve(listener, cluster).await?;
            Ok(())
        }
    });
    sim.client("watcher", async {
        let client = kube_client("http://apiserver:6443".parse()?, "admin", "default");
        let api: Api<SessionLivedBackend> = Api::namespaced(client.clone(), "default");
        let mut events = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        // The initial list of an empty namespace ends with InitDone.
        loop {
            if let Some(watcher::Event::InitDone) = events.next().await.transpose()? {
                break;
            }
        }
        let created = api.create(&Default::default(), &backend("b1")).await?;
        assert!(created.metadata.uid.is_some());
        let stamp = created
            .metadata
            .creation_timestamp
            .expect("creationTimestamp")
            .0;
        // Timestamps come from simulated time since the fixed epoch.
        assert_eq!(stamp.as_second(), 1_800_000_000);
        match events.next().await.transpose()? {
            Some(watcher::Event::Apply(b)) => {
                assert_eq!(b.metadata.name.as_deref(), Some("b1"))
            }
            other => panic!("expected the created backend, got {other:?}"),
        }
        Ok(())
    });
    sim.run()
}
