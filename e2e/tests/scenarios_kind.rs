//! The end-to-end scenarios against Spawner deployed on a kind cluster by
//! `scripts/e2e-kind.sh` (which sets `SPAWNER_E2E_KIND=1`). Without that variable each test
//! prints one line and passes: there is no cluster to test. Configuration: see
//! `spawner_e2e::scenarios::kind`.

use spawner_e2e::scenarios::{self, Failure, Target, Timings, disruption};

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
    match scenario(target).await {
        Ok(timings) => eprintln!("{test} (kind): {timings}"),
        Err(failure) => panic!(
            "{test} (kind): {failure}\n(see `kubectl -n spawner-system logs deploy/spawner-controller` and `kubectl -n spawner-backends get slab,pods`)"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_connect_disconnect_swept() {
    run("spawn_connect_disconnect_swept", |t| async move {
        scenarios::spawn_connect_disconnect_swept(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_create_concurrently() {
    run("get_or_create_concurrently", |t| async move {
        scenarios::get_or_create_concurrently(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_app_fails() {
    run("crashing_app_fails", |t| async move {
        scenarios::crashing_app_fails(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_while_starting() {
    run("terminate_while_starting", |t| async move {
        scenarios::terminate_while_starting(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_keeps_its_grace_period_after_ready() {
    run(
        "slow_start_keeps_its_grace_period_after_ready",
        |t| async move { scenarios::slow_start_keeps_its_grace_period_after_ready(&t).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_requires_a_connect_token() {
    run("router_requires_a_connect_token", |t| async move {
        scenarios::router_requires_a_connect_token(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_failure_fails() {
    run("image_pull_failure_fails", |t| async move {
        scenarios::image_pull_failure_fails(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ready_fails_with_start_timeout() {
    run("never_ready_fails_with_start_timeout", |t| async move {
        scenarios::never_ready_fails_with_start_timeout(&t).await
    })
    .await;
}

// Disruptions: each leaves the cluster whole again (workloads rolled out, the node uncordoned).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_leader_deleted_mid_spawn() {
    run("controller_leader_deleted_mid_spawn", |t| async move {
        disruption::controller_leader_deleted_mid_spawn(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_pod_deleted_while_streaming() {
    run("api_pod_deleted_while_streaming", |t| async move {
        disruption::api_pod_deleted_while_streaming(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_deleted_while_user_connected() {
    run("sweeper_deleted_while_user_connected", |t| async move {
        disruption::sweeper_deleted_while_user_connected(&t).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_drained_backends_fail() {
    run("worker_drained_backends_fail", |t| async move {
        disruption::worker_drained_backends_fail(&t).await
    })
    .await;
}
