//! The injected wall clock, shared by every component: see `spawner_core::clock`.

pub use spawner_core::clock::{Clock, SystemClock};
