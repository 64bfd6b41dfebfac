//! `kubectl get`, `get -w`, `create` and `delete` against localcluster. Skips (with a message)
//! where no kubectl is installed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use spawner_localcluster::{
    Cluster, ServerCertificates, ServerConfig, SystemClock, TlsListener, serve, write_kubeconfig,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn kubectl_available() -> bool {
    std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Kubectl {
    kubeconfig: std::path::PathBuf,
    cache: std::path::PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, stdout, stderr) = self.output(args, stdin).await;
        assert!(ok, "kubectl {args:?} failed: {stderr}\n{stdout}");
        stdout
    }

    async fn output(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut c = self.command(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("kubectl starts");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input.as_bytes()).await.unwrap();
        }
        drop(child.stdin.take());
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl finishes")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    }
}

const MANIFEST: &str = r#"
apiVersion: spawner.dev/v1
kind: SessionLivedBackend
metadata:
  name: demo
  namespace: default
spec:
  template:
    spec:
      containers:
      - name: app
        image: registry.invalid/app:1
        command: ["app"]
---
apiVersion: v1
kind: Pod
metadata:
  name: demo-pod
  namespace: default
spec:
  containers:
  - name: app
    image: registry.invalid/app:1
---
apiVersion: v1
kind: Service
metadata:
  name: demo-svc
  namespace: default
spec:
  ports:
  - port: 80
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_and_delete() {
    if !kubectl_available() {
        eprintln!("kubectl is not installed: skipping the kubectl test");
        return;
    }
    // As `spawner dev` serves it: HTTPS with a CA made at start, and a bearer token (which
    // kubectl sends only over TLS: over plain HTTP every request would be 401).
    let token = "kubectl-test-token";
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::tokens(
                [(token.to_string(), spawner_localcluster::Identity::admin())].into(),
            ),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certificates = ServerCertificates::generate(&["127.0.0.1".to_string()]).unwrap();
    let listener = TlsListener::new(listener, &certificates).unwrap();
    let server = tokio::spawn(serve(listener, cluster));
    let dir = std::env::temp_dir().join(format!("spawner-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubectl = Kubectl {
        kubeconfig: dir.join("kubeconfig"),
        cache: dir.join("cache"),
    };
    write_kubeconfig(
        &kubectl.kubeconfig,
        &format!("https://{addr}"),
        Some(&certificates.ca_pem),
        Some(token),
        None,
    )
    .unwrap();

    let created = kubectl
        .run(&["create", "--validate=false", "-f", "-"], Some(MANIFEST))
        .await;
    assert!(
        created.contains("sessionlivedbackend.spawner.dev/demo created"),
        "{created}"
    );

    // kubectl asks for strict field validation: a typo in a backend is refused, not pruned.
    let typo = MANIFEST
        .split("---")
        .next()
        .unwrap()
        .replace("name: demo\n", "name: typo\n")
        .replace("  template:", "  gracePeriod: 5\n  template:");
    let (ok, _, stderr) = kubectl.output(&["create", "-f", "-"], Some(&typo)).await;
    assert!(
        !ok && stderr.contains("strict decoding error: unknown field \"spec.gracePeriod\""),
        "{stderr}"
    );

    // `apply` patches what changed (merge patch for the backend, strategic merge for the pod).
    let changed = MANIFEST
        .replace(
            "        command: [\"app\"]",
            "        command: [\"app\"]\n  gracePeriodSeconds: 60",
        )
        .replace(
            "  name: demo-pod\n",
            "  name: demo-pod\n  labels: {tier: web}\n",
        );
    let applied = kubectl.run(&["apply", "-f", "-"], Some(&changed)).await;
    assert!(
        applied.contains("sessionlivedbackend.spawner.dev/demo configured"),
        "{applied}"
    );
    let grace = kubectl
        .run(
            &[
                "get",
                "slab",
                "demo",
                "-o",
                "jsonpath={.spec.gracePeriodSeconds}",
            ],
            None,
        )
        .await;
    assert_eq!(grace.trim(), "60");
    let labels = kubectl
        .run(&["get", "pods", "-l", "tier=web", "-o", "name"], None)
        .await;
    assert_eq!(labels.trim(), "pod/demo-pod");

    let got = kubectl.run(&["get", "slab,pods,svc"], None).await;
    assert!(
        got.contains("sessionlivedbackend.spawner.dev/demo"),
        "{got}"
    );
    assert!(
        got.contains("pod/demo-pod") && got.contains("Pending"),
        "{got}"
    );
    assert!(
        got.contains("service/demo-svc") && got.contains("80/TCP"),
        "{got}"
    );
    let json = kubectl
        .run(&["get", "pod", "demo-pod", "-o", "json"], None)
        .await;
    let pod: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(pod["metadata"]["name"], "demo-pod");
    let names = kubectl.run(&["get", "slab", "-o", "name"], None).await;
    assert_eq!(names.trim(), "sessionlivedbackend.spawner.dev/demo");

    // `get -w` prints the current object, then changes as they happen.
    let mut watch = kubectl
        .command(&["get", "slab", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let read_until = |want: &'static str| want;
    let wait_for = |seen: &Vec<String>, want: &str| seen.iter().any(|l| l.starts_with(want));
    while !wait_for(&seen, read_until("demo ")) {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("kubectl get -w prints the existing backend")
            .unwrap()
            .expect("kubectl get -w keeps running");
        seen.push(line);
    }
    let second = MANIFEST
        .split("---")
        .next()
        .unwrap()
        .replace("name: demo\n", "name: demo-two\n");
    kubectl
        .run(&["create", "--validate=false", "-f", "-"], Some(&second))
        .await;
    while !wait_for(&seen, "demo-two ") {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("kubectl get -w prints a new backend")
            .unwrap()
            .expect("kubectl get -w keeps running");
        seen.push(line);
    }
    assert!(seen[0].starts_with("NAME"), "header first: {seen:?}");
    watch.kill().await.unwrap();

    let deleted = kubectl
        .run(&["delete", "slab", "demo", "demo-two"], None)
        .await;
    assert!(
        deleted.contains("\"demo\" deleted") && deleted.contains("\"demo-two\" deleted"),
        "{deleted}"
    );
    let left = kubectl.run(&["get", "slab", "-o", "name"], None).await;
    assert_eq!(left.trim(), "", "backends left after delete: {left}");
    kubectl
        .run(&["delete", "pod", "demo-pod", "--wait=true"], None)
        .await;

    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
