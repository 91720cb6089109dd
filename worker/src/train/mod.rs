//! Training in one process: every stage of the pipeline held locally and
//! run in order, every replica's micro-batches accumulated into one step.
//!
//! This is the reference the multi-process pipeline must reproduce: the
//! same seed and global batch give the same per-step loss, because samples
//! are a pure function of (seed, step, micro-batch, replica) and the loss of
//! each micro-batch is scaled by `1 / (replicas · micro_batches)`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pipewright_spec::TrainingRun;
use tracing::warn;

use crate::checkpoint::{self, CheckpointError, Meta};
use crate::data::{sample_train, val_batches, Batch, Corpus, DataError, Tokenizer};
use crate::model::stage::tie_gradients;
use crate::model::{partition, ModelConfig, Stage, StageError, StageInput, StageOutput};
use crate::optim::{grad_sq_sum, AdamW, OptimConfig};

/// Errors of the local trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Corpus or tokenizer.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Checkpoint I/O.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A stage refused its input (a bug when every stage is local).
    #[error("stage: {0}")]
    Stage(#[from] StageError),
    /// The loss stopped being a number.
    #[error("loss is {loss} at step {step}: training diverged (lower training.learningRate or raise training.warmupSteps)")]
    Diverged {
        /// Step at which it happened.
        step: u64,
        /// The loss value.
        loss: f32,
    },
    /// The CUDA device failed or cannot run this model.
    #[error("cuda device: {0}")]
    Device(String),
    /// The checkpoint belongs to a different model.
    #[error("checkpoint does not match the manifest: {0}")]
    Mismatch(String),
}

/// Outcome of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// Step index (0-based) that was completed.
    pub step: u64,
    /// Mean loss over the step's micro-batches (nats per token).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Outcome of an evaluation on the validation split.
#[derive(Clone, Copy, Debug)]
pub struct EvalReport {
    /// Mean loss, nats per token.
    pub loss: f64,
    /// Loss in bits per byte of text.
    pub bits_per_byte: f64,
    /// Tokens scored.
    pub tokens: usize,
}

/// A run held entirely in this process.
pub struct Trainer {
    /// The manifest.
    pub manifest: TrainingRun,
    /// Resolved model shape.
    pub model: ModelConfig,
    /// Optimiser settings.
    pub optim: OptimConfig,
    /// The pipeline's stages, in order.
    pub stages: Vec<Stage>,
    /// One optimizer per stage.
    pub opts: Vec<AdamW>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Training and validation tokens.
    pub corpus: Corpus,
    /// Steps completed.
    pub step: u64,
    /// Mean loss of every completed step.
    pub losses: Vec<f32>,
    /// The whole model on a CUDA device, when training runs there
    /// ([`Trainer::use_device`]); the stages above are then refreshed from
    /// it before each evaluation and checkpoint.
    #[cfg(feature = "cuda")]
    pub device: Option<crate::model::cuda::DeviceModel>,
}

impl Trainer {
    /// A fresh run: tokenizer (trained on the corpus if the manifest asks),
    /// corpus, and stages initialised from the seed.
    pub fn new(manifest: TrainingRun) -> Result<Self, TrainError> {
        let spec = &manifest.spec;
        let (tokenizer, corpus) = crate::data::prepare(&spec.data)?;
        corpus.check_seq_len(spec.model.seq_len)?;
        let model = ModelConfig::from_spec(&spec.model, tokenizer.vocab_size());
        let n = spec.pipeline.stages;
        let seed = spec.training.seed;
        let rank = spec.pipeline.lowrank_rank(model.dim);
        let stages: Vec<Stage> = partition(&model, n, &[])
            .into_iter()
            .enumerate()
            .map(|(i, layers)| {
                let mut s = Stage::with_bottleneck(&model, i, n, layers, seed, rank);
                s.set_recompute(spec.training.recompute);
                s
            })
            .collect();
        let mut stages = stages;
        let opts = stages
            .iter_mut()
            .map(|s| AdamW::new(&s.params_mut()))
            .collect();
        Ok(Self {
            optim: OptimConfig::from_spec(&spec.training),
            manifest,
            model,
            stages,
            opts,
            tokenizer,
            corpus,
            step: 0,
            losses: Vec::new(),
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Continue the run saved at `checkpoint` (a step directory or a run
    /// directory with `latest`). The manifest comes from the checkpoint;
    /// `steps` may extend the run.
    pub fn resume(checkpoint: &Path, steps: Option<u64>) -> Result<Self, TrainError> {
        let loaded = checkpoint::load(checkpoint)?;
        let mut manifest = loaded.meta.manifest.clone();
        if let Some(steps) = steps {
            manifest.spec.training.steps = steps;
        }
        let corpus = Corpus::load(&manifest.spec.data, &loaded.tokenizer)?;
        corpus.check_seq_len(loaded.meta.model.seq_len)?;
        let fp = hex::encode(corpus.fingerprint());
        if fp != loaded.meta.data_fingerprint {
            warn!(checkpoint = %checkpoint.display(), "the corpus differs from the one this checkpoint was trained on; samples will differ from an uninterrupted run");
        }
        let mut stages = loaded.stages;
        for s in &mut stages {
            s.set_recompute(manifest.spec.training.recompute);
        }
        Ok(Self {
            optim: OptimConfig::from_spec(&manifest.spec.training),
            manifest,
            model: loaded.meta.model,
            stages,
            opts: loaded.opts,
            tokenizer: loaded.tokenizer,
            corpus,
            step: loaded.meta.step,
            losses: loaded.meta.losses,
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Tokens in one optimizer step (all replicas and micro-batches).
    pub fn tokens_per_step(&self) -> usize {
        let t = &self.manifest.spec.training;
        self.manifest.spec.pipeline.replicas
            * t.micro_batches
            * t.micro_batch_size
            * self.model.seq_len
    }

    /// Whether every planned step is done.
    pub fn finished(&self) -> bool {
        self.step >= self.manifest.spec.training.steps
    }

    /// Forward and backward of one micro-batch through every stage.
    fn micro_batch(&mut self, id: u64, batch: &Batch, scale: f32) -> Result<f32, TrainError> {
        let n = self.stages.len();
        let mut hidden: Option<Vec<f32>> = None;
        let mut loss = f32::NAN;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let input = match &hidden {
                None => StageInput::Tokens(&batch.tokens),
                Some(h) => StageInput::Hidden(h),
            };
            let targets = (i + 1 == n).then_some(&batch.targets[..]);
            match stage.forward(id, input, targets, batch.rows, scale)? {
                StageOutput::Hidden(h) => hidden = Some(h),
                StageOutput::Loss(l) => loss = l,
            }
        }
        let mut grad: Option<Vec<f32>> = None;
        for stage in self.stages.iter_mut().rev() {
            grad = stage.backward(id, grad.as_deref())?;
        }
        Ok(loss)
    }

    /// One optimizer step over the global batch.
    pub fn train_step(&mut self) -> Result<StepReport, TrainError> {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return self.device_step();
        }
        let start = Instant::now();
        let step = self.step;
        let loss = self.run_micro_batches(|t, id, batch, scale| t.micro_batch(id, batch, scale))?;
        tie_gradients(&mut self.stages);
        let grad_norm = self.global_grad_norm();
        let clip = self.optim.clip_factor(grad_norm);
        let lr = self.optim.lr_at(step);
        for (stage, opt) in self.stages.iter_mut().zip(&mut self.opts) {
            opt.step(&mut stage.params_mut(), &self.optim, lr, clip);
            stage.zero_grad();
        }
        Ok(self.finish_step(loss, grad_norm, lr, start))
    }

    /// Run every micro-batch of the current step through `run` (forward and
    /// backward, gradients accumulated at the step's loss scale) and return
    /// the step's mean loss, refusing a non-finite one.
    fn run_micro_batches(
        &mut self,
        mut run: impl FnMut(&mut Self, u64, &Batch, f32) -> Result<f32, TrainError>,
    ) -> Result<f32, TrainError> {
        let t = &self.manifest.spec.training;
        let (seed, rows, micro) = (t.seed, t.micro_batch_size, t.micro_batches);
        let replicas = self.manifest.spec.pipeline.replicas;
        let scale = 1.0 / (replicas * micro) as f32;
        let step = self.step;
        let mut loss_sum = 0.0f64;
        for replica in 0..replicas {
            for mb in 0..micro {
                let batch = sample_train(
                    &self.corpus,
                    seed,
                    step,
                    mb as u64,
                    replica as u64,
                    rows,
                    self.model.seq_len,
                );
                let id = (replica * micro + mb) as u64;
                loss_sum += run(self, id, &batch, scale)? as f64;
            }
        }
        let loss = (loss_sum / (replicas * micro) as f64) as f32;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step, loss });
        }
        Ok(loss)
    }

    /// Count the step as done and report it.
    fn finish_step(&mut self, loss: f32, grad_norm: f64, lr: f64, start: Instant) -> StepReport {
        let step = self.step;
        self.step += 1;
        self.losses.push(loss);
        StepReport {
            step,
            loss,
            grad_norm,
            lr,
            tokens: self.tokens_per_step(),
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// Norm of the whole model's gradient, a tied head counted once.
    pub fn global_grad_norm(&self) -> f64 {
        let tied = self.model.tied;
        let sq: f64 = self
            .stages
            .iter()
            .map(|s| {
                grad_sq_sum(
                    s.params()
                        .into_iter()
                        .filter(|p| !(tied && p.name == crate::model::head::LM_HEAD_NAME)),
                )
            })
            .sum();
        sq.sqrt()
    }

    /// Mean validation loss over `batches` fixed validation batches.
    pub fn evaluate(&mut self, batches: usize) -> Result<EvalReport, TrainError> {
        #[cfg(feature = "cuda")]
        self.sync_host()?;
        let rows = self.manifest.spec.training.micro_batch_size;
        evaluate(&mut self.stages, &self.corpus, batches, rows)
    }

    /// Directory of this run's checkpoints.
    pub fn checkpoint_root(&self) -> PathBuf {
        run_dir(&self.manifest)
    }

    /// Write a checkpoint of the current step.
    pub fn save_checkpoint(&mut self, root: &Path) -> Result<PathBuf, TrainError> {
        #[cfg(feature = "cuda")]
        self.sync_host()?;
        let meta = Meta {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            manifest: self.manifest.clone(),
            model: self.model.clone(),
            stage_layers: self.stages.iter().map(|s| s.layers.clone()).collect(),
            seed: self.manifest.spec.training.seed,
            data_fingerprint: hex::encode(self.corpus.fingerprint()),
            losses: self.losses.clone(),
        };
        let keep = self.manifest.spec.checkpoint.keep;
        Ok(checkpoint::save(
            root,
            &meta,
            &self.stages,
            &self.opts,
            &self.tokenizer,
            keep,
        )?)
    }
}

/// Mean validation loss and bits per byte of `stages` over `batches` fixed
/// validation batches of `rows` sequences.
pub fn evaluate(
    stages: &mut [Stage],
    corpus: &Corpus,
    batches: usize,
    rows: usize,
) -> Result<EvalReport, TrainError> {
    let seq = stages
        .first()
        .map(|s| s.config().seq_len)
        .ok_or_else(|| TrainError::Mismatch("no stages".into()))?;
    let mut sum = 0.0f64;
    let mut tokens = 0usize;
    for batch in val_batches(corpus, batches, rows, seq) {
        sum += infer_loss(stages, &batch)? * batch.targets.len() as f64;
        tokens += batch.targets.len();
    }
    let loss = sum / tokens.max(1) as f64;
    let bytes_per_token = corpus.val_bytes() as f64 / corpus.val_tokens().len().max(1) as f64;
    Ok(EvalReport {
        loss,
        bits_per_byte: loss / std::f64::consts::LN_2 / bytes_per_token,
        tokens,
    })
}

/// Mean loss of `batch` through `stages` without keeping activations.
pub fn infer_loss(stages: &mut [Stage], batch: &Batch) -> Result<f64, TrainError> {
    let n = stages.len();
    let mut hidden: Option<Vec<f32>> = None;
    for (i, stage) in stages.iter_mut().enumerate() {
        let input = match &hidden {
            None => StageInput::Tokens(&batch.tokens),
            Some(h) => StageInput::Hidden(h),
        };
        match stage.infer(
            input,
            (i + 1 == n).then_some(&batch.targets[..]),
            batch.rows,
        )? {
            StageOutput::Hidden(h) => hidden = Some(h),
            StageOutput::Loss(l) => return Ok(l as f64),
        }
    }
    Err(TrainError::Mismatch(
        "the last stage produced no loss".into(),
    ))
}

/// Logits `[T, V]` of one sequence of up to `seq_len` tokens.
pub fn logits(stages: &mut [Stage], tokens: &[u32]) -> Result<Vec<f32>, TrainError> {
    let mut hidden: Option<Vec<f32>> = None;
    for stage in stages.iter_mut() {
        let input = match &hidden {
            None => StageInput::Tokens(tokens),
            Some(h) => StageInput::Hidden(h),
        };
        match stage.infer(input, None, 1)? {
            StageOutput::Hidden(h) => hidden = Some(h),
            StageOutput::Loss(_) => {
                return Err(TrainError::Mismatch("loss without targets".into()))
            }
        }
    }
    hidden.ok_or_else(|| TrainError::Mismatch("no stages".into()))
}

/// Default output directory of a run: `checkpoint.dir`, else `runs/<name>`.
pub fn run_dir(manifest: &TrainingRun) -> PathBuf {
    match &manifest.spec.checkpoint.dir {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("runs").join(&manifest.metadata.name),
    }
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(test)]
mod tests;
