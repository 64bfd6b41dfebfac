//! The sidecar event protocol as the sweeper reads it: bytes split at an arbitrary point into
//! the SSE parser, each message decoded as a sidecar event. Nothing may panic, and splitting
//! the input must not change the messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawner_core::state_stream::{StateMessage, SseParser};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(bytes.len());
    let mut whole = SseParser::with_max_line(4096);
    let mut parts = SseParser::with_max_line(4096);
    let all = whole.push(bytes);
    let mut pieces = parts.push(&bytes[..at]);
    if let Ok(first) = &mut pieces {
        match parts.push(&bytes[at..]) {
            Ok(rest) => first.extend(rest),
            Err(e) => pieces = Err(e),
        }
    }
    if let (Ok(all), Ok(pieces)) = (&all, &pieces) {
        assert_eq!(all, pieces, "splitting the input changed the messages");
    }
    for message in all.iter().flatten() {
        let _ = StateMessage::from_message(message);
    }
});
