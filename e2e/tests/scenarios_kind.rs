//! The end-to-end scenarios against Spawner deployed on a kind cluster by
//! `scripts/e2e-kind.sh` (which sets `SPAWNER_E2E_KIND=1`). Without that variable each test
//! prints one line and passes: there is no cluster to test. Configuration: see
//! `spawner_e2e::scenarios::kind`.

use spawner_e2e::scenarios::{self, Failure, Target, Timings, suite};

/// Runs `scenario` against the kind cluster; on failure, says where to look.
async fn run<F, Fut>(test: &str, scenario: F)
where
    F: FnOnce(Target) -> Fut,
    Fut: std::future::Future<Output = Result<Timings, Failure>>,
{
    if std::env::var("SPAWNER_E2E_KIND").as_deref() != Ok("1") {
        eprintln!("skipping {test}: SPAWNER_E2E_KIND is not 1 (run scripts/e2e-kind.sh)");
        return;
    }
    let target = scenarios::kind::target()
        .await
        .unwrap_or_else(|e| panic!("{test} (kind): {e}"));
    suite::report(test, "kind", scenario(target).await, || {
        "(see `kubectl -n spawner-system logs deploy/spawner-controller` and `kubectl -n spawner-backends get slab,pods`)".into()
    });
}

spawner_e2e::scenario_tests!(run:
    spawn_connect_disconnect_swept,
    get_or_create_concurrently,
    crashing_app_fails,
    terminate_while_starting,
    slow_start_keeps_its_grace_period_after_ready,
    router_requires_a_connect_token,
    image_pull_failure_fails,
    never_ready_fails_with_start_timeout,
    // Disruptions (scenarios::disruption): each leaves the cluster whole again (workloads
    // rolled out, a drained node uncordoned, a deleted node registered again), so the order does not matter.
    controller_leader_deleted_mid_spawn,
    api_pod_deleted_while_streaming,
    sweeper_deleted_while_user_connected,
    worker_drained_backends_fail,
    worker_deleted_backends_fail,
);
