//! The header policy of a reverse proxy in front of one application:
//! - hop-by-hop fields (RFC 9110 §7.6.1) never cross the proxy: the fixed list, the fields a
//!   `Connection` header names, `Connection` itself and `Upgrade` (the WebSocket path writes its
//!   own `Connection: upgrade` / `Upgrade`);
//! - `X-Forwarded-For` gets the client's address appended to the first client-sent value (other
//!   client-sent copies are replaced by that one field); `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are kept when a proxy in front already set them, else written
//!   (`http`/`ws`, the `Host`);
//! - the request target goes upstream in origin form (path and query).
//!
//! [`forward_request_headers`] applies the policy to a header map (requests hyper's client
//! sends, WebSocket handshakes); [`encode_forwarded_head`] writes the same head in one pass for
//! the bodyless client, without editing a map. The tests check that both agree.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The request target as the application should see it: path and query only.
pub fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `name` is removed by [`remove_hop_by_hop`] whatever `Connection` says: the fixed
/// hop-by-hop headers, `Upgrade`, and `Connection` itself.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by `Connection`, and
/// `Upgrade` (re-added by the WebSocket path where it belongs).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine removals, each
    // hashing its name. Headers named by `Connection` only go when a `Connection` is there.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Hop-by-hop headers removed and `X-Forwarded-*` set. `X-Forwarded-For` gets the client's
/// address appended; `-Proto` and `-Host` are kept when a proxy in front already set them.
pub fn forward_request_headers(headers: &mut HeaderMap, peer_ip: &HeaderValue, websocket: bool) {
    remove_hop_by_hop(headers);
    let appended = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => {
            let ip = peer_ip.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{existing}, {ip}")).ok()
        }
        _ => Some(peer_ip.clone()),
    };
    if let Some(value) = appended {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        let proto = if websocket { "ws" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// The request head as the application gets it: origin-form target, hop-by-hop headers left out
/// and `X-Forwarded-*` added, written in one pass instead of editing the header map. The result
/// is the head of [`forward_request_headers`]`(.., websocket: false)` applied to the map (up
/// to the order of fields with different names, which carries no meaning; the tests compare).
pub fn encode_forwarded_head(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_forwarded_headers_come() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        forward_request_headers(&mut h, &HeaderValue::from_static("127.0.0.2"), false);
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TE).is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn hop_by_hop_names_are_the_removed_ones() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [header::HOST, header::CONTENT_LENGTH, X_FORWARDED_FOR] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
        // Nothing hop-by-hop: the map is left alone; a `Connection` naming others removes them.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("x"));
        h.insert("x-a", HeaderValue::from_static("1"));
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert(header::CONNECTION, HeaderValue::from_static("x-a"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::HOST], "x");
    }

    #[test]
    fn absolute_targets_become_origin_form() {
        let uri: Uri = "http://example.com/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&uri), "/a/b?c=d");
        let uri: Uri = "/x?y".parse().unwrap();
        assert_eq!(origin_form(&uri), "/x?y");
    }

    fn encoded(parts: &http::request::Parts, peer_ip: &'static str) -> String {
        let mut head = Vec::new();
        encode_forwarded_head(
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

    /// The head written by the proxy before the one-pass encoder: `forward_request_headers`
    /// applied to the map, then every field written out.
    fn reference_head(parts: &http::request::Parts, peer_ip: &'static str) -> String {
        let mut headers = parts.headers.clone();
        forward_request_headers(&mut headers, &HeaderValue::from_static(peer_ip), false);
        let target = origin_form(&parts.uri);
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
