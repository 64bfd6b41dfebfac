//! Who may enter a backend: the decision from a request's credentials, as pure functions.
//!
//! Credentials, in the order they are tried: the session cookie the router set earlier, an
//! `Authorization: Bearer <connect token>`, a connect token in the query (`spawner_token`).
//! A connect token in the query of a plain GET/HEAD is swapped for the cookie with a redirect
//! to the same URL without the token, so it does not stay in history or referrers; on a
//! WebSocket upgrade (which cannot follow a redirect) or another method it is accepted as is.

use spawner_core::connect_token::{self, Claims, KeyRing, Purpose, QUERY_PARAM, TokenError};

/// Name of the cookie that keeps a visitor in after its connect token was accepted.
pub const SESSION_COOKIE: &str = "spawner_session";

/// What the request carries and where it is going.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The backend the request is routed to.
    pub backend: &'a str,
    /// Path and query as the client sent it (what a redirect goes back to).
    pub path_and_query: &'a str,
    pub authorization: Option<&'a str>,
    /// Every `Cookie` header, joined with `; `.
    pub cookies: Option<&'a str>,
    /// GET or HEAD without an upgrade: can be redirected.
    pub redirectable: bool,
}

/// How cookies are written.
#[derive(Clone, Debug)]
pub struct CookiePolicy {
    /// `Path` of the cookie: `/` in host mode (the cookie is host-only, so scoped to the
    /// backend's host), `/<prefix>/<name>` in path mode.
    pub path: String,
    /// Add `Secure` (the router is reached over HTTPS).
    pub secure: bool,
    /// Lifetime of the session cookie and of the token in it, in seconds.
    pub ttl_seconds: u64,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Let in; `user` goes to the app as `X-Spawner-User`.
    Granted { user: Option<String> },
    /// Answer 302 to `location` with `Set-Cookie: set_cookie`.
    Redirect {
        location: String,
        set_cookie: String,
    },
    /// 401 with this reason.
    Denied(Denial),
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No credential at all.
    Missing,
    /// The credential presented was refused.
    Token(TokenError),
}

impl Denial {
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Missing => "token_missing",
            Denial::Token(e) => e.code(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denial::Missing => {
                "this backend needs a connect token (the url answered by the api's /spawn or /connect)"
                    .to_string()
            }
            Denial::Token(e) => e.to_string(),
        }
    }
}

/// Decides whether `request` may enter, at Unix time `now`.
pub fn decide(ring: &KeyRing, request: &Request<'_>, cookie: &CookiePolicy, now: u64) -> Access {
    // The first refusal seen is the reason given, so a visitor with a stale cookie and a fresh
    // but broken token hears about the token.
    let mut refusal: Option<TokenError> = None;
    let query_token = query_param(request.path_and_query, QUERY_PARAM);

    // A valid token in the address is the newest word on who the visitor is: it replaces an
    // older cookie (another user of the same browser opened their own URL).
    if let Some(token) = query_token {
        match verify(ring, Purpose::Connect, token, request.backend, now) {
            Ok(claims) if request.redirectable => {
                return Access::Redirect {
                    location: without_query_param(request.path_and_query, QUERY_PARAM),
                    set_cookie: set_cookie(ring, &claims, cookie, now),
                };
            }
            Ok(claims) => return Access::Granted { user: claims.user },
            Err(e) => refusal = Some(e),
        }
    }
    for value in cookie_values(request.cookies.unwrap_or(""), SESSION_COOKIE) {
        match verify(ring, Purpose::Session, value, request.backend, now) {
            Ok(claims) => {
                if query_token.is_some() && request.redirectable {
                    // Already in (the token was stale): just take it out of the address bar.
                    return Access::Redirect {
                        location: without_query_param(request.path_and_query, QUERY_PARAM),
                        set_cookie: set_cookie(ring, &claims, cookie, now),
                    };
                }
                return Access::Granted { user: claims.user };
            }
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    if let Some(token) = request.authorization.and_then(bearer) {
        match verify(ring, Purpose::Connect, token, request.backend, now) {
            Ok(claims) => return Access::Granted { user: claims.user },
            // The reason given: the address's token's, else the bearer's, else the cookie's.
            Err(e) if query_token.is_none() => refusal = Some(e),
            Err(_) => {}
        }
    }
    Access::Denied(refusal.map_or(Denial::Missing, Denial::Token))
}

/// Checks `token` for `purpose` against `backend` (the one the request is routed to).
fn verify(
    ring: &KeyRing,
    purpose: Purpose,
    token: &str,
    backend: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    let backend = crate::mutants::backend_to_check(token, backend);
    connect_token::verify(ring, purpose, token, backend, now)
}

/// The `Set-Cookie` value carrying a session token for `claims`' backend and user.
fn set_cookie(ring: &KeyRing, claims: &Claims, policy: &CookiePolicy, now: u64) -> String {
    let session = Claims {
        backend: claims.backend.clone(),
        expires_at: now.saturating_add(policy.ttl_seconds),
        user: claims.user.clone(),
    };
    // The claims were just verified under this ring, so they can be signed again; should that
    // ever fail, an empty cookie only means the visitor needs a new connect token.
    let token = connect_token::sign(ring, Purpose::Session, &session).unwrap_or_default();
    let secure = if policy.secure { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={token}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        policy.path, policy.ttl_seconds
    )
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether an `Authorization` header carries a connect token (the router's own credential,
/// removed before forwarding; any other scheme is the app's business).
pub fn is_connect_bearer(header: &str) -> bool {
    bearer(header).is_some_and(|t| t.starts_with("ct1."))
}

/// Every value of cookie `name` in a `Cookie` header.
pub fn cookie_values<'a>(header: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    header.split(';').filter_map(move |pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The `Cookie` header without cookie `name` (`None` when nothing is left).
pub fn without_cookie(header: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k).trim() != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The first value of query parameter `name` (tokens are URL-safe, so no decoding is needed).
pub fn query_param<'a>(path_and_query: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path_and_query.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// `path_and_query` without any `name=` parameter (and without `?` when nothing is left).
pub fn without_query_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn ring() -> KeyRing {
        KeyRing::parse(["k1:0123456789abcdef"], false).expect("ring")
    }

    fn connect(backend: &str, expires_at: u64, user: Option<&str>) -> String {
        connect_token::sign(
            &ring(),
            Purpose::Connect,
            &Claims {
                backend: backend.into(),
                expires_at,
                user: user.map(str::to_string),
            },
        )
        .expect("sign")
    }

    fn policy() -> CookiePolicy {
        CookiePolicy {
            path: "/".into(),
            secure: false,
            ttl_seconds: 3600,
        }
    }

    fn request<'a>(path: &'a str) -> Request<'a> {
        Request {
            backend: "sb-a",
            path_and_query: path,
            authorization: None,
            cookies: None,
            redirectable: true,
        }
    }

    fn cookie_of(access: &Access) -> String {
        let Access::Redirect { set_cookie, .. } = access else {
            panic!("not a redirect: {access:?}");
        };
        set_cookie
            .split(';')
            .next()
            .and_then(|p| p.split_once('='))
            .map(|(_, v)| v.to_string())
            .expect("cookie value")
    }

    #[test]
    fn a_query_token_becomes_a_cookie_and_a_redirect_without_it() {
        let token = connect("sb-a", NOW + 300, Some("alice"));
        let path = format!("/game?x=1&spawner_token={token}&y=2");
        let access = decide(&ring(), &request(&path), &policy(), NOW);
        let Access::Redirect {
            location,
            set_cookie,
        } = &access
        else {
            panic!("{access:?}")
        };
        assert_eq!(location, "/game?x=1&y=2");
        assert!(set_cookie.starts_with("spawner_session=cs1.k1.sb-a."));
        assert!(set_cookie.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"));
        // The cookie then lets the visitor in, with the user, long after the token expired.
        let session = format!("spawner_session={}", cookie_of(&access));
        let later = Request {
            cookies: Some(&session),
            ..request("/game?x=1&y=2")
        };
        assert_eq!(
            decide(&ring(), &later, &policy(), NOW + 3000),
            Access::Granted {
                user: Some("alice".into())
            }
        );
        assert_eq!(
            decide(&ring(), &later, &policy(), NOW + 3600),
            Access::Denied(Denial::Token(TokenError::Expired))
        );
        // A fresh token of another user, in a browser holding alice's cookie, makes it bob's.
        let bobs = format!(
            "/game?spawner_token={}",
            connect("sb-a", NOW + 300, Some("bob"))
        );
        let switched = decide(
            &ring(),
            &Request {
                cookies: Some(&session),
                ..request(&bobs)
            },
            &policy(),
            NOW + 10,
        );
        let bob_session = format!("spawner_session={}", cookie_of(&switched));
        assert_eq!(
            decide(
                &ring(),
                &Request {
                    cookies: Some(&bob_session),
                    ..request("/game")
                },
                &policy(),
                NOW + 20
            ),
            Access::Granted {
                user: Some("bob".into())
            }
        );
        // A stale token next to a valid cookie only leaves the address.
        let stale = format!("/game?spawner_token={}", connect("sb-a", NOW, Some("bob")));
        let kept = decide(
            &ring(),
            &Request {
                cookies: Some(&session),
                ..request(&stale)
            },
            &policy(),
            NOW + 10,
        );
        assert!(
            matches!(&kept, Access::Redirect { location, .. } if location == "/game"),
            "{kept:?}"
        );
        let kept_session = format!("spawner_session={}", cookie_of(&kept));
        assert_eq!(
            decide(
                &ring(),
                &Request {
                    cookies: Some(&kept_session),
                    ..request("/game")
                },
                &policy(),
                NOW + 20
            ),
            Access::Granted {
                user: Some("alice".into())
            }
        );
        // Never into another backend.
        let other = Request {
            backend: "sb-b",
            ..later
        };
        assert_eq!(
            decide(&ring(), &other, &policy(), NOW),
            Access::Denied(Denial::Token(TokenError::OtherBackend))
        );
    }

    #[test]
    fn upgrades_and_bearers_are_let_in_without_redirect() {
        let token = connect("sb-a", NOW + 300, None);
        let path = format!("/ws?spawner_token={token}");
        let upgrade = Request {
            redirectable: false,
            ..request(&path)
        };
        assert_eq!(
            decide(&ring(), &upgrade, &policy(), NOW),
            Access::Granted { user: None }
        );
        let header = format!("Bearer {token}");
        let with_bearer = Request {
            authorization: Some(&header),
            ..request("/api")
        };
        assert_eq!(
            decide(&ring(), &with_bearer, &policy(), NOW),
            Access::Granted { user: None }
        );
        assert!(is_connect_bearer(&header));
        assert!(!is_connect_bearer("Bearer app-token"));
        assert!(!is_connect_bearer("Basic abc"));
    }

    #[test]
    fn every_refusal_says_why() {
        let cases = [
            (String::from("/"), Denial::Missing),
            (
                "/?spawner_token=garbage".to_string(),
                Denial::Token(TokenError::Malformed),
            ),
            (
                format!("/?spawner_token={}", connect("sb-a", NOW, None)),
                Denial::Token(TokenError::Expired),
            ),
            (
                format!("/?spawner_token={}", connect("sb-b", NOW + 9, None)),
                Denial::Token(TokenError::OtherBackend),
            ),
        ];
        for (path, denial) in cases {
            assert_eq!(
                decide(&ring(), &request(&path), &policy(), NOW),
                Access::Denied(denial),
                "{path}"
            );
        }
        let other_keys = KeyRing::parse(["k9:fedcba9876543210"], false).unwrap();
        let path = format!("/?spawner_token={}", connect("sb-a", NOW + 9, None));
        assert_eq!(
            decide(&other_keys, &request(&path), &policy(), NOW),
            Access::Denied(Denial::Token(TokenError::UnknownKey))
        );
        // A connect token is not a cookie, and a cookie is not a connect token.
        let forged = format!("spawner_session={}", connect("sb-a", NOW + 9, None));
        let with_cookie = Request {
            cookies: Some(&forged),
            ..request("/")
        };
        assert_eq!(
            decide(&ring(), &with_cookie, &policy(), NOW),
            Access::Denied(Denial::Token(TokenError::Malformed))
        );
    }

    #[test]
    fn path_mode_cookies_are_scoped_to_the_backend_and_secure_when_asked() {
        let token = connect("sb-a", NOW + 300, None);
        let path = format!("/b/sb-a/?spawner_token={token}");
        let policy = CookiePolicy {
            path: "/b/sb-a".into(),
            secure: true,
            ttl_seconds: 60,
        };
        let Access::Redirect {
            location,
            set_cookie,
        } = decide(&ring(), &request(&path), &policy, NOW)
        else {
            panic!()
        };
        assert_eq!(location, "/b/sb-a/");
        assert!(set_cookie.contains("; Path=/b/sb-a; Max-Age=60; HttpOnly; SameSite=Lax; Secure"));
    }

    #[test]
    fn cookie_and_query_helpers() {
        let h = "a=1; spawner_session=x; b=2; spawner_session=\"y\"";
        assert_eq!(
            cookie_values(h, SESSION_COOKIE).collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert_eq!(
            without_cookie(h, SESSION_COOKIE).as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(without_cookie("spawner_session=x", SESSION_COOKIE), None);
        assert_eq!(query_param("/p?a=1&t=2", "t"), Some("2"));
        assert_eq!(query_param("/p?at=2", "t"), None);
        assert_eq!(without_query_param("/p?t=1", "t"), "/p");
        assert_eq!(without_query_param("/p?t=1&t=2&u", "t"), "/p?u");
        assert_eq!(without_query_param("/p", "t"), "/p");
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Bearer "), None);
    }

    proptest! {
        #[test]
        fn arbitrary_credentials_never_panic_nor_pass(
            path in "/\\PC{0,100}",
            auth in proptest::option::of("\\PC{0,100}"),
            cookies in proptest::option::of("\\PC{0,100}"),
            redirectable in any::<bool>(),
        ) {
            let request = Request {
                backend: "sb-a",
                path_and_query: &path,
                authorization: auth.as_deref(),
                cookies: cookies.as_deref(),
                redirectable,
            };
            prop_assert!(matches!(
                decide(&ring(), &request, &policy(), NOW),
                Access::Denied(_)
            ));
        }
    }
}
