//! The node agent against a localcluster API server on loopback: real processes, real
//! sockets, kube-rs only (the agent never touches the server's internals).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spawner_localcluster::{Cluster, ServerConfig, SystemClock};
use spawner_node_agent::{
    MESSAGE_NODE_SHUTDOWN, NodeAgentConfig, NodeAgentError, ProcessRuntime, ProcessRuntimeConfig,
    REASON_NODE_SHUTDOWN, SchedulingPolicy, SpawnerSidecar,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

async fn start_cluster() -> Client {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    tokio::spawn(spawner_localcluster::serve(listener, cluster));
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.default_namespace = "default".into();
    Client::try_from(config).unwrap()
}

struct RunningAgent {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), NodeAgentError>>,
}

impl RunningAgent {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task")
            .expect("agent ran");
    }
}

fn start_agent(
    client: &Client,
    nodes: &[&str],
    policy: SchedulingPolicy,
    first_ip: Ipv4Addr,
) -> RunningAgent {
    start_agent_with(client, nodes, policy, first_ip, 110)
}

fn start_agent_with(
    client: &Client,
    nodes: &[&str],
    policy: SchedulingPolicy,
    first_ip: Ipv4Addr,
    max_pods: u32,
) -> RunningAgent {
    let config = NodeAgentConfig {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        scheduling: Some(policy),
        max_pods,
        heartbeat_interval: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(2),
        ..NodeAgentConfig::default()
    };
    let runtime = Arc::new(ProcessRuntime::new(
        ProcessRuntimeConfig {
            first_pod_ip: first_ip,
            log_dir: None,
        },
        SpawnerSidecar,
    ));
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(spawner_node_agent::run(
        client.clone(),
        config,
        runtime,
        async move {
            let _ = stopped.await;
        },
    ));
    RunningAgent { stop, task }
}

fn process_pod(name: &str, script: &str, grace: i64) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [{
                "name": "main",
                // Required by the API server; process mode runs the command and ignores it.
                "image": "busybox:1.36",
                "command": ["sh", "-c"],
                "args": [script]
            }]
        }
    }))
    .unwrap()
}

async fn wait_for(api: &Api<Pod>, name: &str, what: &str, done: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(pod) = api.get_opt(name).await.unwrap() {
            if done(&pod) {
                return pod;
            }
            last = Some(pod);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pod {name} never got {what}; last seen: {last:#?}");
}

async fn wait_gone(api: &Api<Pod>, name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if api.get_opt(name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pod {name} was never removed");
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// The process group of the pod's first container, from its containerID.
fn process_group(pod: &Pod) -> i32 {
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .expect("container id");
    id.strip_prefix("spawner-process://")
        .expect("process container id")
        .parse()
        .unwrap()
}

/// Processes of the group `pgid` that still exist and are not zombies (a killed process
/// whose parent has not collected it yet runs nothing).
fn live_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold anything, so split after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            members.push(pid);
        }
    }
    members
}

fn group_alive(pgid: i32) -> bool {
    !live_members(pgid).is_empty()
}

/// SIGKILL is delivered at once, but the kernel tears a process down asynchronously.
async fn wait_group_gone(pgid: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while group_alive(pgid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process group {pgid} outlived its pod: {:?}",
            live_members(pgid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_process_and_reports_running_then_its_exit() {
    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["n1"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 2, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    pods.create(
        &PostParams::default(),
        &process_pod("sleeper", "exec sleep 300", 5),
    )
    .await
    .unwrap();
    let pod = wait_for(&pods, "sleeper", "Running and Ready", |p| {
        phase(p) == Some("Running") && condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    assert!(status.pod_ip.as_deref().unwrap().starts_with("127."));
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(status.start_time.is_some());
    for type_ in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(condition(&pod, type_).as_deref(), Some("True"), "{type_}");
    }
    let container = &status.container_statuses.as_ref().unwrap()[0];
    assert!(container.state.as_ref().unwrap().running.is_some());
    let pgid = process_group(&pod);
    assert!(group_alive(pgid), "the process runs");

    pods.create(
        &PostParams::default(),
        &process_pod("crasher", "sleep 0.3; exit 3", 5),
    )
    .await
    .unwrap();
    let pod = wait_for(&pods, "crasher", "Failed", |p| phase(p) == Some("Failed")).await;
    let terminated = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .expect("terminated");
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert!(terminated.finished_at.is_some());
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));

    pods.create(
        &PostParams::default(),
        &process_pod("finisher", "exit 0", 5),
    )
    .await
    .unwrap();
    let pod = wait_for(&pods, "finisher", "Succeeded", |p| {
        phase(p) == Some("Succeeded")
    })
    .await;
    let terminated = pod.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (0, Some("Completed"))
    );

    agent.stop().await;
    wait_group_gone(pgid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_without_command_is_a_clear_pod_failure() {
    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["n1"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 3, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "imaged"},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = wait_for(&pods, "imaged", "Failed", |p| phase(p) == Some("Failed")).await;
    let status = pod.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("ProcessModeNeedsCommand"));
    let message = status.message.unwrap();
    assert!(
        message.contains("nginx:1.27") && message.contains("container engine"),
        "{message}"
    );
    let terminated = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        terminated.reason.as_deref(),
        Some("ProcessModeNeedsCommand")
    );

    // A failed pod is still removed when deleted.
    pods.delete("imaged", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&pods, "imaged").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_kills_the_whole_process_group_then_removes_the_pod() {
    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["n1"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 4, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    // A process with a child of its own: SIGTERM to the group ends both.
    pods.create(
        &PostParams::default(),
        &process_pod("polite", "sleep 300 & wait", 30),
    )
    .await
    .unwrap();
    // A process group that ignores SIGTERM: SIGKILL after the 1 s grace period.
    pods.create(
        &PostParams::default(),
        &process_pod("stubborn", "trap '' TERM; sleep 300 & wait; sleep 300", 1),
    )
    .await
    .unwrap();
    let mut groups = Vec::new();
    for name in ["polite", "stubborn"] {
        let pod = wait_for(&pods, name, "Running", |p| phase(p) == Some("Running")).await;
        let pgid = process_group(&pod);
        assert!(group_alive(pgid));
        groups.push(pgid);
    }
    // Let the shells start their children before they are signalled.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = tokio::time::Instant::now();
    for name in ["polite", "stubborn"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["polite", "stubborn"] {
        wait_gone(&pods, name).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the stubborn pod got its grace period before SIGKILL"
    );
    for pgid in groups {
        wait_group_gone(pgid).await;
    }

    // Force deletion removes the object at once; the agent still stops the processes.
    pods.create(
        &PostParams::default(),
        &process_pod("forced", "sleep 300 & wait", 1),
    )
    .await
    .unwrap();
    let pod = wait_for(&pods, "forced", "Running", |p| phase(p) == Some("Running")).await;
    let pgid = process_group(&pod);
    pods.delete("forced", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_gone(&pods, "forced").await;
    wait_group_gone(pgid).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_agent_stops_every_pod_and_the_node() {
    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["n1"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 5, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut groups = Vec::new();
    for name in ["one", "two"] {
        pods.create(
            &PostParams::default(),
            &process_pod(name, "trap '' TERM; sleep 300", 30),
        )
        .await
        .unwrap();
    }
    for name in ["one", "two"] {
        let pod = wait_for(&pods, name, "Running", |p| phase(p) == Some("Running")).await;
        groups.push(process_group(&pod));
    }
    agent.stop().await;
    for pgid in groups {
        wait_group_gone(pgid).await;
    }
    for name in ["one", "two"] {
        let pod = pods.get(name).await.unwrap();
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(status.reason.as_deref(), Some(REASON_NODE_SHUTDOWN));
        assert_eq!(status.message.as_deref(), Some(MESSAGE_NODE_SHUTDOWN));
    }
    let node = Api::<Node>::all(client.clone()).get("n1").await.unwrap();
    let ready = node
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_across_two_nodes_and_heartbeats_both() {
    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["left", "right"],
        SchedulingPolicy::RoundRobin,
        Ipv4Addr::new(127, 6, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let names: Vec<String> = (0..4).map(|i| format!("spread-{i}")).collect();
    for name in &names {
        pods.create(
            &PostParams::default(),
            &process_pod(name, "exec sleep 300", 1),
        )
        .await
        .unwrap();
    }
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for name in &names {
        let pod = wait_for(&pods, name, "Running", |p| phase(p) == Some("Running")).await;
        *per_node
            .entry(pod.spec.unwrap().node_name.unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_node.get("left"), Some(&2), "{per_node:?}");
    assert_eq!(per_node.get("right"), Some(&2), "{per_node:?}");

    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    for name in ["left", "right"] {
        let node = nodes.get(name).await.unwrap();
        let status = node.status.unwrap();
        assert!(
            status
                .conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        assert_eq!(status.capacity.unwrap()["pods"].0, "110");
        let first = leases
            .get(name)
            .await
            .unwrap()
            .spec
            .unwrap()
            .renew_time
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let later = leases
            .get(name)
            .await
            .unwrap()
            .spec
            .unwrap()
            .renew_time
            .unwrap();
        assert!(later.0 > first.0, "lease of {name} is renewed");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_pod_gets_its_own_address_with_the_sidecar_in_front_of_the_app() {
    use spawner_core::children::{ChildrenConfig, DEFAULT_SIDECAR_PORT, build_pod};
    use spawner_core::resource::SessionLivedBackend;

    let client = start_cluster().await;
    let agent = start_agent(
        &client,
        &["n1"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 7, 0, 1),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": "room", "namespace": "default", "uid": "0b5d9c1e-backend"},
        "spec": {
            "template": {"spec": {"containers": [{
                "name": "app",
                "image": "python:3.11",
                "command": ["python3", "-m", "http.server", "--bind", "0.0.0.0"],
                "args": ["$(PORT)"]
            }]}},
            "httpPort": 8080,
            "gracePeriodSeconds": 30
        }
    }))
    .unwrap();
    let mut pod = build_pod(&backend, &ChildrenConfig::default(), "secret-token").unwrap();
    // The owner does not exist in this cluster; the garbage collector would remove the pod.
    pod.metadata.owner_references = None;
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = wait_for(&pods, "room", "Ready", |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
    let pod_ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();

    let sidecar = format!("{pod_ip}:{DEFAULT_SIDECAR_PORT}");
    let health = http_get(&sidecar, "/_spawner/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    // Through the sidecar to python's http.server (which answers HTTP/1.0).
    let listing = http_get(&sidecar, "/").await;
    assert!(
        listing.starts_with("HTTP/1.0 200") && listing.contains("Directory listing"),
        "{listing}"
    );

    let app_pgid = process_group(&pod);
    pods.delete("room", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "room").await;
    wait_group_gone(app_pgid).await;
    // The sidecar's address is free again.
    tokio::net::TcpListener::bind(&sidecar)
        .await
        .expect("sidecar port released");
    agent.stop().await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Bindings run concurrently, so a burst must still respect each node's capacity: pods whose
/// binding is in flight count on their node. Ten pods at once on two nodes of three pods each:
/// exactly six are bound (three per node), four wait Unschedulable, and they are bound as
/// room frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pods_never_overfills_a_node() {
    let client = start_cluster().await;
    let agent = start_agent_with(
        &client,
        &["n1", "n2"],
        SchedulingPolicy::LeastLoaded,
        Ipv4Addr::new(127, 9, 0, 1),
        3,
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    // The nodes first, so no pod is bound before both exist.
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    while nodes.list(&Default::default()).await.unwrap().items.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "nodes registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<String> = (0..10).map(|i| format!("burst-{i}")).collect();
    let creates = names.iter().map(|name| {
        let pods = pods.clone();
        let pod = process_pod(name, "exec sleep 300", 1);
        async move { pods.create(&PostParams::default(), &pod).await.unwrap() }
    });
    futures::future::join_all(creates).await;

    let per_node = |list: &[Pod]| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for pod in list {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                *counts.entry(node).or_default() += 1;
            }
        }
        counts
    };
    // Wait until the four that do not fit are reported Unschedulable.
    let deadline = tokio::time::Instant::now() + WAIT;
    let list = loop {
        let list = pods.list(&Default::default()).await.unwrap().items;
        let unschedulable = list
            .iter()
            .filter(|p| condition(p, "PodScheduled").as_deref() == Some("False"))
            .count();
        let counts = per_node(&list);
        assert!(
            counts.values().all(|&n| n <= 3),
            "a node got more than its 3 pods: {counts:?}"
        );
        if unschedulable == 4 && counts.values().sum::<usize>() == 6 {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled at 6 bound + 4 unschedulable: {counts:?}, {unschedulable} unschedulable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        per_node(&list).into_values().collect::<Vec<_>>(),
        vec![3, 3],
        "least loaded spreads the burst evenly"
    );

    // Room frees up: the waiting pods are bound, still never beyond capacity.
    let bound: Vec<String> = list
        .iter()
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for name in &bound {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in &bound {
        wait_gone(&pods, name).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = pods.list(&Default::default()).await.unwrap().items;
        let counts = per_node(&list);
        assert!(counts.values().all(|&n| n <= 3), "{counts:?}");
        if list.len() == 4 && counts.values().sum::<usize>() == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting pods were never bound: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
}
