//! The client commands against a running `spawner dev`: `status --watch` prints each phase in
//! order and its exit code says how the spawn ended; every error is one line and a non-zero exit.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{Dev, DevOptions, PHASES_TO_READY, SPAWNER, free_port};

/// Runs a prepared client command to completion, at most 60 s.
fn run(mut command: std::process::Command) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start spawner");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("spawner {command:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first word of each line: the phase column of `status --watch`.
fn phase_column(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Asserts a failed command wrote exactly one line on stderr, containing `expected`.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "a non-zero exit; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {stderr:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(expected),
        "the line says {expected:?}: {stderr:?}"
    );
}

#[test]
fn status_watch_follows_phases_and_exits_by_outcome() {
    let dev = Dev::start(DevOptions::default());

    // A backend that binds its port: watched to Ready, exit 0.
    let mut spawn = dev.cli();
    spawn.args(["spawn", "--grace", "60", "--", SPAWNER, "demo-backend"]);
    let spawned = run(spawn);
    assert!(spawned.status.success(), "spawn: {}", text(&spawned.stderr));
    let name = text(&spawned.stdout).trim().to_string();
    assert!(name.starts_with("slab-"), "spawn prints the name: {name:?}");
    let mut watch = dev.cli();
    watch.args(["status", "--watch", &name]);
    let watched = run(watch);
    let stdout = text(&watched.stdout);
    assert!(
        watched.status.success(),
        "status --watch exits 0 at Ready; stdout {stdout:?}, stderr {:?}",
        text(&watched.stderr)
    );
    assert_eq!(phase_column(&stdout), PHASES_TO_READY, "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.contains("url=http://")),
        "the Ready line gives the URL: {stdout}"
    );

    // `ls` lists it, `rm` terminates it.
    let mut ls = dev.cli();
    ls.arg("ls");
    let listed = run(ls);
    assert!(listed.status.success(), "ls: {}", text(&listed.stderr));
    let listing = text(&listed.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("Ready")),
        "ls shows {name} Ready: {listing}"
    );
    let mut rm = dev.cli();
    rm.args(["rm", &name]);
    let removed = run(rm);
    assert!(removed.status.success(), "rm: {}", text(&removed.stderr));
    assert_eq!(text(&removed.stdout).trim(), format!("{name} terminating"));

    // An application that exits at once: the watch ends at Failed with a non-zero exit.
    let mut spawn = dev.cli();
    spawn.args(["spawn", "--", "sh", "-c", "exit 3"]);
    let spawned = run(spawn);
    assert!(spawned.status.success(), "spawn: {}", text(&spawned.stderr));
    let failing = text(&spawned.stdout).trim().to_string();
    let mut watch = dev.cli();
    watch.args(["status", "--watch", &failing]);
    let watched = run(watch);
    let stdout = text(&watched.stdout);
    let phases = phase_column(&stdout);
    assert_eq!(
        phases.last().map(String::as_str),
        Some("Failed"),
        "the watch ends at Failed: {stdout}"
    );
    assert!(
        !phases.iter().any(|p| p == "Ready"),
        "never Ready: {stdout}"
    );
    let order: Vec<usize> = phases
        .iter()
        .map(|p| {
            ["Submitted", "Constructed", "Scheduled", "Running", "Failed"]
                .iter()
                .position(|q| q == p)
                .unwrap_or_else(|| panic!("unexpected phase {p} in {stdout}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "phases in order: {stdout}"
    );
    assert!(
        stdout.contains("exitCode=3"),
        "the Failed line gives the app's exit code: {stdout}"
    );
    assert_one_line_error(&watched, "did not become Ready");
}

#[test]
fn every_error_is_one_line_and_a_non_zero_exit() {
    // Nothing listens on this port.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut command = std::process::Command::new(SPAWNER);
    command
        .args(["ls", "--api", &nowhere, "--token", "t"])
        .env_remove("SPAWNER_TOKEN")
        .env_remove("SPAWNER_API_URL")
        .env("RUST_LOG", "warn");
    assert_one_line_error(&run(command), "cannot reach the api");

    let dev = Dev::start(DevOptions::default());

    let mut bad_token = dev.cli();
    bad_token.args(["ls", "--token", "not-the-token"]);
    assert_one_line_error(&run(bad_token), "SPAWNER_TOKEN");

    let mut no_token = dev.cli();
    no_token.env_remove("SPAWNER_TOKEN").arg("ls");
    assert_one_line_error(&run(no_token), "SPAWNER_TOKEN");

    for args in [
        &["status", "slab-doesnotexist"][..],
        &["status", "--watch", "slab-doesnotexist"],
        &["rm", "slab-doesnotexist"],
    ] {
        let mut unknown = dev.cli();
        unknown.args(args);
        let output = run(unknown);
        assert_one_line_error(&output, "slab-doesnotexist");
    }

    // A spec the api refuses names the field.
    let mut invalid = dev.cli();
    invalid.args(["spawn", "--port", "0", "--", "true"]);
    let refused = run(invalid);
    assert_one_line_error(&refused, "port");
    assert_eq!(
        text(&refused.stderr).matches("port:").count(),
        1,
        "each problem said once: {}",
        text(&refused.stderr)
    );
}
