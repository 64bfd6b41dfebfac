//! WebSocket upgrades as the sidecar does them: the connection is live from the handshake until
//! the relay ends (whichever side ends it), the relay's bytes and dead clients are counted, and
//! the drain's abort ends it. The handshake and the relay are the proxy core's
//! ([`spawner_proxy::websocket`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response};
use hyper::body::Incoming;
use spawner_proxy::websocket::{
    Handshake, PendingUpgrade, RelayEnd, RelaySettings, forward_handshake,
};

use crate::body::ResponseBody;
use crate::connection::{ClientConn, upstream_failure};
use crate::control;
use crate::drain::{DrainState, TaskGuard};
use crate::monitor::LiveGuard;
use crate::shared::Shared;
use crate::{Connect, Listener};

pub(crate) async fn proxy<L: Listener, C: Connect>(
    conn: &ClientConn<C>,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let shared = &conn.shared;
    // Live from the handshake until the relay ends, whichever side ends it.
    let Some(guard) = shared.monitor.connection_started_unless_sealed() else {
        return control::sealed_response();
    };
    match forward_handshake(&shared.upstream, req, &conn.peer_ip).await {
        Err(e) => upstream_failure(shared, e),
        // The application declined the upgrade; its answer goes to the client as is.
        Ok(Handshake::Declined(response)) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(
                parts,
                ResponseBody::Proxied {
                    inner: body,
                    guard,
                    sent: 0,
                },
            )
        }
        Ok(Handshake::Accepted { response, upgrade }) => {
            let task = shared.tasks.start();
            tokio::spawn(relay::<L, C>(Arc::clone(shared), upgrade, guard, task));
            response.map(|()| ResponseBody::empty())
        }
    }
}

async fn relay<L: Listener, C: Connect>(
    shared: Arc<Shared<C>>,
    upgrade: PendingUpgrade,
    guard: LiveGuard,
    task: TaskGuard,
) {
    let Some(relay) = upgrade.connect::<L::Io, C::Io>().await else {
        return;
    };
    let counters = &shared.monitor.counters;
    counters.websockets.fetch_add(1, Ordering::Relaxed);
    let config = &shared.config;
    let settings = RelaySettings {
        ping_interval: config.ws_ping_interval,
        max_missed_pongs: config.ws_max_missed_pongs,
        close_linger: config.ws_close_linger,
        ping_payload: spawner_proxy::websocket::SIDECAR_PING_PAYLOAD,
    };
    let count = |from_client: u64, to_client: u64| {
        if from_client > 0 {
            counters
                .bytes_from_clients
                .fetch_add(from_client, Ordering::Relaxed);
        }
        if to_client > 0 {
            counters
                .bytes_to_clients
                .fetch_add(to_client, Ordering::Relaxed);
        }
    };
    let ended = relay
        .run(&settings, count, task.reached(DrainState::Abort))
        .await;
    if let RelayEnd::DeadClient { .. } = ended {
        counters.dead_clients.fetch_add(1, Ordering::Relaxed);
    }
    crate::mutants::count_down(guard, ended.is_clean());
}
