//! The sidecar's request-head handling: a client's raw head, read as hyper reads it
//! (httparse), then written for the application in one pass by `encode_forwarded_head`. Never a
//! panic; what it writes parses back as a complete head with the same method and target, and
//! carries exactly the fields `forward_request_headers` leaves in the map.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use spawner_proxy::headers::{encode_forwarded_head, forward_request_headers};

fuzz_target!(|data: &[u8]| {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = request.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), path.parse::<Uri>()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for field in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    let peer = HeaderValue::from_static("192.0.2.7");
    let mut head = Vec::new();
    encode_forwarded_head(&method, &uri, &headers, &peer, &mut head);

    let mut fields = [httparse::EMPTY_HEADER; 80];
    let mut written = httparse::Request::new(&mut fields);
    let parsed = written.parse(&head);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()),
        "the written head does not parse back whole: {parsed:?}\n{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(written.method, Some(method.as_str()));
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    assert_eq!(written.path, Some(target));
    let mut got = HeaderMap::new();
    for field in written.headers.iter() {
        got.append(
            HeaderName::from_bytes(field.name.as_bytes()).expect("a name it wrote"),
            HeaderValue::from_bytes(field.value).expect("a value it wrote"),
        );
    }
    let mut expected = headers;
    forward_request_headers(&mut expected, &peer, false);
    assert_eq!(got, expected, "the one-pass head differs from the edited map");
});
