//! Complaints about refused frames, the coordinator's part.
//!
//! A worker that refuses a tensor a neighbour sent it (a NaN or an
//! infinity, an absurd norm; `sync::screen_tensor`) breaks its step off.
//! The step never reaches its barrier, so no audit is drawn for it. The
//! worker therefore shows the coordinator the frame it refused
//! (`POST /v1/complaint`), signed by its author (`link::sign`). An honest
//! worker screens its own tensors with the same bounds before it sends them
//! and breaks its step off instead of sending one that fails
//! (`pipeline::authorship`), so a frame that fails the screen and carries
//! the valid signature of a shard's registered identity is proof that this
//! identity sent what the protocol forbids: the coordinator convicts it
//! (`refused_frame`) through the audits' conviction (quarantine, the
//! ledger, its slot vacated, the step trained again).
//!
//! The coordinator judges the frame itself, not the complainer's word:
//! it decodes the frame (tag with the run key, payload hash), checks that
//! it belongs to an epoch of this run, verifies the author's signature
//! against the identity that holds the shard the frame names, decodes the
//! payload under the signed codec and shape and screens it with the
//! receiver's bounds. A complaint that fails any check is refused and
//! counted (`complaint`); one whose frame passes the screen convicts no
//! one and is counted (`unfounded_complaint`). Neither is held against the
//! complainer beyond the count: the complaint is not signed, so anyone
//! holding the join token could send one in a worker's name.
//!
//! **Gradient ring frames** (`AllReduce`: a partial sum or finished chunk
//! of the ring all-reduce, a gathered contribution under a robust rule)
//! are signed by their author too (`sync::ring`), and an honest replica
//! never sends a value of its own that is not finite. A signed ring frame
//! holding a NaN or an infinity convicts its author the same way
//! (`refused_frame`). Only that screen is applied: the norm test of the
//! gathered contributions needs the other replicas' contributions, which
//! the frame alone does not show, so a ring frame whose values are all
//! finite makes its complaint unfounded.
//!
//! **Rechecks of a broken step.** A frame can pass the screen and still
//! break the step: zeros sent as activations make the receiver's honest
//! backward absurd (RMSNorm of a zero row), so the step breaks off in a
//! gradient ring, where nothing anyone signed fails a check. After a step
//! breaks off every worker reports the signed headers of the frames it
//! took in it and the shards it suspects (`POST /v1/broken`,
//! [`BrokenStep`]): the author of a contribution its ring refused, or,
//! when its own output would have been refused, itself and the authors of
//! its inputs. For each suspect of the first stage whose signed activation
//! headers a receiver reported, the coordinator orders a recheck of each of
//! those micro-batches by two other replicas of the first stage: the next
//! epoch's wiring carries the orders (a new epoch is started for it), and
//! each validator, whose state is rolled back to before the broken step,
//! recomputes the forward from the tokens (no evidence needed) before it
//! links, and signs the hashes of the tokens and of the encoded output
//! (`POST /v1/recheck`, domain `pipewright recheck v1`). Both validators
//! agreeing with each other and not with the author's signed `input_hash`
//! and payload hash convict the author (`failed_recheck`); a validator
//! that agrees with the signed hashes passes the recheck; two validators
//! that disagree with each other leave it unconfirmed. Frames of later
//! stages are not rechecked: recomputing them needs their author's input.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::{CoordError, Coordinator, EventKind};
use crate::coord::complaint_api::{recheck_message, BrokenStep, RecheckOrder, RecheckReport};
use crate::identity::{public_key_from_hex, RECHECK_DOMAIN};
use crate::ledger::Refusal;
use crate::link::codec::TensorWire;
use crate::link::frame::{decode, FrameLimits};
use crate::link::sign::{epoch_run_id, verify_frame, SignedHeader};
use crate::link::{Codec, FrameKind, RejectReason, RunId, RunKey};
use crate::sync::screen_tensor;

/// Most rechecks open at once; a broken step's reports beyond it order
/// none.
const MAX_OPEN_RECHECKS: usize = 256;

/// Most frames and suspects one broken step's report may name.
const MAX_REPORTED: usize = 4096;

/// A validator's recomputed (input, output) hashes.
type Hashes = ([u8; 32], [u8; 32]);

/// A recheck of one signed activation frame of a broken step.
#[derive(Clone, Debug)]
struct Recheck {
    /// Step, 0-based.
    step: u64,
    mb: u64,
    /// The author's replica (stage 0) and identity.
    replica: usize,
    identity: String,
    /// The signed `input_hash` and payload hash.
    input: [u8; 32],
    output: [u8; 32],
    /// The validators' worker ids, and their verdicts as they come.
    validators: Vec<u64>,
    verdicts: BTreeMap<u64, Option<Hashes>>,
    /// Who reported the frame.
    reporter: u64,
}

/// One author's signed activation headers of a broken step, by
/// micro-batch, with the worker that reported each.
type Kept = BTreeMap<u64, (SignedHeader, u64)>;

/// The rechecks' state: what broken steps' reports said and the rechecks
/// ordered.
#[derive(Debug, Default)]
pub(super) struct Rechecks {
    /// By step (0-based): each first-stage author's signed activation
    /// headers, verified, with their reporter.
    frames: BTreeMap<u64, BTreeMap<usize, Kept>>,
    /// By step: the first-stage replicas suspected.
    suspects: BTreeMap<u64, BTreeSet<usize>>,
    /// Open rechecks by id.
    open: BTreeMap<u64, Recheck>,
    /// (step, micro-batch, replica) already rechecked or open.
    seen: BTreeSet<(u64, u64, usize)>,
    next: u64,
    /// Decided rechecks by outcome (`passed`, `failed`, `unconfirmed`).
    outcomes: BTreeMap<&'static str, u64>,
    /// The epoch started for rechecks, in which nobody links (its wiring
    /// says `recheck_only`), and the rechecks it waits for.
    hold: Option<(u64, BTreeSet<u64>)>,
}

/// What a complaint came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComplaintVerdict {
    /// The frame's author, the worker holding (stage, replica), was
    /// convicted (`refused_frame`).
    Convicted {
        /// The author's shard.
        shard: (usize, usize),
        /// Its worker id.
        worker: u64,
    },
    /// The frame is signed by an identity convicted before (another
    /// receiver complained first).
    AlreadyConvicted,
}

impl Coordinator {
    /// The registered public key of every worker holding a shard, for the
    /// wiring: `(stage, replica, key in hex)`.
    pub(super) fn shard_keys(&self) -> Vec<(usize, usize, String)> {
        (0..self.slots.len())
            .filter_map(|i| {
                let slot = self.slots[i].as_ref()?;
                let (s, r) = self.shard_of(i);
                Some((s, r, slot.identity.clone()))
            })
            .collect()
    }

    /// Judges the complaint of `worker`, in `epoch`, about the frame
    /// `body` (as its link received it, encoded with the run key `key`):
    /// see the module's documentation. `run_id` is the run's id (frames
    /// carry the id of their epoch, derived from it).
    pub fn complaint(
        &mut self,
        worker: u64,
        epoch: u64,
        body: &[u8],
        key: &RunKey,
        run_id: &RunId,
        now: Instant,
    ) -> Result<ComplaintVerdict, CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        let Some(i) = self.find(worker) else {
            return Err(CoordError::UnknownWorker(worker));
        };
        let complainer = self.slots[i].as_ref().map(|s| s.identity.clone());
        let refuse = |c: &mut Self, reason: &'static str, detail: String| {
            Err(c.refuse(
                Refusal {
                    worker: Some(worker),
                    identity: complainer.clone(),
                    reason,
                    detail: format!("complaint: {detail}"),
                },
                now,
            ))
        };
        if epoch > self.epoch {
            let detail = format!("epoch {epoch} is ahead of the run's {}", self.epoch);
            return refuse(self, "complaint", detail);
        }
        let limits = FrameLimits {
            max_payload: body.len() as u64,
        };
        let frame = match decode(body, key, &limits) {
            Ok(f) => f,
            Err(e) => return refuse(self, "complaint", format!("the frame does not decode: {e}")),
        };
        let h = &frame.header;
        if h.run_id != epoch_run_id(run_id, epoch) {
            let detail = format!("the frame is not of epoch {epoch} of this run");
            return refuse(self, "complaint", detail);
        }
        if h.kind == FrameKind::Targets {
            return self.targets_complaint(worker, complainer.clone(), epoch, &frame, now);
        }
        let (stage, replica) = (h.stage as usize, h.replica as usize);
        let what = format!(
            "{:?} of stage {stage} replica {replica}, step {} micro-batch {}",
            h.kind,
            h.step + 1,
            h.micro_batch
        );
        let ring = h.kind == FrameKind::AllReduce;
        let wire = match (h.kind, h.codec) {
            (FrameKind::Activation | FrameKind::Gradient, Codec::Lowrank) => {
                TensorWire::lowrank(h.dtype).ok()
            }
            (FrameKind::Activation | FrameKind::Gradient | FrameKind::AllReduce, c) => {
                TensorWire::plain(c).ok().filter(|w| w.dtype == h.dtype)
            }
            _ => None,
        };
        // A ring frame is a vector of f32s; a pipeline tensor a matrix.
        let shape = match (ring, h.shape.dims()) {
            (true, [n]) if h.codec == Codec::F32 => Some((1, *n as usize)),
            (false, [rows, cols]) => Some((*rows as usize, *cols as usize)),
            _ => None,
        };
        let (Some(wire), Some((rows, cols))) = (wire, shape) else {
            let detail = format!("the {what} is not a tensor a receiver screens");
            return refuse(self, "complaint", detail);
        };
        // A signature of an identity convicted before: another receiver's
        // complaint (or an audit) came first.
        let earlier = self
            .convictions()
            .into_iter()
            .any(|c| public_key_from_hex(&c.identity).is_some_and(|k| verify_frame(&frame, &k)));
        if earlier {
            return Ok(ComplaintVerdict::AlreadyConvicted);
        }
        if stage >= self.layout.stages || replica >= self.layout.replicas {
            let detail = format!("the {what} names a shard outside the run");
            return refuse(self, "complaint", detail);
        }
        let author = self.idx(stage, replica);
        let Some(slot) = self.slots[author].as_ref() else {
            let detail = format!("no worker holds the shard of the {what}");
            return refuse(self, "complaint", detail);
        };
        let (author_worker, identity) = (slot.worker, slot.identity.clone());
        let signed = public_key_from_hex(&identity).is_some_and(|k| verify_frame(&frame, &k));
        if !signed && epoch < self.epoch {
            // A shard changes hands only with a new epoch: the author of a
            // frame of an earlier one may have been replaced since.
            return Err(CoordError::Invalid(format!(
                "complaint: the {what} of epoch {epoch} is not signed by the shard's holder of \
                 epoch {}; its author may have left",
                self.epoch
            )));
        }
        if !signed {
            let detail = format!(
                "the {what} is not signed by the identity {} holding that shard",
                crate::identity::fingerprint_hex(&identity)
            );
            return refuse(self, "complaint", detail);
        }
        let values = match wire.decode(&frame.payload, rows, cols) {
            Ok(v) => v,
            Err(e) => {
                return refuse(
                    self,
                    "complaint",
                    format!("the {what} does not decode: {e}"),
                )
            }
        };
        // A ring frame is screened for what its receivers refuse from it
        // alone: a NaN or an infinity.
        let verdict = if ring {
            (!values.iter().all(|v| v.is_finite())).then_some(RejectReason::NonFinite)
        } else {
            screen_tensor(&values)
        };
        let Some(reason) = verdict else {
            let detail = format!("the {what} passes the receivers' screen");
            return refuse(self, "unfounded_complaint", detail);
        };
        let detail = format!(
            "signed a {what} that every receiver refuses ({}), reported by worker {worker}",
            reason.name()
        );
        let evidence = serde_json::json!({
            "kind": format!("{:?}", h.kind),
            "step": h.step + 1,
            "mb": h.micro_batch,
            "screen": reason.name(),
            "payload_hash": hex::encode(frame.content_hash()),
            "input_hash": hex::encode(h.input_hash),
            "signature": hex::encode(h.signature),
            "complainer": worker,
        })
        .to_string();
        self.convict(author, h.step + 1, "refused_frame", detail, evidence, now);
        Ok(ComplaintVerdict::Convicted {
            shard: (stage, replica),
            worker: author_worker,
        })
    }
}

impl Coordinator {
    /// Rechecks decided so far, by outcome: `passed`, `failed`,
    /// `unconfirmed`.
    pub fn recheck_outcomes(&self) -> &BTreeMap<&'static str, u64> {
        &self.rechecks.outcomes
    }

    /// Rechecks open now.
    pub fn open_rechecks(&self) -> usize {
        self.rechecks.open.len()
    }

    /// The recheck orders of `worker` (for its wiring).
    pub(super) fn recheck_orders(&self, worker: u64) -> Vec<RecheckOrder> {
        self.rechecks
            .open
            .iter()
            .filter(|(_, r)| r.validators.contains(&worker) && !r.verdicts.contains_key(&worker))
            .map(|(&id, r)| RecheckOrder {
                recheck: id,
                step: r.step,
                stage: 0,
                mb: r.mb,
                replica: r.replica,
            })
            .collect()
    }

    /// Takes the report of a worker whose step broke off ([`BrokenStep`]):
    /// keeps the signed activation headers of first-stage authors whose
    /// signature verifies against the identity holding that shard, and the
    /// first-stage suspects; then orders the rechecks they call for. A
    /// header that does not parse, is not of this run's epoch and the
    /// report's step, or whose signature does not verify refuses the
    /// report (`complaint`), keeping nothing of it.
    pub fn broken_step(
        &mut self,
        b: &BrokenStep,
        run_id: &RunId,
        now: Instant,
    ) -> Result<usize, CoordError> {
        if let Some(e) = self.barred_worker(b.worker) {
            return Err(e);
        }
        let Some(i) = self.find(b.worker) else {
            return Err(CoordError::UnknownWorker(b.worker));
        };
        let complainer = self.slots[i].as_ref().map(|s| s.identity.clone());
        let refuse = |c: &mut Self, detail: String| {
            Err(c.refuse(
                Refusal {
                    worker: Some(b.worker),
                    identity: complainer.clone(),
                    reason: "complaint",
                    detail: format!("broken step report: {detail}"),
                },
                now,
            ))
        };
        if b.epoch > self.epoch {
            let detail = format!("epoch {} is ahead of the run's {}", b.epoch, self.epoch);
            return refuse(self, detail);
        }
        if b.frames.len() + b.suspects.len() > MAX_REPORTED {
            return refuse(
                self,
                format!("more than {MAX_REPORTED} frames and suspects"),
            );
        }
        if b.step < self.committed {
            // A step committed since: nothing of it is rechecked.
            return Ok(0);
        }
        let epoch_id = epoch_run_id(run_id, b.epoch);
        let mut kept = Vec::new();
        for f in &b.frames {
            let (h, _) = match f.parse() {
                Ok(p) => p,
                Err(e) => return refuse(self, format!("a frame header: {e}")),
            };
            if h.run_id != epoch_id || h.step != b.step {
                let detail = format!(
                    "a frame header is not of epoch {} step {} of this run",
                    b.epoch,
                    b.step + 1
                );
                return refuse(self, detail);
            }
            let (stage, replica) = (h.stage as usize, h.replica as usize);
            if stage >= self.layout.stages || replica >= self.layout.replicas {
                return refuse(self, "a frame header names a shard outside the run".into());
            }
            let holder = self.slots[self.idx(stage, replica)]
                .as_ref()
                .map(|s| s.identity.clone());
            let signed = holder
                .as_deref()
                .and_then(public_key_from_hex)
                .is_some_and(|k| f.verify(&k));
            if !signed {
                // A shard changes hands only with a new epoch: in a report
                // of an earlier one, or for a shard nobody holds now, the
                // author may have been replaced since, and its frames are
                // no longer anyone's to recheck.
                if holder.is_none() || b.epoch < self.epoch {
                    continue;
                }
                let detail = format!(
                    "the header of the {:?} of stage {stage} replica {replica}, micro-batch {}, \
                     is not signed by the identity holding that shard",
                    h.kind, h.micro_batch
                );
                return refuse(self, detail);
            }
            if stage == 0 && h.kind == FrameKind::Activation {
                kept.push((replica, h.micro_batch, f.clone()));
            }
        }
        let step = b.step;
        for (replica, mb, f) in kept {
            self.rechecks
                .frames
                .entry(step)
                .or_default()
                .entry(replica)
                .or_default()
                .entry(mb)
                .or_insert((f, b.worker));
        }
        for &(stage, replica) in &b.suspects {
            if stage == 0 && replica < self.layout.replicas {
                self.rechecks
                    .suspects
                    .entry(step)
                    .or_default()
                    .insert(replica);
            }
        }
        Ok(self.order_rechecks(now))
    }

    /// Orders a recheck of every kept signed activation of a suspect not
    /// rechecked yet, with two other training replicas of the first stage
    /// as validators; starts a new epoch (whose wiring carries the orders)
    /// when it ordered any. Returns how many it ordered.
    fn order_rechecks(&mut self, now: Instant) -> usize {
        let committed = self.committed;
        self.rechecks.frames.retain(|&s, _| s >= committed);
        self.rechecks.suspects.retain(|&s, _| s >= committed);
        // A recheck whose validator left can no longer be decided.
        let before = self.rechecks.open.len();
        let seated: BTreeSet<u64> = self.slots.iter().flatten().map(|s| s.worker).collect();
        self.rechecks
            .open
            .retain(|_, r| r.validators.iter().all(|v| seated.contains(v)));
        let dropped = (before - self.rechecks.open.len()) as u64;
        if dropped > 0 {
            *self.rechecks.outcomes.entry("unconfirmed").or_default() += dropped;
            self.release_hold(now);
        }
        let mut wanted = Vec::new();
        for (&step, suspects) in &self.rechecks.suspects {
            for &replica in suspects {
                let Some(frames) = self
                    .rechecks
                    .frames
                    .get(&step)
                    .and_then(|f| f.get(&replica))
                else {
                    continue;
                };
                for (&mb, (f, reporter)) in frames {
                    if !self.rechecks.seen.contains(&(step, mb, replica)) {
                        wanted.push((step, mb, replica, f.clone(), *reporter));
                    }
                }
            }
        }
        let mut ordered = 0;
        for (step, mb, replica, f, reporter) in wanted {
            if self.rechecks.open.len() >= MAX_OPEN_RECHECKS {
                break;
            }
            let author = self.idx(0, replica);
            let Some(identity) = self.slots[author].as_ref().map(|s| s.identity.clone()) else {
                continue;
            };
            let validators: Vec<u64> = (0..self.layout.replicas)
                .filter(|&r| r != replica)
                .map(|r| self.idx(0, r))
                .filter(|&j| self.in_plan(j))
                .filter_map(|j| self.slots[j].as_ref().map(|s| s.worker))
                .take(2)
                .collect();
            self.rechecks.seen.insert((step, mb, replica));
            if validators.len() < 2 {
                *self.rechecks.outcomes.entry("unconfirmed").or_default() += 1;
                continue;
            }
            let Ok((h, hash)) = f.parse() else {
                continue;
            };
            let id = self.rechecks.next;
            self.rechecks.next += 1;
            self.rechecks.open.insert(
                id,
                Recheck {
                    step,
                    mb,
                    replica,
                    identity,
                    input: h.input_hash,
                    output: hash,
                    validators,
                    verdicts: BTreeMap::new(),
                    reporter,
                },
            );
            ordered += 1;
        }
        if ordered > 0 {
            self.history.event(
                EventKind::Audit,
                format!("{ordered} recheck(s) of a broken step ordered"),
                now,
            );
            self.break_off(now);
            let waiting: BTreeSet<u64> = self.rechecks.open.keys().copied().collect();
            self.rechecks.hold = Some((self.epoch, waiting));
        }
        ordered
    }

    /// Takes a validator's verdict on a recheck ([`RecheckReport`]) and
    /// decides the recheck once both validators have reported. A report
    /// from a worker that is not a validator of an open recheck, with
    /// hashes that are not 64 hex digits or a signature that does not
    /// verify against its identity is refused (`audit_report` resp.
    /// `signature`).
    pub fn recheck_report(
        &mut self,
        r: &RecheckReport,
        run_hex: &str,
        now: Instant,
    ) -> Result<(), CoordError> {
        if let Some(e) = self.barred_worker(r.worker) {
            return Err(e);
        }
        let Some(i) = self.find(r.worker) else {
            return Err(CoordError::UnknownWorker(r.worker));
        };
        let identity = self.slots[i].as_ref().map(|s| s.identity.clone());
        let refusal = |reason: &'static str, detail: String| Refusal {
            worker: Some(r.worker),
            identity: identity.clone(),
            reason,
            detail: format!("recheck {}: {detail}", r.recheck),
        };
        let Some(rc) = self
            .rechecks
            .open
            .get(&r.recheck)
            .filter(|rc| rc.validators.contains(&r.worker))
        else {
            let detail = "not an open recheck of this validator".to_string();
            return Err(self.refuse(refusal("audit_report", detail), now));
        };
        let order = RecheckOrder {
            recheck: r.recheck,
            step: rc.step,
            stage: 0,
            mb: rc.mb,
            replica: rc.replica,
        };
        let (mut input, mut output) = ([0u8; 32], [0u8; 32]);
        let could_not = r.error.is_some() && r.input.is_empty() && r.output.is_empty();
        if !could_not
            && (r.error.is_some()
                || hex::decode_to_slice(&r.input, &mut input).is_err()
                || hex::decode_to_slice(&r.output, &mut output).is_err())
        {
            let detail = "hashes are not 64 hex digits".to_string();
            return Err(self.refuse(refusal("audit_report", detail), now));
        }
        let message = recheck_message(run_hex, &order, &r.input, &r.output);
        let signed = identity
            .as_deref()
            .is_some_and(|k| crate::identity::verify(k, RECHECK_DOMAIN, &message, &r.signature));
        if !signed {
            let detail = "the signature does not verify".to_string();
            return Err(self.refuse(refusal("signature", detail), now));
        }
        let Some(rc) = self.rechecks.open.get_mut(&r.recheck) else {
            return Ok(());
        };
        let verdict = (!could_not).then_some((input, output));
        if could_not {
            tracing::warn!(
                "worker {} could not carry out recheck {}: {}",
                r.worker,
                r.recheck,
                r.error.as_deref().unwrap_or_default()
            );
        }
        rc.verdicts.entry(r.worker).or_insert(verdict);
        if rc.verdicts.len() == rc.validators.len() {
            if let Some(rc) = self.rechecks.open.remove(&r.recheck) {
                self.decide_recheck(r.recheck, rc, now);
            }
        }
        self.release_hold(now);
        Ok(())
    }

    /// Whether `epoch` was started for rechecks: its wiring tells every
    /// worker to carry out its orders and not to link.
    pub(super) fn recheck_only(&self, epoch: u64) -> bool {
        self.rechecks
            .hold
            .as_ref()
            .is_some_and(|(e, _)| *e == epoch)
    }

    /// Once every recheck an epoch was started for is decided (or
    /// dropped), starts the next epoch, in which the run trains again; a
    /// conviction may have started one already.
    fn release_hold(&mut self, now: Instant) {
        let Some((epoch, ids)) = &self.rechecks.hold else {
            return;
        };
        if ids.iter().any(|id| self.rechecks.open.contains_key(id)) {
            return;
        }
        let current = *epoch == self.epoch;
        self.rechecks.hold = None;
        if current {
            self.break_off(now);
        }
    }

    /// Decides a recheck whose validators have all reported.
    fn decide_recheck(&mut self, id: u64, rc: Recheck, now: Instant) {
        let signed = (rc.input, rc.output);
        let all: Vec<Option<Hashes>> = rc.verdicts.values().copied().collect();
        let verdicts: Vec<Hashes> = all.iter().flatten().copied().collect();
        let agree = verdicts.len() == all.len() && verdicts.windows(2).all(|w| w[0] == w[1]);
        let what = format!(
            "stage 0 replica {}'s activation of micro-batch {} of step {}",
            rc.replica,
            rc.mb,
            rc.step + 1
        );
        let outcome = if verdicts.contains(&signed) {
            "passed"
        } else if agree && verdicts.len() >= 2 {
            "failed"
        } else {
            "unconfirmed"
        };
        *self.rechecks.outcomes.entry(outcome).or_default() += 1;
        let short = |h: &[u8; 32]| hex::encode(&h[..8]);
        match outcome {
            "failed" => {
                let (vi, vo) = verdicts[0];
                let detail = format!(
                    "{what} does not reproduce: it signed input {}, output {}; validators {:?} \
                     both recomputed input {}, output {} (recheck {id}, reported by worker {})",
                    short(&signed.0),
                    short(&signed.1),
                    rc.validators,
                    short(&vi),
                    short(&vo),
                    rc.reporter
                );
                let evidence = serde_json::json!({
                    "recheck": id,
                    "step": rc.step + 1,
                    "mb": rc.mb,
                    "signed": {"input": hex::encode(signed.0), "output": hex::encode(signed.1)},
                    "recomputed": {"input": hex::encode(vi), "output": hex::encode(vo)},
                    "validators": rc.validators,
                })
                .to_string();
                let author = self.idx(0, rc.replica);
                let holds = self.slots[author]
                    .as_ref()
                    .is_some_and(|s| s.identity == rc.identity);
                if holds {
                    self.convict(author, rc.step + 1, "failed_recheck", detail, evidence, now);
                } else {
                    self.history.event(
                        EventKind::Audit,
                        format!("{detail}; its author no longer holds the shard"),
                        now,
                    );
                }
            }
            "unconfirmed" => self.history.event(
                EventKind::Audit,
                format!("recheck {id} of {what} unconfirmed: the validators disagree"),
                now,
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "complaint_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "ring_complaint_tests.rs"]
mod ring_tests;
