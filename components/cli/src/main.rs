use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = spawner::Cli::parse();
    spawner::run(cli, &mut std::io::stdout().lock())
}
