//! Spawner api: built in its own issue; nothing here runs yet.
