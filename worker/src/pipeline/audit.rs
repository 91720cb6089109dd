//! Audits by recomputation, a worker's part: what it keeps of each
//! micro-batch of its current step (the payloads it received, as they
//! arrived), that evidence as a safetensors file (one micro-batch's, or a
//! set of them), and the recomputation of another replica of its stage's
//! work with the weights of before the step: of one micro-batch, giving the
//! hashes that replica should have committed, or of its whole step, giving
//! the hash of the gradient contribution it should have sent to a robust
//! aggregation.
//!
//! The recomputation borrows the stage: it swaps the stage's parameter
//! buffers with the snapshot's (no copy), runs the forwards and backwards
//! it recomputes, and swaps them back; the in-flight caches it made are
//! dropped and the gradients it accumulated are zeroed again, as they were
//! after the step. Weights, moments, the step's hashes, its evidence and
//! its view of the replicas' contributions stay as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use pipewright_spec::Aggregation;

use super::{MicroBatchHashes, PipelineError, StageState, StageWorker};
use crate::data::sample_train;
use crate::link::frame::content_hash;
use crate::model::{StageInput, StageOutput};
use crate::schedule::Op;

/// The tensor names of an evidence file, in the order they are written.
const NAMES: [&str; 3] = ["input", "targets", "gradient"];

/// The metadata key of a set file (several micro-batches' evidence in
/// one) listing every micro-batch it holds, in decimal, ascending, comma
/// separated: a micro-batch whose stage keeps no payload (one stage that
/// is both first and last) has no tensor to name it.
const SET_KEY: &str = "micro_batches";

/// What a worker received for one micro-batch of its current step: the
/// payloads of the forward input activation and of the targets (not on the
/// first stage, which reads the corpus) and of the activation gradient
/// (not on the last stage), byte for byte as they arrived. Their BLAKE3
/// hashes are the ones the worker committed to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The input activation's payload.
    pub input: Option<Vec<u8>>,
    /// The targets' payload (little-endian u32 token ids).
    pub targets: Option<Vec<u8>>,
    /// The activation gradient's payload.
    pub gradient: Option<Vec<u8>>,
}

impl Evidence {
    fn parts(&self) -> [(&'static str, Option<&Vec<u8>>); 3] {
        [
            (NAMES[0], self.input.as_ref()),
            (NAMES[1], self.targets.as_ref()),
            (NAMES[2], self.gradient.as_ref()),
        ]
    }

    /// Bytes held, over every payload.
    pub fn len(&self) -> usize {
        self.parts().iter().filter_map(|p| p.1).map(Vec::len).sum()
    }

    /// Whether it holds no payload.
    pub fn is_empty(&self) -> bool {
        self.parts().iter().all(|p| p.1.is_none())
    }

    /// As a safetensors file: one 1-D `U8` tensor per payload held,
    /// named `input`, `targets`, `gradient`.
    pub fn encode(&self) -> Result<Vec<u8>, PipelineError> {
        let views = self
            .parts()
            .into_iter()
            .filter_map(|(name, bytes)| bytes.map(|b| (name, b)))
            .map(|(name, b)| {
                TensorView::new(Dtype::U8, vec![b.len()], b)
                    .map(|v| (name.to_string(), v))
                    .map_err(|e| PipelineError::Audit(format!("evidence tensor {name}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, None::<HashMap<String, String>>)
            .map_err(|e| PipelineError::Audit(format!("encoding the evidence: {e}")))
    }

    /// Reads [`Evidence::encode`]'s bytes (from a peer, through the
    /// coordinator): refused when it is not a safetensors file, holds a
    /// tensor of another name, type or rank, or more than `max` bytes.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Evidence, PipelineError> {
        let bad = |m: String| PipelineError::Audit(format!("malformed evidence: {m}"));
        if bytes.len() > max {
            return Err(bad(format!("{} bytes, more than {max}", bytes.len())));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut out = Evidence::default();
        for (name, t) in st.tensors() {
            if t.dtype() != Dtype::U8 || t.shape() != [t.data().len()] {
                return Err(bad(format!(
                    "tensor {name} is {:?} {:?}, expected a 1-D U8 tensor",
                    t.dtype(),
                    t.shape()
                )));
            }
            let slot = match name.as_str() {
                "input" => &mut out.input,
                "targets" => &mut out.targets,
                "gradient" => &mut out.gradient,
                other => return Err(bad(format!("unexpected tensor {other:?}"))),
            };
            *slot = Some(t.data().to_vec());
        }
        Ok(out)
    }
}

impl Evidence {
    /// Several micro-batches' evidence as one safetensors file (a
    /// contribution audit's upload): each payload a 1-D `U8` tensor named
    /// `"{mb}.input"`, `"{mb}.targets"` or `"{mb}.gradient"` (`mb` in
    /// decimal), and the metadata entry `micro_batches` listing every
    /// micro-batch of the set, payloads or not.
    pub fn encode_set(set: &BTreeMap<u64, Evidence>) -> Result<Vec<u8>, PipelineError> {
        let mut views = Vec::new();
        for (mb, e) in set {
            for (name, bytes) in e.parts() {
                let Some(b) = bytes else { continue };
                let name = format!("{mb}.{name}");
                let view = TensorView::new(Dtype::U8, vec![b.len()], b)
                    .map_err(|e| PipelineError::Audit(format!("evidence tensor {name}: {e}")))?;
                views.push((name, view));
            }
        }
        let list = set.keys().map(u64::to_string).collect::<Vec<_>>().join(",");
        let meta = HashMap::from([(SET_KEY.to_string(), list)]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| PipelineError::Audit(format!("encoding the evidence set: {e}")))
    }

    /// Reads [`Evidence::encode_set`]'s bytes (from a peer, through the
    /// coordinator): refused when it is not a safetensors file, is longer
    /// than `max` bytes, holds a tensor whose name is not
    /// `<micro-batch>.<input|targets|gradient>` (the micro-batch in
    /// canonical decimal) or that is not a 1-D `U8` tensor, or names a
    /// micro-batch its `micro_batches` list lacks. Every listed micro-batch
    /// has an entry (empty where it holds no payload); without the list,
    /// the micro-batches are those the tensors name.
    pub fn decode_set(bytes: &[u8], max: usize) -> Result<BTreeMap<u64, Evidence>, PipelineError> {
        let bad = |m: String| PipelineError::Audit(format!("malformed evidence set: {m}"));
        if bytes.len() > max {
            return Err(bad(format!("{} bytes, more than {max}", bytes.len())));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let mut out = BTreeMap::new();
        let listed = match header.metadata().as_ref().and_then(|m| m.get(SET_KEY)) {
            Some(list) => {
                let mut last = None;
                for item in list.split(',').filter(|_| !list.is_empty()) {
                    let mb = parse_mb(item).ok_or_else(|| {
                        bad(format!("{SET_KEY} lists {item:?}, not a micro-batch"))
                    })?;
                    if last.is_some_and(|l| l >= mb) {
                        return Err(bad(format!("{SET_KEY} is not strictly ascending at {mb}")));
                    }
                    last = Some(mb);
                    out.insert(mb, Evidence::default());
                }
                true
            }
            None => false,
        };
        for (name, t) in st.tensors() {
            let (mb, part) = name
                .split_once('.')
                .and_then(|(mb, part)| Some((parse_mb(mb)?, part)))
                .ok_or_else(|| {
                    bad(format!(
                        "unexpected tensor {name:?}, expected <micro-batch>.<input|targets|gradient>"
                    ))
                })?;
            if t.dtype() != Dtype::U8 || t.shape() != [t.data().len()] {
                return Err(bad(format!(
                    "tensor {name} is {:?} {:?}, expected a 1-D U8 tensor",
                    t.dtype(),
                    t.shape()
                )));
            }
            if listed && !out.contains_key(&mb) {
                return Err(bad(format!(
                    "tensor {name} is of micro-batch {mb}, which {SET_KEY} does not list"
                )));
            }
            let e = out.entry(mb).or_default();
            let slot = match part {
                "input" => &mut e.input,
                "targets" => &mut e.targets,
                "gradient" => &mut e.gradient,
                _ => {
                    return Err(bad(format!(
                    "unexpected tensor {name:?}, expected <micro-batch>.<input|targets|gradient>"
                )))
                }
            };
            *slot = Some(t.data().to_vec());
        }
        Ok(out)
    }
}

/// A micro-batch index in canonical decimal (no sign, no leading zero).
fn parse_mb(s: &str) -> Option<u64> {
    let mb = s.parse::<u64>().ok()?;
    (mb.to_string() == s).then_some(mb)
}

impl StageWorker {
    /// Keep, from the next step on, what each micro-batch of the current
    /// step receives (for audits; `spec.validation.auditRate` above 0).
    /// Dropped when the next step starts.
    pub fn set_retain(&mut self, on: bool) {
        self.retain = on;
        if !on {
            self.evidence.clear();
        }
    }

    /// The most bytes an evidence file of this stage can hold: its input
    /// activation, targets and activation gradient under the run's codec,
    /// plus room for the file's header.
    pub fn evidence_limit(&self) -> usize {
        let rows = self.rows * self.model.seq_len;
        let width = |w: usize| self.codec.encoded_len(rows, w).unwrap_or(rows * w * 4);
        width(self.stage.boundary_width_in())
            + rows * 4
            + width(self.stage.boundary_width_out())
            + (64 << 10)
    }

    /// What micro-batch `mb` of the last step received, when it ran here
    /// and retention is on.
    pub fn evidence(&self, mb: u64) -> Option<&Evidence> {
        self.evidence.get(&mb)
    }

    /// Recomputes micro-batch `mb` of step `step` (0-based; this worker's
    /// last completed step) as another replica of this stage ran it: the
    /// forward from `evidence`'s input (the first stage samples its tokens
    /// from the corpus, as [`StageWorker::train_step`] does) with the weights
    /// of `before` (the snapshot of the state before that step) and the
    /// step's loss scale, then the input half of the backward from the
    /// evidence's gradient (the last stage: from the loss and the
    /// evidence's targets). Returns the hashes a worker that sent what it
    /// computed commits to: of the input, of the output as the run's codec
    /// encodes it (the last stage: of the loss's bytes) and of the input
    /// gradient as encoded (zeros on the first stage).
    ///
    /// `before`'s buffers are swapped in and out, not copied; it is left as
    /// it was. Nothing of this worker's own state changes.
    pub fn recompute(
        &mut self,
        before: &mut StageState,
        step: u64,
        mb: u64,
        evidence: &Evidence,
    ) -> Result<MicroBatchHashes, PipelineError> {
        self.check_recomputable(before, step)?;
        let all = (self.replicas * self.micro_batches) as u64;
        if mb >= all {
            return Err(PipelineError::Audit(format!(
                "micro-batch {mb} is outside the step's {all}"
            )));
        }
        self.with_weights_of(before, |w| {
            let (input, out) = w.replay_forward(step, mb, evidence)?;
            let output = w.output_hash(&out)?;
            let dx = w.replay_backward_input(mb, evidence)?;
            Ok(MicroBatchHashes {
                input,
                output,
                gradient: w.gradient_hash(dx.as_deref())?,
            })
        })
    }

    /// The hash of a recomputed micro-batch's output, as
    /// [`MicroBatchHashes::output`] holds it: of the loss's bytes on the
    /// last stage, of the encoded activations elsewhere.
    fn output_hash(&self, out: &StageOutput) -> Result<[u8; 32], PipelineError> {
        Ok(match out {
            StageOutput::Loss(l) => content_hash(&l.to_le_bytes()),
            StageOutput::Hidden(h) => content_hash(&self.codec.encode(
                h,
                self.hidden_rows(),
                self.stage.boundary_width_out(),
            )?),
        })
    }

    /// The hash of a recomputed micro-batch's input gradient, as
    /// [`MicroBatchHashes::gradient`] holds it (zeros on the first stage,
    /// which sends none).
    fn gradient_hash(&self, dx: Option<&[f32]>) -> Result<[u8; 32], PipelineError> {
        Ok(match dx {
            Some(dx) if !self.is_first() => content_hash(&self.codec.encode(
                dx,
                self.hidden_rows(),
                self.stage.boundary_width_in(),
            )?),
            _ => [0; 32],
        })
    }

    /// Recomputes the contribution replica `audited_replica` of this stage
    /// made to step `step`'s robust aggregation (0-based; this worker's last
    /// completed step) and returns its hash, as
    /// [`crate::sync::contribution::contribution_hash`] gives it: what that
    /// replica committed to ([`crate::sync::ContributionReport::sent`]) if
    /// it sent what it computed.
    ///
    /// With the weights of `before` (the snapshot of the state before the
    /// step) and the step's loss scale, it runs every operation the replica's
    /// schedule gives it ([`StageWorker::order_for`]) on `micro_batches`
    /// (the replica's committed micro-batches; each must be one it runs),
    /// in that order: each forward from the micro-batch's evidence (the first
    /// stage samples its tokens from the corpus, as
    /// [`StageWorker::train_step`] does), each input half of the backward
    /// from the evidence's gradient (the last stage: from the loss and the
    /// evidence's targets) and each weight half, accumulating the weight
    /// gradients as the step does. Their hash, group by group of
    /// parameters, then on the last stage the sum of the micro-batches'
    /// losses, is the contribution's.
    ///
    /// `evidence` must hold exactly the micro-batches of `micro_batches`.
    /// Refused under `aggregation: mean` (the ring mixes contributions;
    /// none is gathered whole). `before`'s buffers are swapped in and out,
    /// not copied; it is left as it was. Nothing of this worker's own state
    /// changes: weights, moments, gradients (zero after a step, zero
    /// again), in-flight caches, the step's hashes, its evidence and its
    /// [`StageWorker::contributions`].
    pub fn recompute_contribution(
        &mut self,
        before: &mut StageState,
        step: u64,
        audited_replica: usize,
        micro_batches: &[u64],
        evidence: &BTreeMap<u64, Evidence>,
    ) -> Result<[u8; 32], PipelineError> {
        if self.aggregation == Aggregation::Mean {
            return Err(PipelineError::Audit(
                "under aggregation: mean no replica's contribution is gathered whole".into(),
            ));
        }
        if audited_replica >= self.replicas {
            return Err(PipelineError::Audit(format!(
                "replica {audited_replica} is outside the stage's {}",
                self.replicas
            )));
        }
        self.check_recomputable(before, step)?;
        let ops = self.ops_of(step, audited_replica, micro_batches, evidence)?;
        self.with_weights_of(before, |w| {
            let (loss_sum, _) = w.run_ops(step, ops, evidence, None)?;
            Ok(w.contribution_hash(loss_sum))
        })
    }

    /// The weight gradients replica `replica`, its stage's one training
    /// replica, accumulates over step `step` (0-based) from `evidence`
    /// (every micro-batch it ran) with the weights of `before`, on a worker
    /// that did not train (the coordinator's): every operation of the
    /// step's schedule, as
    /// [`StageWorker::recompute_contribution`] runs them, at loss scale
    /// `scale`. Every parameter's gradient, in the stage's order, before
    /// the tied matrices' exchange, the clip and the update; and from the
    /// same pass the hashes of micro-batch `audited` (one of
    /// `micro_batches`), which [`StageWorker::recompute_detached`] gives
    /// alone: its forward and the input half of its backward are the
    /// same operations on the same weights, whatever the gradients
    /// accumulated around them.
    #[allow(clippy::too_many_arguments)]
    pub fn recompute_step_detached(
        &mut self,
        before: &mut StageState,
        step: u64,
        replica: usize,
        micro_batches: &[u64],
        evidence: &BTreeMap<u64, Evidence>,
        scale: f32,
        audited: u64,
    ) -> Result<(MicroBatchHashes, Vec<Vec<f32>>), PipelineError> {
        self.detach_at(before, step, scale);
        self.check_recomputable(before, step)?;
        if !micro_batches.contains(&audited) {
            return Err(PipelineError::Audit(format!(
                "micro-batch {audited} is not one of the step's recomputed ones"
            )));
        }
        let ops = self.ops_of(step, replica, micro_batches, evidence)?;
        self.with_weights_of(before, |w| {
            let (_, hashes) = w.run_ops(step, ops, evidence, Some(audited))?;
            let hashes = hashes.ok_or_else(|| {
                PipelineError::Audit(format!("the step's order never ran micro-batch {audited}"))
            })?;
            Ok((
                hashes,
                w.stage.params().iter().map(|p| p.grad.clone()).collect(),
            ))
        })
    }

    /// Why `applied` (a step's applied gradient, as an update upload
    /// carries it) is not `recomputed` (the one its micro-batches give,
    /// [`StageWorker::recompute_step_detached`]), bit for bit: the
    /// first parameter that differs (`None`: none does). The tied
    /// embedding and head matrices are left out: their gradients hold the
    /// other tied stage's too, which no evidence carries.
    pub fn applied_mismatch(
        &self,
        recomputed: &[Vec<f32>],
        applied: &[Vec<f32>],
    ) -> Option<String> {
        let params = self.stage.params();
        if recomputed.len() != applied.len() || applied.len() != params.len() {
            return Some(format!(
                "it holds {} parameters' gradients, the stage has {}",
                applied.len(),
                params.len()
            ));
        }
        let tied = self.stage.tied_indices();
        params
            .iter()
            .enumerate()
            .filter(|(i, _)| !tied.contains(i))
            .find_map(|(i, p)| {
                let (r, a) = (&recomputed[i], &applied[i]);
                // The first element that differs, or where the shorter ends.
                let at = r
                    .iter()
                    .zip(a)
                    .position(|(x, y)| x.to_bits() != y.to_bits())
                    .or((r.len() != a.len()).then(|| r.len().min(a.len())))?;
                Some(format!(
                    "the gradient it applied to {} is not the one its micro-batches give \
                         (element {at}: {} applied, {} recomputed)",
                    p.name,
                    a.get(at).copied().unwrap_or(f32::NAN),
                    r.get(at).copied().unwrap_or(f32::NAN)
                ))
            })
    }

    /// The operations replica `replica`'s schedule gives it in step `step`
    /// on `micro_batches` (each one it runs, none twice), in order, once
    /// `evidence` holds exactly those micro-batches.
    fn ops_of(
        &self,
        step: u64,
        replica: usize,
        micro_batches: &[u64],
        evidence: &BTreeMap<u64, Evidence>,
    ) -> Result<Vec<Op>, PipelineError> {
        let order = self.order_for(replica);
        let runs: BTreeSet<u64> = order
            .iter()
            .filter(|op| matches!(op, Op::Forward { .. }))
            .map(|op| u64::from(op.micro_batch()))
            .collect();
        let mut scope = BTreeSet::new();
        for &mb in micro_batches {
            if !scope.insert(mb) {
                return Err(PipelineError::Audit(format!(
                    "micro-batch {mb} is listed twice"
                )));
            }
            if !runs.contains(&mb) {
                return Err(PipelineError::Audit(format!(
                    "replica {replica} of stage {} runs no micro-batch {mb} in step {}",
                    self.shard.stage,
                    step + 1
                )));
            }
        }
        if let Some(mb) = scope
            .symmetric_difference(&evidence.keys().copied().collect())
            .next()
        {
            return Err(PipelineError::Audit(format!(
                "the evidence's micro-batches are not the audited ones (micro-batch {mb})"
            )));
        }
        Ok(order
            .into_iter()
            .filter(|op| scope.contains(&u64::from(op.micro_batch())))
            .collect())
    }

    /// Runs `ops` of step `step` from `evidence` with the weights in place,
    /// accumulating the weight gradients from zero as the step does.
    /// Returns the sum of the micro-batches' losses (0 but on the last
    /// stage) and, for micro-batch `watch`, its hashes as
    /// [`StageWorker::recompute`] gives them (`None` where `ops` runs no
    /// forward and input backward of it).
    fn run_ops(
        &mut self,
        step: u64,
        ops: Vec<Op>,
        evidence: &BTreeMap<u64, Evidence>,
        watch: Option<u64>,
    ) -> Result<(f64, Option<MicroBatchHashes>), PipelineError> {
        // The step left every gradient at zero; the recomputation
        // accumulates from there.
        self.stage.zero_grad();
        let mut loss_sum = 0f64;
        let (mut seen, mut hashes) = (None, None);
        for op in ops {
            let mb = u64::from(op.micro_batch());
            let e = &evidence[&mb];
            let watched = watch == Some(mb);
            match op {
                Op::Forward { .. } => {
                    let (input, out) = self.replay_forward(step, mb, e)?;
                    if watched {
                        seen = Some((input, self.output_hash(&out)?));
                    }
                    if let StageOutput::Loss(l) = out {
                        loss_sum += f64::from(l);
                    }
                }
                Op::Backward { .. } | Op::BackwardInput { .. } => {
                    let dx = self.replay_backward_input(mb, e)?;
                    if let (true, Some((input, output))) = (watched, seen) {
                        hashes = Some(MicroBatchHashes {
                            input,
                            output,
                            gradient: self.gradient_hash(dx.as_deref())?,
                        });
                    }
                    if matches!(op, Op::Backward { .. }) {
                        self.stage.backward_weight(mb)?;
                    }
                }
                Op::BackwardWeight { .. } => self.stage.backward_weight(mb)?,
            }
        }
        if self.stage.in_flight() != 0 {
            return Err(PipelineError::Audit(
                "the replica's order left micro-batches without a backward".into(),
            ));
        }
        Ok((loss_sum, hashes))
    }

    /// The bytes of a stage's parameters as a weights upload carries them
    /// (`PUT /v1/audit/{audit}/weights`): every parameter's values as
    /// little-endian f32, in the stage's parameter order, nothing else.
    pub fn encode_weights(state: &StageState) -> Vec<u8> {
        let floats: usize = state.params.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(floats * 4);
        for p in &state.params {
            out.extend_from_slice(bytemuck::cast_slice(p));
        }
        out
    }

    /// Bytes of this stage's [`StageWorker::encode_weights`]: 4 per
    /// parameter value.
    pub fn weights_len(&self) -> usize {
        self.stage.params().iter().map(|p| p.data.len() * 4).sum()
    }

    /// Reads a weights upload for this stage (at step `step`, 0-based:
    /// the weights before step `step + 1`) and returns them with their
    /// [`super::params_digest`] under this stage's parameter names and
    /// shapes. Refused unless it holds exactly
    /// [`StageWorker::weights_len`] bytes.
    pub fn decode_weights(
        &self,
        bytes: &[u8],
        step: u64,
    ) -> Result<(StageState, [u8; 32]), PipelineError> {
        let want = self.weights_len();
        if bytes.len() != want {
            return Err(PipelineError::Audit(format!(
                "the weights upload holds {} bytes, stage {}'s parameters take {want}",
                bytes.len(),
                self.shard.stage
            )));
        }
        let live = self.stage.params();
        let params = self.per_param(bytes);
        let digest = super::params_digest(
            live.iter()
                .zip(&params)
                .map(|(p, d)| (p.name.as_str(), &p.shape[..], &d[..])),
        );
        let state = StageState {
            step,
            params,
            // A recomputation reads the weights alone.
            opt: crate::optim::AdamW::default(),
        };
        Ok((state, digest))
    }

    /// `bytes` (little-endian f32s, [`StageWorker::weights_len`] of them)
    /// cut into one array per parameter of the stage, in its order.
    pub(super) fn per_param(&self, bytes: &[u8]) -> Vec<Vec<f32>> {
        let mut at = 0;
        self.stage
            .params()
            .iter()
            .map(|p| {
                let n = p.data.len() * 4;
                let v = bytes[at..at + n]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                at += n;
                v
            })
            .collect()
    }

    /// [`StageWorker::recompute`] on a worker that did not train (the
    /// coordinator's, built by [`StageWorker::prepare_layers`] without
    /// links): it takes step `step` (0-based) as its last completed one
    /// and `scale` (the loss scale every micro-batch of that step had) as
    /// the step's, then recomputes micro-batch `mb` with the weights of
    /// `before` from `evidence`.
    pub fn recompute_detached(
        &mut self,
        before: &mut StageState,
        step: u64,
        mb: u64,
        evidence: &Evidence,
        scale: f32,
    ) -> Result<MicroBatchHashes, PipelineError> {
        self.detach_at(before, step, scale);
        self.recompute(before, step, mb, evidence)
    }

    /// [`StageWorker::recompute_contribution`] on a worker that did not
    /// train (the coordinator's), as [`StageWorker::recompute_detached`]
    /// is for one micro-batch: it takes step `step` (0-based) as its last
    /// completed one and `scale` as the step's loss scale, then recomputes
    /// replica `audited_replica`'s contribution with the weights of
    /// `before` from `evidence`.
    pub fn recompute_contribution_detached(
        &mut self,
        before: &mut StageState,
        step: u64,
        audited_replica: usize,
        micro_batches: &[u64],
        evidence: &BTreeMap<u64, Evidence>,
        scale: f32,
    ) -> Result<[u8; 32], PipelineError> {
        self.detach_at(before, step, scale);
        self.recompute_contribution(before, step, audited_replica, micro_batches, evidence)
    }

    /// Makes this worker, which did not train (the coordinator's), take
    /// step `step` (0-based) as its last completed one, `scale` as that
    /// step's loss scale and `before` as the state before it.
    fn detach_at(&mut self, before: &mut StageState, step: u64, scale: f32) {
        self.step = step + 1;
        self.scale = scale;
        before.step = step;
    }

    /// Refuses a recomputation of step `step` (0-based) unless it is this
    /// worker's last completed step, `before` holds the state before it
    /// and fits the stage, and no micro-batch is in flight.
    fn check_recomputable(&self, before: &StageState, step: u64) -> Result<(), PipelineError> {
        if before.step != step || self.step != step + 1 {
            return Err(PipelineError::Audit(format!(
                "cannot recompute step {} here: this worker completed {} steps and holds weights of step {}",
                step + 1,
                self.step,
                before.step
            )));
        }
        if self.stage.in_flight() != 0 {
            return Err(PipelineError::Audit(
                "the stage has micro-batches in flight".into(),
            ));
        }
        let params = self.stage.params();
        let fits = before.params.len() == params.len()
            && before
                .params
                .iter()
                .zip(&params)
                .all(|(a, p)| a.len() == p.len());
        if !fits {
            return Err(PipelineError::Audit(format!(
                "the snapshot does not fit stage {}",
                self.shard.stage
            )));
        }
        Ok(())
    }

    /// Runs `f` with `before`'s weights swapped into the stage, then swaps
    /// them back, drops whatever `f` left in flight and zeroes the
    /// gradients it accumulated (a block that recomputes its activations
    /// runs both halves of its backward), as the step left them.
    fn with_weights_of<T>(
        &mut self,
        before: &mut StageState,
        f: impl FnOnce(&mut Self) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        self.swap_weights(before);
        let result = f(self);
        self.swap_weights(before);
        self.stage.clear_in_flight();
        self.stage.zero_grad();
        result
    }

    /// Exchanges the stage's parameter values with `state`'s.
    fn swap_weights(&mut self, state: &mut StageState) {
        for (p, d) in self.stage.params_mut().into_iter().zip(&mut state.params) {
            std::mem::swap(&mut p.data, d);
        }
    }

    /// The forward of micro-batch `mb` of step `step` from `evidence` (the
    /// first stage: from the tokens it samples, as
    /// [`StageWorker::train_step`] does) with the current weights and the
    /// step's loss scale, kept in flight for its backward. Returns the
    /// hash of the input used and the stage's output.
    fn replay_forward(
        &mut self,
        step: u64,
        mb: u64,
        evidence: &Evidence,
    ) -> Result<([u8; 32], StageOutput), PipelineError> {
        let (rows, seq) = (self.rows, self.model.seq_len);
        let m = self.micro_batches as u64;
        let codec = self.codec;
        let width_in = self.stage.boundary_width_in();
        let last = self.is_last();
        let (tokens, hidden, targets, input) = match &self.corpus {
            Some(corpus) => {
                let b = sample_train(corpus, self.seed, step, mb % m, mb / m, rows, seq);
                let h = content_hash(bytemuck::cast_slice(&b.tokens));
                (Some(b.tokens), None, b.targets, h)
            }
            None => {
                let bytes = evidence
                    .input
                    .as_ref()
                    .ok_or_else(|| missing(mb, "input"))?;
                let hidden = codec.decode(bytes, rows * seq, width_in)?;
                let targets = if last {
                    let t = evidence
                        .targets
                        .as_ref()
                        .ok_or_else(|| missing(mb, "targets"))?;
                    // The ids, then their origin (`link::origin`).
                    let ids = crate::link::origin::Origin::split(t)
                        .map(|(ids, _)| ids)
                        .filter(|ids| ids.len() == rows * seq * 4)
                        .ok_or_else(|| {
                            PipelineError::Audit(format!(
                                "the evidence's targets of micro-batch {mb} hold {} bytes, \
                                 expected {} and their origin",
                                t.len(),
                                rows * seq * 4
                            ))
                        })?;
                    ids.chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                } else {
                    Vec::new()
                };
                (None, Some(hidden), targets, content_hash(bytes))
            }
        };
        let input_ref = match (&tokens, &hidden) {
            (Some(t), _) => StageInput::Tokens(t),
            (None, Some(h)) => StageInput::Hidden(h),
            (None, None) => return Err(PipelineError::Layout("no input".into())),
        };
        let scale = self.scale;
        let out = self
            .stage
            .forward(mb, input_ref, last.then_some(&targets[..]), rows, scale)?;
        Ok((input, out))
    }

    /// The input half of the backward of micro-batch `mb`, in flight, from
    /// `evidence`'s gradient (the last stage: from its loss). Returns the
    /// input gradient.
    fn replay_backward_input(
        &mut self,
        mb: u64,
        evidence: &Evidence,
    ) -> Result<Option<Vec<f32>>, PipelineError> {
        let grad = if self.is_last() {
            None
        } else {
            let bytes = evidence
                .gradient
                .as_ref()
                .ok_or_else(|| missing(mb, "gradient"))?;
            let width_out = self.stage.boundary_width_out();
            Some(self.codec.decode(bytes, self.hidden_rows(), width_out)?)
        };
        Ok(self.stage.backward_input(mb, grad.as_deref())?)
    }
}

/// The error of evidence that lacks a payload the stage needs.
fn missing(mb: u64, what: &str) -> PipelineError {
    PipelineError::Audit(format!("the evidence of micro-batch {mb} holds no {what}"))
}

#[cfg(test)]
mod tests {
    use super::Evidence;
    use crate::pipeline::{Shard, StageWorker};

    /// Stage 1 of a 2-stage run (it reads no corpus), without links.
    fn last_stage() -> StageWorker {
        let yaml = r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: weights}
spec:
  model: {dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 16}
  data: {sources: ["unused.txt"]}
  training: {steps: 2, microBatchSize: 2, microBatches: 2, learningRate: 0.01, seed: 3}
  pipeline: {stages: 2, replicas: 2}
"#;
        let m = pipewright_spec::parse_manifest(yaml).expect("manifest");
        let shard = Shard {
            stage: 1,
            replica: 0,
        };
        StageWorker::prepare(&m, shard, std::time::Duration::from_secs(1)).expect("stage")
    }

    #[test]
    fn uploaded_weights_digest_as_the_stage_does_and_other_weights_do_not() {
        let w = last_stage();
        let state = w.state();
        let bytes = StageWorker::encode_weights(&state);
        assert_eq!(bytes.len(), w.weights_len());
        let (decoded, digest) = w.decode_weights(&bytes, 4).expect("decode");
        assert_eq!(decoded.params, state.params);
        assert_eq!(decoded.step, 4);
        assert_eq!(digest, w.params_digest(), "the digest a replica commits");
        // One value changed: another digest.
        let mut other = bytes.clone();
        other[5] ^= 1;
        let (_, d) = w.decode_weights(&other, 4).expect("decode");
        assert_ne!(d, digest);
        // Not the stage's size: refused.
        for n in [0, bytes.len() - 4, bytes.len() + 4] {
            let mut b = bytes.clone();
            b.resize(n, 0);
            let e = w.decode_weights(&b, 4).unwrap_err().to_string();
            assert!(e.contains("bytes"), "{e}");
        }
    }

    #[test]
    fn evidence_round_trips_and_malformed_files_are_refused() {
        let e = Evidence {
            input: Some(vec![1, 2, 3]),
            targets: None,
            gradient: Some(vec![9; 10]),
        };
        assert_eq!(e.len(), 13);
        let bytes = e.encode().expect("encode");
        assert_eq!(Evidence::decode(&bytes, 1 << 20).expect("decode"), e);
        assert!(Evidence::decode(&bytes, 10).is_err(), "too large");
        assert!(Evidence::decode(b"not a file", 1 << 20).is_err());
        assert_eq!(
            Evidence::decode(&Evidence::default().encode().expect("empty"), 64).expect("empty"),
            Evidence::default()
        );
        // Another name, or another type, is refused.
        let other = safetensors::serialize(
            [(
                "weights".to_string(),
                safetensors::tensor::TensorView::new(
                    safetensors::tensor::Dtype::U8,
                    vec![2],
                    &[1, 2],
                )
                .expect("view"),
            )],
            None,
        )
        .expect("serialize");
        assert!(Evidence::decode(&other, 1 << 20).is_err());
        let f32s = [0u8; 8];
        let typed = safetensors::serialize(
            [(
                "input".to_string(),
                safetensors::tensor::TensorView::new(
                    safetensors::tensor::Dtype::F32,
                    vec![2],
                    &f32s,
                )
                .expect("view"),
            )],
            None,
        )
        .expect("serialize");
        assert!(Evidence::decode(&typed, 1 << 20).is_err());
    }

    #[test]
    fn evidence_sets_round_trip_and_malformed_sets_are_refused() {
        use std::collections::{BTreeMap, HashMap};

        use safetensors::tensor::{Dtype, TensorView};

        let set = BTreeMap::from([
            (
                0,
                Evidence {
                    input: Some(vec![1, 2, 3]),
                    targets: Some(vec![4; 8]),
                    gradient: Some(vec![9; 10]),
                },
            ),
            // A stage that keeps nothing for a micro-batch still lists it.
            (3, Evidence::default()),
            (
                12,
                Evidence {
                    input: None,
                    targets: None,
                    gradient: Some(vec![7; 5]),
                },
            ),
        ]);
        let bytes = Evidence::encode_set(&set).expect("encode");
        assert_eq!(Evidence::decode_set(&bytes, 1 << 20).expect("decode"), set);
        assert!(Evidence::decode_set(&bytes, bytes.len()).is_ok());
        let err = Evidence::decode_set(&bytes, bytes.len() - 1).expect_err("over the limit");
        assert!(err.to_string().contains("more than"), "{err}");
        let empty = Evidence::encode_set(&BTreeMap::new()).expect("empty");
        assert!(Evidence::decode_set(&empty, 1 << 10)
            .expect("empty")
            .is_empty());
        assert!(Evidence::decode_set(b"not a file", 1 << 20).is_err());

        let file =
            |name: &str, dtype: Dtype, shape: Vec<usize>, data: &[u8], list: Option<&str>| {
                let view = TensorView::new(dtype, shape, data).expect("view");
                let meta =
                    list.map(|l| HashMap::from([("micro_batches".to_string(), l.to_string())]));
                safetensors::serialize([(name.to_string(), view)], meta).expect("serialize")
            };
        let decode = |b: &[u8]| Evidence::decode_set(b, 1 << 20);
        // A well-formed single tensor, with and without the list.
        let one = decode(&file("5.gradient", Dtype::U8, vec![2], &[1, 2], Some("5"))).expect("ok");
        assert_eq!(one[&5].gradient.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(
            decode(&file("5.gradient", Dtype::U8, vec![2], &[1, 2], None)).expect("ok"),
            one
        );
        // Names that are not <u64>.<input|targets|gradient>.
        for name in [
            "input",
            "x.input",
            "5.weights",
            "5",
            "-1.input",
            "+5.input",
            "05.input",
            "5.input.x",
            "18446744073709551616.input",
            ".input",
            "5.",
        ] {
            let err = decode(&file(name, Dtype::U8, vec![2], &[1, 2], None)).expect_err(name);
            assert!(
                err.to_string().contains("unexpected tensor"),
                "{name}: {err}"
            );
        }
        // Another type, or another rank.
        let f32s = [0u8; 8];
        let err = decode(&file("1.input", Dtype::F32, vec![2], &f32s, None)).expect_err("F32");
        assert!(err.to_string().contains("1-D U8"), "{err}");
        let err = decode(&file("1.input", Dtype::U8, vec![2, 4], &f32s, None)).expect_err("2-D");
        assert!(err.to_string().contains("1-D U8"), "{err}");
        // A tensor of a micro-batch the list lacks, and malformed lists.
        let err = decode(&file("1.input", Dtype::U8, vec![2], &[1, 2], Some("0,2")))
            .expect_err("unlisted");
        assert!(err.to_string().contains("does not list"), "{err}");
        for list in ["0,,2", "2,1", "1,1", "a", "01", " 1"] {
            assert!(
                decode(&file("1.input", Dtype::U8, vec![2], &[1, 2], Some(list))).is_err(),
                "{list:?}"
            );
        }
    }
}
