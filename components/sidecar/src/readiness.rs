//! Readiness: the application is ready once it accepts TCP on its port.
//!
//! While not ready the probe dials with exponential backoff between the configured bounds;
//! while ready it re-checks periodically, and at once when the proxy saw a refused connection.

use std::sync::Arc;

use crate::Connect;
use crate::shared::Shared;

pub(crate) async fn probe<C: Connect>(shared: Arc<Shared<C>>) {
    let config = &shared.config;
    let monitor = &shared.monitor;
    let mut backoff = config.probe_backoff_min;
    loop {
        if monitor.is_ready() {
            backoff = config.probe_backoff_min;
            tokio::select! {
                () = tokio::time::sleep(config.ready_check_interval) => {}
                () = monitor.probe_wake.notified() => {}
            }
            if !monitor.is_ready() {
                // The proxy already saw the application refuse; start probing right away.
                continue;
            }
            if !accepts(&shared).await {
                tracing::warn!(upstream = %config.upstream, "application stopped accepting connections");
                monitor.set_ready(false);
            }
            continue;
        }
        if accepts(&shared).await {
            tracing::info!(upstream = %config.upstream, "application accepts connections: ready");
            monitor.set_ready(true);
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.probe_backoff_max);
    }
}

async fn accepts<C: Connect>(shared: &Shared<C>) -> bool {
    let attempt = shared.upstream.connect();
    matches!(
        tokio::time::timeout(shared.config.probe_timeout, attempt).await,
        Ok(Ok(_))
    )
}
