//! The token that protects a sidecar's event stream.
//!
//! A backend's users must not be able to read or forge its idleness, so `/_spawner/events`
//! requires a token. The controller (which builds the sidecar's environment) and the sweeper
//! (which subscribes) derive it from a secret they share and the backend's uid, so it is
//! stable across reconciles and restarts, differs for every backend, and is never stored.
//!
//! The sidecar is not given the token itself: its pod spec carries a [`token_check`], the
//! token's SHA-256 digest, so whoever can read pods (or the pod's own application, through the
//! API or a shared process namespace) learns nothing that opens the event stream or the seal.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Prefix of a token check that is a digest rather than the token itself.
pub const DIGEST_PREFIX: &str = "sha256:";

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

/// The placeholder `deploy/base` ships for every secret, which an installation must replace.
pub const PLACEHOLDER_SECRET: &str = "CHANGE-ME";

/// Refuses a secret nobody may run with: empty, or the placeholder. `what` names it in the
/// message.
pub fn check_secret(what: &str, secret: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(secret);
    if text.trim().is_empty() {
        return Err(format!("the {what} is empty; configure a random one"));
    }
    if text.trim().eq_ignore_ascii_case(PLACEHOLDER_SECRET) {
        return Err(format!(
            "the {what} is the {PLACEHOLDER_SECRET:?} placeholder from deploy/base; replace it with a random one (docs/operations.md)"
        ));
    }
    Ok(())
}

/// What the sidecar is configured with to check `token`: `sha256:` and the hex digest.
pub fn token_check(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{DIGEST_PREFIX}{hex}")
}

/// Whether `given` passes `check`: a [`token_check`] digest, or (in development and tests) the
/// token itself.
pub fn check_token(check: &str, given: &str) -> bool {
    if check.starts_with(DIGEST_PREFIX) {
        tokens_match(check, &token_check(given))
    } else {
        tokens_match(check, given)
    }
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
    fn a_check_does_not_contain_the_token_and_accepts_only_it() {
        let token = events_token(b"secret", "uid-1");
        let check = token_check(&token);
        assert!(!check.contains(&token));
        assert!(check_token(&check, &token));
        assert!(!check_token(&check, &events_token(b"secret", "uid-2")));
        assert!(!check_token(&check, &check));
        assert!(check_token("plain", "plain"));
        assert!(!check_token("plain", "other"));
    }

    #[test]
    fn empty_and_placeholder_secrets_are_refused() {
        assert!(check_secret("events secret", b"").is_err());
        assert!(check_secret("events secret", b"  ").is_err());
        assert!(check_secret("events secret", b"CHANGE-ME").is_err());
        assert!(check_secret("events secret", b"change-me\n").is_err());
        assert!(check_secret("events secret", b"9f2c6d1e-random").is_ok());
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert!(!tokens_match("abc", ""));
    }
}
