//! The end-to-end scenarios against `spawner dev` started as a separate process: the api,
//! controller, sweepers and a node agent running backends as local processes, reached over
//! loopback. Runs in CI. The binary is `spawner-e2e-cli` (this crate's build of the `spawner`
//! CLI), or `SPAWNER_BIN` when set (e.g. `target/debug/spawner`).
//!
//! Each test starts its own `spawner dev` on free ports, so they run in parallel and a failure
//! in one leaves the others' systems untouched.

use std::path::Path;

use spawner_e2e::scenarios::{Failure, Target, Timings, local::LocalDev, suite};

const SPAWNER: &str = env!("CARGO_BIN_EXE_spawner-e2e-cli");

/// Runs `scenario` against a fresh `spawner dev`; on failure, shows its log.
async fn run<F, Fut>(test: &str, scenario: F)
where
    F: FnOnce(Target) -> Fut,
    Fut: std::future::Future<Output = Result<Timings, Failure>>,
{
    let dev = LocalDev::start(Path::new(SPAWNER)).unwrap_or_else(|e| panic!("{test}: {e}"));
    suite::report(test, "local", scenario(dev.target()).await, || {
        format!("--- spawner dev log ---\n{}", dev.log())
    });
}

spawner_e2e::scenario_tests!(run:
    spawn_connect_disconnect_swept,
    get_or_create_concurrently,
    crashing_app_fails,
    never_ready_fails_with_start_timeout,
    terminate_while_starting,
    slow_start_keeps_its_grace_period_after_ready,
    router_requires_a_connect_token,
);
