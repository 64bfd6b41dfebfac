//! Child processes that cannot outlive the test binary.
//!
//! Three layers make sure no etcd or kube-apiserver is left behind:
//! 1. every child leads its own process group, and `ManagedProcess` kills the whole group with
//!    SIGKILL when dropped (a test that panics drops its `ControlPlane` while unwinding);
//! 2. a control plane shared through a `static` is never dropped, so `ControlPlane::shared`
//!    registers an `atexit` hook that kills it when the test binary exits;
//! 3. if the test binary itself is killed (SIGKILL, abort, timeout), the kernel sends SIGKILL to
//!    the children: they are started with `PR_SET_PDEATHSIG`. That signal fires when the *thread*
//!    that forked them exits, so all children are forked by one launcher thread that lives as
//!    long as the process.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use super::Error;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The long-lived thread that forks every child (see the module docs, layer 3).
fn launcher() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("controlplane-launcher".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the control-plane launcher thread: {e}"));
        Mutex::new(requests)
    })
}

fn spawn_on_launcher(command: Command) -> std::io::Result<Child> {
    let (reply, response) = mpsc::channel();
    {
        let requests = launcher()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        requests
            .send((command, reply))
            .map_err(|_| std::io::Error::other("the launcher thread is gone"))?;
    }
    response
        .recv()
        .map_err(|_| std::io::Error::other("the launcher thread is gone"))?
}

/// A running child in its own process group, with stdout and stderr in a log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args...` with its output appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self, Error> {
        let io_error = |context: String| move |source| Error::Io { context, source };
        let out = File::create(&log).map_err(io_error(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_error(format!("duplicating {}", log.display())))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
            #[cfg(target_os = "linux")]
            {
                let parent = std::process::id();
                // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
                // calls (prctl, getppid, _exit), as `pre_exec` requires.
                unsafe {
                    command.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // The parent may have died before prctl: then nobody would kill us.
                        if libc::getppid() as u32 != parent {
                            libc::_exit(1);
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = spawn_on_launcher(command)
            .map_err(io_error(format!("starting {}", program.display())))?;
        Ok(ManagedProcess {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `max_bytes` of the process's output, for error messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let mut tail = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            tail = String::from_utf8_lossy(&bytes).into_owned();
        }
        format!(
            "--- last output of {} ({}) ---\n{tail}",
            self.name,
            self.log.display()
        )
    }

    /// Kills the whole process group and reaps the child. Idempotent.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            // The child leads its group, so its pid is the group id.
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when a process with this pid exists (used to clean up after killed test binaries).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_takes_down_the_process_group() {
        let dir = std::env::temp_dir().join(format!("spawner-process-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("grandchild.pid");
        // The child forks a grandchild in the same group and waits on it.
        let script = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let mut process = ManagedProcess::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".to_string(), script],
            dir.join("sh.log"),
        )
        .unwrap();
        let grandchild = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && let Ok(pid) = text.trim().parse::<u32>()
            {
                break pid;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(process_alive(process.pid()));
        assert!(process_alive(grandchild));
        process.kill();
        assert!(process.exited().is_some());
        // The grandchild is reparented to init (or a subreaper) and reaped there; wait for it.
        let mut gone = false;
        for _ in 0..250 {
            if !process_alive(grandchild) || is_zombie(grandchild) {
                gone = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(gone, "grandchild {grandchild} survived the group kill");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn is_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[test]
    fn log_tail_reports_output() {
        let dir = std::env::temp_dir().join(format!("spawner-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut process = ManagedProcess::spawn(
            "echo",
            Path::new("/bin/sh"),
            &["-c".to_string(), "echo hello-from-child".to_string()],
            dir.join("echo.log"),
        )
        .unwrap();
        while process.exited().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(process.log_tail(1024).contains("hello-from-child"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
