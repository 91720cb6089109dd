//! The coordinator's HTTP API: JSON bodies exchanged with workers. Every
//! worker request carries the run's join token as `Authorization: Bearer`.

use serde::{Deserialize, Serialize};

use crate::pipeline::Route;

/// `POST /v1/register`: a worker asks for a shard.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Register {
    /// The shard it wants (a pod of the operator has one); `None` takes any
    /// vacancy (a volunteer).
    pub stage: Option<usize>,
    /// Replica it wants, with `stage`.
    pub replica: Option<usize>,
    /// `host:port` where the previous stage (or the tied last stage)
    /// reaches this worker.
    pub pipe_addr: String,
    /// `host:port` where the previous replica's ring link reaches it.
    pub ring_addr: String,
    /// Id it was given before, when it registers again (after the
    /// coordinator restarted); `None` the first time.
    pub worker: Option<u64>,
    /// Steps of training state it holds (0 when fresh).
    pub completed: u64,
    /// Whether it also holds the state one step earlier (its snapshot).
    pub has_snapshot: bool,
    /// A name for status pages (host name, pod name).
    pub name: String,
    /// Measured speed of this worker's kernels (GFLOP/s; 0 when not
    /// measured), for `partition: measured`.
    #[serde(default)]
    pub speed: f64,
    /// Proof that the worker holds its identity's key (required).
    #[serde(default)]
    pub identity: Option<IdentityProof>,
    /// Bytes of memory the worker can give a shard (`None`: unknown, as
    /// from older workers). A worker without a stage of its own is only
    /// given a shard whose planned bytes fit.
    #[serde(default)]
    pub available_memory: Option<u64>,
}

/// `POST /v1/challenge`'s answer: a fresh nonce to sign when registering.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Challenge {
    /// 32 random bytes in hex, valid once, for a minute.
    pub nonce: String,
}

/// A worker's identity and the proof that it holds the key: its signature
/// over [`register_message`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityProof {
    /// Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// The coordinator's challenge.
    pub nonce: String,
    /// Signature in the register domain, 128 hex digits.
    pub signature: String,
}

/// What a registering worker signs: the run id, the challenge and its own
/// public key.
pub fn register_message(run_id: &str, nonce: &str, public_key: &str) -> Vec<u8> {
    format!("run={run_id} nonce={nonce} key={public_key}").into_bytes()
}

/// A worker's signed commitment to the step it reports: which
/// micro-batches it ran and what it computed for each.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Commitment {
    /// One entry per micro-batch it ran, ascending.
    pub micro_batches: Vec<MicroBatchCommit>,
    /// Signature over [`step_message`] in the step domain, 128 hex digits.
    pub signature: String,
    /// BLAKE3 digest of the stage's parameters after the step's update,
    /// 64 hex digits: the same on every replica of a stage. Covered by the
    /// signature through [`Commitment::root`]; a report without one (an
    /// older worker) signs the root it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// Under a robust aggregation, the BLAKE3 hash of the contribution the
    /// worker handed to the replicas' gather in this step (every gathered
    /// bucket's little-endian f32 bytes, in bucket order: see
    /// `sync::contribution`), 64 hex digits. Covered by the signature
    /// through [`Commitment::root`]; absent under `mean` (the ring mixes
    /// contributions, none is attributable) and from older workers, whose
    /// root is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contribution: Option<String>,
    /// On a stage with one training replica under audits, the BLAKE3
    /// digest of the optimizer's moments after the step's update
    /// (`pipeline::moments_digest`), 64 hex digits: what the coordinator
    /// holds the worker's next update to. Covered by the signature through
    /// [`Commitment::root`]; absent elsewhere, and the root unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moments: Option<String>,
    /// With `moments`: the BLAKE3 digest of the gradient the step's update
    /// applied and the global norm it was clipped by
    /// (`pipeline::applied_digest`), 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
}

/// The hashes committed for one micro-batch (64 hex digits each).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MicroBatchCommit {
    /// Global micro-batch index within the step.
    pub mb: u64,
    /// Hash of its forward input.
    pub input: String,
    /// Hash of its forward output (the loss's bytes on the last stage).
    pub output: String,
    /// Hash of the input gradient sent back (zeros on the first stage).
    pub gradient: String,
}

impl Commitment {
    /// The micro-batch indices, in the order committed.
    pub fn indices(&self) -> Vec<u64> {
        self.micro_batches.iter().map(|m| m.mb).collect()
    }

    /// BLAKE3 over every micro-batch's index and hashes, then the
    /// parameters' digest when there is one: what the signature covers of
    /// them, and what the ledger keeps.
    pub fn root(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for m in &self.micro_batches {
            h.update(&m.mb.to_le_bytes());
            for part in [&m.input, &m.output, &m.gradient] {
                h.update(part.as_bytes());
                h.update(b"/");
            }
        }
        if let Some(p) = &self.params {
            h.update(b"params=");
            h.update(p.as_bytes());
        }
        if let Some(c) = &self.contribution {
            h.update(b"contribution=");
            h.update(c.as_bytes());
        }
        if let Some(m) = &self.moments {
            h.update(b"moments=");
            h.update(m.as_bytes());
        }
        if let Some(a) = &self.applied {
            h.update(b"applied=");
            h.update(a.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// The contribution's hash: `None` when the report has none,
    /// `Some(Err(_))` when it is not 64 hex digits.
    pub fn contribution_hash(&self) -> Option<Result<[u8; 32], String>> {
        Some(digest_field(
            self.contribution.as_deref()?,
            "the contribution's hash",
        ))
    }

    /// The moments' digest: `None` when the report has none,
    /// `Some(Err(_))` when it is not 64 hex digits.
    pub fn moments_digest(&self) -> Option<Result<[u8; 32], String>> {
        Some(digest_field(
            self.moments.as_deref()?,
            "the optimizer moments' digest",
        ))
    }

    /// The applied gradient's digest: `None` when the report has none,
    /// `Some(Err(_))` when it is not 64 hex digits.
    pub fn applied_digest(&self) -> Option<Result<[u8; 32], String>> {
        Some(digest_field(
            self.applied.as_deref()?,
            "the applied gradient's digest",
        ))
    }

    /// The parameters' digest: `None` when the report has none,
    /// `Some(Err(_))` when it is not 64 hex digits.
    pub fn params_digest(&self) -> Option<Result<[u8; 32], String>> {
        Some(digest_field(
            self.params.as_deref()?,
            "the parameters' digest",
        ))
    }
}

/// `text` as 32 bytes, or why not (naming `what`).
fn digest_field(text: &str, what: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    match hex::decode_to_slice(text, &mut out) {
        Ok(()) => Ok(out),
        Err(_) => Err(format!(
            "{what} must be 64 hex digits, got {} characters",
            text.len()
        )),
    }
}

/// Who reports which step of which shard, with what loss and which
/// micro-batches: the fields a step's signature binds.
#[derive(Clone, Debug, PartialEq)]
pub struct StepClaim<'a> {
    /// Run id (hex).
    pub run_id: &'a str,
    /// Worker id.
    pub worker: u64,
    /// Epoch.
    pub epoch: u64,
    /// Steps completed with this one.
    pub completed: u64,
    /// Its shard.
    pub shard: (usize, usize),
    /// Loss it reports (last stages).
    pub loss: Option<f32>,
    /// Micro-batches it ran.
    pub micro_batches: &'a [u64],
    /// [`Commitment::root`].
    pub root: [u8; 32],
}

/// What a worker signs for a step (and what `pipewright ledger verify`
/// rebuilds from the ledger's columns to check every entry).
pub fn step_message(c: &StepClaim<'_>) -> Vec<u8> {
    let mbs: Vec<String> = c.micro_batches.iter().map(u64::to_string).collect();
    let loss = c
        .loss
        .map_or("-".into(), |l| format!("{:08x}", l.to_bits()));
    format!(
        "run={} worker={} epoch={} step={} stage={} replica={} loss={loss} mbs={} root={}",
        c.run_id,
        c.worker,
        c.epoch,
        c.completed,
        c.shard.0,
        c.shard.1,
        mbs.join(","),
        hex::encode(c.root)
    )
    .into_bytes()
}

/// Answer to [`Register`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Registered {
    /// The worker's id for later requests.
    pub worker: u64,
    /// Its shard; `None` while it waits as a standby for a vacancy.
    pub shard: Option<(usize, usize)>,
    /// Run key for the links, 64 hex digits.
    pub run_key: String,
    /// Run id, 32 hex digits.
    pub run_id: String,
    /// Heartbeat period the coordinator expects, in milliseconds.
    pub heartbeat_ms: u64,
}

/// Where a worker's stage state comes from when it is (re)wired.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum StateSource {
    /// Its own state: the current one, or its snapshot one step back.
    Held,
    /// Initialisation from the seed (step 0).
    Init,
    /// A live replica of the same stage sends it through the coordinator:
    /// `GET /v1/state/{stage}?epoch=E`.
    Replica,
    /// The last committed checkpoint, at the plan's step:
    /// `GET /v1/checkpoint/{stage}?step=N` from the coordinator.
    Checkpoint {
        /// Its directory on the coordinator (for logs).
        dir: String,
    },
}

/// `GET /v1/wiring?worker=W&after=E`: the worker's peers for the first epoch
/// after `E` (long poll), or the run's end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Wiring {
    /// Wiring generation; links of different epochs cannot connect.
    pub epoch: u64,
    /// The run is over: `Succeeded` or `Failed` (the worker exits).
    pub finished: Option<String>,
    /// Its shard (a standby learns here that it got one).
    pub shard: (usize, usize),
    /// Step every worker resumes from.
    pub step: u64,
    /// Layer range `[start, end)` of this worker's stage.
    pub layers: [usize; 2],
    /// Where this worker's state at `step` comes from.
    pub state: StateSource,
    /// Upload this worker's state at `step` for a new replica
    /// (`PUT /v1/state/{stage}?epoch=E`).
    pub upload: bool,
    /// Next stage's `pipe_addr`s, `(replica, address)` (every stage but the
    /// last): its own replica's, or every replica's under
    /// `routing: throughput`.
    #[serde(default)]
    pub next: Vec<(usize, String)>,
    /// First stage's `pipe_addr` (last stage of a tied model with three or
    /// more stages).
    pub tie: Option<String>,
    /// Next replica's `ring_addr` (more than one replica).
    pub ring_next: Option<String>,
    /// Upload this stage's part of the checkpoint at `step` before training
    /// on (the writer chosen before was lost before it wrote).
    pub checkpoint: bool,
    /// Which replica runs which micro-batch from `step` on (`None`: each
    /// replica its own, `routing: lanes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// The replicas that train in this epoch (empty: all). Under
    /// `routing: throughput` a lane with a vacancy that outlasted a lease
    /// is left out until it is filled; its workers get no `next`, no ring
    /// and wait for the next epoch.
    #[serde(default)]
    pub lanes: Vec<usize>,
    /// W3C `traceparent` of the coordinator's span for the epoch's first
    /// step (`None` when traces are off); the worker parents its spans of
    /// that step on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The registered public key (hex) of every worker that holds a shard
    /// in this epoch, `(stage, replica, key)`: a worker checks the author
    /// signature of every pipeline frame against them (empty: no check).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<(usize, usize, String)>,
    /// Rechecks of a broken step this worker carries out before it links
    /// (`POST /v1/recheck`; `coord::complaint`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rechecks: Vec<super::complaint_api::RecheckOrder>,
    /// An epoch started for rechecks: carry out `rechecks`, do not link,
    /// and ask for the next wiring.
    #[serde(default)]
    pub recheck_only: bool,
}

/// `POST /v1/step`: a worker completed a step; the answer comes when every
/// shard has (the step barrier) or the wiring changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepDone {
    /// Worker id.
    pub worker: u64,
    /// Epoch it trains in.
    pub epoch: u64,
    /// Steps completed now.
    pub completed: u64,
    /// Mean loss of the step (last stages).
    pub loss: Option<f32>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Seconds of that spent in the schedule's forwards and backwards.
    pub busy_seconds: f64,
    /// Seconds spent in the optimizer update.
    #[serde(default)]
    pub update_seconds: f64,
    /// Bytes sent to neighbouring stages during the step.
    #[serde(default)]
    pub link_bytes: u64,
    /// Frames its links refused so far in this epoch.
    #[serde(default)]
    pub rejected_frames: u64,
    /// Micro-batches it ran in the step.
    #[serde(default)]
    pub micro_batches: usize,
    /// Its signed commitment to the step (required: a report without a
    /// valid one is refused and credits nothing).
    #[serde(default)]
    pub commitment: Option<Commitment>,
    /// Under a robust aggregation, the replicas of its stage (by replica
    /// index) whose contribution to this step's gather the worker found
    /// suspect (empty: none, and under `mean`). Each one suspected by
    /// another replica is contribution-audited; a suspicion never convicts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspects: Vec<SuspectReport>,
}

/// One replica whose contribution a worker found suspect in a step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuspectReport {
    /// The suspected replica of the reporter's stage (replica index, not
    /// ring rank).
    pub replica: usize,
    /// Why: `cosine` (it points away from the others) or `norm_ratio`
    /// (its norm is far from theirs).
    pub reason: String,
}

/// Answer to [`StepDone`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Barrier {
    /// Go on with the next step; `false`: the wiring changed, drop the
    /// links and ask for the new one.
    pub proceed: bool,
    /// Upload this stage's part of the checkpoint at the step just
    /// completed: `PUT /v1/checkpoint/{stage}?step=N&worker=W`.
    pub checkpoint: bool,
    /// The route of the next step, under `routing: throughput`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// W3C `traceparent` of the coordinator's span for the next step
    /// (`None` when traces are off, or after the last step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Audit orders for this worker (empty: none). A worker that gets some
    /// carries them out, then sends an [`AuditReport`] for each to
    /// `POST /v1/audit` and takes that answer as the barrier's (which may
    /// carry further orders), until one comes without orders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audits: Vec<AuditOrder>,
}

/// One audit task given to a worker with the barrier's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditOrder {
    /// Audit id, unique within the run.
    pub audit: u64,
    /// Steps completed with the audited step (the step's `completed`).
    pub step: u64,
    /// Stage of the audited shard (the worker's own stage).
    pub stage: usize,
    /// Global micro-batch index within the step that is recomputed (for a
    /// contribution audit: the scope's first micro-batch, unused).
    pub mb: u64,
    /// What this worker does for it.
    pub role: AuditRole,
    /// `Some`: a contribution audit of the audited replica's whole step
    /// (its contribution to the robust aggregation); `None`: a micro-batch
    /// audit of `mb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contribution: Option<ContributionScope>,
}

/// What a contribution audit covers: every micro-batch the audited replica
/// ran in the step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContributionScope {
    /// The audited replica's committed micro-batch indices, in its
    /// commitment's order ([`Commitment::indices`]). The provider uploads
    /// the evidence of all of them in one set; the validator recomputes the
    /// replica's whole step from it.
    pub micro_batches: Vec<u64>,
    /// The contribution hash the audited replica committed to (64 hex
    /// digits; a contribution audit's only): a validator that received
    /// another one proves it with the frames it received
    /// (`PUT /v1/audit/{audit}/receipt`, `sync::receipt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<String>,
}

/// A worker's part in an audit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AuditRole {
    /// It is audited: upload the evidence of `mb`
    /// (`PUT /v1/audit/{audit}/evidence?worker=W`).
    Provide,
    /// Recompute `mb` as replica `audited_replica` of the same stage ran
    /// it, from the evidence (`GET /v1/audit/{audit}/evidence?worker=W`).
    Validate {
        /// The audited replica.
        audited_replica: usize,
    },
    /// The coordinator recomputes the disputed micro-batch itself (a stage
    /// with no second validator): upload the stage's parameters of before
    /// the step, as the snapshot holds them
    /// (`PUT /v1/audit/{audit}/weights?worker=W`, every value as
    /// little-endian f32 in the stage's parameter order).
    Weights,
    /// As `Weights`, for a stage with one training replica whose update the
    /// coordinator replays too: upload the stage's parameters and optimizer
    /// moments of before the step and the gradient the step's update
    /// applied, with its global norm (`PUT /v1/audit/{audit}/weights?worker=W`,
    /// the layout of `StageWorker::encode_update`).
    Update,
}

/// `POST /v1/audit`: a worker carried out an audit order. The answer is a
/// long poll like `POST /v1/step`'s: 204 until the step's audits are
/// decided, then a [`Barrier`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditReport {
    /// Worker id.
    pub worker: u64,
    /// Epoch it trains in.
    pub epoch: u64,
    /// Steps completed (the audited step).
    pub completed: u64,
    /// The audit.
    pub audit: u64,
    /// What it did.
    pub result: AuditResult,
}

/// The outcome of an order, by role.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AuditResult {
    /// The audited worker uploaded its evidence.
    Provided,
    /// A validator's recomputed hashes (64 hex digits each) and its
    /// signature over [`audit_message`] in the audit domain.
    Recomputed {
        /// Hash of the forward output payload (the loss's LE bytes on the
        /// last stage).
        output: String,
        /// Hash of the input-gradient payload (zeros on the first stage).
        gradient: String,
        /// Hash of the input it used (stage 0: of the tokens it sampled).
        input: String,
        /// Ed25519 signature, 128 hex digits.
        signature: String,
    },
    /// A validator's answer to a contribution audit: the hash of the
    /// contribution it recomputed from the evidence, the hash of the
    /// contribution it received from the audited replica in the step's
    /// gather (64 zeros when it has none), and its signature over
    /// [`contribution_message`] in the audit domain.
    Contribution {
        /// Hash of the recomputed contribution (64 hex digits).
        recomputed: String,
        /// Hash of the contribution as received (64 hex digits).
        received: String,
        /// Ed25519 signature, 128 hex digits.
        signature: String,
    },
}

/// What an audit's verdict binds: the run, the audit, the audited work and
/// the recomputed hashes.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditClaim<'a> {
    /// Run id (hex).
    pub run_id: &'a str,
    /// Audit id.
    pub audit: u64,
    /// The audited step (`completed`).
    pub step: u64,
    /// Stage.
    pub stage: usize,
    /// Micro-batch.
    pub mb: u64,
    /// The audited replica.
    pub audited_replica: usize,
    /// Recomputed input hash (hex).
    pub input: &'a str,
    /// Recomputed output hash (hex).
    pub output: &'a str,
    /// Recomputed gradient hash (hex).
    pub gradient: &'a str,
}

/// What a validator signs for a verdict (domain
/// [`crate::identity::AUDIT_DOMAIN`]).
pub fn audit_message(c: &AuditClaim<'_>) -> Vec<u8> {
    format!(
        "run={} audit={} step={} stage={} mb={} replica={} input={} output={} gradient={}",
        c.run_id, c.audit, c.step, c.stage, c.mb, c.audited_replica, c.input, c.output, c.gradient
    )
    .into_bytes()
}

/// What a contribution audit's verdict binds: the run, the audit, the
/// audited replica's step and the two hashes the validator reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ContributionClaim<'a> {
    /// Run id (hex).
    pub run_id: &'a str,
    /// Audit id.
    pub audit: u64,
    /// The audited step (`completed`).
    pub step: u64,
    /// Stage.
    pub stage: usize,
    /// The audited replica.
    pub audited_replica: usize,
    /// Hash of the recomputed contribution (hex).
    pub recomputed: &'a str,
    /// Hash of the contribution as the validator received it (hex).
    pub received: &'a str,
}

/// What a validator signs for a contribution audit (domain
/// [`crate::identity::AUDIT_DOMAIN`]); the word `contribution` keeps it
/// apart from every [`audit_message`].
pub fn contribution_message(c: &ContributionClaim<'_>) -> Vec<u8> {
    format!(
        "run={} audit={} step={} stage={} contribution replica={} recomputed={} received={}",
        c.run_id, c.audit, c.step, c.stage, c.audited_replica, c.recomputed, c.received
    )
    .into_bytes()
}

/// What a contribution audit's validator signs for the proof of receipt
/// it uploads (domain [`crate::identity::AUDIT_DOMAIN`]; `proof`: the
/// BLAKE3 hash of the upload, 64 hex digits):
/// `run=<run_id> audit=<id> receipt worker=<w> proof=<hex>`.
pub fn receipt_message(run_id: &str, audit: u64, worker: u64, proof: &str) -> Vec<u8> {
    format!("run={run_id} audit={audit} receipt worker={worker} proof={proof}").into_bytes()
}

/// `POST /v1/heartbeat`: the worker is alive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    /// Worker id.
    pub worker: u64,
}

/// Answer to [`Heartbeat`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatReply {
    /// Current epoch (a worker behind it stops its step).
    pub epoch: u64,
}

/// `POST /v1/fail`: a worker's step failed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// Worker id.
    pub worker: u64,
    /// Epoch it was training in.
    pub epoch: u64,
    /// The error.
    pub error: String,
    /// The failure will repeat on any worker (divergence, bad data): the
    /// run fails.
    pub fatal: bool,
}

#[cfg(test)]
mod float_tests {
    use super::StepDone;

    /// A step report's gradient norm comes back with the same bits it was
    /// sent with: the coordinator compares it bit for bit with the norm a
    /// replayed update was clipped by. Among these, values a best-effort
    /// float parser reads one unit in the last place off.
    #[test]
    fn a_reported_gradient_norm_round_trips_bit_for_bit() {
        let mut d: StepDone = serde_json::from_value(serde_json::json!({
            "worker": 1, "epoch": 1, "completed": 1, "loss": null, "grad_norm": 1.0,
            "seconds": 0.1, "busy_seconds": 0.1
        }))
        .expect("a minimal report");
        // The norm two stages of a run were convicted over, then 10,000 more.
        let mut x = 1.931_192_556_607_925_8_f64;
        for k in 0..10_000u64 {
            d.grad_norm = x;
            let back: StepDone =
                serde_json::from_str(&serde_json::to_string(&d).expect("json")).expect("parse");
            assert_eq!(back.grad_norm.to_bits(), x.to_bits(), "{x:e}");
            x = f64::from_bits(x.to_bits().wrapping_add(0x9E37_79B9 * k + 1)) * 1.0001;
        }
    }
}
