//! Spawner's deterministic simulator: the production components in a turmoil world.

pub mod app;
pub mod clock;
pub mod components;
pub mod entropy;
pub mod faults;
pub mod generators;
pub mod invariants;
pub mod leadership;
pub mod mutants;
pub mod net;
pub mod pods;
pub mod rbac;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod users;
pub mod workload;
pub mod world;
