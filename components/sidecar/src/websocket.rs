//! WebSocket upgrades: the handshake goes to the application through hyper, then the two
//! connections are relayed byte for byte by [`Relay`], which also pings quiet clients and drops
//! those that stop answering (half-open connections would otherwise keep a backend alive
//! forever).
//!
//! An idle relayed WebSocket holds no buffers: reads go to a buffer on the poll's stack and are
//! written straight through; only bytes the destination cannot take yet are kept on the heap.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, MissedTickBehavior};

use crate::body::{RequestBody, ResponseBody};
use crate::drain::{DrainState, TaskGuard};
use crate::frames::{ClientFilter, FILTER_HEADROOM, FrameCursor, going_away_frame, ping_frame};
use crate::monitor::{LiveGuard, Monitor};
use crate::proxy::{
    ClientConn, UpstreamError, dial, origin_form, prepare_request_headers, remove_hop_by_hop,
};
use crate::{Connect, Listener, Shared};

/// Bytes read per poll.
const CHUNK: usize = 16 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by every relay polled on it: a relay only
    /// uses it within one synchronous poll, so idle WebSockets own no buffer at all, and no
    /// poll pays for zeroing a fresh one.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; FILTER_HEADROOM + CHUNK].into_boxed_slice());
}

fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Not reachable (polls do not nest), but a fresh buffer is a correct fallback.
        Err(_) => f(&mut vec![0u8; FILTER_HEADROOM + CHUNK]),
    })
}

fn has_token(req_headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    req_headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A WebSocket opening handshake (RFC 6455 §4.1).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && has_token(req.headers(), header::CONNECTION, "upgrade")
        && has_token(req.headers(), header::UPGRADE, "websocket")
}

pub(crate) async fn proxy<L: Listener, C: Connect>(
    conn: &ClientConn<C>,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let shared = &conn.shared;
    // Live from the handshake until the relay ends, whichever side ends it.
    let Some(guard) = shared.monitor.connection_started_unless_sealed() else {
        return crate::reserved::sealed_response();
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _empty) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("websocket"));
    prepare_request_headers(&mut parts.headers, &conn.peer_ip, true);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, upgrade);
    parts.uri = origin_form(&parts.uri);

    let mut sender = match dial(shared).await {
        Ok((sender, connection)) => {
            // Runs until the handshake response is read and the connection handed over.
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            sender
        }
        Err(e) => return e.into_response(shared),
    };
    let mut response = match sender
        .send_request(Request::from_parts(parts, RequestBody::Empty))
        .await
    {
        Ok(response) => response,
        Err(e) => return UpstreamError::Exchange(e).into_response(shared),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The application declined the upgrade; its answer goes to the client as is.
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        return Response::from_parts(
            parts,
            ResponseBody::Proxied {
                inner: body,
                guard,
                sent: 0,
            },
        );
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let (mut parts, _empty) = response.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("websocket"));
    remove_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, upgrade);

    let task = shared.tasks.start();
    tokio::spawn(relay_when_upgraded::<L, C>(
        Arc::clone(shared),
        client_upgrade,
        upstream_upgrade,
        sender,
        guard,
        task,
    ));
    Response::from_parts(parts, ResponseBody::empty())
}

async fn relay_when_upgraded<L: Listener, C: Connect>(
    shared: Arc<Shared<C>>,
    client: OnUpgrade,
    upstream: OnUpgrade,
    sender: hyper::client::conn::http1::SendRequest<RequestBody>,
    guard: LiveGuard,
    task: TaskGuard,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(client = ?c.err(), upstream = ?u.err(), "websocket upgrade did not complete");
            return;
        }
    };
    drop(sender);
    let (Some((client, client_early)), Some((upstream, upstream_early))) =
        (into_parts::<L::Io>(client), into_parts::<C::Io>(upstream))
    else {
        tracing::error!("websocket upgrade returned an unexpected connection type");
        return;
    };
    shared
        .monitor
        .counters
        .websockets
        .fetch_add(1, Ordering::Relaxed);
    let relay = Relay::new(client, upstream, &client_early, &upstream_early);
    // These share hyper's read buffers; holding them would pin kilobytes per idle WebSocket.
    drop((client_early, upstream_early));
    let ended_cleanly = run_relay(&shared, relay, &task).await;
    crate::mutants::count_down(guard, ended_cleanly);
}

/// The original connection and the bytes hyper had read past the handshake.
fn into_parts<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    upgraded: Upgraded,
) -> Option<(T, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<T>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

enum Progress {
    OneClosed,
    BothClosed,
}

/// How a relay ended.
#[derive(Debug)]
enum Ended {
    Closed(io::Result<()>),
    DeadClient,
    Aborted,
}

/// Relays until either side ends; `true` when it ended with a clean close or a drain.
async fn run_relay<C: Connect, A, B>(
    shared: &Shared<C>,
    mut relay: Relay<A, B>,
    task: &TaskGuard,
) -> bool
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let period = config.ws_ping_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut missed = 0u32;
    let mut awaiting_pong = false;
    // Once one side has closed, the other gets `ws_close_linger` to follow before it is closed.
    let mut linger: Option<Instant> = None;
    let ended = loop {
        let lingering = linger.is_some();
        let linger_over = async {
            match linger {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        // `biased`: no random start per poll (every message wakes this loop); the relay never
        // stays ready (it moves bytes until both sides would block), so nothing starves.
        tokio::select! {
            biased;
            result = std::future::poll_fn(|cx| relay.poll_relay(cx, lingering)) => match result {
                Ok(Progress::BothClosed) => break Ended::Closed(Ok(())),
                Ok(Progress::OneClosed) => linger = Some(Instant::now() + config.ws_close_linger),
                Err(e) => break Ended::Closed(Err(e)),
            },
            () = linger_over => break Ended::Closed(Ok(())),
            _ = ticker.tick() => {
                relay.flush_counters(&shared.monitor);
                if relay.client_seen {
                    missed = 0;
                    awaiting_pong = false;
                } else if awaiting_pong {
                    missed += 1;
                    if missed >= config.ws_max_missed_pongs {
                        break Ended::DeadClient;
                    }
                }
                if !relay.client_seen {
                    relay.ping_due = true;
                    awaiting_pong = true;
                }
                relay.client_seen = false;
            }
            () = task.reached(DrainState::Abort) => break Ended::Aborted,
        }
    };
    relay.flush_counters(&shared.monitor);
    let clean = matches!(ended, Ended::Closed(Ok(())) | Ended::Aborted);
    match ended {
        Ended::Closed(Ok(())) => tracing::debug!("websocket closed"),
        Ended::Closed(Err(e)) => tracing::debug!(error = %e, "websocket ended with an error"),
        Ended::DeadClient => {
            shared
                .monitor
                .counters
                .dead_clients
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                missed,
                "websocket client stopped answering pings: closing its connection"
            );
            relay.say_going_away().await;
        }
        Ended::Aborted => tracing::debug!("websocket closed by the drain timeout"),
    }
    clean
}

/// One direction of the relay.
#[derive(Debug, Default)]
struct Pump {
    /// Bytes read but not yet accepted by the destination (heap only while it is slow).
    pending: Vec<u8>,
    written: usize,
    /// The source reached end of stream.
    eof: bool,
    /// The destination's write side is shut down: this direction is finished.
    done: bool,
    /// Bytes moved, not yet added to the metrics.
    bytes: u64,
}

impl Pump {
    fn has_pending(&self) -> bool {
        self.written < self.pending.len()
    }

    /// Writes what is pending; `Ready(Ok)` once nothing is.
    fn poll_flush_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.has_pending() {
            let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.pending.capacity() > 0 {
            // Give the memory back: an idle WebSocket should cost nothing but its sockets.
            self.pending = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `data` straight through; what the destination does not take now becomes pending.
    fn write_through<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
        mut data: &[u8],
    ) -> io::Result<()> {
        while !data.is_empty() {
            match Pin::new(&mut *dst).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => data = &data[n..],
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    self.pending.extend_from_slice(data);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// After end of stream: shut the destination's write side once everything is written.
    fn poll_finish<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        // A peer that is already gone makes shutdown fail; the direction is finished anyway.
        let _ = ready!(Pin::new(dst).poll_shutdown(cx));
        self.done = true;
        Poll::Ready(Ok(()))
    }
}

/// Relays one WebSocket between the client (`A`) and the application (`B`).
struct Relay<A, B> {
    client: A,
    upstream: B,
    to_upstream: Pump,
    to_client: Pump,
    filter: ClientFilter,
    cursor: FrameCursor,
    /// The client sent something since the last ping tick.
    client_seen: bool,
    /// A ping should go to the client at the next frame boundary.
    ping_due: bool,
}

impl<A, B> Relay<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn new(client: A, upstream: B, client_early: &[u8], upstream_early: &[u8]) -> Self {
        let mut relay = Self {
            client,
            upstream,
            to_upstream: Pump::default(),
            to_client: Pump::default(),
            filter: ClientFilter::default(),
            cursor: FrameCursor::default(),
            client_seen: false,
            ping_due: false,
        };
        // Frames that arrived together with the handshakes go first, through the same tracking.
        if !client_early.is_empty() {
            let mut buf = vec![0u8; FILTER_HEADROOM + client_early.len()];
            buf[FILTER_HEADROOM..].copy_from_slice(client_early);
            let end = buf.len();
            let (a, b) = relay.filter.filter(&mut buf, FILTER_HEADROOM, end);
            relay.to_upstream.pending.extend_from_slice(&buf[a..b]);
            relay.to_upstream.bytes += client_early.len() as u64;
        }
        if !upstream_early.is_empty() {
            relay.cursor.advance(upstream_early);
            relay.to_client.pending.extend_from_slice(upstream_early);
            relay.to_client.bytes += upstream_early.len() as u64;
        }
        relay
    }

    /// Moves bytes both ways; `Ready` when both directions are finished, when the first one
    /// finishes (unless `lingering` says that was already reported), or on an error.
    fn poll_relay(&mut self, cx: &mut Context<'_>, lingering: bool) -> Poll<io::Result<Progress>> {
        let up = self.poll_to_upstream(cx)?;
        let down = self.poll_to_client(cx)?;
        match (up.is_ready(), down.is_ready()) {
            (true, true) => Poll::Ready(Ok(Progress::BothClosed)),
            (true, false) | (false, true) if !lingering => Poll::Ready(Ok(Progress::OneClosed)),
            _ => Poll::Pending,
        }
    }

    fn poll_to_upstream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let pump = &mut self.to_upstream;
        if pump.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(pump.poll_flush_pending(cx, &mut self.upstream))?;
            if pump.eof {
                return pump.poll_finish(cx, &mut self.upstream);
            }
            let client = &mut self.client;
            let upstream = &mut self.upstream;
            let filter = &mut self.filter;
            let n = with_scratch(|buf| -> Poll<io::Result<usize>> {
                let mut read = ReadBuf::new(&mut buf[FILTER_HEADROOM..]);
                ready!(Pin::new(&mut *client).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                let (a, b) = filter.filter(buf, FILTER_HEADROOM, FILTER_HEADROOM + n);
                pump.write_through(cx, upstream, &buf[a..b])?;
                Poll::Ready(Ok(n))
            });
            let n = ready!(n)?;
            if n == 0 {
                pump.eof = true;
                continue;
            }
            self.client_seen = true;
            pump.bytes += n as u64;
        }
    }

    fn poll_to_client(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let pump = &mut self.to_client;
        if pump.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(pump.poll_flush_pending(cx, &mut self.client))?;
            if pump.eof {
                return pump.poll_finish(cx, &mut self.client);
            }
            if self.ping_due && self.cursor.at_boundary() {
                self.ping_due = false;
                pump.write_through(cx, &mut self.client, &ping_frame())?;
                continue;
            }
            let client = &mut self.client;
            let upstream = &mut self.upstream;
            let cursor = &mut self.cursor;
            let n = with_scratch(|buf| -> Poll<io::Result<usize>> {
                let mut read = ReadBuf::new(&mut buf[..CHUNK]);
                ready!(Pin::new(&mut *upstream).poll_read(cx, &mut read))?;
                let data = read.filled();
                cursor.advance(data);
                pump.write_through(cx, client, data)?;
                Poll::Ready(Ok(data.len()))
            });
            let n = ready!(n)?;
            if n == 0 {
                pump.eof = true;
                continue;
            }
            pump.bytes += n as u64;
        }
    }

    fn flush_counters(&mut self, monitor: &Monitor) {
        let c = &monitor.counters;
        if self.to_upstream.bytes > 0 {
            c.bytes_from_clients.fetch_add(
                std::mem::take(&mut self.to_upstream.bytes),
                Ordering::Relaxed,
            );
        }
        if self.to_client.bytes > 0 {
            c.bytes_to_clients
                .fetch_add(std::mem::take(&mut self.to_client.bytes), Ordering::Relaxed);
        }
    }

    /// The client is gone: tell the application with a close frame (1001) when the stream is
    /// between frames, then close its connection.
    async fn say_going_away(&mut self) {
        let period = std::time::Duration::from_secs(1);
        if !self.to_upstream.done
            && !self.to_upstream.eof
            && !self.to_upstream.has_pending()
            && self.filter.at_boundary()
        {
            let _ =
                tokio::time::timeout(period, self.upstream.write_all(&going_away_frame())).await;
        }
        let _ = tokio::time::timeout(period, self.upstream.shutdown()).await;
    }
}
