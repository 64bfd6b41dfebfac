//! `spawner dev`'s state directory: the kubeconfig (an admin token) and the backends' logs.
//! It is private from the start: a fresh directory with an unpredictable name and mode 0700
//! (never one that already exists, which someone else could have prepared), or the one the
//! user named, refused when another user owns it and made private otherwise.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {me}); choose another --state-dir"
    )]
    NotOurs { path: PathBuf, owner: u32, me: u32 },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A state directory, removed on drop when this process created it as a temporary one.
pub struct StateDir {
    pub path: PathBuf,
    remove_on_exit: bool,
}

impl StateDir {
    /// A new private directory under `parent` named `spawner-dev-<random>`.
    pub fn fresh(parent: &Path) -> Result<Self, StateError> {
        for _ in 0..16 {
            let mut random = [0u8; 8];
            getrandom::fill(&mut random).map_err(|e| StateError::Io {
                path: parent.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
            let path = parent.join(format!("spawner-dev-{hex}"));
            // `create` (not `create_all`) fails if the path exists, even as a symlink.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    return Ok(Self {
                        path,
                        remove_on_exit: true,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Err(io(parent)(std::io::Error::other(
            "no fresh directory name after 16 tries",
        )))
    }

    /// The directory the user named: created private if missing; refused when another user
    /// owns it; made private (0700) otherwise. Kept on exit.
    pub fn named(path: &Path) -> Result<Self, StateError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(path)(e)),
        }
        let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
        if !meta.is_dir() {
            return Err(StateError::NotADirectory(path.to_path_buf()));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(StateError::NotOurs {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            remove_on_exit: false,
        })
    }

    /// A private subdirectory (the logs).
    pub fn subdir(&self, name: &str) -> Result<PathBuf, StateError> {
        let path = self.path.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
                if !meta.is_dir() {
                    return Err(StateError::NotADirectory(path));
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(&path))?;
                Ok(path)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if self.remove_on_exit {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_fresh_directory_is_private_unpredictable_and_removed() {
        let parent = std::env::temp_dir();
        let a = StateDir::fresh(&parent).unwrap();
        let b = StateDir::fresh(&parent).unwrap();
        assert_ne!(a.path, b.path);
        assert_eq!(mode(&a.path), 0o700);
        let logs = a.subdir("logs").unwrap();
        assert_eq!(mode(&logs), 0o700);
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn a_named_directory_is_made_private_and_kept() {
        let parent = StateDir::fresh(&std::env::temp_dir()).unwrap();
        let named = parent.path.join("deep/state");
        let state = StateDir::named(&named).unwrap();
        assert_eq!(mode(&named), 0o700);
        drop(state);
        assert!(named.exists());
        // An existing one with loose permissions is tightened.
        std::fs::set_permissions(&named, std::fs::Permissions::from_mode(0o777)).unwrap();
        StateDir::named(&named).unwrap();
        assert_eq!(mode(&named), 0o700);
        // A file is refused.
        let file = parent.path.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            StateDir::named(&file),
            Err(StateError::NotADirectory(_))
        ));
    }

    #[test]
    fn a_directory_owned_by_someone_else_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Only root can hand a directory to another user; elsewhere /  is root's.
            assert!(matches!(
                StateDir::named(Path::new("/")),
                Err(StateError::NotOurs { .. })
            ));
            return;
        }
        let parent = StateDir::fresh(&std::env::temp_dir()).unwrap();
        let theirs = parent.path.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        assert!(matches!(
            StateDir::named(&theirs),
            Err(StateError::NotOurs { owner: 65534, .. })
        ));
    }
}
