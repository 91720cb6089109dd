//! `pipewright-operator`: the Kubernetes operator binary.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::runtime::events::{Recorder, Reporter};
use pipewright_operator::children::Settings;
use pipewright_operator::coordinator::HttpProbe;
use pipewright_operator::http::{serve, Endpoints, Health};
use pipewright_operator::leader::{LeaderElector, LeaseConfig};
use pipewright_operator::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
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

/// The variables naming the OTLP collector; the operator's pods get them
/// too.
const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// Logs to stderr; spans also go to an OTLP collector (HTTP/protobuf) when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific variable) is set.
fn init_tracing() -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in a pod's log.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let otlp = OTLP_ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !otlp {
        tracing_subscriber::registry().with(filter).with(fmt).init();
        return Ok(None);
    }
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("building the OTLP span exporter")?;
    let service =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "pipewright-operator".to_owned());
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build(),
        )
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("pipewright-operator");
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    Ok(Some(provider))
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
    let provider = init_tracing()?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let metrics_server = serve(args.metrics_addr, Endpoints::Metrics(metrics.clone()))
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    let health_server = serve(args.health_addr, Endpoints::Health(health.clone()))
        .await
        .with_context(|| format!("serving health on {}", args.health_addr))?;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")?;
    health.set_ready(true);
    let identity = args
        .identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "pipewright-operator".to_owned());

    // Stops the controller: a signal, or (with leader election) a lost lease.
    let stop = shutdown.child_token();
    let mut lost = false;
    let elector = if args.leader_elect {
        let namespace = args
            .lease_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".to_owned());
        let elector = Arc::new(LeaderElector::new(
            client.clone(),
            LeaseConfig::new(args.lease_name, namespace, identity.clone()),
        ));
        tracing::info!(identity, lease = %elector.config().name, "waiting for the leader lease");
        if !elector.acquire(&shutdown).await {
            shutdown_telemetry(provider);
            return Ok(());
        }
        tracing::info!(identity, "leading");
        health.set_leading(true);
        Some(elector)
    } else {
        health.set_leading(true);
        None
    };
    let keeper = elector.clone().map(|elector| {
        let stop = stop.clone();
        tokio::spawn(async move {
            elector.keep(&stop).await;
            // Returned without being stopped: the lease is lost.
            let lost = !stop.is_cancelled();
            stop.cancel();
            lost
        })
    });

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
        pass_env: OTLP_ENDPOINT_VARS
            .iter()
            .filter_map(|&k| {
                let v = std::env::var(k).ok().filter(|v| !v.is_empty())?;
                Some((k.to_owned(), v))
            })
            .collect(),
    };
    pipewright_operator::controller::run(
        client,
        settings,
        recorder,
        probe,
        metrics,
        stop.clone().cancelled_owned(),
    )
    .await;
    stop.cancel();
    health.set_ready(false);
    if let Some(keeper) = keeper {
        lost = keeper.await.unwrap_or(false);
    }
    if let (Some(elector), false) = (elector, lost) {
        match elector.release().await {
            Ok(()) => tracing::info!("released the leader lease"),
            Err(error) => tracing::warn!(%error, "releasing the leader lease"),
        }
    }
    metrics_server.abort();
    health_server.abort();
    shutdown_telemetry(provider);
    if lost {
        anyhow::bail!("lost the leader lease; exiting so that only the new leader acts");
    }
    Ok(())
}

fn shutdown_telemetry(provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>) {
    if let Some(provider) = provider {
        if let Err(error) = provider.shutdown() {
            eprintln!("flushing traces: {error}");
        }
    }
}
