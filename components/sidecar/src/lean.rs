//! A lean HTTP/1.1 client for the common case: requests without a body.
//!
//! hyper's client hands every request and every body chunk between the caller and its
//! connection task through channels, which costs several wake-ups per request. For a bodyless
//! request the exchange is simple enough to do inline: write the head, parse the response head
//! with `httparse`, and hand a small response over whole (or stream a large one straight from
//! the socket). Requests with a body keep using hyper's client.

use std::cell::Cell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::Connect;
use crate::body::BoxError;
use crate::proxy::{
    ClientConn, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, is_hop_by_hop,
};

/// Largest response head accepted from the application.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
const READ_CHUNK: usize = 8 * 1024;

/// A keep-alive connection to the application.
pub(crate) struct LeanConn<Io> {
    io: Io,
    buf: BytesMut,
}

#[derive(Debug)]
pub(crate) enum LeanError {
    Connect(io::Error),
    /// Reading or writing the connection failed before a whole response head arrived.
    Io(io::Error),
    Protocol(&'static str),
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The response body, read from the connection as the client takes it.
pub(crate) struct LeanBody<C: Connect> {
    conn: Option<LeanConn<C::Io>>,
    owner: Arc<ClientConn<C>>,
    state: BodyState,
    keep_alive: bool,
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Done,
}

pub(crate) enum LeanResponse<C: Connect> {
    /// The whole body was already read.
    Whole(http::response::Parts, Bytes),
    Streaming(http::response::Parts, LeanBody<C>),
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request head as the application gets it: origin-form target, hop-by-hop headers left out
/// and `X-Forwarded-*` added, written in one pass instead of editing the header map. The result
/// is the head of `proxy::prepare_request_headers(.., websocket: false)` applied to the map (up
/// to the order of fields with different names, which carries no meaning; the tests compare).
fn encode_head(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    peer_ip: &HeaderValue,
    head: &mut Vec<u8>,
) {
    fn field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.clear();
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    let target = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");

    // Headers named by `Connection` are hop-by-hop too (rare: only when one is there).
    let named: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let forwarded = |name: &HeaderName| !is_hop_by_hop(name) && !named.contains(name);
    let mut has_for = false;
    let mut has_proto = false;
    let mut has_host = false;
    let mut host: Option<&HeaderValue> = None;
    for name in headers.keys() {
        if !forwarded(name) {
            continue;
        }
        let mut values = headers.get_all(name).iter();
        if *name == X_FORWARDED_FOR {
            // One field: the first value with the client appended (the others are replaced).
            has_for = true;
            match values.next().and_then(|v| v.to_str().ok()) {
                Some(existing) if !existing.trim().is_empty() => {
                    head.extend_from_slice(b"x-forwarded-for: ");
                    head.extend_from_slice(existing.as_bytes());
                    head.extend_from_slice(b", ");
                    head.extend_from_slice(peer_ip.as_bytes());
                    head.extend_from_slice(b"\r\n");
                }
                _ => field(head, b"x-forwarded-for", peer_ip.as_bytes()),
            }
            continue;
        }
        if *name == X_FORWARDED_PROTO {
            has_proto = true;
        } else if *name == X_FORWARDED_HOST {
            has_host = true;
        } else if *name == header::HOST {
            host = headers.get(name);
        }
        for value in values {
            field(head, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !has_for {
        field(head, b"x-forwarded-for", peer_ip.as_bytes());
    }
    if !has_proto {
        field(head, b"x-forwarded-proto", b"http");
    }
    if !has_host && let Some(host) = host {
        field(head, b"x-forwarded-host", host.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
}

/// Sends a bodyless request over the client connection's kept connection (or a new one).
pub(crate) async fn exchange<C: Connect, B>(
    owner: &Arc<ClientConn<C>>,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> Result<LeanResponse<C>, LeanError> {
    if let Some(conn) = owner.take_lean() {
        match exchange_on(owner, conn, req, peer_ip).await {
            Ok(response) => return Ok(response),
            // A kept connection the application closed while idle: nothing was answered, so an
            // idempotent request goes again on a fresh connection.
            Err(LeanError::Io(e)) if is_idempotent(req.method()) => {
                tracing::trace!(error = %e, "kept upstream connection failed; redialling");
            }
            Err(e) => return Err(e),
        }
    }
    let io = owner
        .shared
        .connector
        .connect(&owner.shared.config.upstream)
        .await
        .map_err(LeanError::Connect)?;
    let conn = LeanConn {
        io,
        buf: BytesMut::new(),
    };
    exchange_on(owner, conn, req, peer_ip).await
}

thread_local! {
    /// The buffer request heads are encoded into, reused by every request of the thread: taken
    /// while a head is written (a write that has to wait keeps it; another request meanwhile
    /// uses a new one).
    static HEAD_SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A head buffer larger than this (a request with huge headers) is not kept for reuse.
const MAX_SCRATCH_HEAD: usize = 16 * 1024;

async fn write_head<Io: AsyncWrite + Unpin, B>(
    io: &mut Io,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> io::Result<()> {
    let mut head = HEAD_SCRATCH.take();
    encode_head(req.method(), req.uri(), req.headers(), peer_ip, &mut head);
    let written = io.write_all(&head).await;
    if head.capacity() <= MAX_SCRATCH_HEAD {
        HEAD_SCRATCH.set(head);
    }
    written
}

async fn exchange_on<C: Connect, B>(
    owner: &Arc<ClientConn<C>>,
    mut conn: LeanConn<C::Io>,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> Result<LeanResponse<C>, LeanError> {
    write_head(&mut conn.io, req, peer_ip)
        .await
        .map_err(LeanError::Io)?;
    let method = req.method();
    loop {
        if let Some((parts, head_len, framing, keep_alive)) = parse_head(&conn.buf, method)? {
            conn.buf.advance(head_len);
            if parts.status.is_informational() {
                continue;
            }
            if let Framing::Length(n) = framing
                && (conn.buf.len() as u64) >= n
            {
                let body = conn.buf.split_to(n as usize).freeze();
                if keep_alive && conn.buf.is_empty() {
                    owner.keep_lean(conn);
                }
                return Ok(LeanResponse::Whole(parts, body));
            }
            let state = match framing {
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::ChunkSize,
                Framing::UntilClose => BodyState::UntilClose,
            };
            let body = LeanBody {
                conn: Some(conn),
                owner: Arc::clone(owner),
                state,
                keep_alive,
            };
            return Ok(LeanResponse::Streaming(parts, body));
        }
        if conn.buf.len() > MAX_RESPONSE_HEAD {
            return Err(LeanError::Protocol("response head too large"));
        }
        conn.buf.reserve(READ_CHUNK);
        let n = conn
            .io
            .read_buf(&mut conn.buf)
            .await
            .map_err(LeanError::Io)?;
        if n == 0 {
            return Err(LeanError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

type Head = (http::response::Parts, usize, Framing, bool);

fn parse_head(buf: &[u8], method: &Method) -> Result<Option<Head>, LeanError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised: zeroing 128 headers (4 KiB) cost more than parsing a small head.
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(LeanError::Protocol("malformed response head")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(LeanError::Protocol("bad status"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut map = HeaderMap::with_capacity(response.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut has_transfer_encoding = false;
    let mut close = version == Version::HTTP_10;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| LeanError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| LeanError::Protocol("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(LeanError::Protocol("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(LeanError::Protocol("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            has_transfer_encoding = true;
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONNECTION
            && let Ok(v) = value.to_str()
        {
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        map.append(name, value);
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if has_transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let keep_alive = !close && framing != Framing::UntilClose;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    Ok(Some((parts, head_len, framing, keep_alive)))
}

impl<C: Connect> LeanBody<C> {
    /// Reads more from the connection into its buffer; `Ok(0)` at end of stream.
    fn poll_fill(conn: &mut LeanConn<C::Io>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut tmp = [0u8; 16 * 1024];
        let mut read = ReadBuf::new(&mut tmp);
        ready!(Pin::new(&mut conn.io).poll_read(cx, &mut read))?;
        let filled = read.filled();
        conn.buf.extend_from_slice(filled);
        Poll::Ready(Ok(filled.len()))
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.owner.keep_lean(conn);
        }
    }
}

fn protocol(message: &'static str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, message))
}

impl<C: Connect> Body for LeanBody<C> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("response body cut short"))));
                        }
                    }
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    this.state = BodyState::Length(left - take as u64);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::UntilClose => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            this.finish();
                            return Poll::Ready(None);
                        }
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::ChunkSize | BodyState::ChunkDataEnd | BodyState::Trailers => {
                    let Some(line_end) = conn.buf.windows(2).position(|w| w == b"\r\n") else {
                        if conn.buf.len() > 4096 {
                            return Poll::Ready(Some(Err(protocol("chunk line too long"))));
                        }
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("chunked body cut short"))));
                        }
                        continue;
                    };
                    let line = conn.buf.split_to(line_end + 2);
                    let line = &line[..line_end];
                    match this.state {
                        BodyState::ChunkSize => {
                            let size = std::str::from_utf8(line)
                                .ok()
                                .map(|l| l.split(';').next().unwrap_or("").trim())
                                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
                            this.state = match size {
                                Some(0) => BodyState::Trailers,
                                Some(n) => BodyState::ChunkData(n),
                                None => {
                                    return Poll::Ready(Some(Err(protocol("bad chunk size"))));
                                }
                            };
                        }
                        BodyState::ChunkDataEnd => {
                            if !line.is_empty() {
                                return Poll::Ready(Some(Err(protocol("bad chunk end"))));
                            }
                            this.state = BodyState::ChunkSize;
                        }
                        _ => {
                            // Trailers are dropped (hop-by-hop for this proxy); a blank line ends.
                            if line.is_empty() {
                                this.finish();
                                return Poll::Ready(None);
                            }
                        }
                    }
                }
                BodyState::ChunkData(left) => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("chunked body cut short"))));
                        }
                    }
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    let left = left - take as u64;
                    this.state = if left == 0 {
                        BodyState::ChunkDataEnd
                    } else {
                        BodyState::ChunkData(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: Method) -> (StatusCode, Framing, bool, usize) {
        let (parts, len, framing, keep_alive) = parse_head(text.as_bytes(), &method)
            .expect("valid")
            .expect("complete");
        (parts.status, framing, keep_alive, len)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let r = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            head(r, Method::GET),
            (StatusCode::OK, Framing::Length(5), true, r.len() - 5)
        );
        assert_eq!(head(r, Method::HEAD).1, Framing::Length(0));
        let r = "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::Chunked);
        let r = "HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::Length(0));
        let r = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::UntilClose);
        assert!(
            !head(r, Method::GET).2,
            "a close-delimited body ends the connection"
        );
        let r = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(!head(r, Method::GET).2);
        let r = "HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(!head(r, Method::GET).2);
        let r = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n";
        assert!(head(r, Method::GET).2);
    }

    #[test]
    fn partial_and_broken_heads() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET),
            Ok(None)
        ));
        assert!(parse_head(b"garbage\r\n\r\n", &Method::GET).is_err());
        let conflicting = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n";
        assert!(parse_head(conflicting, &Method::GET).is_err());
    }

    fn encoded(parts: &http::request::Parts, peer_ip: &'static str) -> String {
        let mut head = Vec::new();
        encode_head(
            &parts.method,
            &parts.uri,
            &parts.headers,
            &HeaderValue::from_static(peer_ip),
            &mut head,
        );
        String::from_utf8(head).expect("ascii")
    }

    #[test]
    fn request_heads_are_origin_form_with_forwarded_headers() {
        let (parts, ()) = http::Request::get("http://x/a?b=c")
            .header("host", "x")
            .header("x-y", "z")
            .header("connection", "keep-alive, x-secret")
            .header("keep-alive", "timeout=5")
            .header("x-secret", "1")
            .header("te", "trailers")
            .body(())
            .expect("request")
            .into_parts();
        assert_eq!(
            encoded(&parts, "10.1.2.3"),
            "GET /a?b=c HTTP/1.1\r\nhost: x\r\nx-y: z\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: x\r\n\r\n"
        );
        let (parts, ()) = http::Request::get("/")
            .header("x-forwarded-for", "1.1.1.1")
            .header("x-forwarded-for", "2.2.2.2")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "front")
            .header("host", "x")
            .body(())
            .expect("request")
            .into_parts();
        assert_eq!(
            encoded(&parts, "10.1.2.3"),
            "GET / HTTP/1.1\r\nx-forwarded-for: 1.1.1.1, 10.1.2.3\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: front\r\nhost: x\r\n\r\n"
        );
    }

    /// The head written by the proxy before the one-pass encoder: `prepare_request_headers`
    /// applied to the map, then every field written out.
    fn reference_head(parts: &http::request::Parts, peer_ip: &'static str) -> String {
        let mut headers = parts.headers.clone();
        crate::proxy::prepare_request_headers(
            &mut headers,
            &HeaderValue::from_static(peer_ip),
            false,
        );
        let target = crate::proxy::origin_form(&parts.uri);
        let mut head = format!("{} {} HTTP/1.1\r\n", parts.method, target);
        for (name, value) in &headers {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().expect("ascii")));
        }
        head + "\r\n"
    }

    /// Field order between different names carries no meaning (RFC 9110 §5.3) and `HeaderMap`
    /// reorders on removal; the order of one name's values does, so the sort is stable.
    fn normalized(head: &str) -> (String, Vec<(String, String)>) {
        let mut lines = head
            .strip_suffix("\r\n\r\n")
            .expect("end of head")
            .split("\r\n");
        let start = lines.next().expect("request line").to_owned();
        let mut fields: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("field");
                (n.to_owned(), v.to_owned())
            })
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        (start, fields)
    }

    proptest::proptest! {
        #[test]
        fn one_pass_head_matches_editing_the_map(
            fields in proptest::collection::vec((0usize..14, 0usize..8), 0..12),
            absolute in proptest::bool::ANY,
        ) {
            const NAMES: [&str; 14] = [
                "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                "connection", "keep-alive", "te", "upgrade", "transfer-encoding",
                "proxy-authorization", "x-secret", "accept", "trailer", "proxy-connection",
            ];
            const VALUES: [&str; 8] = [
                "a", "", "  ", "1.1.1.1", "keep-alive, x-secret", "close", "x-forwarded-for",
                "host, x-forwarded-proto",
            ];
            let uri = if absolute { "http://example.com/p?q=1" } else { "/p?q=1" };
            let mut builder = http::Request::get(uri);
            for (n, v) in fields {
                builder = builder.header(NAMES[n], VALUES[v]);
            }
            let (parts, ()) = builder.body(()).expect("request").into_parts();
            proptest::prop_assert_eq!(
                normalized(&encoded(&parts, "127.0.0.9")),
                normalized(&reference_head(&parts, "127.0.0.9"))
            );
        }
    }
}
