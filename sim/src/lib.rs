//! Spawner sim: built in its own issue; nothing here runs yet.
