//! Spawner localcluster: a small, faithful Kubernetes API server for one machine.
//!
//! It serves the part of the Kubernetes API that Spawner uses (SessionLivedBackends, Pods,
//! Services, Events, Namespaces, Nodes, Leases) with the semantics clients rely on: one global
//! resourceVersion, watches with bookmarks and 410 Gone, selectors, conflicts, patches, the
//! status subresource, finalizers and owner-reference garbage collection. It runs over any
//! transport: [`router`] gives an axum `Router`, [`serve`] serves it on a listener the caller
//! binds (loopback TCP in `spawner dev`, turmoil sockets in the simulator). See
//! docs/localcluster.md.

pub mod audit;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod decode;
pub mod error;
pub mod event_versions;
pub mod kubeconfig;
pub mod patch;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;
pub mod throttle;
pub mod tls;

pub use audit::{Audit, AuditEntry};
pub use auth::{Auth, Identity, Rbac};
pub use clock::{Clock, SystemClock};
pub use cluster::{Cluster, ServerConfig};
pub use error::ApiError;
pub use kubeconfig::{kubeconfig_yaml, write_kubeconfig};
pub use server::{router, serve, serve_on_loopback};
pub use store::StoreConfig;
pub use throttle::Throttle;
pub use tls::{ServerCertificates, TlsListener};
