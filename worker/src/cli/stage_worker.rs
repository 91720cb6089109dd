//! `pipewright stage-worker` (hidden): one shard of a multi-process
//! pipeline, started by a launcher or the operator with its static wiring.
//!
//! The run key comes from the `PIPEWRIGHT_RUN_KEY` environment variable (64
//! hex digits), never from the command line, where other users of the
//! machine could read it. The last stage prints one JSON line per step.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::link::{RunId, RunKey};
use crate::pipeline::{Auth, Peers, RingPeers, Shard, StageWorker};

/// Environment variable holding the run key.
pub const RUN_KEY_ENV: &str = "PIPEWRIGHT_RUN_KEY";

/// Arguments of `pipewright stage-worker`.
#[derive(Debug, Args)]
pub struct StageWorkerArgs {
    /// TrainingRun manifest (YAML); every worker must read the same one.
    pub manifest: PathBuf,
    /// Pipeline stage of this worker.
    #[arg(long)]
    pub stage: usize,
    /// Data-parallel replica of this worker.
    #[arg(long, default_value_t = 0)]
    pub replica: usize,
    /// Where the previous stage (or, on the first stage of a tied model
    /// with three or more stages, the last stage) connects.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The next stage's `--listen` address.
    #[arg(long)]
    pub next: Option<SocketAddr>,
    /// The first stage's `--listen` address (last stage of a tied model
    /// with three or more stages).
    #[arg(long)]
    pub tie: Option<SocketAddr>,
    /// Where the previous replica of this stage connects (replicas > 1).
    #[arg(long)]
    pub ring_listen: Option<SocketAddr>,
    /// The next replica's `--ring-listen` address (replicas > 1).
    #[arg(long)]
    pub ring_next: Option<SocketAddr>,
    /// Run id, 32 hex digits (default: derived from the run's name).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Seconds to wait for a peer before giving up.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Kernel threads (default: `training.threads`, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse_hex<const N: usize>(what: &str, text: &str) -> Result<[u8; N]> {
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        bail!("{what} must be {} hex digits", 2 * N);
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .with_context(|| format!("{what} must be {} hex digits", 2 * N))?;
    }
    Ok(out)
}

/// Run `pipewright stage-worker`.
pub fn run(args: StageWorkerArgs) -> Result<()> {
    let manifest = pipewright_spec::load_manifest(&args.manifest)
        .with_context(|| format!("{} is not a valid TrainingRun", args.manifest.display()))?;
    super::init_threads(args.threads.unwrap_or(manifest.spec.training.threads));
    let key = std::env::var(RUN_KEY_ENV)
        .with_context(|| format!("{RUN_KEY_ENV} must hold the run key"))?;
    let key = RunKey(parse_hex::<32>(RUN_KEY_ENV, &key)?);
    let run_id = match &args.run_id {
        Some(text) => RunId(parse_hex::<16>("--run-id", text)?),
        None => {
            let digest = blake3::hash(manifest.metadata.name.as_bytes());
            let mut id = [0u8; 16];
            id.copy_from_slice(&digest.as_bytes()[..16]);
            RunId(id)
        }
    };
    let bind = |addr: SocketAddr| {
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
    };
    let ring = match (args.ring_listen, args.ring_next) {
        (Some(listen), Some(next)) => Some(RingPeers {
            listener: bind(listen)?,
            next,
        }),
        (None, None) => None,
        _ => bail!("--ring-listen and --ring-next go together"),
    };
    let peers = Peers {
        listener: args.listen.map(bind).transpose()?,
        next: args.next,
        tie: args.tie,
        ring,
    };
    let shard = Shard {
        stage: args.stage,
        replica: args.replica,
    };
    let timeout = Duration::from_secs(args.timeout);
    let auth = Auth { run_id, key };
    let mut worker = StageWorker::new(&manifest, shard, peers, auth, timeout)
        .context("starting the stage worker")?;
    let steps = manifest.spec.training.steps;
    while worker.steps_done() < steps {
        let s = worker
            .train_step()
            .with_context(|| format!("step {}", worker.steps_done()))?;
        if let Some(loss) = s.loss {
            println!(
                "{}",
                json!({
                    "step": s.step,
                    "stage": shard.stage,
                    "replica": shard.replica,
                    "loss": loss,
                    "grad_norm": s.grad_norm,
                    "seconds": s.seconds,
                })
            );
        }
    }
    worker.finish().context("closing the links")?;
    Ok(())
}
