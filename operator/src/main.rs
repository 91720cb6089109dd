//! `pipewright-operator`: the Kubernetes operator binary.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::runtime::events::{Recorder, Reporter};
use pipewright_operator::children::Settings;
use pipewright_operator::coordinator::HttpProbe;
use pipewright_operator::http::{health_router, metrics_router, serve, Health};
use pipewright_operator::leader::{LeaderElector, LeaseConfig};
use pipewright_operator::metrics::Metrics;
use pipewright_operator::telemetry;
use tokio_util::sync::CancellationToken;

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
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image with the `pipewright` binary, used for coordinator and shard pods.
    #[arg(long, env = "PIPEWRIGHT_IMAGE")]
    image: String,
    /// GPUs each shard pod requests when a run does not set
    /// spec.placement.gpusPerWorker (0, the default: shards run on CPU, as
    /// shard workers do today).
    #[arg(long, env = "PIPEWRIGHT_GPUS_PER_SHARD", default_value_t = 0)]
    gpus_per_shard: u32,
    /// Reconcile only while holding a coordination.k8s.io Lease, so that of
    /// several replicas exactly one acts.
    #[arg(long, env = "PIPEWRIGHT_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "PIPEWRIGHT_LEASE_NAME",
        default_value = "pipewright-operator"
    )]
    lease_name: String,
    /// Namespace of the leader Lease (default: the pod's namespace from
    /// POD_NAMESPACE, else `default`).
    #[arg(long, env = "PIPEWRIGHT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: POD_NAME, else the
    /// host name).
    #[arg(long, env = "PIPEWRIGHT_LEADER_IDENTITY")]
    identity: Option<String>,
    /// Address serving Prometheus metrics on /metrics.
    #[arg(long, env = "PIPEWRIGHT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address serving /healthz and /readyz.
    #[arg(long, env = "PIPEWRIGHT_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            let yaml = pipewright_operator::crd::crd_yaml().context("building the CRD")?;
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .context("writing the CRD to stdout")?;
            Ok(())
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run(args))
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let telemetry = telemetry::init()?;
    let result = operate(args).await;
    telemetry.shutdown();
    result
}

/// Serves metrics and health, then reconciles (with leader election, only
/// while leading) until a signal or a lost lease.
async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (_, metrics_server) = serve(args.metrics_addr, metrics_router(metrics.clone()))
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    let (_, health_server) = serve(args.health_addr, health_router(health.clone()))
        .await
        .with_context(|| format!("serving health on {}", args.health_addr))?;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")?;
    health.set_ready(true);
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "pipewright-operator".to_owned());

    let elector = if args.leader_elect {
        let elector = Arc::new(elector(&args, &client, &identity));
        tracing::info!(identity, lease = %elector.config().name, "waiting for the leader lease");
        if !elector.acquire(&shutdown).await {
            return Ok(());
        }
        tracing::info!(identity, "leading");
        Some(elector)
    } else {
        None
    };
    health.set_leading(true);
    // Stops the controller: a signal, or (with leader election) a lost lease.
    let stop = shutdown.child_token();
    let keeper = elector.clone().map(|elector| keep(elector, stop.clone()));

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "pipewright-operator".to_owned(),
            instance: Some(identity),
        },
    );
    let probe = Arc::new(HttpProbe::new(Duration::from_secs(3)));
    let settings = Settings {
        image: args.image,
        gpus_per_shard: args.gpus_per_shard,
        pass_env: telemetry::otlp_env(|k| std::env::var(k).ok()),
    };
    let stopped = stop.clone().cancelled_owned();
    pipewright_operator::controller::run(client, settings, recorder, probe, metrics, stopped).await;
    stop.cancel();
    health.set_ready(false);
    let lost = match keeper {
        Some(keeper) => keeper.await.unwrap_or(false),
        None => false,
    };
    if let (Some(elector), false) = (elector, lost) {
        match elector.release().await {
            Ok(()) => tracing::info!("released the leader lease"),
            Err(error) => tracing::warn!(%error, "releasing the leader lease"),
        }
    }
    metrics_server.abort();
    health_server.abort();
    if lost {
        anyhow::bail!("lost the leader lease; exiting so that only the new leader acts");
    }
    Ok(())
}

/// The elector of the lease the arguments name.
fn elector(args: &RunArgs, client: &kube::Client, identity: &str) -> LeaderElector {
    let namespace = args
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_owned());
    LeaderElector::new(
        client.clone(),
        LeaseConfig::new(args.lease_name.clone(), namespace, identity.to_owned()),
    )
}

/// Renews the lease until `stop` or until it is lost; either way cancels
/// `stop`. The task's result says whether the lease was lost.
fn keep(elector: Arc<LeaderElector>, stop: CancellationToken) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        elector.keep(&stop).await;
        // Returned without being stopped: the lease is lost.
        let lost = !stop.is_cancelled();
        stop.cancel();
        lost
    })
}
