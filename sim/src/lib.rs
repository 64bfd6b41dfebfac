//! Spawner's deterministic simulator: the production components in a turmoil world.

pub mod clock;
pub mod entropy;
pub mod invariants;
pub mod net;
pub mod rng;
pub mod workload;
