//! The api's request JSON: a `/spawn` or `/connect` body, parsed as the api parses it and
//! turned into a backend spec under the default limits. Never a panic: an answer or a 4xx
//! error naming the fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawner_api::extract::parse_json;
use spawner_api::model::SpawnRequest;
use spawner_core::validation::Limits;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_json::<SpawnRequest>(data) else {
        return;
    };
    if let Err(e) = request.to_spec(&Limits::default()) {
        let status = axum::response::IntoResponse::into_response(e).status();
        assert!(status.is_client_error(), "a request refused with {status}");
    }
});
