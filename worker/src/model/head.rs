//! Final RMSNorm, LM head and cross-entropy loss.

use super::embedding::EMBED_NAME;
use super::rmsnorm::{RmsNorm, RmsNormCache};
use super::{init, linear, ModelConfig, Param};
use crate::kernels::ops::cross_entropy;
use crate::kernels::pool;

/// Name of the untied LM head matrix.
pub const LM_HEAD_NAME: &str = "lm_head.weight";

/// The last stage's extra layers.
#[derive(Clone, Debug)]
pub struct Head {
    /// `model.norm.weight`
    pub norm: RmsNorm,
    /// `[V, D]`. When embeddings are tied this is a replica of the embedding
    /// matrix: same initial values, and the pipeline sums the two gradients
    /// so both copies take identical steps.
    pub weight: Param,
    /// Whether `weight` replicates the embedding.
    pub tied: bool,
}

/// What the backward needs from one forward.
#[derive(Debug, Default)]
pub struct HeadCache {
    norm: RmsNormCache,
    xn: Vec<f32>,
    dlogits: Vec<f32>,
    rows: usize,
}

impl Drop for HeadCache {
    fn drop(&mut self) {
        pool::give_all([&mut self.xn, &mut self.dlogits]);
    }
}

impl Head {
    /// Initialise from the seed.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Self {
        // A tied head draws from the embedding's stream, so the two copies
        // start equal wherever they live.
        let key = if cfg.tied { EMBED_NAME } else { LM_HEAD_NAME };
        Self {
            norm: RmsNorm::new("model.norm.weight".into(), cfg.dim, cfg.norm_eps),
            weight: init::matrix(seed, LM_HEAD_NAME, key, cfg.vocab, cfg.dim, cfg.init_std),
            tied: cfg.tied,
        }
    }

    /// Logits `[N, V]` of `x[N, D]` (evaluation and export checks).
    pub fn logits(&self, x: Vec<f32>) -> Vec<f32> {
        let rows = x.len() / self.norm.weight.len();
        let (xn, _) = self.norm.forward(x);
        let logits = linear::forward(&self.weight, &xn, rows);
        pool::give(xn);
        logits
    }

    /// Mean cross-entropy of `x[N, D]` against `targets[N]`. The backward
    /// will produce the gradient of `scale · loss`.
    pub fn forward(&self, x: Vec<f32>, targets: &[u32], scale: f32) -> (f32, HeadCache) {
        let rows = targets.len();
        let (xn, norm) = self.norm.forward(x);
        let mut logits = linear::forward(&self.weight, &xn, rows);
        let loss = cross_entropy(&mut logits, targets, self.weight.shape[0], scale);
        (
            loss,
            HeadCache {
                norm,
                xn,
                dlogits: logits,
                rows,
            },
        )
    }

    /// Input half of the backward: the gradient w.r.t. the head's input.
    pub fn backward_input(&self, cache: &mut HeadCache) -> Vec<f32> {
        let mut dxn = pool::take(cache.xn.len());
        linear::backward_input(&self.weight, &cache.dlogits, &mut dxn, cache.rows, false);
        let mut dx = pool::zeroed(dxn.len());
        self.norm.backward_input(&mut cache.norm, dxn, &mut dx);
        dx
    }

    /// Weight half of the backward.
    pub fn backward_weight(&mut self, cache: &HeadCache) {
        linear::backward_weight(&mut self.weight, &cache.dlogits, &cache.xn, cache.rows);
        self.norm.backward_weight(&cache.norm);
    }
}
