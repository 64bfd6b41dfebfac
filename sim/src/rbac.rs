//! The components' identities in the simulated cluster: each authenticates to the API server
//! with a token of its own as its ServiceAccount, and the API server enforces `deploy/rbac/`
//! exactly as deployed while auditing which permissions each one used (sim/tests/rbac.rs holds
//! the roles to what the components really do). The node agent stands in for kubelets and the
//! scheduler, which are not Spawner's to grant: it is the administrator.

use std::collections::HashMap;

use spawner_localcluster::{Audit, Auth, Identity, Rbac};

/// Where Spawner's components run (`deploy/`), and where the controllers' Lease lives.
pub const SYSTEM_NAMESPACE: &str = "spawner-system";
pub const CONTROLLER_TOKEN: &str = "sim-kube-controller";
pub const SWEEPER_TOKEN: &str = "sim-kube-sweeper";
pub const API_TOKEN: &str = "sim-kube-api";
pub const ROUTER_TOKEN: &str = "sim-kube-router";
pub const NODE_AGENT_TOKEN: &str = "sim-kube-node-agent";

/// `deploy/rbac/`, as `kubectl apply -k deploy/rbac` applies it.
pub const RBAC: [(&str, &str); 4] = [
    (
        "controller",
        include_str!("../../deploy/rbac/controller.yaml"),
    ),
    ("sweeper", include_str!("../../deploy/rbac/sweeper.yaml")),
    ("api", include_str!("../../deploy/rbac/api.yaml")),
    ("router", include_str!("../../deploy/rbac/router.yaml")),
];

/// The ServiceAccount a component runs as (`deploy/rbac/serviceaccounts.yaml`).
pub fn service_account(component: &str) -> Identity {
    Identity::service_account(SYSTEM_NAMESPACE, component)
}

/// The roles of `deploy/rbac/`.
pub fn deployed_rbac() -> Rbac {
    let mut rbac = Rbac::default();
    for (component, yaml) in RBAC {
        if let Err(e) = rbac.load_yaml(yaml) {
            // The manifests are compiled in: a failure is a bug in deploy/rbac.
            panic!("deploy/rbac/{component}.yaml: {e}");
        }
    }
    rbac
}

/// The API server's authentication and authorization: every component's token, the deployed
/// roles, and `audit` recording what each one used.
pub fn auth(audit: Option<Audit>) -> Auth {
    let tokens = HashMap::from([
        (CONTROLLER_TOKEN.to_string(), service_account("controller")),
        (SWEEPER_TOKEN.to_string(), service_account("sweeper")),
        (API_TOKEN.to_string(), service_account("api")),
        (ROUTER_TOKEN.to_string(), service_account("router")),
        (NODE_AGENT_TOKEN.to_string(), Identity::admin()),
    ]);
    Auth {
        rbac: Some(deployed_rbac()),
        audit,
        ..Auth::tokens(tokens)
    }
}
