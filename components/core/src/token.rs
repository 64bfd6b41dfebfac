//! The token that protects a sidecar's event stream.
//!
//! A backend's users must not be able to read or forge its idleness, so `/_spawner/events`
//! requires a token. The controller (which builds the sidecar's environment) and the sweeper
//! (which subscribes) derive it from a secret they share and the backend's uid, so it is
//! stable across reconciles and restarts, differs for every backend, and is never stored.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The events token of the backend with `uid`.
pub fn events_token(secret: &[u8], uid: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"spawner-events-token/v1\0");
    mac.update(uid.as_bytes());
    let digest = mac.finalize().into_bytes();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two tokens in time independent of where they differ.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    bytes_match(expected.as_bytes(), given.as_bytes())
}

/// Compares two byte strings in time independent of where they differ (the length is not
/// secret): the one constant-time comparison every component uses for secrets.
pub fn bytes_match(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_stable_per_uid_and_secret() {
        let a = events_token(b"secret", "uid-1");
        assert_eq!(a, events_token(b"secret", "uid-1"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, events_token(b"secret", "uid-2"));
        assert_ne!(a, events_token(b"other", "uid-1"));
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert!(!tokens_match("abc", ""));
    }
}
