//! The harness leaves nothing behind: not when a `ControlPlane` is dropped, not when a test using
//! the shared one panics, not when the test binary is killed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use spawner_e2e::controlplane::{ControlPlane, Identity};

/// Set in the child copy of this test binary that `shared_control_plane_dies_with_its_process`
/// starts; tells it which way to die.
const CHILD_ENV: &str = "SPAWNER_E2E_LIFECYCLE_CHILD";

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

async fn wait_dead(pids: &[u32]) {
    for _ in 0..200 {
        if pids.iter().all(|&pid| !alive(pid)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survivors: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    panic!("processes survived: {survivors:?}");
}

#[tokio::test]
async fn dropping_the_control_plane_kills_it_and_removes_its_files() {
    if !ControlPlane::binaries_or_skip("dropping_the_control_plane_kills_it_and_removes_its_files")
        .await
    {
        return;
    }
    let control_plane = ControlPlane::start().await.unwrap();
    let pids = control_plane.pids();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    assert!(pids.iter().all(|&pid| alive(pid)));
    let dir = control_plane.dir().to_path_buf();
    assert!(dir.join("kubeconfig").is_file());

    // It works, as every identity: /version answers the pinned release.
    let client = control_plane
        .client_for(Identity::Unprivileged)
        .await
        .unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        version.git_version,
        spawner_e2e::controlplane::kubernetes_version()
    );
    // kubectl works with the written kubeconfig.
    if let Ok(output) = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(control_plane.kubeconfig_path())
        .args(["get", "crd", "-o", "name"])
        .output()
    {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("sessionlivedbackends.spawner.dev"),
            "kubectl: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    drop(control_plane);
    wait_dead(&pids).await;
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

/// Runs this test binary again, filtered to this test, as a child that starts the shared control
/// plane, prints its pids and directory, then dies as `how` says. Returns what it printed.
fn run_child(how: &str) -> (Vec<u32>, PathBuf, std::process::Child, PathBuf) {
    // Its stderr (with an expected panic message) goes to a file, shown only if something fails.
    let stderr_log = std::env::temp_dir().join(format!(
        "spawner-lifecycle-{}-{how}.log",
        std::process::id()
    ));
    let stderr = std::fs::File::create(&stderr_log).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shared_control_plane_dies_with_its_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, how)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read on a thread that keeps draining, so the child never writes into a closed pipe.
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut pids = Vec::new();
    let mut dir = PathBuf::new();
    // libtest prints `test <name> ... ` without a newline before the test's own output.
    for line in received {
        if let Some((_, rest)) = line.split_once("CHILD pids ") {
            pids = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.trim().parse().unwrap())
                .collect();
        } else if let Some((_, rest)) = line.split_once("CHILD dir ") {
            dir = PathBuf::from(rest.trim());
            break;
        }
    }
    (pids, dir, child, stderr_log)
}

fn child_stderr(log: &PathBuf) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test]
async fn shared_control_plane_dies_with_its_process() {
    match std::env::var(CHILD_ENV).as_deref() {
        Ok(how) => {
            // The child: start the shared control plane, report, then die.
            let Some(cp) = ControlPlane::shared_or_skip("lifecycle child").await else {
                println!("CHILD pids ");
                return;
            };
            let pids: Vec<String> = cp.pids().iter().map(u32::to_string).collect();
            println!("CHILD pids {}", pids.join(","));
            println!("CHILD dir {}", cp.dir().display());
            if how == "panic" {
                panic!("a test using the shared control plane panics");
            }
            // "killed": wait to be SIGKILLed by the parent.
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        Err(_) => {
            if !ControlPlane::binaries_or_skip("shared_control_plane_dies_with_its_process").await {
                return;
            }
            // A panicking test: the binary exits normally (exit code 101) and the atexit hook
            // kills the control plane and removes its directory.
            let (pids, dir, mut child, log) = run_child("panic");
            assert_eq!(
                pids.len(),
                3,
                "child did not report: {}",
                child_stderr(&log)
            );
            let status = child.wait().unwrap();
            assert!(!status.success());
            wait_dead(&pids).await;
            assert!(!dir.exists(), "{} was not removed", dir.display());

            // A killed test binary: no hook runs; the kernel kills the children (PDEATHSIG).
            let _ = std::fs::remove_file(&log);
            let (pids, dir, mut child, log) = run_child("killed");
            assert_eq!(
                pids.len(),
                3,
                "child did not report: {}",
                child_stderr(&log)
            );
            assert!(pids.iter().all(|&pid| alive(pid)));
            child.kill().unwrap();
            child.wait().unwrap();
            wait_dead(&pids).await;
            // Its directory stays (nobody ran a hook); the next control plane started on this
            // machine removes it. Tidy up here instead of waiting for that.
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_file(&log);
        }
    }
}
