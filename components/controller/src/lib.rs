//! Spawner controller: built in its own issue; nothing here runs yet.
