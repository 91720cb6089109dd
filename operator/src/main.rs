//! `pipewright-operator`: the Kubernetes operator binary.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pipewright_operator::children::Settings;
use tracing_subscriber::EnvFilter;

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
    /// Watch TrainingRuns in every namespace and run them.
    Run {
        /// Image with the `pipewright` binary, used for coordinator and shard pods.
        #[arg(long, env = "PIPEWRIGHT_IMAGE")]
        image: String,
        /// GPUs each shard pod requests (0: shards run on CPU).
        #[arg(long, env = "PIPEWRIGHT_GPUS_PER_SHARD", default_value_t = 1)]
        gpus_per_shard: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            let yaml = pipewright_operator::crd::crd_yaml().context("building the CRD")?;
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .context("writing the CRD to stdout")?;
        }
        Command::Run {
            image,
            gpus_per_shard,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API server")?;
                let settings = Settings {
                    image,
                    gpus_per_shard,
                };
                pipewright_operator::controller::run(client, settings).await;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}
