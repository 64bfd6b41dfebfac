//! The shape of a backend's children: its Pod (application + injected sidecar) and its Service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, Pod, PodSpec, Probe, Service, ServicePort,
    ServiceSpec,
};
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
/// Environment variable carrying the events token into the sidecar.
pub const EVENTS_TOKEN_ENV: &str = "SPAWNER_EVENTS_TOKEN";
/// Environment variable carrying the serve port into the sidecar.
pub const SIDECAR_SERVE_PORT_ENV: &str = "SPAWNER_SERVE_PORT";
/// Environment variable carrying the application's port into the sidecar.
pub const SIDECAR_UPSTREAM_PORT_ENV: &str = "SPAWNER_UPSTREAM_PORT";
/// Tells the cluster autoscaler not to evict a pod while scaling down: a live session would die.
pub const SAFE_TO_EVICT_ANNOTATION: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// Path the sidecar answers 200 on once the application accepts connections.
pub const HEALTH_PATH: &str = "/_spawner/health";

/// What the operator configures about injected children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildrenConfig {
    pub sidecar_image: String,
    pub sidecar_port: u16,
    /// Cluster DNS domain used in `status.url`.
    pub cluster_domain: String,
}

impl Default for ChildrenConfig {
    fn default() -> Self {
        Self {
            sidecar_image: "ghcr.io/spawner-dev/spawner:latest".into(),
            sidecar_port: DEFAULT_SIDECAR_PORT,
            cluster_domain: "cluster.local".into(),
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

/// The Pod of `backend`: its template with `PORT` set on the application, `restartPolicy:
/// Never`, the sidecar appended, labels, annotations and an owner reference to the backend.
pub fn build_pod(
    backend: &SessionLivedBackend,
    config: &ChildrenConfig,
    events_token: &str,
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
            env(EVENTS_TOKEN_ENV, events_token),
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
        let pod = build_pod(&backend(), &ChildrenConfig::default(), "tok").expect("pod");
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
                "containers": [
                    {
                        "name": "app",
                        "image": "acme/room:1",
                        "env": [
                            {"name": "MODE", "value": "x"},
                            {"name": "PORT", "value": "3000"},
                            {"name": "SPAWNER_BACKEND_NAME", "value": "slab-abc"}
                        ]
                    },
                    {
                        "name": "spawner-sidecar",
                        "image": "ghcr.io/spawner-dev/spawner:latest",
                        "args": ["sidecar"],
                        "env": [
                            {"name": "SPAWNER_SERVE_PORT", "value": "9090"},
                            {"name": "SPAWNER_UPSTREAM_PORT", "value": "3000"},
                            {"name": "SPAWNER_EVENTS_TOKEN", "value": "tok"}
                        ],
                        "ports": [{"name": "http", "containerPort": 9090, "protocol": "TCP"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/_spawner/health", "port": 9090},
                            "periodSeconds": 1
                        }
                    }
                ]
            }
        });
        assert_eq!(serde_json::to_value(&pod).expect("json"), expected);
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
