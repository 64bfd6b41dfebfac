//! Backend ids: unguessable, DNS-safe names for backends, their Pods and Services.

/// Random characters in an id: 20 base32 characters carry 100 random bits.
pub const RANDOM_CHARS: usize = 20;
/// Longest prefix accepted, so that an id always fits a 63-character DNS label.
pub const MAX_PREFIX_LEN: usize = 63 - RANDOM_CHARS;
/// Prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "slab-";

// RFC 4648 base32 in lower case: letters and digits 2-7, all DNS-label safe.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error(
        "id prefix {0:?} must be at most {MAX_PREFIX_LEN} characters of lower-case letters, digits and '-', starting with a letter"
    )]
    InvalidPrefix(String),
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

/// A fresh backend id: `prefix` followed by 100 random bits.
pub fn new_backend_id(prefix: &str) -> Result<String, IdError> {
    let mut bytes = [0u8; RANDOM_CHARS];
    getrandom::fill(&mut bytes).map_err(|e| IdError::Entropy(e.to_string()))?;
    backend_id_from_random(prefix, &bytes)
}

/// The id made from `prefix` and the low 5 bits of each random byte.
pub fn backend_id_from_random(
    prefix: &str,
    random: &[u8; RANDOM_CHARS],
) -> Result<String, IdError> {
    validate_prefix(prefix)?;
    let mut id = String::with_capacity(prefix.len() + RANDOM_CHARS);
    id.push_str(prefix);
    id.extend(random.iter().map(|b| ALPHABET[(b & 31) as usize] as char));
    Ok(id)
}

fn validate_prefix(prefix: &str) -> Result<(), IdError> {
    let ok = prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && prefix.bytes().next().is_none_or(|b| b.is_ascii_lowercase());
    if ok {
        Ok(())
    } else {
        Err(IdError::InvalidPrefix(prefix.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::is_dns1035_label;
    use proptest::prelude::*;

    #[test]
    fn ids_carry_the_prefix_and_differ() {
        let a = new_backend_id("slab-").expect("id");
        let b = new_backend_id("slab-").expect("id");
        assert!(a.starts_with("slab-"));
        assert_eq!(a.len(), 5 + RANDOM_CHARS);
        assert_ne!(a, b);
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for prefix in ["Slab-", "1slab", "slab_", &"a".repeat(MAX_PREFIX_LEN + 1)] {
            assert!(matches!(
                new_backend_id(prefix),
                Err(IdError::InvalidPrefix(_))
            ));
        }
    }

    #[test]
    fn empty_prefix_still_gives_a_letter_first_name_often_enough_to_matter() {
        // Without a prefix an id may start with a digit, which a Service name forbids; the
        // default prefix avoids that, and the api refuses an empty prefix at start-up.
        let id = backend_id_from_random("", &[26; RANDOM_CHARS]).expect("id");
        assert!(!is_dns1035_label(&id));
    }

    proptest! {
        #[test]
        fn every_id_is_a_dns_label(random in any::<[u8; RANDOM_CHARS]>(), prefix in "[a-z][a-z0-9-]{0,20}") {
            let id = backend_id_from_random(&prefix, &random).expect("id");
            prop_assert!(is_dns1035_label(&id) || id.ends_with('-'), "{}", id);
        }
    }
}
