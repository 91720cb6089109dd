//! `pipewright coordinator`: the per-run coordinator as its own process
//! (what the operator's coordinator pod runs); `train --processes` runs the
//! same coordinator inside the launcher (`crate::local`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::checkpoint::{self, Meta};
use crate::coord::server::{CheckpointContext, Config};
use crate::model::{partition, ModelConfig};
use crate::train::run_dir;

use super::worker::TOKEN_ENV;

/// Environment variable with the run key (64 hex digits).
pub const RUN_KEY_ENV: &str = "PIPEWRIGHT_RUN_KEY";

/// Arguments of `pipewright coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// TrainingRun manifest (YAML).
    pub manifest: PathBuf,
    /// Address of the HTTP API (workers, status, metrics).
    #[arg(
        long,
        env = "PIPEWRIGHT_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    pub listen: String,
    /// Directory for the coordinator's state (survives restarts).
    #[arg(long, env = "PIPEWRIGHT_STATE_DIR")]
    pub state: Option<PathBuf>,
    /// Run directory for checkpoints (default: `checkpoint.dir`, else
    /// `runs/<name>`); workers write their stage files into it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Milliseconds without a heartbeat after which a worker is lost.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Also serve the Prometheus metrics at `http://ADDR/metrics` (they are
    /// on the API's address too).
    #[arg(long, env = "PIPEWRIGHT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// A fresh 32-byte secret as hex, from the OS's randomness.
pub fn random_hex32() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// The run id every worker of `manifest` uses: derived from its name.
pub fn run_id_hex(manifest: &pipewright_spec::TrainingRun) -> String {
    let digest = blake3::hash(manifest.metadata.name.as_bytes());
    hex::encode(&digest.as_bytes()[..16])
}

/// Everything the coordinator of `manifest` needs: the tokenizer and the
/// corpus fingerprint for checkpoint metadata, the stage layout.
pub fn config(
    manifest: &pipewright_spec::TrainingRun,
    token: String,
    run_key: String,
    state_dir: PathBuf,
    root: PathBuf,
    lease: Duration,
) -> Result<Config> {
    let spec = &manifest.spec;
    let (tokenizer, corpus) = crate::data::prepare(&spec.data)?;
    corpus.check_seq_len(spec.model.seq_len)?;
    let model = ModelConfig::from_spec(&spec.model, tokenizer.vocab_size());
    let meta = Meta {
        format_version: checkpoint::FORMAT_VERSION,
        step: 0,
        manifest: manifest.clone(),
        model: model.clone(),
        stage_layers: partition(&model, spec.pipeline.stages, &[]),
        seed: spec.training.seed,
        data_fingerprint: hex::encode(corpus.fingerprint()),
        losses: Vec::new(),
    };
    let ledger = Some(root.join(crate::ledger::FILE));
    Ok(Config {
        manifest: manifest.clone(),
        token,
        run_key,
        run_id: run_id_hex(manifest),
        lease,
        state_dir,
        checkpoint: Some(CheckpointContext {
            root,
            meta,
            tokenizer,
            keep: spec.checkpoint.keep,
        }),
        model,
        ledger,
    })
}

/// The run key: from the environment, else the one saved in the state
/// directory, else a new one saved there (readable by the owner only).
fn run_key(state_dir: &Path) -> Result<String> {
    if let Ok(k) = std::env::var(RUN_KEY_ENV) {
        let k = k.trim().to_string();
        anyhow::ensure!(
            hex::decode_to_slice(&k, &mut [0u8; 32]).is_ok(),
            "{RUN_KEY_ENV} must be 64 hex digits"
        );
        return Ok(k);
    }
    let path = state_dir.join("run.key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return Ok(k.trim().to_string());
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let k = random_hex32();
    std::fs::write(&path, &k).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(k)
}

/// Run `pipewright coordinator` until the run ends.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    let manifest = pipewright_spec::load_manifest(&args.manifest)
        .with_context(|| format!("{} is not a valid TrainingRun", args.manifest.display()))?;
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .with_context(|| format!("{TOKEN_ENV} must hold the run's join token"))?;
    let root = args.out.clone().unwrap_or_else(|| run_dir(&manifest));
    let state_dir = args
        .state
        .clone()
        .unwrap_or_else(|| root.join("coordinator"));
    let key = run_key(&state_dir)?;
    let cfg = config(
        &manifest,
        token,
        key,
        state_dir,
        root,
        Duration::from_millis(args.lease_ms),
    )?;
    let handle = crate::coord::start(cfg, &args.listen)?;
    eprintln!(
        "coordinator of {} listening on http://{} (status: /status, metrics: /metrics)",
        manifest.metadata.name,
        handle.addr()
    );
    if let Some(listen) = &args.metrics_listen {
        let addr = handle.serve_metrics(listen)?;
        eprintln!("metrics: http://{addr}/metrics");
    }
    let mut last = (u64::MAX, u64::MAX);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = handle.status();
        if (s.step, s.epoch) != last {
            last = (s.step, s.epoch);
            eprintln!(
                "{:?} step {}/{} loss {} epoch {} workers {}/{}",
                s.phase,
                s.step,
                s.steps,
                s.loss.map_or("-".into(), |l| format!("{l:.4}")),
                s.epoch,
                s.shards.iter().filter(|x| x.worker.is_some()).count(),
                s.shards.len()
            );
        }
        match s.phase {
            crate::coord::Phase::Succeeded => {
                // Let workers collect the news before the API goes away.
                std::thread::sleep(Duration::from_secs(2));
                eprintln!("run succeeded: {}", s.reason);
                return Ok(());
            }
            crate::coord::Phase::Failed => {
                std::thread::sleep(Duration::from_secs(2));
                anyhow::bail!("run failed: {}", s.reason);
            }
            _ => {}
        }
    }
}
