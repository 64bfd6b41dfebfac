//! The `spawner` command line.

use std::io::Write;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

pub mod client;
pub mod components;
pub mod demo;
pub mod dev;
pub mod launcher;
pub mod probe;
pub mod replay;
pub mod spawn_steps;
pub mod state;
pub mod trace;

/// `spawner --version`: the crate's version and the commit it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("SPAWNER_GIT_COMMIT"),
    ")"
);

/// Session-lived backends on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "spawner", version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine, no cluster needed: a local Kubernetes API,
    /// a node agent running backends as processes, the controller, sweepers, the api and the
    /// router.
    Dev(dev::DevArgs),
    /// Spawn a backend (prints its name).
    Spawn(client::SpawnArgs),
    /// Show a backend's status, or follow its phases with --watch.
    Status(client::StatusArgs),
    /// List backends.
    Ls(client::LsArgs),
    /// Terminate backends.
    Rm(client::RmArgs),
    /// Print the SessionLivedBackend CustomResourceDefinition as YAML.
    Crd,
    /// Work with session traces (docs/traces.md).
    Trace(trace::TraceArgs),
    /// Play a session trace against a running deployment and report what happened.
    Replay(replay::ReplayArgs),
    /// Run the controller (a Deployment in a cluster).
    Controller(spawner_controller::ControllerArgs),
    /// Run a node's sweeper (a DaemonSet in a cluster).
    Sweeper(spawner_sweeper::SweeperArgs),
    /// Run the api (a Deployment in a cluster).
    Api(spawner_api::ApiArgs),
    /// Run the sidecar (injected into every backend pod).
    Sidecar(spawner_sidecar::SidecarArgs),
    /// Run the router, the public entry for browsers (a Deployment in a cluster).
    Router(spawner_router::RouterArgs),
    /// Run a node agent that runs pods as local processes, against any API server.
    NodeAgent(spawner_node_agent::NodeAgentArgs),
    /// Serve the demo backend (a shared multiplayer page) on $PORT: what `spawner dev --demo`
    /// spawns.
    DemoBackend(DemoBackendArgs),
    /// GET an http:// URL and succeed on a 2xx answer: the images' health check, for images
    /// without a shell or curl.
    Probe(probe::ProbeArgs),
}

#[derive(Debug, clap::Args)]
pub struct DemoBackendArgs {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on: loopback, where the pod's sidecar reaches it, so nothing gets
    /// past the sidecar.
    #[arg(long, env = "SPAWNER_DEMO_BIND", default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Name shown on the page.
    #[arg(long, env = "SPAWNER_BACKEND_NAME", default_value = "demo")]
    pub name: String,
}

/// The `spawner` binary (and the e2e suites' copy of it): logging to stderr, the command line,
/// and the command on the runtime it needs; errors are one line with their causes.
pub fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        // Builds its own runtimes, one single-threaded runtime per core.
        Command::Sidecar(args) => {
            spawner_sidecar::run_per_core(&args, shutdown_signal()).context("sidecar")
        }
        command => run_on_runtime(Cli { command }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, with its causes: what a user needs to act on.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_on_runtime(cli: Cli) -> anyhow::Result<()> {
    // The demo backend and the client commands are small and short: one thread starts faster
    // and lighter (a demo backend per session; measured 5 ms of CPU per start on the
    // multi-threaded runtime). The components serve many connections and get one per core.
    let single_threaded = matches!(
        cli.command,
        Command::DemoBackend(_)
            | Command::Spawn(_)
            | Command::Status(_)
            | Command::Ls(_)
            | Command::Rm(_)
            | Command::Crd
            | Command::Probe(_)
            | Command::Trace(_)
    );
    let runtime = if single_threaded {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = runtime.context("cannot start the async runtime")?;
    runtime.block_on(run(cli, &mut std::io::stdout()))
}

/// Runs one parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args, out, std::future::pending()).await?,
        Command::Spawn(args) => client::spawn(args, out).await?,
        Command::Status(args) => client::status(args, out).await?,
        Command::Ls(args) => client::ls(args, out).await?,
        Command::Rm(args) => client::rm(args, out).await?,
        Command::Controller(args) => components::controller(args).await?,
        Command::Sweeper(args) => components::sweeper(args).await?,
        Command::Api(args) => components::api(args).await?,
        // `main` runs the sidecar on its own runtimes; called from a runtime, it gets a thread.
        Command::Sidecar(args) => tokio::task::spawn_blocking(move || {
            spawner_sidecar::run_per_core(&args, shutdown_signal())
        })
        .await
        .context("sidecar")?
        .context("sidecar")?,
        Command::Router(args) => components::router(args).await?,
        Command::NodeAgent(args) => components::node_agent(args).await?,
        Command::Trace(args) => trace::run(args, out).await?,
        Command::Probe(args) => probe::run(args).await?,
        Command::Replay(args) => replay::run(args, out).await?,
        Command::Crd => {
            out.write_all(spawner_core::resource::crd_yaml()?.as_bytes())?;
        }
        Command::DemoBackend(args) => {
            let listener = tokio::net::TcpListener::bind((args.bind, args.port))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot listen on {}:{}: {e}", args.bind, args.port)
                })?;
            tracing::info!(port = args.port, name = %args.name, "demo backend listening");
            axum::serve(listener, demo::router(&args.name))
                .with_graceful_shutdown(shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn crd_output_matches_the_committed_manifest() {
        let mut out = Vec::new();
        run(Cli::parse_from(["spawner", "crd"]), &mut out)
            .await
            .expect("crd");
        let committed = include_str!("../../../deploy/crd.yaml");
        assert!(
            String::from_utf8_lossy(&out) == committed,
            "deploy/crd.yaml is out of date: run `cargo run -p spawner -- crd > deploy/crd.yaml`"
        );
    }
}
