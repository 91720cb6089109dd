//! Audits by recomputation, the coordinator's part (a child of `state`, so
//! it works on the coordinator's slots directly).
//!
//! * **Chain check.** At every step's barrier, for every micro-batch, the
//!   output hash the sending shard committed must equal the input hash the
//!   receiving shard (by the step's route) committed. A mismatch means one
//!   of the two lies about what crossed the link, without saying which: it
//!   is counted, refused (`chain_mismatch`, naming both) and the step is
//!   broken off and trained again.
//! * **Draw.** Once every report of a step is in and the digests agree,
//!   each training shard of a stage with another training replica is
//!   audited with probability `auditRate`: one of its micro-batches, and a
//!   validator among the stage's other training replicas, are drawn from a
//!   BLAKE3 stream keyed by a secret only the coordinator knows (kept in
//!   its state file), so no worker can tell in advance which work is
//!   checked. A stage with one training replica has the coordinator as
//!   its validator: the audited worker uploads its evidence and its
//!   parameters of before the step, which must have the digest it signed
//!   after the step before (at the first step: the digest of the run's
//!   initial parameters, which the coordinator derives itself), and the
//!   coordinator's recomputation decides alone (it is the run owner's
//!   process): equal hashes pass, others convict; no matching parameters
//!   by the deadline convict too (`bad_weights`).
//! * **Orders.** While a step's audits are open the barrier answers only
//!   with orders: the audited worker uploads the payloads it received for
//!   the micro-batch (checked against its own and its neighbours' signed
//!   hashes), the validator downloads them, recomputes, and reports signed
//!   hashes.
//! * **Verdict.** Hashes equal to the audited commitment pass. Different
//!   ones call a second validator: agreeing with the commitment overturns
//!   the first verdict (the first validator is refused), agreeing with the
//!   first convicts the audited worker. Without another replica to call
//!   (two replicas) the coordinator is the second validator: it orders the
//!   stage's parameters of before the step uploaded, checks them against
//!   the digest the replicas committed, and recomputes the micro-batch
//!   itself (the server does, outside this state machine:
//!   [`Coordinator::referee_job`], [`Coordinator::referee_done`]). Where it
//!   cannot, the audit is unconfirmed and the step is trained again.
//! * **Conviction** (also for evidence never matching the commitments, and
//!   for a replica outvoted on its parameters' digest): refused, its
//!   identity quarantined (in the ledger too), its slot vacated, the step
//!   trained again; any later request of that worker or identity is
//!   answered 403 `quarantined: ...`.
//! * **Contribution audits** (under a robust aggregation, see
//!   [`contribution`]): a replica's whole step is recomputed by a ring
//!   neighbour and the hash of its contribution compared with the one it
//!   signed and the one the neighbour received; same orders, deadlines,
//!   convictions and booking, their own verdict rule and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CoordError, Coordinator, EventKind, Refusal};
use crate::coord::api::{
    audit_message, AuditClaim, AuditOrder, AuditReport, AuditResult, ContributionScope,
    MicroBatchCommit,
};
use crate::ledger::Conviction;
use crate::pipeline::{Evidence, Route};

#[path = "contribution_audit.rs"]
mod contribution;

/// Leases an audit may stay open at least before the silent party is dealt
/// with (see [`Coordinator::audit_deadline`]).
const DEADLINE_LEASES: u32 = 10;

/// Step durations an audit may stay open at least.
const DEADLINE_STEPS: f64 = 4.0;

/// Decision times kept for the metrics' histogram between scrapes.
const RECENT: usize = 4096;

/// Three hashes of one micro-batch (64 hex digits each).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hashes {
    input: String,
    output: String,
    gradient: String,
}

impl Hashes {
    fn of(c: &MicroBatchCommit) -> Self {
        Hashes {
            input: c.input.clone(),
            output: c.output.clone(),
            gradient: c.gradient.clone(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"input": self.input, "output": self.output, "gradient": self.gradient})
    }
}

/// What a validator reported.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// A micro-batch recomputed: its three hashes.
    Hashes(Hashes),
    /// A contribution: the hash recomputed and the hash received (64 hex
    /// digits each).
    Contribution {
        recomputed: String,
        received: String,
    },
}

/// One validator of an audit and its verdict once reported.
#[derive(Clone, Debug)]
struct Check {
    worker: u64,
    identity: String,
    verdict: Option<Verdict>,
    /// A contribution audit's: what the frames it proved receiving from
    /// the audited replica make (`PUT /v1/audit/{audit}/receipt`).
    receipt: Option<Receipt>,
}

impl Check {
    /// Whether the contribution it says it `received` needs no proof (it
    /// is the `committed` one, or it says it received none) or has one.
    fn proves(&self, received: &str, committed: &str) -> bool {
        received == committed
            || received == contribution::NO_REPORT
            || self.receipt.as_ref().is_some_and(|r| r.hash == received)
    }

    /// What it received, as the verdict rule takes it: its claim when
    /// [`Check::proves`] it, [`contribution::NO_REPORT`] (struck)
    /// otherwise.
    fn received<'a>(&self, claimed: &'a str, committed: &str) -> &'a str {
        if self.proves(claimed, committed) {
            claimed
        } else {
            contribution::NO_REPORT
        }
    }
}

/// A receipt a validator proved: the contribution hash the audited
/// replica's signed frames make (64 hex digits), and how many frames.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Receipt {
    hash: String,
    frames: usize,
}

/// What an audit checks.
#[derive(Clone, Debug)]
enum Kind {
    /// One micro-batch, against its three committed hashes.
    MicroBatch { mb: u64, committed: Hashes },
    /// The audited replica's whole step, against its committed
    /// contribution.
    Contribution(contribution::Scope),
}

/// What a verdict rule says about an audit so far.
enum Next {
    /// A verdict is still missing.
    Wait,
    /// The first verdict disputes the commitment: call a second validator.
    Second,
    /// Two validators agree against the commitment: the coordinator
    /// confirms by recomputing itself where it can; where it cannot, the
    /// outcome given (the two validators' conviction) stands.
    Confirm(Outcome),
    /// Decided.
    Decided(Outcome),
}

/// How an audit ended.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// The recomputation reproduced the commitment.
    Passed,
    /// The first validator's verdict was refuted by a second one.
    Overturned,
    /// The audited worker is convicted for this reason.
    Convicted(&'static str, String),
    /// Two verdicts and no way to tell who lies.
    Unconfirmed,
    /// A validator did not answer in time (it is vacated).
    Silent(u64),
    /// The coordinator, sole validator of a stage with one training
    /// replica, could not recompute (it cannot build the stage): nothing
    /// disputes the commitment and the step goes on, unchecked.
    Unchecked,
}

/// One audit of an open step.
#[derive(Clone, Debug)]
struct Audit {
    id: u64,
    stage: usize,
    replica: usize,
    worker: u64,
    kind: Kind,
    /// The provider's payloads, once they matched the commitments.
    evidence: Option<Arc<Vec<u8>>>,
    /// Uploads refused for not matching.
    bad_uploads: u64,
    checks: Vec<Check>,
    /// The coordinator as second validator (a disputed micro-batch audit
    /// with no other replica to call).
    referee: Option<Referee>,
    outcome: Option<Outcome>,
}

/// The coordinator's own recomputation of a disputed micro-batch.
#[derive(Clone, Debug)]
struct Referee {
    /// The digest of the stage's parameters before the audited step that
    /// its replicas committed and agreed on: an upload must have it.
    digest: [u8; 32],
    /// The workers ordered to upload those parameters (the validator and
    /// the audited worker; the first matching upload is used).
    uploaders: Vec<u64>,
    /// Whether a recomputation is under way (one per audit at a time).
    started: bool,
    /// The uploaders that uploaded (matching or not): not ordered again.
    tried: Vec<u64>,
    /// Uploads refused for not matching the digest.
    refused: u64,
    /// What it recomputed (a micro-batch's hashes, or a contribution's
    /// hash with [`NO_REPORT`] received: the coordinator takes no part in
    /// the gather), or why it could not.
    result: Option<Result<Verdict, String>>,
    /// On a stage with one training replica: the update the coordinator
    /// replays too (`None`: the micro-batch alone).
    update: Option<UpdateCheck>,
    /// Why the replayed update did not give the digests committed to
    /// (`None`: it did, or none was replayed).
    wrong_update: Option<String>,
    /// With an update replayed: every micro-batch of the step with its
    /// committed hashes. The worker uploads the evidence of all of them,
    /// and the coordinator recomputes the step's weight gradients from it,
    /// which must be the gradient the update applied (`None`: the audited
    /// micro-batch alone).
    whole_step: Option<Vec<MicroBatchCommit>>,
}

/// What the coordinator holds a stage with one training replica to when it
/// replays the update of an audited step (see `pipeline::update`): the
/// digests the worker signed.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateCheck {
    /// Its optimizer moments' digest after the step before (`None` at the
    /// first step: the moments must be the initial zeros).
    pub moments_before: Option<[u8; 32]>,
    /// The digest of the gradient the audited step's update applied.
    pub applied: [u8; 32],
    /// Its parameters' digest after the audited step.
    pub params_after: [u8; 32],
    /// Its moments' digest after the audited step.
    pub moments_after: [u8; 32],
    /// The global gradient norm every other stage's worker reported for
    /// the audited step, where there are other stages and they agree (the
    /// norm is summed along the pipeline and the total handed back, so
    /// every stage holds the same bits): the norm the update must have
    /// been clipped by. `None`: no other stage (the coordinator derives
    /// it from the applied gradient), or they disagree.
    pub grad_norm: Option<f64>,
}

/// What the coordinator needs to recompute a disputed micro-batch itself
/// (see [`Coordinator::referee_job`]).
#[derive(Clone, Debug)]
pub struct RefereeJob {
    /// The audit.
    pub audit: u64,
    /// The audited step, 1-based (steps completed).
    pub step: u64,
    /// The stage.
    pub stage: usize,
    /// The disputed micro-batch.
    pub mb: u64,
    /// The audited worker's evidence (matched its commitments).
    pub evidence: Arc<Vec<u8>>,
    /// The digest the uploaded parameters must have.
    pub digest: [u8; 32],
    /// The loss scale of the step's micro-batches.
    pub scale: f32,
    /// The update to replay as well (the upload is then an update upload).
    pub update: Option<UpdateCheck>,
    /// With the update: the audited replica and every micro-batch of its
    /// step, whose recomputed weight gradients must be the gradient the
    /// update applied (the evidence is then a set of them all).
    pub whole_step: Option<ContributionJob>,
    /// A contribution audit's scope: the whole step of a replica is
    /// recomputed, not the micro-batch `mb` (the evidence is then a set).
    pub contribution: Option<ContributionJob>,
}

/// A replica's whole step the coordinator recomputes: a disputed
/// contribution (see [`RefereeJob::contribution`]) or a lone replica's
/// applied gradient (see [`RefereeJob::whole_step`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContributionJob {
    /// The audited replica.
    pub replica: usize,
    /// Its micro-batches, in its commitment's order.
    pub micro_batches: Vec<u64>,
}

/// How a recomputation by the coordinator ended (see
/// [`Coordinator::referee_done`]).
#[derive(Clone, Debug)]
pub enum RefereeResult {
    /// The recomputed hashes (input, output, gradient), raw.
    Hashes([[u8; 32]; 3]),
    /// The uploaded parameters were not the agreed ones (or not the
    /// stage's): refused and counted, never used.
    BadWeights(String),
    /// The recomputation failed (the stage cannot be built here, e.g. the
    /// first stage's corpus is unreadable, or the evidence is refused).
    Failed(String),
    /// The micro-batch's recomputed hashes, and the replayed update did
    /// not give the digests the worker committed to (why, for the record).
    WrongUpdate([[u8; 32]; 3], String),
    /// A contribution audit's: the recomputed contribution's hash, raw.
    Contribution([u8; 32]),
}

impl Audit {
    /// The micro-batch its orders name: the audited one, or a contribution
    /// audit's first (unused by the worker).
    fn mb(&self) -> u64 {
        match &self.kind {
            Kind::MicroBatch { mb, .. } => *mb,
            Kind::Contribution(scope) => scope.first_mb(),
        }
    }

    /// What is audited, for messages: `stage S replica R's micro-batch M`
    /// or `stage S replica R's contribution`.
    fn what(&self) -> String {
        match &self.kind {
            Kind::MicroBatch { mb, .. } => {
                format!(
                    "stage {} replica {}'s micro-batch {mb}",
                    self.stage, self.replica
                )
            }
            Kind::Contribution(_) => {
                format!(
                    "stage {} replica {}'s contribution",
                    self.stage, self.replica
                )
            }
        }
    }

    /// Whether `v` reproduces what the audited worker committed to (for a
    /// contribution: the recomputed hash equals the committed one).
    fn reproduces(&self, v: &Verdict) -> bool {
        match (&self.kind, v) {
            (Kind::MicroBatch { committed, .. }, Verdict::Hashes(h)) => h == committed,
            (Kind::Contribution(scope), Verdict::Contribution { recomputed, .. }) => {
                *recomputed == scope.committed
            }
            _ => false,
        }
    }

    /// The verdict rule of a micro-batch audit: the first validator's
    /// hashes equal to the commitment pass; otherwise a second validator's
    /// equal to the commitment overturn the first, equal to the first's
    /// convict, anything else leaves it unconfirmed.
    fn decide_micro_batch(&self, step: u64, mb: u64, committed: &Hashes) -> Next {
        let verdict = |k: usize| match self.checks.get(k).map(|c| &c.verdict) {
            Some(Some(Verdict::Hashes(h))) => Some(h),
            _ => None,
        };
        if self.checks.is_empty() {
            return self.decide_alone(step, mb, committed);
        }
        let Some(v1) = verdict(0) else {
            return Next::Wait;
        };
        if v1 == committed {
            return Next::Decided(Outcome::Passed);
        }
        if self.checks.len() == 1 {
            return match self.referee.as_ref().map(|r| &r.result) {
                None => Next::Second,
                Some(None) => Next::Wait,
                Some(Some(Err(_)) | Some(Ok(Verdict::Contribution { .. }))) => {
                    Next::Decided(Outcome::Unconfirmed)
                }
                Some(Some(Ok(Verdict::Hashes(h)))) => Next::Decided(if h == committed {
                    Outcome::Overturned
                } else if h == v1 {
                    Outcome::Convicted(
                        "failed_audit",
                        format!(
                            "stage {} replica {}'s micro-batch {mb} of step {step} does not \
                             reproduce: it committed input {}, output {}, gradient {}; validator \
                             {} and the coordinator both recomputed input {}, output {}, \
                             gradient {}",
                            self.stage,
                            self.replica,
                            short(&committed.input),
                            short(&committed.output),
                            short(&committed.gradient),
                            crate::identity::fingerprint_hex(&self.checks[0].identity),
                            short(&v1.input),
                            short(&v1.output),
                            short(&v1.gradient),
                        ),
                    )
                } else {
                    Outcome::Unconfirmed
                }),
            };
        }
        let Some(v2) = verdict(1) else {
            return Next::Wait;
        };
        if v2 == committed {
            return Next::Decided(Outcome::Overturned);
        }
        if v1 != v2 {
            return Next::Decided(Outcome::Unconfirmed);
        }
        let convict = |confirmed: &str| {
            Outcome::Convicted(
                "failed_audit",
                format!(
                    "stage {} replica {}'s micro-batch {mb} of step {step} does not reproduce: \
                     it committed input {}, output {}, gradient {}; validators {} and {} both \
                     recomputed input {}, output {}, gradient {}{confirmed}",
                    self.stage,
                    self.replica,
                    short(&committed.input),
                    short(&committed.output),
                    short(&committed.gradient),
                    crate::identity::fingerprint_hex(&self.checks[0].identity),
                    crate::identity::fingerprint_hex(&self.checks[1].identity),
                    short(&v1.input),
                    short(&v1.output),
                    short(&v1.gradient),
                ),
            )
        };
        // Two validators agree against the commitment. Two colluding
        // validators could agree on a lie, so the coordinator recomputes
        // too before anyone is convicted, where it can.
        match self.referee.as_ref().map(|r| &r.result) {
            None => Next::Confirm(convict("")),
            Some(None) => Next::Wait,
            // It cannot recompute here: the two validators' word stands.
            Some(Some(Err(_))) => Next::Decided(convict("")),
            Some(Some(Ok(Verdict::Hashes(h)))) if h == committed => {
                Next::Decided(Outcome::Overturned)
            }
            Some(Some(Ok(Verdict::Hashes(h)))) if h == v1 => {
                Next::Decided(convict("; the coordinator's recomputation agrees"))
            }
            Some(Some(Ok(_))) => Next::Decided(Outcome::Unconfirmed),
        }
    }

    /// The verdict rule of a micro-batch audit of a stage with one
    /// training replica, whose one validator is the coordinator: its
    /// hashes equal to the commitment pass, other hashes convict (the
    /// coordinator is the run owner's process, trusted), a recomputation
    /// it could not make leaves the audit unchecked.
    fn decide_alone(&self, step: u64, mb: u64, committed: &Hashes) -> Next {
        let Some(r) = &self.referee else {
            return Next::Decided(Outcome::Unchecked);
        };
        match &r.result {
            None => Next::Wait,
            Some(Err(_) | Ok(Verdict::Contribution { .. })) => Next::Decided(Outcome::Unchecked),
            Some(Ok(Verdict::Hashes(h))) if h == committed => match &r.wrong_update {
                None => Next::Decided(Outcome::Passed),
                Some(why) => Next::Decided(Outcome::Convicted(
                    "wrong_update",
                    format!(
                        "stage {} replica {}'s optimizer update of step {step} does not \
                         reproduce: the coordinator, the validator of a stage with one training \
                         replica, replayed it from the parameters and moments it committed to \
                         before the step and the gradient it committed to applying: {why}",
                        self.stage, self.replica,
                    ),
                )),
            },
            Some(Ok(Verdict::Hashes(h))) => Next::Decided(Outcome::Convicted(
                "failed_audit",
                format!(
                    "stage {} replica {}'s micro-batch {mb} of step {step} does not reproduce: \
                     it committed input {}, output {}, gradient {}; the coordinator, the \
                     validator of a stage with one training replica, recomputed input {}, \
                     output {}, gradient {} from its evidence and the parameters it committed \
                     to before the step",
                    self.stage,
                    self.replica,
                    short(&committed.input),
                    short(&committed.output),
                    short(&committed.gradient),
                    short(&h.input),
                    short(&h.output),
                    short(&h.gradient),
                ),
            )),
        }
    }

    /// What the audit's verdicts decide so far.
    fn decide(&self, step: u64) -> Next {
        match &self.kind {
            Kind::MicroBatch { mb, committed } => self.decide_micro_batch(step, *mb, committed),
            Kind::Contribution(scope) => self.decide_contribution(step, scope),
        }
    }

    /// The conviction's evidence (one line of JSON).
    fn evidence_json(&self) -> String {
        let validators: Vec<&str> = self.checks.iter().map(|c| c.identity.as_str()).collect();
        match &self.kind {
            Kind::MicroBatch { mb, committed } => {
                let recomputed: Vec<Option<serde_json::Value>> = self
                    .checks
                    .iter()
                    .map(|c| match &c.verdict {
                        Some(Verdict::Hashes(h)) => Some(h.json()),
                        _ => None,
                    })
                    .collect();
                let mut j = serde_json::json!({
                    "audit": self.id,
                    "mb": mb,
                    "committed": committed.json(),
                    "recomputed": recomputed,
                    "validators": validators,
                });
                if let Some(Some(Ok(Verdict::Hashes(h)))) = self.referee.as_ref().map(|r| &r.result)
                {
                    let role = match self.checks.len() {
                        0 => "validator",
                        1 => "second_validator",
                        _ => "confirmed_by",
                    };
                    j[role] = "coordinator".into();
                    j["coordinator"] = h.json();
                }
                j
            }
            Kind::Contribution(scope) => {
                let redone = match self.referee.as_ref().map(|r| &r.result) {
                    Some(Some(Ok(Verdict::Contribution { recomputed, .. }))) => {
                        Some(recomputed.as_str())
                    }
                    _ => None,
                };
                scope.evidence_json(self.id, &self.checks, &validators, redone)
            }
        }
        .to_string()
    }
}

/// The audits of one step while they are open.
#[derive(Clone, Debug)]
struct OpenStep {
    epoch: u64,
    step: u64,
    drawn: Instant,
    list: Vec<Audit>,
}

/// A conviction as the coordinator keeps it.
#[derive(Clone, Debug)]
pub(super) struct Barred {
    pub(super) conviction: Conviction,
    /// The refusal's detail, for the 403 answers.
    pub(super) detail: String,
}

/// The coordinator's audit bookkeeping.
pub(super) struct Audits {
    /// Key of the draw stream (never sent to a worker).
    secret: [u8; 32],
    /// Probability a shard is audited at a step.
    rate: f64,
    next_id: u64,
    open: Option<OpenStep>,
    /// Convictions by identity (public key, hex).
    barred: BTreeMap<String, Barred>,
    /// Identity of each convicted worker id.
    barred_workers: BTreeMap<u64, String>,
    /// Audit decisions by (stage, outcome).
    outcomes: BTreeMap<(usize, &'static str), u64>,
    /// Decisions timed and their seconds from draw to decision.
    seconds: (u64, f64),
    /// The seconds of the last [`RECENT`] decisions, oldest first.
    recent: std::collections::VecDeque<f64>,
    /// Chain mismatches by receiving stage.
    chain: BTreeMap<usize, u64>,
    /// Probability a shard's contribution is audited at a step.
    contribution_rate: f64,
    /// Whether the replicas combine gradients by a robust rule (their
    /// contributions are then attributable, and committed).
    robust: bool,
    /// Contribution audit decisions by (stage, outcome).
    contribution_outcomes: BTreeMap<(usize, &'static str), u64>,
    /// Suspicions reported by (suspected stage, reason).
    suspicions: BTreeMap<(usize, &'static str), u64>,
    /// Whether the coordinator recomputes a disputed micro-batch itself
    /// when its stage has no second validator.
    referee: bool,
    /// Whether audit evidence must carry its targets' origin, the first
    /// stage's signature, which the coordinator verifies.
    target_origins: bool,
    /// The coordinator's recomputations by (stage, outcome).
    recomputations: BTreeMap<(usize, &'static str), u64>,
    /// The coordinator's recomputations timed and their seconds (upload
    /// checked, stage built, micro-batch recomputed).
    recompute_seconds: (u64, f64),
    /// Computes the digest of a stage's initial parameters (from the run's
    /// seed, see `model::init`) over a layer range; `None`: it cannot.
    initial: Option<InitialDigest>,
    /// Its digests by (stage, first layer, end of the layers).
    initial_cache: BTreeMap<(usize, usize, usize), [u8; 32]>,
}

/// Computes the digest of stage `stage`'s initial parameters over `layers`
/// (see [`Coordinator::with_initial_digests`]).
pub type InitialDigest = Box<dyn Fn(usize, std::ops::Range<usize>) -> Option<[u8; 32]> + Send>;

impl Audits {
    /// Bookkeeping with `secret` (hex, from the state file) or a fresh one.
    pub(super) fn new(secret: Option<&str>) -> Self {
        let mut key = [0u8; 32];
        let known = secret.is_some_and(|s| hex::decode_to_slice(s, &mut key).is_ok());
        if !known {
            key = rand::random();
        }
        Audits {
            secret: key,
            rate: 0.0,
            next_id: 1,
            open: None,
            barred: BTreeMap::new(),
            barred_workers: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            seconds: (0, 0.0),
            recent: Default::default(),
            chain: BTreeMap::new(),
            contribution_rate: 0.0,
            robust: false,
            contribution_outcomes: BTreeMap::new(),
            suspicions: BTreeMap::new(),
            referee: false,
            target_origins: false,
            recomputations: BTreeMap::new(),
            recompute_seconds: (0, 0.0),
            initial: None,
            initial_cache: BTreeMap::new(),
        }
    }

    /// The secret, hex, for the state file.
    pub(super) fn secret_hex(&self) -> String {
        hex::encode(self.secret)
    }

    fn bar(&mut self, b: Barred) {
        self.barred_workers
            .insert(b.conviction.worker, b.conviction.identity.clone());
        self.barred
            .entry(b.conviction.identity.clone())
            .or_insert(b);
    }
}

/// A number drawn for `what` of shard (`stage`, `replica`) at (`epoch`,
/// `step`) from the stream keyed by `secret`: the same for the same inputs,
/// unpredictable without the key.
pub(super) fn draw(
    secret: &[u8; 32],
    epoch: u64,
    step: u64,
    stage: usize,
    replica: usize,
    what: &str,
) -> u64 {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(
        format!("audit {what} epoch={epoch} step={step} stage={stage} replica={replica}")
            .as_bytes(),
    );
    let b = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// `x` as a number uniform in `[0, 1)`.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `s` is 64 lowercase hex digits.
fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the barrier does about the step's audits.
pub(super) enum Gate {
    /// Not decided: these orders for the asking worker (maybe none).
    Wait(Vec<AuditOrder>),
    /// The step was broken off (a conviction, an unconfirmed audit, a
    /// silent validator): answer `proceed: false`.
    Broken,
    /// Every audit passed (or none was drawn): commit the step.
    Passed,
}

impl Coordinator {
    /// Sets the probability a shard is audited at each step
    /// (`spec.validation.auditRate`; 0, the state machine's default, turns
    /// audits off).
    pub fn with_audit_rate(mut self, rate: f64) -> Self {
        self.audits.rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Sets the key of the audits' draw (tests; a coordinator otherwise
    /// makes one per run and keeps it in its state file).
    pub fn with_audit_secret(mut self, secret: [u8; 32]) -> Self {
        self.audits.secret = secret;
        self
    }

    /// Audit decisions by stage and outcome (`passed`, `failed`,
    /// `overturned`, `unconfirmed`).
    pub fn audit_outcomes(&self) -> &BTreeMap<(usize, &'static str), u64> {
        &self.audits.outcomes
    }

    /// Audits decided and their seconds from draw to decision, all
    /// together.
    pub fn audit_seconds(&self) -> (u64, f64) {
        self.audits.seconds
    }

    /// The seconds from draw to decision of the audits decided after the
    /// first `seen` ones (at most the last 4096 of them).
    pub fn audit_seconds_since(&self, seen: u64) -> Vec<f64> {
        let total = self.audits.seconds.0;
        let new = total
            .saturating_sub(seen)
            .min(self.audits.recent.len() as u64) as usize;
        self.audits
            .recent
            .iter()
            .skip(self.audits.recent.len() - new)
            .copied()
            .collect()
    }

    /// Steps broken off for a chain mismatch, by receiving stage.
    pub fn chain_mismatches(&self) -> &BTreeMap<usize, u64> {
        &self.audits.chain
    }

    /// The convictions, oldest first.
    pub fn convictions(&self) -> Vec<Conviction> {
        let mut v: Vec<Conviction> = self
            .audits
            .barred
            .values()
            .map(|b| b.conviction.clone())
            .collect();
        v.sort_by_key(|c| (c.step, c.worker));
        v
    }

    /// The 403 answer for a request of a quarantined worker id, if it is
    /// one.
    pub fn barred_worker(&self, worker: u64) -> Option<CoordError> {
        let identity = self.audits.barred_workers.get(&worker)?;
        self.barred_identity(identity)
    }

    /// The 403 answer for a registration with a quarantined identity.
    pub(super) fn barred_identity(&self, identity: &str) -> Option<CoordError> {
        let b = self.audits.barred.get(identity)?;
        let c = &b.conviction;
        Some(CoordError::Quarantined(format!(
            "quarantined: identity {} (worker {}, stage {} replica {}) was convicted at step {} \
             for {}: {}",
            crate::identity::fingerprint_hex(&c.identity),
            c.worker,
            c.stage,
            c.replica,
            c.step,
            c.reason,
            b.detail
        )))
    }

    /// Loads the ledger's convictions (a restarted coordinator).
    pub(super) fn load_convictions(&mut self) {
        let Some(l) = &self.ledger else {
            return;
        };
        match l.quarantined() {
            Ok(list) => {
                for q in list {
                    let detail = format!("evidence {}", q.conviction.evidence);
                    self.audits.bar(Barred {
                        conviction: q.conviction,
                        detail,
                    });
                }
            }
            Err(e) => tracing::error!("reading the ledger's quarantine: {e}"),
        }
    }

    /// Convicts the worker of slot `i` at `step`: refused and counted for
    /// `reason`, quarantined (in the ledger too), its slot vacated, the
    /// step trained again from the last committed one.
    pub(super) fn convict(
        &mut self,
        i: usize,
        step: u64,
        reason: &'static str,
        detail: String,
        evidence: String,
        now: Instant,
    ) {
        let Some(slot) = self.slots[i].clone() else {
            return;
        };
        let (stage, replica) = self.shard_of(i);
        let conviction = Conviction {
            identity: slot.identity.clone(),
            worker: slot.worker,
            stage,
            replica,
            step,
            reason: reason.to_string(),
            evidence,
        };
        let _ = self.refuse(
            Refusal {
                worker: Some(conviction.worker),
                identity: Some(conviction.identity.clone()),
                reason,
                detail: detail.clone(),
            },
            now,
        );
        if let Some(l) = self.ledger.as_mut() {
            if let Err(e) = l.quarantine(&conviction) {
                tracing::error!("recording the conviction in the ledger: {e}");
            }
        }
        let who = Self::who(conviction.worker, &slot.name, &conviction.identity);
        self.history.event(
            EventKind::Quarantined,
            format!("{who} quarantined at step {step} ({reason}): {detail}"),
            now,
        );
        let worker = conviction.worker;
        self.audits.bar(Barred { conviction, detail });
        self.losses.truncate(self.committed as usize);
        self.vacate(worker, now, &format!("quarantined for {reason}"));
    }

    /// Breaks the current step off: a new epoch in which everyone keeps
    /// their slot and trains again from the last committed step.
    pub(super) fn break_off(&mut self, now: Instant) {
        self.losses.truncate(self.committed as usize);
        if self.recovering_since.is_none() {
            self.recovering_since = Some(now);
        }
        self.new_epoch(now);
        self.make_plan(now);
    }

    /// The committed hashes of micro-batch `mb` of `step` by the training
    /// replica of `stage` that `route` (the step's) gave it: slot and
    /// hashes.
    fn committed_by(
        &self,
        route: &Route,
        stage: usize,
        mb: u64,
        step: u64,
    ) -> Option<(usize, &MicroBatchCommit)> {
        let replica = *route.assign.get(stage)?.get(usize::try_from(mb).ok()?)? as usize;
        if replica >= self.layout.replicas {
            return None;
        }
        let j = self.idx(stage, replica);
        let c = self.slots[j]
            .as_ref()?
            .commits
            .iter()
            .find(|c| c.completed == step)?;
        c.hashes.iter().find(|h| h.mb == mb).map(|h| (j, h))
    }

    /// The free check of every micro-batch of `step`: each receiving
    /// shard's committed input equals the sending shard's committed output.
    /// On a mismatch the step is broken off (`false`).
    pub(super) fn chain_agrees(&mut self, step: u64, now: Instant) -> bool {
        let mut bad = Vec::new();
        let route = self.current_route();
        for stage in 1..self.layout.stages {
            let mbs: Vec<u64> = (0..self.layout.replicas)
                .filter(|&x| self.in_plan(self.idx(stage, x)))
                .flat_map(|x| route.mine(stage, x))
                .collect();
            for mb in mbs {
                let (Some((to, got)), Some((from, sent))) = (
                    self.committed_by(&route, stage, mb, step),
                    self.committed_by(&route, stage - 1, mb, step),
                ) else {
                    continue;
                };
                if got.input != sent.output {
                    bad.push((stage, mb, from, to, sent.output.clone(), got.input.clone()));
                }
            }
        }
        if bad.is_empty() {
            return true;
        }
        for (stage, mb, from, to, sent, got) in bad {
            *self.audits.chain.entry(stage).or_default() += 1;
            let (sender, receiver) = (self.slots[from].clone(), self.slots[to].clone());
            let (Some(sender), Some(receiver)) = (sender, receiver) else {
                continue;
            };
            let _ = self.refuse(
                Refusal {
                    worker: Some(receiver.worker),
                    identity: Some(receiver.identity.clone()),
                    reason: "chain_mismatch",
                    detail: format!(
                        "micro-batch {mb} of step {step}: stage {} replica {} (worker {}) committed \
                         output {} and stage {stage} replica {} (worker {}) committed input {}; \
                         one of the two misreports what crossed the link",
                        stage - 1,
                        from % self.layout.replicas,
                        sender.worker,
                        short(&sent),
                        to % self.layout.replicas,
                        receiver.worker,
                        short(&got)
                    ),
                },
                now,
            );
        }
        self.break_off(now);
        false
    }

    /// Draws the audits of `step` in the current epoch.
    fn draw_audits(&mut self, step: u64, now: Instant) {
        let (stages, r) = (self.layout.stages, self.layout.replicas);
        let mut list = Vec::new();
        for stage in 0..stages {
            let training: Vec<usize> = (0..r)
                .filter(|&x| {
                    let j = self.idx(stage, x);
                    self.in_plan(j) && self.slots[j].is_some()
                })
                .collect();
            if let [sole] = training[..] {
                list.extend(self.sole_audit(stage, sole, step));
                continue;
            }
            if training.is_empty() {
                continue;
            }
            for &replica in &training {
                let j = self.idx(stage, replica);
                let Some(slot) = self.slots[j].as_ref() else {
                    continue;
                };
                let Some(c) = slot.commits.iter().find(|c| c.completed == step) else {
                    continue;
                };
                if c.hashes.is_empty() {
                    continue;
                }
                let key = &self.audits.secret;
                let pick = |what| draw(key, self.epoch, step, stage, replica, what);
                if unit(pick("rate")) >= self.audits.rate {
                    continue;
                }
                let mb = &c.hashes[(pick("mb") % c.hashes.len() as u64) as usize];
                let others: Vec<usize> =
                    training.iter().copied().filter(|&x| x != replica).collect();
                let v = others[(pick("validator") % others.len() as u64) as usize];
                let Some(vslot) = self.slots[self.idx(stage, v)].as_ref() else {
                    continue;
                };
                list.push(Audit {
                    id: 0,
                    stage,
                    replica,
                    worker: slot.worker,
                    kind: Kind::MicroBatch {
                        mb: mb.mb,
                        committed: Hashes::of(mb),
                    },
                    evidence: None,
                    bad_uploads: 0,
                    referee: None,
                    checks: vec![Check {
                        worker: vslot.worker,
                        identity: vslot.identity.clone(),
                        verdict: None,
                        receipt: None,
                    }],
                    outcome: None,
                });
            }
        }
        list.extend(self.draw_contribution_audits(step));
        for a in &mut list {
            a.id = self.audits.next_id;
            self.audits.next_id += 1;
        }
        if !list.is_empty() {
            let ids: Vec<String> = list.iter().map(Audit::what).collect();
            tracing::info!("step {step}: audits drawn: {}", ids.join(", "));
        }
        self.audits.open = Some(OpenStep {
            epoch: self.epoch,
            step,
            drawn: now,
            list,
        });
    }

    /// The audit of shard (`stage`, `replica`), its stage's one training
    /// replica, at `step`, when the draw picks it and the coordinator
    /// validates such audits: it recomputes the micro-batch itself from
    /// the worker's evidence and its parameters of before the step, which
    /// must have the digest the same worker committed after the step before
    /// (at the first step: the digest of the run's initial parameters,
    /// which the coordinator derives from the manifest). `None` as well
    /// when no such digest is known (a worker whose state came from a
    /// checkpoint or a replica has committed none yet): the shard is not
    /// audited at that step.
    fn sole_audit(&mut self, stage: usize, replica: usize, step: u64) -> Option<Audit> {
        if !self.audits.referee {
            return None;
        }
        let j = self.idx(stage, replica);
        let slot = self.slots[j].as_ref()?;
        let c = slot.commits.iter().find(|c| c.completed == step)?;
        if c.hashes.is_empty() {
            return None;
        }
        let key = &self.audits.secret;
        let pick = |what| draw(key, self.epoch, step, stage, replica, what);
        if unit(pick("rate")) >= self.audits.rate {
            return None;
        }
        let mb = c.hashes[(pick("mb") % c.hashes.len() as u64) as usize].clone();
        let worker = slot.worker;
        let before = step.checked_sub(1)?;
        let prev = slot.commits.iter().find(|c| c.completed == before);
        let committed = prev.and_then(|c| c.params);
        // Its update too, where it committed to the moments it started the
        // step from (at the first step: none, they are zeros) and to what
        // the step's update applied and left.
        let moments_before = prev.and_then(|c| c.update).map(|u| u.0);
        // The global norm the other stages reported for the step.
        let norms: Vec<u64> = (0..self.layout.stages)
            .filter(|&s| s != stage)
            .flat_map(|s| (0..self.layout.replicas).map(move |r| (s, r)))
            .filter_map(|(s, r)| self.slots[self.idx(s, r)].as_ref())
            .filter_map(|x| x.commits.iter().find(|c| c.completed == step))
            .map(|c| c.grad_norm.to_bits())
            .collect();
        let grad_norm = norms
            .first()
            .filter(|&&n| norms.iter().all(|&m| m == n))
            .map(|&n| f64::from_bits(n));
        // With the update, the whole step's evidence (see `Referee`).
        let all = c.hashes.clone();
        let update = match (c.update, c.params) {
            (Some((moments_after, applied)), Some(params_after))
                if before == 0 || moments_before.is_some() =>
            {
                Some(UpdateCheck {
                    moments_before,
                    applied,
                    params_after,
                    moments_after,
                    grad_norm,
                })
            }
            _ => None,
        };
        let digest = if before == 0 {
            self.initial_digest(stage)
        } else {
            committed
        };
        let Some(digest) = digest else {
            tracing::info!(
                "step {step}: stage {stage} replica {replica} is not audited: no digest of its \
                 parameters after step {before} is known"
            );
            return None;
        };
        Some(Audit {
            id: 0,
            stage,
            replica,
            worker,
            kind: Kind::MicroBatch {
                mb: mb.mb,
                committed: Hashes::of(&mb),
            },
            evidence: None,
            bad_uploads: 0,
            checks: Vec::new(),
            referee: Some(Referee {
                digest,
                uploaders: vec![worker],
                started: false,
                tried: Vec::new(),
                refused: 0,
                result: None,
                whole_step: update.is_some().then_some(all),
                update,
                wrong_update: None,
            }),
            outcome: None,
        })
    }

    /// The digest of stage `stage`'s initial parameters over its current
    /// layers, asked for until it is given once per layer range (`None`: no
    /// way to compute it was given, or it is not known yet, or it failed).
    fn initial_digest(&mut self, stage: usize) -> Option<[u8; 32]> {
        let layers = self.layout.stage_layers.get(stage)?.clone();
        let key = (stage, layers.start, layers.end);
        if let Some(d) = self.audits.initial_cache.get(&key) {
            return Some(*d);
        }
        let d = (self.audits.initial.as_ref()?)(stage, layers)?;
        self.audits.initial_cache.insert(key, d);
        Some(d)
    }

    /// The open audits of (`epoch`, `step`), if those are the current ones.
    fn open_for(&self, epoch: u64, step: u64) -> Option<&OpenStep> {
        self.audits
            .open
            .as_ref()
            .filter(|o| o.epoch == epoch && o.step == step && epoch == self.epoch)
    }

    /// How long an audit may stay open: [`DEADLINE_LEASES`] leases, or
    /// [`DEADLINE_STEPS`] times the slowest training shard's last step when
    /// that is longer.
    pub(super) fn audit_deadline(&self) -> Duration {
        let slowest = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.step_seconds)
            .fold(0.0f64, f64::max);
        (self.lease * DEADLINE_LEASES)
            .max(Duration::from_secs_f64((slowest * DEADLINE_STEPS).min(1e6)))
    }

    /// The barrier's decision about the audits of `step` for slot `i`:
    /// draws them the first time, then waits for them (handing out `i`'s
    /// orders), breaks the step off, or lets it commit.
    pub(super) fn audit_gate(&mut self, i: usize, step: u64, now: Instant) -> Gate {
        if self.open_for(self.epoch, step).is_none() {
            self.draw_audits(step, now);
        }
        if self.settle_audits(now) {
            return Gate::Broken;
        }
        let Some(open) = self.open_for(self.epoch, step) else {
            return Gate::Broken;
        };
        if open.list.iter().all(|a| a.outcome.is_some()) {
            return Gate::Passed;
        }
        let worker = self.slots[i].as_ref().map_or(0, |s| s.worker);
        Gate::Wait(Self::orders(open, worker))
    }

    /// What `worker` still has to do for `open`'s undecided audits:
    /// evidence to provide first, then recomputations.
    fn orders(open: &OpenStep, worker: u64) -> Vec<AuditOrder> {
        let undecided = || open.list.iter().filter(|a| a.outcome.is_none());
        let order = |a: &Audit, role| AuditOrder {
            audit: a.id,
            step: open.step,
            stage: a.stage,
            mb: a.mb(),
            role,
            contribution: match (
                &a.kind,
                a.referee.as_ref().and_then(|r| r.whole_step.as_ref()),
            ) {
                (Kind::MicroBatch { .. }, None) => None,
                // The evidence of the whole step, as one set.
                (Kind::MicroBatch { .. }, Some(all)) => Some(ContributionScope {
                    micro_batches: all.iter().map(|m| m.mb).collect(),
                    committed: None,
                }),
                (Kind::Contribution(scope), _) => Some(ContributionScope {
                    micro_batches: scope.indices(),
                    committed: Some(scope.committed.clone()),
                }),
            },
        };
        let provide = undecided()
            .filter(|a| a.worker == worker && a.evidence.is_none())
            .map(|a| order(a, crate::coord::api::AuditRole::Provide));
        let validate = undecided()
            .filter(|a| {
                a.checks
                    .iter()
                    .any(|c| c.worker == worker && c.verdict.is_none())
            })
            .map(|a| {
                order(
                    a,
                    crate::coord::api::AuditRole::Validate {
                        audited_replica: a.replica,
                    },
                )
            });
        let weights = undecided()
            .filter(|a| {
                a.evidence.is_some()
                    && a.referee.as_ref().is_some_and(|r| {
                        r.result.is_none()
                            && !r.started
                            && r.uploaders.contains(&worker)
                            && !r.tried.contains(&worker)
                    })
            })
            .map(|a| {
                let update = a.referee.as_ref().is_some_and(|r| r.update.is_some());
                order(
                    a,
                    if update {
                        crate::coord::api::AuditRole::Update
                    } else {
                        crate::coord::api::AuditRole::Weights
                    },
                )
            });
        provide.chain(validate).chain(weights).collect()
    }

    /// Decides every audit whose verdicts are in (calling a second
    /// validator where the first disagrees), deals with parties silent past
    /// the deadline, and carries out what the decisions call for. Returns
    /// whether the step was broken off.
    pub(super) fn settle_audits(&mut self, now: Instant) -> bool {
        let Some(mut open) = self.audits.open.take() else {
            return false;
        };
        if open.epoch != self.epoch {
            // The wiring changed: the step is trained again anyway.
            return false;
        }
        let late = now.saturating_duration_since(open.drawn) > self.audit_deadline();
        let mut fresh = Vec::new();
        for a in open.list.iter_mut().filter(|a| a.outcome.is_none()) {
            a.outcome = match a.decide(open.step) {
                Next::Wait => None,
                Next::Decided(o) => Some(o),
                Next::Second => match self.second_validator(a, open.epoch, open.step) {
                    Some(check) => {
                        a.checks.push(check);
                        None
                    }
                    None => match self.referee_for(a, open.step) {
                        Some(r) => {
                            a.referee = Some(r);
                            None
                        }
                        None => Some(Outcome::Unconfirmed),
                    },
                },
                Next::Confirm(fallback) => match self.referee_for(a, open.step) {
                    Some(r) => {
                        a.referee = Some(r);
                        None
                    }
                    None => Some(fallback),
                },
            };
            if a.outcome.is_none() && late {
                a.outcome = match (&a.evidence, a.checks.iter().find(|c| c.verdict.is_none())) {
                    (Some(_), None) if a.checks.is_empty() => self.sole_audit_late(a, open.step),
                    (None, _) => Some(Outcome::Convicted(
                        "bad_evidence",
                        format!(
                            "{} gave no evidence of step {} matching its commitment within \
                                 {:.0} s ({} upload(s) refused)",
                            a.what(),
                            open.step,
                            self.audit_deadline().as_secs_f64(),
                            a.bad_uploads
                        ),
                    )),
                    (Some(_), Some(c)) => Some(Outcome::Silent(c.worker)),
                    (Some(_), None) => Some(Outcome::Unconfirmed),
                };
            }
            if let Some(o) = &a.outcome {
                let label = match o {
                    Outcome::Passed => Some("passed"),
                    Outcome::Overturned => Some("overturned"),
                    Outcome::Convicted(..) => Some("failed"),
                    Outcome::Unconfirmed => Some("unconfirmed"),
                    Outcome::Silent(_) | Outcome::Unchecked => None,
                };
                if let Some(label) = label {
                    let counts = match a.kind {
                        Kind::MicroBatch { .. } => &mut self.audits.outcomes,
                        Kind::Contribution(_) => &mut self.audits.contribution_outcomes,
                    };
                    *counts.entry((a.stage, label)).or_default() += 1;
                    let secs = now.saturating_duration_since(open.drawn).as_secs_f64();
                    self.audits.seconds.0 += 1;
                    self.audits.seconds.1 += secs;
                    if self.audits.recent.len() == RECENT {
                        self.audits.recent.pop_front();
                    }
                    self.audits.recent.push_back(secs);
                }
                fresh.push(a.clone());
            }
        }
        // Carry out the decisions just taken (each once).
        let step = open.step;
        self.audits.open = Some(open);
        let mut convicted = Vec::new();
        let mut broken = false;
        for a in fresh {
            match a.outcome.clone() {
                Some(Outcome::Passed) => {}
                Some(Outcome::Overturned) => {
                    // The first validator was refuted; where the coordinator
                    // refuted two validators who agreed, both were.
                    let by_coordinator = a
                        .referee
                        .as_ref()
                        .is_some_and(|r| matches!(r.result, Some(Ok(_))));
                    let liars = if by_coordinator { a.checks.len() } else { 1 };
                    let second = match a.checks.get(1) {
                        Some(c) if !by_coordinator => crate::identity::fingerprint_hex(&c.identity),
                        _ => "the coordinator".to_string(),
                    };
                    for liar in a.checks.iter().take(liars) {
                        let text = format!(
                            "its verdict on {} of step {step} was refuted by {} ({second}), \
                             which reproduced the commitment",
                            a.what(),
                            if by_coordinator {
                                "the coordinator's own recomputation"
                            } else {
                                "a second validator"
                            },
                        );
                        let _ = self.refuse(
                            Refusal {
                                worker: Some(liar.worker),
                                identity: Some(liar.identity.clone()),
                                reason: "overturned_verdict",
                                detail: text,
                            },
                            now,
                        );
                    }
                }
                Some(Outcome::Convicted(reason, detail)) => {
                    convicted.push((a.worker, reason, detail, a.evidence_json()));
                }
                Some(Outcome::Unconfirmed) => {
                    broken = true;
                    self.history.event(
                        EventKind::Audit,
                        format!(
                            "audit of {} of step {step} unconfirmed: the verdicts disagree with \
                             the commitment and no other validator can tell who is wrong; the \
                             step is trained again",
                            a.what()
                        ),
                        now,
                    );
                }
                Some(Outcome::Unchecked) => {
                    self.history.event(
                        EventKind::Audit,
                        format!(
                            "audit of {} of step {step} unchecked: the coordinator, its only \
                             validator, could not recompute it; the step goes on",
                            a.what()
                        ),
                        now,
                    );
                }
                Some(Outcome::Silent(w)) => {
                    broken = true;
                    let deadline = self.audit_deadline().as_secs_f64();
                    self.vacate(
                        w,
                        now,
                        &format!("it did not answer its audit order within {deadline:.0} s"),
                    );
                }
                None => {}
            }
        }
        if convicted.is_empty() && !broken {
            return false;
        }
        self.audits.open = None;
        for (worker, reason, detail, evidence) in convicted {
            if let Some(i) = self.find(worker) {
                self.convict(i, step, reason, detail, evidence, now);
            }
        }
        if self.plan.as_ref().is_some_and(|p| p.epoch == self.epoch) {
            // Nobody was vacated: everyone keeps their slot.
            self.break_off(now);
        }
        true
    }

    /// What the deadline decides about `a`, an audit of a stage with one
    /// training replica whose evidence came: a recomputation under way is
    /// waited for (`None`); otherwise no upload of the parameters the
    /// worker committed to came (none, or only refused ones): it is
    /// convicted (`bad_weights`), as a provider that never provides its
    /// evidence is.
    fn sole_audit_late(&self, a: &Audit, step: u64) -> Option<Outcome> {
        let r = a.referee.as_ref()?;
        if r.started {
            return None;
        }
        Some(Outcome::Convicted(
            "bad_weights",
            format!(
                "{} gave no parameters of before step {step} with the digest {} it committed to \
                 within {:.0} s ({} upload(s) refused)",
                a.what(),
                hex::encode(&r.digest[..8]),
                self.audit_deadline().as_secs_f64(),
                r.refused
            ),
        ))
    }

    /// The second, independent validator of `a` whose first verdict
    /// disputes the commitment (`None`: there is none, the audit is
    /// unconfirmed). A micro-batch audit draws one among the stage's other
    /// training replicas (neither the audited one nor the first validator);
    /// a contribution audit takes the audited replica's other ring
    /// neighbour.
    fn second_validator(&self, a: &Audit, epoch: u64, step: u64) -> Option<Check> {
        let j = match &a.kind {
            Kind::MicroBatch { .. } => {
                let taken: Vec<u64> = std::iter::once(a.worker)
                    .chain(a.checks.iter().map(|c| c.worker))
                    .collect();
                let candidates: Vec<usize> = (0..self.layout.replicas)
                    .map(|x| self.idx(a.stage, x))
                    .filter(|&j| self.in_plan(j))
                    .filter(|&j| {
                        self.slots[j]
                            .as_ref()
                            .is_some_and(|s| !taken.contains(&s.worker))
                    })
                    .collect();
                if candidates.is_empty() {
                    return None;
                }
                let x = draw(
                    &self.audits.secret,
                    epoch,
                    step,
                    a.stage,
                    a.replica,
                    "second",
                );
                candidates[(x % candidates.len() as u64) as usize]
            }
            Kind::Contribution(scope) => {
                let j = self.idx(a.stage, scope.second?);
                let taken = self.slots[j].as_ref().is_none_or(|s| {
                    s.worker == a.worker || a.checks.iter().any(|c| c.worker == s.worker)
                });
                if taken || !self.in_plan(j) {
                    return None;
                }
                j
            }
        };
        let s = self.slots[j].as_ref()?;
        Some(Check {
            worker: s.worker,
            identity: s.identity.clone(),
            verdict: None,
            receipt: None,
        })
    }
}

impl Coordinator {
    /// Makes every audit's evidence of a stage after the first carry its
    /// targets as they arrived, with their origin (the first stage's
    /// signature over the ids and the tokens' hash), and checks it: the
    /// signature under the current epoch's run id by the holder of the
    /// first-stage replica the route names for the micro-batch, over the
    /// tokens that replica committed. Off (the state machine's default),
    /// the targets are taken as uploaded.
    pub fn with_target_origins(mut self, on: bool) -> Self {
        self.audits.target_origins = on;
        self
    }

    /// Whether the coordinator replays the updates of stages with one
    /// training replica it audits (it validates them, and audits are on):
    /// their step reports must then commit to their updates.
    pub(super) fn audits_replay_updates(&self) -> bool {
        self.audits.referee && self.audits.rate > 0.0
    }

    /// Makes the coordinator the second validator of a disputed micro-batch
    /// audit whose stage has no other replica to call (two replicas): it
    /// orders the parameters of before the step uploaded and recomputes the
    /// micro-batch itself (see [`Coordinator::referee_job`]). Off (the state
    /// machine's default), such a dispute is unconfirmed.
    pub fn with_coordinator_validator(mut self, on: bool) -> Self {
        self.audits.referee = on;
        self
    }

    /// Gives the coordinator a way to compute the digest of a stage's
    /// initial parameters (`f(stage, layers)`, the parameters the run's
    /// seed gives that layer range before any step), the digest every
    /// audit of the first step takes as the one agreed for the weights
    /// before it. Called under the state machine's lock, for a stage and
    /// layer range until it gives a digest (`None`: not known, or not yet;
    /// that first step's audit goes without): the server hands in a cache
    /// it fills on a thread as the run starts, and computes nothing under
    /// the lock.
    pub fn with_initial_digests(mut self, f: InitialDigest) -> Self {
        self.audits.initial = Some(f);
        self
    }

    /// The coordinator's recomputations by stage and outcome (`convicted`,
    /// `overturned`, `unconfirmed`, `failed`, `refused_weights`).
    pub fn coordinator_recomputations(&self) -> &BTreeMap<(usize, &'static str), u64> {
        &self.audits.recomputations
    }

    /// The coordinator's recomputations timed and their seconds, all
    /// together.
    pub fn coordinator_recompute_seconds(&self) -> (u64, f64) {
        self.audits.recompute_seconds
    }

    /// The coordinator as second validator of `a` (a micro-batch audit of
    /// `step` whose first verdict disputes the commitment), when it is one
    /// and the replicas of its stage agreed on their parameters' digest
    /// after the step before (`None`: the audit is unconfirmed). At the
    /// first step, whose weights no report committed to, the agreed digest
    /// is the one of the run's initial parameters, which the coordinator
    /// derives itself (see [`Coordinator::with_initial_digests`]; without
    /// it, the audit is unconfirmed).
    fn referee_for(&mut self, a: &Audit, step: u64) -> Option<Referee> {
        if !self.audits.referee {
            return None;
        }
        a.evidence.as_ref()?;
        let before = step.checked_sub(1)?;
        let digest = if before == 0 {
            self.initial_digest(a.stage)?
        } else {
            let digests: Vec<[u8; 32]> = (0..self.layout.replicas)
                .filter_map(|x| self.slots[self.idx(a.stage, x)].as_ref())
                .filter_map(|s| s.commits.iter().find(|c| c.completed == before))
                .map(|c| c.params)
                .collect::<Option<Vec<_>>>()?;
            let digest = *digests.first()?;
            if digests.iter().any(|d| *d != digest) {
                return None;
            }
            digest
        };
        // The validators and the audited worker: the first upload with the
        // agreed digest is used, whoever sends it.
        let mut uploaders: Vec<u64> = a.checks.iter().map(|c| c.worker).collect();
        uploaders.first()?;
        uploaders.push(a.worker);
        Some(Referee {
            digest,
            uploaders,
            started: false,
            tried: Vec::new(),
            refused: 0,
            result: None,
            update: None,
            wrong_update: None,
            whole_step: None,
        })
    }

    /// `PUT /v1/audit/{audit}/weights?worker=W`, before the upload is
    /// read: what the coordinator needs to recompute the audit's disputed
    /// micro-batch from `worker`'s upload (`None`: no recomputation is
    /// wanted now: one is under way, or the audit is decided or gone).
    /// Refused unless `worker` is one of an undecided audit's uploaders. The recomputation is the caller's
    /// (outside the state machine's lock), one at a time; it reports with
    /// [`Coordinator::referee_done`].
    pub fn referee_job(
        &mut self,
        worker: u64,
        audit: u64,
    ) -> Result<Option<RefereeJob>, CoordError> {
        self.check_audit_party(worker)?;
        let Ok((at, a, step)) = self.open_audit(audit) else {
            // Decided (maybe from another uploader's parameters) or gone
            // with its step: the upload is not needed, and the report that
            // follows gets the barrier's answer.
            return Ok(None);
        };
        let Some(r) = &a.referee else {
            return Err(CoordError::Refused(
                "audit",
                format!("audit {audit} wants no parameters"),
            ));
        };
        if !r.uploaders.contains(&worker) {
            return Err(CoordError::Refused(
                "audit",
                format!("worker {worker} is not ordered to upload audit {audit}'s parameters"),
            ));
        }
        let Some(evidence) = &a.evidence else {
            return Ok(None);
        };
        if r.started || r.result.is_some() {
            return Ok(None);
        }
        let contribution = match &a.kind {
            Kind::MicroBatch { .. } => None,
            Kind::Contribution(scope) => Some(ContributionJob {
                replica: a.replica,
                micro_batches: scope.indices(),
            }),
        };
        let (r_all, m) = (self.layout.replicas, self.layout.micro_batches.max(1));
        let lanes = (0..r_all)
            .filter(|&x| self.in_plan(self.idx(a.stage, x)))
            .count();
        let scale = if lanes == r_all {
            1.0 / m as f32
        } else {
            lanes as f32 / (r_all * m) as f32
        };
        let job = RefereeJob {
            audit,
            step,
            stage: a.stage,
            mb: a.mb(),
            evidence: evidence.clone(),
            digest: r.digest,
            scale,
            update: r.update.clone(),
            whole_step: r.whole_step.as_ref().map(|all| ContributionJob {
                replica: a.replica,
                micro_batches: all.iter().map(|m| m.mb).collect(),
            }),
            contribution,
        };
        if let Some(r) = self
            .audits
            .open
            .as_mut()
            .and_then(|o| o.list[at].referee.as_mut())
        {
            r.started = true;
            r.tried.push(worker);
        }
        Ok(Some(job))
    }

    /// The coordinator's recomputation of audit `audit` from `worker`'s
    /// upload ended with `result` after `seconds`. Parameters that are not
    /// the agreed ones are refused and counted (`bad_weights`; another
    /// uploader's may still come); hashes decide the audit: equal to the
    /// commitment, the validator is overturned; equal to the validator's,
    /// the audited worker is convicted; anything else (a failure included)
    /// leaves it unconfirmed. Where the coordinator is the only validator
    /// (a stage with one training replica), hashes equal to the commitment
    /// pass the audit, other hashes convict, and a failure leaves it
    /// unchecked (the step goes on).
    pub fn referee_done(
        &mut self,
        worker: u64,
        audit: u64,
        result: RefereeResult,
        seconds: f64,
        now: Instant,
    ) -> Result<(), CoordError> {
        let Ok((at, a, step)) = self.open_audit(audit) else {
            // Decided otherwise meanwhile (the deadline, a new epoch).
            return Ok(());
        };
        let (stage, what) = (a.stage, a.what());
        let mut refused = None;
        // A replay that did not reproduce comes with the micro-batch's
        // hashes, which decide as any others do.
        let mut wrong_update = None;
        let hashes = |[input, output, gradient]: [[u8; 32]; 3]| {
            Verdict::Hashes(Hashes {
                input: hex::encode(input),
                output: hex::encode(output),
                gradient: hex::encode(gradient),
            })
        };
        let outcome = match result {
            RefereeResult::BadWeights(p) => {
                refused = Some(p);
                None
            }
            RefereeResult::Failed(p) => {
                self.history.event(
                    EventKind::Audit,
                    format!("the coordinator could not recompute {what} of step {step}: {p}"),
                    now,
                );
                Some(Err(p))
            }
            RefereeResult::Hashes(h) => Some(Ok(hashes(h))),
            RefereeResult::WrongUpdate(h, why) => {
                wrong_update = Some(why);
                Some(Ok(hashes(h)))
            }
            RefereeResult::Contribution(c) => Some(Ok(Verdict::Contribution {
                recomputed: hex::encode(c),
                // The coordinator takes no part in the gather.
                received: contribution::NO_REPORT.to_string(),
            })),
        };
        let Some(open) = self.audits.open.as_mut() else {
            return Ok(());
        };
        let a = &mut open.list[at];
        if let Some(r) = a.referee.as_mut() {
            r.started = false;
            r.wrong_update = wrong_update;
            match &outcome {
                Some(o) => r.result = Some(o.clone()),
                None => r.refused += 1,
            }
        }
        // What the recomputation decides, for the metrics.
        let label = match &outcome {
            None => "refused_weights",
            Some(Err(_)) => "failed",
            Some(Ok(_)) => match a.decide(step) {
                Next::Decided(Outcome::Passed) => "passed",
                Next::Decided(Outcome::Overturned) => "overturned",
                Next::Decided(Outcome::Convicted("wrong_update", _)) => "wrong_update",
                Next::Decided(Outcome::Convicted(..)) => "convicted",
                _ => "unconfirmed",
            },
        };
        if outcome.as_ref().is_some_and(Result::is_ok) {
            tracing::info!(
                "audit {audit}: the coordinator recomputed {what} of step {step} in \
                 {seconds:.3} s: {label}"
            );
        }
        *self
            .audits
            .recomputations
            .entry((stage, label))
            .or_default() += 1;
        self.audits.recompute_seconds.0 += 1;
        self.audits.recompute_seconds.1 += seconds;
        if let Some(p) = refused {
            return Err(self.refuse_audit(
                worker,
                "bad_weights",
                format!("parameters uploaded for {what} in step {step} (audit {audit}): {p}"),
                now,
            ));
        }
        self.settle_audits(now);
        Ok(())
    }
}

/// The first 16 hex digits of a hash, for messages.
fn short(h: &str) -> String {
    h.chars().take(16).collect()
}

/// What the booking of a step takes from its audits: per worker id, audits
/// passed and failed, and FLOPs recomputed as a validator.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) passed: BTreeMap<u64, u32>,
    pub(super) failed: BTreeMap<u64, u32>,
    pub(super) validated: BTreeMap<u64, f64>,
}

impl Coordinator {
    /// The audits of `step` as its booking counts them: an audit passed
    /// (or overturned) counts for the audited worker, and each validator
    /// whose verdict reproduced the commitment is credited what it
    /// recomputed: for a micro-batch audit the forward and input-gradient
    /// FLOPs of one micro-batch of its stage, for a contribution audit the
    /// forward and both backward halves' FLOPs of every micro-batch the
    /// audited replica ran.
    pub(super) fn audit_tally(&self, step: u64) -> Tally {
        let mut t = Tally::default();
        let Some(open) = self.open_for(self.epoch, step) else {
            return t;
        };
        for a in &open.list {
            match &a.outcome {
                Some(Outcome::Passed | Outcome::Overturned) => {
                    *t.passed.entry(a.worker).or_default() += 1;
                }
                Some(Outcome::Convicted(..)) => *t.failed.entry(a.worker).or_default() += 1,
                _ => continue,
            }
            let flops = match &self.layout.cost {
                Some(m) => {
                    let layers = self
                        .layout
                        .stage_layers
                        .get(a.stage)
                        .cloned()
                        .unwrap_or(0..0);
                    match &a.kind {
                        Kind::MicroBatch { .. } => {
                            let f = m.flops(a.stage, self.layout.stages, &layers, 1);
                            f[0] + f[1]
                        }
                        Kind::Contribution(scope) => {
                            let n = scope.micro_batches.len() as u64;
                            let f = m.flops(a.stage, self.layout.stages, &layers, n);
                            f[0] + f[1] + f[2]
                        }
                    }
                }
                None => 0.0,
            };
            for c in &a.checks {
                if c.verdict.as_ref().is_some_and(|v| a.reproduces(v)) {
                    *t.validated.entry(c.worker).or_default() += flops;
                }
            }
        }
        t
    }

    /// Forgets the audits of a committed step.
    pub(super) fn close_audits(&mut self) {
        self.audits.open = None;
    }

    /// Refuses and counts a malformed or dishonest audit message of
    /// `worker`.
    fn refuse_audit(
        &mut self,
        worker: u64,
        reason: &'static str,
        detail: String,
        now: Instant,
    ) -> CoordError {
        let identity = self
            .find(worker)
            .and_then(|i| self.slots[i].as_ref().map(|s| s.identity.clone()));
        self.refuse(
            Refusal {
                worker: Some(worker),
                identity,
                reason,
                detail,
            },
            now,
        )
    }

    /// `POST /v1/audit`: `r.worker` carried out an order. A validator's
    /// verdict must be four well-formed hex strings signed by its identity
    /// over [`audit_message`] (`run_id` is the run's id); anything else is
    /// refused and counted. Returns the barrier's answer for the worker
    /// (`None`: wait).
    pub fn audit_report(
        &mut self,
        r: &AuditReport,
        run_id: &str,
        now: Instant,
    ) -> Result<Option<crate::coord::api::Barrier>, CoordError> {
        if let Some(e) = self.barred_worker(r.worker) {
            return Err(e);
        }
        let Some(i) = self.find(r.worker) else {
            self.check_running()?;
            return Err(CoordError::UnknownWorker(r.worker));
        };
        if let Some(s) = self.slots[i].as_mut() {
            s.last_seen = now;
        }
        if r.epoch != self.epoch || r.completed <= self.committed {
            // A stale report: the barrier says what to do now.
            return Ok(self.barrier(r.worker, r.epoch, r.completed, now));
        }
        let Some(open) = self.open_for(r.epoch, r.completed) else {
            return Err(CoordError::Invalid(format!(
                "no audits of step {} are open",
                r.completed
            )));
        };
        let Some(at) = open.list.iter().position(|a| a.id == r.audit) else {
            return Err(CoordError::Invalid(format!(
                "audit {} is not one of step {}'s",
                r.audit, r.completed
            )));
        };
        let a = open.list[at].clone();
        let step = open.step;
        match &r.result {
            AuditResult::Provided => {
                let uploader = a
                    .referee
                    .as_ref()
                    .is_some_and(|x| x.uploaders.contains(&r.worker));
                if a.worker != r.worker && !uploader {
                    return Err(self.refuse_audit(
                        r.worker,
                        "audit_report",
                        format!(
                            "worker {} reports evidence for audit {} of worker {}",
                            r.worker, a.id, a.worker
                        ),
                        now,
                    ));
                }
            }
            AuditResult::Recomputed {
                output,
                gradient,
                input,
                signature,
            } => {
                let Kind::MicroBatch { mb, .. } = &a.kind else {
                    return Err(self.refuse_audit(
                        r.worker,
                        "audit_report",
                        format!(
                            "audit {} is a contribution audit; a micro-batch's hashes answer \
                             nothing",
                            a.id
                        ),
                        now,
                    ));
                };
                let message = audit_message(&AuditClaim {
                    run_id,
                    audit: a.id,
                    step,
                    stage: a.stage,
                    mb: *mb,
                    audited_replica: a.replica,
                    input,
                    output,
                    gradient,
                });
                let verdict = Verdict::Hashes(Hashes {
                    input: input.clone(),
                    output: output.clone(),
                    gradient: gradient.clone(),
                });
                self.take_verdict(
                    r.worker,
                    at,
                    &a,
                    [input, output, gradient],
                    &message,
                    signature,
                    verdict,
                    now,
                )?;
            }
            AuditResult::Contribution {
                recomputed,
                received,
                signature,
            } => {
                if !matches!(a.kind, Kind::Contribution(_)) {
                    return Err(self.refuse_audit(
                        r.worker,
                        "audit_report",
                        format!(
                            "audit {} is a micro-batch audit; a contribution's hashes answer \
                             nothing",
                            a.id
                        ),
                        now,
                    ));
                }
                let message = crate::coord::api::contribution_message(
                    &crate::coord::api::ContributionClaim {
                        run_id,
                        audit: a.id,
                        step,
                        stage: a.stage,
                        audited_replica: a.replica,
                        recomputed,
                        received,
                    },
                );
                let verdict = Verdict::Contribution {
                    recomputed: recomputed.clone(),
                    received: received.clone(),
                };
                self.take_verdict(
                    r.worker,
                    at,
                    &a,
                    [recomputed, received],
                    &message,
                    signature,
                    verdict,
                    now,
                )?;
                self.count_unproven_receipt(r.worker, &a, received, now);
            }
        }
        self.settle_audits(now);
        Ok(self.barrier(r.worker, r.epoch, r.completed, now))
    }

    /// Records `worker`'s verdict on audit `a` (at `at` in the open step's
    /// list) once it is a validator of it, every hash in `hashes` is 64
    /// lowercase hex digits, `signature` is its identity's over `message`
    /// in the audit domain, and it does not contradict a verdict it gave
    /// before; anything else is refused and counted.
    #[allow(clippy::too_many_arguments)]
    fn take_verdict<const N: usize>(
        &mut self,
        worker: u64,
        at: usize,
        a: &Audit,
        hashes: [&String; N],
        message: &[u8],
        signature: &str,
        verdict: Verdict,
        now: Instant,
    ) -> Result<(), CoordError> {
        let Some(k) = a.checks.iter().position(|c| c.worker == worker) else {
            return Err(self.refuse_audit(
                worker,
                "audit_report",
                format!("worker {worker} is not a validator of audit {}", a.id),
                now,
            ));
        };
        if !hashes.iter().all(|h| is_hash(h)) {
            return Err(self.refuse_audit(
                worker,
                "audit_report",
                format!(
                    "the verdict on audit {} has hashes that are not 64 lowercase hex digits",
                    a.id
                ),
                now,
            ));
        }
        let check = &a.checks[k];
        if !crate::identity::verify(
            &check.identity,
            crate::identity::AUDIT_DOMAIN,
            message,
            signature,
        ) {
            return Err(self.refuse_audit(
                worker,
                "signature",
                format!(
                    "the verdict on audit {} is not signed by worker {worker}'s identity",
                    a.id
                ),
                now,
            ));
        }
        match &check.verdict {
            Some(v) if *v != verdict => Err(self.refuse_audit(
                worker,
                "audit_report",
                format!("a second, different verdict on audit {}", a.id),
                now,
            )),
            Some(_) => Ok(()),
            None => {
                if let Some(open) = self.audits.open.as_mut() {
                    open.list[at].checks[k].verdict = Some(verdict);
                }
                Ok(())
            }
        }
    }

    /// Refuses and counts (`unproven_receipt`) a contribution verdict
    /// `worker` just gave on `a` (the audit as it was before) that says it
    /// received a contribution other than the committed one without having
    /// proved it (`PUT /v1/audit/{audit}/receipt`): the verdict rule
    /// strikes that claim (see [`Check::received`]). Counted once.
    fn count_unproven_receipt(&mut self, worker: u64, a: &Audit, received: &str, now: Instant) {
        let (Kind::Contribution(scope), Some(check)) =
            (&a.kind, a.checks.iter().find(|c| c.worker == worker))
        else {
            return;
        };
        if check.verdict.is_some() || check.proves(received, &scope.committed) {
            return;
        }
        let detail = format!(
            "it says it received contribution {} from stage {} replica {} in step {}'s gather, \
             not the committed {}, and showed no frames of it signed by that replica",
            short(received),
            a.stage,
            a.replica,
            self.audits.open.as_ref().map_or(0, |o| o.step),
            short(&scope.committed)
        );
        let _ = self.refuse_audit(worker, "unproven_receipt", detail, now);
    }

    /// `PUT /v1/audit/{audit}/receipt?worker=W&signature=S`: validator
    /// `worker` of contribution audit `audit` proves what the audited
    /// replica sent it in the step's gathers with the frames themselves
    /// (`sync::receipt`; `run_id`: the run's id). [`Coordinator::receipt_job`],
    /// the proof checked, [`Coordinator::receipt_done`], in one call.
    #[cfg(test)]
    pub(crate) fn put_receipt(
        &mut self,
        worker: u64,
        audit: u64,
        bytes: &[u8],
        signature: &str,
        run_id: &crate::link::RunId,
        now: Instant,
    ) -> Result<(), CoordError> {
        let author = self.receipt_job(worker, audit, bytes, signature, run_id, now)?;
        let proven = crate::sync::receipt::verify(bytes, &author, (bytes.len() / 4) as u64);
        self.receipt_done(worker, audit, &author, proven, now)
    }

    /// What checking validator `worker`'s proof of receipt for audit
    /// `audit` needs: refused unless the audit is an open contribution
    /// audit, `worker` one of its validators, and `signature` its identity's
    /// over [`crate::coord::api::receipt_message`] of `bytes` (so nobody
    /// else can put a proof in its name), in the audit domain. Returns the
    /// author the proof must be of; the proof itself is checked outside the
    /// state machine's lock ([`crate::sync::receipt::verify`]).
    pub fn receipt_job(
        &mut self,
        worker: u64,
        audit: u64,
        bytes: &[u8],
        signature: &str,
        run_id: &crate::link::RunId,
        now: Instant,
    ) -> Result<crate::sync::receipt::Author, CoordError> {
        self.check_audit_party(worker)?;
        let (_, a, step) = self.open_audit(audit)?;
        let Some(check) = a.checks.iter().find(|c| c.worker == worker) else {
            return Err(CoordError::Refused(
                "audit",
                format!("worker {worker} is not a validator of audit {audit}"),
            ));
        };
        if !matches!(a.kind, Kind::Contribution(_)) {
            return Err(CoordError::Invalid(format!(
                "audit {audit} is a micro-batch audit: no receipt proves anything in it"
            )));
        }
        let message = crate::coord::api::receipt_message(
            &hex::encode(run_id.0),
            audit,
            worker,
            &hex::encode(blake3::hash(bytes).as_bytes()),
        );
        if !crate::identity::verify(
            &check.identity,
            crate::identity::AUDIT_DOMAIN,
            &message,
            signature,
        ) {
            return Err(self.refuse_audit(
                worker,
                "signature",
                format!(
                    "the receipt for audit {audit} is not signed by worker {worker}'s identity"
                ),
                now,
            ));
        }
        let key = self
            .find(a.worker)
            .and_then(|i| self.slots[i].as_ref())
            .and_then(|s| crate::identity::public_key_from_hex(&s.identity));
        let Some(key) = key else {
            return Err(CoordError::Invalid(format!(
                "audit {audit}'s replica is no longer registered"
            )));
        };
        let epoch = self.audits.open.as_ref().map_or(self.epoch, |o| o.epoch);
        Ok(crate::sync::receipt::Author {
            run_id: crate::link::sign::epoch_run_id(run_id, epoch),
            // The frames carry the step 0-based.
            step: step.saturating_sub(1),
            stage: a.stage as u32,
            replica: a.replica as u32,
            key,
        })
    }

    /// Keeps the hash validator `worker`'s checked proof for audit `audit`
    /// makes (its last one stands), or refuses and counts a proof that
    /// failed (`bad_receipt`) and keeps nothing.
    pub fn receipt_done(
        &mut self,
        worker: u64,
        audit: u64,
        author: &crate::sync::receipt::Author,
        proven: Result<crate::sync::receipt::Proven, String>,
        now: Instant,
    ) -> Result<(), CoordError> {
        let (stage, replica, step) = (author.stage, author.replica, author.step + 1);
        let p = match proven {
            Ok(p) => p,
            Err(e) => {
                return Err(self.refuse_audit(
                    worker,
                    "bad_receipt",
                    format!(
                        "its proof of what stage {stage} replica {replica} sent it in step \
                         {step}'s gather is refused: {e}"
                    ),
                    now,
                ))
            }
        };
        let (at, a, _) = self.open_audit(audit)?;
        let Some(k) = a.checks.iter().position(|c| c.worker == worker) else {
            return Err(CoordError::Invalid(format!("audit {audit} moved on")));
        };
        tracing::info!(
            "audit {audit}: worker {worker} proved receiving contribution {} from stage {stage} \
             replica {replica} ({} frames, {} elements)",
            short(&hex::encode(p.hash)),
            p.frames,
            p.elements
        );
        if let Some(open) = self.audits.open.as_mut() {
            open.list[at].checks[k].receipt = Some(Receipt {
                hash: hex::encode(p.hash),
                frames: p.frames,
            });
        }
        Ok(())
    }

    /// The audit `audit` of the open step, with its index, or why not.
    fn open_audit(&self, audit: u64) -> Result<(usize, &Audit, u64), CoordError> {
        let open = self
            .audits
            .open
            .as_ref()
            .filter(|o| o.epoch == self.epoch)
            .ok_or_else(|| CoordError::Invalid(format!("audit {audit} is not open")))?;
        let at = open
            .list
            .iter()
            .position(|a| a.id == audit && a.outcome.is_none())
            .ok_or_else(|| CoordError::Invalid(format!("audit {audit} is not open")))?;
        Ok((at, &open.list[at], open.step))
    }

    /// `PUT /v1/audit/{audit}/evidence?worker=W`: the audited worker's
    /// payloads for the audited micro-batch, a safetensors file of at most
    /// `max` bytes (for a contribution audit: the set of every micro-batch
    /// of its scope, at most `max` bytes per micro-batch, which must be
    /// exactly the scope's). Kept for the validators only when, for every
    /// micro-batch, `content_hash(input)` equals both the provider's
    /// committed input and the committed output of the upstream shard that
    /// sent it the micro-batch, and `content_hash(gradient)` equals the
    /// committed gradient of the downstream shard; otherwise refused and
    /// counted (`bad_evidence`). The upload is not signed, so a refused one
    /// does not convict by itself: a provider with no matching upload when
    /// the audit's deadline passes is convicted.
    pub fn put_evidence(
        &mut self,
        worker: u64,
        audit: u64,
        bytes: Vec<u8>,
        max: usize,
        now: Instant,
    ) -> Result<(), CoordError> {
        self.check_audit_party(worker)?;
        let (at, a, step) = self.open_audit(audit)?;
        if a.worker != worker {
            return Err(CoordError::Refused(
                "audit",
                format!("worker {worker} is not audit {audit}'s provider"),
            ));
        }
        if a.evidence.is_some() {
            return Ok(());
        }
        let whole_step = a.referee.as_ref().and_then(|r| r.whole_step.as_deref());
        let problem = match (&a.kind, whole_step) {
            (Kind::MicroBatch { .. }, Some(all)) => {
                self.evidence_set_problem(a.stage, step, all, &bytes, max)
            }
            (Kind::MicroBatch { mb, committed }, None) => match Evidence::decode(&bytes, max) {
                Err(e) => Some(e.to_string()),
                Ok(ev) => self.evidence_problem(a.stage, *mb, step, committed, &ev),
            },
            (Kind::Contribution(scope), _) => {
                self.evidence_set_problem(a.stage, step, &scope.micro_batches, &bytes, max)
            }
        };
        match problem {
            None => {
                if let Some(open) = self.audits.open.as_mut() {
                    open.list[at].evidence = Some(Arc::new(bytes));
                }
                self.settle_audits(now);
                Ok(())
            }
            Some(p) => {
                let what = a.what();
                if let Some(open) = self.audits.open.as_mut() {
                    open.list[at].bad_uploads += 1;
                }
                Err(self.refuse_audit(
                    worker,
                    "bad_evidence",
                    format!("evidence of {what} in step {step} (audit {audit}): {p}"),
                    now,
                ))
            }
        }
    }

    /// Why the targets `t` an audited worker kept of micro-batch `mb` of
    /// `step` (1-based) are not the ones its first stage sampled, if they
    /// are not: they must be the ids followed by their origin
    /// (`link::origin`), whose replica is the first-stage replica the route
    /// names for `mb`, whose tokens' hash is the input that replica
    /// committed to, and whose signature verifies under the current epoch's
    /// run id with the key of the identity holding that replica.
    fn targets_problem(&self, route: &Route, mb: u64, step: u64, t: &[u8]) -> Option<String> {
        let Some((ids, origin)) = crate::link::origin::Origin::split(t) else {
            return Some("the targets carry no origin".to_string());
        };
        let Some((j, c)) = self.committed_by(route, 0, mb, step) else {
            return Some(format!(
                "no first-stage commitment of micro-batch {mb} to check the targets' origin \
                 against"
            ));
        };
        let sampler = origin.replica as usize;
        if sampler >= self.layout.replicas || j != self.idx(0, sampler) {
            return Some(format!(
                "the targets' origin names first-stage replica {sampler}, which did not sample \
                 micro-batch {mb}"
            ));
        }
        let tokens = hex::encode(origin.input);
        if c.input != tokens {
            return Some(format!(
                "the targets' origin names tokens hashing to {}, the first stage committed {}",
                short(&tokens),
                short(&c.input)
            ));
        }
        let key = self.slots[j]
            .as_ref()
            .and_then(|s| crate::identity::public_key_from_hex(&s.identity));
        let base = crate::link::RunId(crate::coord::setup::run_id(&self.run));
        let run = crate::link::sign::epoch_run_id(&base, self.epoch);
        let signed = key.is_some_and(|k| origin.verify(&k, &run, step.saturating_sub(1), mb, ids));
        (!signed).then(|| {
            format!(
                "the targets' origin is not first-stage replica {sampler}'s signature over them"
            )
        })
    }

    /// What is wrong with `ev` as the evidence of micro-batch `mb` of
    /// `step` on `stage`, whose shard committed `committed` (`None`: it
    /// matches its own and its neighbours' commitments).
    fn evidence_problem(
        &self,
        stage: usize,
        mb: u64,
        step: u64,
        committed: &Hashes,
        ev: &Evidence,
    ) -> Option<String> {
        let last = stage + 1 == self.layout.stages;
        let hash = |b: &Vec<u8>| hex::encode(crate::link::frame::content_hash(b));
        let route = self.current_route();
        let upstream = (stage > 0)
            .then(|| {
                self.committed_by(&route, stage - 1, mb, step)
                    .map(|(_, c)| c.output.clone())
            })
            .flatten();
        let downstream = (!last)
            .then(|| {
                self.committed_by(&route, stage + 1, mb, step)
                    .map(|(_, c)| c.gradient.clone())
            })
            .flatten();
        match (stage == 0, &ev.input, &ev.targets, &ev.gradient) {
            (true, Some(_), _, _) | (true, _, Some(_), _) => {
                Some("the first stage has no input or targets to provide".to_string())
            }
            (false, None, _, _) => Some("the input is missing".to_string()),
            (false, _, None, _) => Some("the targets are missing".to_string()),
            _ if last && ev.gradient.is_some() => {
                Some("the last stage receives no gradient to provide".to_string())
            }
            (_, _, _, None) if !last => Some("the gradient is missing".to_string()),
            (_, input, _, gradient) => {
                if let Some(b) = input {
                    let h = hash(b);
                    if h != committed.input {
                        return Some(format!(
                            "the input hashes to {}, its commitment says {}",
                            short(&h),
                            short(&committed.input)
                        ));
                    } else if upstream.as_deref() != Some(h.as_str()) {
                        return Some(format!(
                            "the input hashes to {}, the upstream shard committed {}",
                            short(&h),
                            short(upstream.as_deref().unwrap_or("nothing"))
                        ));
                    }
                }
                if let Some(b) = gradient {
                    let h = hash(b);
                    if downstream.as_deref() != Some(h.as_str()) {
                        return Some(format!(
                            "the gradient hashes to {}, the downstream shard committed {}",
                            short(&h),
                            short(downstream.as_deref().unwrap_or("nothing"))
                        ));
                    }
                }
                match &ev.targets {
                    Some(t) if self.audits.target_origins => {
                        self.targets_problem(&route, mb, step, t)
                    }
                    _ => None,
                }
            }
        }
    }

    /// Refuses a worker that is quarantined, or not (or no longer) in the
    /// run, as a party to an audit.
    fn check_audit_party(&self, worker: u64) -> Result<(), CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        if self.find(worker).is_none() {
            self.check_running()?;
            return Err(CoordError::UnknownWorker(worker));
        }
        Ok(())
    }

    /// `GET /v1/audit/{audit}/evidence?worker=W`: the evidence for one of
    /// the audit's validators; `None` while it is not provided.
    pub fn evidence_for(
        &self,
        worker: u64,
        audit: u64,
    ) -> Result<Option<Arc<Vec<u8>>>, CoordError> {
        self.check_audit_party(worker)?;
        let (_, a, _) = self.open_audit(audit)?;
        if !a.checks.iter().any(|c| c.worker == worker) {
            return Err(CoordError::Refused(
                "audit",
                format!("worker {worker} is not a validator of audit {audit}"),
            ));
        }
        Ok(a.evidence.clone())
    }

    /// The quarantined identities for `/status`.
    pub(super) fn quarantined_status(
        &self,
    ) -> Vec<pipewright_spec::coordinator::QuarantinedStatus> {
        self.convictions()
            .into_iter()
            .map(|c| pipewright_spec::coordinator::QuarantinedStatus {
                identity: crate::identity::fingerprint_hex(&c.identity),
                stage: c.stage,
                replica: c.replica,
                step: c.step,
                reason: c.reason,
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "referee_tests.rs"]
mod referee_tests;
