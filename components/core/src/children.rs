//! The shape of a backend's children: its Pod (application + injected sidecar) and its Service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Pod, PodSecurityContext,
    PodSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::resource::{BACKEND_LABEL, SessionLivedBackend};

/// Name of the container injected into every backend pod.
pub const SIDECAR_CONTAINER_NAME: &str = "spawner-sidecar";
/// Port the sidecar serves on unless configured otherwise.
pub const DEFAULT_SIDECAR_PORT: u16 = 9090;
/// Port of the backend's Service.
pub const SERVICE_PORT: u16 = 80;
/// Image given to an application container that has only a command. The Kubernetes API
/// requires an image on every container; localcluster's node agent runs such a container as a
/// local process, while a real cluster fails to pull this image and the backend fails with
/// `ImagePullTimeout`, which says what is wrong.
pub const PROCESS_IMAGE: &str = "spawner.dev/process";
/// Environment variable telling the application its backend's name.
pub const BACKEND_NAME_ENV: &str = "SPAWNER_BACKEND_NAME";
/// Environment variable carrying the events token check into the sidecar: the token, or (as
/// the controller writes it) `sha256:` and the token's digest, so reading the pod does not
/// reveal the token (see [`crate::token::token_check`]).
pub const EVENTS_TOKEN_ENV: &str = "SPAWNER_EVENTS_TOKEN";
/// Environment variable carrying the serve port into the sidecar.
pub const SIDECAR_SERVE_PORT_ENV: &str = "SPAWNER_SERVE_PORT";
/// Environment variable carrying the application's port into the sidecar.
pub const SIDECAR_UPSTREAM_PORT_ENV: &str = "SPAWNER_UPSTREAM_PORT";
/// Tells the cluster autoscaler not to evict a pod while scaling down: a live session would die.
pub const SAFE_TO_EVICT_ANNOTATION: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// Path the sidecar answers 200 on once the application accepts connections.
pub const HEALTH_PATH: &str = "/_spawner/health";
/// Path the sidecar answers 200 on while it serves at all (its liveness probe: the application
/// may take its time to start, the sidecar may not hang).
pub const ALIVE_PATH: &str = "/_spawner/alive";
/// User and group the sidecar runs as (the image's numeric non-root user).
pub const SIDECAR_USER: i64 = 65532;

/// What the operator configures about injected children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildrenConfig {
    pub sidecar_image: String,
    pub sidecar_port: u16,
    /// Cluster DNS domain used in `status.url`.
    pub cluster_domain: String,
    /// Requests and limits of the sidecar container.
    pub sidecar_resources: SidecarResources,
    /// Whether a template may have a service account token mounted (the backend pod policy's
    /// `service-account`). Even then only a template that sets `automountServiceAccountToken:
    /// true` gets one; otherwise it is always false.
    pub allow_service_account_token: bool,
}

/// The sidecar container's resources, as Kubernetes quantities (`50m`, `32Mi`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: String,
}

impl Default for SidecarResources {
    fn default() -> Self {
        Self {
            cpu_request: "50m".into(),
            memory_request: "32Mi".into(),
            cpu_limit: None,
            memory_limit: "256Mi".into(),
        }
    }
}

impl SidecarResources {
    fn requirements(&self) -> ResourceRequirements {
        let mut limits =
            BTreeMap::from([("memory".to_string(), Quantity(self.memory_limit.clone()))]);
        if let Some(cpu) = &self.cpu_limit {
            limits.insert("cpu".into(), Quantity(cpu.clone()));
        }
        ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(self.cpu_request.clone())),
                ("memory".to_string(), Quantity(self.memory_request.clone())),
            ])),
            limits: Some(limits),
            ..Default::default()
        }
    }
}

impl Default for ChildrenConfig {
    fn default() -> Self {
        Self {
            sidecar_image: "ghcr.io/spawner-dev/spawner:latest".into(),
            sidecar_port: DEFAULT_SIDECAR_PORT,
            cluster_domain: "cluster.local".into(),
            sidecar_resources: SidecarResources::default(),
            allow_service_account_token: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("backend has no {0}; it must be read from the API server before building children")]
    MissingMetadata(&'static str),
    #[error("backend template has no containers")]
    NoContainers,
}

fn owner_reference(backend: &SessionLivedBackend) -> Result<OwnerReference, BuildError> {
    backend
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.uid"))
}

fn name_and_namespace(backend: &SessionLivedBackend) -> Result<(String, String), BuildError> {
    let name = backend
        .metadata
        .name
        .clone()
        .ok_or(BuildError::MissingMetadata("metadata.name"))?;
    let namespace = backend
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    Ok((name, namespace))
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The sidecar's securityContext: everything the `restricted` Pod Security level asks for.
fn sidecar_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_USER),
        run_as_group: Some(SIDECAR_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The securityContext given to a template container that sets none: the `restricted` level,
/// except what the pod-level securityContext of the template already decides.
fn default_security_context(pod: Option<&PodSecurityContext>) -> SecurityContext {
    let pod_decides_user =
        pod.is_some_and(|p| p.run_as_non_root.is_some() || p.run_as_user.is_some());
    let pod_decides_seccomp = pod.is_some_and(|p| p.seccomp_profile.is_some());
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        run_as_non_root: (!pod_decides_user).then_some(true),
        seccomp_profile: (!pod_decides_seccomp).then(|| SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The Pod of `backend`: its template with `PORT` set on the application, `restartPolicy:
/// Never`, no service links, no service account token (unless the operator allows one), a
/// restricted securityContext on every container whose template sets none, the sidecar
/// appended, labels, annotations and an owner reference to the backend. `events_token_check`
/// is what the sidecar checks the events token against ([`crate::token::token_check`]).
pub fn build_pod(
    backend: &SessionLivedBackend,
    config: &ChildrenConfig,
    events_token_check: &str,
) -> Result<Pod, BuildError> {
    let (name, namespace) = name_and_namespace(backend)?;
    let owner = owner_reference(backend)?;
    let template = &backend.spec.template;
    let mut spec: PodSpec = template.spec.clone().unwrap_or_default();
    let app = spec
        .containers
        .first_mut()
        .ok_or(BuildError::NoContainers)?;
    if app.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        app.image = Some(PROCESS_IMAGE.into());
    }
    let app_env = app.env.get_or_insert_with(Vec::new);
    app_env.retain(|e| e.name != "PORT" && e.name != BACKEND_NAME_ENV);
    app_env.push(env("PORT", backend.spec.http_port.to_string()));
    app_env.push(env(BACKEND_NAME_ENV, name.clone()));

    spec.restart_policy = Some("Never".into());
    // Service links put every Service of the namespace, other backends included, into the
    // environment (and past a few thousand backends, the environment outgrows exec's limit).
    spec.enable_service_links = Some(false);
    if !config.allow_service_account_token || spec.automount_service_account_token.is_none() {
        spec.automount_service_account_token = Some(false);
    }
    let pod_context = spec.security_context.clone();
    let template_containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in template_containers {
        if container.security_context.is_none() {
            container.security_context = Some(default_security_context(pod_context.as_ref()));
        }
    }
    spec.containers.push(Container {
        name: SIDECAR_CONTAINER_NAME.into(),
        image: Some(config.sidecar_image.clone()),
        args: Some(vec!["sidecar".into()]),
        env: Some(vec![
            env(SIDECAR_SERVE_PORT_ENV, config.sidecar_port.to_string()),
            env(
                SIDECAR_UPSTREAM_PORT_ENV,
                backend.spec.http_port.to_string(),
            ),
            env(EVENTS_TOKEN_ENV, events_token_check),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(config.sidecar_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(HEALTH_PATH.into()),
                port: IntOrString::Int(i32::from(config.sidecar_port)),
                ..Default::default()
            }),
            period_seconds: Some(1),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(ALIVE_PATH.into()),
                port: IntOrString::Int(i32::from(config.sidecar_port)),
                ..Default::default()
            }),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(config.sidecar_resources.requirements()),
        security_context: Some(sidecar_security_context()),
        ..Default::default()
    });

    let template_meta = template.metadata.clone().unwrap_or_default();
    let mut labels = template_meta.labels.unwrap_or_default();
    labels.insert(BACKEND_LABEL.into(), name.clone());
    let mut annotations = template_meta.annotations.unwrap_or_default();
    annotations.insert(SAFE_TO_EVICT_ANNOTATION.into(), "false".into());

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The Service of `backend`: port 80 to the sidecar of the pod labelled with the backend.
pub fn build_service(
    backend: &SessionLivedBackend,
    config: &ChildrenConfig,
) -> Result<Service, BuildError> {
    let (name, namespace) = name_and_namespace(backend)?;
    let owner = owner_reference(backend)?;
    let selector = BTreeMap::from([(BACKEND_LABEL.to_string(), name.clone())]);
    Ok(Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(selector.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(SERVICE_PORT),
                target_port: Some(IntOrString::Int(i32::from(config.sidecar_port))),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    })
}

/// In-cluster URL of a backend through its Service's DNS name.
pub fn service_url(name: &str, namespace: &str, config: &ChildrenConfig) -> String {
    format!(
        "http://{name}.{namespace}.svc.{}:{SERVICE_PORT}",
        config.cluster_domain
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend() -> SessionLivedBackend {
        let mut backend: SessionLivedBackend = serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1",
            "kind": "SessionLivedBackend",
            "metadata": {"name": "slab-abc", "namespace": "rooms", "uid": "u-1"},
            "spec": {
                "template": {
                    "metadata": {"labels": {"team": "docs"}},
                    "spec": {"containers": [{
                        "name": "app",
                        "image": "acme/room:1",
                        "env": [{"name": "PORT", "value": "1"}, {"name": "MODE", "value": "x"}]
                    }]}
                },
                "httpPort": 3000,
                "gracePeriodSeconds": 30
            }
        }))
        .expect("backend parses");
        backend.status = None;
        backend
    }

    #[test]
    fn pod_is_the_template_plus_the_sidecar() {
        let pod = build_pod(&backend(), &ChildrenConfig::default(), "sha256:ab").expect("pod");
        let restricted = json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": true,
            "seccompProfile": {"type": "RuntimeDefault"}
        });
        let expected = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "slab-abc",
                "namespace": "rooms",
                "labels": {"team": "docs", "spawner.dev/backend": "slab-abc"},
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                "ownerReferences": [{
                    "apiVersion": "spawner.dev/v1",
                    "kind": "SessionLivedBackend",
                    "name": "slab-abc",
                    "uid": "u-1",
                    "controller": true
                }]
            },
            "spec": {
                "restartPolicy": "Never",
                "enableServiceLinks": false,
                "automountServiceAccountToken": false,
                "containers": [
                    {
                        "name": "app",
                        "image": "acme/room:1",
                        "env": [
                            {"name": "MODE", "value": "x"},
                            {"name": "PORT", "value": "3000"},
                            {"name": "SPAWNER_BACKEND_NAME", "value": "slab-abc"}
                        ],
                        "securityContext": restricted
                    },
                    {
                        "name": "spawner-sidecar",
                        "image": "ghcr.io/spawner-dev/spawner:latest",
                        "args": ["sidecar"],
                        "env": [
                            {"name": "SPAWNER_SERVE_PORT", "value": "9090"},
                            {"name": "SPAWNER_UPSTREAM_PORT", "value": "3000"},
                            {"name": "SPAWNER_EVENTS_TOKEN", "value": "sha256:ab"}
                        ],
                        "ports": [{"name": "http", "containerPort": 9090, "protocol": "TCP"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/_spawner/health", "port": 9090},
                            "periodSeconds": 1
                        },
                        "livenessProbe": {
                            "httpGet": {"path": "/_spawner/alive", "port": 9090},
                            "periodSeconds": 10,
                            "timeoutSeconds": 5,
                            "failureThreshold": 3
                        },
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "32Mi"},
                            "limits": {"memory": "256Mi"}
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                            "privileged": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        }
                    }
                ]
            }
        });
        assert_eq!(serde_json::to_value(&pod).expect("json"), expected);
    }

    /// The checks of the `restricted` Pod Security level on one container (the policies at
    /// kubernetes.io/docs/concepts/security/pod-security-standards), pod-level settings
    /// counted where the standard counts them.
    fn restricted_violations(pod: &Pod, container: &str) -> Vec<&'static str> {
        let spec = pod.spec.as_ref().expect("spec");
        let c = spec
            .containers
            .iter()
            .find(|c| c.name == container)
            .expect("container");
        let sc = c.security_context.clone().unwrap_or_default();
        let psc = spec.security_context.clone().unwrap_or_default();
        let mut v = Vec::new();
        if sc.privileged == Some(true) {
            v.push("privileged");
        }
        if sc.allow_privilege_escalation != Some(false) {
            v.push("allowPrivilegeEscalation != false");
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
            v.push("capabilities.drop lacks ALL");
        }
        if caps
            .add
            .unwrap_or_default()
            .iter()
            .any(|a| a != "NET_BIND_SERVICE")
        {
            v.push("capabilities.add");
        }
        if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
            v.push("runAsNonRoot != true");
        }
        if sc.run_as_user == Some(0) || psc.run_as_user == Some(0) {
            v.push("runAsUser 0");
        }
        let seccomp = sc.seccomp_profile.or(psc.seccomp_profile).map(|s| s.type_);
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            v.push("seccompProfile");
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            v.push("hostPort");
        }
        v
    }

    #[test]
    fn backends_see_no_service_links_and_no_token() {
        let mut b = backend();
        let template = b.spec.template.spec.as_mut().expect("pod spec");
        template.enable_service_links = Some(true);
        template.automount_service_account_token = Some(true);
        let pod = build_pod(&b, &ChildrenConfig::default(), "t").expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.automount_service_account_token, Some(false));

        // An operator who allows tokens gives one only to a template that asks for it.
        let allowing = ChildrenConfig {
            allow_service_account_token: true,
            ..ChildrenConfig::default()
        };
        let pod = build_pod(&b, &allowing, "t").expect("pod");
        assert_eq!(
            pod.spec.expect("spec").automount_service_account_token,
            Some(true)
        );
        let pod = build_pod(&backend(), &allowing, "t").expect("pod");
        assert_eq!(
            pod.spec.expect("spec").automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn sidecar_and_default_app_pass_the_restricted_level() {
        let pod = build_pod(&backend(), &ChildrenConfig::default(), "t").expect("pod");
        assert_eq!(
            restricted_violations(&pod, SIDECAR_CONTAINER_NAME),
            Vec::<&str>::new()
        );
        assert_eq!(restricted_violations(&pod, "app"), Vec::<&str>::new());
        let sidecar = &pod.spec.as_ref().expect("spec").containers[1];
        assert!(sidecar.liveness_probe.is_some());
        let resources = sidecar.resources.as_ref().expect("resources");
        assert!(
            resources
                .requests
                .as_ref()
                .is_some_and(|r| r.contains_key("cpu"))
        );
        assert!(
            resources
                .limits
                .as_ref()
                .is_some_and(|l| l.contains_key("memory"))
        );
    }

    #[test]
    fn a_template_security_context_is_kept() {
        let mut b = backend();
        let template = b.spec.template.spec.as_mut().expect("pod spec");
        template.containers[0].security_context = Some(SecurityContext {
            run_as_user: Some(1000),
            ..Default::default()
        });
        template.init_containers = Some(vec![Container {
            name: "init".into(),
            ..Default::default()
        }]);
        let pod = build_pod(&b, &ChildrenConfig::default(), "t").expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(
            spec.containers[0].security_context,
            Some(SecurityContext {
                run_as_user: Some(1000),
                ..Default::default()
            })
        );
        // A container without one gets the default.
        let init = &spec.init_containers.as_ref().expect("init")[0];
        assert_eq!(
            init.security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root),
            Some(true)
        );

        // The pod level decides the user and seccomp when it sets them.
        let mut b = backend();
        b.spec
            .template
            .spec
            .as_mut()
            .expect("pod spec")
            .security_context = Some(PodSecurityContext {
            run_as_user: Some(0),
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some("p.json".into()),
            }),
            ..Default::default()
        });
        let pod = build_pod(&b, &ChildrenConfig::default(), "t").expect("pod");
        let app = pod.spec.expect("spec").containers[0]
            .security_context
            .clone()
            .expect("default");
        assert_eq!(app.run_as_non_root, None);
        assert_eq!(app.seccomp_profile, None);
        assert_eq!(app.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn service_targets_the_sidecar() {
        let service = build_service(&backend(), &ChildrenConfig::default()).expect("service");
        let expected = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "slab-abc",
                "namespace": "rooms",
                "labels": {"spawner.dev/backend": "slab-abc"},
                "ownerReferences": [{
                    "apiVersion": "spawner.dev/v1",
                    "kind": "SessionLivedBackend",
                    "name": "slab-abc",
                    "uid": "u-1",
                    "controller": true
                }]
            },
            "spec": {
                "selector": {"spawner.dev/backend": "slab-abc"},
                "ports": [{"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"}],
                "type": "ClusterIP"
            }
        });
        assert_eq!(serde_json::to_value(&service).expect("json"), expected);
    }

    #[test]
    fn command_only_application_gets_the_process_image() {
        let mut b = backend();
        let app = &mut b.spec.template.spec.as_mut().expect("pod spec").containers[0];
        app.image = None;
        app.command = Some(vec!["python3".into()]);
        let pod = build_pod(&b, &ChildrenConfig::default(), "t").expect("pod");
        let app = &pod.spec.expect("spec").containers[0];
        assert_eq!(app.image.as_deref(), Some(PROCESS_IMAGE));
        assert_eq!(app.command.as_deref(), Some(&["python3".to_string()][..]));
    }

    #[test]
    fn building_needs_a_stored_backend() {
        let mut b = backend();
        b.metadata.uid = None;
        assert_eq!(
            build_pod(&b, &ChildrenConfig::default(), "t"),
            Err(BuildError::MissingMetadata("metadata.uid"))
        );
        let mut b = backend();
        b.metadata.namespace = None;
        assert_eq!(
            build_service(&b, &ChildrenConfig::default()),
            Err(BuildError::MissingMetadata("metadata.namespace"))
        );
    }

    #[test]
    fn url_uses_the_service_dns_name() {
        assert_eq!(
            service_url("slab-abc", "rooms", &ChildrenConfig::default()),
            "http://slab-abc.rooms.svc.cluster.local:80"
        );
    }
}
