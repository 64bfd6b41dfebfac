//! localcluster's admission of a written object: any JSON body, checked as each stored type
//! the way a create or update is (`decode::check`), answers or refuses with an API error,
//! never a panic (the server's panics on bad Services, Namespaces and grace periods came from
//! here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spawner_localcluster::{decode, resources};

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let Ok(object) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let types = resources::all();
    let kind = usize::from(first) % types.len();
    let _ = decode::check(kind, &types[kind], &object);
    if let Some(grace) = object.as_i64() {
        let _ = decode::check_delete_grace(Some(grace));
    }
});
