//! localcluster's patches on arbitrary JSON: a document and a patch (the input's two JSON
//! values, split at its first NUL). Never a panic; a JSON merge patch (RFC 7386) applied twice
//! gives what it gave once; a strategic merge patch and a JSON patch answer or refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spawner_localcluster::patch::{json_patch, merge_patch, strategic_merge_patch};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let (Some(doc), Some(patch)) = (parts.next(), parts.next()) else {
        return;
    };
    let (Ok(doc), Ok(patch)) = (
        serde_json::from_slice::<Value>(doc),
        serde_json::from_slice::<Value>(patch),
    ) else {
        return;
    };
    let mut once = doc.clone();
    merge_patch(&mut once, &patch);
    let mut twice = once.clone();
    merge_patch(&mut twice, &patch);
    assert_eq!(once, twice, "a merge patch is not idempotent");

    let mut strategic = doc.clone();
    strategic_merge_patch(&mut strategic, &patch);

    let mut patched = doc;
    let _ = json_patch(&mut patched, &patch);
});
