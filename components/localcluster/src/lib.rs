//! Spawner localcluster: built in its own issue; nothing here runs yet.
pub mod node;
