//! The identities the control plane knows: one static bearer token each.

/// The namespace Spawner's components run in; their ServiceAccounts live here.
pub const SYSTEM_NAMESPACE: &str = "spawner-system";

/// `deploy/rbac/` as `kubectl apply -k deploy/rbac` applies it (file name, manifest): the
/// ServiceAccounts and the roles bound to them, applied as deployed by the suites that run
/// Spawner's components as those identities.
pub const DEPLOY_RBAC: [(&str, &str); 5] = [
    (
        "serviceaccounts.yaml",
        include_str!("../../../deploy/rbac/serviceaccounts.yaml"),
    ),
    (
        "controller.yaml",
        include_str!("../../../deploy/rbac/controller.yaml"),
    ),
    (
        "sweeper.yaml",
        include_str!("../../../deploy/rbac/sweeper.yaml"),
    ),
    ("api.yaml", include_str!("../../../deploy/rbac/api.yaml")),
    (
        "router.yaml",
        include_str!("../../../deploy/rbac/router.yaml"),
    ),
];

/// Who a client talks to the API server as. Component identities use the usernames and groups
/// the API server gives real ServiceAccount tokens, so RBAC bindings written for ServiceAccounts
/// (`kind: ServiceAccount` subjects in `deploy/rbac/`) apply to them unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Cluster admin (`system:masters`): installs the CRD, creates namespaces and bindings.
    Admin,
    /// kube-controller-manager itself (also `system:masters`, see docs/controlplane.md).
    KubeControllerManager,
    /// ServiceAccount `spawner-system/controller`.
    Controller,
    /// ServiceAccount `spawner-system/sweeper`.
    Sweeper,
    /// ServiceAccount `spawner-system/api`.
    Api,
    /// ServiceAccount `spawner-system/router`.
    Router,
    /// ServiceAccount `spawner-system/node-agent`: localcluster's node agent as kubelet and
    /// scheduler, bound to the bootstrap roles `system:node` and `system:kube-scheduler`.
    NodeAgent,
    /// ServiceAccount `spawner-system/unprivileged`: bound to nothing, for denial tests.
    Unprivileged,
}

impl Identity {
    pub const ALL: [Identity; 8] = [
        Identity::Admin,
        Identity::KubeControllerManager,
        Identity::Controller,
        Identity::Sweeper,
        Identity::Api,
        Identity::Router,
        Identity::NodeAgent,
        Identity::Unprivileged,
    ];

    /// Short name: the user and context name in the kubeconfig.
    pub fn name(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::KubeControllerManager => "kube-controller-manager",
            Identity::Controller => "controller",
            Identity::Sweeper => "sweeper",
            Identity::Api => "api",
            Identity::Router => "router",
            Identity::NodeAgent => "node-agent",
            Identity::Unprivileged => "unprivileged",
        }
    }

    /// The ServiceAccount name, for component identities.
    pub fn service_account(self) -> Option<&'static str> {
        match self {
            Identity::Admin | Identity::KubeControllerManager => None,
            other => Some(other.name()),
        }
    }

    /// The username the API server authenticates this identity as.
    pub fn username(self) -> String {
        match self {
            Identity::Admin => "spawner-e2e-admin".to_string(),
            Identity::KubeControllerManager => "system:kube-controller-manager".to_string(),
            other => format!("system:serviceaccount:{SYSTEM_NAMESPACE}:{}", other.name()),
        }
    }

    /// Groups besides `system:authenticated` (which the API server adds to everyone).
    pub fn groups(self) -> Vec<String> {
        match self {
            Identity::Admin | Identity::KubeControllerManager => vec!["system:masters".into()],
            _ => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{SYSTEM_NAMESPACE}"),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let names: std::collections::HashSet<_> = Identity::ALL.iter().map(|i| i.name()).collect();
        assert_eq!(names.len(), Identity::ALL.len());
    }

    #[test]
    fn components_look_like_service_accounts() {
        assert_eq!(
            Identity::Controller.username(),
            "system:serviceaccount:spawner-system:controller"
        );
        assert!(
            Identity::Sweeper
                .groups()
                .contains(&"system:serviceaccounts:spawner-system".to_string())
        );
        assert_eq!(Identity::Admin.service_account(), None);
    }
}
