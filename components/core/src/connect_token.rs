//! Connect tokens: what lets a browser through the router into exactly one backend.
//!
//! The api signs a **connect token** when it answers `/spawn` or `/connect`; the router verifies
//! it, and on first use swaps it for a **session token** in a cookie (same format, another
//! purpose, a longer life), so the connect token does not stay in history or referrers. Both
//! are signed with HMAC-SHA256 under a key shared by api and router; several keys are accepted
//! so keys can be rotated (the first signs, all verify).
//!
//! Format (every character is URL-safe, so a token needs no escaping in a query string or a
//! cookie):
//!
//! ```text
//! <version>.<key id>.<backend>.<expires>.<user>.<mac>
//! ```
//!
//! - `version`: `ct1` (connect token) or `cs1` (session token); a token of one purpose never
//!   passes as the other, since the version is also under the MAC.
//! - `key id`: 1-32 of `[A-Za-z0-9_-]`, names the key that signed it.
//! - `backend`: the backend's name (a DNS label, so it has no dot).
//! - `expires`: Unix time in seconds after which the token is refused.
//! - `user`: the user identity given to the api, base64url without padding (empty: none).
//! - `mac`: base64url (no padding) of HMAC-SHA256 over everything before the last dot.
//!
//! Parsing and checking are pure functions (no clock, no I/O) so they can be fuzzed.

mod args;

pub use args::ConnectKeyArgs;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Query parameter that carries a connect token in a URL.
pub const QUERY_PARAM: &str = "spawner_token";

/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 32;
/// Longest user identity, in bytes.
pub const MAX_USER_LEN: usize = 256;
/// Longest token accepted; anything longer is refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Shortest secret accepted outside local development.
pub const MIN_SECRET_LEN: usize = 16;
/// Default lifetime of a connect token (until its first use).
pub const DEFAULT_CONNECT_TTL_SECONDS: u64 = 300;
/// Default lifetime of the session cookie the router sets on first use.
pub const DEFAULT_SESSION_TTL_SECONDS: u64 = 12 * 3600;

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Handed out by the api, used once to enter.
    Connect,
    /// Set by the router as a cookie after a connect token was accepted.
    Session,
}

impl Purpose {
    fn version(self) -> &'static str {
        match self {
            Purpose::Connect => "ct1",
            Purpose::Session => "cs1",
        }
    }
}

/// One signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key is written `<id>:<secret>`; {0:?} has no `:`")]
    NoId(String),
    #[error("key id {0:?} must be 1-32 of A-Z, a-z, 0-9, `_` and `-`")]
    BadId(String),
    #[error("key {0:?} has an empty secret")]
    EmptySecret(String),
    #[error("key {0:?} has a secret shorter than {MIN_SECRET_LEN} bytes")]
    ShortSecret(String),
    #[error("key id {0:?} is given twice")]
    DuplicateId(String),
    #[error("no signing key is configured")]
    NoKeys,
}

impl SigningKey {
    /// A key with `id` and `secret`; the secret may be short only when `allow_weak` (local
    /// development).
    pub fn new(id: &str, secret: &[u8], allow_weak: bool) -> Result<Self, KeyError> {
        if !is_key_id(id) {
            return Err(KeyError::BadId(id.to_string()));
        }
        if secret.is_empty() {
            return Err(KeyError::EmptySecret(id.to_string()));
        }
        if secret.len() < MIN_SECRET_LEN && !allow_weak {
            return Err(KeyError::ShortSecret(id.to_string()));
        }
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_vec(),
        })
    }

    /// Parses `<id>:<secret>`.
    pub fn parse(text: &str, allow_weak: bool) -> Result<Self, KeyError> {
        let Some((id, secret)) = text.split_once(':') else {
            // Never echo what may be a secret: only its length.
            return Err(KeyError::NoId(format!("<{} bytes>", text.len())));
        };
        Self::new(id, secret.as_bytes(), allow_weak)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }
}

/// The keys shared by the api and the router: the first signs, every one verifies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<SigningKey>,
}

impl KeyRing {
    /// A ring of `keys`, the signing key first; refuses an empty list and repeated ids.
    pub fn new(keys: Vec<SigningKey>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(KeyError::DuplicateId(key.id.clone()));
            }
        }
        Ok(Self { keys })
    }

    /// Parses `<id>:<secret>` entries (the first signs).
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = &'a str>,
        allow_weak: bool,
    ) -> Result<Self, KeyError> {
        let keys = entries
            .into_iter()
            .filter(|e| !e.is_empty())
            .map(|e| SigningKey::parse(e, allow_weak))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys)
    }

    /// The key that signs new tokens.
    pub fn signing_key(&self) -> Option<&SigningKey> {
        self.keys.first()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, id: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The backend it opens.
    pub backend: String,
    /// Unix time (seconds) after which it is refused.
    pub expires_at: u64,
    /// The user identity the api was given, if any.
    pub user: Option<String>,
}

/// Why a token was refused. `code` names it in the router's JSON answers.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a Spawner connect token")]
    Malformed,
    #[error("the token was signed with a key this router does not know")]
    UnknownKey,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is for another backend")]
    OtherBackend,
}

impl TokenError {
    /// Machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::OtherBackend => "token_other_backend",
        }
    }
}

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("backend name {0:?} cannot be put in a token")]
    BadBackend(String),
    #[error("the user identity must be 1-{MAX_USER_LEN} printable ASCII characters")]
    BadUser,
    #[error("no signing key is configured")]
    NoKey,
}

/// Whether `user` may be carried by a token and handed to an app as a header value: 1-256
/// printable ASCII characters (space included).
pub fn is_valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USER_LEN
        && user.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn is_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Backend names are DNS labels; anything else (a dot above all) would make the format
/// ambiguous.
fn is_backend_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Signs a token of `purpose` for `claims` with the ring's signing key.
pub fn sign(ring: &KeyRing, purpose: Purpose, claims: &Claims) -> Result<String, SignError> {
    let key = ring.signing_key().ok_or(SignError::NoKey)?;
    if !is_backend_name(&claims.backend) {
        return Err(SignError::BadBackend(claims.backend.clone()));
    }
    let user = match &claims.user {
        Some(user) if !is_valid_user(user) => return Err(SignError::BadUser),
        Some(user) => URL_SAFE_NO_PAD.encode(user),
        None => String::new(),
    };
    let body = format!(
        "{}.{}.{}.{}.{}",
        purpose.version(),
        key.id,
        claims.backend,
        claims.expires_at,
        user
    );
    let mut mac = key.mac();
    mac.update(body.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{body}.{tag}"))
}

/// Checks `token` as a token of `purpose` for `backend` at Unix time `now`: its signature under
/// one of the ring's keys first (so nothing a forger wrote is believed), then its backend and
/// its expiry.
pub fn verify(
    ring: &KeyRing,
    purpose: Purpose,
    token: &str,
    backend: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    let claims = verify_signature(ring, purpose, token)?;
    if claims.backend != backend {
        return Err(TokenError::OtherBackend);
    }
    if now >= claims.expires_at {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// The claims of `token` once its form and signature are checked (not its backend or expiry).
pub fn verify_signature(
    ring: &KeyRing,
    purpose: Purpose,
    token: &str,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (body, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut parts = body.split('.');
    let (Some(version), Some(key_id), Some(backend), Some(expires), Some(user), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if version != purpose.version() || !is_key_id(key_id) || !is_backend_name(backend) {
        return Err(TokenError::Malformed);
    }
    // Only plain decimal digits: no sign, no leading `+`, and it must fit.
    if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed);
    }
    let expires_at: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    if tag.len() != 32 {
        return Err(TokenError::Malformed);
    }
    let key = ring.find(key_id).ok_or(TokenError::UnknownKey)?;
    let mut mac = key.mac();
    mac.update(body.as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let user = if user.is_empty() {
        None
    } else {
        let bytes = URL_SAFE_NO_PAD
            .decode(user)
            .map_err(|_| TokenError::Malformed)?;
        let user = String::from_utf8(bytes).map_err(|_| TokenError::Malformed)?;
        if !is_valid_user(&user) {
            return Err(TokenError::Malformed);
        }
        Some(user)
    };
    Ok(Claims {
        backend: backend.to_string(),
        expires_at,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(keys: &[(&str, &str)]) -> KeyRing {
        KeyRing::new(
            keys.iter()
                .map(|(id, s)| SigningKey::new(id, s.as_bytes(), false).expect("key"))
                .collect(),
        )
        .expect("ring")
    }

    fn main_ring() -> KeyRing {
        ring(&[
            ("k2", "a-secret-of-sixteen+"),
            ("k1", "an-older-secret-here"),
        ])
    }

    fn claims(user: Option<&str>) -> Claims {
        Claims {
            backend: "sb-abc123".into(),
            expires_at: 1_000,
            user: user.map(str::to_string),
        }
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let ring = main_ring();
        for user in [None, Some("alice@example.com"), Some("Bob Smith (admin)")] {
            let token = sign(&ring, Purpose::Connect, &claims(user)).expect("sign");
            assert!(token.starts_with("ct1.k2.sb-abc123.1000."), "{token}");
            assert_eq!(
                verify(&ring, Purpose::Connect, &token, "sb-abc123", 999),
                Ok(claims(user))
            );
        }
    }

    #[test]
    fn tokens_are_url_safe() {
        let token = sign(&main_ring(), Purpose::Connect, &claims(Some("a?b&c=d/e+f"))).unwrap();
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
            "{token}"
        );
    }

    #[test]
    fn expired_at_and_after_the_expiry() {
        let ring = main_ring();
        let token = sign(&ring, Purpose::Connect, &claims(None)).unwrap();
        for now in [1_000, 1_001, u64::MAX] {
            assert_eq!(
                verify(&ring, Purpose::Connect, &token, "sb-abc123", now),
                Err(TokenError::Expired)
            );
        }
    }

    #[test]
    fn a_token_for_one_backend_never_opens_another() {
        let ring = main_ring();
        let token = sign(&ring, Purpose::Connect, &claims(None)).unwrap();
        for other in ["sb-abc12", "sb-abc1234", "sb-abc124", ""] {
            assert_eq!(
                verify(&ring, Purpose::Connect, &token, other, 0),
                Err(TokenError::OtherBackend)
            );
        }
    }

    #[test]
    fn purposes_do_not_mix() {
        let ring = main_ring();
        let connect = sign(&ring, Purpose::Connect, &claims(None)).unwrap();
        let session = sign(&ring, Purpose::Session, &claims(None)).unwrap();
        assert_eq!(
            verify(&ring, Purpose::Session, &connect, "sb-abc123", 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(&ring, Purpose::Connect, &session, "sb-abc123", 0),
            Err(TokenError::Malformed)
        );
        // Relabelling the version breaks the signature.
        let relabelled = connect.replacen("ct1", "cs1", 1);
        assert_eq!(
            verify(&ring, Purpose::Session, &relabelled, "sb-abc123", 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn rotation_old_keys_verify_only_the_first_signs() {
        let old = ring(&[("k1", "an-older-secret-here")]);
        let token = sign(&old, Purpose::Connect, &claims(None)).unwrap();
        let rotated = main_ring();
        assert!(verify(&rotated, Purpose::Connect, &token, "sb-abc123", 0).is_ok());
        let new = sign(&rotated, Purpose::Connect, &claims(None)).unwrap();
        assert!(new.starts_with("ct1.k2."));
        assert_eq!(
            verify(&old, Purpose::Connect, &new, "sb-abc123", 0),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_key_id_with_another_secret_is_a_bad_signature() {
        let token = sign(&main_ring(), Purpose::Connect, &claims(None)).unwrap();
        let impostor = ring(&[("k2", "not-the-same-secret!")]);
        assert_eq!(
            verify(&impostor, Purpose::Connect, &token, "sb-abc123", 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampering_with_any_field_is_refused() {
        let ring = main_ring();
        let token = sign(&ring, Purpose::Connect, &claims(Some("alice"))).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let user_b = URL_SAFE_NO_PAD.encode("admin");
        let tampered = [
            format!(
                "{}.{}.sb-other.{}.{}.{}",
                parts[0], parts[1], parts[3], parts[4], parts[5]
            ),
            format!(
                "{}.{}.{}.99999.{}.{}",
                parts[0], parts[1], parts[2], parts[4], parts[5]
            ),
            format!(
                "{}.{}.{}.{}.{user_b}.{}",
                parts[0], parts[1], parts[2], parts[3], parts[5]
            ),
            format!(
                "{}.{}.{}.{}..{}",
                parts[0], parts[1], parts[2], parts[3], parts[5]
            ),
            format!(
                "{}.k1.{}.{}.{}.{}",
                parts[0], parts[2], parts[3], parts[4], parts[5]
            ),
        ];
        for t in &tampered {
            assert_eq!(
                verify_signature(&ring, Purpose::Connect, t),
                Err(TokenError::BadSignature),
                "{t}"
            );
        }
    }

    #[test]
    fn malformed_tokens() {
        let ring = main_ring();
        let good = sign(&ring, Purpose::Connect, &claims(None)).unwrap();
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        let cases = [
            "",
            ".",
            "ct1",
            "ct1.k2.sb-abc123.1000..",
            "ct1.k2.sb-abc123.1000.x",
            "ct2.k2.sb-abc123.1000..AAAA",
            "ct1.k 2.sb-abc123.1000..AAAA",
            "ct1.k2.SB-ABC.1000..AAAA",
            "ct1.k2.sb-abc123.-1..AAAA",
            "ct1.k2.sb-abc123.+1..AAAA",
            "ct1.k2.sb-abc123.99999999999999999999999..AAAA",
            "ct1.k2.sb-abc123.1000..not base64!",
            "ct1.k2.sb-abc123.1000...AAAA",
            long.as_str(),
        ];
        for case in cases {
            assert_eq!(
                verify(&ring, Purpose::Connect, case, "sb-abc123", 0),
                Err(TokenError::Malformed),
                "{case}"
            );
        }
        // Extra characters after a good token.
        assert!(
            verify(
                &ring,
                Purpose::Connect,
                &format!("{good}.x"),
                "sb-abc123",
                0
            )
            .is_err()
        );
        assert!(verify(&ring, Purpose::Connect, &format!("x{good}"), "sb-abc123", 0).is_err());
    }

    #[test]
    fn a_signed_user_that_is_not_valid_is_malformed() {
        // A key holder signing a control character (never done by `sign`) is still refused.
        let ring = main_ring();
        let key = ring.signing_key().unwrap();
        let body = format!("ct1.k2.sb-abc123.1000.{}", URL_SAFE_NO_PAD.encode("a\r\nb"));
        let mut mac = key.mac();
        mac.update(body.as_bytes());
        let token = format!(
            "{body}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(
            verify(&ring, Purpose::Connect, &token, "sb-abc123", 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn signing_refuses_what_cannot_be_carried() {
        let ring = main_ring();
        let mut c = claims(Some("a\nb"));
        assert_eq!(sign(&ring, Purpose::Connect, &c), Err(SignError::BadUser));
        c.user = Some("x".repeat(MAX_USER_LEN + 1));
        assert_eq!(sign(&ring, Purpose::Connect, &c), Err(SignError::BadUser));
        c.user = Some(String::new());
        assert_eq!(sign(&ring, Purpose::Connect, &c), Err(SignError::BadUser));
        c.user = None;
        c.backend = "a.b".into();
        assert!(matches!(
            sign(&ring, Purpose::Connect, &c),
            Err(SignError::BadBackend(_))
        ));
        assert_eq!(
            sign(&KeyRing::default(), Purpose::Connect, &claims(None)),
            Err(SignError::NoKey)
        );
    }

    #[test]
    fn key_parsing() {
        assert!(KeyRing::parse(["a:0123456789abcdef"], false).is_ok());
        assert_eq!(
            KeyRing::parse(["a:short"], false),
            Err(KeyError::ShortSecret("a".into()))
        );
        assert!(KeyRing::parse(["a:short"], true).is_ok());
        assert_eq!(
            KeyRing::parse(["a:"], true),
            Err(KeyError::EmptySecret("a".into()))
        );
        assert_eq!(
            KeyRing::parse(["nocolon"], true),
            Err(KeyError::NoId("<7 bytes>".into()))
        );
        assert_eq!(
            KeyRing::parse([":secret"], true),
            Err(KeyError::BadId(String::new()))
        );
        assert_eq!(KeyRing::parse([], true), Err(KeyError::NoKeys));
        assert_eq!(KeyRing::parse([""], true), Err(KeyError::NoKeys));
        assert_eq!(
            KeyRing::parse(["a:0123456789abcdef", "a:fedcba9876543210"], false),
            Err(KeyError::DuplicateId("a".into()))
        );
        // A secret may itself contain `:`.
        assert!(KeyRing::parse(["a:x:y"], true).is_ok());
        // The secret never shows in Debug.
        let ring = KeyRing::parse(["a:0123456789abcdef"], false).unwrap();
        assert!(!format!("{ring:?}").contains("0123"));
    }

    proptest! {
        #[test]
        fn any_signed_claims_round_trip(
            backend in "[a-z][a-z0-9-]{0,62}",
            expires_at in 1u64..u64::MAX,
            user in proptest::option::of("[ -~]{1,256}"),
            now_offset in 1u64..1_000_000,
        ) {
            let ring = main_ring();
            let claims = Claims { backend: backend.clone(), expires_at, user };
            let token = sign(&ring, Purpose::Connect, &claims).unwrap();
            let now = expires_at.saturating_sub(now_offset);
            prop_assert_eq!(verify(&ring, Purpose::Connect, &token, &backend, now), Ok(claims));
        }

        #[test]
        fn any_single_byte_change_is_refused(
            user in proptest::option::of("[ -~]{1,40}"),
            position in any::<prop::sample::Index>(),
            replacement in any::<u8>(),
        ) {
            let ring = main_ring();
            let token = sign(&ring, Purpose::Connect, &claims(user.as_deref())).unwrap();
            let mut bytes = token.clone().into_bytes();
            let i = position.index(bytes.len());
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(changed != token);
            // The decoder refuses non-canonical base64 (stray trailing bits), so every
            // other spelling of the MAC fails too.
            prop_assert!(verify(&ring, Purpose::Connect, &changed, "sb-abc123", 0).is_err());
        }

        #[test]
        fn arbitrary_input_never_panics_nor_passes(input in "\\PC{0,300}") {
            let ring = main_ring();
            prop_assert!(verify(&ring, Purpose::Connect, &input, "sb-abc123", 0).is_err());
        }
    }
}
