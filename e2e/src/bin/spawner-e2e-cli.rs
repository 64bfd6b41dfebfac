//! The `spawner` command, built by this crate so that `cargo test -p spawner-e2e` always has a
//! current binary to start as a separate process (`spawner dev`, `spawner demo-backend`): an
//! integration test only gets `CARGO_BIN_EXE_*` for its own package's binaries. Same library,
//! same arguments as `components/cli/src/main.rs`; nothing here is test-specific.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = spawner::Cli::parse();
    match spawner::run(cli, &mut std::io::stdout()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
