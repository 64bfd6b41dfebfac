//! How the process runtime starts a container's process cheaply and still ties it to the agent.
//!
//! A container must die with the agent even when the agent is SIGKILLed, so each one gets a
//! parent-death signal (`PR_SET_PDEATHSIG`). Setting it from a `pre_exec` hook would force the
//! standard library to `fork` the agent: with `spawner dev`'s address space that copies tens of
//! megabytes of page tables per container, and it was two thirds of the CPU a spawn cost under
//! a burst (see docs/node-agent.md). Without hooks the standard library uses `posix_spawn`
//! (a `vfork`-style clone that copies nothing), so the death signal is set by util-linux's
//! `setpriv --pdeathsig KILL`, which then execs the program in place (same pid). Where `setpriv`
//! is missing, containers start without the signal and the agent says so once.
//!
//! Because `setpriv` reports a missing program only as its own exit code, the program is
//! resolved here first, as `execvp` would, so "no such command" stays a start error.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// util-linux's `setpriv`, if this machine has one that supports `--pdeathsig`.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let found = std::env::var_os("PATH")
                .and_then(|path| find_in_path(OsStr::new("setpriv"), &path))
                .filter(|setpriv| supports_pdeathsig(setpriv));
            if found.is_none() {
                tracing::warn!(
                    "util-linux `setpriv` with --pdeathsig not found: pod processes will not be \
                     killed if the node agent itself is killed (an orderly stop still stops them)"
                );
            }
            found
        })
        .as_deref()
}

fn supports_pdeathsig(setpriv: &Path) -> bool {
    std::process::Command::new(setpriv)
        .args(["--pdeathsig", "KILL", "--", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` resolved as `execvp` does: a name with a slash is used as it is (relative to
/// `working_dir` when given), a bare name is looked up in `path`.
fn find_in_path(program: &OsStr, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".").join(program)
            } else {
                dir.join(program)
            }
        })
        .find(|candidate| is_executable(candidate))
}

/// The program and arguments to hand to `Command` for the container command `argv`, with its
/// environment `env` (whose `PATH`, if set, is the one searched, as the child would search it).
pub(crate) fn command_line(
    argv: &[String],
    env: &[(String, String)],
    working_dir: Option<&Path>,
) -> Result<(PathBuf, Vec<String>), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let resolved = if program.contains('/') {
        let path = match working_dir {
            Some(dir) if !program.starts_with('/') => dir.join(program),
            _ => PathBuf::from(program),
        };
        is_executable(&path).then_some(path)
    } else {
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone().into())
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_default();
        find_in_path(OsStr::new(program), &path)
    };
    let Some(resolved) = resolved else {
        return Err(format!("cannot start {program:?}: no such executable file"));
    };
    match setpriv() {
        Some(setpriv) => {
            let mut wrapped = vec![
                "--pdeathsig".to_string(),
                "KILL".to_string(),
                "--".to_string(),
                resolved.to_string_lossy().into_owned(),
            ];
            wrapped.extend(args.iter().cloned());
            Ok((setpriv.to_path_buf(), wrapped))
        }
        None => Ok((resolved, args.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_are_found_on_the_path_and_missing_ones_are_start_errors() {
        let (program, args) =
            command_line(&["sh".into(), "-c".into(), "exit 0".into()], &[], None).unwrap();
        let line: Vec<String> = std::iter::once(program.to_string_lossy().into_owned())
            .chain(args)
            .collect();
        // Wrapped or not, the real program is resolved to an absolute path before its arguments.
        let sh = line
            .iter()
            .position(|a| a.ends_with("/sh"))
            .expect("sh resolved");
        assert!(line[sh].starts_with('/'));
        assert_eq!(&line[sh + 1..], ["-c", "exit 0"]);

        let err = command_line(&["no-such-program-spawner".into()], &[], None).unwrap_err();
        assert!(err.contains("no-such-program-spawner"), "{err}");
        assert!(command_line(&[], &[], None).is_err());
    }

    #[test]
    fn the_pods_own_path_is_searched() {
        let dir = std::env::temp_dir().join(format!("spawner-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("only-here");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = [("PATH".to_string(), dir.to_string_lossy().into_owned())];
        let (program, args) = command_line(&["only-here".into()], &env, None).unwrap();
        let line: Vec<String> = std::iter::once(program.to_string_lossy().into_owned())
            .chain(args)
            .collect();
        assert!(line.iter().any(|a| Path::new(a) == tool), "{line:?}");
        // Not on the agent's own PATH.
        assert!(command_line(&["only-here".into()], &[], None).is_err());
        // A relative path with a slash is taken from the working directory.
        assert!(command_line(&["./only-here".into()], &[], Some(&dir)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
