//! How the process runtime starts a container's process cheaply and still ties it to the agent.
//!
//! A container must die with the agent even when the agent is SIGKILLed, so each one gets a
//! parent-death signal (`PR_SET_PDEATHSIG`). The standard library cannot set it without a
//! `pre_exec` hook, and a hook makes it `fork` the agent: with `spawner dev`'s address space
//! that copied tens of megabytes of page tables per container and was two thirds of the CPU a
//! spawn cost under a burst. Running util-linux's `setpriv --pdeathsig` in between cost a
//! second `exec` per container instead (about 0.8 ms of CPU on the development machine, most of
//! a small backend's start).
//!
//! So [`spawn`] does what `posix_spawn` does, plus the one call it lacks: a `vfork`-style clone
//! (`CLONE_VM | CLONE_VFORK`: nothing is copied, the agent's thread waits until the child has
//! called `execve`), where the child resets signal handlers, makes its own process group, sets
//! the parent-death signal, redirects stdio, changes directory and execs. The child runs on the
//! agent's memory until then, so it only makes system calls on data prepared beforehand, and
//! an `execve` failure comes back through that shared memory. The process is then awaited
//! through a pidfd (Linux 5.3+).
//!
//! The program is resolved on the pod's `PATH` first, as `execvp` would, so "no such command"
//! is a start error with a clear message.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// What the child needs, prepared by the parent: only pointers into memory the parent keeps
/// alive (and does not touch) until the clone returns.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null for "stay in the agent's directory".
    cwd: *const libc::c_char,
    /// Descriptors to become the child's stdin, stdout and stderr.
    stdio: [RawFd; 3],
    parent: libc::pid_t,
    /// The signal mask of the parent thread before it blocked everything for the clone.
    mask: libc::sigset_t,
    /// The step that failed and its errno, 0 while all is well.
    failed_step: AtomicI32,
    errno: AtomicI32,
}

const STEP_PGROUP: i32 = 1;
const STEP_PDEATHSIG: i32 = 2;
const STEP_STDIO: i32 = 3;
const STEP_CHDIR: i32 = 4;
const STEP_EXEC: i32 = 5;

fn step_name(step: i32) -> &'static str {
    match step {
        STEP_PGROUP => "setpgid",
        STEP_PDEATHSIG => "setting the parent-death signal",
        STEP_STDIO => "redirecting stdio",
        STEP_CHDIR => "changing to the working directory",
        _ => "execve",
    }
}

/// The cloned child, before `execve`. Runs on the parent's memory: system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `ChildArgs` the parent keeps alive until this child has
    // exec'd or exited (CLONE_VFORK suspends the parent until then).
    let args = unsafe { &*(arg as *const ChildArgs) };
    let fail = |step: i32| -> libc::c_int {
        // SAFETY: reading errno and _exit are async-signal-safe.
        unsafe {
            args.errno
                .store(*libc::__errno_location(), Ordering::Relaxed);
            args.failed_step.store(step, Ordering::Relaxed);
            libc::_exit(127)
        }
    };
    // SAFETY: system calls on the prepared data; the handler table is the child's own copy
    // (no CLONE_SIGHAND), so resetting it leaves the agent's untouched.
    unsafe {
        // No agent signal handler may run here (it would run on the agent's memory): every
        // signal is blocked (the parent blocked them before the clone) until each handled one
        // is back to its default. SIGPIPE is back to default too, as the standard library does.
        for signal in 1..libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            if current.sa_sigaction != libc::SIG_DFL
                && (current.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
        if libc::setpgid(0, 0) != 0 {
            return fail(STEP_PGROUP);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return fail(STEP_PDEATHSIG);
        }
        // The agent died before the signal was set: it would never come.
        if libc::getppid() != args.parent {
            return fail(STEP_PDEATHSIG);
        }
        for (target, fd) in args.stdio.iter().enumerate() {
            let target = target as RawFd;
            let ok = if *fd == target {
                // Already in place: only make it survive the exec.
                libc::fcntl(target, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(*fd, target) == target
            };
            if !ok {
                return fail(STEP_STDIO);
            }
        }
        if !args.cwd.is_null() && libc::chdir(args.cwd) != 0 {
            return fail(STEP_CHDIR);
        }
        libc::execve(args.program, args.argv, args.envp);
        fail(STEP_EXEC)
    }
}

/// A started container process.
#[derive(Debug)]
pub(crate) struct Launched {
    pub pid: u32,
    pidfd: OwnedFd,
}

impl Launched {
    /// Waits for the process to end and reaps it.
    pub async fn wait(self) -> io::Result<ExitStatus> {
        // SAFETY: the pidfd is owned by the AsyncFd from here on and stays open until it drops.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(self.pidfd, tokio::io::Interest::READABLE)? };
        let _ready = pidfd.readable().await?;
        let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child; the pid cannot be reused before it is reaped.
            let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
            if reaped == pid {
                return Ok(ExitStatus::from_raw(status));
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| format!("{what} contains a NUL byte"))
}

/// One process to start: the resolved program, its whole argv (argv[0] included), its whole
/// environment, its working directory and the descriptors for stdin, stdout and stderr.
pub(crate) struct Launch<'a> {
    pub program: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub working_dir: Option<&'a Path>,
    pub stdio: [RawFd; 3],
}

/// Bytes of stack the child runs on until `execve`.
const CHILD_STACK: usize = 64 * 1024;

/// Held shared while a child is cloned, exclusively by [`exclusive_of_starts`].
static STARTING: RwLock<()> = RwLock::new(());

/// Runs `probe` while no child is being cloned. A child gets a copy of the agent's file
/// descriptor table at the clone and holds it until `execve` closes the close-on-exec ones, so a
/// socket the agent opens and closes meanwhile lives on in the child for that while. The port
/// probe of the process runtime is such a socket: a pod's app then found its leased port "in
/// use" (a few times in a `just bench-spawn` run; `a_leased_port_is_free_for_the_app...` in
/// `process.rs` shows it). Sockets `probe` closes are really closed when it returns.
pub(crate) fn exclusive_of_starts<T>(probe: impl FnOnce() -> T) -> T {
    let _no_clone = STARTING.write().unwrap_or_else(|e| e.into_inner());
    probe()
}

/// Starts `launch` in its own process group with the parent-death signal set (see the module
/// documentation). Call from a thread that lives as long as the process should: the signal
/// fires when the *thread* that started the process ends (a runtime worker, not a blocking-pool
/// thread).
pub(crate) fn spawn(launch: &Launch<'_>) -> Result<Launched, String> {
    let program = cstring(launch.program.as_os_str().as_bytes(), "the program path")?;
    let argv: Vec<CString> = launch
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = launch
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "an environment variable"))
        .collect::<Result<_, _>>()?;
    let cwd = launch
        .working_dir
        .map(|d| cstring(d.as_os_str().as_bytes(), "the working directory"))
        .transpose()?;
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The child's stack until it execs; generous for a handful of system calls. It lives in
    // this frame, which the suspended parent does not use meanwhile: a fresh 64 KiB heap block
    // per container cost a page fault and zeroing on most starts.
    let mut stack = std::mem::MaybeUninit::<[u8; CHILD_STACK]>::uninit();
    // SAFETY: all-zero is a valid (empty) signal set, filled below.
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio: launch.stdio,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        mask: unsafe { std::mem::zeroed() },
        failed_step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
    };
    // SAFETY: the stack is ours and outlives the child's use of it (CLONE_VFORK returns only
    // after the child exec'd or exited); `args` and everything it points to stay alive and
    // untouched until then; all signals are blocked around the clone so no handler of the
    // agent runs in the child before it resets them.
    // No probe socket of `exclusive_of_starts` is open while the child's table is copied.
    let cloning = STARTING.read().unwrap_or_else(|e| e.into_inner());
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.mask);
        // The stack grows down: its top, aligned to 16 bytes.
        let top = stack.as_mut_ptr().cast::<u8>().add(CHILD_STACK) as usize & !15;
        let pid = libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut ChildArgs as *mut libc::c_void,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
        if pid < 0 {
            return Err(format!("cannot start a process: {clone_error}"));
        }
        pid
    };
    drop(cloning);
    let step = args.failed_step.load(Ordering::Relaxed);
    if step != 0 {
        let errno = args.errno.load(Ordering::Relaxed);
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(format!(
            "{} failed: {}",
            step_name(step),
            io::Error::from_raw_os_error(errno)
        ));
    }
    // SAFETY: pidfd_open on our own (unreaped) child.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: the child has to go if it cannot be watched; then reap it.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(format!(
            "cannot watch the process (pidfd_open needs Linux 5.3 or later): {error}"
        ));
    }
    // SAFETY: a fresh descriptor from pidfd_open, owned from here on.
    // (pidfd_open sets close-on-exec itself.)
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    Ok(Launched {
        pid: pid as u32,
        pidfd,
    })
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

/// The resolved program and the remaining arguments of the container command `argv`, with its
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
    Ok((resolved, args.to_vec()))
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
        // The program is resolved to an absolute path, before its arguments.
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

    fn temp_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spawner-launch-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn run(argv: &[&str], env: &[(&str, &str)], dir: Option<&Path>, out: RawFd) -> Launched {
        use std::os::fd::AsRawFd;
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (program, _) = command_line(&argv, &env, dir).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        spawn(&Launch {
            program: &program,
            argv: &argv,
            env: &env,
            working_dir: dir,
            stdio: [null.as_raw_fd(), out, out],
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_process_gets_its_arguments_environment_directory_output_and_group() {
        use std::os::fd::AsRawFd;
        let dir = temp_dir("run");
        let log = std::fs::File::create(dir.join("out.log")).unwrap();
        let script = "echo \"$0 $1 $GREETING $(pwd)\"; echo to-stderr >&2; \
                      [ \"$(cut -d' ' -f5 /proc/$$/stat)\" = \"$$\" ] && echo own-group; exit 7";
        let child = run(
            &["sh", "-c", script, "first", "second"],
            &[("GREETING", "hello"), ("PATH", "/usr/bin:/bin")],
            Some(&dir),
            log.as_raw_fd(),
        );
        drop(log);
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        let out = std::fs::read_to_string(dir.join("out.log")).unwrap();
        let canonical = dir.canonicalize().unwrap();
        assert!(
            out.contains(&format!("first second hello {}", canonical.display())),
            "{out}"
        );
        assert!(out.contains("to-stderr"), "{out}");
        assert!(out.contains("own-group"), "{out}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_signalled_process_reports_the_signal() {
        let child = run(&["sh", "-c", "kill -TERM $$; sleep 5"], &[], None, 2);
        let status = child.wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn exec_failures_are_start_errors() {
        let dir = temp_dir("bad");
        // Executable, but neither a binary nor a script: execve refuses it.
        let bad = dir.join("not-a-program");
        std::fs::write(&bad, [0u8, 1, 2, 3]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
        let argv = vec![bad.to_string_lossy().into_owned()];
        let err = spawn(&Launch {
            program: &bad,
            argv: &argv,
            env: &[],
            working_dir: None,
            stdio: [0, 1, 2],
        })
        .unwrap_err();
        assert!(err.contains("execve failed"), "{err}");
        let err = spawn(&Launch {
            program: Path::new("/bin/sh"),
            argv: &["sh".to_string()],
            env: &[],
            working_dir: Some(&dir.join("missing")),
            stdio: [0, 1, 2],
        })
        .unwrap_err();
        assert!(err.contains("working directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
