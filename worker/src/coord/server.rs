//! The coordinator process: the state machine behind an HTTP API, a lease
//! sweeper, checkpoint commits and a state file that outlives restarts.
//!
//! HTTP is served by axum on a small tokio runtime of its own (the routes
//! are in `routes.rs`); the metrics and the state file have files of their
//! own (`metrics.rs`, `persist.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::metrics::Metrics;
use super::persist::{load_state, StateFile};
use super::state::{CoordError, Coordinator, Status};
use crate::checkpoint::{self, Meta};
use crate::data::Tokenizer;
use crate::model::ModelConfig;
use crate::pipeline::{Shard, StageWorker};

/// How long a long-polling request waits before answering "not yet" (the
/// client asks again).
const POLL: Duration = Duration::from_secs(5);

/// What the checkpoint commit needs beyond the state machine.
pub struct CheckpointContext {
    /// Run directory.
    pub root: PathBuf,
    /// Metadata shared by every checkpoint of the run (step and losses are
    /// filled in at commit).
    pub meta: Meta,
    /// The run's tokenizer.
    pub tokenizer: Tokenizer,
    /// Checkpoints to keep (0: all).
    pub keep: usize,
}

/// Everything a coordinator is started with.
pub struct Config {
    /// The run, as workers receive it.
    pub manifest: pipewright_spec::TrainingRun,
    /// Join token workers present.
    pub token: String,
    /// Run key (hex) handed to registered workers.
    pub run_key: String,
    /// Run id (hex).
    pub run_id: String,
    /// Lease after which a silent worker is lost.
    pub lease: Duration,
    /// Directory for the state file.
    pub state_dir: PathBuf,
    /// Checkpoints (`None`: the run keeps none).
    pub checkpoint: Option<CheckpointContext>,
    /// Model shape (for stage layer ranges and the ledger's FLOPs).
    pub model: ModelConfig,
    /// The contribution ledger's database (`None`: no ledger).
    pub ledger: Option<PathBuf>,
}

/// How long a registration challenge stays valid.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Most challenges outstanding (the oldest go first).
const MAX_CHALLENGES: usize = 4096;

/// Nonces handed out for registration proofs: each valid once, for
/// [`CHALLENGE_TTL`].
#[derive(Default)]
pub(super) struct Challenges {
    issued: Mutex<HashMap<String, Instant>>,
}

impl Challenges {
    /// A fresh nonce.
    pub(super) fn issue(&self) -> String {
        let nonce = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut issued = lock(&self.issued);
        issued.retain(|_, t| now.saturating_duration_since(*t) < CHALLENGE_TTL);
        if issued.len() >= MAX_CHALLENGES {
            if let Some(oldest) = issued
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                issued.remove(&oldest);
            }
        }
        issued.insert(nonce.clone(), now);
        nonce
    }

    /// Whether `nonce` was issued, unused and fresh; it is used up.
    pub(super) fn redeem(&self, nonce: &str) -> bool {
        lock(&self.issued)
            .remove(nonce)
            .is_some_and(|t| t.elapsed() < CHALLENGE_TTL)
    }
}

/// The digests of stages' initial parameters, by (stage, layers): `None`
/// while one is being computed, `Some(None)` when the stage cannot be built
/// here.
type InitialCache = HashMap<(usize, std::ops::Range<usize>), Option<Option<[u8; 32]>>>;

/// The digest of stage `stage`'s initial parameters over `layers` (the
/// weights the run's seed gives before its first step), from a stage built
/// from `manifest` without links; `None` when it cannot be built here (the
/// first stage reads the run's corpus).
fn initial_digest(
    manifest: &pipewright_spec::TrainingRun,
    stage: usize,
    layers: std::ops::Range<usize>,
) -> Option<[u8; 32]> {
    let t = Instant::now();
    let shard = Shard { stage, replica: 0 };
    match StageWorker::prepare_layers(manifest, shard, Duration::from_secs(1), Some(layers)) {
        Ok(wk) => {
            let d = wk.params_digest();
            tracing::info!(
                "stage {stage}: the digest of its initial parameters is {} ({:.1} ms)",
                hex::encode(&d[..8]),
                t.elapsed().as_secs_f64() * 1e3
            );
            Some(d)
        }
        Err(e) => {
            tracing::warn!(
                "stage {stage}: the digest of its initial parameters cannot be computed here \
                 ({e}); its audits of the first step go without"
            );
            None
        }
    }
}

/// Computes the digests of `ranges` (stage, layers) one after the other on
/// a thread of their own, into `cache`, where each is marked as under way
/// first.
fn compute_initial(
    cache: &Arc<Mutex<InitialCache>>,
    manifest: &pipewright_spec::TrainingRun,
    ranges: Vec<(usize, std::ops::Range<usize>)>,
) {
    let ranges: Vec<_> = {
        let mut c = lock(cache);
        let new: Vec<_> = ranges.into_iter().filter(|k| !c.contains_key(k)).collect();
        for k in &new {
            c.insert(k.clone(), None);
        }
        new
    };
    if ranges.is_empty() {
        return;
    }
    let (filled, manifest, todo) = (cache.clone(), manifest.clone(), ranges.clone());
    let spawned = thread::Builder::new()
        .name("initial-digests".into())
        .spawn(move || {
            for (stage, l) in todo {
                let d = initial_digest(&manifest, stage, l.clone());
                lock(&filled).insert((stage, l), Some(d));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("starting the initial digests' thread: {e}");
        let mut c = lock(cache);
        for k in ranges {
            c.remove(&k);
        }
    }
}

/// How the state machine learns the digest of a stage's initial parameters
/// (see [`Coordinator::with_initial_digests`]), never computing one under
/// its lock: a thread computes them for `layers` (the stages' layer ranges
/// now) as the coordinator starts, when audits are on; a range asked for
/// that is not known yet is `None` (that first step's audit goes without),
/// and one not under way either is put to a thread for the next time.
fn initial_digests(
    manifest: &pipewright_spec::TrainingRun,
    layers: &[std::ops::Range<usize>],
) -> super::state::InitialDigest {
    let cache: Arc<Mutex<InitialCache>> = Arc::default();
    if manifest.spec.validation.audit_rate > 0.0 {
        compute_initial(
            &cache,
            manifest,
            layers.iter().cloned().enumerate().collect(),
        );
    }
    let manifest = manifest.clone();
    Box::new(move |stage: usize, layers: std::ops::Range<usize>| {
        let known = lock(&cache).get(&(stage, layers.clone())).cloned();
        match known {
            Some(d) => d.flatten(),
            None => {
                tracing::info!(
                    "stage {stage}: the digest of its initial parameters over layers {layers:?} \
                     is not known yet; its audit of this first step goes without"
                );
                compute_initial(&cache, &manifest, vec![(stage, layers)]);
                None
            }
        }
    })
}

/// Stage states handed from a live replica to a new one, by (epoch, stage).
type Handoffs = HashMap<(u64, usize), Arc<Vec<u8>>>;

/// What the HTTP handlers, the lease sweeper and the [`Handle`] share.
pub(super) struct Shared {
    /// The state machine.
    pub(super) coord: Mutex<Coordinator>,
    /// Notified after every change, for long polls.
    pub(super) changed: Condvar,
    pub(super) config: Config,
    /// Stage states in transit from a live replica to a new one.
    pub(super) handoff: Mutex<Handoffs>,
    pub(super) metrics: Metrics,
    /// Registration challenges outstanding.
    pub(super) challenges: Challenges,
    /// The run's step traces (when spans are exported).
    pub(super) traces: crate::telemetry::StepTraces,
    /// Largest audit evidence accepted for one micro-batch, in bytes (see
    /// [`evidence_limit`]).
    pub(super) evidence_limit: usize,
    /// Largest evidence upload accepted, in bytes: a set of every
    /// micro-batch of a step when audits or contribution audits are on,
    /// else one micro-batch's (see [`evidence_body_limit`]).
    pub(super) evidence_body_limit: usize,
    /// Largest parameters upload accepted for the coordinator's own
    /// recomputation, in bytes: every parameter of the model (a tied head
    /// counted twice) at 16 bytes (an update upload holds the parameters,
    /// two moments and a gradient) plus 16; the exact size, the stage's, is
    /// checked once the stage is built.
    pub(super) weights_body_limit: usize,
    /// The stages the coordinator built for its own recomputations, kept
    /// between them; held while it recomputes: one recomputation at a
    /// time.
    pub(super) referee: Mutex<super::referee::Referees>,
    state_file: StateFile,
}

/// A running coordinator.
pub struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
}

impl Handle {
    /// Address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The run's status now.
    pub fn status(&self) -> Status {
        lock(&self.shared.coord).status(Instant::now())
    }

    /// Mean loss of each committed step.
    pub fn losses(&self) -> Vec<f32> {
        lock(&self.shared.coord).losses().to_vec()
    }

    /// Vacates `worker`'s slot at once (its process was seen to exit).
    pub fn lose(&self, worker: u64) {
        let mut c = lock(&self.shared.coord);
        if c.lose(worker, Instant::now()) {
            tracing::warn!("worker {worker} exited; epoch {}", c.epoch());
        }
        drop(c);
        self.shared.after_change();
    }

    /// Workers by id with their shard.
    pub fn workers(&self) -> std::collections::BTreeMap<u64, (usize, usize)> {
        lock(&self.shared.coord).workers()
    }

    /// Serves the coordinator's metrics on a listener of their own too
    /// (`GET /metrics` at `listen`, besides the API's). Returns its address.
    pub fn serve_metrics(&self, listen: &str) -> Result<SocketAddr> {
        let shared = self.shared.clone();
        crate::exposition::serve(listen, Arc::new(move || super::metrics::scrape(&shared)))
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The coordinator of `config`, resuming from the state file in its
    /// state directory when there is one.
    pub(super) fn new(config: Config) -> Result<Self> {
        let persisted = load_state(&config.state_dir)?;
        if let Some(p) = &persisted {
            tracing::info!(
                "resuming coordinator state: epoch {}, step {}",
                p.epoch,
                p.committed
            );
        }
        let spec = &config.manifest.spec;
        let stage_layers = crate::model::partition(&config.model, spec.pipeline.stages, &[]);
        let layout = super::state::Layout {
            stages: spec.pipeline.stages,
            replicas: spec.pipeline.replicas,
            steps: spec.training.steps,
            tied: config.model.tied,
            stage_layers,
            checkpoint_every: spec.checkpoint.every,
            tokens_per_step: tokens_per_step(spec),
            measured: spec.pipeline.partition == pipewright_spec::PartitionKind::Measured,
            micro_batches: spec.training.micro_batches,
            routed: spec.pipeline.routing == pipewright_spec::Routing::Throughput,
            cost: Some(crate::ledger::CostModel::new(
                &config.model,
                spec.training.micro_batch_size,
            )),
            rewards: spec.rewards.clone(),
            // What a shard of each stage needs, so a volunteer is only given
            // one it has the memory for.
            shard_bytes: crate::plan::plan(&config.manifest, config.model.vocab, None)
                .stages
                .iter()
                .map(|s| {
                    s.total_bytes
                        .saturating_add(crate::plan::PROCESS_OVERHEAD_BYTES)
                })
                .collect(),
        };
        let ledger = match &config.ledger {
            Some(path) => {
                let meta = [
                    ("run", config.manifest.metadata.name.clone()),
                    ("run_id", config.run_id.clone()),
                    ("stages", spec.pipeline.stages.to_string()),
                    ("replicas", spec.pipeline.replicas.to_string()),
                    ("micro_batches", spec.training.micro_batches.to_string()),
                    ("rewards", serde_json::to_string(&spec.rewards)?),
                    ("cost_model", serde_json::to_string(&layout.cost)?),
                ];
                let l = crate::ledger::Ledger::open(path, &meta)?;
                let steps = l.last_step()?;
                if persisted.is_none() && steps > 0 {
                    return Err(crate::ledger::LedgerError::Orphaned {
                        path: path.clone(),
                        steps,
                    }
                    .into());
                }
                Some(l)
            }
            None => None,
        };
        // The coordinator validates the audits of stages with one training
        // replica, and referees two-replica disputes, by recomputing a
        // micro-batch in this process: it needs the memory for it.
        let kept = super::referee::memory(&config.manifest, config.model.vocab);
        let referee = match &kept {
            Ok(_) => true,
            Err(why) => {
                tracing::warn!(
                    "{why}: the coordinator recomputes no audit itself, so stages with one \
                     training replica are not audited and two-replica disputes stay unconfirmed"
                );
                false
            }
        };
        // The initial parameters' digests serve the coordinator's own
        // recomputations only.
        let initial = initial_digests(
            &config.manifest,
            if referee { &layout.stage_layers } else { &[] },
        );
        let (model, stages) = (config.model.clone(), spec.pipeline.stages);
        let root = config
            .checkpoint
            .as_ref()
            .map(|c| c.root.to_string_lossy().into_owned());
        let coord = Coordinator::new(
            &config.manifest.metadata.name,
            layout,
            config.lease,
            root,
            persisted,
        )
        .with_partitioner(Box::new(move |speeds| {
            crate::model::partition(&model, stages, speeds)
        }))
        .with_audit_rate(spec.validation.audit_rate)
        .with_coordinator_validator(referee)
        .with_target_origins(true)
        .with_initial_digests(initial)
        .with_robust_aggregation(spec.pipeline.aggregation != pipewright_spec::Aggregation::Mean)
        .with_contribution_audit_rate(
            spec.validation
                .effective_contribution_audit_rate(spec.pipeline.aggregation),
        );
        let coord = match ledger {
            Some(l) => coord.with_ledger(l),
            None => coord,
        };
        let state_file = StateFile::new(config.state_dir.clone());
        let traces =
            crate::telemetry::StepTraces::new(&config.manifest.metadata.name, spec.training.steps);
        let evidence_limit = evidence_limit(spec, config.model.dim);
        let evidence_body_limit = evidence_body_limit(spec, evidence_limit);
        let weights_body_limit = {
            let p = crate::plan::plan(&config.manifest, config.model.vocab, None).params;
            let head = (config.model.vocab * config.model.dim) as u64;
            // An update upload: parameters, two moments and a gradient.
            usize::try_from((p + head).saturating_mul(16).saturating_add(16)).unwrap_or(usize::MAX)
        };
        Ok(Shared {
            evidence_limit,
            weights_body_limit,
            evidence_body_limit,
            traces,
            coord: Mutex::new(coord),
            changed: Condvar::new(),
            config,
            handoff: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
            challenges: Challenges::default(),
            referee: Mutex::new(super::referee::Referees::new(kept.unwrap_or(
                super::referee::Kept {
                    capacity: 1,
                    room: 0,
                },
            ))),
            state_file,
        })
    }

    /// Persists the state when it changed and wakes every long poll.
    pub(super) fn after_change(&self) {
        let (p, epoch, committed, finished) = {
            let c = lock(&self.coord);
            (
                c.persisted(),
                c.epoch(),
                c.committed(),
                c.finished().is_some(),
            )
        };
        self.traces.observe(epoch, committed, finished);
        self.state_file.save(p);
        self.changed.notify_all();
    }

    /// Waits (up to [`POLL`]) until `f` decides; `None` on timeout.
    pub(super) fn poll<T>(
        &self,
        mut f: impl FnMut(&mut Coordinator) -> Result<Option<T>, CoordError>,
    ) -> Result<Option<T>, CoordError> {
        let deadline = Instant::now() + POLL;
        let mut c = lock(&self.coord);
        loop {
            if let Some(v) = f(&mut c)? {
                return Ok(Some(v));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            c = self
                .changed
                .wait_timeout(c, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Commits the checkpoint of `step` once every stage's part is written.
    pub(super) fn commit_checkpoint(&self, step: u64) {
        let Some(ctx) = &self.config.checkpoint else {
            return;
        };
        let mut meta = ctx.meta.clone();
        meta.step = step;
        {
            let c = lock(&self.coord);
            meta.losses = c.losses().to_vec();
            meta.stage_layers = c.layout().stage_layers.clone();
        }
        let result = checkpoint::commit(&ctx.root, &meta, &ctx.tokenizer, ctx.keep);
        match &result {
            Ok(dir) => self
                .traces
                .checkpoint_done(step, Ok(&dir.to_string_lossy())),
            Err(e) => self.traces.checkpoint_done(step, Err(&e.to_string())),
        }
        let mut c = lock(&self.coord);
        match result {
            Ok(dir) => {
                tracing::info!("checkpoint {}", dir.display());
                c.checkpoint_committed(step, dir.to_string_lossy().into_owned(), Instant::now());
            }
            Err(e) => c.abort(
                format!("checkpoint of step {step} failed: {e}"),
                Instant::now(),
            ),
        }
    }
}

/// Training tokens in one step of `spec` (every replica's micro-batches).
pub fn tokens_per_step(spec: &pipewright_spec::TrainingRunSpec) -> u64 {
    let t = &spec.training;
    (t.micro_batch_size * t.micro_batches * spec.model.seq_len * spec.pipeline.replicas) as u64
}

/// The largest audit evidence a worker of `spec` can have to upload: a
/// micro-batch's input activation and activation gradient as raw f32 (the
/// widest codec), its targets as u32 token ids, and room for the
/// safetensors header.
pub fn evidence_limit(spec: &pipewright_spec::TrainingRunSpec, dim: usize) -> usize {
    let tokens = spec.training.micro_batch_size * spec.model.seq_len;
    tokens
        .saturating_mul(dim)
        .saturating_mul(4)
        .saturating_mul(2)
        .saturating_add(tokens.saturating_mul(4))
        .saturating_add(64 << 10)
}

/// Most bytes an evidence upload may have, whatever the run.
pub const MAX_EVIDENCE_BODY: usize = 1 << 36;

/// The largest evidence upload of a worker of `spec`, one micro-batch's
/// evidence being at most `per_micro_batch` bytes: when audits are on, the
/// set of every micro-batch a stage's one training replica runs in a step
/// (the coordinator recomputes its whole step; at most
/// `training.microBatches` × `pipeline.replicas`, every micro-batch of the
/// step); when only contribution audits can be ordered (a robust
/// aggregation, two or more replicas, a rate above 0) the set of every
/// micro-batch a replica runs (`training.microBatches` of them, since
/// robust rules need `routing: lanes`), else one micro-batch's; at most
/// [`MAX_EVIDENCE_BODY`].
pub fn evidence_body_limit(
    spec: &pipewright_spec::TrainingRunSpec,
    per_micro_batch: usize,
) -> usize {
    let contribution_audits = spec.pipeline.replicas > 1
        && spec
            .validation
            .effective_contribution_audit_rate(spec.pipeline.aggregation)
            > 0.0;
    let m = spec.training.micro_batches.max(1);
    // A stage with one training replica audited by the coordinator
    // uploads its whole step's evidence (any stage may train alone while
    // the others stand by).
    let n = if spec.validation.audit_rate > 0.0 {
        m.saturating_mul(spec.pipeline.replicas.max(1))
    } else if contribution_audits {
        m
    } else {
        1
    };
    per_micro_batch.saturating_mul(n).min(MAX_EVIDENCE_BODY)
}

/// Starts the coordinator of `config` on `listen`.
pub fn start(config: Config, listen: &str) -> Result<Handle> {
    let shared = Arc::new(Shared::new(config)?);
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    shared.after_change();
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let (shared, stop) = (shared.clone(), stop.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_io()
            .thread_name("coord-http")
            .build()
            .context("starting the coordinator's HTTP runtime")?;
        thread::Builder::new()
            .name("coord-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let app = super::routes::router(shared);
                    let result = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => axum::serve(l, app)
                            .with_graceful_shutdown(async move { stop.notified().await })
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = result {
                        tracing::error!("the coordinator's HTTP server stopped: {e}");
                    }
                });
            })
            .context("starting the coordinator's server thread")?;
    }
    {
        let shared = shared.clone();
        thread::Builder::new()
            .name("coord-leases".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_millis(100));
                let lost = lock(&shared.coord).expire(Instant::now());
                for (s, r) in &lost {
                    tracing::warn!("stage {s} replica {r}: lease expired; shard vacated");
                }
                shared.after_change();
            })
            .context("starting the lease sweeper")?;
    }
    Ok(Handle { shared, addr, stop })
}
