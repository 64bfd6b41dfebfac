//! Spawner's end-to-end suites and their harnesses.
//!
//! - [`controlplane`]: a real Kubernetes control plane (etcd, kube-apiserver,
//!   kube-controller-manager) built from pinned Go modules, for tests that must hold against the
//!   real API server.
//! - [`conformance`]: the API conformance suite, run against localcluster and, when
//!   `SPAWNER_CONFORMANCE_KUBECONFIG` is set, against a real cluster.
//! - [`scenarios`]: what a web application does with Spawner (spawn, connect through the
//!   sidecar, get-or-create, failures, terminate), run against `spawner dev` or a kind cluster.

pub mod conformance;
pub mod controlplane;
pub mod scenarios;
