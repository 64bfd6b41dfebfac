//! `deploy/rbac/` grants each component what its code uses, no more and no less. A simulated
//! world runs every component as its own ServiceAccount against an API server that enforces
//! the deployed roles (a missing grant is a 403 there, and the world fails), and the API
//! server's audit of what each component used is compared with its roles: a grant nobody uses
//! fails here. A few calls sit on paths this world does not reach (a status stream, a
//! terminate, a watch cache that has not seen a child yet); they are listed below with the
//! code that makes them, and the test checks that code still makes them.

use std::collections::BTreeSet;

use spawner_localcluster::Audit;
use spawner_sim::rbac::{deployed_rbac, service_account};
use spawner_sim::rng::SimRng;
use spawner_sim::workload::{WorkloadParams, generate};
use spawner_sim::world::{WorldConfig, run};

spawner_sim::install_entropy_hook!();

/// (API group, resource, verb).
type Permission = (String, String, String);

/// A call a component makes on a path the world below does not reach.
struct Unreached {
    component: &'static str,
    permission: (&'static str, &'static str, &'static str),
    /// The source of the call, and the call as it is written there.
    source: &'static str,
    call: &'static str,
}

const UNREACHED: [Unreached; 4] = [
    // Status streams: simulated users wait for Ready in the router instead.
    Unreached {
        component: "api",
        permission: ("spawner.dev", "sessionlivedbackends", "watch"),
        source: include_str!("../../components/api/src/hub.rs"),
        call: "self.backends.watch(&params, &version)",
    },
    // Terminate: simulated users leave and let the sweeper end their backends.
    Unreached {
        component: "api",
        permission: ("spawner.dev", "sessionlivedbackends", "patch"),
        source: include_str!("../../components/api/src/routes.rs"),
        call: ".patch(name, &PatchParams::default(), &Patch::Merge(&patch))",
    },
    // A child the controller's watch caches have not seen yet.
    Unreached {
        component: "controller",
        permission: ("", "pods", "get"),
        source: include_str!("../../components/controller/src/reconcile.rs"),
        call: "pods.get_opt(name).await",
    },
    Unreached {
        component: "controller",
        permission: ("", "services", "get"),
        source: include_str!("../../components/controller/src/reconcile.rs"),
        call: "services.get_opt(name).await",
    },
];

fn audited(audit: &Audit, component: &str, allowed: bool) -> BTreeSet<Permission> {
    let user = service_account(component).user;
    audit
        .entries()
        .into_iter()
        .filter(|e| e.user == user && e.allowed == allowed)
        .map(|e| (e.api_group, e.resource, e.verb))
        .collect()
}

fn owned((group, resource, verb): (&str, &str, &str)) -> Permission {
    (group.into(), resource.into(), verb.into())
}

#[test]
fn each_component_uses_exactly_what_deploy_rbac_grants() {
    let params = WorkloadParams {
        users: 20,
        rooms: 6,
        mean_interarrival_ms: 500.0,
        session_cap_ms: 20_000.0,
        ..WorkloadParams::default()
    };
    let trace = generate(&params, &mut SimRng::new(7));
    // Two leader-elected controllers (the Lease), a retention short enough that finished
    // backends are deleted, and every backend swept.
    let mut config = WorldConfig::new(7, trace);
    let audit = Audit::default();
    config.audit = Some(audit.clone());
    if let Err(failure) = run(config) {
        panic!("{failure}");
    }

    let rbac = deployed_rbac();
    for component in ["controller", "sweeper", "api", "router"] {
        let refused = audited(&audit, component, false);
        assert!(
            refused.is_empty(),
            "{component} was refused {refused:?}: deploy/rbac/{component}.yaml lacks a grant"
        );
        let mut used = audited(&audit, component, true);
        for unreached in UNREACHED.iter().filter(|u| u.component == component) {
            let permission = owned(unreached.permission);
            assert!(
                unreached.source.contains(unreached.call),
                "{component} no longer calls `{}`: drop {permission:?} from UNREACHED (and from \
                 deploy/rbac/{component}.yaml if nothing else uses it)",
                unreached.call
            );
            assert!(
                !used.contains(&permission),
                "the world now reaches {permission:?} of {component}: drop it from UNREACHED"
            );
            used.insert(permission);
        }
        let granted = rbac.grants(&service_account(component));
        let unused: Vec<_> = granted.difference(&used).collect();
        assert!(
            unused.is_empty(),
            "deploy/rbac/{component}.yaml grants {unused:?}, which {component} never uses"
        );
        // Every use was allowed, so it is granted; the other direction, said plainly.
        assert_eq!(used, granted, "{component}");
    }
}
