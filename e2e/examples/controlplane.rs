//! Starts the real control plane and keeps it running until Ctrl-C, for poking at it by hand:
//!
//! ```text
//! cargo run -p spawner-e2e --example controlplane
//! kubectl --kubeconfig <printed path> get crd
//! kubectl --kubeconfig <printed path> --context sweeper auth can-i --list
//! ```
//!
//! `deploy/rbac/` is not applied; apply it with kubectl if you want the components' roles.

use spawner_e2e::controlplane::{ControlPlane, Identity};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let control_plane = ControlPlane::start().await?;
    println!("server:     {}", control_plane.server_url());
    println!("kubeconfig: {}", control_plane.kubeconfig_path().display());
    println!("logs:       {}", control_plane.dir().display());
    let contexts: Vec<&str> = Identity::ALL.iter().map(|i| i.name()).collect();
    println!("contexts:   {}", contexts.join(", "));
    println!("Ctrl-C stops it and removes everything.");
    tokio::signal::ctrl_c().await?;
    drop(control_plane);
    Ok(())
}
