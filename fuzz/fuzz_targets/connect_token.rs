//! Connect and session tokens as the router reads them: any string is checked without a
//! panic, and only what the ring signed is believed. The input's first byte picks a purpose;
//! the rest is tried as a token, and also signed as claims that must verify back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawner_core::connect_token::{
    Claims, KeyRing, Purpose, SigningKey, sign, verify_signature,
};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let purpose = if first & 1 == 0 {
        Purpose::Connect
    } else {
        Purpose::Session
    };
    let key = SigningKey::new("k1", b"fuzz-secret-of-enough-length-0123456789", false)
        .expect("a valid key");
    let ring = KeyRing::new(vec![key]).expect("a valid ring");
    let text = String::from_utf8_lossy(rest);
    // Anything at all: an answer, never a panic; never accepted unless it was signed.
    if let Ok(claims) = verify_signature(&ring, purpose, &text) {
        let again = sign(&ring, purpose, &claims).expect("what verifies can be signed");
        assert_eq!(
            verify_signature(&ring, purpose, &again).ok(),
            Some(claims),
            "a re-signed token reads back differently"
        );
    }
    // The same bytes as claims: signed, they verify to exactly those claims.
    let mut parts = text.splitn(2, '\n');
    let backend = parts.next().unwrap_or_default().to_string();
    let user = parts.next().map(str::to_string);
    let claims = Claims {
        backend,
        expires_at: u64::from(first) << 24,
        user,
    };
    if let Ok(token) = sign(&ring, purpose, &claims) {
        assert_eq!(
            verify_signature(&ring, purpose, &token).ok(),
            Some(claims),
            "a signed token does not verify to its claims"
        );
    }
});
