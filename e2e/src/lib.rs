//! Spawner e2e: end-to-end suites run against localcluster or a real cluster.

pub mod conformance;
