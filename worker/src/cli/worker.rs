//! `pipewright worker` and `pipewright join`: their arguments, turned into
//! the [`shard::Config`] of the shard runtime (`crate::shard`: registration,
//! the epoch loop, the steps through the coordinator's barrier), and
//! `join`'s progress line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::coord::Client;
use crate::shard;

pub use crate::coord::setup::TOKEN_ENV;

/// Arguments of `pipewright worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// TrainingRun manifest (YAML); fetched from the coordinator when
    /// omitted. It must be the coordinator's.
    pub manifest: Option<PathBuf>,
    /// Coordinator URL, e.g. `http://127.0.0.1:7070`.
    #[arg(long, env = "PIPEWRIGHT_COORDINATOR")]
    pub coordinator: String,
    /// Stage to serve (default: the one the coordinator picks).
    #[arg(long, env = "PIPEWRIGHT_STAGE")]
    pub stage: Option<usize>,
    /// Replica to serve, with `--stage`.
    #[arg(long, env = "PIPEWRIGHT_REPLICA", requires = "stage")]
    pub replica: Option<usize>,
    /// Address of the pipeline link listener.
    #[arg(long, env = "PIPEWRIGHT_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address of the replica ring listener.
    #[arg(long, env = "PIPEWRIGHT_RING_LISTEN", default_value = "127.0.0.1:0")]
    pub ring_listen: String,
    /// Host name peers use to reach this worker (default: the listen
    /// address's IP; required when listening on 0.0.0.0).
    #[arg(long, env = "PIPEWRIGHT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Name shown in the coordinator's status (default: host name).
    #[arg(long, env = "PIPEWRIGHT_NAME")]
    pub name: Option<String>,
    /// Seconds to wait for a peer link, and for a coordinator that does not
    /// answer, before giving up.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Kernel threads (default: `training.threads`, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Make every forward and backward take this many times as long: a
    /// drill that emulates a slower machine (see `routing: throughput`).
    #[arg(long, env = "PIPEWRIGHT_SLOWDOWN", default_value_t = 1.0)]
    pub slowdown: f64,
    /// Most megabytes (10^6 bytes) per second this worker sends on each
    /// link, paced by the kernel: leaves room on a shared uplink, or
    /// emulates a slower network in a drill (default: the manifest's
    /// `spec.pipeline.maxSendMegabytesPerSecond`, else no cap).
    #[arg(long, env = "PIPEWRIGHT_MAX_SEND_RATE", value_parser = parse_rate)]
    pub max_send_rate: Option<u64>,
    /// This worker's identity (an Ed25519 key, created on first use, mode
    /// 0600); the ledger credits its work to it. Default:
    /// `~/.config/pipewright/identity`.
    #[arg(long, env = "PIPEWRIGHT_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Serve this worker's Prometheus metrics at `http://ADDR/metrics`
    /// (steps, compute and idle seconds, micro-batches, link bytes, refused
    /// frames).
    #[arg(long, env = "PIPEWRIGHT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Print a progress line with this worker's credit (set by `join`).
    #[arg(skip)]
    pub progress: bool,
}

/// A `--max-send-rate` in megabytes per second, as bytes per second.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let mb: f64 = s
        .parse()
        .map_err(|_| format!("expected megabytes per second, got {s:?}"))?;
    let bytes = mb * 1e6;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!(
            "the send rate must be a positive number of megabytes per second, got {s}"
        ));
    }
    Ok(bytes as u64)
}

/// Arguments of `pipewright join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Coordinator URL of the run to join.
    #[arg(long)]
    pub coordinator: String,
    /// The run's join token.
    #[arg(long, env = TOKEN_ENV)]
    pub token: String,
    /// Address of the pipeline link listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address of the replica ring listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub ring_listen: String,
    /// Host name peers use to reach this machine.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Most megabytes per second this machine sends on each link.
    #[arg(long, value_parser = parse_rate)]
    pub max_send_rate: Option<u64>,
    /// This machine's identity (created on first use); the run credits
    /// your work to it. Default: `~/.config/pipewright/identity`.
    #[arg(long, env = "PIPEWRIGHT_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// No progress line (the run's step and this machine's credit and
    /// share, every few seconds).
    #[arg(long)]
    pub quiet: bool,
    /// Serve this machine's Prometheus metrics at `http://ADDR/metrics`.
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

/// Run `pipewright join`: a volunteer worker that takes the vacancy on the
/// stage that most limits the run, or waits as a standby for one.
pub fn join(args: JoinArgs) -> Result<()> {
    let w = WorkerArgs {
        manifest: None,
        coordinator: args.coordinator,
        stage: None,
        replica: None,
        listen: args.listen,
        ring_listen: args.ring_listen,
        advertise: args.advertise,
        name: None,
        timeout: 60,
        threads: args.threads,
        slowdown: 1.0,
        max_send_rate: args.max_send_rate,
        identity: args.identity,
        metrics_listen: args.metrics_listen,
        progress: !args.quiet,
    };
    serve(w, &args.token)
}

/// Run `pipewright worker` (the token comes from `PIPEWRIGHT_JOIN_TOKEN`).
pub fn run(args: WorkerArgs) -> Result<()> {
    let token = std::env::var(TOKEN_ENV)
        .with_context(|| format!("{TOKEN_ENV} must hold the run's join token"))?;
    serve(args, &token)
}

/// Serves one shard with `token` until the run ends; `args.progress` adds
/// the progress line. A worker whose identity the coordinator quarantined
/// ends with a [`shard::Quarantined`] error: `main` prints the
/// coordinator's line as it is and exits with [`crate::EXIT_QUARANTINED`].
fn serve(args: WorkerArgs, token: &str) -> Result<()> {
    let progress = args.progress;
    let session = shard::Session::open(shard::Config {
        coordinator: args.coordinator,
        token: token.to_owned(),
        manifest: args.manifest,
        stage: args.stage,
        replica: args.replica,
        listen: args.listen,
        ring_listen: args.ring_listen,
        advertise: args.advertise,
        name: args.name,
        timeout: Duration::from_secs(args.timeout),
        threads: args.threads,
        slowdown: args.slowdown,
        max_send_rate: args.max_send_rate,
        identity: args.identity,
        metrics_listen: args.metrics_listen,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = progress.then(|| {
        let (client, stop, me) = (
            session.client().clone(),
            stop.clone(),
            session.fingerprint(),
        );
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || show_progress(&client, &stop, &me))
    });
    let result = session.run();
    stop.store(true, Ordering::Relaxed);
    if let Some(Ok(p)) = progress {
        let _ = p.join();
    }
    result
}

/// Every few seconds until `stop`, the run's step and what the ledger
/// credits this machine (identity fingerprint `me`) with: rewritten in
/// place on a terminal, a line every half minute otherwise.
fn show_progress(client: &Client, stop: &AtomicBool, me: &str) {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal { 2 } else { 30 };
    let mut ticks = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        ticks += 1;
        if !ticks.is_multiple_of(every * 4) {
            continue;
        }
        let Ok(status) = client.status() else {
            continue;
        };
        let line = progress_line(&status, me);
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
    if terminal {
        eprintln!();
    }
}

/// `step 120/300 · stage 1 replica 0, 4 micro-batches in 0.50 s · credit
/// 1.234 TFLOP, 48 micro-batches · share 24.81%` (this machine's last step
/// is its speed).
fn progress_line(status: &crate::coord::Status, me: &str) -> String {
    let shard = status
        .shards
        .iter()
        .find(|x| x.identity.as_deref() == Some(me))
        .map_or("standby".to_owned(), |x| {
            if x.completed == 0 {
                format!("stage {} replica {}", x.stage, x.replica)
            } else {
                format!(
                    "stage {} replica {}, {} micro-batches in {:.2} s",
                    x.stage, x.replica, x.micro_batches, x.step_seconds
                )
            }
        });
    let credit = match status.contributions.iter().find(|c| c.identity == me) {
        Some(c) => format!(
            "credit {:.3} TFLOP, {} micro-batches · share {:.2}%",
            c.flops / 1e12,
            c.micro_batches,
            100.0 * c.share
        ),
        None => "no credit yet".to_owned(),
    };
    format!("step {}/{} · {shard} · {credit}", status.step, status.steps)
}

#[cfg(test)]
mod tests {
    use super::{parse_rate, progress_line};

    #[test]
    fn the_progress_line_shows_this_machines_shard_credit_and_share() {
        let shard = serde_json::json!({
            "stage": 1, "replica": 0, "worker": 3, "name": "laptop", "address": null,
            "state": "live", "completed": 120, "seconds_since_heartbeat": 0.1,
            "step_seconds": 0.5, "busy_seconds": 0.4, "mean_seconds": [0.5, 0.4, 0.01],
            "mean_link_bytes": 0.0, "rejected_frames": 0, "micro_batches": 4,
            "seconds_per_micro_batch": null, "identity": "ab12cd34ef56ab78"
        });
        let status: crate::coord::Status = serde_json::from_value(serde_json::json!({
            "run": "demo", "phase": "Training", "reason": "", "step": 120, "steps": 300,
            "loss": 2.5, "tokens_per_second": 100.0, "epoch": 1, "reassignments": 0,
            "checkpoint_step": null, "standby": 0, "stages": [], "shards": [shard],
            "contributions": [{"identity": "ab12cd34ef56ab78", "name": "laptop",
                "flops": 1.234e12, "micro_batches": 48, "share": 0.2481}]
        }))
        .expect("a status");
        assert_eq!(
            progress_line(&status, "ab12cd34ef56ab78"),
            "step 120/300 · stage 1 replica 0, 4 micro-batches in 0.50 s · credit 1.234 TFLOP, \
             48 micro-batches · share 24.81%"
        );
        assert_eq!(
            progress_line(&status, "ffffffffffffffff"),
            "step 120/300 · standby · no credit yet"
        );
    }

    #[test]
    fn send_rates_are_megabytes_per_second_and_must_be_positive() {
        assert_eq!(parse_rate("12.5"), Ok(12_500_000));
        for bad in ["0", "-3", "nan", "inf", "fast", ""] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains("megabytes per second"), "{bad}: {err}");
        }
    }
}
