//! The default scale suite: four worlds of 2,500 users each (run in parallel threads by the
//! test harness), together 10,000 simulated users and over 1,000 backends, every invariant
//! checked at every step. `SPAWNER_SIM_USERS` and `SPAWNER_SIM_SEEDS` scale them up for soaks.

mod common;

spawner_sim::install_entropy_hook!();

#[test]
fn world_100_with_2500_users() {
    common::scale_world(100, 2_500);
}

#[test]
fn world_200_with_2500_users() {
    common::scale_world(200, 2_500);
}

#[test]
fn world_300_with_2500_users() {
    common::scale_world(300, 2_500);
}

#[test]
fn world_400_with_2500_users() {
    common::scale_world(400, 2_500);
}
