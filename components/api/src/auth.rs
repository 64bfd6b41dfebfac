//! Bearer-token authentication for the routes that start, stop or list backends.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::routes::SharedState;

/// The accepted tokens, kept only as SHA-256 digests: comparing digests of equal length in
/// constant time reveals neither a token's content nor its length through timing.
#[derive(Clone, Default)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl TokenSet {
    /// The set of the non-empty `tokens` (surrounding whitespace is ignored).
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Self {
        let digests = tokens
            .iter()
            .map(|t| t.as_ref().trim())
            .filter(|t| !t.is_empty())
            .map(digest)
            .collect();
        Self { digests }
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `given` is one of the tokens. Every token is compared, so the time taken does not
    /// depend on which one matched.
    pub fn contains(&self, given: &str) -> bool {
        let given = digest(given);
        self.digests.iter().fold(false, |found, expected| {
            found | spawner_core::token::bytes_match(expected, &given)
        })
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token from an `Authorization: Bearer <token>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// Proof that the request carried an accepted bearer token (or that the api runs without
/// authentication). Taken by every handler that starts, stops or lists backends; as a parts
/// extractor it runs before the body is read.
pub struct Authenticated;

impl FromRequestParts<SharedState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let config = &state.config;
        if config.tokens.is_empty() && config.allow_unauthenticated {
            return Ok(Authenticated);
        }
        let Some(header) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::unauthorized("missing bearer token"));
        };
        let token = header
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or_else(|| ApiError::unauthorized("malformed Authorization header"))?;
        if config.tokens.contains(token) {
            Ok(Authenticated)
        } else {
            Err(ApiError::unauthorized("invalid bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_tokens_match() {
        let set = TokenSet::new(&["alpha", " beta ", ""]);
        assert_eq!(set.len(), 2);
        assert!(set.contains("alpha"));
        assert!(set.contains("beta"));
        assert!(!set.contains("alph"));
        assert!(!set.contains("alphaa"));
        assert!(!set.contains(""));
        assert!(!TokenSet::default().contains(""));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
