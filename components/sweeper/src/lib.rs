//! Spawner sweeper: built in its own issue; nothing here runs yet.
