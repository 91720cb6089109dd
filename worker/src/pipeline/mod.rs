//! The multi-process pipeline's data plane: one [`StageWorker`] per shard
//! (stage `s`, replica `r`) of an `S × R` layout, each a separate process
//! (or thread) talking to its neighbours over authenticated TCP links.
//!
//! A step reproduces [`crate::train::Trainer::train_step`]:
//!
//! 1. The first stage of replica `r` samples micro-batch `m` with
//!    `sample_train(seed, step, m, r)`, embeds it and sends the hidden
//!    states (`Activation`) and the target ids (`Targets`) to the next
//!    stage; middle stages relay the targets so the last stage can compute
//!    the loss. Gradients flow back as `Gradient` frames. Activations and
//!    their gradients travel under `pipeline.codec`; only `f32` rounds
//!    nothing on the wire and so reproduces the trainer bit for bit. Tied
//!    gradients and norms are always sent exactly.
//!    The forwards and backwards run in the order of the manifest's
//!    `pipeline.schedule` (GPipe, 1F1B or ZB-H1, see [`crate::schedule`]).
//! 2. Each micro-batch's loss is scaled by `1 / micro_batches`; the ring
//!    all-reduce then takes the *mean* over the `R` replicas, which is the
//!    trainer's sum over every replica's micro-batches at scale
//!    `1 / (R · micro_batches)`.
//! 3. With tied embeddings the first and last stage of a replica swap the
//!    embedding and head gradients and both keep the sum.
//! 4. Every stage's sum of squared gradients (tied head counted once) is
//!    added up the pipeline in stage order, the same order as the
//!    single-process trainer, and the total comes back down, so every stage
//!    clips with the same factor before its AdamW step.
//!
//! Under `routing: lanes` a stage talks to stages `s ± 1` of its own
//! replica; under `routing: throughput` to every replica of stages `s ± 1`,
//! and a [`Route`] says which replica runs which micro-batch (see
//! [`route`]). The other replicas of its stage are reached through the
//! ring. Who those peers are (the wiring) comes from the caller: a static
//! layout in tests, the coordinator in a run.

pub mod attack;
pub mod audit;
mod authorship;
pub mod route;
mod snapshot;
pub mod update;
mod wire;

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use pipewright_spec::{Aggregation, Routing, TrainingRun};

use crate::data::{sample_train, Corpus, DataError, Tokenizer};
use crate::link::codec::{CodecError, TensorWire};
use crate::link::{
    FrameKind, FrameLimits, Link, LinkConfig, LinkError, Role, RunId, RunKey, WorkerId,
};
use crate::model::head::LM_HEAD_NAME;
use crate::model::stage::sum_tied;
use crate::model::Param;
use crate::model::{partition, ModelConfig, Stage, StageError, StageInput, StageOutput};
use crate::optim::{grad_sq_sum, AdamW, OptimConfig};
use crate::schedule::{ops, plan, validate, Op, ScheduleError};
use crate::sync::{
    screen_tensor, BucketedAllReduce, ContributionReport, Reduce, RingConfig, RingError, RingMember,
};
use crate::telemetry::span;

pub use attack::{Attack, AttackKind};
pub use audit::Evidence;
pub use route::Route;
pub use snapshot::{Before, Snapshot, StatePart};
use wire::{decode_f32, decode_scalar, decode_targets, Inbox, Sender, TIE_SLOT};

/// Why a stage worker failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Corpus or tokenizer.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The local stage refused an input (possibly sent by a peer).
    #[error("stage: {0}")]
    Stage(#[from] StageError),
    /// A tensor could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// A neighbour link failed (closed, timed out, refused the handshake).
    #[error("link to the {peer}: {source}")]
    Link {
        /// Which neighbour: previous stage, next stage, tied stage.
        peer: &'static str,
        /// The link's error.
        #[source]
        source: LinkError,
    },
    /// The replicas' gradient ring failed.
    #[error("gradient ring: {0}")]
    Ring(#[from] RingError),
    /// The manifest's schedule is not a valid step.
    #[error("schedule: {0}")]
    Schedule(#[from] ScheduleError),
    /// The shard or its peer addresses do not fit the manifest.
    #[error("layout: {0}")]
    Layout(String),
    /// A neighbour sent something the protocol does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A neighbour sent an authentic tensor whose values fail the checks
    /// (NaN or infinity, an absurd norm): refused, counted, never used.
    #[error("refused the {what} from the {peer}: {reason}")]
    Refused {
        /// Which neighbour: previous stage, next stage, tied stage.
        peer: &'static str,
        /// Which tensor (kind, step, micro-batch).
        what: String,
        /// The counted reason (`non_finite`, `absurd_norm`).
        reason: &'static str,
    },
    /// This worker's own output would be refused by its receiver (NaN or
    /// infinity, an absurd norm): it is not sent and the step breaks off.
    #[error("not sending the {what}: its values would be refused ({reason})")]
    Unsendable {
        /// Which tensor (kind, step, micro-batch).
        what: String,
        /// The reason a receiver would give (`non_finite`, `absurd_norm`).
        reason: &'static str,
    },
    /// An audit could not be done (the evidence is malformed or does not
    /// fit, or this worker does not hold the step's weights).
    #[error("audit: {0}")]
    Audit(String),
    /// The loss stopped being a number.
    #[error("loss is {loss} at step {step}: training diverged")]
    Diverged {
        /// Step at which it happened.
        step: u64,
        /// The loss value.
        loss: f32,
    },
}

/// Which part of the layout a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    /// Pipeline stage, `0..stages`.
    pub stage: usize,
    /// Data-parallel replica, `0..replicas`.
    pub replica: usize,
}

impl Shard {
    /// The worker id carried in this shard's handshakes and frames.
    pub fn worker_id(self) -> WorkerId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(self.stage as u64).to_le_bytes());
        id[8..].copy_from_slice(&(self.replica as u64).to_le_bytes());
        WorkerId(id)
    }
}

/// The ring among the replicas of this worker's stage.
#[derive(Debug)]
pub struct RingPeers {
    /// Where the previous replica connects.
    pub listener: TcpListener,
    /// The next replica's ring listener (`host:port`; names are resolved
    /// on every connection attempt, so a peer's DNS record may appear late).
    pub next: String,
}

/// Network endpoints of one worker.
#[derive(Debug, Default)]
pub struct Peers {
    /// Where the previous stage connects (every stage but the first), and
    /// where the last stage connects for the tied gradients (the first
    /// stage of a tied model with three or more stages).
    pub listener: Option<TcpListener>,
    /// The next stage's listeners, `(replica, host:port)` (every stage but
    /// the last): its own replica's under `routing: lanes`, every
    /// replica's under `routing: throughput`.
    pub next: Vec<(usize, String)>,
    /// The first stage's listener, on the last stage of a tied model with
    /// three or more stages (with two, the neighbour link carries them).
    pub tie: Option<String>,
    /// The replicas' ring; required when the run has more than one replica.
    pub ring: Option<RingPeers>,
}

/// Credentials of the run: every link proves knowledge of the key.
#[derive(Clone, Debug)]
pub struct Auth {
    /// Run id carried in every frame.
    pub run_id: RunId,
    /// Shared key.
    pub key: RunKey,
}

/// Outcome of one step on one worker.
#[derive(Clone, Copy, Debug)]
pub struct WorkerStep {
    /// Step index (0-based) that was completed.
    pub step: u64,
    /// Mean loss over every replica's micro-batches; on last stages only.
    pub loss: Option<f32>,
    /// Global gradient norm before clipping (the same on every worker).
    pub grad_norm: f64,
    /// Wall time of the step on this worker.
    pub seconds: f64,
    /// Of that, time spent in the schedule's forwards and backwards.
    pub busy_seconds: f64,
    /// Time spent in the optimizer update.
    pub update_seconds: f64,
    /// Bytes this worker sent to its neighbouring stages during the step
    /// (activations or gradients under the run's codec, targets, tied
    /// gradients, norms; frame headers included; the ring not counted).
    pub link_bytes: u64,
    /// Micro-batches this worker ran in the step (the route's share).
    pub micro_batches: usize,
}

/// Floats per piece hashed on one thread by [`params_digest`] (1 MiB).
pub const DIGEST_PIECE: usize = 1 << 18;

/// BLAKE3 over named tensors: each tensor's name, shape and the hashes of
/// its values' pieces of [`DIGEST_PIECE`] floats, hashed
/// in parallel. Any change of a value, a name or a shape changes it.
pub fn params_digest<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])>,
) -> [u8; 32] {
    tensors_digest(b"pipewright params v1", &[], tensors)
}

/// BLAKE3 over a stage's optimizer moments as an update left them: the
/// text `pipewright moments v1`, the step count `t` (le u64), then, as
/// [`params_digest`] hashes tensors, every parameter's first moment under
/// its name and shape, then every second moment. A worker of a stage with
/// one training replica commits to it after each step, so that the
/// coordinator can hold it to its optimizer's state (see
/// [`StageWorker::replay_update`]).
pub fn moments_digest<'a>(
    params: impl Iterator<Item = (&'a str, &'a [usize])> + Clone,
    opt: &'a AdamW,
) -> [u8; 32] {
    let m = params.clone().zip(&opt.m).map(|((n, s), d)| (n, s, &d[..]));
    let v = params.zip(&opt.v).map(|((n, s), d)| (n, s, &d[..]));
    tensors_digest(b"pipewright moments v1", &opt.t.to_le_bytes(), m.chain(v))
}

/// BLAKE3 over the gradient an optimizer update applied: the text
/// `pipewright applied v1`, the global gradient norm the clip was taken
/// from (le f64 bits), then every parameter's gradient under its name and
/// shape, as [`params_digest`] hashes tensors.
pub fn applied_digest<'a>(
    grads: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    grad_norm: f64,
) -> [u8; 32] {
    tensors_digest(
        b"pipewright applied v1",
        &grad_norm.to_bits().to_le_bytes(),
        grads,
    )
}

/// BLAKE3 over `domain`, `prefix`, then each named tensor's name, shape and
/// the hashes of its values' pieces of [`DIGEST_PIECE`] floats, hashed in
/// parallel (the result does not depend on the thread count).
fn tensors_digest<'a>(
    domain: &[u8],
    prefix: &[u8],
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])>,
) -> [u8; 32] {
    use rayon::prelude::*;
    let tensors: Vec<_> = tensors.collect();
    let pieces: Vec<(usize, &[f32])> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.2.chunks(DIGEST_PIECE).map(move |c| (i, c)))
        .collect();
    let hashes: Vec<(usize, [u8; 32])> = pieces
        .par_iter()
        .map(|&(i, c)| {
            // In memory order, as the links' content hashes (little-endian
            // machines only).
            (i, *blake3::hash(bytemuck::cast_slice(c)).as_bytes())
        })
        .collect();
    let mut h = blake3::Hasher::new();
    h.update(domain);
    h.update(prefix);
    let mut next = hashes.iter().peekable();
    for (i, (name, shape, data)) in tensors.iter().enumerate() {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape.iter() {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(data.len() as u64).to_le_bytes());
        while let Some((_, piece)) = next.next_if(|(j, _)| *j == i) {
            h.update(piece);
        }
    }
    *h.finalize().as_bytes()
}

/// Binds every listener of an `stages × replicas` layout on loopback and
/// wires them statically (every replica of the next stage with `cross`, for
/// `routing: throughput`; the own replica's only otherwise). Returns one
/// `(shard, peers)` per worker, stage major.
pub fn loopback_layout(
    stages: usize,
    replicas: usize,
    tied: bool,
    cross: bool,
) -> io::Result<Vec<(Shard, Peers)>> {
    let bind = || TcpListener::bind(("127.0.0.1", 0));
    let idx = |s: usize, r: usize| s * replicas + r;
    let mut pipe = Vec::new();
    let mut ring = Vec::new();
    for s in 0..stages {
        for _ in 0..replicas {
            let needs = s > 0 || (tied && stages > 2);
            pipe.push(if needs { Some(bind()?) } else { None });
            ring.push(if replicas > 1 { Some(bind()?) } else { None });
        }
    }
    let addr = |l: &Option<TcpListener>| -> io::Result<Option<String>> {
        Ok(l.as_ref()
            .map(|l| l.local_addr())
            .transpose()?
            .map(|a| a.to_string()))
    };
    let mut pipe_addrs = Vec::new();
    let mut ring_addrs = Vec::new();
    for (p, q) in pipe.iter().zip(&ring) {
        pipe_addrs.push(addr(p)?);
        ring_addrs.push(addr(q)?);
    }
    let mut out = Vec::new();
    let mut listeners = pipe.into_iter().zip(ring);
    for s in 0..stages {
        for r in 0..replicas {
            let (listener, ring_listener) = listeners
                .next()
                .ok_or_else(|| io::Error::other("layout listener count"))?;
            let targets: Vec<usize> = match (s + 1 < stages, cross) {
                (false, _) => Vec::new(),
                (true, true) => (0..replicas).collect(),
                (true, false) => vec![r],
            };
            let next = targets
                .into_iter()
                .filter_map(|t| pipe_addrs[idx(s + 1, t)].clone().map(|a| (t, a)))
                .collect();
            let tie = if tied && stages > 2 && s + 1 == stages {
                pipe_addrs[idx(0, r)].clone()
            } else {
                None
            };
            let ring = match (
                ring_listener,
                ring_addrs[idx(s, (r + 1) % replicas)].clone(),
            ) {
                (Some(listener), Some(next)) => Some(RingPeers { listener, next }),
                _ => None,
            };
            out.push((
                Shard {
                    stage: s,
                    replica: r,
                },
                Peers {
                    listener,
                    next,
                    tie,
                    ring,
                },
            ));
        }
    }
    Ok(out)
}

/// One shard of the pipeline: a stage's layers and optimizer, its links to
/// the neighbouring stages and the ring among its replicas.
///
/// A worker outlives its links: [`StageWorker::prepare`] loads the data and
/// initialises the stage, [`StageWorker::link`] connects it to one set of
/// peers, and [`StageWorker::unlink`] drops them again (after a peer died),
/// keeping the parameters, the optimizer state and the step count, so the
/// same worker can be wired anew and go on.
pub struct StageWorker {
    shard: Shard,
    stages: usize,
    replicas: usize,
    micro_batches: usize,
    rows: usize,
    seed: u64,
    model: ModelConfig,
    optim: OptimConfig,
    stage: Stage,
    opt: AdamW,
    corpus: Option<Corpus>,
    /// Links to the previous stage's replicas, by replica.
    prev: Vec<Option<Inbox>>,
    /// Links to the next stage's replicas, by replica.
    next: Vec<Option<Inbox>>,
    tie: Option<Inbox>,
    ring: Option<RingMember>,
    sender: Sender,
    codec: TensorWire,
    timeout: Duration,
    kind: pipewright_spec::ScheduleKind,
    /// Links reach every replica of the neighbouring stages.
    cross: bool,
    route: Route,
    /// The replicas that train (all, unless a routed run goes on without
    /// a lane that lost a worker).
    lanes: Vec<usize>,
    link_config: LinkConfig,
    step: u64,
    busy: Duration,
    slowdown: f64,
    /// How the replicas combine gradients (`spec.pipeline.aggregation`).
    aggregation: Aggregation,
    /// A drill: what this shard does dishonestly, if anything.
    attack: Option<Attack>,
    /// The last step (0-based) an attack was made at: a step trained again
    /// is trained honestly.
    attacked: Option<u64>,
    /// The attack made in the current step.
    attacking: Option<AttackKind>,
    /// Under a robust rule, what this worker's last step's gather showed of
    /// every replica's contribution (see [`StageWorker::contributions`]).
    contributions: Option<ContributionReport>,
    /// Under the `contribution-lie` drill, the hash of the honest
    /// contribution of the current step, committed in place of the one sent.
    committed: Option<[u8; 32]>,
    /// Content hash of each in-flight micro-batch's forward input.
    inputs: std::collections::HashMap<u64, crate::link::frame::Digest>,
    /// Of each micro-batch this worker ran in the current step: the hashes
    /// of its forward input, forward output and input gradient.
    outputs: std::collections::BTreeMap<u64, MicroBatchHashes>,
    /// Keep what each micro-batch of the current step received, for audits.
    retain: bool,
    /// Of each micro-batch of the current step: the payloads received
    /// (kept when `retain`).
    evidence: std::collections::BTreeMap<u64, Evidence>,
    /// Keep the gradient each optimizer update applies, for the
    /// coordinator to replay the update (see [`update`]).
    keep_update: bool,
    /// The last step's applied gradient (kept when `keep_update`).
    applied: Option<update::Applied>,
    /// The loss scale of the current step's micro-batches.
    scale: f32,
    /// Under `lazy-replay`: the tensor computed for each micro-batch in the
    /// previous step (`.0`) and in the current one (`.1`).
    replay: (
        std::collections::HashMap<u64, Vec<f32>>,
        std::collections::HashMap<u64, Vec<f32>>,
    ),
    /// The signed frame refused in the current step, for a complaint.
    refused: Option<crate::link::Frame>,
}

/// What a worker commits to for one micro-batch of a step: the BLAKE3
/// hashes of its forward input, its forward output (the activation sent
/// on, or the loss's bytes on the last stage) and the input gradient it
/// sent back (zeros on the first stage, which sends none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MicroBatchHashes {
    /// Forward input.
    pub input: crate::link::frame::Digest,
    /// Forward output.
    pub output: crate::link::frame::Digest,
    /// Input gradient.
    pub gradient: crate::link::frame::Digest,
}

impl std::fmt::Debug for StageWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageWorker")
            .field("shard", &self.shard)
            .field("stages", &self.stages)
            .field("replicas", &self.replicas)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// A stage's whole training state at a step boundary: parameters, Adam
/// moments and the number of steps completed.
#[derive(Clone, Debug, PartialEq)]
pub struct StageState {
    /// Steps completed.
    pub step: u64,
    /// Parameter values, in the stage's parameter order.
    pub params: Vec<Vec<f32>>,
    /// Adam moments.
    pub opt: AdamW,
}

impl StageWorker {
    /// Builds shard `shard` of the run in `manifest` and opens its links.
    /// Every worker of the layout must be starting at about the same time:
    /// links wait `timeout` for their peers.
    pub fn new(
        manifest: &TrainingRun,
        shard: Shard,
        peers: Peers,
        auth: Auth,
        timeout: Duration,
    ) -> Result<Self, PipelineError> {
        let mut worker = Self::prepare(manifest, shard, timeout)?;
        worker.link(peers, &auth)?;
        Ok(worker)
    }

    /// Builds shard `shard` of the run in `manifest` without any link: loads
    /// the tokenizer (and, on the first stage, the corpus) and initialises
    /// the stage from the seed, at step 0.
    pub fn prepare(
        manifest: &TrainingRun,
        shard: Shard,
        timeout: Duration,
    ) -> Result<Self, PipelineError> {
        Self::prepare_layers(manifest, shard, timeout, None)
    }

    /// [`StageWorker::prepare`] with the stage's layer range given (a
    /// measured partition) instead of the cost-balanced one.
    pub fn prepare_layers(
        manifest: &TrainingRun,
        shard: Shard,
        timeout: Duration,
        layers: Option<std::ops::Range<usize>>,
    ) -> Result<Self, PipelineError> {
        let spec = &manifest.spec;
        let (stages, replicas) = (spec.pipeline.stages, spec.pipeline.replicas);
        if shard.stage >= stages || shard.replica >= replicas {
            return Err(PipelineError::Layout(format!(
                "shard (stage {}, replica {}) is outside a {stages} × {replicas} layout",
                shard.stage, shard.replica
            )));
        }
        // Only the first stage reads the corpus (targets travel with the
        // activations); the others need the vocabulary size alone.
        let (vocab, corpus) = if shard.stage == 0 {
            let (tokenizer, c) = crate::data::prepare(&spec.data)?;
            c.check_seq_len(spec.model.seq_len)?;
            (tokenizer.vocab_size(), Some(c))
        } else {
            (Tokenizer::vocab_size_of(&spec.data.tokenizer)?, None)
        };
        let model = ModelConfig::from_spec(&spec.model, vocab);
        let codec = TensorWire::for_pipeline(&spec.pipeline);
        let seed = spec.training.seed;
        let micro_batches = spec.training.micro_batches;
        let kind = spec.pipeline.schedule;
        // Every worker checks the whole plan, so a schedule that could
        // deadlock is refused before any link is opened: the lanes' own,
        // and the one routed steps follow.
        validate(&plan(kind, stages, micro_batches))?;
        let cross = spec.pipeline.routing == Routing::Throughput && replicas > 1;
        if cross {
            validate(&plan(kind, stages, replicas * micro_batches))?;
        }
        let aggregation = spec.pipeline.aggregation;
        if aggregation != Aggregation::Mean && cross {
            // Routed replicas run unequal shares of the step, so their
            // contributions are not alike and a median of them means
            // nothing.
            return Err(PipelineError::Layout(format!(
                "aggregation {} needs routing: lanes (routed replicas' gradients cover unequal shares)",
                aggregation.name()
            )));
        }
        let layers = match layers {
            Some(l) if l.start < l.end && l.end <= model.layers => l,
            Some(l) => {
                return Err(PipelineError::Layout(format!(
                    "layer range {l:?} does not fit a model of {} layers",
                    model.layers
                )))
            }
            None => partition(&model, stages, &[])
                .into_iter()
                .nth(shard.stage)
                .ok_or_else(|| {
                    PipelineError::Layout(format!("no layer range for stage {}", shard.stage))
                })?,
        };
        let rank = spec.pipeline.lowrank_rank(model.dim);
        let mut stage = Stage::with_bottleneck(&model, shard.stage, stages, layers, seed, rank);
        stage.set_recompute(spec.training.recompute);
        let opt = AdamW::new(&stage.params_mut());
        let rows = spec.training.micro_batch_size;
        let worker_id = shard.worker_id();
        let sender = Sender {
            run_id: RunId([0; 16]),
            worker_id,
            stage: shard.stage as u32,
            replica: shard.replica as u32,
            signer: None,
        };
        let mut link_config = LinkConfig::new(RunId([0; 16]), RunKey([0; 32]), worker_id);
        // Every frame of a step may be queued at once (a neighbour can run a
        // whole GPipe half ahead), so the queues never make two stages wait
        // on each other. A routed link may carry every micro-batch.
        let frames = 2 * micro_batches * if cross { replicas } else { 1 } + 8;
        link_config.send_queue_frames = frames;
        link_config.recv_queue_frames = frames;
        let largest = [
            rows * model.seq_len * model.dim * 4,
            model.vocab * model.dim * 4,
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as u64;
        link_config.limits = FrameLimits {
            max_payload: largest.max(FrameLimits::default().max_payload),
        };
        link_config.handshake_timeout = timeout;
        link_config.write_timeout = Some(timeout);
        Ok(StageWorker {
            shard,
            stages,
            replicas,
            micro_batches,
            rows,
            seed,
            optim: OptimConfig::from_spec(&spec.training),
            model,
            stage,
            opt,
            corpus,
            prev: Vec::new(),
            next: Vec::new(),
            tie: None,
            ring: None,
            sender,
            codec,
            timeout,
            kind,
            cross,
            route: Route::lanes(stages, replicas, micro_batches),
            lanes: (0..replicas).collect(),
            link_config,
            step: 0,
            busy: Duration::ZERO,
            slowdown: 1.0,
            aggregation,
            attack: None,
            attacked: None,
            attacking: None,
            contributions: None,
            committed: None,
            inputs: std::collections::HashMap::new(),
            outputs: std::collections::BTreeMap::new(),
            retain: false,
            evidence: std::collections::BTreeMap::new(),
            keep_update: false,
            applied: None,
            scale: 1.0 / micro_batches.max(1) as f32,
            replay: Default::default(),
            refused: None,
        })
    }

    /// Connects this worker to `peers`, authenticating with `auth`. Links
    /// wait `timeout` (from [`StageWorker::prepare`]) for their peers; a
    /// connection whose handshake fails (a stray or forged peer, or one
    /// left over from an earlier wiring) is dropped and the wait goes on.
    pub fn link(&mut self, peers: Peers, auth: &Auth) -> Result<(), PipelineError> {
        self.unlink();
        let (stages, replicas, shard, timeout) =
            (self.stages, self.replicas, self.shard, self.timeout);
        let worker_id = shard.worker_id();
        self.sender.run_id = auth.run_id;
        self.link_config.run_id = auth.run_id;
        self.link_config.key = auth.key.clone();
        let first = shard.stage == 0;
        let last = shard.stage + 1 == stages;
        let tie_far = self.model.tied && stages > 2;
        // The replicas of a neighbouring stage this worker links to.
        let lanes: Vec<usize> = if self.cross {
            self.lanes.clone()
        } else {
            vec![shard.replica]
        };
        let ring_rank = self.lanes.iter().position(|&l| l == shard.replica);
        let mut next_replicas: Vec<usize> = peers.next.iter().map(|(r, _)| *r).collect();
        next_replicas.sort_unstable();
        if (!first || tie_far) != peers.listener.is_some()
            || (if last {
                !next_replicas.is_empty()
            } else {
                next_replicas != lanes
            })
            || (last && tie_far) != peers.tie.is_some()
            || (self.lanes.len() > 1) != peers.ring.is_some()
            || ring_rank.is_none()
        {
            return Err(PipelineError::Layout(format!(
                "peers of stage {} of {stages} (replicas {replicas}, tied {}, routed {}) are incomplete or superfluous",
                shard.stage, self.model.tied, self.cross
            )));
        }
        // Who connects to this worker's listener: the previous stage's
        // replicas, or on the first stage the last stage's tied gradients.
        let expected: Vec<WorkerId> = if !first {
            lanes
                .iter()
                .map(|&r| {
                    Shard {
                        stage: shard.stage - 1,
                        replica: r,
                    }
                    .worker_id()
                })
                .collect()
        } else if tie_far {
            vec![Shard {
                stage: stages - 1,
                replica: shard.replica,
            }
            .worker_id()]
        } else {
            Vec::new()
        };
        let max_early = self.link_config.recv_queue_frames;
        let abort = self.link_config.abort.clone();
        let inbox = |l: Link, name: &'static str| Inbox::new(l, name, max_early, abort.clone());
        let link_config = &self.link_config;
        let (accepted, next, tie) = thread::scope(|scope| {
            let expected = &expected;
            let accepting = peers
                .listener
                .as_ref()
                .map(|l| scope.spawn(move || accept_peers(l, link_config, timeout, expected)));
            let next: Result<Vec<(usize, Link)>, LinkError> = peers
                .next
                .iter()
                .map(|(r, a)| connect_within(a, link_config, timeout).map(|l| (*r, l)))
                .collect();
            let tie = peers
                .tie
                .as_deref()
                .map(|a| connect_within(a, link_config, timeout))
                .transpose();
            let accepted = accepting.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LinkError::Closed("accepting thread panicked".into())))
            });
            (accepted.transpose(), next, tie)
        });
        let link_err = |peer| move |source| PipelineError::Link { peer, source };
        let accepted = accepted.map_err(link_err("previous stage"))?;
        let next = next.map_err(link_err("next stage"))?;
        let tie = tie.map_err(link_err("tied stage"))?;
        let mut prev: Vec<Option<Inbox>> = Vec::new();
        let mut tie = tie.map(|l| inbox(l, "tied stage"));
        for l in accepted.unwrap_or_default() {
            if first {
                tie = Some(inbox(l, "tied stage"));
                continue;
            }
            let r = shard_of(l.peer()).replica;
            if prev.len() <= r {
                prev.resize_with(r + 1, || None);
            }
            prev[r] = Some(inbox(l, "previous stage"));
        }
        let mut next_links: Vec<Option<Inbox>> = Vec::new();
        for (r, l) in next {
            if next_links.len() <= r {
                next_links.resize_with(r + 1, || None);
            }
            next_links[r] = Some(inbox(l, "next stage"));
        }
        let ring = match peers.ring {
            Some(RingPeers { listener, next }) => {
                let mut c = RingConfig::new(
                    ring_rank.unwrap_or(0),
                    self.lanes.len(),
                    auth.run_id,
                    auth.key.clone(),
                    worker_id,
                );
                c.stage = shard.stage as u32;
                c.replicas = self.lanes.iter().map(|&l| l as u32).collect();
                c.signer = self.sender.signer.clone();
                c.timeout = timeout;
                c.abort = self.link_config.abort.clone();
                c.max_send_rate = self.link_config.max_send_rate;
                Some(RingMember::connect(c, listener, &next)?)
            }
            None => None,
        };
        self.prev = prev;
        self.next = next_links;
        self.tie = tie;
        self.ring = ring;
        Ok(())
    }

    /// Sets the route of the steps to come (the coordinator's answer at a
    /// step barrier). Refused, keeping the current one, when it does not
    /// fit the layout, or moves micro-batches between replicas of a run
    /// with `routing: lanes`.
    pub fn set_route(&mut self, route: Route) -> Result<(), PipelineError> {
        route
            .check(self.stages, self.replicas, self.micro_batches)
            .map_err(PipelineError::Layout)?;
        if !self.cross && !route.is_lanes(self.micro_batches) {
            return Err(PipelineError::Layout(
                "a route that moves micro-batches between replicas needs pipeline.routing: throughput"
                    .into(),
            ));
        }
        if let Some(r) = route
            .assign
            .iter()
            .flatten()
            .map(|&r| r as usize)
            .find(|r| !self.lanes.contains(r))
        {
            return Err(PipelineError::Layout(format!(
                "the route gives work to replica {r}, which does not train now"
            )));
        }
        self.route = route;
        Ok(())
    }

    /// Sets the replicas that train from the next wiring on: all of them,
    /// or under `routing: throughput` the lanes without a vacancy (the
    /// coordinator's plan). Gradients and the loss are scaled so that the
    /// step still averages all `replicas × micro_batches` micro-batches.
    pub fn set_lanes(&mut self, lanes: Vec<usize>) -> Result<(), PipelineError> {
        let mut lanes = lanes;
        lanes.sort_unstable();
        lanes.dedup();
        let fits = !lanes.is_empty()
            && lanes.iter().all(|&l| l < self.replicas)
            && lanes.contains(&self.shard.replica)
            && (self.cross || lanes.len() == self.replicas);
        if !fits {
            return Err(PipelineError::Layout(format!(
                "training replicas {lanes:?} do not fit replica {} of {} (routed {})",
                self.shard.replica, self.replicas, self.cross
            )));
        }
        self.lanes = lanes;
        Ok(())
    }

    /// The route the next step follows.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Caps the bytes per second this worker sends on each of its links
    /// and its ring link (kernel pacing, see [`crate::link::cap_send_rate`]);
    /// applies to links opened from the next wiring on.
    pub fn set_max_send_rate(&mut self, bytes_per_second: Option<u64>) {
        self.link_config.max_send_rate = bytes_per_second;
    }

    /// Makes every forward and backward take `factor` times as long (at
    /// least 1), emulating a slower machine: a drill for routing.
    pub fn set_slowdown(&mut self, factor: f64) {
        self.slowdown = factor.max(1.0);
    }

    /// Makes this shard dishonest on purpose from `attack.from_step` on: a
    /// drill for the run's defences (see [`attack`]).
    pub fn set_attack(&mut self, attack: Option<Attack>) {
        self.attack = attack;
    }

    /// How this run's replicas combine each bucket of gradients, and (on
    /// the last stage) the loss sum after them.
    fn bucket_rules(&self, groups: usize) -> Vec<Reduce> {
        let mut rules = vec![Reduce::for_gradients(self.aggregation); groups];
        if self.is_last() {
            rules.push(match self.aggregation {
                Aggregation::Mean => Reduce::Ring,
                // Gathered too, so a replica's loss is screened like its
                // gradients; reported as the plain mean.
                _ => Reduce::Gather(Aggregation::Mean),
            });
        }
        rules
    }

    /// The gradient attack of the current step and its noise seed, if any.
    fn contribution_attack(&self) -> Option<(AttackKind, u64)> {
        let kind = self
            .attacking
            .filter(|&k| k.on_gradients() && k != AttackKind::Stale)?;
        let seed = self.seed
            ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ ((self.shard.stage as u64) << 48)
            ^ ((self.shard.replica as u64) << 40);
        Some((kind, seed))
    }

    /// Under a pipeline drill, the tensor sent in place of `data`, which
    /// this worker computed for `mb` (`forward`: its activation; else its
    /// activation gradient). Under `lazy-replay` it keeps `data` for the
    /// next step.
    fn tampered(&mut self, data: &[f32], mb: u64, forward: bool) -> Option<Vec<f32>> {
        let kind = self.attack?.kind;
        if kind == AttackKind::LazyReplay && forward != self.is_last() {
            self.replay.1.insert(mb, data.to_vec());
        }
        let kind = self.attacking.filter(|k| k.on_pipeline())?;
        let seed = self.seed
            ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ mb.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ ((forward as u64) << 63);
        let previous = self.replay.0.get(&mb).map(Vec::as_slice);
        attack::tamper(kind, data, forward, self.is_last(), previous, seed)
    }

    /// The attack this worker makes in its current step, if any (set when
    /// the step starts; a step trained again is trained honestly).
    pub fn attack_now(&self) -> Option<AttackKind> {
        self.attacking
    }

    /// Counts the compute that began at `t` as busy time, first stretching
    /// it by the slowdown factor.
    fn spent(&mut self, t: Instant) {
        let took = t.elapsed();
        if self.slowdown > 1.0 {
            thread::sleep(took.mul_f64(self.slowdown - 1.0));
        }
        self.busy += t.elapsed();
    }

    /// A flag that, once raised, stops every wait of this worker for a peer
    /// (connecting, accepting, a frame): the owner raises it when the run
    /// was rewired and these peers will never come.
    pub fn set_abort(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.link_config.abort = Some(flag);
    }

    /// Drops every link and whatever a broken step left behind (stashed
    /// activations, partial gradients). Parameters, optimizer state and the
    /// step count stay: they are those of the last completed step.
    pub fn unlink(&mut self) {
        self.prev.clear();
        self.next.clear();
        self.tie = None;
        self.ring = None;
        self.stage.clear_in_flight();
        self.stage.zero_grad();
        self.inputs.clear();
    }

    /// BLAKE3 digest of the stage's parameters (names, shapes and values
    /// in the stage's order), which replicas of a stage share bit for bit
    /// after every step; each report carries it signed so the coordinator
    /// can compare them. The values are hashed in pieces of
    /// [`DIGEST_PIECE`] floats on rayon's threads, then the pieces' hashes
    /// in order, so the digest does not depend on the thread count.
    pub fn params_digest(&self) -> [u8; 32] {
        params_digest(
            self.stage
                .params()
                .iter()
                .map(|p| (p.name.as_str(), &p.shape[..], &p.data[..])),
        )
    }

    /// The optimizer with its moments, as they are now.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The stage's training state after the last completed step.
    pub fn state(&self) -> StageState {
        StageState {
            step: self.step,
            params: self.stage.params().iter().map(|p| p.data.clone()).collect(),
            opt: self.opt.clone(),
        }
    }

    /// Replaces the stage's training state (from a snapshot, a live replica
    /// or a checkpoint). Refused, leaving everything as it was, when the
    /// shapes do not match this stage.
    pub fn restore(&mut self, state: &StageState) -> Result<(), PipelineError> {
        let mut params = self.stage.params_mut();
        let fits = |v: &[Vec<f32>]| {
            v.len() == params.len() && v.iter().zip(params.iter()).all(|(a, p)| a.len() == p.len())
        };
        if !fits(&state.params) || !fits(&state.opt.m) || !fits(&state.opt.v) {
            return Err(PipelineError::Layout(format!(
                "a restored state does not fit stage {} ({} tensors)",
                self.shard.stage,
                params.len()
            )));
        }
        for (p, d) in params.iter_mut().zip(&state.params) {
            p.data.copy_from_slice(d);
            p.zero_grad();
        }
        self.opt = state.opt.clone();
        self.step = state.step;
        self.stage.clear_in_flight();
        Ok(())
    }

    /// The operations this stage runs in the next step, from the
    /// manifest's `pipeline.schedule` and the route; micro-batch numbers are
    /// the step's (`0 .. replicas × micro_batches`).
    pub fn order(&self) -> Vec<Op> {
        self.order_for(self.shard.replica)
    }

    /// The operations replica `replica` of this stage runs in the next step
    /// (the route this worker holds): [`StageWorker::order`] as that
    /// replica computes it. An audit recomputes a replica's step in this
    /// order.
    pub fn order_for(&self, replica: usize) -> Vec<Op> {
        let (s, r, m) = (self.shard.stage, replica, self.micro_batches);
        if self.route.is_lanes(m) {
            // Each replica is a pipeline of its own: its schedule for its
            // own M micro-batches, numbered within the step.
            return ops(self.kind, s, self.stages, m)
                .into_iter()
                .map(|op| op.with_micro_batch(op.micro_batch() + (r * m) as u32))
                .collect();
        }
        ops(self.kind, s, self.stages, self.replicas * m)
            .into_iter()
            .filter(|op| self.route.replica(s, op.micro_batch() as u64) == r)
            .collect()
    }

    /// Every link to a neighbouring stage.
    fn inboxes(&self) -> impl Iterator<Item = &Inbox> {
        self.prev
            .iter()
            .chain(&self.next)
            .flatten()
            .chain(self.tie.as_ref())
    }

    /// Bytes sent so far on the current links to neighbouring stages.
    pub fn link_bytes_sent(&self) -> u64 {
        self.traffic().0.bytes_sent
    }

    /// Traffic and refusals on the current links to neighbouring stages
    /// (`.0`) and on the ring (`.1`), since they were made.
    pub fn traffic(&self) -> (crate::link::Traffic, crate::link::Traffic) {
        let mut pipe = crate::link::Traffic::default();
        for i in self.inboxes() {
            i.link.stats().add_to(&mut pipe);
        }
        let mut ring = crate::link::Traffic::default();
        if let Some(r) = &self.ring {
            let (a, b) = r.links();
            for l in [a, b].into_iter().flatten() {
                l.stats().add_to(&mut ring);
            }
        }
        (pipe, ring)
    }

    /// Under a robust rule (the replicas all-gather their contributions),
    /// what this worker's last completed step showed of every replica's
    /// contribution: the hash of each as received (this worker's own: as
    /// sent, what its step commitment covers) and each one's cosine and norm
    /// ratio against the aggregate, with the suspect peers. Indexed by ring
    /// rank ([`StageWorker::replica_of_rank`] names the replica). `None`
    /// under `mean`, with a single replica, and before the first step.
    pub fn contributions(&self) -> Option<&ContributionReport> {
        self.contributions.as_ref()
    }

    /// The proof of what replica `replica` of the stage sent this worker
    /// in its last step's gathers: the frames it signed, as received
    /// straight from it (`sync::receipt`). `None` when it is not a ring
    /// neighbour, nothing was gathered, or the ring does not check frames
    /// against keys.
    pub fn receipt_proof(&self, replica: usize) -> Option<Vec<u8>> {
        let ring = self.ring.as_ref()?;
        let rank = (0..ring.world()).find(|&k| self.replica_of_rank(k) == Some(replica))?;
        ring.receipt_proof(rank)
    }

    /// The hash of the contribution this worker commits to for its last
    /// completed step (its step report's `contribution`): the one it sent,
    /// [`ContributionReport::sent`]; under the `contribution-lie` drill the
    /// honest one it did not send. `None` where
    /// [`StageWorker::contributions`] is.
    pub fn committed_contribution(&self) -> Option<[u8; 32]> {
        let sent = self.contributions.as_ref()?.sent();
        Some(self.committed.unwrap_or(sent))
    }

    /// The replica of the stage at `rank` of the replicas' ring (the ring
    /// joins the training lanes in replica order).
    pub fn replica_of_rank(&self, rank: usize) -> Option<usize> {
        self.lanes.get(rank).copied()
    }

    /// What this worker commits to for each micro-batch it ran in its last
    /// step, by micro-batch.
    pub fn step_hashes(&self) -> &std::collections::BTreeMap<u64, MicroBatchHashes> {
        &self.outputs
    }

    /// Frames refused (malformed, forged, from the wrong sender) on the
    /// current links, the ring's included.
    pub fn rejected_frames(&self) -> u64 {
        let (pipe, ring) = self.traffic();
        pipe.rejected.iter().chain(&ring.rejected).sum()
    }

    /// This worker's shard.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The stage's layers and parameters.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Runs steps until `steps` are done in total, returning each one's
    /// outcome.
    pub fn run(&mut self, steps: u64) -> Result<Vec<WorkerStep>, PipelineError> {
        let mut out = Vec::new();
        while self.step < steps {
            out.push(self.train_step()?);
        }
        Ok(out)
    }

    /// Sends everything still queued to the neighbours and the ring, then
    /// closes the links. Call after the last step: dropping a worker
    /// closes its links at once and may cut off the last frames a
    /// neighbour still waits for.
    pub fn finish(mut self) -> Result<(), PipelineError> {
        self.flush()
    }

    /// Sends everything still queued to the neighbours and the ring,
    /// keeping the links open.
    pub fn flush(&mut self) -> Result<(), PipelineError> {
        if let Some(ring) = &self.ring {
            let (next, _) = ring.links();
            if let Some(l) = next {
                l.flush(self.timeout)
                    .map_err(|source| PipelineError::Link {
                        peer: "next replica",
                        source,
                    })?;
            }
        }
        for inbox in self
            .prev
            .iter_mut()
            .chain(self.next.iter_mut())
            .flatten()
            .chain(self.tie.as_mut())
        {
            inbox.finish()?;
        }
        Ok(())
    }

    fn is_first(&self) -> bool {
        self.shard.stage == 0
    }

    fn is_last(&self) -> bool {
        self.shard.stage + 1 == self.stages
    }

    fn hidden_rows(&self) -> usize {
        self.rows * self.model.seq_len
    }

    /// The link to the replica of the previous stage that runs `mb`.
    fn prev_for(&mut self, mb: u64) -> Result<&mut Inbox, PipelineError> {
        let r = self.route.replica(self.shard.stage - 1, mb);
        self.prev
            .get_mut(r)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                PipelineError::Layout(format!("no link to replica {r} of the previous stage"))
            })
    }

    /// The link to the replica of the next stage that runs `mb`.
    fn next_for(&mut self, mb: u64) -> Result<&mut Inbox, PipelineError> {
        let r = self.route.replica(self.shard.stage + 1, mb);
        self.next
            .get_mut(r)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                PipelineError::Layout(format!("no link to replica {r} of the next stage"))
            })
    }

    /// The link to this worker's own replica of the previous stage (tied
    /// gradients, the gradient norm).
    fn prev_lane(&mut self) -> Option<&mut Inbox> {
        self.prev
            .get_mut(self.shard.replica)
            .and_then(Option::as_mut)
    }

    /// The link to this worker's own replica of the next stage.
    fn next_lane(&mut self) -> Option<&mut Inbox> {
        self.next
            .get_mut(self.shard.replica)
            .and_then(Option::as_mut)
    }

    /// One optimizer step: the schedule's forwards and backwards, the
    /// replicas' all-reduce, tied gradients, the global norm and AdamW.
    pub fn train_step(&mut self) -> Result<WorkerStep, PipelineError> {
        let start = Instant::now();
        let bytes_before = self.link_bytes_sent();
        let step = self.step;
        // Each replica's gradient sum is averaged over the training
        // replicas; with some lanes left out they ran more micro-batches
        // each, so each counts for less.
        let scale = if self.lanes.len() == self.replicas {
            1.0 / self.micro_batches as f32
        } else {
            self.lanes.len() as f32 / (self.replicas * self.micro_batches) as f32
        };
        let mut loss_sum = 0.0f64;
        self.busy = Duration::ZERO;
        self.outputs.clear();
        self.evidence.clear();
        self.refused = None;
        self.contributions = None;
        self.committed = None;
        self.scale = scale;
        let kept = std::mem::take(&mut self.replay.1);
        if !kept.is_empty() {
            self.replay.0 = kept;
        }
        self.attacking = match self.attack {
            Some(a) if step + 1 >= a.from_step && self.attacked.is_none_or(|t| step > t) => {
                self.attacked = Some(step);
                Some(a.kind)
            }
            _ => None,
        };
        if let Some(ring) = self.ring.as_mut() {
            ring.begin_step(step, self.attacking != Some(AttackKind::GradNan));
        }
        let order = self.order();
        let micro_batches = order
            .iter()
            .filter(|op| matches!(op, Op::Forward { .. }))
            .count();
        // The weight half that completes this worker's gradients: as it
        // finishes each group of parameters, the group is averaged with the
        // other replicas on a background thread while the rest of the
        // backward runs (the earlier micro-batches only accumulate).
        let last_weight = order
            .iter()
            .rposition(|op| matches!(op, Op::Backward { .. } | Op::BackwardWeight { .. }));
        let mut reducer = None;
        // Spans of the step (recorded only when traces are exported): one
        // per operation of the schedule, the all-reduce, the tied
        // gradients, the norm and the update, in the caller's step span.
        let (stage, replica) = (self.shard.stage, self.shard.replica);
        let step_span = tracing::Span::current();
        let mut allreduce = None;
        for (k, op) in order.into_iter().enumerate() {
            let overlap = Some(k) == last_weight;
            if overlap && self.ring.is_some() {
                // The all-reduce starts with the last weight half.
                allreduce = Some(span!(parent: &step_span, "all-reduce", stage, replica));
            }
            match op {
                Op::Forward { mb } => {
                    let _s = span!("forward", stage, replica, micro_batch = mb).entered();
                    if let Some(loss) = self.forward(step, mb as u64, scale)? {
                        loss_sum += loss as f64;
                    }
                }
                Op::Backward { mb } => {
                    let _s = span!("backward", stage, replica, micro_batch = mb).entered();
                    self.backward_input(step, mb as u64)?;
                    reducer = self.backward_weight(mb as u64, overlap)?;
                }
                Op::BackwardInput { mb } => {
                    let _s = span!("backward input", stage, replica, micro_batch = mb).entered();
                    self.backward_input(step, mb as u64)?
                }
                Op::BackwardWeight { mb } => {
                    let _s = span!("backward weight", stage, replica, micro_batch = mb).entered();
                    reducer = self.backward_weight(mb as u64, overlap)?.or(reducer);
                }
            }
        }
        if self.stage.in_flight() != 0 {
            self.stage.clear_in_flight();
            return Err(PipelineError::Layout(
                "the step's order left micro-batches without a backward".into(),
            ));
        }
        if allreduce.is_none() && self.ring.is_some() {
            allreduce = Some(span!(parent: &step_span, "all-reduce", stage, replica));
        }
        let loss = self.reduce_replicas(loss_sum, reducer)?;
        drop(allreduce);
        if let Some(l) = loss {
            if !l.is_finite() {
                return Err(PipelineError::Diverged { step, loss: l });
            }
        }
        if self.model.tied {
            let _s = span!("tie gradients", stage, replica).entered();
            self.tie_gradients(step)?;
        }
        let grad_norm = {
            let _s = span!("global norm", stage, replica).entered();
            self.global_norm(step)?
        };
        let clip = self.optim.clip_factor(grad_norm);
        let lr = self.optim.lr_at(step);
        // What the update applies, kept before it runs (the `stale` drill
        // keeps it too: it computed the gradient, it only skips the update).
        self.keep_applied(step, grad_norm);
        let t = Instant::now();
        let update_span = span!("optimizer", stage, replica).entered();
        // The `stale` drill skips its update: its weights stay a step behind.
        if self.attacking != Some(AttackKind::Stale) {
            self.opt
                .step(&mut self.stage.params_mut(), &self.optim, lr, clip);
        }
        self.stage.zero_grad();
        drop(update_span);
        let update = t.elapsed();
        self.step += 1;
        Ok(WorkerStep {
            step,
            loss,
            grad_norm,
            seconds: start.elapsed().as_secs_f64(),
            busy_seconds: self.busy.as_secs_f64(),
            update_seconds: update.as_secs_f64(),
            link_bytes: self.link_bytes_sent() - bytes_before,
            micro_batches,
        })
    }

    /// Forward of micro-batch `mb`; the loss on the last stage.
    fn forward(&mut self, step: u64, mb: u64, scale: f32) -> Result<Option<f32>, PipelineError> {
        let (rows, seq) = (self.rows, self.model.seq_len);
        let m = self.micro_batches as u64;
        // Under the low-rank bottleneck only `rank` values per row cross.
        let (width_in, width_out) = (
            self.stage.boundary_width_in(),
            self.stage.boundary_width_out(),
        );
        // The first stage samples the targets; later stages take them with
        // their origin, the first stage's signature, which a relay passes on.
        let (tokens, hidden, targets, origin, input_hash, targets_hash) =
            if let Some(corpus) = &self.corpus {
                // Micro-batch `mb` of the step holds replica `mb / M`'s data,
                // whichever replica runs it.
                let b = sample_train(corpus, self.seed, step, mb % m, mb / m, rows, seq);
                let h = crate::link::frame::content_hash(bytemuck::cast_slice(&b.tokens));
                (Some(b.tokens), None, b.targets, None, h, h)
            } else {
                let timeout = self.timeout;
                let codec = self.codec;
                let sampler = self.route.replica(0, mb) as u32;
                let prev = self.prev_for(mb)?;
                let t = prev.take(FrameKind::Targets, step, mb, timeout)?;
                let (targets, origin) = decode_targets(&t, rows, seq)?;
                if let Err(e) = prev.check_origin(&t, &origin, sampler) {
                    self.keep_refused(t);
                    return Err(e);
                }
                let a = prev.take(FrameKind::Activation, step, mb, timeout)?;
                let hidden = decode_f32(&a, rows * seq, width_in, codec)?;
                if let Err(e) = screened(prev, &hidden, FrameKind::Activation, step, mb) {
                    self.keep_refused(a);
                    return Err(e);
                }
                let hashes = (a.content_hash(), t.content_hash());
                if self.retain {
                    // The bytes as they arrived, whose hashes are committed; of
                    // the targets, the ids with their origin, which the
                    // coordinator checks against the first stage's signature.
                    let e = self.evidence.entry(mb).or_default();
                    e.input = Some(a.payload);
                    e.targets = Some(t.payload);
                }
                (
                    None,
                    Some(hidden),
                    targets,
                    Some(origin),
                    hashes.0,
                    hashes.1,
                )
            };
        // Each output names the input it was computed from, so a validator
        // can bind a result to its input and its author.
        self.inputs.insert(mb, input_hash);
        let input = match (&tokens, &hidden) {
            (Some(t), _) => StageInput::Tokens(t),
            (None, Some(h)) => StageInput::Hidden(h),
            (None, None) => return Err(PipelineError::Layout("no input".into())),
        };
        let last = self.is_last();
        let t = Instant::now();
        let out = self
            .stage
            .forward(mb, input, last.then_some(&targets[..]), rows, scale)?;
        self.spent(t);
        match out {
            StageOutput::Loss(l) => {
                let record = self.outputs.entry(mb).or_default();
                record.input = input_hash;
                record.output = crate::link::frame::content_hash(&l.to_le_bytes());
                Ok(Some(l))
            }
            StageOutput::Hidden(h) => {
                let targets = match origin {
                    None => self
                        .sender
                        .targets(step, mb, &targets, rows, seq, targets_hash)?,
                    Some(origin) => {
                        let mut targets = targets;
                        // The `alter-targets` drill relays other targets.
                        if self.attacking == Some(AttackKind::AlterTargets) {
                            attack::alter_targets(&mut targets);
                        }
                        self.sender
                            .relay_targets(step, mb, &targets, &origin, targets_hash)?
                    }
                };
                let poisoned = self.tampered(&h, mb, true);
                let mut activation = self.sender.matrix(
                    step,
                    mb,
                    FrameKind::Activation,
                    poisoned.as_deref().unwrap_or(&h),
                    rows * seq,
                    width_out,
                    self.codec,
                    input_hash,
                )?;
                if poisoned.is_none() {
                    Self::screen_outgoing(&activation, self.codec, rows * seq, width_out)?;
                }
                let record = self.outputs.entry(mb).or_default();
                record.input = input_hash;
                record.output = activation.hash_payload();
                let next = self.next_for(mb)?;
                next.send(targets)?;
                next.send(activation)?;
                Ok(None)
            }
        }
    }

    /// Input half of the backward of `mb`, sending the result upstream.
    fn backward_input(&mut self, step: u64, mb: u64) -> Result<(), PipelineError> {
        let rows = self.hidden_rows();
        let (width_in, width_out) = (
            self.stage.boundary_width_in(),
            self.stage.boundary_width_out(),
        );
        // A gradient is computed from the next stage's gradient, or on the
        // last stage from the forward's input (and the targets).
        let forward_input = self.inputs.remove(&mb).unwrap_or([0; 32]);
        let timeout = self.timeout;
        let (grad, input_hash) = if self.is_last() {
            (None, forward_input)
        } else {
            let codec = self.codec;
            let next = self.next_for(mb)?;
            let f = next.take(FrameKind::Gradient, step, mb, timeout)?;
            let grad = decode_f32(&f, rows, width_out, codec)?;
            if let Err(e) = screened(next, &grad, FrameKind::Gradient, step, mb) {
                self.keep_refused(f);
                return Err(e);
            }
            let hash = f.content_hash();
            if self.retain {
                self.evidence.entry(mb).or_default().gradient = Some(f.payload);
            }
            (Some(grad), hash)
        };
        let t = Instant::now();
        let dx = self.stage.backward_input(mb, grad.as_deref())?;
        self.spent(t);
        if let (Some(dx), false) = (dx, self.is_first()) {
            let poisoned = self.tampered(&dx, mb, false);
            let mut frame = self.sender.matrix(
                step,
                mb,
                FrameKind::Gradient,
                poisoned.as_deref().unwrap_or(&dx),
                rows,
                width_in,
                self.codec,
                input_hash,
            )?;
            if poisoned.is_none() {
                Self::screen_outgoing(&frame, self.codec, rows, width_in)?;
            }
            self.outputs.entry(mb).or_default().gradient = frame.hash_payload();
            self.prev_for(mb)?.send(frame)?;
        }
        Ok(())
    }

    /// The weight half of `mb`'s backward. With `overlap` (the step's last
    /// weight half) and replicas to average with, each group of parameters
    /// is handed to a background all-reduce as soon as its gradients are
    /// complete; returns that all-reduce.
    fn backward_weight(
        &mut self,
        mb: u64,
        overlap: bool,
    ) -> Result<Option<BucketedAllReduce>, PipelineError> {
        let t = Instant::now();
        let ring = if overlap { self.ring.take() } else { None };
        let reducer = match ring {
            Some(ring) => {
                let rules = self.bucket_rules(self.stage.weight_groups().len());
                let reducer = BucketedAllReduce::start_with(ring, rules)?;
                let mut k = 0;
                let attack = self.contribution_attack();
                self.stage.backward_weight_each(mb, &mut |params| {
                    let mut grads = concat_grads(params);
                    if let Some((kind, seed)) = attack {
                        attack::corrupt_gradient(kind, &mut grads, seed ^ k as u64);
                    }
                    // A failed push means the all-reduce already failed;
                    // waiting for it reports why.
                    let _ = reducer.push(k, grads);
                    k += 1;
                })?;
                Some(reducer)
            }
            None => {
                self.stage.backward_weight(mb)?;
                None
            }
        };
        self.spent(t);
        Ok(reducer)
    }

    /// Mean of every gradient across the stage's replicas, one bucket per
    /// group of [`Stage::weight_groups`] (plus the loss sum on the last
    /// stage), the buckets already pushed by `reducer` included; returns
    /// the step's mean loss on the last stage.
    fn reduce_replicas(
        &mut self,
        loss_sum: f64,
        reducer: Option<BucketedAllReduce>,
    ) -> Result<Option<f32>, PipelineError> {
        let last = self.is_last();
        // The mean of the replicas' loss sums, over every micro-batch.
        let m = if self.lanes.len() == self.replicas {
            self.micro_batches as f64
        } else {
            (self.replicas * self.micro_batches) as f64 / self.lanes.len() as f64
        };
        let groups = self.stage.weight_groups();
        let reducer = match (reducer, self.ring.take()) {
            (Some(r), _) => r,
            (None, None) => {
                // Alone on its stage, a gradient drill changes the gradient
                // its own update applies (and commits to), group by group
                // as a ring's buckets would be.
                if let Some((kind, seed)) = self.contribution_attack().filter(|(k, _)| {
                    !matches!(k, AttackKind::ContributionLie | AttackKind::GradNan)
                }) {
                    let mut params = self.stage.params_mut();
                    for (k, g) in groups.iter().enumerate() {
                        for &i in g {
                            attack::corrupt_gradient(kind, &mut params[i].grad, seed ^ k as u64);
                        }
                    }
                }
                return Ok(last.then_some((loss_sum / m) as f32));
            }
            // No weight half ran on this worker in this step (a route gave
            // it no micro-batch): its zero gradients join the same buckets.
            (None, Some(ring)) => {
                let r = BucketedAllReduce::start_with(ring, self.bucket_rules(groups.len()))?;
                let attack = self.contribution_attack();
                let params = self.stage.params();
                for (k, g) in groups.iter().enumerate() {
                    let group: Vec<&Param> = g.iter().map(|&i| params[i]).collect();
                    let mut grads = concat_grads(&group);
                    if let Some((kind, seed)) = attack {
                        attack::corrupt_gradient(kind, &mut grads, seed ^ k as u64);
                    }
                    // A failed push means the all-reduce already failed;
                    // waiting for it reports why (a refused frame, kept
                    // for a complaint, rather than `RingError::Broken`).
                    if r.push(k, grads).is_err() {
                        break;
                    }
                }
                r
            }
        };
        if last {
            // A loss that is not a number is divergence, not something to
            // send: the ring would refuse to (`RingError::Unsendable`).
            if !(loss_sum as f32).is_finite() {
                return Err(PipelineError::Diverged {
                    step: self.step,
                    loss: loss_sum as f32,
                });
            }
            // As above: a failure is reported by the wait below.
            let _ = reducer.push(groups.len(), loss_bucket(loss_sum));
        }
        // The `contribution-lie` drill commits to the honest contribution:
        // the gradients still hold it (what was pushed is a copy).
        self.committed = self
            .contribution_attack()
            .filter(|(k, _)| *k == AttackKind::ContributionLie)
            .map(|_| self.contribution_hash(loss_sum));
        let (ring, buckets, seen) = reducer.wait_observed()?;
        self.ring = Some(ring);
        self.contributions = seen;
        let mut params = self.stage.params_mut();
        for (g, bucket) in groups.iter().zip(&buckets) {
            let mut at = 0;
            for &i in g {
                let n = params[i].grad.len();
                params[i].grad.copy_from_slice(&bucket[at..at + n]);
                at += n;
            }
        }
        let loss = buckets.get(groups.len()).and_then(|b| b.first().copied());
        Ok(last.then(|| (loss.unwrap_or(f32::NAN) as f64 / m) as f32))
    }

    /// Gives the tied embedding and head the sum of both gradients.
    fn tie_gradients(&mut self, step: u64) -> Result<(), PipelineError> {
        if !self.model.tied {
            return Ok(());
        }
        let (vocab, dim) = (self.model.vocab, self.model.dim);
        if self.stages == 1 {
            let embed = self
                .stage
                .embedding_mut()
                .map(|p| p.grad.clone())
                .ok_or_else(|| PipelineError::Layout("single stage without embedding".into()))?;
            let mut head = self
                .stage
                .head_mut()
                .map(|(p, _)| p.grad.clone())
                .ok_or_else(|| PipelineError::Layout("single stage without head".into()))?;
            if let Some(p) = self.stage.embedding_mut() {
                sum_tied(&mut p.grad, &mut head);
            }
            let mut embed = embed;
            if let Some((p, _)) = self.stage.head_mut() {
                sum_tied(&mut p.grad, &mut embed);
            }
            return Ok(());
        }
        if !self.is_first() && !self.is_last() {
            return Ok(());
        }
        let first = self.is_first();
        let mine = if first {
            self.stage.embedding_mut().map(|p| p.grad.clone())
        } else {
            self.stage.head_mut().map(|(p, _)| p.grad.clone())
        }
        .ok_or_else(|| PipelineError::Layout("tied stage without its matrix".into()))?;
        let frame = self.sender.matrix(
            step,
            TIE_SLOT,
            FrameKind::Gradient,
            &mine,
            vocab,
            dim,
            TensorWire::F32,
            [0; 32],
        )?;
        Self::screen_outgoing(&frame, TensorWire::F32, vocab, dim)?;
        let timeout = self.timeout;
        let link = match (self.tie.is_some(), first) {
            (true, _) => self.tie.as_mut(),
            (false, true) => self.next_lane(),
            (false, false) => self.prev_lane(),
        }
        .ok_or_else(|| PipelineError::Layout("no link to the tied stage".into()))?;
        link.send(frame)?;
        let frame = link.take(FrameKind::Gradient, step, TIE_SLOT, timeout)?;
        let mut theirs = decode_f32(&frame, vocab, dim, TensorWire::F32)?;
        if let Err(e) = screened(link, &theirs, FrameKind::Gradient, step, TIE_SLOT) {
            self.keep_refused(frame);
            return Err(e);
        }
        let target = if first {
            self.stage.embedding_mut()
        } else {
            self.stage.head_mut().map(|(p, _)| p)
        };
        if let Some(p) = target {
            // a + b == b + a in IEEE arithmetic: both ends hold the same bits.
            sum_tied(&mut p.grad, &mut theirs);
        }
        Ok(())
    }

    /// Global gradient norm: partial sums of squares added up the pipeline
    /// in stage order, the total sent back down.
    fn global_norm(&mut self, step: u64) -> Result<f64, PipelineError> {
        let tied = self.model.tied;
        let own = grad_sq_sum(
            self.stage
                .params()
                .into_iter()
                .filter(|p| !(tied && p.name == LM_HEAD_NAME)),
        );
        let timeout = self.timeout;
        let acc = match self.prev_lane() {
            Some(prev) => {
                decode_scalar(&prev.take(FrameKind::Control, step, wire::NORM_SLOT, timeout)?)?
                    + own
            }
            None => own,
        };
        let scalar = self.sender.scalar(step, acc);
        let total = match self.next_lane() {
            Some(next) => {
                next.send(scalar)?;
                decode_scalar(&next.take(FrameKind::Control, step, wire::NORM_SLOT, timeout)?)?
            }
            None => acc,
        };
        let scalar = self.sender.scalar(step, total);
        if let Some(prev) = self.prev_lane() {
            prev.send(scalar)?;
        }
        Ok(total.sqrt())
    }
}

/// The last stage's bucket after its gradients': the sum of its
/// micro-batches' losses in the step, gathered (or ring-summed) for the
/// step's mean loss.
fn loss_bucket(loss_sum: f64) -> Vec<f32> {
    vec![loss_sum as f32]
}

impl StageWorker {
    /// The hash of the contribution the stage's gradients as they are now
    /// make to the replicas' aggregation, as
    /// [`crate::sync::contribution::contribution_hash`] gives it (the hash
    /// in [`ContributionReport::hashes`]): one bucket per group
    /// of [`Stage::weight_groups`], each its parameters' gradients one
    /// after the other ([`concat_grads`]), then on the last stage the loss
    /// bucket of `loss_sum`. The bytes are hashed where they lie, group by
    /// group, which is the same stream as the concatenated buckets.
    fn contribution_hash(&self, loss_sum: f64) -> [u8; 32] {
        let params = self.stage.params();
        let groups = self.stage.weight_groups();
        let loss = self.is_last().then(|| loss_bucket(loss_sum));
        crate::sync::contribution::contribution_hash(
            groups
                .iter()
                .flat_map(|g| g.iter().map(|&i| &params[i].grad[..]))
                .chain(loss.as_deref()),
        )
    }
}

/// Refuses `data`, received on `inbox` as the `kind` tensor of (`step`,
/// `mb`), when it holds a NaN or an infinity or its norm is absurd (see
/// [`screen_tensor`]): the refusal is counted on the link like a malformed
/// frame's and the step breaks off, so the tensor is never used.
fn screened(
    inbox: &Inbox,
    data: &[f32],
    kind: FrameKind,
    step: u64,
    mb: u64,
) -> Result<(), PipelineError> {
    match screen_tensor(data) {
        None => Ok(()),
        Some(reason) => {
            inbox.link.stats().record_rejected(reason);
            Err(PipelineError::Refused {
                peer: inbox.name(),
                what: format!("{kind:?} of step {step} micro-batch {mb}"),
                reason: reason.name(),
            })
        }
    }
}

/// Accepts one authenticated connection within `timeout` (std's accept has
/// no deadline). A connection whose handshake fails is dropped, logged and
/// the wait goes on, so a stray or stale peer cannot take a link's place.
pub(crate) fn accept_within(
    listener: &TcpListener,
    config: &LinkConfig,
    timeout: Duration,
) -> Result<Link, LinkError> {
    let io_err = |source| LinkError::Connect {
        addr: listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "listener".into()),
        source,
    };
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(io_err)?;
    let mut last_refusal = None;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && config.aborted() => {
                return Err(LinkError::Closed("the wiring changed".into()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(last_refusal.unwrap_or(LinkError::Timeout(timeout)))
            }
            Err(e) => return Err(io_err(e)),
        };
        stream.set_nonblocking(false).map_err(io_err)?;
        let mut c = config.clone();
        c.handshake_timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match Link::from_stream(stream, Role::Acceptor, &c) {
            Ok(link) => return Ok(link),
            Err(e) => {
                tracing::warn!("refused a connection on {:?}: {e}", listener.local_addr());
                last_refusal = Some(e);
            }
        }
    }
}

/// The gradients of `params`, one after the other: the bucket of one
/// weight group handed to the replicas' aggregation.
fn concat_grads(params: &[&Param]) -> Vec<f32> {
    let mut buf = Vec::with_capacity(params.iter().map(|p| p.grad.len()).sum());
    for p in params {
        buf.extend_from_slice(&p.grad);
    }
    buf
}

/// Accepts one authenticated connection from each of `expected` within
/// `timeout`. A peer that is not expected, or that connects twice, is
/// dropped and the wait goes on.
fn accept_peers(
    listener: &TcpListener,
    config: &LinkConfig,
    timeout: Duration,
    expected: &[WorkerId],
) -> Result<Vec<Link>, LinkError> {
    let deadline = Instant::now() + timeout;
    let mut links: Vec<Link> = Vec::with_capacity(expected.len());
    while links.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LinkError::Timeout(timeout));
        }
        let link = accept_within(listener, config, left)?;
        let peer = link.peer();
        if !expected.contains(&peer) || links.iter().any(|l| l.peer() == peer) {
            let s = shard_of(peer);
            tracing::warn!(
                "refused a link from stage {} replica {}: not expected here, or already linked",
                s.stage,
                s.replica
            );
            continue;
        }
        links.push(link);
    }
    Ok(links)
}

/// The shard a worker id names (the inverse of [`Shard::worker_id`]).
fn shard_of(id: WorkerId) -> Shard {
    let word = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a) as usize
    };
    Shard {
        stage: word(&id.0[..8]),
        replica: word(&id.0[8..]),
    }
}

/// Connects to `addr` (`host:port`), retrying until `timeout` while the
/// peer is not yet listening or its name does not resolve yet (workers
/// start in any order).
pub(crate) fn connect_within(
    addr: &str,
    config: &LinkConfig,
    timeout: Duration,
) -> Result<Link, LinkError> {
    let stream = connect_stream(addr, timeout, config)?;
    Link::from_stream(stream, Role::Initiator, config)
}

/// A TCP connection to `addr`, retried until `timeout` (or until
/// `config`'s abort flag is raised).
pub(crate) fn connect_stream(
    addr: &str,
    timeout: Duration,
    config: &LinkConfig,
) -> Result<TcpStream, LinkError> {
    let deadline = Instant::now() + timeout;
    loop {
        if config.aborted() {
            return Err(LinkError::Closed("the wiring changed".into()));
        }
        let attempt = addr
            .to_socket_addrs()
            .and_then(|mut a| {
                a.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "name resolves to no address")
                })
            })
            .and_then(|a| {
                TcpStream::connect_timeout(
                    &a,
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(50)),
                )
            });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                return Err(LinkError::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod digest_tests {
    use super::{params_digest, DIGEST_PIECE};

    #[test]
    fn the_parameters_digest_sees_every_value_name_and_shape_whatever_the_threads() {
        let big: Vec<f32> = (0..2 * DIGEST_PIECE + 7).map(|i| i as f32 * 0.5).collect();
        let small = [1.0f32, 2.0, 3.0, 4.0];
        let digest = |a: &[f32], name: &str, shape: &[usize]| {
            params_digest([("w", &[big.len()][..], a), (name, shape, &small[..])].into_iter())
        };
        let base = digest(&big, "g", &[4]);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        assert_eq!(pool.install(|| digest(&big, "g", &[4])), base);
        let mut changed = big.clone();
        changed[2 * DIGEST_PIECE + 3] = -0.0;
        assert_ne!(digest(&changed, "g", &[4]), base, "a value");
        changed = big.clone();
        changed[0] = -0.0;
        assert_ne!(digest(&changed, "g", &[4]), base, "a sign bit");
        assert_ne!(digest(&big, "h", &[4]), base, "a name");
        assert_ne!(digest(&big, "g", &[2, 2]), base, "a shape");
    }
}
