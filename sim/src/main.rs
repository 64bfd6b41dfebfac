//! `spawner-sim`: runs one simulated world from a seed and prints its summary; exits 1 with the
//! seed, the fault schedule and the last events when an invariant is violated.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use spawner_core::trace::Trace;
use spawner_sim::scenario;

spawner_sim::install_entropy_hook!();

#[derive(Parser)]
#[command(name = "spawner-sim", about = "Run one deterministic Spawner world")]
struct Args {
    /// Seed of the world: workload, faults, network and every random draw of the components.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated users (ignored with --trace).
    #[arg(long, default_value_t = 500)]
    users: usize,
    /// Random faults scheduled while users are active.
    #[arg(long, default_value_t = 0)]
    faults: usize,
    /// Replay this session trace (JSON Lines) instead of a generated workload.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the workload that was played to this file.
    #[arg(long)]
    write_trace: Option<PathBuf>,
    /// Override the world's step (simulated milliseconds per turmoil tick).
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Override the number of pod slots (turmoil hosts) per node.
    #[arg(long)]
    slots: Option<usize>,
    /// Print every observable event, not only the summary.
    #[arg(long)]
    events: bool,
    /// With --trace: replay the trace a second time with this grace period (seconds) and
    /// compare backends created, backend-seconds idle and sessions that found their backend
    /// gone.
    #[arg(long, requires = "trace")]
    grace: Option<u32>,
}

/// Log lines stamped with simulated time (the world's clock), not the machine's.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>9.3}", t.as_secs_f64()),
            None => write!(w, "{:>9}", "-"),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The components' own logs, when asked for (`RUST_LOG=spawner_sweeper=debug` ...).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(SimTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    // Seed before anything creates a thread or a hash map: see spawner_sim::entropy.
    spawner_sim::entropy::seed(args.seed);
    let mut config = scenario::world(args.seed, args.users, args.faults);
    if let Some(path) = &args.trace {
        let trace = std::fs::File::open(path)
            .map_err(|e| e.to_string())
            .and_then(|f| Trace::read(std::io::BufReader::new(f)).map_err(|e| e.to_string()));
        match trace {
            Ok(trace) => {
                config.workload = trace;
                // A recorded trace may need more slots than the world has at its peaks; what
                // its users saw is in the report, not held to the generated worlds' zero.
                config.allowed_user_failures = None;
            }
            Err(e) => {
                eprintln!("cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if let Some(ms) = args.tick_ms {
        config.tick = std::time::Duration::from_millis(ms.max(1));
        config.reproduce += &format!(" --tick-ms {ms}");
    }
    if let Some(slots) = args.slots {
        config.slots_per_node = slots.max(1);
        // Fewer slots than the workload's peaks make users wait past their patience by design.
        config.allowed_user_failures = None;
        config.reproduce += &format!(" --slots {slots}");
    }
    if let Some(path) = &args.write_trace {
        let written = std::fs::File::create(path)
            .and_then(|f| config.workload.write(std::io::BufWriter::new(f)));
        if let Err(e) = written {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if !config.faults.is_empty() {
        println!("faults: {}", scenario::describe(&config.faults));
    }
    let what_if = args.grace.map(|grace| {
        let mut other = config.clone();
        // A longer grace needs as much more time after the trace for the last sweeps.
        other.drain +=
            std::time::Duration::from_secs(u64::from(grace.saturating_sub(config.grace_seconds)));
        other.grace_seconds = grace;
        other.reproduce += &format!(" --grace {grace}");
        other
    });
    let base_grace = config.grace_seconds;
    let summary = match run_world(config, &args) {
        Ok(summary) => summary,
        Err(code) => return code,
    };
    if args.trace.is_some() {
        let report = spawner_sim::report::report(&summary);
        println!("{report}");
        if let Some(other) = what_if {
            let grace = other.grace_seconds;
            // Each world seeds itself from the seed: the second replay is as deterministic as
            // the first.
            let other = match run_world(other, &args) {
                Ok(summary) => spawner_sim::report::report(&summary),
                Err(code) => return code,
            };
            print!(
                "{}",
                spawner_sim::report::what_if(base_grace, &report, grace, &other)
            );
        }
    }
    ExitCode::SUCCESS
}

/// Runs one world and prints its summary (and events when asked); a violation is printed and
/// becomes the exit code.
fn run_world(
    config: spawner_sim::world::WorldConfig,
    args: &Args,
) -> Result<spawner_sim::world::Summary, ExitCode> {
    // A fresh thread: std draws a thread's hash keys at its first map, from the seeded stream
    // (the main thread may have drawn its keys before the seed, e.g. for the log filter).
    let run = std::thread::spawn(move || spawner_sim::world::run(config)).join();
    let Ok(result) = run else {
        eprintln!("the world's thread panicked");
        return Err(ExitCode::FAILURE);
    };
    match result {
        Ok(summary) => {
            if args.events {
                for event in &summary.events {
                    println!("{event}");
                }
            }
            println!("{summary}");
            Ok(summary)
        }
        Err(failure) => {
            if args.events {
                for event in &failure.events {
                    println!("{event}");
                }
            }
            eprintln!("{failure}");
            Err(ExitCode::FAILURE)
        }
    }
}
