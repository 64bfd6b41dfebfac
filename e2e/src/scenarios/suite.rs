//! What the scenario suites (`tests/scenarios_local.rs`, `tests/scenarios_kind.rs`) share: one
//! `#[tokio::test]` per scenario ([`scenario_tests!`](crate::scenario_tests)) and one way to
//! report its outcome ([`report`]). Each suite keeps only what differs: how it gets a
//! [`Target`](super::Target) and what a person should look at when a scenario fails.

use super::{Failure, Timings};

/// Reports a scenario's outcome as a test: its timings on stderr, or a panic that names the
/// test, the deployment it ran against and `diagnostics` (where to look next).
pub fn report(
    test: &str,
    deployment: &str,
    outcome: Result<Timings, Failure>,
    diagnostics: impl FnOnce() -> String,
) {
    match outcome {
        Ok(timings) => eprintln!("{test} ({deployment}): {timings}"),
        Err(failure) => panic!("{test} ({deployment}): {failure}\n{}", diagnostics()),
    }
}

/// Declares one test per named scenario of [`crate::scenarios`], each running it through the
/// suite's own `run(test_name, |target| scenario(&target))`:
///
/// ```text
/// spawner_e2e::scenario_tests!(run: crashing_app_fails, terminate_while_starting);
/// ```
///
/// The tests are named after their scenarios.
#[macro_export]
macro_rules! scenario_tests {
    ($run:ident: $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                $run(stringify!($scenario), |target| async move {
                    $crate::scenarios::$scenario(&target).await
                })
                .await;
            }
        )+
    };
}
