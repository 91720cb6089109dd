//! One transformer block (pre-norm):
//! `h = x + attn(norm₁(x))`, `y = h + mlp(norm₂(h))`.
//!
//! Activation recomputation (`spec.training.recompute`) decides what a
//! block keeps between its forward and its backward ([`BlockSaved`]):
//! everything (`none`), its input only (`full`: the backward runs the
//! block's forward again), or its input, the residual after attention and
//! the attention's internals (`selective`: the backward recomputes the two
//! norms and the MLP). The kernels are deterministic, so a recomputed
//! intermediate has the bits of the original and the gradients are the
//! same either way.

use super::attention::{Attention, AttentionCache};
use super::mlp::{Mlp, MlpCache};
use super::rmsnorm::{RmsNorm, RmsNormCache};
use super::{ModelConfig, Param};
use crate::kernels::ops::{add_assign, Rope};
use crate::kernels::pool;
pub use pipewright_spec::Recompute;

/// A transformer block with its parameters.
#[derive(Clone, Debug)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Attention sub-layer.
    pub attn: Attention,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm,
    /// MLP sub-layer.
    pub mlp: Mlp,
}

/// Everything one forward of the block keeps for its backward.
#[derive(Debug, Default)]
pub struct BlockCache {
    attn_norm: RmsNormCache,
    attn: AttentionCache,
    mlp_norm: RmsNormCache,
    mlp: MlpCache,
}

/// What a block keeps of one forward for its backward, by recomputation
/// policy. [`Block::recompute`] turns any of them back into a
/// [`BlockCache`].
#[derive(Debug)]
pub enum BlockSaved {
    /// Every intermediate (`recompute: none`).
    All(Box<BlockCache>),
    /// The block's input `[B·T, D]` (`recompute: full`).
    Input(Vec<f32>),
    /// The block's input, the residual stream after attention (both
    /// `[B·T, D]`) and the attention's cache without its input
    /// (`recompute: selective`).
    Attention {
        /// Block input.
        x: Vec<f32>,
        /// `x + attn(norm₁(x))`, the MLP norm's input.
        h: Vec<f32>,
        /// q, k, v, attention output and probabilities.
        attn: Box<AttentionCache>,
    },
}

impl Default for BlockSaved {
    fn default() -> Self {
        BlockSaved::Input(Vec::new())
    }
}

impl Block {
    /// Initialise block `layer`.
    pub fn new(cfg: &ModelConfig, layer: usize, seed: u64) -> Self {
        let norm = |name: &str| {
            RmsNorm::new(
                format!("model.layers.{layer}.{name}.weight"),
                cfg.dim,
                cfg.norm_eps,
            )
        };
        Self {
            attn_norm: norm("input_layernorm"),
            attn: Attention::new(cfg, layer, seed),
            mlp_norm: norm("post_attention_layernorm"),
            mlp: Mlp::new(cfg, layer, seed),
        }
    }

    /// `x[B·T, D]` → `y[B·T, D]`.
    pub fn forward(
        &self,
        x: Vec<f32>,
        batch: usize,
        seq: usize,
        rope: &Rope,
    ) -> (Vec<f32>, BlockCache) {
        let (xn, attn_norm) = self.attn_norm.forward(x);
        let (mut h, attn) = self.attn.forward(xn, batch, seq, rope);
        add_assign(&mut h, attn_norm.input());
        let (hn, mlp_norm) = self.mlp_norm.forward(h);
        let (mut y, mlp) = self.mlp.forward(hn, batch * seq);
        add_assign(&mut y, mlp_norm.input());
        (
            y,
            BlockCache {
                attn_norm,
                attn,
                mlp_norm,
                mlp,
            },
        )
    }

    /// [`Block::forward`] keeping what `policy` asks for.
    pub fn forward_saving(
        &self,
        x: Vec<f32>,
        batch: usize,
        seq: usize,
        rope: &Rope,
        policy: Recompute,
    ) -> (Vec<f32>, BlockSaved) {
        let (y, cache) = self.forward(x, batch, seq, rope);
        let saved = match policy {
            Recompute::Off => BlockSaved::All(Box::new(cache)),
            Recompute::Full => {
                let BlockCache { attn_norm, .. } = cache;
                BlockSaved::Input(attn_norm.into_input())
            }
            Recompute::Selective => {
                let BlockCache {
                    attn_norm,
                    mut attn,
                    mlp_norm,
                    ..
                } = cache;
                pool::give(attn.take_input());
                BlockSaved::Attention {
                    x: attn_norm.into_input(),
                    h: mlp_norm.into_input(),
                    attn: Box::new(attn),
                }
            }
        };
        (y, saved)
    }

    /// Rebuild every intermediate of a forward from what it saved: the same
    /// values, bit for bit, as [`Block::forward`] kept.
    pub fn recompute(
        &self,
        saved: BlockSaved,
        batch: usize,
        seq: usize,
        rope: &Rope,
    ) -> BlockCache {
        match saved {
            BlockSaved::All(cache) => *cache,
            BlockSaved::Input(x) => {
                let (y, cache) = self.forward(x, batch, seq, rope);
                pool::give(y);
                cache
            }
            BlockSaved::Attention { x, h, mut attn } => {
                let (xn, attn_norm) = self.attn_norm.forward(x);
                attn.restore_input(xn);
                let (hn, mlp_norm) = self.mlp_norm.forward(h);
                let (y, mlp) = self.mlp.forward(hn, batch * seq);
                pool::give(y);
                BlockCache {
                    attn_norm,
                    attn: *attn,
                    mlp_norm,
                    mlp,
                }
            }
        }
    }

    /// Input half of the backward: `dy` → `dx`.
    pub fn backward_input(&self, cache: &mut BlockCache, dy: Vec<f32>, rope: &Rope) -> Vec<f32> {
        let dhn = self.mlp.backward_input(&mut cache.mlp, pool::copy_of(&dy));
        // The residual passes dy straight through; the norm adds its part.
        let mut dh = dy;
        self.mlp_norm
            .backward_input(&mut cache.mlp_norm, dhn, &mut dh);
        let dxn = self
            .attn
            .backward_input(&mut cache.attn, pool::copy_of(&dh), rope);
        let mut dx = dh;
        self.attn_norm
            .backward_input(&mut cache.attn_norm, dxn, &mut dx);
        dx
    }

    /// Weight half of the backward.
    pub fn backward_weight(&mut self, cache: &BlockCache) {
        self.mlp.backward_weight(&cache.mlp);
        self.mlp_norm.backward_weight(&cache.mlp_norm);
        self.attn.backward_weight(&cache.attn);
        self.attn_norm.backward_weight(&cache.attn_norm);
    }

    /// All parameters, in a fixed order.
    pub fn params(&self) -> Vec<&Param> {
        let mut v = vec![&self.attn_norm.weight];
        v.extend(self.attn.params());
        v.push(&self.mlp_norm.weight);
        v.extend(self.mlp.params());
        v
    }

    /// All parameters, mutably, in the order of [`Block::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = vec![&mut self.attn_norm.weight];
        v.extend(self.attn.params_mut());
        v.push(&mut self.mlp_norm.weight);
        v.extend(self.mlp.params_mut());
        v
    }
}
