//! `pipewright coordinator`: the per-run coordinator as its own process
//! (what the operator's coordinator pod runs); `train --processes` runs the
//! same coordinator inside the launcher (`crate::local`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::coord::setup::{config, run_key, TOKEN_ENV};
use crate::train::run_dir;

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
