//! The coordinator's own recomputations: an audited micro-batch of a stage
//! with one training replica (with its whole step's gradients and its
//! update), a disputed micro-batch of a two-replica stage, or a disputed
//! contribution, recomputed in this process from a worker's uploaded
//! parameters ([`Shared::recompute_disputed`]), and the stages built for
//! them, kept between recomputations ([`Referees`]).
//!
//! Building a stage reads the run's corpus (the first stage) and
//! initialises its parameters: on the Byzantine bench's model that was
//! 9 to 50 ms of a recomputation of 50 to 140 ms, paid at every audit
//! before the built stages were kept.

use std::ops::Range;
use std::time::Duration;

use super::server::{lock, Shared};
use super::state::{ContributionJob, RefereeJob, RefereeResult};
use crate::pipeline::{Evidence, PipelineError, Shard, StageWorker};

/// A stage built for recomputations, with the digest of its optimizer's
/// moments as built (zeros: the moments every replica starts from).
struct Built {
    stage: usize,
    layers: Option<Range<usize>>,
    worker: StageWorker,
    fresh_moments: [u8; 32],
}

/// The stages the coordinator built for its recomputations, the most
/// recently used last: at most `capacity` of them (what this process's
/// memory allowed when it started, [`memory`]), and another one is kept
/// only while the machine still has `room` bytes available (the shard
/// processes of `pipewright train --processes` start after the
/// coordinator, on the same machine).
pub(super) struct Referees {
    capacity: usize,
    room: u64,
    built: Vec<Built>,
}

impl Referees {
    pub(super) fn new(kept: Kept) -> Self {
        Referees {
            capacity: kept.capacity.max(1),
            room: kept.room,
            built: Vec::new(),
        }
    }

    /// Drops every kept stage (after a recomputation panicked, a stage may
    /// hold micro-batches in flight).
    pub(super) fn clear(&mut self) {
        self.built.clear();
    }

    /// Stage `stage` over `layers`, built from `manifest` unless kept; the
    /// least recently used kept stage makes room for it.
    fn get(
        &mut self,
        manifest: &pipewright_spec::TrainingRun,
        stage: usize,
        layers: Option<Range<usize>>,
    ) -> Result<&mut Built, PipelineError> {
        let at = self
            .built
            .iter()
            .position(|b| b.stage == stage && b.layers == layers);
        let b = match at {
            Some(i) => self.built.remove(i),
            None => {
                // Another stage kept only with room for it and a
                // recomputation beside; otherwise the kept ones go first.
                let short = crate::plan::available_memory().is_some_and(|a| a < self.room);
                if short {
                    self.built.clear();
                }
                let shard = Shard { stage, replica: 0 };
                let worker = StageWorker::prepare_layers(
                    manifest,
                    shard,
                    Duration::from_secs(1),
                    layers.clone(),
                )?;
                let fresh_moments = worker.moments_digest_of(worker.optimizer());
                if self.built.len() >= self.capacity {
                    self.built.remove(0);
                }
                Built {
                    stage,
                    layers,
                    worker,
                    fresh_moments,
                }
            }
        };
        self.built.push(b);
        Ok(self.built.last_mut().expect("just pushed"))
    }

    /// How many stages are kept.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.built.len()
    }
}

impl Shared {
    /// Recomputes the disputed micro-batch of `job` in this process, as a
    /// validator would (see `StageWorker::recompute`), with the parameters
    /// `weights` (a [`StageWorker::encode_weights`] upload), on the stage's
    /// layer range built from the run's manifest without links (the first
    /// stage reads the run's corpus to sample its tokens; where it cannot,
    /// the result is [`RefereeResult::Failed`]) or kept in `referees` from
    /// an earlier recomputation; refuses parameters that are not the
    /// stage's size or whose digest is not `job.digest`
    /// ([`RefereeResult::BadWeights`]), and recomputes from the evidence
    /// the coordinator holds. Runs on the caller's thread, outside the
    /// state machine's lock.
    pub(super) fn recompute_disputed(
        &self,
        referees: &mut Referees,
        job: &RefereeJob,
        weights: &[u8],
    ) -> RefereeResult {
        let layers = lock(&self.coord)
            .layout()
            .stage_layers
            .get(job.stage)
            .cloned();
        let built = match referees.get(&self.config.manifest, job.stage, layers) {
            Ok(b) => b,
            Err(e) => {
                return RefereeResult::Failed(format!("building stage {}: {e}", job.stage));
            }
        };
        let fresh_moments = built.fresh_moments;
        let wk = &mut built.worker;
        let before = job.step.saturating_sub(1);
        // An update upload carries the moments and the applied gradient
        // after the parameters ([`memory`] counts the upload, its decoded
        // copy and the recomputation at once).
        let params = match &job.update {
            None => weights,
            Some(_) => match wk.update_params(weights) {
                Ok(p) => p,
                Err(e) => return RefereeResult::BadWeights(e.to_string()),
            },
        };
        let (mut state, digest) = match wk.decode_weights(params, before) {
            Ok(x) => x,
            Err(e) => return RefereeResult::BadWeights(e.to_string()),
        };
        if digest != job.digest {
            return RefereeResult::BadWeights(format!(
                "they digest to {}, the digest agreed for the stage's parameters after step \
                 {before} is {}",
                hex::encode(&digest[..8]),
                hex::encode(&job.digest[..8])
            ));
        }
        // A contribution audit's evidence, or a whole step's, is a set of
        // micro-batches, checked against the commitments when it was
        // uploaded.
        let decode_set = |scope: &ContributionJob| {
            let limit = self
                .evidence_limit
                .saturating_mul(scope.micro_batches.len().max(1));
            Evidence::decode_set(&job.evidence, limit)
        };
        if let Some(c) = &job.contribution {
            let set = match decode_set(c) {
                Ok(set) => set,
                Err(e) => return RefereeResult::Failed(e.to_string()),
            };
            return match wk.recompute_contribution_detached(
                &mut state,
                before,
                c.replica,
                &c.micro_batches,
                &set,
                job.scale,
            ) {
                Ok(h) => RefereeResult::Contribution(h),
                Err(e) => RefereeResult::Failed(e.to_string()),
            };
        }
        // An update's moments and applied gradient must be the ones
        // committed to (at the first step the moments are the zeros a
        // stage built and never stepped holds): checked before anything
        // is recomputed.
        let up = match &job.update {
            None => None,
            Some(check) => {
                let up = match wk.decode_update(weights, before) {
                    Ok(up) => up,
                    Err(e) => return RefereeResult::BadWeights(e.to_string()),
                };
                let moments_before = check.moments_before.unwrap_or(fresh_moments);
                if up.moments != moments_before {
                    return RefereeResult::BadWeights(format!(
                        "their optimizer moments digest to {}, the moments committed to after \
                         step {before} digest to {}",
                        hex::encode(&up.moments[..8]),
                        hex::encode(&moments_before[..8])
                    ));
                }
                if up.applied_digest != check.applied {
                    return RefereeResult::BadWeights(format!(
                        "the applied gradient digests to {}, the one committed to for step {} \
                         to {}",
                        hex::encode(&up.applied_digest[..8]),
                        job.step,
                        hex::encode(&check.applied[..8])
                    ));
                }
                Some((check, up))
            }
        };
        // With the whole step's evidence, the audited micro-batch's hashes
        // and the step's gradients come from one pass over the step.
        let (hashes, grads) = match &job.whole_step {
            Some(all) => {
                let set = match decode_set(all) {
                    Ok(set) => set,
                    Err(e) => return RefereeResult::Failed(e.to_string()),
                };
                match wk.recompute_step_detached(
                    &mut state,
                    before,
                    all.replica,
                    &all.micro_batches,
                    &set,
                    job.scale,
                    job.mb,
                ) {
                    Ok((h, g)) => (h, Some(g)),
                    Err(e) => return RefereeResult::Failed(e.to_string()),
                }
            }
            None => {
                let evidence = match Evidence::decode(&job.evidence, self.evidence_limit) {
                    Ok(e) => e,
                    Err(e) => return RefereeResult::Failed(e.to_string()),
                };
                match wk.recompute_detached(&mut state, before, job.mb, &evidence, job.scale) {
                    Ok(h) => (h, None),
                    Err(e) => return RefereeResult::Failed(e.to_string()),
                }
            }
        };
        let hashes = [hashes.input, hashes.output, hashes.gradient];
        let Some((check, up)) = up else {
            return RefereeResult::Hashes(hashes);
        };
        // The norm it clipped by must be the step's global norm: the one
        // every other stage reported, or alone in the pipeline its own
        // gradient's (a made-up norm would scale its update down to
        // nothing and still replay).
        let norm = match (check.grad_norm, self.config.manifest.spec.pipeline.stages) {
            (Some(n), _) => Some(n),
            (None, 1) => Some(wk.own_norm(&up.applied.grads)),
            (None, _) => None,
        };
        if let Some(n) = norm.filter(|n| n.to_bits() != up.applied.grad_norm.to_bits()) {
            return RefereeResult::WrongUpdate(
                hashes,
                format!(
                    "its update of step {} was clipped by a global gradient norm of {}, the \
                     step's is {n}",
                    job.step, up.applied.grad_norm
                ),
            );
        }
        // The gradient applied must be the one the step's micro-batches
        // give (the tied matrices aside), recomputed from their evidence.
        if let Some(grads) = &grads {
            if let Some(why) = wk.applied_mismatch(grads, &up.applied.grads) {
                return RefereeResult::WrongUpdate(hashes, format!("step {}: {why}", job.step));
            }
        }
        drop(grads);
        // The update, replayed from the committed state and gradient.
        let (params, moments) = wk.replay_update(state, up);
        let wrong: Vec<String> = [
            ("parameters", params, check.params_after),
            ("moments", moments, check.moments_after),
        ]
        .into_iter()
        .filter(|(_, got, signed)| got != signed)
        .map(|(what, got, signed)| {
            format!(
                "its {what} after step {} digest to {}, it committed to {}",
                job.step,
                hex::encode(&got[..8]),
                hex::encode(&signed[..8])
            )
        })
        .collect();
        if wrong.is_empty() {
            RefereeResult::Hashes(hashes)
        } else {
            RefereeResult::WrongUpdate(hashes, wrong.join("; "))
        }
    }
}

/// How many built stages this process may keep for its recomputations,
/// and the memory the machine must still have for it to keep another
/// (`Err`: it has not the memory to recompute one of the run's largest
/// stage, and why). One recomputation needs the stage as its shard
/// process holds it (the plan's total, less what combining replicas'
/// gradients holds: the coordinator combines none), an update upload of
/// it and its decoded copy (16 bytes per parameter each) and the whole
/// step's recomputed gradients (4), a quarter more for the allocator, the
/// process overhead and what this process holds already; each further
/// stage kept needs its weights, gradients and moments, a quarter more.
/// Measured on a 4-stage run of 10.4M parameters, a recomputation with the
/// update's replay raised the coordinator's resident set by 1.16 times the
/// stage's total and its upload's bytes. Where this process cannot know
/// its memory ([`crate::plan::available_memory`]) one stage is kept.
pub(super) fn memory(
    manifest: &pipewright_spec::TrainingRun,
    vocab: usize,
) -> Result<Kept, String> {
    let plan = crate::plan::plan(manifest, vocab, None);
    let stages = plan.stages.len().max(1);
    let stage = plan
        .stages
        .iter()
        .max_by_key(|s| s.total_bytes - s.aggregation_bytes)
        .expect("a plan has at least one stage");
    let one = (stage.total_bytes - stage.aggregation_bytes)
        .saturating_add(stage.params.saturating_mul(36))
        .saturating_mul(5)
        / 4;
    let kept =
        (stage.weight_bytes + stage.gradient_bytes + stage.optimizer_bytes).saturating_mul(5) / 4;
    let Some(available) = crate::plan::available_memory() else {
        return Ok(Kept {
            capacity: 1,
            room: 0,
        });
    };
    let resident = crate::plan::own_status("VmRSS").unwrap_or(0);
    let need = one + crate::plan::PROCESS_OVERHEAD_BYTES + resident;
    if need > available {
        return Err(format!(
            "recomputing a micro-batch of stage {} needs about {} here, and this process has {}",
            stage.stage,
            crate::plan::human(need),
            crate::plan::human(available)
        ));
    }
    let more = (available - need) / kept.max(1);
    Ok(Kept {
        capacity: 1 + usize::try_from(more).unwrap_or(usize::MAX).min(stages - 1),
        room: one.saturating_add(kept),
    })
}

/// What [`memory`] allows [`Referees`] to keep.
#[derive(Clone, Copy, Debug)]
pub(super) struct Kept {
    /// Built stages at most.
    pub(super) capacity: usize,
    /// Bytes the machine must have available, when a stage is built, to
    /// keep the ones built before beside it: one recomputation and one
    /// more kept stage.
    pub(super) room: u64,
}

#[cfg(test)]
mod tests {
    use super::{Kept, Referees};

    const MANIFEST: &str = r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: referees}
spec:
  model: {dim: 32, layers: 3, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 16}
  data: {sources: ["unused.txt"]}
  training: {steps: 2, microBatchSize: 2, microBatches: 2, learningRate: 0.01, seed: 3}
  pipeline: {stages: 3, replicas: 1}
"#;

    /// Built stages are kept up to the capacity, the least recently used
    /// making room, and only while the machine has the room for another;
    /// a stage over other layers is another stage; a stage that cannot be
    /// built is an error, not a kept stage.
    #[test]
    fn built_stages_are_kept_up_to_the_capacity() {
        let m = pipewright_spec::parse_manifest(MANIFEST).expect("manifest");
        let mut r = Referees::new(Kept {
            capacity: 2,
            room: 0,
        });
        // A mark on the stage built, to know it again.
        r.get(&m, 1, Some(1..2)).expect("stage 1").fresh_moments = [7; 32];
        r.get(&m, 2, Some(2..3)).expect("stage 2");
        assert_eq!(r.kept(), 2);
        // Stage 1 again: the one kept, now the most recently used.
        let again = r.get(&m, 1, Some(1..2)).expect("stage 1");
        assert_eq!(again.fresh_moments, [7; 32], "stage 1 is not built twice");
        assert_eq!(r.built.last().map(|b| b.stage), Some(1));
        // Stage 1 over other layers: built, and stage 2 (least recently
        // used) makes room.
        r.get(&m, 1, Some(1..3)).expect("stage 1 over two layers");
        assert_eq!(r.kept(), 2);
        assert!(r.built.iter().all(|b| b.stage == 1));
        assert!(
            r.get(&m, 1, Some(2..9)).is_err(),
            "layers the model has not"
        );
        assert_eq!(r.kept(), 2);
        // Capacity 0 keeps one all the same: the one in use.
        let mut one = Referees::new(Kept {
            capacity: 0,
            room: 0,
        });
        one.get(&m, 1, None).expect("stage 1");
        one.get(&m, 2, None).expect("stage 2");
        assert_eq!(one.kept(), 1);
        assert_eq!(one.built[0].stage, 2);
        // Without the room on the machine for another, a new stage is
        // built alone.
        if crate::plan::available_memory().is_some() {
            let mut tight = Referees::new(Kept {
                capacity: 3,
                room: u64::MAX,
            });
            tight.get(&m, 1, None).expect("stage 1");
            tight.get(&m, 2, None).expect("stage 2");
            assert_eq!(tight.kept(), 1);
            // A kept one is handed out all the same.
            tight.get(&m, 2, None).expect("stage 2");
            assert_eq!(tight.kept(), 1);
        }
        // Cleared: nothing kept.
        r.clear();
        assert_eq!(r.kept(), 0);
    }
}
