//! The `spawner` command line.

use std::io::Write;

use clap::{Parser, Subcommand};

/// Session-lived backends on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "spawner", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the SessionLivedBackend CustomResourceDefinition as YAML.
    Crd,
}

/// Runs one parsed command, writing its output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            out.write_all(spawner_core::resource::crd_yaml()?.as_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_output_matches_the_committed_manifest() {
        let mut out = Vec::new();
        run(Cli::parse_from(["spawner", "crd"]), &mut out).expect("crd");
        let committed = include_str!("../../../deploy/crd.yaml");
        assert!(
            String::from_utf8_lossy(&out) == committed,
            "deploy/crd.yaml is out of date: run `cargo run -p spawner -- crd > deploy/crd.yaml`"
        );
    }
}
