//! `pipewright worker` and `pipewright join`: one shard of a run, wired by
//! the run's coordinator.
//!
//! The worker binds its two listeners (pipeline link, replica ring),
//! registers with the join token, and then loops over epochs: ask for the
//! wiring, restore the stage's state from where the plan says, link, train
//! step by step through the coordinator's barrier, and, when a peer is lost
//! or the coordinator restarts, drop the links and ask again. It keeps a
//! snapshot of its state one step back, so any plan can roll it back.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::checkpoint;
use crate::coord::api::{
    step_message, Commitment, Failure, MicroBatchCommit, Register, StateSource, StepClaim,
    StepDone, Wiring,
};
use crate::coord::{Client, ClientError};
use crate::kernels::Trans;
use crate::link::{RunId, RunKey};
use crate::pipeline::{
    Auth, Peers, PipelineError, RingPeers, Route, Shard, StageState, StageWorker,
};
use crate::shard::metrics::ShardMetrics;
use crate::telemetry::{self, span};

/// Environment variable holding the join token.
pub const TOKEN_ENV: &str = "PIPEWRIGHT_JOIN_TOKEN";

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

/// The link credentials of one epoch: links of different epochs cannot
/// connect to each other.
fn epoch_auth(run_id: &RunId, key: &RunKey, epoch: u64) -> Auth {
    let mut h = blake3::Hasher::new();
    h.update(b"pipewright epoch");
    h.update(&run_id.0);
    h.update(&epoch.to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    Auth {
        run_id: RunId(id),
        key: key.clone(),
    }
}

fn bind(addr: &str, advertise: Option<&str>) -> Result<(TcpListener, String)> {
    let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = l.local_addr()?;
    let host = match advertise {
        Some(h) => h.to_string(),
        None if local.ip().is_unspecified() => {
            bail!(
                "listening on {local} needs --advertise HOST (the name peers reach this worker by)"
            )
        }
        None => local.ip().to_string(),
    };
    Ok((l, format!("{host}:{}", local.port())))
}

/// A step error that would happen again on any worker: the run fails.
fn is_fatal(e: &PipelineError) -> bool {
    matches!(
        e,
        PipelineError::Diverged { .. } | PipelineError::Data(_) | PipelineError::Schedule(_)
    )
}

struct Session {
    client: Client,
    manifest: pipewright_spec::TrainingRun,
    /// Whose work this is.
    identity: crate::identity::Identity,
    /// The run id in hex, as signed messages carry it.
    run_hex: String,
    register: Register,
    worker: u64,
    run_id: RunId,
    key: RunKey,
    timeout: Duration,
    epoch_seen: Arc<AtomicU64>,
    id_seen: Arc<AtomicU64>,
    /// Raised when the coordinator moved past `working` (the epoch this
    /// worker is wired for): every wait for a peer stops.
    abort: Arc<AtomicBool>,
    working: Arc<Mutex<u64>>,
    slowdown: f64,
    max_send_rate: Option<u64>,
    /// This worker's own metrics (served with `--metrics-listen`).
    metrics: Arc<ShardMetrics>,
}

impl Session {
    /// Starts working in `epoch`: clears the abort flag.
    fn work_in(&self, epoch: u64) {
        let mut w = self.working.lock().unwrap_or_else(|e| e.into_inner());
        *w = epoch;
        self.abort.store(false, Ordering::Relaxed);
    }
}

impl Session {
    /// Registers (again), keeping what the worker holds.
    fn register(&mut self, held: Option<(u64, bool)>) -> Result<Option<(usize, usize)>> {
        let mut r = self.register.clone();
        if let Some((completed, snapshot)) = held {
            r.completed = completed;
            r.has_snapshot = snapshot;
        }
        if self.worker != 0 {
            r.worker = Some(self.worker);
        }
        // A shard may still belong to its previous worker until that one's
        // lease runs out (a pod replaced faster than the lease): retry.
        let deadline = std::time::Instant::now() + self.timeout;
        let reg = loop {
            match self.client.register_as(&r, &self.identity, &self.run_hex) {
                Err(ClientError::Refused {
                    code: 409, message, ..
                }) if std::time::Instant::now() < deadline => {
                    tracing::info!("{message}; retrying");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => break other.context("registering with the coordinator")?,
            }
        };
        self.worker = reg.worker;
        self.id_seen.store(reg.worker, Ordering::Relaxed);
        self.key = RunKey(parse_hex::<32>("run key", &reg.run_key)?);
        self.run_id = RunId(parse_hex::<16>("run id", &reg.run_id)?);
        if let Some((s, r)) = reg.shard {
            // Keep asking for this shard after a coordinator restart.
            self.register.stage = Some(s);
            self.register.replica = Some(r);
        }
        Ok(reg.shard)
    }

    fn wiring(&mut self, after: u64, held: impl Fn() -> Option<(u64, bool)>) -> Result<Wiring> {
        loop {
            match self.client.wiring(self.worker, after) {
                Ok(w) => return Ok(w),
                Err(ClientError::Unknown) => {
                    tracing::warn!("the coordinator lost track of this worker; registering again");
                    self.register(held())?;
                }
                Err(e) => return Err(e).context("waiting for the wiring"),
            }
        }
    }
}

/// A check that a shard of a stage (any stage when `None`) fits this
/// machine's available memory, from the run's plan; it passes where memory
/// or the vocabulary cannot be known here.
fn shard_memory_check(
    manifest: &pipewright_spec::TrainingRun,
) -> impl Fn(Option<usize>) -> Result<()> {
    use crate::plan::{available_memory, plan, shard_fits, vocab};
    let planned = vocab(manifest)
        .ok()
        .map(|v| plan(manifest, v, None))
        .zip(available_memory());
    move |stage| match &planned {
        Some((p, available)) => shard_fits(p, stage, *available)
            .map_err(|e| anyhow::anyhow!("this worker cannot serve the run: {e}")),
        None => Ok(()),
    }
}

fn serve(args: WorkerArgs, token: &str) -> Result<()> {
    let args_progress = args.progress;
    if !(args.slowdown.is_finite() && args.slowdown >= 1.0) {
        bail!(
            "--slowdown must be a number of at least 1, got {}",
            args.slowdown
        );
    }
    let timeout = Duration::from_secs(args.timeout);
    let identity_path = match &args.identity {
        Some(p) => p.clone(),
        None => crate::identity::default_path()?,
    };
    let identity = crate::identity::Identity::load_or_create(&identity_path)?;
    let client = Client::new(&args.coordinator, token, timeout);
    let manifest = match &args.manifest {
        Some(p) => pipewright_spec::load_manifest(p)
            .with_context(|| format!("{} is not a valid TrainingRun", p.display()))?,
        None => client
            .manifest()
            .with_context(|| format!("fetching the run from {}", args.coordinator))?,
    };
    // Refused before registering: the shard asked for, or the smallest.
    let fits = shard_memory_check(&manifest);
    fits(args.stage)?;
    super::init_threads(args.threads.unwrap_or(manifest.spec.training.threads));
    let (pipe_listener, pipe_addr) = bind(&args.listen, args.advertise.as_deref())?;
    let (ring_listener, ring_addr) = bind(&args.ring_listen, args.advertise.as_deref())?;
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into())
    });
    let speed = if manifest.spec.pipeline.partition == pipewright_spec::PartitionKind::Measured {
        measure_speed(&manifest)
    } else {
        0.0
    };
    // The flag wins over the run's cap.
    let max_send_rate = args.max_send_rate.or_else(|| {
        manifest
            .spec
            .pipeline
            .max_send_megabytes_per_second
            .map(|mb| mb.saturating_mul(1_000_000))
    });
    let run_hex = super::coordinator::run_id_hex(&manifest);
    eprintln!(
        "identity {} ({})",
        identity.fingerprint(),
        identity_path.display()
    );
    let metrics = Arc::new(ShardMetrics::new());
    if let Some(listen) = &args.metrics_listen {
        let m = metrics.clone();
        let addr = crate::exposition::serve(listen, Arc::new(move || m.render()))?;
        eprintln!("metrics: http://{addr}/metrics");
    }
    let mut session = Session {
        client: client.clone(),
        identity,
        run_hex,
        manifest,
        register: Register {
            stage: args.stage,
            replica: args.replica,
            pipe_addr,
            ring_addr,
            worker: None,
            completed: 0,
            has_snapshot: false,
            name: format!("{name}/{}", std::process::id()),
            speed,
            identity: None,
        },
        worker: 0,
        run_id: RunId([0; 16]),
        key: RunKey([0; 32]),
        timeout,
        epoch_seen: Arc::new(AtomicU64::new(0)),
        id_seen: Arc::new(AtomicU64::new(0)),
        abort: Arc::new(AtomicBool::new(false)),
        working: Arc::new(Mutex::new(0)),
        slowdown: args.slowdown,
        max_send_rate,
        metrics,
    };
    let shard = session.register(None)?;
    // The coordinator chose the stage: refused before any of it is built.
    if let Some((stage, _)) = shard {
        fits(Some(stage))?;
    }
    match shard {
        Some((s, r)) => eprintln!("worker {}: stage {s} replica {r}", session.worker),
        None => eprintln!(
            "worker {}: every shard is taken; waiting as a standby",
            session.worker
        ),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let (client, epoch, id, stop, abort, working) = (
            client.clone(),
            session.epoch_seen.clone(),
            session.id_seen.clone(),
            stop.clone(),
            session.abort.clone(),
            session.working.clone(),
        );
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.heartbeat(id.load(Ordering::Relaxed)) {
                        Ok(e) => {
                            epoch.fetch_max(e, Ordering::Relaxed);
                            let w = working.lock().unwrap_or_else(|e| e.into_inner());
                            if e > *w {
                                abort.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(ClientError::Unknown) | Err(ClientError::Finished) => {}
                        Err(e) => tracing::warn!("heartbeat: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
            .context("starting the heartbeat")?
    };
    let progress = args_progress.then(|| {
        let (client, stop, me) = (client.clone(), stop.clone(), session.identity.fingerprint());
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || show_progress(&client, &stop, &me))
    });
    let result = train(&mut session, pipe_listener, ring_listener);
    stop.store(true, Ordering::Relaxed);
    let _ = heartbeat.join();
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

/// Brings `worker` to the wiring's step from where the wiring says;
/// `false` when the plan moved on before that could be done.
fn restore(
    worker: &mut StageWorker,
    snapshot: &Option<StageState>,
    w: &Wiring,
    session: &Session,
) -> Result<bool> {
    let stage = worker.shard().stage;
    match &w.state {
        StateSource::Held => {
            if worker.steps_done() == w.step {
                return Ok(true);
            }
            match snapshot.as_ref().filter(|s| s.step == w.step) {
                Some(s) => worker.restore(s)?,
                None => bail!(
                    "the coordinator expects state at step {} here, but this worker holds step {}",
                    w.step,
                    worker.steps_done()
                ),
            }
        }
        StateSource::Init => {
            let fresh = StageWorker::prepare_layers(
                &session.manifest,
                worker.shard(),
                session.timeout,
                Some(w.layers[0]..w.layers[1]),
            )?;
            *worker = fresh;
        }
        StateSource::Replica => {
            let bytes = match session.client.get_state(stage, w.epoch) {
                Ok(b) => b,
                // The plan moved on (a restarted coordinator, another
                // loss) before the state arrived: ask for the next one.
                Err(ClientError::Refused { code: 409, .. }) | Err(ClientError::Unknown) => {
                    return Ok(false)
                }
                Err(e) => return Err(e).context("receiving the stage's state from a live replica"),
            };
            restore_bytes(worker, &bytes, w.step, format!("replica of stage {stage}"))?;
        }
        StateSource::Checkpoint { dir } => {
            let bytes = session
                .client
                .get_checkpoint(stage, w.step)
                .with_context(|| format!("fetching stage {stage} of checkpoint {dir}"))?;
            restore_bytes(
                worker,
                &bytes,
                w.step,
                format!("{dir}/stage-{stage}.safetensors"),
            )?;
        }
    }
    Ok(true)
}

/// Restores the stage from a state in checkpoint form (`source` names it
/// in errors); refused, changing nothing, when it does not fit the stage.
fn restore_bytes(worker: &mut StageWorker, bytes: &[u8], step: u64, source: String) -> Result<()> {
    let src = PathBuf::from(source);
    let (params, opt) = checkpoint::decode_stage(bytes, &worker.stage().params(), &src)?;
    worker.restore(&StageState { step, params, opt })?;
    Ok(())
}

/// This worker's state at `step` (current or snapshot) in checkpoint form.
fn encode_at(worker: &StageWorker, snapshot: &Option<StageState>, step: u64) -> Result<Vec<u8>> {
    let current;
    let state = if worker.steps_done() == step {
        current = worker.state();
        &current
    } else {
        snapshot
            .as_ref()
            .filter(|s| s.step == step)
            .with_context(|| format!("no state at step {step} to hand over"))?
    };
    checkpoint::encode_stage(&worker.stage().params(), Some(&state.params), &state.opt)
        .map_err(|e| anyhow::anyhow!("encoding the stage's state: {e}"))
}

/// Delivers this stage's part of the checkpoint at `step` to the
/// coordinator, which keeps the run directory. `false` when the
/// coordinator no longer knows this worker (it restarted): the caller
/// registers again and is told what to do.
fn write_checkpoint(
    session: &Session,
    worker: &StageWorker,
    snapshot: &Option<StageState>,
    step: u64,
) -> Result<bool> {
    let bytes = encode_at(worker, snapshot, step)?;
    match session
        .client
        .put_checkpoint(session.worker, worker.shard().stage, step, &bytes)
    {
        Ok(()) => Ok(true),
        Err(ClientError::Unknown) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("delivering the checkpoint of step {step}")),
    }
}

fn train(session: &mut Session, pipe: TcpListener, ring: TcpListener) -> Result<()> {
    let steps = session.manifest.spec.training.steps;
    let tied_far =
        session.manifest.spec.model.tied_embeddings && session.manifest.spec.pipeline.stages > 2;
    let mut worker: Option<StageWorker> = None;
    let mut snapshot: Option<StageState> = None;
    let mut after = 0u64;
    loop {
        let held = worker
            .as_ref()
            .map(|w| (w.steps_done(), snapshot.is_some()));
        let w = session.wiring(after, || held)?;
        if let Some(end) = &w.finished {
            if end == "Succeeded" {
                eprintln!("worker {}: the run succeeded", session.worker);
                return Ok(());
            }
            bail!("the run ended: {end}");
        }
        let shard = Shard {
            stage: w.shard.0,
            replica: w.shard.1,
        };
        let layers = w.layers[0]..w.layers[1];
        if worker
            .as_ref()
            .is_none_or(|x| x.shard() != shard || x.stage().layers != layers)
        {
            let mut w = StageWorker::prepare_layers(
                &session.manifest,
                shard,
                session.timeout,
                Some(layers),
            )?;
            w.set_slowdown(session.slowdown);
            w.set_max_send_rate(session.max_send_rate);
            worker = Some(w);
            snapshot = None;
        }
        session.work_in(w.epoch);
        session.metrics.hold(
            shard.stage,
            shard.replica,
            &session.register.name,
            &session.identity.fingerprint(),
        );
        let Some(wk) = worker.as_mut() else {
            unreachable!("prepared above")
        };
        after = w.epoch;
        session.epoch_seen.fetch_max(w.epoch, Ordering::Relaxed);
        if !w.lanes.is_empty() && !w.lanes.contains(&shard.replica) {
            // Its lane sits this epoch out (another of its workers was
            // lost); wait for the next one.
            eprintln!(
                "worker {}: stage {} replica {} waits for its lane to be filled again",
                session.worker, shard.stage, shard.replica
            );
            continue;
        }
        // Restoring, handing over and linking belong to the trace of the
        // epoch's first step.
        let (stage, replica) = (shard.stage, shard.replica);
        let setup = span!(
            "epoch start",
            stage,
            replica,
            epoch = w.epoch,
            step = w.step + 1
        );
        telemetry::parent_on(&setup, w.traceparent.as_deref());
        let setup = setup.entered();
        match restore(wk, &snapshot, &w, session) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                // Cannot take part in this plan: leave it to a fresh worker.
                return Err(e.context(format!(
                    "restoring stage {} at step {}",
                    shard.stage, w.step
                )));
            }
        }
        if w.upload {
            let bytes = encode_at(wk, &snapshot, w.step)?;
            session
                .client
                .put_state(shard.stage, w.epoch, &bytes)
                .context("handing the stage's state to a new replica")?;
        }
        snapshot = None;
        if w.checkpoint && !write_checkpoint(session, wk, &snapshot, w.step)? {
            continue;
        }
        if wk.steps_done() >= steps {
            continue;
        }
        wk.set_abort(session.abort.clone());
        let auth = epoch_auth(&session.run_id, &session.key, w.epoch);
        let listener = (shard.stage > 0 || tied_far)
            .then(|| pipe.try_clone())
            .transpose()?;
        let ring_peers = match &w.ring_next {
            Some(next) => Some(RingPeers {
                listener: ring.try_clone()?,
                next: next.clone(),
            }),
            None => None,
        };
        let peers = Peers {
            listener,
            next: w.next.clone(),
            tie: w.tie.clone(),
            ring: ring_peers,
        };
        let spec = &session.manifest.spec;
        let lanes = if w.lanes.is_empty() {
            (0..spec.pipeline.replicas).collect()
        } else {
            w.lanes.clone()
        };
        wk.set_lanes(lanes)
            .context("the coordinator's training replicas do not fit this run")?;
        let route = w.route.clone().unwrap_or_else(|| {
            Route::lanes(
                spec.pipeline.stages,
                spec.pipeline.replicas,
                spec.training.micro_batches,
            )
        });
        wk.set_route(route)
            .context("the coordinator's route does not fit this run")?;
        if let Err(e) = wk.link(peers, &auth) {
            tracing::warn!("epoch {}: linking failed: {e}", w.epoch);
            telemetry::fail(&setup, e.to_string());
            report_failure(session, w.epoch, &e);
            wk.unlink();
            continue;
        }
        drop(setup);
        // The coordinator's span of the step to come: from the wiring for
        // the epoch's first step, then from each barrier's answer.
        let mut parent = w.traceparent.clone();
        while wk.steps_done() < steps {
            if session.epoch_seen.load(Ordering::Relaxed) > w.epoch {
                break;
            }
            let step = wk.steps_done() + 1;
            let step_span = span!("shard step", stage, replica, step, epoch = w.epoch);
            telemetry::parent_on(&step_span, parent.take().as_deref());
            let _in_step = step_span.enter();
            let before = wk.state();
            match wk.train_step() {
                Ok(s) => {
                    session
                        .metrics
                        .record_step(w.shard, w.epoch, &s, wk.traffic());
                    snapshot = Some(before);
                    let commitment = commit(session, wk, w.epoch, &s);
                    let barrier_span = span!("barrier", stage, replica, step).entered();
                    let barrier = session.client.step(&StepDone {
                        worker: session.worker,
                        epoch: w.epoch,
                        completed: wk.steps_done(),
                        loss: s.loss,
                        grad_norm: s.grad_norm,
                        seconds: s.seconds,
                        busy_seconds: s.busy_seconds,
                        update_seconds: s.update_seconds,
                        link_bytes: s.link_bytes,
                        rejected_frames: wk.rejected_frames(),
                        micro_batches: s.micro_batches,
                        commitment: Some(commitment),
                    });
                    drop(barrier_span);
                    let mut barrier = match barrier {
                        Ok(b) => b,
                        Err(ClientError::Unknown) => break,
                        Err(e) => return Err(e).context("at the step barrier"),
                    };
                    parent = barrier.traceparent.take();
                    if barrier.checkpoint {
                        let _s = span!("checkpoint upload", stage, replica, step).entered();
                        if !write_checkpoint(session, wk, &snapshot, wk.steps_done())? {
                            break;
                        }
                    }
                    if let Some(route) = barrier.route {
                        wk.set_route(route)
                            .context("the coordinator's route does not fit this run")?;
                    }
                    if !barrier.proceed {
                        break;
                    }
                }
                Err(e) => {
                    if is_fatal(&e) {
                        let _ = session.client.fail(&Failure {
                            worker: session.worker,
                            epoch: w.epoch,
                            error: e.to_string(),
                            fatal: true,
                        });
                        return Err(e).context(format!("step {}", wk.steps_done()));
                    }
                    tracing::warn!("step {} broke off: {e}", wk.steps_done());
                    telemetry::fail(&step_span, e.to_string());
                    report_failure(session, w.epoch, &e);
                    break;
                }
            }
        }
        if wk.steps_done() >= steps {
            if let Err(e) = wk.flush() {
                tracing::warn!("flushing the last frames: {e}");
            }
        }
        wk.unlink();
    }
}

/// The signed commitment to the step `wk` just completed: the hashes of
/// what it computed for each of its micro-batches.
fn commit(
    session: &Session,
    wk: &StageWorker,
    epoch: u64,
    s: &crate::pipeline::WorkerStep,
) -> Commitment {
    let micro_batches: Vec<MicroBatchCommit> = wk
        .step_hashes()
        .iter()
        .map(|(&mb, h)| MicroBatchCommit {
            mb,
            input: hex::encode(h.input),
            output: hex::encode(h.output),
            gradient: hex::encode(h.gradient),
        })
        .collect();
    let mut c = Commitment {
        micro_batches,
        signature: String::new(),
    };
    let indices = c.indices();
    let shard = wk.shard();
    let claim = StepClaim {
        run_id: &session.run_hex,
        worker: session.worker,
        epoch,
        completed: wk.steps_done(),
        shard: (shard.stage, shard.replica),
        loss: s.loss,
        micro_batches: &indices,
        root: c.root(),
    };
    c.signature = session
        .identity
        .sign(crate::identity::STEP_DOMAIN, &step_message(&claim));
    c
}

/// This machine's speed for `partition: measured`: GFLOP/s of the
/// products a transformer block of this run does, over about 0.15 s.
fn measure_speed(manifest: &pipewright_spec::TrainingRun) -> f64 {
    let m = &manifest.spec.model;
    let rows = (manifest.spec.training.micro_batch_size * m.seq_len).clamp(64, 4096);
    let (k, n) = (m.dim, m.ffn_dim);
    let a = vec![0.5f32; rows * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; rows * n];
    let start = std::time::Instant::now();
    let mut flops = 0.0f64;
    while start.elapsed() < Duration::from_millis(150) {
        crate::kernels::matmul(&mut c, &a, Trans::No, &b, Trans::No, rows, k, n, false);
        flops += 2.0 * (rows * k * n) as f64;
    }
    let speed = flops / start.elapsed().as_secs_f64() / 1e9;
    tracing::info!("measured {speed:.1} GFLOP/s for the layer partition");
    speed
}

fn report_failure(session: &Session, epoch: u64, e: &PipelineError) {
    let r = session.client.fail(&Failure {
        worker: session.worker,
        epoch,
        error: e.to_string(),
        fatal: false,
    });
    if let Err(e) = r {
        tracing::warn!("reporting a broken step: {e}");
    }
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
