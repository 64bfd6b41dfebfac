//! Finding the pinned control-plane binaries, or building them with `e2e/controlplane/build.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Error;

/// The Go module that pins the control plane; its `require` lines are the versions we run.
const GO_MOD: &str = include_str!("../../controlplane/go.mod");

/// Overrides where the binaries live (and where `build.sh` puts them).
pub const BIN_DIR_ENV: &str = "SPAWNER_CONTROLPLANE_BIN_DIR";

/// The executables a control plane is made of, in the order they start.
pub const BINARY_NAMES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// The version a module is pinned to in `e2e/controlplane/go.mod`.
fn pinned_version(module: &str) -> Option<&'static str> {
    GO_MOD.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let (path, version) = (words.next()?, words.next()?);
        (path == module && version.starts_with('v')).then_some(version)
    })
}

/// The Kubernetes release the harness runs (e.g. `v1.34.4`).
pub fn kubernetes_version() -> &'static str {
    pinned_version("k8s.io/kubernetes").unwrap_or("unknown")
}

/// The etcd release the harness runs (e.g. `v3.6.4`).
pub fn etcd_version() -> &'static str {
    pinned_version("go.etcd.io/etcd/server/v3").unwrap_or("unknown")
}

/// The build script, in this crate's source tree.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh")
}

/// Where the binaries are: `$SPAWNER_CONTROLPLANE_BIN_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/spawner/controlplane/<kubernetes version>/bin` (the same rule
/// as `build.sh`).
pub fn bin_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cache"),
            None => {
                return Err(Error::Unavailable(format!(
                    "neither {BIN_DIR_ENV}, XDG_CACHE_HOME nor HOME is set"
                )));
            }
        },
    };
    Ok(cache
        .join("spawner/controlplane")
        .join(kubernetes_version())
        .join("bin"))
}

/// Paths of the three executables.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
}

impl Binaries {
    fn in_dir(dir: PathBuf) -> Self {
        Binaries {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
            dir,
        }
    }

    fn all_present(&self) -> bool {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kube_controller_manager,
        ]
        .iter()
        .all(|path| is_executable(path))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn go_installed() -> bool {
    Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Returns the binaries, building them first (blocking, with the build script's progress on the
/// terminal) when they are not in the cache. `Error::Unavailable` when they are absent and Go is
/// not installed: the one case a test may skip.
pub fn find_or_build() -> Result<Binaries, Error> {
    let binaries = Binaries::in_dir(bin_dir()?);
    if binaries.all_present() {
        return Ok(binaries);
    }
    if !go_installed() {
        return Err(Error::Unavailable(format!(
            "Go is not installed and the control plane binaries are not in {}",
            binaries.dir.display()
        )));
    }
    super::progress(&format!(
        "building the Kubernetes {} control plane into {} (once; see docs/controlplane.md)",
        kubernetes_version(),
        binaries.dir.display()
    ));
    // The script's progress goes to our stderr, which the test harness does not capture.
    let status = Command::new("bash")
        .arg(build_script())
        .env(BIN_DIR_ENV, &binaries.dir)
        .stdin(Stdio::null())
        .stdout(stderr_for_child()?)
        .status()
        .map_err(|source| Error::Io {
            context: format!("running {}", build_script().display()),
            source,
        })?;
    if !status.success() {
        return Err(Error::Build(format!(
            "{} failed with {status}",
            build_script().display()
        )));
    }
    if !binaries.all_present() {
        return Err(Error::Build(format!(
            "{} succeeded but {} does not hold {:?}",
            build_script().display(),
            binaries.dir.display(),
            BINARY_NAMES
        )));
    }
    Ok(binaries)
}

/// Our stderr, duplicated, so a child's stdout shows up where the harness prints progress.
fn stderr_for_child() -> Result<Stdio, Error> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Io {
            context: "duplicating stderr for the build script".into(),
            source,
        })?;
    Ok(Stdio::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_go_mod() {
        assert!(
            kubernetes_version().starts_with("v1."),
            "{}",
            kubernetes_version()
        );
        assert!(etcd_version().starts_with("v3."), "{}", etcd_version());
    }

    #[test]
    fn staging_modules_are_pinned_to_the_kubernetes_minor() {
        // k8s.io/kubernetes v1.X.Y needs every k8s.io staging module at v0.X.Y.
        let staging = kubernetes_version().replacen("v1.", "v0.", 1);
        let replaces: Vec<&str> = GO_MOD
            .lines()
            .filter(|l| l.contains("=> k8s.io/"))
            .collect();
        assert!(replaces.len() > 20, "{replaces:?}");
        for line in replaces {
            assert!(line.trim_end().ends_with(&staging), "{line}");
        }
    }
}
