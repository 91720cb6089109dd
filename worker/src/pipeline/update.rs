//! Replaying an optimizer update, so that a stage with one training
//! replica is held to its update as well as to its forward and backward.
//!
//! Replicas of a stage compare their parameters' digests after every
//! update; a stage with one training replica has nobody to compare with.
//! Its worker therefore commits, in each signed step report, to two more
//! digests: of its optimizer moments after the update
//! ([`super::moments_digest`]) and of the gradient the update applied with
//! the global norm its clip came from ([`super::applied_digest`]). When the
//! coordinator audits such a stage at a step it asks for an update upload
//! ([`StageWorker::encode_update`]): the parameters and moments of before
//! the step, which must have the digests the worker committed to after the
//! step before, and the applied gradient, which must have the digest it
//! committed to for the step. It then replays AdamW on them
//! ([`StageWorker::replay_update`]) with the run's schedule: an honest
//! worker's parameters' and moments' digests after the step come out bit
//! for bit (the update is a fixed sequence of f32 operations), and a worker
//! that skipped its update, applied another one or altered its weights or
//! moments afterwards does not reproduce the digests it signed.
//!
//! The applied gradient itself is checked apart: the coordinator
//! recomputes the step's weight gradients from the evidence of every
//! micro-batch of the step ([`StageWorker::recompute_step_detached`])
//! and holds the applied one to them ([`StageWorker::applied_mismatch`]).

use super::{applied_digest, moments_digest, PipelineError, StageState, StageWorker};
use crate::optim::AdamW;

/// The gradient a step's optimizer update applied, as it was before the
/// clip, and the global norm its clip factor came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The step (0-based) whose update applied it.
    pub step: u64,
    /// Every parameter's gradient, in the stage's parameter order.
    pub grads: Vec<Vec<f32>>,
    /// The global gradient norm of the step.
    pub grad_norm: f64,
}

/// The part of an update upload after the parameters, read back (see
/// [`StageWorker::decode_update`]): the moments before the step and what
/// the update applied, with the digests they have. The parameters are
/// read with [`StageWorker::decode_weights`] from the upload's first
/// [`StageWorker::weights_len`] bytes, so that a recomputation can use them
/// before the rest is decoded.
#[derive(Debug)]
pub struct UpdateUpload {
    /// The moments and step count before the step.
    pub opt: AdamW,
    /// The applied gradient and norm.
    pub applied: Applied,
    /// [`super::moments_digest`] of `opt`.
    pub moments: [u8; 32],
    /// [`super::applied_digest`] of `applied`.
    pub applied_digest: [u8; 32],
}

impl StageWorker {
    /// Keeps (or stops keeping) the gradient each optimizer update applies,
    /// for an update upload. Costs one copy of the stage's gradients per
    /// step.
    pub fn set_keep_update(&mut self, on: bool) {
        self.keep_update = on;
        if !on {
            self.applied = None;
        }
    }

    /// Keeps the gradients as they are now (before the update of `step`)
    /// with the step's global norm, reusing the buffers of the step before.
    pub(super) fn keep_applied(&mut self, step: u64, grad_norm: f64) {
        if !self.keep_update {
            self.applied = None;
            return;
        }
        let params = self.stage.params();
        let a = self.applied.get_or_insert_with(|| Applied {
            step,
            grads: Vec::new(),
            grad_norm,
        });
        a.step = step;
        a.grad_norm = grad_norm;
        a.grads.resize_with(params.len(), Vec::new);
        for (g, p) in a.grads.iter_mut().zip(&params) {
            g.clear();
            g.extend_from_slice(&p.grad);
        }
    }

    /// The applied gradient of the last completed step, when it was kept.
    fn last_applied(&self) -> Option<&Applied> {
        self.applied
            .as_ref()
            .filter(|a| self.keep_update && a.step + 1 == self.step)
    }

    /// What this worker commits to about its last step's update, when it
    /// keeps updates: the digest of its moments after it and the digest of
    /// the gradient it applied.
    pub fn committed_update(&self) -> Option<([u8; 32], [u8; 32])> {
        let a = self.last_applied()?;
        Some((self.moments_digest_of(&self.opt), self.applied_digest_of(a)))
    }

    /// [`super::moments_digest`] of `opt` under this stage's parameter
    /// names and shapes.
    pub fn moments_digest_of(&self, opt: &AdamW) -> [u8; 32] {
        let params = self.stage.params();
        moments_digest(params.iter().map(|p| (p.name.as_str(), &p.shape[..])), opt)
    }

    /// [`super::applied_digest`] of `a` under this stage's parameter names
    /// and shapes.
    fn applied_digest_of(&self, a: &Applied) -> [u8; 32] {
        let params = self.stage.params();
        applied_digest(
            params
                .iter()
                .zip(&a.grads)
                .map(|(p, g)| (p.name.as_str(), &p.shape[..], &g[..])),
            a.grad_norm,
        )
    }

    /// The global gradient norm a run of this stage alone computes from
    /// `grads` (its parameters' gradients, in order), bit for bit as
    /// `global_norm` does with no other stage: the square root of the sum
    /// of every gradient's squares in f64, parameter by parameter, the
    /// tied head left out.
    pub fn own_norm(&self, grads: &[Vec<f32>]) -> f64 {
        let tied = self.model.tied;
        self.stage
            .params()
            .iter()
            .zip(grads)
            .filter(|(p, _)| !(tied && p.name == super::LM_HEAD_NAME))
            .map(|(_, g)| g.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .sum::<f64>()
            .sqrt()
    }

    /// Bytes of this stage's [`StageWorker::encode_update`]: four arrays
    /// of the parameters' size and 16 bytes.
    pub fn update_len(&self) -> usize {
        4 * self.weights_len() + 16
    }

    /// The update upload of the last completed step: `before`'s (the state
    /// before that step, the snapshot's) parameters, first moments and
    /// second moments, then the gradient the step's update applied, each
    /// as every value's little-endian f32 in the stage's parameter order;
    /// then `before`'s step count `t` (le u64) and the step's global
    /// gradient norm (le f64). Refused when no applied gradient of that
    /// step was kept or `before` does not fit the stage.
    pub fn encode_update(&self, before: &StageState) -> Result<Vec<u8>, PipelineError> {
        let a = self.last_applied().ok_or_else(|| {
            PipelineError::Audit(format!(
                "no applied gradient of step {} was kept",
                self.step
            ))
        })?;
        let params = self.stage.params();
        let n = params.len();
        let fits = |v: &[Vec<f32>]| {
            v.len() == n && v.iter().zip(&params).all(|(x, p)| x.len() == p.data.len())
        };
        if !fits(&before.params) || !fits(&before.opt.m) || !fits(&before.opt.v) {
            return Err(PipelineError::Audit(
                "the state before the step does not fit the stage (no moments kept?)".into(),
            ));
        }
        let mut out = Vec::with_capacity(self.update_len());
        for part in [&before.params, &before.opt.m, &before.opt.v, &a.grads] {
            for x in part.iter() {
                out.extend_from_slice(bytemuck::cast_slice(x));
            }
        }
        out.extend_from_slice(&before.opt.t.to_le_bytes());
        out.extend_from_slice(&a.grad_norm.to_bits().to_le_bytes());
        Ok(out)
    }

    /// Checks that `bytes` is an update upload of this stage's size
    /// ([`StageWorker::update_len`]) and returns its parameters' part, for
    /// [`StageWorker::decode_weights`].
    pub fn update_params<'a>(&self, bytes: &'a [u8]) -> Result<&'a [u8], PipelineError> {
        let want = self.update_len();
        if bytes.len() != want {
            return Err(PipelineError::Audit(format!(
                "the update upload holds {} bytes, stage {}'s takes {want}",
                bytes.len(),
                self.shard.stage
            )));
        }
        Ok(&bytes[..self.weights_len()])
    }

    /// Reads the moments and the applied gradient of an update upload for
    /// this stage whose state is the one after `step` steps (0-based: the
    /// update replayed is step `step + 1`'s). Refused unless it holds
    /// exactly [`StageWorker::update_len`] bytes and the norm is finite and
    /// not negative.
    pub fn decode_update(&self, bytes: &[u8], step: u64) -> Result<UpdateUpload, PipelineError> {
        self.update_params(bytes)?;
        let w = self.weights_len();
        let arrays = |k: usize| self.per_param(&bytes[k * w..(k + 1) * w]);
        let word = |k: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[4 * w + 8 * k..4 * w + 8 * (k + 1)]);
            u64::from_le_bytes(b)
        };
        let grad_norm = f64::from_bits(word(1));
        if !grad_norm.is_finite() || grad_norm < 0.0 {
            return Err(PipelineError::Audit(format!(
                "the update upload's global norm {grad_norm} is not a norm"
            )));
        }
        let opt = AdamW {
            m: arrays(1),
            v: arrays(2),
            t: word(0),
        };
        let applied = Applied {
            step,
            grads: arrays(3),
            grad_norm,
        };
        let moments = self.moments_digest_of(&opt);
        let applied_digest = self.applied_digest_of(&applied);
        Ok(UpdateUpload {
            opt,
            applied,
            moments,
            applied_digest,
        })
    }

    /// Replays the optimizer update of step `before.step + 1` on this
    /// worker's stage, as a step does: the stage's parameters become
    /// `before`'s, its moments `up`'s, its gradients the applied ones, and
    /// AdamW steps with the run's learning rate at that step and the clip
    /// factor of the applied norm. Returns the digests of the parameters
    /// and of the moments after it, which an honest worker committed to.
    /// Meant for a worker that does not train (the coordinator's); the
    /// stage's gradients are zeroed after.
    pub fn replay_update(&mut self, before: StageState, up: UpdateUpload) -> ([u8; 32], [u8; 32]) {
        let step = before.step;
        for ((p, data), grad) in self
            .stage
            .params_mut()
            .into_iter()
            .zip(before.params)
            .zip(up.applied.grads)
        {
            p.data = data;
            p.grad = grad;
        }
        self.opt = up.opt;
        let lr = self.optim.lr_at(step);
        let clip = self.optim.clip_factor(up.applied.grad_norm);
        self.opt
            .step(&mut self.stage.params_mut(), &self.optim, lr, clip);
        self.stage.zero_grad();
        self.step = step + 1;
        (self.params_digest(), self.moments_digest_of(&self.opt))
    }
}

#[cfg(test)]
mod tests {
    use crate::pipeline::{AttackKind, Shard, StageWorker};

    const MANIFEST: &str = r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: update}
spec:
  model: {dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 16}
  data: {sources: ["CORPUS"]}
  training: {steps: 6, microBatchSize: 2, microBatches: 2, learningRate: 0.01, seed: 3, warmupSteps: 2, gradClip: 0.5}
  pipeline: {stages: 1, replicas: 1}
"#;

    /// A one-stage, one-replica worker on a small corpus, keeping updates.
    fn worker(dir: &std::path::Path) -> StageWorker {
        let corpus = dir.join("corpus.txt");
        std::fs::write(
            &corpus,
            "the quick brown fox jumps over the lazy dog. ".repeat(200),
        )
        .expect("corpus");
        let yaml = MANIFEST.replace("CORPUS", corpus.to_str().expect("path"));
        let m = pipewright_spec::parse_manifest(&yaml).expect("manifest");
        let shard = Shard {
            stage: 0,
            replica: 0,
        };
        let mut w =
            StageWorker::prepare(&m, shard, std::time::Duration::from_secs(5)).expect("worker");
        w.set_keep_update(true);
        w
    }

    /// One step of a worker that keeps its updates, as its upload and
    /// what it committed to.
    struct Stepped {
        upload: Vec<u8>,
        params_before: [u8; 32],
        moments_before: [u8; 32],
        params_after: [u8; 32],
        moments_after: [u8; 32],
        applied: [u8; 32],
    }

    /// Steps `w` once.
    fn step(w: &mut StageWorker) -> Stepped {
        let before = w.state();
        let params_before = w.params_digest();
        let moments_before = w.moments_digest_of(w.optimizer());
        w.train_step().expect("step");
        let (moments_after, applied) = w.committed_update().expect("kept");
        Stepped {
            upload: w.encode_update(&before).expect("upload"),
            params_before,
            moments_before,
            params_after: w.params_digest(),
            moments_after,
            applied,
        }
    }

    #[test]
    fn an_honest_update_replays_bit_for_bit_and_a_skipped_one_does_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = worker(dir.path());
        // The coordinator's worker: built from the manifest, never trained.
        let mut judge = worker(dir.path());
        let fresh = judge.moments_digest_of(judge.optimizer());
        for k in 0..4u64 {
            if k == 3 {
                w.set_attack(Some(crate::pipeline::Attack {
                    kind: AttackKind::Stale,
                    from_step: 4,
                }));
            }
            let Stepped {
                upload,
                params_before,
                moments_before,
                params_after,
                moments_after,
                applied,
            } = step(&mut w);
            assert_eq!(upload.len(), judge.update_len());
            if k == 0 {
                assert_eq!(
                    moments_before, fresh,
                    "the first step starts from zero moments"
                );
            }
            let params = judge.update_params(&upload).expect("the size");
            let (before, digest) = judge.decode_weights(params, k).expect("parameters");
            let up = judge.decode_update(&upload, k).expect("decode");
            assert_eq!(digest, params_before);
            assert_eq!(up.moments, moments_before);
            assert_eq!(up.applied_digest, applied);
            // Alone in the pipeline, its norm is its own gradient's.
            assert_eq!(
                judge.own_norm(&up.applied.grads).to_bits(),
                up.applied.grad_norm.to_bits(),
                "step {}",
                k + 1
            );
            let (p, m) = judge.replay_update(before, up);
            if k < 3 {
                assert_eq!((p, m), (params_after, moments_after), "step {}", k + 1);
            } else {
                // The `stale` drill skipped its update: it commits to the
                // weights and moments it holds, which do not replay.
                assert_eq!(params_after, params_before);
                assert_ne!(p, params_after);
                assert_ne!(m, moments_after);
            }
        }
    }

    /// The whole step recomputed from the parameters before it gives the
    /// gradient an honest worker applied, bit for bit, at each of 3 steps
    /// (the tied matrices aside); the `sign-flip` and `scale` drills, which
    /// a lone replica applies to its own update, do not.
    #[test]
    fn the_applied_gradient_is_the_one_the_steps_micro_batches_give() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut judge = worker(dir.path());
        // One stage samples its tokens: its evidence holds no payload.
        let set: std::collections::BTreeMap<u64, crate::pipeline::Evidence> = (0..2)
            .map(|m| (m, crate::pipeline::Evidence::default()))
            .collect();
        for attack in [
            None,
            Some(AttackKind::SignFlip),
            Some(AttackKind::Scale(100.0)),
        ] {
            let mut w = worker(dir.path());
            w.set_attack(attack.map(|kind| crate::pipeline::Attack { kind, from_step: 3 }));
            for k in 0..3u64 {
                let Stepped { upload, .. } = step(&mut w);
                let params = judge.update_params(&upload).expect("the size");
                let (mut before, _) = judge.decode_weights(params, k).expect("parameters");
                let up = judge.decode_update(&upload, k).expect("decode");
                let (_, grads) = judge
                    .recompute_step_detached(&mut before, k, 0, &[0, 1], &set, 0.5, 1)
                    .expect("recomputed");
                let why = judge.applied_mismatch(&grads, &up.applied.grads);
                if attack.is_none() || k < 2 {
                    assert_eq!(why, None, "{attack:?} step {}", k + 1);
                } else {
                    let why = why.expect("another gradient");
                    assert!(
                        why.contains("is not the one its micro-batches give"),
                        "{why}"
                    );
                }
            }
        }
        // Evidence of other micro-batches than the step's is refused.
        let mut w = worker(dir.path());
        let Stepped { upload, .. } = step(&mut w);
        let (mut before, _) = judge
            .decode_weights(judge.update_params(&upload).expect("size"), 0)
            .expect("parameters");
        assert!(judge
            .recompute_step_detached(&mut before, 0, 0, &[0], &set, 0.5, 0)
            .is_err());
        // An audited micro-batch outside the recomputed ones is refused.
        let two: std::collections::BTreeMap<u64, crate::pipeline::Evidence> =
            (0..2).map(|m| (m, Default::default())).collect();
        let e = judge
            .recompute_step_detached(&mut before, 0, 0, &[0, 1], &two, 0.5, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("micro-batch 2"), "{e}");
    }

    #[test]
    fn a_made_up_norm_replays_but_is_not_the_steps_norm() {
        // A worker that claims a huge global norm clips its gradient to
        // almost nothing and still replays: only the norm check catches it.
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = worker(dir.path());
        let before = w.state();
        w.train_step().expect("step");
        let honest = w.last_applied().expect("kept").grad_norm;
        let mut judge = worker(dir.path());
        let mut upload = w.encode_update(&before).expect("upload");
        let at = upload.len() - 8;
        upload[at..].copy_from_slice(&1e30f64.to_bits().to_le_bytes());
        let params = judge.update_params(&upload).expect("the size");
        let (state, _) = judge.decode_weights(params, 0).expect("parameters");
        let up = judge.decode_update(&upload, 0).expect("decode");
        assert_eq!(
            judge.own_norm(&up.applied.grads).to_bits(),
            honest.to_bits()
        );
        assert_ne!(up.applied.grad_norm.to_bits(), honest.to_bits());
        // Its replay is self-consistent: the digests of what a worker that
        // applied that norm would hold.
        let (p, _) = judge.replay_update(state, up);
        assert_ne!(p, w.params_digest(), "not the honest update");
    }

    #[test]
    fn malformed_update_uploads_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = worker(dir.path());
        let upload = step(&mut w).upload;
        let judge = worker(dir.path());
        for n in [0, upload.len() - 1, upload.len() + 8] {
            let mut b = upload.clone();
            b.resize(n, 0);
            let e = judge.decode_update(&b, 0).unwrap_err().to_string();
            assert!(e.contains("bytes"), "{e}");
        }
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut b = upload.clone();
            let at = b.len() - 8;
            b[at..].copy_from_slice(&bad.to_bits().to_le_bytes());
            let e = judge.decode_update(&b, 0).unwrap_err().to_string();
            assert!(e.contains("not a norm"), "{e}");
        }
        // One gradient value changed: another applied digest.
        let good = judge
            .decode_update(&upload, 0)
            .expect("decode")
            .applied_digest;
        let mut b = upload.clone();
        let at = 3 * judge.weights_len() + 4;
        b[at] ^= 1;
        assert_ne!(
            judge.decode_update(&b, 0).expect("decode").applied_digest,
            good
        );
        // Without a kept gradient there is nothing to upload.
        w.set_keep_update(false);
        assert!(w.committed_update().is_none());
        assert!(w.encode_update(&w.state()).is_err());
    }
}
