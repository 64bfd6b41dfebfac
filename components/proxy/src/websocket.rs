//! WebSocket upgrades: [`forward_handshake`] sends the client's handshake to the upstream
//! through hyper; once both sides switched protocols, [`PendingUpgrade::connect`] yields a
//! [`Relay`] that moves the two connections' bytes as they are, pings quiet clients and drops
//! those that stop answering (half-open connections would otherwise stay open forever).
//!
//! An idle relayed WebSocket holds no buffers: reads go to a buffer on the poll's stack and are
//! written straight through; only bytes the destination cannot take yet are kept on the heap.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, MissedTickBehavior};

use crate::connect::{Connect, Upstream};
pub use crate::frames::ClientFrame;
use crate::frames::{ClientFilter, FILTER_HEADROOM, FrameCursor, going_away_frame, ping_frame};

/// Hears of each whole message and close frame a client sends ([`PendingUpgrade::connect_observed`]).
pub type ClientObserver = Box<dyn FnMut(ClientFrame) + Send>;
use crate::headers::{forward_request_headers, origin_form, remove_hop_by_hop};
use crate::upstream::{Sender, UpstreamError, dial};

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
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && has_token(req.headers(), header::CONNECTION, "upgrade")
        && has_token(req.headers(), header::UPGRADE, "websocket")
}

/// How long a relay waits for pings, pongs and closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    /// How often a quiet client is pinged.
    pub ping_interval: Duration,
    /// Consecutive unanswered pings after which the client is dropped.
    pub max_missed_pongs: u32,
    /// After one side closed its connection, how long the other gets to close too.
    pub close_linger: Duration,
    /// The payload of this relay's pings, by which it tells the pongs answering them from
    /// those answering the pings of a relay behind it (which it passes on). Relays in a chain
    /// need different payloads: [`SIDECAR_PING_PAYLOAD`], [`ROUTER_PING_PAYLOAD`].
    pub ping_payload: [u8; 8],
}

/// The sidecar's ping payload.
pub const SIDECAR_PING_PAYLOAD: [u8; 8] = *b"spawner1";
/// The router's ping payload (it relays to a sidecar, which pings through it).
pub const ROUTER_PING_PAYLOAD: [u8; 8] = *b"spawnerR";

/// The upstream's answer to a forwarded handshake.
pub enum Handshake {
    /// The upstream declined the upgrade: its response goes to the client as is (hop-by-hop
    /// fields removed).
    Declined(Response<Incoming>),
    /// The upstream switched protocols: send `response` (101, hop-by-hop fields replaced by
    /// `Connection: upgrade` and the upstream's `Upgrade`) to the client, then
    /// [`PendingUpgrade::connect`].
    Accepted {
        response: Response<()>,
        upgrade: PendingUpgrade,
    },
}

/// Both sides of an accepted upgrade, until hyper hands their connections over.
pub struct PendingUpgrade {
    client: OnUpgrade,
    upstream: OnUpgrade,
    /// Kept until the upgrade completes: dropping it earlier could end the upstream connection.
    sender: Sender<Empty<Bytes>>,
}

/// Forwards a client's WebSocket handshake ([`is_upgrade`]) to the upstream on a connection of
/// its own (origin-form target, hop-by-hop fields removed, `X-Forwarded-*` for `peer_ip` with
/// proto `ws`, `Connection: upgrade` and the client's `Upgrade`).
pub async fn forward_handshake<C: Connect>(
    upstream: &Upstream<C>,
    mut req: Request<Incoming>,
    peer_ip: &HeaderValue,
) -> Result<Handshake, UpstreamError> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _empty) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("websocket"));
    forward_request_headers(&mut parts.headers, peer_ip, true);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, upgrade);
    parts.uri = origin_form(&parts.uri);

    let (mut sender, connection) = dial(upstream).await?;
    // Runs until the handshake response is read and the connection handed over.
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender
        .send_request(Request::from_parts(parts, Empty::new()))
        .await
        .map_err(UpstreamError::Exchange)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        remove_hop_by_hop(response.headers_mut());
        return Ok(Handshake::Declined(response));
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
    Ok(Handshake::Accepted {
        response: Response::from_parts(parts, ()),
        upgrade: PendingUpgrade {
            client: client_upgrade,
            upstream: upstream_upgrade,
            sender,
        },
    })
}

impl PendingUpgrade {
    /// Waits until both connections are handed over (the client's after its 101 is written)
    /// and returns their relay; `None` if either upgrade failed or a connection is not of the
    /// expected type (`A`: what the server accepted, `B`: the connector's).
    pub async fn connect<A, B>(self) -> Option<Relay<A, B>>
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.connect_observed(None).await
    }

    /// [`connect`](Self::connect), with `observer` told of every whole message (its size) and
    /// close frame the client sends, from the first byte after its handshake on. It runs on the
    /// relay's poll: it must not block.
    pub async fn connect_observed<A, B>(
        self,
        observer: Option<ClientObserver>,
    ) -> Option<Relay<A, B>>
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (client, upstream) = match tokio::join!(self.client, self.upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                tracing::debug!(client = ?c.err(), upstream = ?u.err(), "websocket upgrade did not complete");
                return None;
            }
        };
        drop(self.sender);
        let (Some((client, client_early)), Some((upstream, upstream_early))) =
            (into_parts::<A>(client), into_parts::<B>(upstream))
        else {
            tracing::error!("websocket upgrade returned an unexpected connection type");
            return None;
        };
        let relay = Relay::new(client, upstream, &client_early, &upstream_early, observer);
        // These share hyper's read buffers; holding them would pin kilobytes per idle WebSocket.
        drop((client_early, upstream_early));
        Some(relay)
    }
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
pub enum RelayEnd {
    /// Both sides closed (or the other side did not follow a close within the linger).
    Closed,
    /// A connection failed.
    Failed(io::Error),
    /// The client stopped answering pings: the upstream got a close frame (1001, going away)
    /// if its stream was between frames, and its connection was closed.
    DeadClient { missed: u32 },
    /// `abort` completed.
    Aborted,
}

impl RelayEnd {
    /// Ended by a close or by the caller, not by a failure or a vanished client.
    pub fn is_clean(&self) -> bool {
        matches!(self, RelayEnd::Closed | RelayEnd::Aborted)
    }
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
pub struct Relay<A, B> {
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
    ping_payload: [u8; 8],
    observer: Option<ClientObserver>,
}

/// Calls the observer, if there is one.
fn tell(observer: &mut Option<ClientObserver>) -> impl FnMut(ClientFrame) + '_ {
    move |frame| {
        if let Some(observer) = observer.as_mut() {
            observer(frame);
        }
    }
}

impl<A, B> Relay<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn new(
        client: A,
        upstream: B,
        client_early: &[u8],
        upstream_early: &[u8],
        observer: Option<ClientObserver>,
    ) -> Self {
        let mut relay = Self {
            client,
            upstream,
            to_upstream: Pump::default(),
            to_client: Pump::default(),
            filter: ClientFilter::default(),
            cursor: FrameCursor::default(),
            client_seen: false,
            ping_due: false,
            ping_payload: SIDECAR_PING_PAYLOAD,
            observer,
        };
        // Frames that arrived together with the handshakes go first, through the same tracking.
        if !client_early.is_empty() {
            let mut buf = vec![0u8; FILTER_HEADROOM + client_early.len()];
            buf[FILTER_HEADROOM..].copy_from_slice(client_early);
            let end = buf.len();
            let (a, b) = relay.filter.filter(
                &mut buf,
                FILTER_HEADROOM,
                end,
                &mut tell(&mut relay.observer),
            );
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

    /// Relays until either side ends or `abort` completes. `count(from_client, to_client)`
    /// gets the bytes moved since its last call, at every ping tick and at the end.
    pub async fn run(
        mut self,
        settings: &RelaySettings,
        mut count: impl FnMut(u64, u64),
        abort: impl Future<Output = ()>,
    ) -> RelayEnd {
        self.ping_payload = settings.ping_payload;
        self.filter.set_payload(settings.ping_payload);
        let period = settings.ping_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut missed = 0u32;
        let mut awaiting_pong = false;
        // Once one side has closed, the other gets `close_linger` to follow before it is closed.
        let mut linger: Option<Instant> = None;
        tokio::pin!(abort);
        let ended = loop {
            let lingering = linger.is_some();
            let linger_over = async {
                match linger {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            // `biased`: no random start per poll (every message wakes this loop); the relay
            // never stays ready (it moves bytes until both sides would block), so nothing
            // starves.
            tokio::select! {
                biased;
                result = std::future::poll_fn(|cx| self.poll_relay(cx, lingering)) => match result {
                    Ok(Progress::BothClosed) => break RelayEnd::Closed,
                    Ok(Progress::OneClosed) => linger = Some(Instant::now() + settings.close_linger),
                    Err(e) => break RelayEnd::Failed(e),
                },
                () = linger_over => break RelayEnd::Closed,
                _ = ticker.tick() => {
                    self.take_counts(&mut count);
                    if self.client_seen {
                        missed = 0;
                        awaiting_pong = false;
                    } else if awaiting_pong {
                        missed += 1;
                        if missed >= settings.max_missed_pongs {
                            break RelayEnd::DeadClient { missed };
                        }
                    }
                    if !self.client_seen {
                        self.ping_due = true;
                        awaiting_pong = true;
                    }
                    self.client_seen = false;
                }
                () = &mut abort => break RelayEnd::Aborted,
            }
        };
        self.take_counts(&mut count);
        match &ended {
            RelayEnd::Closed => tracing::debug!("websocket closed"),
            RelayEnd::Failed(e) => tracing::debug!(error = %e, "websocket ended with an error"),
            RelayEnd::DeadClient { missed } => {
                tracing::info!(
                    missed,
                    "websocket client stopped answering pings: closing its connection"
                );
                self.say_going_away().await;
            }
            RelayEnd::Aborted => tracing::debug!("websocket closed by the caller"),
        }
        ended
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
            let observer = &mut self.observer;
            let mut relayed = 0;
            let n = with_scratch(|buf| -> Poll<io::Result<usize>> {
                let mut read = ReadBuf::new(&mut buf[FILTER_HEADROOM..]);
                ready!(Pin::new(&mut *client).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                let (a, b) = filter.filter(
                    buf,
                    FILTER_HEADROOM,
                    FILTER_HEADROOM + n,
                    &mut tell(observer),
                );
                relayed = b - a;
                pump.write_through(cx, upstream, &buf[a..b])?;
                Poll::Ready(Ok(n))
            });
            let n = ready!(n)?;
            if n == 0 {
                pump.eof = true;
                continue;
            }
            if crate::mutants::hears_client(relayed) {
                self.client_seen = true;
            }
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
                pump.write_through(cx, &mut self.client, &ping_frame(&self.ping_payload))?;
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

    fn take_counts(&mut self, count: &mut impl FnMut(u64, u64)) {
        let from_client = std::mem::take(&mut self.to_upstream.bytes);
        let to_client = std::mem::take(&mut self.to_client.bytes);
        if from_client > 0 || to_client > 0 {
            count(from_client, to_client);
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
