//! The trace parser (core/src/trace.rs): any input is a trace or an error, and a trace it
//! accepts reads back the same after being written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawner_core::trace::Trace;

fuzz_target!(|data: &[u8]| {
    let Ok(trace) = Trace::read(data) else {
        return;
    };
    let mut written = Vec::new();
    trace.write(&mut written).expect("writing to memory");
    let again = Trace::read(written.as_slice()).expect("a written trace reads back");
    assert_eq!(again.keys(), trace.keys());
});
