//! Which backend a request is for: pure functions of the Host header or the path, so they can
//! be property-tested and fuzzed.
//!
//! - Host mode: `<name>.<domain>[:port]`; the whole path goes to the backend.
//! - Path mode: `/<prefix>/<name>/<rest>`; `/<rest>` goes to the backend and `/<prefix>/<name>`
//!   to the app as `X-Forwarded-Prefix`.

use spawner_core::validation::is_dns1035_label;

/// Longest Host header accepted (a DNS name is at most 253 characters, plus a port).
pub const MAX_HOST_LEN: usize = 261;

/// How backends are named in requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `<name>.<domain>`: `domain` is lower case, without leading dot or port.
    Host { domain: String },
    /// `/<prefix>/<name>/...`: `prefix` is one or more path segments without slashes at either
    /// end (e.g. `b` or `spawner/b`).
    Path { prefix: String },
}

/// The backend a request is for and the path it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub backend: String,
    /// The path and query forwarded to the backend (origin form, starts with `/`).
    pub path_and_query: String,
    /// In path mode, `/<prefix>/<name>`: what the app is mounted under.
    pub prefix: Option<String>,
}

/// Why a request cannot be routed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// 400: no Host header, or one that is not a host name.
    #[error("the Host header is missing or not a host name")]
    BadHost,
    /// 404: a host or path that does not name a backend of this router.
    #[error("this address does not name a backend")]
    NotOurs,
    /// 400: a path that could reach another backend or escape the prefix (`..`, encoded
    /// slashes or backslashes, NUL).
    #[error("the path is not acceptable")]
    BadPath,
}

impl RouteError {
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::BadHost => "bad_host",
            RouteError::NotOurs => "not_found",
            RouteError::BadPath => "bad_path",
        }
    }
}

/// Routes a request with `host` (the Host header, if any) and `path_and_query` (origin form).
pub fn route(mode: &Mode, host: Option<&str>, path_and_query: &str) -> Result<Target, RouteError> {
    check_path(path_and_query)?;
    match mode {
        Mode::Host { domain } => {
            let host = host_name(host.ok_or(RouteError::BadHost)?)?;
            let name = host
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .ok_or(RouteError::NotOurs)?;
            if !is_dns1035_label(name) {
                return Err(RouteError::NotOurs);
            }
            Ok(Target {
                backend: name.to_string(),
                path_and_query: path_and_query.to_string(),
                prefix: None,
            })
        }
        Mode::Path { prefix } => {
            let rest = path_and_query
                .strip_prefix('/')
                .and_then(|p| p.strip_prefix(prefix.as_str()))
                .and_then(|p| p.strip_prefix('/'))
                .ok_or(RouteError::NotOurs)?;
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let name = &rest[..end];
            if !is_dns1035_label(name) {
                return Err(RouteError::NotOurs);
            }
            let after = &rest[end..];
            let path_and_query = if after.starts_with('/') {
                after.to_string()
            } else {
                // `/b/name` and `/b/name?q`: the app's root.
                format!("/{after}")
            };
            Ok(Target {
                backend: name.to_string(),
                path_and_query,
                prefix: Some(format!("/{prefix}/{name}")),
            })
        }
    }
}

/// The host name of a Host header: lower case, port and one trailing dot removed; refuses
/// anything that is not a plausible DNS name.
pub fn host_name(header: &str) -> Result<String, RouteError> {
    if header.is_empty() || header.len() > MAX_HOST_LEN {
        return Err(RouteError::BadHost);
    }
    let name = match header.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            if port.len() > 5 {
                return Err(RouteError::BadHost);
            }
            name
        }
        Some(_) => return Err(RouteError::BadHost),
        None => header,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let plausible = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.split('.').any(str::is_empty);
    if !plausible {
        return Err(RouteError::BadHost);
    }
    Ok(name.to_ascii_lowercase())
}

/// Refuses paths that are not origin form or whose segments could climb (`.`/`..`, also
/// percent-encoded) or hide a separator (`%2f`, `%5c`, `\`, NUL). Refusing is simpler and
/// safer than normalising: browsers already resolve dot segments before sending.
pub fn check_path(path_and_query: &str) -> Result<(), RouteError> {
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p);
    if !path.starts_with('/') {
        return Err(RouteError::BadPath);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
        || path.contains('\\')
    {
        return Err(RouteError::BadPath);
    }
    for segment in lower.split('/') {
        let decoded_dots = segment.replace("%2e", ".");
        if decoded_dots == "." || decoded_dots == ".." {
            return Err(RouteError::BadPath);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host_mode() -> Mode {
        Mode::Host {
            domain: "rooms.example.com".into(),
        }
    }

    fn path_mode() -> Mode {
        Mode::Path { prefix: "b".into() }
    }

    #[test]
    fn host_mode_routes_the_first_label() {
        for host in [
            "slab-a1.rooms.example.com",
            "slab-a1.rooms.example.com:8443",
            "SLAB-A1.Rooms.Example.COM",
            "slab-a1.rooms.example.com.",
        ] {
            assert_eq!(
                route(&host_mode(), Some(host), "/x/y?z=1"),
                Ok(Target {
                    backend: "slab-a1".into(),
                    path_and_query: "/x/y?z=1".into(),
                    prefix: None,
                }),
                "{host}"
            );
        }
    }

    #[test]
    fn host_mode_refuses_hosts_that_are_not_ours() {
        for host in [
            "rooms.example.com",
            "a.b.rooms.example.com",
            "slab-a1.evil.com",
            "slab-a1.rooms.example.com.evil.com",
            "slab-a1rooms.example.com",
            "1abc.rooms.example.com",
            "-x.rooms.example.com",
        ] {
            assert_eq!(
                route(&host_mode(), Some(host), "/"),
                Err(RouteError::NotOurs),
                "{host}"
            );
        }
        let long = format!("{}.rooms.example.com", "a".repeat(300));
        for host in [
            "",
            ":80",
            "a..rooms.example.com",
            "a.rooms.example.com:",
            "a.rooms.example.com:999999",
            "a.rooms.example.com:x",
            "[::1]:80",
            "a b.rooms.example.com",
            "a_b.rooms.example.com",
            long.as_str(),
        ] {
            assert_eq!(
                route(&host_mode(), Some(host), "/"),
                Err(RouteError::BadHost),
                "{host}"
            );
        }
        assert_eq!(route(&host_mode(), None, "/"), Err(RouteError::BadHost));
    }

    #[test]
    fn path_mode_strips_the_prefix() {
        let cases = [
            ("/b/slab-a1/x/y?z=1", "/x/y?z=1"),
            ("/b/slab-a1/", "/"),
            ("/b/slab-a1", "/"),
            ("/b/slab-a1?z=1", "/?z=1"),
        ];
        for (path, forwarded) in cases {
            assert_eq!(
                route(&path_mode(), None, path),
                Ok(Target {
                    backend: "slab-a1".into(),
                    path_and_query: forwarded.into(),
                    prefix: Some("/b/slab-a1".into()),
                }),
                "{path}"
            );
        }
        let nested = Mode::Path {
            prefix: "spawner/b".into(),
        };
        assert_eq!(
            route(&nested, None, "/spawner/b/x1/ws").map(|t| t.backend),
            Ok("x1".into())
        );
    }

    #[test]
    fn path_mode_refuses_other_paths() {
        for path in [
            "/",
            "/b",
            "/b/",
            "/bb/slab-a1/",
            "/x/b/slab-a1/",
            "/b/Slab/",
            "/b/1a/",
        ] {
            assert_eq!(
                route(&path_mode(), None, path),
                Err(RouteError::NotOurs),
                "{path}"
            );
        }
    }

    #[test]
    fn traversal_is_refused_in_both_modes() {
        for path in [
            "/b/slab-a1/../slab-b2/",
            "/b/slab-a1/%2e%2e/slab-b2/",
            "/b/slab-a1/.%2E/slab-b2/",
            "/b/slab-a1/%2F..%2Fslab-b2",
            "/b/slab-a1%2f..%2fslab-b2/",
            "/b/slab-a1/..\\slab-b2",
            "/b/slab-a1/%5c../",
            "/b/slab-a1/./x",
            "/b/slab-a1/x%00",
            "/b/..",
            "b/slab-a1/",
            "*",
        ] {
            assert_eq!(
                route(&path_mode(), None, path),
                Err(RouteError::BadPath),
                "{path}"
            );
            assert_eq!(
                route(&host_mode(), Some("a.rooms.example.com"), path),
                Err(RouteError::BadPath),
                "{path}"
            );
        }
        // Dots inside names and in the query are fine.
        assert!(route(&path_mode(), None, "/b/slab-a1/a..b/.x?p=../..").is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(host in "\\PC{0,80}", path in "\\PC{0,80}") {
            let _ = route(&host_mode(), Some(&host), &path);
            let _ = route(&path_mode(), Some(&host), &path);
        }

        #[test]
        fn a_routed_path_never_names_another_backend(
            name in "[a-z][a-z0-9-]{0,20}",
            tail in "[a-zA-Z0-9./%-]{0,40}",
        ) {
            let path = format!("/b/{name}/{tail}");
            if let Ok(target) = route(&path_mode(), None, &path) {
                prop_assert_eq!(&target.backend, &name);
                prop_assert!(target.path_and_query.starts_with('/'));
                prop_assert!(!target.path_and_query.split('/').any(|s| s == ".."));
            }
        }

        #[test]
        fn host_mode_routes_exactly_the_label(name in "[a-z][a-z0-9-]{0,40}", port in proptest::option::of(1u16..)) {
            let host = match port {
                Some(p) => format!("{name}.rooms.example.com:{p}"),
                None => format!("{name}.rooms.example.com"),
            };
            let routed = route(&host_mode(), Some(&host), "/");
            if is_dns1035_label(&name) {
                prop_assert_eq!(routed.map(|t| t.backend), Ok(name));
            } else {
                prop_assert_eq!(routed, Err(RouteError::NotOurs));
            }
        }
    }
}
