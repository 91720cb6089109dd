//! The `pipewright` command.

use clap::Parser;
use opentelemetry::KeyValue;
use pipewright::cli::Command;
use pipewright::telemetry::{self, Service};

// Every micro-batch allocates and frees the same large activation buffers;
// mimalloc keeps those pages mapped instead of handing them back to the
// kernel and faulting them in again (about 8% of a quickstart step).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = pipewright::cli::Cli::parse();
    let (service, attributes) = traced(&cli.command);
    let mut telemetry = telemetry::init(service, attributes);
    let result = pipewright::cli::run(cli);
    // The last spans go out before the process exits, within seconds.
    telemetry.shutdown();
    if let Err(err) = result {
        if let Some(q) = err.downcast_ref::<pipewright::shard::Quarantined>() {
            eprintln!("{q}");
            std::process::exit(pipewright::EXIT_QUARANTINED);
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The service a command sends spans as (when a collector is configured)
/// and the resource attributes known before it starts: the run, and for a
/// worker its shard, name and identity.
fn traced(command: &Command) -> (Option<Service>, Vec<KeyValue>) {
    if !telemetry::otlp_configured() {
        return (None, Vec::new());
    }
    let run = |path: &std::path::Path| {
        pipewright_spec::load_manifest(path)
            .ok()
            .map(|m| KeyValue::new("pipewright.run", m.metadata.name))
    };
    match command {
        Command::Coordinator(a) => (
            Some(Service::Coordinator),
            run(&a.manifest).into_iter().collect(),
        ),
        Command::Train(a) if a.processes => (
            Some(Service::Coordinator),
            run(&a.manifest).into_iter().collect(),
        ),
        Command::Worker(a) => {
            let mut attrs: Vec<KeyValue> =
                a.manifest.as_deref().and_then(run).into_iter().collect();
            if let (Some(s), Some(r)) = (a.stage, a.replica) {
                attrs.push(KeyValue::new("pipewright.stage", s as i64));
                attrs.push(KeyValue::new("pipewright.replica", r as i64));
            }
            if let Some(name) = &a.name {
                attrs.push(KeyValue::new("pipewright.worker.name", name.clone()));
            }
            attrs.extend(identity(a.identity.as_deref()));
            (Some(Service::Worker), attrs)
        }
        Command::Join(a) => (
            Some(Service::Worker),
            identity(a.identity.as_deref()).into_iter().collect(),
        ),
        _ => (None, Vec::new()),
    }
}

/// The fingerprint of the worker's identity (created here on first use,
/// as the worker would a moment later); nothing when it cannot be read.
fn identity(path: Option<&std::path::Path>) -> Option<KeyValue> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => pipewright::identity::default_path().ok()?,
    };
    let id = pipewright::identity::Identity::load_or_create(&path).ok()?;
    Some(KeyValue::new("pipewright.identity", id.fingerprint()))
}
