//! The coordinator's state machine, free of I/O and clocks (every method
//! takes `now`), so each rule is unit-tested directly.
//!
//! * **Slots.** A run of `S × R` shards has one slot per shard. A worker
//!   registers into a slot (the one it asks for, or the vacancy on the stage
//!   that most limits the run); with every slot taken, a volunteer waits as a
//!   standby and fills the next vacancy.
//! * **Epochs.** Every change of wiring (a slot lost or refilled, a broken
//!   step) starts a new epoch. Once every slot is filled, the coordinator
//!   makes the epoch's plan: the step `T` every worker resumes from and
//!   where each one's state at `T` comes from (its own, a live replica of its
//!   stage, the last checkpoint, or the seed). Links are authenticated per
//!   epoch, so stale connections cannot cross epochs.
//! * **Barrier.** A worker reports each completed step and waits until every
//!   slot has completed it; the committed step is the last barrier passed.
//!   Workers of one epoch are never more than one step apart, so each keeps
//!   a snapshot one step back and the plan can always roll a worker back to
//!   `T`.
//! * **Leases.** A slot whose worker has not been heard from for the lease
//!   (2 s) is vacated; so is one whose process the launcher saw exit.
//! * **Checkpoints.** After the barrier of a checkpoint step the lowest live
//!   replica of each stage writes the stage's file; when every stage has,
//!   the checkpoint is committed (written under a temporary name and renamed,
//!   by the caller).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use pipewright_spec::coordinator::{Contribution, Phase, ShardStatus, StageStatus, Status};

use super::api::{Barrier, Failure, MicroBatchCommit, Register, StateSource, StepDone, Wiring};
use super::history::{quoted, EventKind, History, HistoryView};
use crate::ledger::{CostModel, Entry, Ledger, Refusal, Session, StepBooking};
use crate::pipeline::Route;

#[path = "audit.rs"]
mod audit;
pub use audit::{ContributionJob, InitialDigest, RefereeJob, RefereeResult};
#[path = "complaint.rs"]
mod complaint;
pub use complaint::ComplaintVerdict;
#[path = "relayed_targets.rs"]
mod relayed_targets;

/// The reason a suspicion names, as the metrics label it (`None`: not a
/// reason a worker reports).
fn suspicion_reason(reason: &str) -> Option<&'static str> {
    match reason {
        "cosine" => Some("cosine"),
        "norm_ratio" => Some("norm_ratio"),
        _ => None,
    }
}

/// Recoveries after which a run that keeps failing is given up.
pub const MAX_EPOCHS: u64 = 1000;

/// Weight of the newest step in a worker's smoothed seconds per micro-batch.
const ROUTE_SMOOTHING: f64 = 0.3;

/// Fraction of a stage's busy time a new route must save to replace the
/// current one.
const REROUTE_GAIN: f64 = 0.1;

/// Most seconds a step report may claim for a step (about 115 days).
const MAX_REPORTED_SECONDS: f64 = 1e7;

/// Most a step report may claim of a counter (link bytes, refused frames).
const MAX_REPORTED_COUNT: u64 = 1 << 48;

/// The shape of the run the coordinator drives.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// Pipeline stages.
    pub stages: usize,
    /// Replicas of each stage.
    pub replicas: usize,
    /// Steps of the run.
    pub steps: u64,
    /// Tied embeddings (with three or more stages the last stage links to
    /// the first).
    pub tied: bool,
    /// Layer range of each stage.
    pub stage_layers: Vec<Range<usize>>,
    /// Checkpoint period in steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Tokens trained per step (all replicas).
    pub tokens_per_step: u64,
    /// Re-balance the layers by the workers' measured speeds before the
    /// first step (`partition: measured`).
    pub measured: bool,
    /// Micro-batches per replica and step.
    pub micro_batches: usize,
    /// Route micro-batches to replicas by measured speed
    /// (`routing: throughput`).
    pub routed: bool,
    /// What a micro-batch of each stage costs, for the ledger (`None`:
    /// work is booked without FLOPs or tokens).
    pub cost: Option<CostModel>,
    /// How shares are computed from the ledger.
    pub rewards: pipewright_spec::RewardsSpec,
    /// Bytes a shard process of each stage needs by the run's plan
    /// ([`crate::plan::plan`], the process overhead included). A volunteer
    /// that says how much memory it has available is never given a shard
    /// needing more. Empty (or shorter than the stages): not known, any
    /// worker fits.
    pub shard_bytes: Vec<u64>,
}

/// Splits the model's layers into stages given each stage's relative
/// speed (see [`crate::model::partition`]).
pub type Partitioner = Box<dyn Fn(&[f64]) -> Vec<Range<usize>> + Send>;

/// A request the coordinator refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoordError {
    /// An id the coordinator does not know (it restarted, or the worker's
    /// slot was given away after its lease expired): register again.
    #[error("unknown worker {0}; register again")]
    UnknownWorker(u64),
    /// The request does not fit the run.
    #[error("{0}")]
    Invalid(String),
    /// The requested shard belongs to a live worker.
    #[error("stage {0} replica {1} is taken by a live worker")]
    Taken(usize, usize),
    /// The run is over.
    #[error("the run has finished ({0:?})")]
    Finished(Phase),
    /// The identity already serves a shard (a restarted worker waits for
    /// its old lease to run out).
    #[error("{0}")]
    Busy(String),
    /// The request claims what the sender cannot prove (another identity,
    /// another's report, work it was not given): refused and counted.
    #[error("refused: {1}")]
    Refused(&'static str, String),
    /// The worker or identity was convicted of dishonest work and is
    /// barred from the run; the text starts with `quarantined:` and names
    /// the step and the reason.
    #[error("{0}")]
    Quarantined(String),
}

/// What a worker committed to for one step, kept until the step is booked.
#[derive(Clone, Debug)]
struct Committed {
    completed: u64,
    micro_batches: Vec<u64>,
    root: [u8; 32],
    signature: String,
    loss: Option<f32>,
    seconds: f64,
    /// Digest of its stage's parameters after the step (`None`: the
    /// report had none).
    params: Option<[u8; 32]>,
    /// Its per-micro-batch hashes, for the chain check and audits.
    hashes: Vec<MicroBatchCommit>,
    /// The hash of its contribution to a robust aggregation (64 lowercase
    /// hex digits; `None`: the report had none).
    contribution: Option<String>,
    /// On a stage with one training replica: the digests of its optimizer
    /// moments after the step and of the gradient its update applied
    /// (`None`: the report had none).
    update: Option<([u8; 32], [u8; 32])>,
    /// The global gradient norm it reported (the same on every stage).
    grad_norm: f64,
    /// The replicas of its stage it reported suspect, with the reason.
    suspects: Vec<(usize, &'static str)>,
}

#[derive(Clone, Debug)]
struct Slot {
    worker: u64,
    /// Public key (hex) it proved it holds when registering.
    identity: String,
    /// Its commitments of the last two steps.
    commits: Vec<Committed>,
    name: String,
    pipe_addr: String,
    ring_addr: String,
    last_seen: Instant,
    completed: u64,
    has_snapshot: bool,
    step_seconds: f64,
    busy_seconds: f64,
    speed: f64,
    /// Sums over this slot's steps after its first: wall, busy, update
    /// seconds, link bytes.
    sums: [f64; 4],
    rejected_frames: u64,
    counted: u64,
    reported: u64,
    /// Micro-batches it ran in its last step.
    micro_batches: usize,
    /// Smoothed seconds per micro-batch (compute only).
    mb_seconds: Option<f64>,
}

impl Slot {
    fn holds(&self, step: u64) -> bool {
        self.completed == step || (self.completed == step + 1 && self.has_snapshot)
    }
}

#[derive(Clone, Debug)]
struct Standby {
    worker: u64,
    req: Register,
    last_seen: Instant,
}

#[derive(Clone, Debug)]
struct Plan {
    epoch: u64,
    step: u64,
    sources: Vec<StateSource>,
    upload: Vec<bool>,
    /// Replicas that train in this epoch: all of them, or under
    /// `routing: throughput` the lanes without a vacancy.
    lanes: Vec<usize>,
}

#[derive(Clone, Debug)]
struct PendingCheckpoint {
    step: u64,
    written: BTreeSet<usize>,
}

/// What survives a coordinator restart (written to its state directory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Epoch at the time of writing.
    pub epoch: u64,
    /// Next worker id to hand out.
    pub next_worker: u64,
    /// Last step every worker completed.
    pub committed: u64,
    /// Mean loss of each completed step.
    pub losses: Vec<f32>,
    /// Last committed checkpoint: step and directory.
    pub checkpoint: Option<(u64, String)>,
    /// Shards reassigned so far.
    pub reassignments: u64,
    /// Final phase and reason, once finished.
    pub finished: Option<(Phase, String)>,
    /// Worker id of each slot (stage major), so a restarted coordinator
    /// keeps every shard for the worker that held it for one lease.
    #[serde(default)]
    pub shard_map: Vec<Option<u64>>,
    /// Layer ranges fixed by a measured partition.
    #[serde(default)]
    pub stage_layers: Option<Vec<Range<usize>>>,
    /// Identity (public key, hex) of each slot's worker, beside
    /// `shard_map`: a worker returning to its slot must prove the same.
    #[serde(default)]
    pub shard_identities: Vec<Option<String>>,
    /// Recoveries from lost shards finished so far.
    #[serde(default)]
    pub recoveries: u64,
    /// Seconds they took, all together.
    #[serde(default)]
    pub recovery_seconds_total: f64,
    /// Seconds the last one took.
    #[serde(default)]
    pub last_recovery_seconds: Option<f64>,
    /// Key of the audits' draw (hex), kept so that a restarted coordinator
    /// draws from the same stream; never sent to a worker.
    #[serde(default)]
    pub audit_secret: Option<String>,
}

/// The coordinator of one run.
pub struct Coordinator {
    run: String,
    layout: Layout,
    lease: Duration,
    slots: Vec<Option<Slot>>,
    standby: Vec<Standby>,
    epoch: u64,
    plan: Option<Plan>,
    next_worker: u64,
    committed: u64,
    losses: Vec<f32>,
    checkpoint: Option<(u64, String)>,
    pending: Option<PendingCheckpoint>,
    checkpoint_root: Option<String>,
    reassignments: u64,
    finished: Option<(Phase, String)>,
    suspect_since: Option<(u64, Instant)>,
    barrier_times: Vec<(u64, Instant)>,
    started_training: bool,
    /// Slots kept for the worker that held them before a restart: worker
    /// id and when the reservation was first seen by the sweeper.
    reserved: Vec<Option<(u64, Option<Instant>)>>,
    partitioner: Option<Partitioner>,
    /// Whether the layer ranges are settled (always, unless measured and
    /// no plan was made yet).
    layers_fixed: bool,
    /// Which replica runs which micro-batch (`routing: throughput`).
    route: Option<Route>,
    /// Since when each vacant slot has been vacant (slots never filled
    /// have none).
    vacant_since: Vec<Option<Instant>>,
    /// Identity of each reserved slot's worker.
    reserved_identity: Vec<Option<String>>,
    /// The contribution ledger (`None`: nothing is booked).
    ledger: Option<Ledger>,
    /// Refused reports by reason.
    refused: BTreeMap<String, u64>,
    /// The shares at a committed step.
    shares_cache: std::sync::Mutex<Option<(u64, Vec<crate::ledger::Share>)>>,
    /// Recent steps and events, for the run page.
    history: History,
    /// Recoveries finished, their seconds in all, the last one's.
    recoveries: (u64, f64, Option<f64>),
    /// Since when the run has been recovering from a lost shard.
    recovering_since: Option<Instant>,
    /// Volunteers kept from a vacant shard they lack the memory for: each
    /// (worker, stage) once, and the count per stage.
    memory_refused: (BTreeSet<(u64, usize)>, BTreeMap<usize, u64>),
    /// Replicas whose parameters' digest differed from their stage's
    /// majority, and disagreements without a majority, by stage.
    digest_mismatches: BTreeMap<usize, u64>,
    /// Audits by recomputation, the chain check and the quarantine.
    audits: audit::Audits,
    /// Rechecks of broken steps (`complaint`).
    rechecks: complaint::Rechecks,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("run", &self.run)
            .field("epoch", &self.epoch)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// A coordinator for `layout`, resuming `persisted` state when the
    /// previous coordinator of this run left some. `checkpoint_root` is the
    /// run's checkpoint directory (`None`: no checkpoints).
    pub fn new(
        run: &str,
        layout: Layout,
        lease: Duration,
        checkpoint_root: Option<String>,
        persisted: Option<Persisted>,
    ) -> Self {
        let shards = layout.stages * layout.replicas;
        let p = persisted.unwrap_or_default();
        let mut reserved: Vec<Option<(u64, Option<Instant>)>> = vec![None; shards];
        for (slot, id) in reserved.iter_mut().zip(&p.shard_map) {
            *slot = id.map(|id| (id, None));
        }
        let mut reserved_identity: Vec<Option<String>> = vec![None; shards];
        for (slot, id) in reserved_identity.iter_mut().zip(&p.shard_identities) {
            slot.clone_from(id);
        }
        let mut layout = layout;
        let layers_fixed = !layout.measured || p.stage_layers.is_some() || p.committed > 0;
        if let Some(l) = &p.stage_layers {
            layout.stage_layers = l.clone();
        }
        Coordinator {
            run: run.to_string(),
            layout,
            lease,
            slots: vec![None; shards],
            standby: Vec::new(),
            // A restarted coordinator starts a new epoch: every worker
            // re-registers and is wired afresh.
            epoch: p.epoch + 1,
            plan: None,
            next_worker: p.next_worker.max(1),
            committed: p.committed,
            losses: p.losses,
            checkpoint: p.checkpoint,
            pending: None,
            checkpoint_root,
            reassignments: p.reassignments,
            finished: p.finished,
            suspect_since: None,
            barrier_times: Vec::new(),
            started_training: false,
            reserved,
            partitioner: None,
            layers_fixed,
            route: None,
            vacant_since: vec![None; shards],
            reserved_identity,
            ledger: None,
            refused: BTreeMap::new(),
            shares_cache: std::sync::Mutex::new(None),
            history: History::default(),
            recoveries: (
                p.recoveries,
                p.recovery_seconds_total,
                p.last_recovery_seconds,
            ),
            recovering_since: None,
            memory_refused: Default::default(),
            digest_mismatches: BTreeMap::new(),
            audits: audit::Audits::new(p.audit_secret.as_deref()),
            rechecks: Default::default(),
        }
    }

    /// Books every step's work in `ledger` from now on.
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        // The refusals counted before a restart still count.
        match ledger.refusal_counts() {
            Ok(counts) => self.refused.extend(counts),
            Err(e) => tracing::error!("reading the ledger's refusals: {e}"),
        }
        self.ledger = Some(ledger);
        self.load_convictions();
        self
    }

    /// The ledger, when the run keeps one.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Counts (and records in the ledger) a refused report; returns the
    /// error to answer with.
    pub fn refuse(&mut self, r: Refusal, now: Instant) -> CoordError {
        *self.refused.entry(r.reason.to_owned()).or_default() += 1;
        let who = match (r.worker, &r.identity) {
            (Some(w), Some(k)) => format!(
                "worker {w} ({})",
                quoted(&crate::identity::fingerprint_hex(k))
            ),
            (Some(w), None) => format!("worker {w}"),
            (None, Some(k)) => quoted(&crate::identity::fingerprint_hex(k)),
            (None, None) => "a peer".into(),
        };
        self.history.event(
            EventKind::Refused,
            format!("refused {who}: {} ({})", r.detail, r.reason),
            now,
        );
        tracing::warn!(
            "refused a report from worker {:?}: {} ({})",
            r.worker,
            r.detail,
            r.reason
        );
        if let Some(l) = self.ledger.as_mut() {
            if let Err(e) = l.refused(&r) {
                tracing::error!("recording a refused report: {e}");
            }
        }
        CoordError::Refused(r.reason, r.detail)
    }

    /// Refused reports by reason.
    pub fn refused(&self) -> &BTreeMap<String, u64> {
        &self.refused
    }

    /// The identity (public key, hex) and shard of `worker`.
    pub fn identity_of(&self, worker: u64) -> Option<(String, (usize, usize))> {
        let i = self.find(worker)?;
        let slot = self.slots[i].as_ref()?;
        Some((slot.identity.clone(), self.shard_of(i)))
    }

    /// Sets how layers are split by measured speed (`partition: measured`).
    pub fn with_partitioner(mut self, p: Partitioner) -> Self {
        self.partitioner = Some(p);
        self
    }

    /// The state to write to disk.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            epoch: self.epoch,
            next_worker: self.next_worker,
            committed: self.committed,
            losses: self.losses.clone(),
            checkpoint: self.checkpoint.clone(),
            reassignments: self.reassignments,
            finished: self.finished.clone(),
            // A shard still reserved for its worker (after an earlier
            // restart) stays reserved through the next one.
            shard_map: self
                .slots
                .iter()
                .zip(&self.reserved)
                .map(|(s, r)| s.as_ref().map(|s| s.worker).or(r.map(|(w, _)| w)))
                .collect(),
            stage_layers: (self.layout.measured && self.layers_fixed)
                .then(|| self.layout.stage_layers.clone()),
            shard_identities: self
                .slots
                .iter()
                .zip(&self.reserved_identity)
                .map(|(s, r)| s.as_ref().map(|s| s.identity.clone()).or_else(|| r.clone()))
                .collect(),
            recoveries: self.recoveries.0,
            recovery_seconds_total: self.recoveries.1,
            last_recovery_seconds: self.recoveries.2,
            audit_secret: Some(self.audits.secret_hex()),
        }
    }

    /// Recent steps and events, times in Unix seconds given that `now`
    /// is `unix_now` (the caller reads the wall clock).
    pub fn history(&self, now: Instant, unix_now: f64) -> HistoryView {
        self.history.view(now, unix_now)
    }

    /// The run's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Steps every worker completed.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Mean loss of each committed step.
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// The final phase once the run is over.
    pub fn finished(&self) -> Option<&(Phase, String)> {
        self.finished.as_ref()
    }

    fn idx(&self, stage: usize, replica: usize) -> usize {
        stage * self.layout.replicas + replica
    }

    fn shard_of(&self, idx: usize) -> (usize, usize) {
        (idx / self.layout.replicas, idx % self.layout.replicas)
    }

    fn find(&self, worker: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.worker == worker))
    }

    fn check_running(&self) -> Result<(), CoordError> {
        match &self.finished {
            Some((phase, _)) => Err(CoordError::Finished(*phase)),
            None => Ok(()),
        }
    }

    /// Under `routing: throughput`, moves micro-batches towards the faster
    /// replicas of each stage when that shortens the stage's busy time by
    /// more than [`REROUTE_GAIN`] (so that noise does not reshuffle every
    /// step).
    fn reroute(&mut self) {
        let (stages, replicas, m) = (
            self.layout.stages,
            self.layout.replicas,
            self.layout.micro_batches,
        );
        if !self.layout.routed || replicas < 2 || m == 0 {
            return;
        }
        let lanes: Vec<usize> = self
            .plan
            .as_ref()
            .map_or_else(|| (0..replicas).collect(), |p| p.lanes.clone());
        let times = self.speeds();
        let current = self
            .route
            .clone()
            .unwrap_or_else(|| Route::lanes(stages, replicas, m));
        let candidate = self.route_over(&lanes);
        let mut next = current.clone();
        for (s, stage_times) in times.iter().enumerate() {
            // Only stages whose every training replica has been measured
            // move (the others run nothing).
            let Some(t) = stage_times
                .iter()
                .enumerate()
                .map(|(r, t)| if lanes.contains(&r) { *t } else { Some(0.0) })
                .collect::<Option<Vec<f64>>>()
            else {
                continue;
            };
            if candidate.makespan(s, &t) < (1.0 - REROUTE_GAIN) * current.makespan(s, &t) {
                next.assign[s] = candidate.assign[s].clone();
            }
        }
        if next != current {
            tracing::info!(
                "routing: micro-batches per replica now {:?}",
                (0..stages)
                    .map(|s| next.counts(s, replicas))
                    .collect::<Vec<_>>()
            );
            self.route = Some(next);
        }
    }

    fn new_epoch(&mut self, now: Instant) {
        self.epoch += 1;
        self.plan = None;
        self.suspect_since = None;
        if self.epoch > MAX_EPOCHS {
            self.fail_run(
                format!("gave up after {MAX_EPOCHS} rewirings: the run keeps losing workers"),
                now,
            );
        }
    }

    fn fail_run(&mut self, reason: String, now: Instant) {
        if self.finished.is_none() {
            self.history
                .event(EventKind::Failed, format!("run failed: {reason}"), now);
            self.finished = Some((Phase::Failed, reason));
        }
    }

    /// The run succeeded (once).
    fn succeed(&mut self, now: Instant) {
        if self.finished.is_none() {
            let reason = format!("{} steps trained", self.layout.steps);
            self.history.event(
                EventKind::Succeeded,
                format!("run succeeded: {reason}"),
                now,
            );
            self.finished = Some((Phase::Succeeded, reason));
        }
    }

    /// How a worker is named in events: id, name and identity fingerprint
    /// (the last two as the peer sent them, clipped).
    fn who(worker: u64, name: &str, identity: &str) -> String {
        format!(
            "worker {worker} \"{}\" ({})",
            quoted(name),
            quoted(&crate::identity::fingerprint_hex(identity))
        )
    }

    /// Whether a worker with `available` bytes (`None`: unknown) fits a
    /// shard of slot `i`'s stage by the run's plan.
    fn fits(&self, i: usize, available: Option<u64>) -> bool {
        let stage = i / self.layout.replicas.max(1);
        match (available, self.layout.shard_bytes.get(stage)) {
            (Some(have), Some(&need)) => need <= have,
            _ => true,
        }
    }

    /// The vacancy volunteer `worker` with `available` bytes should fill
    /// (see [`Coordinator::best_vacancy`]) among those it fits. Vacancies
    /// it does not fit are counted as memory refusals, once per worker and
    /// stage, and stay vacant for a worker that fits.
    fn vacancy_for(
        &mut self,
        worker: u64,
        name: &str,
        available: Option<u64>,
        now: Instant,
    ) -> Option<usize> {
        let r = self.layout.replicas.max(1);
        let unfit: BTreeSet<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none() && self.reserved[i].is_none())
            .filter(|&i| !self.fits(i, available))
            .map(|i| i / r)
            .collect();
        for stage in unfit {
            if self.memory_refused.0.insert((worker, stage)) {
                *self.memory_refused.1.entry(stage).or_default() += 1;
                let need = self.layout.shard_bytes.get(stage).copied().unwrap_or(0);
                self.history.event(
                    EventKind::Refused,
                    format!(
                        "worker {worker} \"{}\" not given stage {stage}: it needs {}, the worker has {} available",
                        quoted(name),
                        crate::plan::human(need),
                        crate::plan::human(available.unwrap_or(0)),
                    ),
                    now,
                );
            }
        }
        self.best_vacancy_where(|c, i| c.fits(i, available))
    }

    /// Volunteers kept from a vacant shard they lack the memory for, per
    /// stage (each worker counted once per stage).
    pub fn memory_refusals(&self) -> &BTreeMap<usize, u64> {
        &self.memory_refused.1
    }

    /// Parameter digest disagreements by stage: each replica outvoted by
    /// its stage's majority, and each step broken off for want of one.
    pub fn digest_mismatches(&self) -> &BTreeMap<usize, u64> {
        &self.digest_mismatches
    }

    /// Gives vacancies to the standbys, first come first served, each the
    /// best vacancy it fits; a standby that fits none keeps waiting.
    fn seat_standbys(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.standby.len() && self.best_vacancy().is_some() {
            let (worker, name, available) = {
                let sb = &self.standby[k];
                (sb.worker, sb.req.name.clone(), sb.req.available_memory)
            };
            match self.vacancy_for(worker, &name, available, now) {
                Some(i) => {
                    let sb = self.standby.remove(k);
                    self.fill(i, sb.worker, &sb.req, now, true);
                }
                None => k += 1,
            }
        }
    }

    /// The vacancy a volunteer should fill: on the stage with the fewest
    /// live replicas, then the slowest, then the lowest.
    fn best_vacancy(&self) -> Option<usize> {
        self.best_vacancy_where(|_, _| true)
    }

    /// [`Coordinator::best_vacancy`] among the slots `allowed` admits.
    fn best_vacancy_where(&self, allowed: impl Fn(&Self, usize) -> bool) -> Option<usize> {
        let r = self.layout.replicas;
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none() && self.reserved[i].is_none())
            .filter(|&i| allowed(self, i))
            .min_by(|&a, &b| {
                let live = |i: usize| {
                    let s = i / r;
                    self.slots[s * r..(s + 1) * r]
                        .iter()
                        .filter(|x| x.is_some())
                        .count()
                };
                let slowest = |i: usize| {
                    let s = i / r;
                    self.slots[s * r..(s + 1) * r]
                        .iter()
                        .flatten()
                        .map(|x| x.busy_seconds)
                        .fold(0.0f64, f64::max)
                };
                live(a)
                    .cmp(&live(b))
                    .then(slowest(b).total_cmp(&slowest(a)))
                    .then(a.cmp(&b))
            })
    }

    /// A worker asks for a shard. Returns its id and its shard (`None`: a
    /// standby).
    pub fn register(
        &mut self,
        req: Register,
        now: Instant,
    ) -> Result<(u64, Option<(usize, usize)>), CoordError> {
        self.check_running()?;
        let (stages, replicas) = (self.layout.stages, self.layout.replicas);
        let wanted = match (req.stage, req.replica) {
            (Some(s), r) => {
                let r = r.unwrap_or(0);
                if s >= stages || r >= replicas {
                    return Err(CoordError::Invalid(format!(
                        "stage {s} replica {r} is outside this run's {stages} × {replicas} layout"
                    )));
                }
                Some(self.idx(s, r))
            }
            (None, Some(_)) => {
                return Err(CoordError::Invalid("a replica needs its stage".into()));
            }
            (None, None) => None,
        };
        if req.pipe_addr.is_empty() || req.ring_addr.is_empty() {
            return Err(CoordError::Invalid(
                "pipe_addr and ring_addr must be host:port".into(),
            ));
        }
        if req.completed > self.layout.steps {
            return Err(CoordError::Invalid(format!(
                "a worker of a {}-step run cannot have completed {} steps",
                self.layout.steps, req.completed
            )));
        }
        // The HTTP layer checked the proof; the key is the worker's name.
        let identity = match &req.identity {
            Some(p) if !p.public_key.is_empty() => p.public_key.clone(),
            _ => {
                return Err(CoordError::Invalid(
                    "registering needs an identity (a public key and its proof)".into(),
                ))
            }
        };
        // A convicted identity or worker id is barred for good.
        if let Some(e) = self
            .barred_identity(&identity)
            .or_else(|| req.worker.and_then(|w| self.barred_worker(w)))
        {
            return Err(e);
        }
        // A worker id belongs to the identity that registered it.
        if let Some(id) = req.worker {
            let owner = self
                .find(id)
                .and_then(|i| self.slots[i].as_ref().map(|s| s.identity.clone()))
                .or_else(|| {
                    self.standby
                        .iter()
                        .find(|s| s.worker == id)
                        .and_then(|s| s.req.identity.as_ref().map(|p| p.public_key.clone()))
                })
                .or_else(|| {
                    self.reserved
                        .iter()
                        .position(|r| r.is_some_and(|(w, _)| w == id))
                        .and_then(|i| self.reserved_identity[i].clone())
                });
            if owner.is_some_and(|o| o != identity) {
                return Err(self.refuse(
                    Refusal {
                        worker: Some(id),
                        identity: Some(identity),
                        reason: "identity",
                        detail: format!("worker {id} belongs to another identity"),
                    },
                    now,
                ));
            }
        }
        // The same worker registering again (its answer was lost) keeps its slot.
        if let Some(id) = req.worker {
            if let Some(i) = self.find(id) {
                return Ok((id, Some(self.shard_of(i))));
            }
        }
        // One identity serves one shard at a time.
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.identity == identity))
        {
            let (s, r) = self.shard_of(i);
            return Err(CoordError::Busy(format!(
                "identity {} already serves stage {s} replica {r} (until its lease runs out); \
                 a second worker needs an identity of its own (--identity PATH)",
                crate::identity::fingerprint_hex(&identity)
            )));
        }
        let id = match req.worker {
            Some(id) if id < self.next_worker => id,
            _ => {
                let id = self.next_worker;
                self.next_worker += 1;
                id
            }
        };
        let returning = self
            .reserved
            .iter()
            .position(|r| r.is_some_and(|(w, _)| Some(w) == req.worker));
        let wanted = wanted.or(returning);
        let target = match wanted {
            Some(i) if self.slots[i].is_some() => {
                let (s, r) = self.shard_of(i);
                return Err(CoordError::Taken(s, r));
            }
            Some(i) => Some(i),
            None => self.vacancy_for(id, &req.name, req.available_memory, now),
        };
        let Some(i) = target else {
            if !self.standby.iter().any(|s| s.worker == id) {
                self.history.event(
                    EventKind::Standby,
                    format!("{} waits as a standby", Self::who(id, &req.name, &identity)),
                    now,
                );
            }
            self.standby.retain(|s| s.worker != id);
            self.standby.push(Standby {
                worker: id,
                req,
                last_seen: now,
            });
            return Ok((id, None));
        };
        self.fill(i, id, &req, now, false);
        Ok((id, Some(self.shard_of(i))))
    }

    /// Puts `worker` in slot `i`; `standby`: a standby taking a vacancy.
    fn fill(&mut self, i: usize, worker: u64, req: &Register, now: Instant, standby: bool) {
        let (s, r) = self.shard_of(i);
        let who = Self::who(
            worker,
            &req.name,
            req.identity.as_ref().map_or("", |p| p.public_key.as_str()),
        );
        let (kind, text) = if standby {
            (
                EventKind::Reassigned,
                format!("stage {s} replica {r} reassigned to standby {who}"),
            )
        } else {
            (
                EventKind::Registered,
                format!("{who} registered for stage {s} replica {r}"),
            )
        };
        self.history.event(kind, text, now);
        self.reserved[i] = None;
        self.reserved_identity[i] = None;
        let identity = req
            .identity
            .as_ref()
            .map(|p| p.public_key.clone())
            .unwrap_or_default();
        let shard = self.shard_of(i);
        if let Some(l) = self.ledger.as_mut() {
            let session = Session {
                worker,
                identity: identity.clone(),
                name: req.name.clone(),
                shard: Some(shard),
                epoch: self.epoch,
            };
            if let Err(e) = l.session(&session) {
                tracing::error!("recording worker {worker} in the ledger: {e}");
            }
        }
        self.slots[i] = Some(Slot {
            worker,
            identity,
            commits: Vec::new(),
            name: req.name.clone(),
            pipe_addr: req.pipe_addr.clone(),
            ring_addr: req.ring_addr.clone(),
            last_seen: now,
            completed: req.completed,
            has_snapshot: req.has_snapshot,
            step_seconds: 0.0,
            busy_seconds: 0.0,
            speed: req.speed,
            sums: [0.0; 4],
            rejected_frames: 0,
            counted: 0,
            reported: 0,
            micro_batches: 0,
            mb_seconds: None,
        });
        self.vacant_since[i] = None;
        if self.plan.as_ref().is_some_and(|p| p.epoch == self.epoch) {
            // The current plan went on without this slot's lane: rewire
            // with it.
            self.new_epoch(now);
        }
        self.make_plan(now);
    }

    /// The worker is alive. Returns the current epoch.
    pub fn heartbeat(&mut self, worker: u64, now: Instant) -> Result<u64, CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        if let Some(i) = self.find(worker) {
            if let Some(s) = self.slots[i].as_mut() {
                s.last_seen = now;
            }
        } else if let Some(s) = self.standby.iter_mut().find(|s| s.worker == worker) {
            s.last_seen = now;
        } else {
            return Err(CoordError::UnknownWorker(worker));
        }
        Ok(self.epoch)
    }

    /// Vacates `worker`'s slot (its process exited) and starts a new
    /// epoch; a standby takes the slot at once.
    pub fn lose(&mut self, worker: u64, now: Instant) -> bool {
        self.vacate(worker, now, "its process exited")
    }

    /// Vacates `worker`'s slot for the reason `why`. Losing a shard while
    /// the run trains starts a recovery, which ends when the first step of
    /// a new epoch is committed.
    fn vacate(&mut self, worker: u64, now: Instant, why: &str) -> bool {
        if let Some(i) = self.find(worker) {
            let training = matches!(self.phase().0, Phase::Training | Phase::Checkpointing);
            if let Some(slot) = self.slots[i].take() {
                let (s, r) = self.shard_of(i);
                self.history.event(
                    EventKind::Lost,
                    format!(
                        "{} lost from stage {s} replica {r}: {why}",
                        Self::who(worker, &slot.name, &slot.identity)
                    ),
                    now,
                );
            }
            self.vacant_since[i] = Some(now);
            if self.finished.is_none() {
                self.reassignments += 1;
            }
            if training && self.recovering_since.is_none() {
                self.recovering_since = Some(now);
                self.history.event(
                    EventKind::Recovery,
                    format!("recovery started at step {}", self.committed),
                    now,
                );
            }
            self.new_epoch(now);
            // The first standby that fits takes it (or another vacancy).
            self.seat_standbys(now);
            true
        } else {
            let before = self.standby.len();
            self.standby.retain(|s| s.worker != worker);
            let left = before != self.standby.len();
            if left {
                self.history.event(
                    EventKind::Lost,
                    format!("standby worker {worker} left: {why}"),
                    now,
                );
            }
            left
        }
    }

    /// Vacates every slot whose lease expired, and starts a new epoch when
    /// a broken step was reported but nobody was lost within a lease.
    /// Returns the shards vacated.
    pub fn expire(&mut self, now: Instant) -> Vec<(usize, usize)> {
        // Parties silent past an open audit's deadline.
        self.settle_audits(now);
        let mut lost = Vec::new();
        let stale: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| now.saturating_duration_since(s.last_seen) > self.lease)
            .map(|s| s.worker)
            .collect();
        for w in stale {
            if let Some(i) = self.find(w) {
                lost.push(self.shard_of(i));
            }
            self.vacate(w, now, "its lease expired");
        }
        let lease = self.lease;
        self.standby
            .retain(|s| now.saturating_duration_since(s.last_seen) <= lease);
        let mut freed = false;
        for r in self.reserved.iter_mut() {
            match r {
                Some((_, since @ None)) => *since = Some(now),
                Some((_, Some(t))) if now.saturating_duration_since(*t) > lease => {
                    *r = None;
                    freed = true;
                }
                _ => {}
            }
        }
        if freed {
            // Standbys may take the slots nobody came back for.
            self.seat_standbys(now);
        }
        if let Some((epoch, since)) = self.suspect_since {
            if epoch == self.epoch && now.saturating_duration_since(since) > self.lease {
                self.new_epoch(now);
                self.make_plan(now);
            }
        }
        // A routed run carries on without a lane whose vacancy outlasted a
        // lease.
        self.make_plan(now);
        lost
    }

    /// A worker's step failed.
    pub fn fail(&mut self, f: &Failure, now: Instant) -> Result<(), CoordError> {
        if let Some(e) = self.barred_worker(f.worker) {
            return Err(e);
        }
        if self.find(f.worker).is_none() {
            return Err(CoordError::UnknownWorker(f.worker));
        }
        if f.fatal {
            self.fail_run(format!("worker {}: {}", f.worker, f.error), now);
        } else if f.epoch == self.epoch && self.suspect_since.is_none() {
            // A peer is probably dead; its lease will tell. If nobody is
            // lost within a lease the wiring is renewed anyway.
            self.suspect_since = Some((self.epoch, now));
        }
        Ok(())
    }

    /// Makes the current epoch's plan once every slot is filled.
    /// The replicas that can train now: every one once every slot is
    /// filled; under `routing: throughput`, after a run has started, also
    /// the lanes (one replica of every stage) without a vacancy, once every
    /// vacancy has lasted a lease (a relaunch usually comes sooner). `None`:
    /// wait.
    fn trainable_lanes(&self, now: Instant) -> Option<Vec<usize>> {
        let (stages, r) = (self.layout.stages, self.layout.replicas);
        let lanes: Vec<usize> = (0..r)
            .filter(|&l| (0..stages).all(|s| self.slots[self.idx(s, l)].is_some()))
            .collect();
        if lanes.len() == r {
            return Some(lanes);
        }
        let waited = self
            .slots
            .iter()
            .zip(&self.vacant_since)
            .all(|(slot, since)| {
                slot.is_some()
                    || since.is_some_and(|t| now.saturating_duration_since(t) >= self.lease)
            });
        (self.layout.routed
            && self.started_training
            && self.layers_fixed
            && waited
            && !lanes.is_empty())
        .then_some(lanes)
    }

    /// Whether slot `i` trains in the current plan.
    fn in_plan(&self, i: usize) -> bool {
        let (_, replica) = self.shard_of(i);
        self.plan
            .as_ref()
            .is_none_or(|p| p.lanes.contains(&replica))
    }

    fn make_plan(&mut self, now: Instant) {
        if self.finished.is_some() || self.plan.as_ref().is_some_and(|p| p.epoch == self.epoch) {
            return;
        }
        let Some(lanes) = self.trainable_lanes(now) else {
            return;
        };
        if !self.layers_fixed {
            // The first plan of a measured run: each stage as fast as its
            // slowest replica, layers split so every stage takes as long.
            let r = self.layout.replicas;
            let speeds: Vec<f64> = (0..self.layout.stages)
                .map(|s| {
                    self.slots[s * r..(s + 1) * r]
                        .iter()
                        .flatten()
                        .map(|x| x.speed)
                        .fold(f64::INFINITY, f64::min)
                })
                .map(|v| if v.is_finite() && v > 0.0 { v } else { 1.0 })
                .collect();
            if let Some(p) = &self.partitioner {
                self.layout.stage_layers = p(&speeds);
            }
            self.layers_fixed = true;
        }
        let n = self.slots.len();
        let (stages, r) = (self.layout.stages, self.layout.replicas);
        // Workers of the lanes left out drop out of step: their state is
        // fetched afresh when their lane comes back.
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(x) = slot.as_mut().filter(|_| !lanes.contains(&(i % r))) {
                x.completed = 0;
                x.has_snapshot = false;
            }
        }
        let included: Vec<usize> = (0..n).filter(|&i| lanes.contains(&(i % r))).collect();
        let slot = |i: usize| self.slots[i].as_ref().expect("an included slot is filled");
        let with_state: Vec<u64> = included
            .iter()
            .map(|&i| slot(i).completed)
            .filter(|&c| c > 0)
            .collect();
        let target = match with_state.iter().min() {
            Some(&m) => {
                // A worker one step ahead rolls back to its snapshot. A step
                // whose loss never reached this coordinator (it restarted
                // while the workers waited at that step's barrier), or that
                // the ledger has not booked, is trained again: the replay
                // is exact, and its entries are booked at its barrier.
                let mut known = self.losses.len() as u64;
                if let Some(l) = &self.ledger {
                    match l.last_step() {
                        Ok(booked) => known = known.min(booked),
                        Err(e) => tracing::error!("reading the ledger's last step: {e}"),
                    }
                }
                // (A worker that holds nothing gets its state from a
                // replica that holds the step.)
                let m = if known < m
                    && included
                        .iter()
                        .filter(|&&i| slot(i).completed > 0)
                        .all(|&i| slot(i).holds(known))
                {
                    known
                } else {
                    m
                };
                if included
                    .iter()
                    .any(|&i| slot(i).completed > 0 && !slot(i).holds(m))
                {
                    None
                } else {
                    Some(m)
                }
            }
            None => Some(self.checkpoint.as_ref().map_or(0, |c| c.0)),
        };
        let mut sources = vec![StateSource::Held; n];
        let mut upload = vec![false; n];
        let mut ok = target.is_some();
        if let Some(t) = target {
            for s in 0..stages {
                let stage: Vec<usize> = lanes.iter().map(|&l| s * r + l).collect();
                let donor = stage.iter().copied().find(|&i| slot(i).holds(t));
                for &i in &stage {
                    if slot(i).holds(t) {
                        continue;
                    }
                    match donor {
                        Some(d) if t > 0 => {
                            sources[i] = StateSource::Replica;
                            upload[d] = true;
                        }
                        _ => ok = false,
                    }
                }
            }
        }
        let step = if ok {
            target.unwrap_or(0)
        } else {
            // A stage lost every holder of the step: everyone goes back to
            // the last checkpoint (or the seed).
            let (step, dir) = match &self.checkpoint {
                Some((s, d)) => (*s, Some(d.clone())),
                None => (0, None),
            };
            upload = vec![false; n];
            for &i in &included {
                let s = slot(i);
                sources[i] = if s.holds(step) && (step > 0 || s.completed == 0) {
                    StateSource::Held
                } else {
                    match &dir {
                        Some(d) => StateSource::Checkpoint { dir: d.clone() },
                        None => StateSource::Init,
                    }
                };
            }
            step
        };
        if self.pending.as_ref().is_some_and(|p| p.step != step) {
            self.pending = None;
        }
        // After restoring, every included worker holds exactly `step`.
        for &i in &included {
            if let Some(s) = self.slots[i].as_mut() {
                s.completed = step;
                s.has_snapshot = false;
            }
        }
        self.committed = step;
        self.losses.truncate(step as usize);
        self.history.rewind(step);
        // Without some lanes, or back from that, the route must give work
        // to exactly the lanes that train.
        let fits = self.route.as_ref().is_none_or(|rt| {
            (0..stages).all(|s| {
                rt.counts(s, r)
                    .iter()
                    .enumerate()
                    .all(|(l, &c)| (c > 0) == lanes.contains(&l))
            })
        });
        if (self.layout.routed && !fits) || lanes.len() < r {
            self.route = Some(self.route_over(&lanes));
        }
        let text = match (lanes.len() < r, step) {
            (true, _) => format!(
                "epoch {}: {} of {r} lanes wired, training from step {step}",
                self.epoch,
                lanes.len()
            ),
            (false, 0) => format!(
                "epoch {}: every shard wired, training from the start",
                self.epoch
            ),
            (false, _) => format!(
                "epoch {}: every shard wired, training from step {step}",
                self.epoch
            ),
        };
        self.history.event(EventKind::Epoch, text, now);
        self.plan = Some(Plan {
            epoch: self.epoch,
            step,
            sources,
            upload,
            lanes,
        });
    }

    /// A route that gives each of `lanes` a share by its measured speed
    /// (unmeasured replicas count as the stage's mean) and nothing to the
    /// other replicas.
    fn route_over(&self, lanes: &[usize]) -> Route {
        crate::pipeline::route::weighted(
            self.layout.stages,
            self.layout.replicas,
            self.layout.micro_batches,
            &self.speeds(),
            lanes,
        )
    }

    /// Each slot's smoothed seconds per micro-batch, by stage and replica.
    fn speeds(&self) -> Vec<Vec<Option<f64>>> {
        (0..self.layout.stages)
            .map(|s| {
                (0..self.layout.replicas)
                    .map(|r| {
                        self.slots[self.idx(s, r)]
                            .as_ref()
                            .and_then(|x| x.mb_seconds)
                    })
                    .collect()
            })
            .collect()
    }

    /// The wiring of `worker` for the first epoch after `after`: `None`
    /// while there is none yet (poll again).
    pub fn wiring(&mut self, worker: u64, after: u64) -> Result<Option<Wiring>, CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        let Some(i) = self.find(worker) else {
            if let Some((phase, _)) = &self.finished {
                return Ok(Some(self.finished_wiring(*phase)));
            }
            if self.standby.iter().any(|s| s.worker == worker) {
                return Ok(None);
            }
            return Err(CoordError::UnknownWorker(worker));
        };
        if let Some((phase, _)) = &self.finished {
            return Ok(Some(self.finished_wiring(*phase)));
        }
        let Some(plan) = self.plan.as_ref().filter(|p| p.epoch > after) else {
            return Ok(None);
        };
        let (s, rep) = self.shard_of(i);
        let stages = self.layout.stages;
        let addr = |st: usize, re: usize, ring: bool| {
            self.slots[self.idx(st, re)].as_ref().map(|x| {
                if ring {
                    x.ring_addr.clone()
                } else {
                    x.pipe_addr.clone()
                }
            })
        };
        let lanes = plan.lanes.clone();
        if !lanes.contains(&rep) {
            // Its lane waits for a vacancy to be filled: no links, no steps.
            let mut w = self.finished_wiring(Phase::Training);
            w.epoch = plan.epoch;
            w.finished = None;
            w.shard = (s, rep);
            w.step = plan.step;
            w.lanes = lanes;
            let layers = self.layout.stage_layers.get(s).cloned().unwrap_or(0..0);
            w.layers = [layers.start, layers.end];
            return Ok(Some(w));
        }
        let next = match (s + 1 < stages, self.layout.routed) {
            (false, _) => Vec::new(),
            (true, true) => lanes
                .iter()
                .filter_map(|&r| addr(s + 1, r, false).map(|a| (r, a)))
                .collect(),
            (true, false) => addr(s + 1, rep, false)
                .map(|a| vec![(rep, a)])
                .unwrap_or_default(),
        };
        let tie = if self.layout.tied && stages > 2 && s + 1 == stages {
            addr(0, rep, false)
        } else {
            None
        };
        // The ring joins the stage's training replicas, in replica order.
        let at = lanes.iter().position(|&l| l == rep).unwrap_or(0);
        let ring_next = if lanes.len() > 1 {
            addr(s, lanes[(at + 1) % lanes.len()], true)
        } else {
            None
        };
        let checkpoint = self.checkpoint_order(i, plan.step);
        let layers = self.layout.stage_layers.get(s).cloned().unwrap_or(0..0);
        Ok(Some(Wiring {
            epoch: plan.epoch,
            finished: None,
            shard: (s, rep),
            step: plan.step,
            layers: [layers.start, layers.end],
            state: plan.sources[i].clone(),
            upload: plan.upload[i],
            next,
            tie,
            ring_next,
            checkpoint,
            route: self.route.clone(),
            lanes,
            traceparent: None,
            keys: self.shard_keys(),
            rechecks: self.recheck_orders(worker),
            recheck_only: self.recheck_only(plan.epoch),
        }))
    }

    fn finished_wiring(&self, phase: Phase) -> Wiring {
        Wiring {
            epoch: self.epoch,
            finished: Some(format!("{phase:?}")),
            shard: (0, 0),
            step: self.committed,
            layers: [0, 0],
            state: StateSource::Held,
            upload: false,
            next: Vec::new(),
            tie: None,
            ring_next: None,
            checkpoint: false,
            route: None,
            lanes: Vec::new(),
            traceparent: None,
            keys: Vec::new(),
            rechecks: Vec::new(),
            recheck_only: false,
        }
    }

    /// Whether slot `i` must upload its stage's part of the checkpoint at
    /// `step`: it is the stage's writer (its lowest live replica) and the
    /// part is still missing.
    fn checkpoint_order(&self, i: usize, step: u64) -> bool {
        let Some(p) = self.pending.as_ref().filter(|p| p.step == step) else {
            return false;
        };
        let (s, _) = self.shard_of(i);
        let r = self.layout.replicas;
        !p.written.contains(&s)
            && (s * r..(s + 1) * r).find(|&j| self.slots[j].is_some() && self.in_plan(j)) == Some(i)
    }

    /// The stage whose checkpoint part `worker` may deliver for `step`.
    pub fn checkpoint_stage(&self, worker: u64, step: u64) -> Result<usize, CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        let i = self.find(worker).ok_or(CoordError::UnknownWorker(worker))?;
        if self.pending.as_ref().is_none_or(|p| p.step != step) {
            return Err(CoordError::Invalid(format!(
                "no checkpoint of step {step} is being written"
            )));
        }
        Ok(self.shard_of(i).0)
    }

    fn is_checkpoint_step(&self, step: u64) -> bool {
        let every = self.layout.checkpoint_every;
        self.checkpoint_root.is_some()
            && step > 0
            && (step == self.layout.steps || (every > 0 && step.is_multiple_of(every)))
            && self.checkpoint.as_ref().is_none_or(|c| c.0 < step)
    }

    /// A worker completed a step. Returns the barrier's answer when it is
    /// decided (`None`: wait and ask [`Coordinator::barrier`] again).
    pub fn step_done(&mut self, d: &StepDone, now: Instant) -> Result<Option<Barrier>, CoordError> {
        if let Some(e) = self.barred_worker(d.worker) {
            return Err(e);
        }
        self.check_report(d)?;
        let Some(i) = self.find(d.worker) else {
            self.check_running()?;
            return Err(CoordError::UnknownWorker(d.worker));
        };
        if d.epoch == self.epoch {
            self.check_commitment(i, d, now)?;
            if let Some(s) = self.slots[i].as_mut() {
                if let Some(c) = &d.commitment {
                    s.commits
                        .retain(|x| x.completed + 1 >= d.completed && x.completed != d.completed);
                    s.commits.push(Committed {
                        completed: d.completed,
                        micro_batches: c.indices(),
                        root: c.root(),
                        signature: c.signature.clone(),
                        loss: d.loss,
                        seconds: d.seconds,
                        params: c.params_digest().and_then(Result::ok),
                        hashes: c.micro_batches.clone(),
                        contribution: c.contribution_hash().and_then(Result::ok).map(hex::encode),
                        update: c
                            .moments_digest()
                            .and_then(Result::ok)
                            .zip(c.applied_digest().and_then(Result::ok)),
                        grad_norm: d.grad_norm,
                        suspects: d
                            .suspects
                            .iter()
                            .filter_map(|x| Some((x.replica, suspicion_reason(&x.reason)?)))
                            .collect(),
                    });
                }
                s.completed = d.completed;
                s.has_snapshot = true;
                s.last_seen = now;
                s.step_seconds = d.seconds;
                s.busy_seconds = d.busy_seconds;
                s.reported += 1;
                // The first step of a worker pays for warm-up; leave it out.
                if s.reported > 1 {
                    s.sums[0] += d.seconds;
                    s.sums[1] += d.busy_seconds;
                    s.sums[2] += d.update_seconds;
                    s.sums[3] += d.link_bytes as f64;
                    s.counted += 1;
                    if d.micro_batches > 0 {
                        let t = d.busy_seconds / d.micro_batches as f64;
                        s.mb_seconds = Some(match s.mb_seconds {
                            Some(old) => old + ROUTE_SMOOTHING * (t - old),
                            None => t,
                        });
                    }
                }
                s.micro_batches = d.micro_batches;
                s.rejected_frames = d.rejected_frames;
            }
            self.started_training = true;
            if let Some(loss) = d.loss {
                // Every last stage reports the same mean over all replicas.
                // (`check_report` made sure the step is at least 1.)
                let at = (d.completed - 1) as usize;
                if self.losses.len() == at {
                    self.losses.push(loss);
                } else if at < self.losses.len() {
                    self.losses[at] = loss;
                }
            }
        }
        Ok(self.barrier(d.worker, d.epoch, d.completed, now))
    }

    /// Refuses a step report whose numbers do not fit the run: a step
    /// outside `1..=steps`, seconds negative or absurd, counters past any
    /// real value, a loss that is not a number. (The micro-batches it
    /// claims are checked against the route by `check_commitment`.)
    fn check_report(&self, d: &StepDone) -> Result<(), CoordError> {
        let steps = self.layout.steps;
        let bad = |what: String| {
            Err(CoordError::Invalid(format!(
                "malformed step report: {what}"
            )))
        };
        if d.completed == 0 || d.completed > steps {
            return bad(format!(
                "completed must be 1 to {steps} (the run's steps), not {}",
                d.completed
            ));
        }
        for (name, v) in [
            ("seconds", d.seconds),
            ("busy_seconds", d.busy_seconds),
            ("update_seconds", d.update_seconds),
        ] {
            if !(0.0..=MAX_REPORTED_SECONDS).contains(&v) {
                return bad(format!(
                    "{name} must be 0 to {MAX_REPORTED_SECONDS}, not {v}"
                ));
            }
        }
        for (name, v) in [
            ("link_bytes", d.link_bytes),
            ("rejected_frames", d.rejected_frames),
        ] {
            if v > MAX_REPORTED_COUNT {
                return bad(format!("{name} {v} is past any real count"));
            }
        }
        if d.loss.is_some_and(|l| !l.is_finite()) {
            return bad("the loss is not a finite number".into());
        }
        let replicas = self.layout.replicas;
        if d.suspects.len() > replicas {
            return bad(format!(
                "{} suspects reported, more than the {replicas} replicas of a stage",
                d.suspects.len()
            ));
        }
        for x in &d.suspects {
            if x.replica >= replicas {
                return bad(format!(
                    "suspect replica {} is not one of the stage's {replicas}",
                    x.replica
                ));
            }
            if suspicion_reason(&x.reason).is_none() {
                return bad(format!(
                    "suspect replica {}'s reason {:?} is neither cosine nor norm_ratio",
                    x.replica, x.reason
                ));
            }
        }
        Ok(())
    }

    /// What slot (`stage`, `replica`) committed to for `step`, if it did.
    fn commit_of(&self, stage: usize, replica: usize, step: u64) -> Option<&Committed> {
        self.slots
            .get(self.idx(stage, replica))?
            .as_ref()?
            .commits
            .iter()
            .find(|c| c.completed == step)
    }

    /// Whether every step report must commit to its contribution: the
    /// replicas combine gradients by a robust rule and the current epoch
    /// trains two or more of them (so they gather each other's).
    /// Whether the step reports of this epoch commit to their update
    /// (`moments`, `applied`): the epoch trains one replica of each stage
    /// and the coordinator audits such stages itself, replaying their
    /// updates (`pipeline::update`). The worker's side of the rule is
    /// `shard::epoch`'s.
    pub(super) fn updates_committed(&self) -> bool {
        self.audits_replay_updates()
            && self
                .plan
                .as_ref()
                .filter(|p| p.epoch == self.epoch)
                .map_or(self.layout.replicas, |p| p.lanes.len())
                == 1
    }

    fn contributions_committed(&self) -> bool {
        self.robust_aggregation()
            && self
                .plan
                .as_ref()
                .filter(|p| p.epoch == self.epoch)
                .map_or(self.layout.replicas, |p| p.lanes.len())
                > 1
    }

    /// The micro-batches the current route gives `worker` (none when it
    /// holds no shard).
    pub fn routed_to(&self, worker: u64) -> Vec<u64> {
        self.find(worker)
            .map(|i| {
                let (stage, replica) = self.shard_of(i);
                self.current_route().mine(stage, replica)
            })
            .unwrap_or_default()
    }

    /// The route in force for the current step.
    fn current_route(&self) -> Route {
        self.route.clone().unwrap_or_else(|| {
            Route::lanes(
                self.layout.stages,
                self.layout.replicas,
                self.layout.micro_batches,
            )
        })
    }

    /// Refuses a step report whose commitment is missing, out of order, or
    /// names micro-batches other than the ones the route gave the shard.
    /// (Its signature was checked by the HTTP layer.)
    fn check_commitment(&mut self, i: usize, d: &StepDone, now: Instant) -> Result<(), CoordError> {
        let (stage, replica) = self.shard_of(i);
        let completed = self.slots[i].as_ref().map_or(0, |s| s.completed);
        // The same report sent again (its first answer was "wait") is
        // taken as it was the first time, even if the barrier has passed
        // and the route changed in between.
        if let (Some(c), Some(slot)) = (&d.commitment, self.slots[i].as_ref()) {
            if d.completed == completed
                && slot.commits.iter().any(|x| {
                    x.completed == d.completed && x.root == c.root() && x.signature == c.signature
                })
            {
                return Ok(());
            }
        }
        let problem = match &d.commitment {
            None => Some((
                "unsigned",
                "a step report needs a signed commitment".to_string(),
            )),
            Some(c) if matches!(c.params_digest(), Some(Err(_))) => Some((
                "malformed_digest",
                c.params_digest().and_then(Result::err).unwrap_or_default(),
            )),
            Some(c) if matches!(c.contribution_hash(), Some(Err(_))) => Some((
                "malformed_digest",
                c.contribution_hash()
                    .and_then(Result::err)
                    .unwrap_or_default(),
            )),
            Some(c) if matches!(c.moments_digest(), Some(Err(_))) => Some((
                "malformed_digest",
                c.moments_digest().and_then(Result::err).unwrap_or_default(),
            )),
            Some(c) if matches!(c.applied_digest(), Some(Err(_))) => Some((
                "malformed_digest",
                c.applied_digest().and_then(Result::err).unwrap_or_default(),
            )),
            Some(c) if (c.moments.is_none() || c.applied.is_none()) && self.updates_committed() => {
                Some((
                    "malformed_digest",
                    "a step report of a stage with one training replica under audits commits to \
                     its optimizer moments and the gradient its update applied \
                     (commitment.moments, commitment.applied), and this one lacks one"
                        .to_string(),
                ))
            }
            Some(c) if c.contribution.is_none() && self.contributions_committed() => Some((
                "malformed_digest",
                "under a robust aggregation a step report of a stage with two or more \
                 training replicas commits to its contribution's hash \
                 (commitment.contribution), and this one has none"
                    .to_string(),
            )),
            Some(_) if d.completed < completed || d.completed > completed + 1 => Some((
                "replayed",
                format!(
                    "a report of step {} while the shard is at step {completed}",
                    d.completed
                ),
            )),
            Some(c) => {
                let mine = self.current_route().mine(stage, replica);
                let got = c.indices();
                if got == mine {
                    None
                } else if got.iter().any(|m| !mine.contains(m)) {
                    Some((
                        "unrouted",
                        format!(
                            "micro-batches {got:?} reported; the route gave stage {stage} \
                             replica {replica} {mine:?}"
                        ),
                    ))
                } else {
                    Some((
                        "incomplete",
                        format!("micro-batches {got:?} reported of the {mine:?} routed"),
                    ))
                }
            }
        };
        match problem {
            None => Ok(()),
            Some((reason, detail)) => {
                let identity = self.slots[i].as_ref().map(|s| s.identity.clone());
                Err(self.refuse(
                    Refusal {
                        worker: Some(d.worker),
                        identity,
                        reason,
                        detail,
                    },
                    now,
                ))
            }
        }
    }

    /// The ledger's entries of step `step`: one per training shard, from
    /// its signed commitment and the cost of the micro-batches the route
    /// gave it.
    fn booking(&self, step: u64) -> StepBooking {
        let (stages, replicas) = (self.layout.stages, self.layout.replicas);
        let lanes = self
            .plan
            .as_ref()
            .map_or(replicas, |p| p.lanes.len().max(1));
        let tally = self.audit_tally(step);
        let entries = (0..self.slots.len())
            .filter(|&j| self.in_plan(j))
            .filter_map(|j| {
                let slot = self.slots[j].as_ref()?;
                let c = slot.commits.iter().find(|c| c.completed == step)?;
                let (stage, replica) = self.shard_of(j);
                let layers = self.layout.stage_layers.get(stage).cloned().unwrap_or(0..0);
                let n = c.micro_batches.len() as u64;
                let (flops, tokens, allreduce) = match &self.layout.cost {
                    Some(m) => (
                        m.flops(stage, stages, &layers, n),
                        n * m.tokens_per_micro_batch,
                        m.allreduce_bytes(stage, stages, &layers, lanes),
                    ),
                    None => ([0.0; 3], 0, 0),
                };
                Some(Entry {
                    step,
                    stage,
                    replica,
                    identity: slot.identity.clone(),
                    worker: slot.worker,
                    epoch: self.epoch,
                    micro_batches: c.micro_batches.clone(),
                    layers: layers.clone(),
                    tokens,
                    forward_flops: flops[0],
                    input_grad_flops: flops[1],
                    weight_grad_flops: flops[2],
                    allreduce_bytes: allreduce,
                    validation_flops: tally.validated.get(&slot.worker).copied().unwrap_or(0.0),
                    loss: c.loss,
                    commitment: c.root,
                    signature: c.signature.clone(),
                    reported_seconds: c.seconds,
                    audits_passed: tally.passed.get(&slot.worker).copied().unwrap_or(0),
                    audits_failed: tally.failed.get(&slot.worker).copied().unwrap_or(0),
                })
            })
            .collect();
        StepBooking {
            step,
            epoch: self.epoch,
            loss: (step as usize)
                .checked_sub(1)
                .and_then(|at| self.losses.get(at).copied()),
            entries,
        }
    }

    /// The barrier's answer for `worker`, who completed `completed` steps in
    /// `epoch`; `None` while other slots have not.
    pub fn barrier(
        &mut self,
        worker: u64,
        epoch: u64,
        completed: u64,
        now: Instant,
    ) -> Option<Barrier> {
        let stop = Some(Barrier {
            proceed: false,
            checkpoint: false,
            route: None,
            traceparent: None,
            audits: Vec::new(),
        });
        if epoch != self.epoch || self.finished.is_some() {
            return stop;
        }
        let i = self.find(worker)?;
        if (0..self.slots.len()).any(|j| {
            self.in_plan(j)
                && self.slots[j]
                    .as_ref()
                    .is_none_or(|s| s.completed < completed)
        }) {
            return None;
        }
        if completed > self.committed
            && (!self.digests_agree(completed, now) || !self.chain_agrees(completed, now))
        {
            return stop;
        }
        if completed > self.committed {
            match self.audit_gate(i, completed, now) {
                audit::Gate::Broken => return stop,
                audit::Gate::Wait(orders) if orders.is_empty() => return None,
                audit::Gate::Wait(orders) => {
                    return Some(Barrier {
                        proceed: true,
                        checkpoint: false,
                        route: None,
                        traceparent: None,
                        audits: orders,
                    })
                }
                audit::Gate::Passed => {}
            }
            // A step acknowledged to any worker is in the ledger first.
            if self.ledger.is_some() {
                let booking = self.booking(completed);
                if let Some(Err(e)) = self.ledger.as_mut().map(|l| l.book(&booking)) {
                    self.fail_run(format!("the ledger cannot book step {completed}: {e}"), now);
                    return stop;
                }
            }
            self.committed = completed;
            self.close_audits();
            self.barrier_times.push((completed, now));
            if self.barrier_times.len() > 20 {
                self.barrier_times.remove(0);
            }
            let loss = self.losses.get((completed - 1) as usize).copied();
            self.history
                .step(completed, loss, self.tokens_per_second(), now);
            if let Some(since) = self.recovering_since.take() {
                let secs = now.saturating_duration_since(since).as_secs_f64();
                let (n, total, _) = self.recoveries;
                self.recoveries = (n + 1, total + secs, Some(secs));
                self.history.event(
                    EventKind::Recovered,
                    format!(
                        "recovered in {secs:.1} s: step {completed} committed in epoch {}",
                        self.epoch
                    ),
                    now,
                );
            }
            if self.is_checkpoint_step(completed) {
                self.pending = Some(PendingCheckpoint {
                    step: completed,
                    written: BTreeSet::new(),
                });
            }
            self.reroute();
        }
        Some(Barrier {
            proceed: true,
            checkpoint: self.checkpoint_order(i, completed),
            route: self.route.clone(),
            traceparent: None,
            audits: Vec::new(),
        })
    }

    /// Compares the parameters' digests the replicas of each stage reported
    /// for `step`, which must be equal (the replicas step the same bits).
    /// Where a strict majority of three or more agrees, each replica
    /// outside it is refused, counted and dropped from its slot, so the
    /// run rewires and the slot is refilled from a majority replica; with
    /// no majority (two replicas) the disagreement is counted and the step
    /// is broken off, everyone keeping their slot. Either way the step is
    /// not committed and is trained again from the one before (`false`).
    /// Reports without a digest compare equal to each other only.
    fn digests_agree(&mut self, step: u64, now: Instant) -> bool {
        let r = self.layout.replicas;
        let mut outvoted = Vec::new();
        let mut split = Vec::new();
        for stage in 0..self.layout.stages {
            let reports: Vec<(usize, u64, String, Option<[u8; 32]>)> = (stage * r..(stage + 1) * r)
                .filter(|&j| self.in_plan(j))
                .filter_map(|j| {
                    let slot = self.slots[j].as_ref()?;
                    let c = slot.commits.iter().find(|c| c.completed == step)?;
                    Some((j, slot.worker, slot.identity.clone(), c.params))
                })
                .collect();
            let Some(first) = reports.first() else {
                continue;
            };
            if reports.iter().all(|x| x.3 == first.3) {
                continue;
            }
            let mut counts: BTreeMap<Option<[u8; 32]>, usize> = BTreeMap::new();
            for x in &reports {
                *counts.entry(x.3).or_default() += 1;
            }
            let (majority, n) = counts
                .iter()
                .max_by_key(|(_, &n)| n)
                .map(|(d, &n)| (*d, n))
                .unwrap_or((None, 0));
            if reports.len() >= 3 && 2 * n > reports.len() {
                for x in reports.into_iter().filter(|x| x.3 != majority) {
                    outvoted.push((stage, majority, x));
                }
            } else {
                split.push((stage, reports));
            }
        }
        if outvoted.is_empty() && split.is_empty() {
            return true;
        }
        // The step is trained again from the last committed one, which
        // every survivor holds (as its snapshot).
        self.losses.truncate(self.committed as usize);
        let short = |d: &Option<[u8; 32]>| d.map_or("none".to_string(), |d| hex::encode(&d[..8]));
        for (stage, reports) in split {
            *self.digest_mismatches.entry(stage).or_default() += 1;
            let digests: Vec<String> = reports
                .iter()
                .map(|x| format!("replica {}: {}", x.0 % r, short(&x.3)))
                .collect();
            let text = format!(
                "the replicas of stage {stage} disagree on their parameters after step {step} \
                 with no majority ({}); the step is broken off and trained again",
                digests.join(", ")
            );
            tracing::warn!("{text}");
            self.history.event(EventKind::Refused, text, now);
        }
        if outvoted.is_empty() {
            self.break_off(now);
        }
        // An outvoted replica is convicted: quarantined, not let back in.
        for (stage, majority, (j, _, _, digest)) in outvoted {
            *self.digest_mismatches.entry(stage).or_default() += 1;
            let detail = format!(
                "stage {stage} replica {}'s parameters after step {step} \
                 ({}) differ from the majority's ({})",
                j % r,
                short(&digest),
                short(&majority)
            );
            let evidence = serde_json::json!({
                "params": digest.map(hex::encode),
                "majority": majority.map(hex::encode),
            })
            .to_string();
            self.convict(j, step, "digest_mismatch", detail, evidence, now);
        }
        false
    }

    /// A stage's part of the pending checkpoint is written. Returns the
    /// step when that completes the checkpoint: the caller commits it
    /// (renames the directory into place) and then calls
    /// [`Coordinator::checkpoint_committed`].
    pub fn checkpoint_written(
        &mut self,
        worker: u64,
        step: u64,
    ) -> Result<Option<u64>, CoordError> {
        let i = self.find(worker).ok_or(CoordError::UnknownWorker(worker))?;
        let (s, _) = self.shard_of(i);
        let stages = self.layout.stages;
        let Some(p) = self.pending.as_mut().filter(|p| p.step == step) else {
            return Err(CoordError::Invalid(format!(
                "no checkpoint of step {step} is being written"
            )));
        };
        p.written.insert(s);
        Ok((p.written.len() == stages).then_some(step))
    }

    /// The checkpoint of `step` is committed at `dir`.
    pub fn checkpoint_committed(&mut self, step: u64, dir: String, now: Instant) {
        if self.pending.as_ref().is_some_and(|p| p.step == step) {
            self.pending = None;
        }
        self.history.event(
            EventKind::Checkpoint,
            format!("checkpoint of step {step} committed"),
            now,
        );
        self.checkpoint = Some((step, dir));
        if step == self.layout.steps && self.committed == step {
            self.succeed(now);
        }
    }

    /// Ends a run that has nothing to checkpoint once every slot completed
    /// the last step.
    pub fn finish_without_checkpoint(&mut self, now: Instant) {
        if self.checkpoint_root.is_none() && self.committed == self.layout.steps {
            self.succeed(now);
        }
    }

    /// Marks the run failed (e.g. a checkpoint could not be committed).
    pub fn abort(&mut self, reason: String, now: Instant) {
        self.fail_run(reason, now);
    }

    fn phase(&self) -> (Phase, String) {
        if let Some((p, reason)) = &self.finished {
            return (*p, reason.clone());
        }
        let vacant = self.slots.iter().filter(|s| s.is_none()).count();
        if vacant > 0 {
            let phase = if self.started_training {
                Phase::Initializing
            } else {
                Phase::Pending
            };
            return (phase, format!("waiting for {vacant} worker(s)"));
        }
        if self.pending.is_some() {
            return (Phase::Checkpointing, String::new());
        }
        if !self.started_training {
            return (Phase::Initializing, "workers are linking".into());
        }
        (Phase::Training, String::new())
    }

    /// Training tokens per second over the last barriers passed.
    fn tokens_per_second(&self) -> f64 {
        match (self.barrier_times.first(), self.barrier_times.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                let secs = b.1.saturating_duration_since(a.1).as_secs_f64();
                (b.0 - a.0) as f64 * self.layout.tokens_per_step as f64 / secs.max(1e-9)
            }
            _ => 0.0,
        }
    }

    /// The run's status.
    pub fn status(&self, now: Instant) -> Status {
        let (phase, reason) = self.phase();
        let r = self.layout.replicas;
        let tps = self.tokens_per_second();
        let stages = (0..self.layout.stages)
            .map(|s| {
                let live: Vec<&Slot> = self.slots[s * r..(s + 1) * r].iter().flatten().collect();
                let bubble = live
                    .iter()
                    .filter(|x| x.step_seconds > 0.0)
                    .map(|x| 1.0 - (x.busy_seconds / x.step_seconds).min(1.0))
                    .fold(0.0f64, f64::max);
                let layers = self.layout.stage_layers.get(s).cloned().unwrap_or(0..0);
                StageStatus {
                    stage: s,
                    layers: [layers.start, layers.end],
                    desired: r,
                    ready: live.len(),
                    bubble,
                }
            })
            .collect();
        let shards = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let (stage, replica) = self.shard_of(i);
                ShardStatus {
                    stage,
                    replica,
                    worker: slot.as_ref().map(|s| s.worker),
                    name: slot.as_ref().map(|s| s.name.clone()),
                    address: slot.as_ref().map(|s| s.pipe_addr.clone()),
                    state: match (slot.is_some(), self.in_plan(i)) {
                        (false, _) => "vacant",
                        (true, true) => "live",
                        // Its lane waits for a vacancy to be filled.
                        (true, false) => "idle",
                    }
                    .into(),
                    completed: slot.as_ref().map_or(0, |s| s.completed),
                    seconds_since_heartbeat: slot
                        .as_ref()
                        .map(|s| now.saturating_duration_since(s.last_seen).as_secs_f64()),
                    step_seconds: slot.as_ref().map_or(0.0, |s| s.step_seconds),
                    busy_seconds: slot.as_ref().map_or(0.0, |s| s.busy_seconds),
                    mean_seconds: slot.as_ref().map_or([0.0; 3], |s| {
                        let n = s.counted.max(1) as f64;
                        [s.sums[0] / n, s.sums[1] / n, s.sums[2] / n]
                    }),
                    mean_link_bytes: slot
                        .as_ref()
                        .map_or(0.0, |s| s.sums[3] / s.counted.max(1) as f64),
                    rejected_frames: slot.as_ref().map_or(0, |s| s.rejected_frames),
                    micro_batches: slot.as_ref().map_or(0, |s| s.micro_batches),
                    seconds_per_micro_batch: slot.as_ref().and_then(|s| s.mb_seconds),
                    identity: slot
                        .as_ref()
                        .map(|s| crate::identity::fingerprint_hex(&s.identity)),
                }
            })
            .collect();
        Status {
            run: self.run.clone(),
            phase,
            reason,
            step: self.committed,
            steps: self.layout.steps,
            loss: self
                .committed
                .checked_sub(1)
                .and_then(|i| self.losses.get(i as usize).copied()),
            tokens_per_second: tps,
            epoch: self.epoch,
            reassignments: self.reassignments,
            checkpoint_step: self.checkpoint.as_ref().map(|c| c.0),
            standby: self.standby.len(),
            stages,
            shards,
            contributions: self.contributions(),
            refused_reports: self.refused.values().sum(),
            recoveries: self.recoveries.0,
            recovery_seconds_total: self.recoveries.1,
            last_recovery_seconds: self.recoveries.2,
            quarantined: self.quarantined_status(),
        }
    }

    /// Every contributor's standing over the reward window, largest share
    /// first (empty without a ledger). Computed again only after a new
    /// step is booked.
    pub fn shares(&self) -> Vec<crate::ledger::Share> {
        let Some(ledger) = &self.ledger else {
            return Vec::new();
        };
        let mut cache = self.shares_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, shares)) = cache.as_ref() {
            if *at == self.committed {
                return shares.clone();
            }
        }
        let computed = (|| {
            let last = ledger.last_step()?;
            let (from, to) = crate::ledger::window_of(last, &self.layout.rewards);
            let totals = ledger.totals(from, to)?;
            let steps = ledger.steps_in(from, to)?;
            Ok::<_, crate::ledger::LedgerError>(crate::ledger::shares(
                &totals,
                steps,
                &self.layout.rewards,
            ))
        })();
        match computed {
            Ok(shares) => {
                *cache = Some((self.committed, shares.clone()));
                shares
            }
            Err(e) => {
                tracing::error!("reading the ledger: {e}");
                Vec::new()
            }
        }
    }

    /// The shares as `/status` shows them, with each identity's last name.
    fn contributions(&self) -> Vec<Contribution> {
        let shares = self.shares();
        if shares.is_empty() {
            return Vec::new();
        }
        let names: BTreeMap<String, String> = self
            .ledger
            .as_ref()
            .and_then(|l| l.names().ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        shares
            .into_iter()
            .map(|s| Contribution {
                name: names.get(&s.identity).cloned().unwrap_or_default(),
                identity: s.fingerprint,
                flops: s.flops,
                micro_batches: s.micro_batches,
                share: s.share,
            })
            .collect()
    }

    /// Workers by id with their shard, for callers that supervise
    /// processes.
    pub fn workers(&self) -> BTreeMap<u64, (usize, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.worker, self.shard_of(i))))
            .collect()
    }
}
