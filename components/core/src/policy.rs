//! The backend pod policy: the parts of a pod template that would give a backend's code more
//! than its own sandbox (the node's namespaces, files or devices, the cluster's API through a
//! service account, a chosen node). A backend's code is hostile (DESIGN.md rule 7), and anyone
//! who can create a `SessionLivedBackend` chooses its template, so each of these is refused
//! unless the operator allows its kind explicitly (the controller's and the api's
//! `--backend-pod-allow`). The api answers 422 naming the field; the controller fails a backend
//! created around the api with reason [`POLICY_VIOLATION_REASON`].

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodSpec, SecurityContext,
};

use crate::resource::SessionLivedBackendSpec;
use crate::validation::{FieldError, ValidationErrors};

/// `status.reason` of a backend whose template the policy refuses.
pub const POLICY_VIOLATION_REASON: &str = "PolicyViolation";

/// One kind of access the policy refuses unless allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodAllowance {
    /// `privileged: true`, Windows `hostProcess`.
    Privileged,
    /// `hostNetwork`, `hostPID`, `hostIPC`, `shareProcessNamespace`.
    HostNamespaces,
    /// `hostPath` volumes.
    HostPath,
    /// `hostPort` on a container port.
    HostPorts,
    /// Capabilities added to a container (`capabilities.add`).
    Capabilities,
    /// `nodeName`: placing the pod on a chosen node, around the scheduler.
    NodeName,
    /// `serviceAccountName`, `automountServiceAccountToken: true` and projected service
    /// account tokens: credentials for the cluster's API inside the backend.
    ServiceAccount,
    /// Unconfined seccomp or AppArmor, `procMount: Unmasked`, custom SELinux user or role,
    /// sysctls outside the safe set.
    Unconfined,
}

impl PodAllowance {
    pub const ALL: [PodAllowance; 8] = [
        PodAllowance::Privileged,
        PodAllowance::HostNamespaces,
        PodAllowance::HostPath,
        PodAllowance::HostPorts,
        PodAllowance::Capabilities,
        PodAllowance::NodeName,
        PodAllowance::ServiceAccount,
        PodAllowance::Unconfined,
    ];

    /// Its name in `--backend-pod-allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            PodAllowance::Privileged => "privileged",
            PodAllowance::HostNamespaces => "host-namespaces",
            PodAllowance::HostPath => "host-path",
            PodAllowance::HostPorts => "host-ports",
            PodAllowance::Capabilities => "capabilities",
            PodAllowance::NodeName => "node-name",
            PodAllowance::ServiceAccount => "service-account",
            PodAllowance::Unconfined => "unconfined",
        }
    }
}

impl fmt::Display for PodAllowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown backend pod allowance {0:?} (known: privileged, host-namespaces, host-path, host-ports, capabilities, node-name, service-account, unconfined)"
)]
pub struct UnknownAllowance(pub String);

impl FromStr for PodAllowance {
    type Err = UnknownAllowance;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PodAllowance::ALL
            .into_iter()
            .find(|a| a.as_str() == s.trim())
            .ok_or_else(|| UnknownAllowance(s.to_string()))
    }
}

/// What the operator allows beyond the default (nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub allowed: BTreeSet<PodAllowance>,
}

impl PodPolicy {
    pub fn allowing(allowed: impl IntoIterator<Item = PodAllowance>) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
        }
    }

    pub fn allows(&self, allowance: PodAllowance) -> bool {
        self.allowed.contains(&allowance)
    }
}

/// Sysctls every pod may set (the Pod Security baseline's safe set).
const SAFE_SYSCTLS: [&str; 8] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
];

/// SELinux types a pod may use (the Pod Security baseline's).
const SAFE_SELINUX_TYPES: [&str; 4] = ["", "container_t", "container_init_t", "container_kvm_t"];

const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

struct Refusals<'a> {
    policy: &'a PodPolicy,
    errors: Vec<FieldError>,
}

impl Refusals<'_> {
    fn refuse(&mut self, allowance: PodAllowance, field: String, what: &str) {
        if self.policy.allows(allowance) {
            return;
        }
        self.errors.push(FieldError {
            field,
            message: format!(
                "{what} is refused by the backend pod policy (the operator may allow \"{allowance}\")"
            ),
        });
    }

    fn security_context(&mut self, path: &str, context: Option<&SecurityContext>) {
        let Some(context) = context else {
            return;
        };
        let path = format!("{path}.securityContext");
        if context.privileged == Some(true) {
            self.refuse(
                PodAllowance::Privileged,
                format!("{path}.privileged"),
                "a privileged container",
            );
        }
        if context
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            == Some(true)
        {
            self.refuse(
                PodAllowance::Privileged,
                format!("{path}.windowsOptions.hostProcess"),
                "a host process container",
            );
        }
        if let Some(Capabilities { add: Some(add), .. }) = &context.capabilities
            && !add.is_empty()
        {
            self.refuse(
                PodAllowance::Capabilities,
                format!("{path}.capabilities.add"),
                "adding capabilities",
            );
        }
        if context.proc_mount.as_deref() == Some("Unmasked") {
            self.refuse(
                PodAllowance::Unconfined,
                format!("{path}.procMount"),
                "an unmasked /proc",
            );
        }
        self.unconfined_profiles(
            &path,
            context.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            context.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        );
        self.se_linux(&path, context.se_linux_options.as_ref());
    }

    /// Seccomp and AppArmor profiles, set the same way on a pod and on a container.
    fn unconfined_profiles(&mut self, path: &str, seccomp: Option<&str>, app_armor: Option<&str>) {
        if seccomp == Some("Unconfined") {
            self.refuse(
                PodAllowance::Unconfined,
                format!("{path}.seccompProfile.type"),
                "an unconfined seccomp profile",
            );
        }
        if app_armor == Some("Unconfined") {
            self.refuse(
                PodAllowance::Unconfined,
                format!("{path}.appArmorProfile.type"),
                "an unconfined AppArmor profile",
            );
        }
    }

    fn se_linux(
        &mut self,
        path: &str,
        options: Option<&k8s_openapi::api::core::v1::SELinuxOptions>,
    ) {
        let Some(options) = options else {
            return;
        };
        let custom = options.user.as_deref().is_some_and(|u| !u.is_empty())
            || options.role.as_deref().is_some_and(|r| !r.is_empty())
            || !SAFE_SELINUX_TYPES.contains(&options.type_.as_deref().unwrap_or_default());
        if custom {
            self.refuse(
                PodAllowance::Unconfined,
                format!("{path}.seLinuxOptions"),
                "a custom SELinux user, role or type",
            );
        }
    }

    fn pod_security_context(&mut self, context: Option<&PodSecurityContext>) {
        let Some(context) = context else {
            return;
        };
        let path = "spec.template.spec.securityContext";
        self.unconfined_profiles(
            path,
            context.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            context.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        );
        if context
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            == Some(true)
        {
            self.refuse(
                PodAllowance::Privileged,
                format!("{path}.windowsOptions.hostProcess"),
                "a host process pod",
            );
        }
        self.se_linux(path, context.se_linux_options.as_ref());
        for (i, sysctl) in context.sysctls.iter().flatten().enumerate() {
            if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
                self.refuse(
                    PodAllowance::Unconfined,
                    format!("{path}.sysctls[{i}].name"),
                    "a sysctl outside the safe set",
                );
            }
        }
    }

    fn container(&mut self, path: &str, container: &Container) {
        self.security_context(path, container.security_context.as_ref());
        for (i, port) in container.ports.iter().flatten().enumerate() {
            if port.host_port.is_some_and(|p| p != 0) {
                self.refuse(
                    PodAllowance::HostPorts,
                    format!("{path}.ports[{i}].hostPort"),
                    "a host port",
                );
            }
        }
    }

    fn pod_spec(&mut self, spec: &PodSpec) {
        let path = "spec.template.spec";
        for (field, set) in [
            ("hostNetwork", spec.host_network),
            ("hostPID", spec.host_pid),
            ("hostIPC", spec.host_ipc),
            ("shareProcessNamespace", spec.share_process_namespace),
        ] {
            if set == Some(true) {
                self.refuse(
                    PodAllowance::HostNamespaces,
                    format!("{path}.{field}"),
                    "sharing the node's or the other containers' namespaces",
                );
            }
        }
        if spec.node_name.as_deref().is_some_and(|n| !n.is_empty()) {
            self.refuse(
                PodAllowance::NodeName,
                format!("{path}.nodeName"),
                "choosing the node",
            );
        }
        for (field, value) in [
            ("serviceAccountName", spec.service_account_name.as_deref()),
            ("serviceAccount", spec.service_account.as_deref()),
        ] {
            if value.is_some_and(|v| !v.is_empty() && v != "default") {
                self.refuse(
                    PodAllowance::ServiceAccount,
                    format!("{path}.{field}"),
                    "running as a service account",
                );
            }
        }
        if spec.automount_service_account_token == Some(true) {
            self.refuse(
                PodAllowance::ServiceAccount,
                format!("{path}.automountServiceAccountToken"),
                "mounting a service account token",
            );
        }
        for (i, volume) in spec.volumes.iter().flatten().enumerate() {
            let volume_path = format!("{path}.volumes[{i}]");
            if volume.host_path.is_some() {
                self.refuse(
                    PodAllowance::HostPath,
                    format!("{volume_path}.hostPath"),
                    "a hostPath volume",
                );
            }
            let sources = volume.projected.as_ref().and_then(|p| p.sources.as_ref());
            for (j, source) in sources.into_iter().flatten().enumerate() {
                if source.service_account_token.is_some() {
                    self.refuse(
                        PodAllowance::ServiceAccount,
                        format!("{volume_path}.projected.sources[{j}].serviceAccountToken"),
                        "a projected service account token",
                    );
                }
            }
        }
        self.pod_security_context(spec.security_context.as_ref());
        for (i, container) in spec.containers.iter().enumerate() {
            self.container(&format!("{path}.containers[{i}]"), container);
        }
        for (i, container) in spec.init_containers.iter().flatten().enumerate() {
            self.container(&format!("{path}.initContainers[{i}]"), container);
        }
        for (i, container) in spec.ephemeral_containers.iter().flatten().enumerate() {
            let path = format!("{path}.ephemeralContainers[{i}]");
            self.security_context(&path, container.security_context.as_ref());
        }
    }
}

/// Checks `spec`'s template against `policy`; every refused field is reported.
pub fn check_pod_policy(
    spec: &SessionLivedBackendSpec,
    policy: &PodPolicy,
) -> Result<(), ValidationErrors> {
    let mut refusals = Refusals {
        policy,
        errors: Vec::new(),
    };
    if let Some(pod) = &spec.template.spec {
        refusals.pod_spec(pod);
    }
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref());
    for (name, value) in annotations.into_iter().flatten() {
        if name.starts_with(APPARMOR_ANNOTATION_PREFIX) && value == "unconfined" {
            refusals.refuse(
                PodAllowance::Unconfined,
                format!("spec.template.metadata.annotations[{name}]"),
                "an unconfined AppArmor profile",
            );
        }
    }
    if refusals.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors {
            errors: refusals.errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(pod: serde_json::Value) -> SessionLivedBackendSpec {
        serde_json::from_value(json!({"template": {"spec": pod}})).expect("spec parses")
    }

    fn refused(spec: &SessionLivedBackendSpec, policy: &PodPolicy) -> Vec<String> {
        match check_pod_policy(spec, policy) {
            Ok(()) => Vec::new(),
            Err(e) => e.errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn an_ordinary_template_passes() {
        let s = spec(json!({
            "containers": [{"name": "app", "image": "acme/room:1",
                "ports": [{"containerPort": 8080}],
                "securityContext": {"runAsUser": 1000, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "nodeSelector": {"pool": "backends"},
            "serviceAccountName": "default",
            "automountServiceAccountToken": false
        }));
        assert_eq!(refused(&s, &PodPolicy::default()), Vec::<String>::new());
    }

    #[test]
    fn host_access_is_refused_by_default_naming_each_field() {
        let s = spec(json!({
            "hostNetwork": true, "hostPID": true, "hostIPC": true, "shareProcessNamespace": true,
            "nodeName": "node-1",
            "serviceAccountName": "builder",
            "automountServiceAccountToken": true,
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
            "volumes": [
                {"name": "root", "hostPath": {"path": "/"}},
                {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
            ],
            "containers": [{"name": "app", "image": "x",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]},
                    "procMount": "Unmasked", "seccompProfile": {"type": "Unconfined"}}}],
            "initContainers": [{"name": "init", "image": "x",
                "securityContext": {"privileged": true}}]
        }));
        assert_eq!(
            refused(&s, &PodPolicy::default()),
            [
                "spec.template.spec.hostNetwork",
                "spec.template.spec.hostPID",
                "spec.template.spec.hostIPC",
                "spec.template.spec.shareProcessNamespace",
                "spec.template.spec.nodeName",
                "spec.template.spec.serviceAccountName",
                "spec.template.spec.automountServiceAccountToken",
                "spec.template.spec.volumes[0].hostPath",
                "spec.template.spec.volumes[1].projected.sources[0].serviceAccountToken",
                "spec.template.spec.securityContext.sysctls[0].name",
                "spec.template.spec.containers[0].securityContext.privileged",
                "spec.template.spec.containers[0].securityContext.capabilities.add",
                "spec.template.spec.containers[0].securityContext.procMount",
                "spec.template.spec.containers[0].securityContext.seccompProfile.type",
                "spec.template.spec.containers[0].ports[0].hostPort",
                "spec.template.spec.initContainers[0].securityContext.privileged",
            ]
        );
    }

    #[test]
    fn each_kind_is_allowed_only_by_its_own_setting() {
        let s = spec(json!({
            "hostNetwork": true,
            "containers": [{"name": "app", "image": "x", "securityContext": {"privileged": true}}]
        }));
        let only_network = PodPolicy::allowing([PodAllowance::HostNamespaces]);
        assert_eq!(
            refused(&s, &only_network),
            ["spec.template.spec.containers[0].securityContext.privileged"]
        );
        let both = PodPolicy::allowing([PodAllowance::HostNamespaces, PodAllowance::Privileged]);
        assert_eq!(refused(&s, &both), Vec::<String>::new());
    }

    #[test]
    fn unconfined_apparmor_annotation_is_refused() {
        let s: SessionLivedBackendSpec = serde_json::from_value(json!({"template": {
            "metadata": {"annotations": {
                "container.apparmor.security.beta.kubernetes.io/app": "unconfined"}},
            "spec": {"containers": [{"name": "app", "image": "x"}]}
        }}))
        .expect("spec");
        assert_eq!(
            refused(&s, &PodPolicy::default()),
            [
                "spec.template.metadata.annotations[container.apparmor.security.beta.kubernetes.io/app]"
            ]
        );
    }

    #[test]
    fn allowance_names_round_trip() {
        for a in PodAllowance::ALL {
            assert_eq!(a.as_str().parse::<PodAllowance>(), Ok(a));
        }
        assert!("root".parse::<PodAllowance>().is_err());
    }
}
