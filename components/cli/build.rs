//! Sets `SPAWNER_GIT_COMMIT` for `spawner --version`: the `SPAWNER_GIT_COMMIT` environment
//! variable when it is set (the Dockerfile's builder stage, which has no .git), else the
//! checkout's HEAD, else "unknown" (a source tarball).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SPAWNER_GIT_COMMIT");
    let commit = std::env::var("SPAWNER_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown")
        .or_else(head_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SPAWNER_GIT_COMMIT={commit}");
}

/// HEAD's abbreviated commit, and the files whose change means a new HEAD (HEAD itself for a
/// checkout or branch switch, the branch's ref for a commit, packed-refs for a gc).
fn head_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        // A missing file would make cargo rerun this script on every build.
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}
