//! Spawner's deterministic simulator: the production components in a turmoil world.

pub mod app;
pub mod clock;
pub mod components;
pub mod entropy;
pub mod fault_runner;
pub mod faults;
pub mod generators;
pub mod hosts;
pub mod invariants;
pub mod leadership;
pub mod mutants;
pub mod net;
pub mod observer;
pub mod pods;
pub mod rbac;
pub mod report;
pub mod rng;
pub mod router_hosts;
pub mod scenario;
pub mod throttling;
pub mod user_checks;
pub mod users;
pub mod workload;
pub mod world;
