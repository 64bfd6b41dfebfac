//! Spawner's sans-IO core.
//!
//! Every decision the components make lives here as a pure function, so it can be unit- and
//! property-tested without a runtime (DESIGN.md, rule 1): the `SessionLivedBackend` resource,
//! the phase machine, the shape of a backend's Pod and Service, spec validation, backend ids,
//! the sidecar's event protocol, the idle deadline the sweeper acts on and the Kubernetes Event
//! that records a phase transition.

pub mod children;
pub mod clock;
pub mod connect_token;
pub mod id;
pub mod idle;
pub mod phase;
pub mod policy;
pub mod resource;
pub mod state_stream;
pub mod status;
pub mod token;
pub mod trace;
pub mod transition_event;
pub mod validation;

pub use phase::{Observation, Phase, Transition};
pub use resource::{
    BackendCondition, SessionLivedBackend, SessionLivedBackendSpec, SessionLivedBackendStatus,
};
