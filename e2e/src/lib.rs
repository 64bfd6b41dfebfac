//! Spawner e2e: built in its own issue; nothing here runs yet.
