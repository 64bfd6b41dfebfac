//! Disruption scenarios: a real cluster loses a part of Spawner (the leading controller, an
//! api replica, a node's sweeper) or a whole worker while users spawn, follow and hold
//! backends. They act on the cluster with `kubectl` (the current context: `scripts/e2e-kind.sh`
//! points `KUBECONFIG` at its kind cluster) and judge through the api as a web app would, plus
//! `kubectl` reads for what the api does not show (pods by owner, the leader's Lease, Events).
//! Only a cluster can run them: `spawner dev` has no pods to delete.
//!
//! Each scenario leaves the cluster as it found it (every Deployment and the DaemonSet rolled
//! out, a drained node uncordoned), so the others can run after it in any order.
//!
//! One file per part taken away: `controller.rs`, `api_replica.rs`, `sweeper.rs`,
//! `worker.rs`; `cluster.rs` reads and changes the cluster with `kubectl`.

mod api_replica;
mod cluster;
mod controller;
mod sweeper;
mod worker;

use std::time::Duration;

use super::client;
use super::{Failure, Target, ensure};

pub use api_replica::api_pod_deleted_while_streaming;
pub use cluster::{kubectl, wait_spawner_rolled_out};
pub use controller::controller_leader_deleted_mid_spawn;
pub use sweeper::sweeper_deleted_while_user_connected;
pub use worker::{worker_deleted_backends_fail, worker_drained_backends_fail};

/// Terminates `names` and waits until each is terminal.
async fn terminate_all(target: &Target, names: &[String]) -> Result<(), Failure> {
    for name in names {
        target.api.terminate(name).await?;
    }
    for name in names {
        let (events, _) = target
            .api
            .follow_phases_resuming(name, Duration::from_secs(120), |_| false)
            .await?;
        ensure(events.last().is_some_and(|e| e.phase.is_terminal()), || {
            format!("{name} after terminate: {:?}", client::phases(&events))
        })?;
    }
    Ok(())
}

/// Phases strictly increasing, so none came twice (the api's event ids are the phases).
fn each_phase_once(name: &str, events: &[client::PhaseEvent]) -> Result<(), Failure> {
    ensure(events.windows(2).all(|w| w[0].phase < w[1].phase), || {
        format!(
            "{name}: phases not each once, in order: {:?}",
            client::phases(events)
        )
    })
}
