//! `pipewright-operator`: the Kubernetes operator binary.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Kubernetes operator for Pipewright training runs.
#[derive(Parser)]
#[command(name = "pipewright-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the TrainingRun CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            let yaml = pipewright_operator::crd::crd_yaml().context("building the CRD")?;
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .context("writing the CRD to stdout")?;
        }
    }
    Ok(())
}
