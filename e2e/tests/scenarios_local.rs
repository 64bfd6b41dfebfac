//! The end-to-end scenarios against `spawner dev` started as a separate process: the api,
//! controller, sweepers and a node agent running backends as local processes, reached over
//! loopback. Runs in CI. The binary is `spawner-e2e-cli` (this crate's build of the `spawner`
//! CLI), or `SPAWNER_BIN` when set (e.g. `target/debug/spawner`).
//!
//! Each test starts its own `spawner dev` on free ports, so they run in parallel and a failure
//! in one leaves the others' systems untouched.

use std::path::Path;

use spawner_e2e::scenarios::{self, Failure, Target, Timings, local::LocalDev};

const SPAWNER: &str = env!("CARGO_BIN_EXE_spawner-e2e-cli");

/// Runs `scenario` against a fresh `spawner dev`; on failure, shows its log.
async fn run<F, Fut>(test: &str, scenario: F)
where
    F: FnOnce(Target) -> Fut,
    Fut: std::future::Future<Output = Result<Timings, Failure>>,
{
    let dev = LocalDev::start(Path::new(SPAWNER)).unwrap_or_else(|e| panic!("{test}: {e}"));
    match scenario(dev.target()).await {
        Ok(timings) => eprintln!("{test} (local): {timings}"),
        Err(failure) => panic!(
            "{test} (local): {failure}\n--- spawner dev log ---\n{}",
            dev.log()
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
async fn never_ready_fails_with_start_timeout() {
    run("never_ready_fails_with_start_timeout", |t| async move {
        scenarios::never_ready_fails_with_start_timeout(&t).await
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
