//! The router's reading of a request's Host header and path, in host and path mode: never a
//! panic, and a routed request never leaves its backend (no `..`, encoded slash or backslash,
//! NUL in what is forwarded; the path forwarded is origin form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawner_router::route::{Mode, check_path, host_name, route};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (host, path) = text.split_once('\n').unwrap_or((&text, "/"));
    let _ = host_name(host);
    let _ = check_path(path);
    let modes = [
        Mode::Host {
            domain: "rooms.example".into(),
        },
        Mode::Path {
            prefix: "b".into(),
        },
    ];
    for mode in &modes {
        if let Ok(target) = route(mode, Some(host), path) {
            assert!(
                target.path_and_query.starts_with('/'),
                "not origin form: {target:?}"
            );
            assert!(
                check_path(&target.path_and_query).is_ok(),
                "a forwarded path fails the router's own check: {target:?}"
            );
            assert!(!target.backend.is_empty(), "{target:?}");
        }
    }
});
