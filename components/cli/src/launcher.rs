//! The demo launcher of `spawner dev --demo`: visiting its page gets (or creates) the demo
//! backend through the api, like a web app of Spawner's users would, waits until it is Ready
//! and redirects the browser to the `url` the api answered: the backend's address on the
//! router, with a connect token that lets this browser in (a browser without one gets 401). Every tab lands on the same backend (key `demo`); once they
//! are all closed, the backend is swept and the next visit spawns a fresh one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::client::{ApiClient, ApiTarget};

/// Key of the shared demo backend.
pub const DEMO_KEY: &str = "demo";

pub struct Launcher {
    api: ApiClient,
    exe: PathBuf,
    grace_seconds: u32,
    /// Visits so far: each visit is the user `visitor-<n>` (carried by its connect token), so
    /// a recorded session trace keeps a visit's spawn and its connections in one session.
    visits: std::sync::atomic::AtomicU64,
}

impl Launcher {
    pub fn new(
        api_url: &str,
        token: &str,
        exe: PathBuf,
        grace_seconds: u32,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            api: ApiClient::new(&ApiTarget {
                api: api_url.to_string(),
                token: Some(token.to_string()),
            })?,
            exe,
            grace_seconds,
            visits: Default::default(),
        })
    }

    /// The demo backend's URL (with this visitor's connect token) once it is Ready.
    async fn open(&self) -> anyhow::Result<String> {
        let visit = self
            .visits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let body = json!({
            "key": DEMO_KEY,
            "user": format!("visitor-{visit}"),
            "command": [self.exe.display().to_string(), "demo-backend"],
            "gracePeriodSeconds": self.grace_seconds,
        });
        let answer = self
            .api
            .call(http::Method::POST, "/connect", Some(&body))
            .await?;
        let name = answer["name"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the api's answer has no name"))?
            .to_string();
        let url = answer["url"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the api's answer has no url"))?
            .to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .api
                .call(http::Method::GET, &format!("/backend/{name}/status"), None)
                .await?;
            match (status["phase"].as_str(), status["url"].as_str()) {
                (Some("Ready"), Some(_)) => return Ok(url),
                (Some(phase @ ("Failed" | "Swept" | "Terminated")), _) => {
                    anyhow::bail!(
                        "demo backend {name} is {phase}: {}",
                        status["message"].as_str().unwrap_or("no message")
                    )
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("demo backend {name} was not Ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn router(launcher: Launcher) -> Router {
    Router::new()
        .route("/", get(open))
        .with_state(Arc::new(launcher))
}

async fn open(State(launcher): State<Arc<Launcher>>) -> Response {
    match launcher.open().await {
        Ok(url) => (StatusCode::FOUND, [(header::LOCATION, url)]).into_response(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "demo launcher failed");
            (
                StatusCode::BAD_GATEWAY,
                Html(format!(
                    "<!doctype html><title>Spawner demo</title><p>The demo backend could not be opened: {}</p><p><a href=\"/\">Try again</a></p>",
                    crate::demo::html_escape(&format!("{e:#}"))
                )),
            )
                .into_response()
        }
    }
}
