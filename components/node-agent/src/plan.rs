//! From a Pod to what the runtime runs: pure functions, no I/O (DESIGN.md rule 1).
//!
//! [`analyse`] checks that a pod can run as local processes and extracts everything that does
//! not depend on the sandbox; [`PodAnalysis::plan`] then fills in the pod's address and the
//! application port the runtime chose, expands `$(VAR)` references as Kubernetes does, and
//! yields the exact containers to start and their readiness probes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use spawner_core::children::{
    DEFAULT_SIDECAR_PORT, EVENTS_TOKEN_ENV, SIDECAR_CONTAINER_NAME, SIDECAR_SERVE_PORT_ENV,
    SIDECAR_UPSTREAM_PORT_ENV,
};

use super::runtime::{ContainerPlan, ContainerRun, SandboxRequest, SidecarPlan};

/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(30);

/// Reason of a pod whose container has an image but no command.
pub const REASON_NEEDS_COMMAND: &str = "ProcessModeNeedsCommand";
/// Reason the kubelet gives when a container's environment cannot be built.
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// Reason of a pod using a feature the process runtime does not have.
pub const REASON_UNSUPPORTED: &str = "UnsupportedPodFeature";

/// Why a pod cannot run in process mode. The pod is reported Failed with this reason and
/// message; it is never left Pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError {
    pub container: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

/// A container's environment value before the sandbox exists.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EnvValue {
    Literal(String),
    PodIp,
    /// `PORT` of the application: the free port the runtime picked.
    AppPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ContainerKind {
    Process {
        command: Vec<String>,
        args: Vec<String>,
        working_dir: Option<String>,
    },
    Sidecar {
        serve_port: u16,
        events_token: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ContainerAnalysis {
    name: String,
    kind: ContainerKind,
    env: Vec<(String, EnvValue)>,
    readiness: Option<ProbeSpec>,
}

/// A readiness probe whose port may still be the application's declared port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProbeSpec {
    http_path: Option<String>,
    port: u16,
    timing: ProbeTiming,
}

/// Timing of a readiness probe, with Kubernetes' defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A readiness probe ready to run against the pod's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadinessProbe {
    /// `Some(path)` for an HTTP GET, `None` for a TCP connect.
    pub http_path: Option<String>,
    pub port: u16,
    pub timing: ProbeTiming,
}

/// Everything about a pod that does not depend on its sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAnalysis {
    containers: Vec<ContainerAnalysis>,
    sandbox: SandboxRequest,
    /// The application container (the first one that is not the sidecar).
    pub app_index: Option<usize>,
    pub sidecar_index: Option<usize>,
    /// The application's declared `PORT` (the backend's httpPort), remapped to the real one.
    declared_app_port: Option<u16>,
    pub termination_grace: Duration,
}

/// The resolved containers and probes of a pod in its sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub containers: Vec<ContainerPlan>,
    /// Per container (same order): its readiness probe, if it has one the agent can run.
    pub readiness: Vec<Option<ReadinessProbe>>,
}

fn env_literal(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .rev()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn config_error(container: &Container, message: String) -> PlanError {
    PlanError {
        container: Some(container.name.clone()),
        reason: REASON_CONFIG_ERROR,
        message,
    }
}

fn parse_port(container: &Container, var: &str, value: &str) -> Result<u16, PlanError> {
    value.trim().parse::<u16>().map_err(|_| {
        config_error(
            container,
            format!(
                "container {:?}: {var}={value:?} is not a port number",
                container.name
            ),
        )
    })
}

/// `metadata.labels['key']` → `("labels", "key")`.
fn map_field(path: &str) -> Option<(&str, &str)> {
    let (map, rest) = path.split_once("['")?;
    let key = rest.strip_suffix("']")?;
    Some((map, key))
}

fn field_ref(
    pod: &Pod,
    container: &Container,
    var: &EnvVar,
    path: &str,
) -> Result<EnvValue, PlanError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let literal = |v: Option<&String>| EnvValue::Literal(v.cloned().unwrap_or_default());
    Ok(match path {
        "metadata.name" => literal(meta.name.as_ref()),
        "metadata.namespace" => literal(meta.namespace.as_ref()),
        "metadata.uid" => literal(meta.uid.as_ref()),
        "spec.nodeName" => literal(spec.and_then(|s| s.node_name.as_ref())),
        "spec.serviceAccountName" => literal(spec.and_then(|s| s.service_account_name.as_ref())),
        "status.podIP" | "status.podIPs" => EnvValue::PodIp,
        // The node's address is the host's loopback in process mode; the sandbox does not
        // change it, so the pod status the agent wrote is not needed.
        "status.hostIP" | "status.hostIPs" => EnvValue::Literal(
            pod.status
                .as_ref()
                .and_then(|s| s.host_ip.clone())
                .unwrap_or_else(|| "127.0.0.1".into()),
        ),
        other => match map_field(other) {
            Some(("metadata.labels", key)) => {
                literal(meta.labels.as_ref().and_then(|m| m.get(key)))
            }
            Some(("metadata.annotations", key)) => {
                literal(meta.annotations.as_ref().and_then(|m| m.get(key)))
            }
            _ => {
                return Err(config_error(
                    container,
                    format!(
                        "container {:?}: env {:?} refers to field {other:?}, which process mode does not provide",
                        container.name, var.name
                    ),
                ));
            }
        },
    })
}

fn analyse_env(pod: &Pod, container: &Container) -> Result<Vec<(String, EnvValue)>, PlanError> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(config_error(
            container,
            format!(
                "container {:?}: envFrom (ConfigMaps/Secrets) is not supported in process mode",
                container.name
            ),
        ));
    }
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(source)) => match &source.field_ref {
                Some(field) => field_ref(pod, container, var, &field.field_path)?,
                None => {
                    return Err(config_error(
                        container,
                        format!(
                            "container {:?}: env {:?} reads a ConfigMap, Secret or resource field, which process mode does not support; give it a value",
                            container.name, var.name
                        ),
                    ));
                }
            },
            (Some(value), None) => EnvValue::Literal(value.clone()),
            (None, None) => EnvValue::Literal(String::new()),
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

fn probe_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn threshold(value: Option<i32>, default: u32) -> u32 {
    value
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// The readiness probe the agent runs for `container`. Exec and gRPC probes have no meaning
/// for a local process here; such a container counts as ready while it runs.
fn analyse_probe(container: &Container, probe: Option<&Probe>) -> Option<ProbeSpec> {
    let probe = probe?;
    let timing = ProbeTiming {
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: threshold(probe.success_threshold, 1),
        failure_threshold: threshold(probe.failure_threshold, 3),
    };
    if let Some(http) = &probe.http_get {
        return Some(ProbeSpec {
            http_path: Some(http.path.clone().unwrap_or_else(|| "/".into())),
            port: probe_port(container, &http.port)?,
            timing,
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        return Some(ProbeSpec {
            http_path: None,
            port: probe_port(container, &tcp.port)?,
            timing,
        });
    }
    None
}

/// Check that `pod` can run as local processes and extract what does not depend on its
/// sandbox.
pub fn analyse(pod: &Pod) -> Result<PodAnalysis, PlanError> {
    let spec = pod.spec.as_ref().ok_or(PlanError {
        container: None,
        reason: REASON_UNSUPPORTED,
        message: "pod has no spec".into(),
    })?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(PlanError {
            container: None,
            reason: REASON_UNSUPPORTED,
            message: "init containers are not supported in process mode".into(),
        });
    }
    if spec.containers.is_empty() {
        return Err(PlanError {
            container: None,
            reason: REASON_UNSUPPORTED,
            message: "pod has no containers".into(),
        });
    }
    let sidecar_index = spec
        .containers
        .iter()
        .position(|c| c.name == SIDECAR_CONTAINER_NAME);
    let app_index = spec
        .containers
        .iter()
        .position(|c| c.name != SIDECAR_CONTAINER_NAME);
    // A backend pod: its application gets a port of its own, and its sidecar points there.
    let remap_app_port = sidecar_index.is_some() && app_index.is_some();

    let mut containers = Vec::with_capacity(spec.containers.len());
    let mut listen_ports = Vec::new();
    let mut declared_app_port = None;
    for (index, container) in spec.containers.iter().enumerate() {
        let mut env = analyse_env(pod, container)?;
        let kind = if Some(index) == sidecar_index {
            let serve_port = match env_literal(container, SIDECAR_SERVE_PORT_ENV) {
                Some(v) => parse_port(container, SIDECAR_SERVE_PORT_ENV, &v)?,
                None => DEFAULT_SIDECAR_PORT,
            };
            let events_token = env_literal(container, EVENTS_TOKEN_ENV).ok_or_else(|| {
                config_error(
                    container,
                    format!("sidecar container has no {EVENTS_TOKEN_ENV}"),
                )
            })?;
            let upstream = env_literal(container, SIDECAR_UPSTREAM_PORT_ENV).ok_or_else(|| {
                config_error(
                    container,
                    format!("sidecar container has no {SIDECAR_UPSTREAM_PORT_ENV}"),
                )
            })?;
            let upstream = parse_port(container, SIDECAR_UPSTREAM_PORT_ENV, &upstream)?;
            if remap_app_port {
                declared_app_port.get_or_insert(upstream);
                for (name, value) in &mut env {
                    if name == SIDECAR_UPSTREAM_PORT_ENV {
                        *value = EnvValue::AppPort;
                    }
                }
            }
            listen_ports.push(serve_port);
            ContainerKind::Sidecar {
                serve_port,
                events_token,
            }
        } else {
            let command = container.command.clone().unwrap_or_default();
            if command.is_empty() {
                let message = match &container.image {
                    Some(image) => format!(
                        "container {:?} has image {image:?} but no command: process mode runs commands on this machine and an image cannot run without a container engine; set the container's command (and args)",
                        container.name
                    ),
                    None => format!(
                        "container {:?} has neither a command nor an image; set its command (and args)",
                        container.name
                    ),
                };
                return Err(PlanError {
                    container: Some(container.name.clone()),
                    reason: REASON_NEEDS_COMMAND,
                    message,
                });
            }
            if remap_app_port && Some(index) == app_index {
                let declared = env_literal(container, "PORT");
                if let Some(declared) = declared.and_then(|p| p.trim().parse::<u16>().ok()) {
                    declared_app_port = Some(declared);
                }
                env.retain(|(name, _)| name != "PORT");
                env.push(("PORT".into(), EnvValue::AppPort));
            }
            ContainerKind::Process {
                command,
                args: container.args.clone().unwrap_or_default(),
                working_dir: container.working_dir.clone(),
            }
        };
        containers.push(ContainerAnalysis {
            name: container.name.clone(),
            kind,
            env,
            readiness: analyse_probe(container, container.readiness_probe.as_ref()),
        });
    }

    Ok(PodAnalysis {
        containers,
        sandbox: SandboxRequest {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            listen_ports,
            wants_app_port: remap_app_port,
        },
        app_index,
        sidecar_index,
        declared_app_port,
        termination_grace: termination_grace(pod),
    })
}

/// The pod's `terminationGracePeriodSeconds`, or Kubernetes' default.
pub fn termination_grace(pod: &Pod) -> Duration {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TERMINATION_GRACE)
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, `$$` is a literal `$`, and
/// anything else is left as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl PodAnalysis {
    /// What to ask the runtime for.
    pub fn sandbox_request(&self) -> SandboxRequest {
        self.sandbox.clone()
    }

    /// Names of the containers, in order.
    pub fn container_names(&self) -> Vec<String> {
        self.containers.iter().map(|c| c.name.clone()).collect()
    }

    /// The containers and probes of the pod in a sandbox at `pod_ip` whose application
    /// listens on `app_port`.
    pub fn plan(&self, pod_ip: IpAddr, app_port: Option<u16>) -> PodPlan {
        let mut containers = Vec::with_capacity(self.containers.len());
        let mut readiness = Vec::with_capacity(self.containers.len());
        for container in &self.containers {
            // Each value may refer to the variables defined before it; command and args to
            // all of them.
            let mut vars = BTreeMap::new();
            let mut env = Vec::with_capacity(container.env.len());
            for (name, value) in &container.env {
                let value = match value {
                    EnvValue::Literal(v) => expand(v, &vars),
                    EnvValue::PodIp => pod_ip.to_string(),
                    EnvValue::AppPort => app_port
                        .or(self.declared_app_port)
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                };
                vars.insert(name.clone(), value.clone());
                env.push((name.clone(), value));
            }
            let run = match &container.kind {
                ContainerKind::Process {
                    command,
                    args,
                    working_dir,
                } => ContainerRun::Process {
                    argv: command
                        .iter()
                        .chain(args.iter())
                        .map(|a| expand(a, &vars))
                        .collect(),
                    env,
                    working_dir: working_dir.clone(),
                },
                ContainerKind::Sidecar {
                    serve_port,
                    events_token,
                } => ContainerRun::Sidecar(SidecarPlan {
                    serve_port: *serve_port,
                    upstream_port: vars
                        .get(SIDECAR_UPSTREAM_PORT_ENV)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_default(),
                    events_token: events_token.clone(),
                    env,
                }),
            };
            containers.push(ContainerPlan {
                name: container.name.clone(),
                run,
            });
            readiness.push(container.readiness.as_ref().map(|probe| ReadinessProbe {
                http_path: probe.http_path.clone(),
                // A probe of the application's declared port goes where it really listens.
                port: match (self.declared_app_port, app_port) {
                    (Some(declared), Some(real))
                        if probe.port == declared
                            && !matches!(container.kind, ContainerKind::Sidecar { .. }) =>
                    {
                        real
                    }
                    _ => probe.port,
                },
                timing: probe.timing,
            }));
        }
        PodPlan {
            containers,
            readiness,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use spawner_core::children::{ChildrenConfig, build_pod};
    use spawner_core::resource::SessionLivedBackend;

    fn backend_pod(app: serde_json::Value) -> Pod {
        let backend: SessionLivedBackend = serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1",
            "kind": "SessionLivedBackend",
            "metadata": {"name": "room-1", "namespace": "rooms", "uid": "u-1"},
            "spec": {
                "template": {"spec": {"containers": [app]}},
                "httpPort": 8080,
                "gracePeriodSeconds": 30
            }
        }))
        .expect("backend parses");
        let mut pod = build_pod(&backend, &ChildrenConfig::default(), "tok").expect("pod");
        pod.metadata.uid = Some("pod-uid".into());
        pod
    }

    fn env_of(plan: &ContainerPlan) -> BTreeMap<String, String> {
        match &plan.run {
            ContainerRun::Process { env, .. } => env.iter().cloned().collect(),
            ContainerRun::Sidecar(s) => s.env.iter().cloned().collect(),
        }
    }

    #[test]
    fn backend_pod_gets_a_port_of_its_own_and_its_sidecar_points_there() {
        let pod = backend_pod(json!({
            "name": "app",
            "command": ["python3", "-m", "http.server"],
            "args": ["$(PORT)", "--bind", "0.0.0.0", "$$(PORT)"],
            "env": [{"name": "GREETING", "value": "hi"}],
            "readinessProbe": {"httpGet": {"path": "/ok", "port": 8080}}
        }));
        let analysis = analyse(&pod).expect("runs as processes");
        let request = analysis.sandbox_request();
        assert!(request.wants_app_port);
        assert_eq!(request.listen_ports, vec![DEFAULT_SIDECAR_PORT]);
        assert_eq!(analysis.sidecar_index, Some(1));

        let ip: IpAddr = "127.1.0.7".parse().unwrap();
        let plan = analysis.plan(ip, Some(41234));
        let ContainerRun::Process { argv, .. } = &plan.containers[0].run else {
            panic!("app is a process")
        };
        assert_eq!(
            argv,
            &[
                "python3",
                "-m",
                "http.server",
                "41234",
                "--bind",
                "0.0.0.0",
                "$(PORT)"
            ]
        );
        assert_eq!(env_of(&plan.containers[0])["PORT"], "41234");
        assert_eq!(env_of(&plan.containers[0])["GREETING"], "hi");
        let ContainerRun::Sidecar(sidecar) = &plan.containers[1].run else {
            panic!("second container is the sidecar")
        };
        assert_eq!(sidecar.upstream_port, 41234);
        assert_eq!(sidecar.serve_port, DEFAULT_SIDECAR_PORT);
        assert_eq!(sidecar.events_token, "tok");
        // The app's probe follows it to its real port; the sidecar's stays on its own.
        assert_eq!(plan.readiness[0].as_ref().map(|p| p.port), Some(41234));
        assert_eq!(
            plan.readiness[1].as_ref().map(|p| p.port),
            Some(DEFAULT_SIDECAR_PORT)
        );
        assert_eq!(
            plan.readiness[1]
                .as_ref()
                .and_then(|p| p.http_path.clone())
                .as_deref(),
            Some("/_spawner/health")
        );
    }

    #[test]
    fn image_without_command_is_a_clear_failure() {
        let pod = backend_pod(json!({"name": "app", "image": "acme/room:1"}));
        let error = analyse(&pod).expect_err("cannot run");
        assert_eq!(error.reason, REASON_NEEDS_COMMAND);
        assert_eq!(error.container.as_deref(), Some("app"));
        assert!(error.message.contains("acme/room:1"), "{}", error.message);
        assert!(
            error.message.contains("container engine"),
            "{}",
            error.message
        );
    }

    #[test]
    fn field_refs_resolve_and_secrets_are_refused() {
        let mut pod = backend_pod(json!({
            "name": "app",
            "command": ["env"],
            "env": [
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['spawner.dev/backend']"}}},
                {"name": "BOTH", "value": "$(POD)@$(IP)"}
            ]
        }));
        let plan = analyse(&pod)
            .unwrap()
            .plan("127.1.0.9".parse().unwrap(), Some(5000));
        let env = env_of(&plan.containers[0]);
        assert_eq!(env["POD"], "room-1");
        assert_eq!(env["IP"], "127.1.0.9");
        assert_eq!(env["TEAM"], "room-1");
        assert_eq!(env["BOTH"], "room-1@127.1.0.9");

        let containers = &mut pod.spec.as_mut().unwrap().containers;
        containers[0].env = Some(vec![
            serde_json::from_value(json!({
                "name": "PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}
            }))
            .unwrap(),
        ]);
        let error = analyse(&pod).expect_err("secrets are not read");
        assert_eq!(error.reason, REASON_CONFIG_ERROR);
    }

    #[test]
    fn plain_pod_keeps_its_environment_and_wants_no_port() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"terminationGracePeriodSeconds": 3, "containers": [{
                "name": "main", "command": ["sleep", "1"], "env": [{"name": "PORT", "value": "7000"}]
            }]}
        }))
        .unwrap();
        let analysis = analyse(&pod).unwrap();
        assert!(!analysis.sandbox_request().wants_app_port);
        assert_eq!(analysis.termination_grace, Duration::from_secs(3));
        let plan = analysis.plan("127.1.0.2".parse().unwrap(), None);
        assert_eq!(env_of(&plan.containers[0])["PORT"], "7000");
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$(", &vars), "1-$(B)-$(A)-$-$(");
        assert_eq!(expand("plain", &vars), "plain");
    }
}
