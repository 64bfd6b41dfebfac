//! The kind target: Spawner deployed by `scripts/e2e-kind.sh` (deploy/overlays/kind). The api
//! is reached on its NodePort, mapped to the host by kind-config.yaml; a backend's Service only
//! exists inside the cluster, so streams to its sidecar go through a Kubernetes port-forward to
//! the backend's pod (the API server's `pods/portforward`, no `kubectl` process).
//!
//! Environment (defaults match deploy/overlays/kind):
//! - `SPAWNER_E2E_API_URL` (`http://127.0.0.1:30080`), `SPAWNER_E2E_TOKEN` (`kind-dev-token`)
//! - `SPAWNER_E2E_NAMESPACE` (`spawner-backends`): where the api creates backends
//! - `SPAWNER_E2E_IMAGE` (`spawner:dev`): the image the test apps run
//! - the cluster itself: `KUBECONFIG` / the current context (kind sets `kind-spawner`)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Portforwarder;
use kube::api::{Api, ListParams};
use spawner_core::children::DEFAULT_SIDECAR_PORT;
use spawner_core::resource::BACKEND_LABEL;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::{
    ApiClient, App, Apps, BackendStatus, BoxFuture, BoxedStream, Connect, Failure, Target,
};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Port-forwards to the sidecar of the backend's pod (found by its `spawner.dev/backend`
/// label).
pub struct PortForward {
    pods: Api<Pod>,
    sidecar_port: u16,
}

/// The forwarded stream; holds the forwarder so the connection lives as long as the stream.
struct Forwarded {
    stream: DuplexStream,
    _forwarder: Portforwarder,
}

impl AsyncRead for Forwarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Forwarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connect for PortForward {
    fn connect<'a>(
        &'a self,
        backend: &'a BackendStatus,
    ) -> BoxFuture<'a, Result<BoxedStream, Failure>> {
        Box::pin(async move {
            let selector = format!("{BACKEND_LABEL}={}", backend.name);
            let pods = self
                .pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| Failure::new(format!("listing pods {selector}: {e}")))?;
            let pod = pods
                .items
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .next()
                .ok_or_else(|| Failure::new(format!("no pod with label {selector}")))?;
            let mut forwarder = tokio::time::timeout(
                Duration::from_secs(30),
                self.pods.portforward(&pod, &[self.sidecar_port]),
            )
            .await
            .map_err(|_| Failure::new(format!("port-forward to {pod}: timed out")))?
            .map_err(|e| Failure::new(format!("port-forward to {pod}: {e}")))?;
            let stream = forwarder.take_stream(self.sidecar_port).ok_or_else(|| {
                Failure::new(format!("port-forward to {pod}: no stream for the port"))
            })?;
            Ok(Box::new(Forwarded {
                stream,
                _forwarder: forwarder,
            }) as BoxedStream)
        })
    }
}

/// The target deployed on the current kube context, configured from the environment.
pub async fn target() -> Result<Target, Failure> {
    let api_url = env_or("SPAWNER_E2E_API_URL", "http://127.0.0.1:30080");
    let token = env_or("SPAWNER_E2E_TOKEN", "kind-dev-token");
    let namespace = env_or("SPAWNER_E2E_NAMESPACE", "spawner-backends");
    let image = env_or("SPAWNER_E2E_IMAGE", "spawner:dev");
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Failure::new(format!("no Kubernetes client for the kind cluster: {e}")))?;
    let app = |command: &[&str]| App {
        image: Some(image.clone()),
        command: command.iter().map(|s| s.to_string()).collect(),
    };
    let crash = format!("exit {}", super::CRASH_EXIT_CODE);
    Ok(Target {
        name: "kind".into(),
        api: ApiClient::new(&api_url, &token),
        connector: Arc::new(PortForward {
            pods: Api::namespaced(client, &namespace),
            sidecar_port: DEFAULT_SIDECAR_PORT,
        }),
        apps: Apps {
            // The image's binary (Dockerfile: /usr/local/bin/spawner).
            demo: app(&["/usr/local/bin/spawner", "demo-backend"]),
            crash: app(&["/bin/sh", "-c", &crash]),
            never_ready: app(&["/bin/sleep", "3600"]),
        },
        // Pods start from a loaded image; scheduling and the sidecar's readiness dominate.
        ready_timeout: Duration::from_secs(180),
    })
}
