//! Ends every process of the runtime's containers when the agent dies, even by SIGKILL.
//!
//! The parent-death signal (`launch`) reaches only each container's own process: what it
//! started itself (a shell's children, a server's workers) is reparented and lives on. Each
//! container is a process group, so a small keeper process holds the list of live groups and
//! kills them all when the agent is gone. It learns that the way any process can, whatever
//! killed the agent: its end of a pipe from the agent reads end-of-file.
//!
//! The keeper is `sh` (builtins only: no process per message) in a process group of its own, so
//! a signal to the agent's group (a terminal's Ctrl-C, a test's kill of `spawner dev`'s group)
//! leaves it to do its work; it ignores the terminal's signals for the same reason.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// Reads `+ <pgid>` and `- <pgid>` lines; at end of input, SIGKILLs every group still listed.
const SCRIPT: &str = r#"trap '' HUP INT QUIT TERM
groups=' '
while read -r op id; do
  case $op in
    +) groups="$groups$id " ;;
    -) case $groups in *" $id "*) groups="${groups%% $id *} ${groups#* $id }" ;; esac ;;
  esac
done
for id in $groups; do kill -KILL -"$id" 2>/dev/null; done
"#;

/// The agent's end of the keeper.
pub(crate) struct GroupKeeper {
    input: Mutex<Option<ChildStdin>>,
    process: Child,
}

impl GroupKeeper {
    /// Starts the keeper.
    pub(crate) fn start() -> std::io::Result<Self> {
        let mut process = Command::new("sh")
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let input = process.stdin.take();
        Ok(Self {
            input: Mutex::new(input),
            process,
        })
    }

    /// The keeper's pid (tests look for it).
    pub(crate) fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Group `pgid` (a container just started) is killed if the agent dies.
    pub(crate) fn track(&self, pgid: i32) {
        self.send('+', pgid);
    }

    /// Group `pgid` was killed by the agent: forgotten (its number may be reused).
    pub(crate) fn forget(&self, pgid: i32) {
        self.send('-', pgid);
    }

    fn send(&self, op: char, pgid: i32) {
        let mut input = self.input.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = input.as_mut() else { return };
        // A short line into a pipe the keeper drains as it comes: never blocks for long.
        if let Err(e) = pipe.write_all(format!("{op} {pgid}\n").as_bytes()) {
            tracing::warn!(error = %e, "the process-group keeper is gone: a killed agent may leave processes behind");
            *input = None;
        }
    }
}

impl Drop for GroupKeeper {
    fn drop(&mut self) {
        // End of input: the keeper kills what is left (nothing, after an orderly stop) and
        // exits; reap it so no zombie stays behind.
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.process.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::{Duration, Instant};

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    fn group_of_sleeps() -> Child {
        // A group leader with a child of its own, as a container's shell and its worker.
        Command::new("sh")
            .args(["-c", "sleep 600 & wait"])
            .process_group(0)
            .spawn()
            .expect("sh")
    }

    fn wait_until(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn tracked_groups_are_killed_when_the_agent_end_closes_and_forgotten_ones_are_not() {
        let keeper = GroupKeeper::start().expect("keeper");
        let mut tracked = group_of_sleeps();
        let mut forgotten = group_of_sleeps();
        let tracked_pid = tracked.id() as i32;
        let forgotten_pid = forgotten.id() as i32;
        keeper.track(tracked_pid);
        keeper.track(forgotten_pid);
        keeper.forget(forgotten_pid);
        // The agent's end closes (as when the agent dies).
        drop(keeper);
        assert!(
            wait_until(|| tracked.try_wait().is_ok_and(|s| s.is_some())),
            "the tracked group's leader outlived the keeper's input"
        );
        // Its child (reparented, then reaped by init) goes with it.
        assert!(
            wait_until(|| !alive(-tracked_pid)),
            "the tracked group outlived the keeper's input"
        );
        assert!(alive(forgotten_pid), "a forgotten group was killed");
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe { libc::killpg(forgotten_pid, libc::SIGKILL) };
        let _ = forgotten.wait();
    }
}
