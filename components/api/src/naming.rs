//! Names and URLs: the deterministic names of get-or-create backends, the key label, the URL
//! template and the api's own public URLs.

use axum::http::HeaderMap;
use axum::http::header::HOST;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Characters of the keyed hash in a get-or-create name (base32: 110 bits).
pub const KEY_HASH_CHARS: usize = 22;
/// Highest generation of a key's backend; a key that was respawned this often is refused.
pub const MAX_GENERATION: u32 = 99_999;
/// Longest suffix a get-or-create name adds to the prefix.
pub const KEY_NAME_SUFFIX_MAX_LEN: usize = KEY_HASH_CHARS;
/// Label carrying the generation of a get-or-create backend (its name does not show it).
pub const KEY_GENERATION_LABEL: &str = "spawner.dev/key-generation";

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The names of one key's backends: generation `g` is named `<prefix><22 base32 characters of
/// HMAC-SHA256(secret, key, g)>`. Every generation's name is a separate keyed hash, so one
/// leaked name tells nothing about the key's other names (numbered names `-0`, `-1` ... did),
/// and nobody without the secret can compute any of them.
#[derive(Clone, Debug)]
pub struct KeyNames<'a> {
    prefix: &'a str,
    secret: &'a [u8],
    key: &'a str,
}

impl<'a> KeyNames<'a> {
    pub fn new(prefix: &'a str, secret: &'a [u8], key: &'a str) -> Self {
        Self {
            prefix,
            secret,
            key,
        }
    }

    /// The name of generation `generation`.
    pub fn name(&self, generation: u32) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"spawner-key-name/v2\0");
        mac.update(&(self.key.len() as u64).to_be_bytes());
        mac.update(self.key.as_bytes());
        mac.update(&generation.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        let mut name = String::with_capacity(self.prefix.len() + KEY_HASH_CHARS);
        name.push_str(self.prefix);
        // 5 bits per character, taken from the digest's bit stream.
        for i in 0..KEY_HASH_CHARS {
            let bit = i * 5;
            let (byte, shift) = (bit / 8, bit % 8);
            let word = u16::from(digest[byte]) << 8 | u16::from(digest[byte + 1]);
            let index = (word >> (11 - shift)) & 31;
            name.push(BASE32[index as usize] as char);
        }
        name
    }

    /// The generation of `name` if it is this key's backend labelled with `label` (the value
    /// of [`KEY_GENERATION_LABEL`]): the label is only believed when the name matches it.
    pub fn generation_of(&self, name: &str, label: Option<&str>) -> Option<u32> {
        let digits = label?;
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if !canonical {
            return None;
        }
        let generation: u32 = digits.parse().ok()?;
        (generation <= MAX_GENERATION && self.name(generation) == name).then_some(generation)
    }
}

/// The value of the `spawner.dev/key` label for `key`: the key itself when it is a valid label
/// value, else `h.` and 40 hex characters of its SHA-256 (a label value holds at most 63
/// characters). Lookups by label are always confirmed against `spec.key`, so two keys sharing
/// a label value cannot be confused.
pub fn key_label_value(key: &str) -> String {
    if is_label_value(key) && !key.is_empty() {
        key.to_string()
    } else {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
        format!("h.{hex}")
    }
}

/// A Kubernetes label value: empty, or at most 63 of `[A-Za-z0-9._-]`, starting and ending with
/// a letter or digit.
pub fn is_label_value(value: &str) -> bool {
    let b = value.as_bytes();
    if b.is_empty() {
        return true;
    }
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key: an optional DNS-subdomain prefix and '/', then a name (at most 63 of
/// `[A-Za-z0-9._-]`, starting and ending with a letter or digit).
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(spawner_core::validation::is_dns1123_label)
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// Label keys a client may not set: Spawner's own.
pub fn is_reserved_label_key(key: &str) -> bool {
    key.rsplit_once('/').is_some_and(|(prefix, _)| {
        prefix == spawner_core::resource::GROUP || prefix.ends_with(".spawner.dev")
    })
}

/// A parsed `--url-template`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Name,
    Namespace,
    Url,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlTemplateError {
    #[error(
        "unknown placeholder {{{0}}} in the URL template (known: {{name}}, {{namespace}}, {{url}})"
    )]
    UnknownPlaceholder(String),
    #[error("unclosed '{{' in the URL template")]
    Unclosed,
    #[error("the URL template is empty")]
    Empty,
}

impl Default for UrlTemplate {
    fn default() -> Self {
        Self {
            parts: vec![Part::Url],
        }
    }
}

impl UrlTemplate {
    pub fn parse(template: &str) -> Result<Self, UrlTemplateError> {
        if template.is_empty() {
            return Err(UrlTemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(UrlTemplateError::Unclosed)?;
            parts.push(match &after[..close] {
                "name" => Part::Name,
                "namespace" => Part::Namespace,
                "url" => Part::Url,
                other => return Err(UrlTemplateError::UnknownPlaceholder(other.to_string())),
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// Whether the URL needs the backend's `status.url`.
    pub fn needs_status_url(&self) -> bool {
        self.parts.contains(&Part::Url)
    }

    /// The URL of backend `name`, or `None` while the template needs a `status.url` that the
    /// controller has not written yet.
    pub fn render(&self, name: &str, namespace: &str, status_url: Option<&str>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Name => out.push_str(name),
                Part::Namespace => out.push_str(namespace),
                Part::Url => out.push_str(status_url.filter(|u| !u.is_empty())?),
            }
        }
        Some(out)
    }
}

/// The base of the api's own URLs (`readyUrl`, `statusUrl`): the configured public base URL,
/// else `http://` and the request's Host header, else nothing (relative URLs).
pub fn public_base(configured: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(base) = configured {
        return base.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| is_host_header(h));
    match host {
        Some(host) => format!("http://{host}"),
        None => String::new(),
    }
}

/// A Host header safe to put into a URL: a host name, IPv4 or bracketed IPv6, optional port.
fn is_host_header(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// `url` with `name=value` added to its query (before any fragment). `value` must be
/// URL-safe as is (connect tokens are).
pub fn with_query_param(url: &str, name: &str, value: &str) -> String {
    let (before_fragment, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let separator = match before_fragment.find('?') {
        None => '?',
        Some(i) if i + 1 == before_fragment.len() || before_fragment.ends_with('&') => {
            return format!("{before_fragment}{name}={value}{fragment}");
        }
        Some(_) => '&',
    };
    format!("{before_fragment}{separator}{name}={value}{fragment}")
}

/// `readyUrl` and `statusUrl` of backend `name`.
pub fn api_urls(base: &str, name: &str) -> (String, String) {
    (
        format!("{base}/backend/{name}/ready"),
        format!("{base}/backend/{name}/status"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use spawner_core::validation::is_dns1035_label;

    #[test]
    fn query_params_go_before_the_fragment() {
        let cases = [
            ("http://a.localhost/", "http://a.localhost/?t=v"),
            ("http://a.localhost/x?y=1", "http://a.localhost/x?y=1&t=v"),
            ("http://a.localhost/x?", "http://a.localhost/x?t=v"),
            ("http://a.localhost/x?y=1&", "http://a.localhost/x?y=1&t=v"),
            ("http://a.localhost/#f", "http://a.localhost/?t=v#f"),
            ("http://a.localhost/?q#f?g", "http://a.localhost/?q&t=v#f?g"),
        ];
        for (url, expected) in cases {
            assert_eq!(with_query_param(url, "t", "v"), expected, "{url}");
        }
    }

    #[test]
    fn key_names_are_deterministic_dns_labels() {
        let names = KeyNames::new("slab-", b"secret", "room-42");
        let name = names.name(0);
        assert_eq!(name, KeyNames::new("slab-", b"secret", "room-42").name(0));
        assert_ne!(name, KeyNames::new("slab-", b"secret", "room-43").name(0));
        assert_ne!(name, KeyNames::new("slab-", b"other", "room-42").name(0));
        assert_eq!(name.len(), 5 + KEY_HASH_CHARS);
        let long_prefix = "a".repeat(41);
        let longest = KeyNames::new(&long_prefix, b"s", "k").name(MAX_GENERATION);
        assert!(is_dns1035_label(&longest), "{longest}");
        assert_eq!(longest.len(), 41 + KEY_NAME_SUFFIX_MAX_LEN);
    }

    #[test]
    fn one_name_does_not_reveal_the_next() {
        let names = KeyNames::new("slab-", b"secret", "room-42");
        let (first, second) = (names.name(0), names.name(1));
        // Nothing of the first name survives into the next but the prefix.
        let shared = first
            .bytes()
            .zip(second.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(shared < 5 + 3, "{first} {second}");
        assert!(!second.starts_with(&first[..first.len() - 2]));
    }

    #[test]
    fn generations_are_believed_only_when_the_name_matches() {
        let names = KeyNames::new("slab-", b"secret", "k");
        assert_eq!(names.generation_of(&names.name(0), Some("0")), Some(0));
        assert_eq!(names.generation_of(&names.name(17), Some("17")), Some(17));
        assert_eq!(names.generation_of(&names.name(17), Some("16")), None);
        assert_eq!(names.generation_of(&names.name(17), Some("017")), None);
        assert_eq!(names.generation_of(&names.name(17), None), None);
        assert_eq!(names.generation_of("slab-other", Some("1")), None);
        let other_key = KeyNames::new("slab-", b"secret", "k2");
        assert_eq!(other_key.generation_of(&names.name(3), Some("3")), None);
    }

    #[test]
    fn key_label_values() {
        assert_eq!(key_label_value("room-42"), "room-42");
        let hashed = key_label_value("user@example.com/doc 1");
        assert!(hashed.starts_with("h."));
        assert_eq!(hashed.len(), 42);
        assert!(is_label_value(&hashed));
        assert_eq!(hashed, key_label_value("user@example.com/doc 1"));
        assert!(is_label_value(&key_label_value(&"x".repeat(64))));
        assert_ne!(key_label_value(&"x".repeat(64)), "x".repeat(64));
    }

    #[test]
    fn label_keys_and_values() {
        assert!(is_label_key("team"));
        assert!(is_label_key("example.com/team"));
        assert!(!is_label_key("/team"));
        assert!(!is_label_key("example.com/"));
        assert!(!is_label_key("Exa_mple/team"));
        assert!(!is_label_key("te am"));
        assert!(is_label_value(""));
        assert!(is_label_value("a.b_c-d"));
        assert!(!is_label_value("-a"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_reserved_label_key("spawner.dev/key"));
        assert!(is_reserved_label_key("x.spawner.dev/key"));
        assert!(!is_reserved_label_key("example.com/spawner.dev"));
    }

    #[test]
    fn url_templates() {
        let t = UrlTemplate::parse("https://{name}.{namespace}.example.com/").expect("parses");
        assert!(!t.needs_status_url());
        assert_eq!(
            t.render("slab-a", "ns", None).as_deref(),
            Some("https://slab-a.ns.example.com/")
        );
        let t = UrlTemplate::parse("{url}").expect("parses");
        assert!(t.needs_status_url());
        assert_eq!(t.render("slab-a", "ns", None), None);
        assert_eq!(t.render("slab-a", "ns", Some("")), None);
        assert_eq!(
            t.render("slab-a", "ns", Some("http://127.0.1.2:9090"))
                .as_deref(),
            Some("http://127.0.1.2:9090")
        );
        assert_eq!(
            UrlTemplate::parse("https://x/{nam}"),
            Err(UrlTemplateError::UnknownPlaceholder("nam".into()))
        );
        assert_eq!(
            UrlTemplate::parse("https://x/{name"),
            Err(UrlTemplateError::Unclosed)
        );
        assert_eq!(UrlTemplate::parse(""), Err(UrlTemplateError::Empty));
    }

    #[test]
    fn public_base_urls() {
        let mut headers = HeaderMap::new();
        assert_eq!(public_base(None, &headers), "");
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(public_base(None, &headers), "http://127.0.0.1:8080");
        assert_eq!(
            public_base(Some("https://api.example.com/"), &headers),
            "https://api.example.com"
        );
        headers.insert(HOST, HeaderValue::from_static("evil.com/x?"));
        assert_eq!(public_base(None, &headers), "");
        assert_eq!(
            api_urls("https://a", "slab-x"),
            (
                "https://a/backend/slab-x/ready".to_string(),
                "https://a/backend/slab-x/status".to_string()
            )
        );
    }
}
