//! The `--connect-key` arguments, declared once for the two commands that hold the keys: the
//! api (signs connect tokens) and the router (verifies them and signs its session cookies).
//! Each flattens [`ConnectKeyArgs`] into its own arguments.

use super::{KeyError, KeyRing};

/// The connect keys a command was given.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConnectKeyArgs {
    /// Keys of connect tokens, `<id>:<secret>`, the same for the api and the router: the first
    /// signs (the api's connect tokens, the router's session cookies) and every one verifies,
    /// so put a new key first to rotate. Without keys the api's `url` carries no token (and
    /// the router refuses to start).
    #[arg(
        long = "connect-key",
        env = "SPAWNER_CONNECT_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub connect_keys: Vec<String>,
}

impl ConnectKeyArgs {
    /// No key was given.
    pub fn is_empty(&self) -> bool {
        self.connect_keys.is_empty()
    }

    /// The keys as a ring (see [`KeyRing::parse`]); secrets shorter than
    /// [`MIN_SECRET_LEN`](super::MIN_SECRET_LEN) only with `allow_weak`.
    pub fn key_ring(&self, allow_weak: bool) -> Result<KeyRing, KeyError> {
        KeyRing::parse(self.connect_keys.iter().map(String::as_str), allow_weak)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        keys: ConnectKeyArgs,
    }

    #[test]
    fn keys_repeat_or_come_comma_separated() {
        let command = Command::parse_from([
            "spawner",
            "--connect-key",
            "a:0123456789abcdef,b:0123456789abcdef",
            "--connect-key",
            "c:0123456789abcdef",
        ]);
        assert!(!command.keys.is_empty());
        let ring = command.keys.key_ring(false).expect("ring");
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.signing_key().map(|k| k.id()), Some("a"));
        assert!(matches!(
            Command::parse_from(["spawner", "--connect-key", "a:short"])
                .keys
                .key_ring(false),
            Err(KeyError::ShortSecret(_))
        ));
        assert!(Command::parse_from(["spawner"]).keys.is_empty());
    }
}
