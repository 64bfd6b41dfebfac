//! The kind target: Spawner deployed by `scripts/e2e-kind.sh` (deploy/overlays/kind). The api
//! and the router are reached on their NodePorts, mapped to the host by kind-config.yaml: a
//! backend's `url` is `http://<name>.localhost:30081/`, the router, as a browser opens it
//! (`*.localhost` is loopback), so streams go through the router to the sidecar exactly as
//! under `spawner dev`.
//!
//! Environment (defaults match deploy/overlays/kind):
//! - `SPAWNER_E2E_API_URL` (`http://127.0.0.1:30080`), `SPAWNER_E2E_TOKEN` (`kind-dev-token`)
//! - `SPAWNER_E2E_IMAGE` (`spawner:dev`): the image the test apps run

use std::sync::Arc;
use std::time::Duration;

use super::{ApiClient, App, Apps, Failure, Target, local::DirectTcp};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The target deployed on the current kube context, configured from the environment.
pub async fn target() -> Result<Target, Failure> {
    let api_url = env_or("SPAWNER_E2E_API_URL", "http://127.0.0.1:30080");
    let token = env_or("SPAWNER_E2E_TOKEN", "kind-dev-token");
    let image = env_or("SPAWNER_E2E_IMAGE", "spawner:dev");
    let app = |command: &[&str]| App {
        image: Some(image.clone()),
        command: command.iter().map(|s| s.to_string()).collect(),
    };
    let crash = format!("exit {}", super::CRASH_EXIT_CODE);
    Ok(Target {
        name: "kind".into(),
        api: ApiClient::new(&api_url, &token),
        connector: Arc::new(DirectTcp),
        apps: Apps {
            // The image's binary (Dockerfile: /usr/local/bin/spawner).
            demo: app(&["/usr/local/bin/spawner", "demo-backend"]),
            crash: app(&["/bin/sh", "-c", &crash]),
            never_ready: app(&["/bin/sleep", "3600"]),
        },
        // Pods start from a loaded image; scheduling and the sidecar's readiness dominate.
        ready_timeout: Duration::from_secs(180),
        // deploy/overlays/kind sets the controller's SPAWNER_START_TIMEOUT_SECONDS to 45.
        start_timeout: Duration::from_secs(45),
    })
}
