//! The sidecar's WebSocket frame parsing (proxy's `frames.rs`): a client → application stream,
//! split as reads would split it, through the filter that removes the pongs answering the
//! sidecar's pings. Never a panic; the split changes nothing forwarded or reported; the filter
//! and the frame cursor agree on frame boundaries (`spawner_proxy::frames::fuzz_client_stream`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spawner_proxy::frames::fuzz_client_stream(data));
