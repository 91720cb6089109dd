//! A pipeline stage: a contiguous range of blocks, plus the embedding on the
//! first stage and the final norm, LM head and loss on the last. Under the
//! learned low-rank bottleneck (codec `lowrank`, see [`super::bottleneck`])
//! a stage that is not first also begins with the boundary's up-projection
//! and one that is not last ends with the next boundary's down-projection,
//! so its input and output are `rank` wide instead of `dim`.
//!
//! A stage keeps one cache per micro-batch in flight, so a schedule may run
//! several forwards before their backwards (1F1B, GPipe) and may run the
//! input half of a backward long before its weight half (zero-bubble).
//!
//! Under activation recomputation ([`Stage::set_recompute`]) each block
//! keeps less of a micro-batch in flight (see [`super::block`]); the input
//! half of the backward then recomputes one block at a time and runs that
//! block's weight half at once, so only one block's intermediates exist at
//! a time. Each parameter's gradient still receives the same terms in the
//! same order (the weight halves of a stage run in the order of its input
//! halves under every schedule), so the gradients are the same bits.

mod groups;
#[cfg(test)]
mod recompute_tests;

use std::collections::HashMap;
use std::ops::Range;

use super::block::{Block, BlockSaved, Recompute};
use super::bottleneck::{Projection, ProjectionCache};
use super::embedding::Embedding;
use super::head::{Head, HeadCache};
use super::{ModelConfig, Param};
use crate::kernels::ops::Rope;

/// Problems a stage refuses; inputs may come from untrusted peers.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StageError {
    /// The first stage takes token ids, the others hidden states.
    #[error("stage {stage} expects {expected} as input")]
    WrongInput {
        /// Stage index.
        stage: usize,
        /// What it expects.
        expected: &'static str,
    },
    /// A tensor's length does not match the micro-batch shape.
    #[error("{what} has {got} values, expected {expected}")]
    Shape {
        /// Which tensor.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the shape implies.
        expected: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    Token {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The last stage needs targets to compute the loss.
    #[error("the last stage needs targets")]
    MissingTargets,
    /// A backward for a micro-batch this stage has no forward for.
    #[error("micro-batch {0} has no forward in flight on this stage")]
    UnknownMicroBatch(u64),
    /// A micro-batch id reused while still in flight.
    #[error("micro-batch {0} is already in flight on this stage")]
    DuplicateMicroBatch(u64),
    /// Weight half requested before the input half.
    #[error("micro-batch {0}: weight gradient requested before the input gradient")]
    OutOfOrder(u64),
}

/// Input of a stage's forward.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// Token ids `[B·T]` (first stage).
    Tokens(&'a [u32]),
    /// Hidden states `[B·T, W]` (other stages), `W` being
    /// [`Stage::boundary_width_in`].
    Hidden(&'a [f32]),
}

/// Result of a stage's forward.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOutput {
    /// Hidden states for the next stage.
    Hidden(Vec<f32>),
    /// Mean loss of the micro-batch (last stage).
    Loss(f32),
}

#[derive(Debug, Default)]
struct MicroBatchCache {
    tokens: Vec<u32>,
    rows: usize,
    blocks: Vec<BlockSaved>,
    head: Option<HeadCache>,
    up: Option<ProjectionCache>,
    down: Option<ProjectionCache>,
    input_done: bool,
    /// Gradient reaching the first stage's embedding, kept for the weight half.
    dembed: Vec<f32>,
}

/// One pipeline stage with its parameters and in-flight micro-batches.
#[derive(Debug)]
pub struct Stage {
    /// Stage index.
    pub index: usize,
    /// Number of stages in the pipeline.
    pub stages: usize,
    /// Blocks held by this stage.
    pub layers: Range<usize>,
    cfg: ModelConfig,
    embed: Option<Embedding>,
    /// Up-projection of the boundary before this stage (lowrank, not first).
    up: Option<Projection>,
    blocks: Vec<Block>,
    /// Down-projection of the boundary after this stage (lowrank, not last).
    down: Option<Projection>,
    head: Option<Head>,
    rope: Rope,
    recompute: Recompute,
    inflight: HashMap<u64, MicroBatchCache>,
}

impl Stage {
    /// Build stage `index` of `stages`, holding blocks `layers`, initialised
    /// from `seed` (identically to the same tensors of any other split).
    pub fn new(
        cfg: &ModelConfig,
        index: usize,
        stages: usize,
        layers: Range<usize>,
        seed: u64,
    ) -> Self {
        Self::with_bottleneck(cfg, index, stages, layers, seed, None)
    }

    /// [`Stage::new`] with a learned low-rank bottleneck of width `rank` at
    /// every stage boundary (`None`: no bottleneck, as [`Stage::new`]). Every
    /// stage of a pipeline must be built with the same `rank`; it should be
    /// in `1..dim` (the manifest's rules make sure), and is clamped there.
    pub fn with_bottleneck(
        cfg: &ModelConfig,
        index: usize,
        stages: usize,
        layers: Range<usize>,
        seed: u64,
        rank: Option<usize>,
    ) -> Self {
        let rank = rank.map(|r| r.clamp(1, cfg.dim.max(1)));
        let up = match rank {
            Some(r) if index > 0 => Some(Projection::up(seed, index - 1, cfg.dim, r)),
            _ => None,
        };
        let down = match rank {
            Some(r) if index + 1 < stages => Some(Projection::down(seed, index, cfg.dim, r)),
            _ => None,
        };
        Self {
            index,
            stages,
            embed: (index == 0).then(|| Embedding::new(cfg, seed)),
            up,
            blocks: layers.clone().map(|l| Block::new(cfg, l, seed)).collect(),
            down,
            head: (index + 1 == stages).then(|| Head::new(cfg, seed)),
            rope: Rope::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta),
            layers,
            cfg: cfg.clone(),
            recompute: Recompute::Off,
            inflight: HashMap::new(),
        }
    }

    /// Whether this stage holds the embedding.
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    /// Whether this stage holds the head and the loss.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.stages
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Width of the bottleneck at this stage's boundaries, if any.
    pub fn bottleneck_rank(&self) -> Option<usize> {
        self.up
            .as_ref()
            .map(Projection::width_in)
            .or_else(|| self.down.as_ref().map(Projection::width_out))
    }

    /// Values per row of the hidden states this stage receives (and of the
    /// gradient it sends back): `rank` under the bottleneck, else `dim`.
    /// Meaningless on the first stage, which takes token ids.
    pub fn boundary_width_in(&self) -> usize {
        self.up.as_ref().map_or(self.cfg.dim, Projection::width_in)
    }

    /// Values per row of the hidden states this stage sends on (and of the
    /// gradient it receives): `rank` under the bottleneck, else `dim`.
    /// Meaningless on the last stage, which ends in the loss.
    pub fn boundary_width_out(&self) -> usize {
        self.down
            .as_ref()
            .map_or(self.cfg.dim, Projection::width_out)
    }

    /// Choose what each block keeps of a micro-batch for its backward
    /// (`spec.training.recompute`); applies to forwards from now on.
    pub fn set_recompute(&mut self, policy: Recompute) {
        self.recompute = policy;
    }

    /// The activation recomputation policy.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Micro-batches with a forward but no completed backward.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn check_tokens(
        &self,
        tokens: &[u32],
        expected: usize,
        what: &'static str,
    ) -> Result<(), StageError> {
        if tokens.len() != expected {
            return Err(StageError::Shape {
                what,
                got: tokens.len(),
                expected,
            });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(StageError::Token {
                token,
                vocab: self.cfg.vocab,
            });
        }
        Ok(())
    }

    /// Run the stage's layers on `batch` sequences of the model's length and
    /// remember what the backward needs under `mb`. On the last stage the
    /// backward yields the gradient of `loss_scale · loss`.
    pub fn forward(
        &mut self,
        mb: u64,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        batch: usize,
        loss_scale: f32,
    ) -> Result<StageOutput, StageError> {
        self.forward_inner(Some(mb), input, targets, batch, loss_scale)
    }

    /// Forward without keeping anything for a backward (evaluation). On the
    /// last stage with targets it returns the loss; without, the logits.
    pub fn infer(
        &mut self,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        batch: usize,
    ) -> Result<StageOutput, StageError> {
        self.forward_inner(None, input, targets, batch, 1.0)
    }

    fn forward_inner(
        &mut self,
        mb: Option<u64>,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        batch: usize,
        loss_scale: f32,
    ) -> Result<StageOutput, StageError> {
        let seq = self.cfg.seq_len;
        let rows = batch * seq;
        if let Some(mb) = mb {
            if self.inflight.contains_key(&mb) {
                return Err(StageError::DuplicateMicroBatch(mb));
            }
        }
        let mut cache = MicroBatchCache {
            rows,
            ..Default::default()
        };
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(tokens), Some(embed)) => {
                self.check_tokens(tokens, rows, "tokens")?;
                cache.tokens = tokens.to_vec();
                embed.forward(tokens)
            }
            (StageInput::Hidden(h), None) => {
                let expected = rows * self.boundary_width_in();
                if h.len() != expected {
                    return Err(StageError::Shape {
                        what: "hidden states",
                        got: h.len(),
                        expected,
                    });
                }
                if let Some(bad) = h.iter().position(|v| !v.is_finite()) {
                    return Err(StageError::Shape {
                        what: "finite hidden states",
                        got: bad,
                        expected,
                    });
                }
                match &self.up {
                    Some(up) => {
                        let (x, c) = up.forward(h.to_vec());
                        if mb.is_some() {
                            cache.up = Some(c);
                        }
                        x
                    }
                    None => h.to_vec(),
                }
            }
            (_, Some(_)) => {
                return Err(StageError::WrongInput {
                    stage: self.index,
                    expected: "token ids",
                })
            }
            (_, None) => {
                return Err(StageError::WrongInput {
                    stage: self.index,
                    expected: "hidden states",
                })
            }
        };
        for block in &self.blocks {
            if mb.is_some() {
                let (y, c) = block.forward_saving(x, batch, seq, &self.rope, self.recompute);
                x = y;
                cache.blocks.push(c);
            } else {
                x = block.forward(x, batch, seq, &self.rope).0;
            }
        }
        let out = match &self.head {
            None => match &self.down {
                Some(down) => {
                    let (z, c) = down.forward(x);
                    if mb.is_some() {
                        cache.down = Some(c);
                    }
                    StageOutput::Hidden(z)
                }
                None => StageOutput::Hidden(x),
            },
            Some(head) => match (targets, mb) {
                (Some(targets), _) => {
                    self.check_tokens(targets, rows, "targets")?;
                    let (loss, c) = head.forward(x, targets, loss_scale);
                    cache.head = Some(c);
                    StageOutput::Loss(loss)
                }
                (None, None) => StageOutput::Hidden(head.logits(x)),
                (None, Some(_)) => return Err(StageError::MissingTargets),
            },
        };
        if let Some(mb) = mb {
            self.inflight.insert(mb, cache);
        }
        Ok(out)
    }

    /// Input half of the backward of micro-batch `mb`. Takes the gradient
    /// w.r.t. this stage's output (`None` on the last stage, which starts
    /// from its loss) and returns the gradient for the previous stage
    /// (`None` on the first).
    pub fn backward_input(
        &mut self,
        mb: u64,
        grad: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>, StageError> {
        let width_out = self.boundary_width_out();
        let cache = self
            .inflight
            .get_mut(&mb)
            .ok_or(StageError::UnknownMicroBatch(mb))?;
        if cache.input_done {
            return Err(StageError::DuplicateMicroBatch(mb));
        }
        let mut dx = match (&self.head, grad) {
            (Some(head), _) => {
                head.backward_input(cache.head.as_mut().ok_or(StageError::MissingTargets)?)
            }
            (None, Some(g)) => {
                let expected = cache.rows * width_out;
                if g.len() != expected {
                    return Err(StageError::Shape {
                        what: "output gradient",
                        got: g.len(),
                        expected,
                    });
                }
                match (&self.down, cache.down.as_mut()) {
                    (Some(down), Some(c)) => down.backward_input(c, g.to_vec()),
                    _ => g.to_vec(),
                }
            }
            (None, None) => {
                return Err(StageError::WrongInput {
                    stage: self.index,
                    expected: "an output gradient",
                })
            }
        };
        let (batch, seq) = (cache.rows / self.cfg.seq_len.max(1), self.cfg.seq_len);
        for (block, saved) in self.blocks.iter_mut().zip(cache.blocks.iter_mut()).rev() {
            match saved {
                BlockSaved::All(c) => dx = block.backward_input(c, dx, &self.rope),
                _ => {
                    // Recompute this block, run both halves of its backward
                    // and let its intermediates go before the next block.
                    let mut c = block.recompute(std::mem::take(saved), batch, seq, &self.rope);
                    dx = block.backward_input(&mut c, dx, &self.rope);
                    block.backward_weight(&c);
                }
            }
        }
        if let (Some(up), Some(c)) = (&self.up, cache.up.as_mut()) {
            dx = up.backward_input(c, dx);
        }
        cache.input_done = true;
        if self.embed.is_some() {
            cache.dembed = dx;
            Ok(None)
        } else {
            Ok(Some(dx))
        }
    }

    /// Weight half of the backward of `mb`: accumulates parameter gradients
    /// and releases the micro-batch's cache.
    pub fn backward_weight(&mut self, mb: u64) -> Result<(), StageError> {
        self.backward_weight_each(mb, &mut |_| {})
    }

    /// Both halves of the backward.
    pub fn backward(
        &mut self,
        mb: u64,
        grad: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>, StageError> {
        let dx = self.backward_input(mb, grad)?;
        self.backward_weight(mb)?;
        Ok(dx)
    }

    /// Drop every in-flight micro-batch (after a failure upstream).
    pub fn clear_in_flight(&mut self) {
        self.inflight.clear();
    }

    /// All parameters in a fixed order: embedding, bottleneck up-projection,
    /// blocks, bottleneck down-projection, final norm, head.
    pub fn params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        if let Some(e) = &self.embed {
            v.push(&e.weight);
        }
        if let Some(u) = &self.up {
            v.push(&u.weight);
        }
        for b in &self.blocks {
            v.extend(b.params());
        }
        if let Some(d) = &self.down {
            v.push(&d.weight);
        }
        if let Some(h) = &self.head {
            v.push(&h.norm.weight);
            v.push(&h.weight);
        }
        v
    }

    /// All parameters, mutably, in the order of [`Stage::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = Vec::new();
        if let Some(e) = &mut self.embed {
            v.push(&mut e.weight);
        }
        if let Some(u) = &mut self.up {
            v.push(&mut u.weight);
        }
        for b in &mut self.blocks {
            v.extend(b.params_mut());
        }
        if let Some(d) = &mut self.down {
            v.push(&mut d.weight);
        }
        if let Some(h) = &mut self.head {
            v.push(&mut h.norm.weight);
            v.push(&mut h.weight);
        }
        v
    }

    /// The embedding matrix, on the first stage.
    pub fn embedding_mut(&mut self) -> Option<&mut Param> {
        self.embed.as_mut().map(|e| &mut e.weight)
    }

    /// The LM head matrix, on the last stage, and whether it is tied.
    pub fn head_mut(&mut self) -> Option<(&mut Param, bool)> {
        self.head.as_mut().map(|h| (&mut h.weight, h.tied))
    }

    /// The indices in [`Stage::params`] of the matrices a tied model's
    /// first and last stage share: the embedding (on the first stage) and
    /// the LM head (on the last). Empty in an untied model.
    pub fn tied_indices(&self) -> Vec<usize> {
        if !self.cfg.tied {
            return Vec::new();
        }
        let mut v = Vec::new();
        if self.embed.is_some() {
            v.push(0);
        }
        if self.head.as_ref().is_some_and(|h| h.tied) {
            v.push(self.params().len() - 1);
        }
        v
    }

    /// Set every gradient to zero.
    pub fn zero_grad(&mut self) {
        for p in self.params_mut() {
            p.zero_grad();
        }
    }
}

/// Make a tied LM head and the embedding see the same gradient: the sum of
/// both. `stages` is the whole pipeline in order (one process holding every
/// stage); in a multi-process run the first and last stage exchange the two
/// gradients instead and each calls [`sum_tied`].
pub fn tie_gradients(stages: &mut [Stage]) {
    let Some(last) = stages.last() else { return };
    if !last.cfg.tied {
        return;
    }
    if let [only] = stages {
        if let (Some(e), Some(h)) = (only.embed.as_mut(), only.head.as_mut()) {
            sum_tied(&mut e.weight.grad, &mut h.weight.grad);
        }
        return;
    }
    let (first, rest) = stages.split_at_mut(1);
    if let (Some(e), Some(h)) = (
        first[0].embed.as_mut(),
        rest.last_mut().and_then(|s| s.head.as_mut()),
    ) {
        sum_tied(&mut e.weight.grad, &mut h.weight.grad);
    }
}

/// `a, b ← a + b`.
pub fn sum_tied(a: &mut [f32], b: &mut [f32]) {
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        let s = *x + *y;
        *x = s;
        *y = s;
    }
}
