//! The Spawner sidecar run in-process by the process runtime: the real `spawner-sidecar`
//! library, on a listener bound at the pod's own loopback address.

use std::net::SocketAddr;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::process::InProcessSidecar;
use super::runtime::SidecarPlan;

/// Runs [`spawner_sidecar::run`] with its TCP connector.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpawnerSidecar;

impl InProcessSidecar for SpawnerSidecar {
    fn serve(
        &self,
        listener: TcpListener,
        upstream: SocketAddr,
        plan: SidecarPlan,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), String>> {
        let config = spawner_sidecar::SidecarConfig {
            events_token: Some(plan.events_token).filter(|t| !t.is_empty()),
            ..spawner_sidecar::SidecarConfig::new(upstream.to_string())
        };
        Box::pin(async move {
            spawner_sidecar::run(
                listener,
                spawner_sidecar::TcpConnector,
                config,
                shutdown.cancelled_owned(),
            )
            .await
            .map_err(|e| e.to_string())
        })
    }
}
