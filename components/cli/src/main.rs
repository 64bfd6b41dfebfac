use clap::Parser;
use spawner::Command;

// `spawner dev` runs a whole control plane in one process, allocating and freeing JSON on every
// request from many threads; glibc's allocator was about a seventh of its CPU in the spawn
// benchmark (docs/dev.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = spawner::Cli::parse();
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
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(spawner::run(cli, &mut std::io::stdout())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, with its causes: what a user needs to act on.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
