//! Spawner's deterministic simulator: the production components in a turmoil world.

pub mod entropy;
pub mod net;
