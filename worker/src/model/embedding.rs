//! Token embedding: `x[N, D] = E[tokens]`.

use super::{init, ModelConfig, Param};
use crate::kernels::pool;

/// The token-embedding table `[V, D]`.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// `model.embed_tokens.weight`
    pub weight: Param,
}

/// Name of the embedding matrix (also the key of a tied LM head's values).
pub const EMBED_NAME: &str = "model.embed_tokens.weight";

impl Embedding {
    /// Initialise from the seed.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Self {
        Self {
            weight: init::matrix(
                seed,
                EMBED_NAME,
                EMBED_NAME,
                cfg.vocab,
                cfg.dim,
                cfg.init_std,
            ),
        }
    }

    /// Gather rows. Callers check that every token is below the vocabulary.
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.weight.shape[1];
        let mut x = pool::take(tokens.len() * d);
        for (row, &t) in x.chunks_mut(d).zip(tokens) {
            let t = t as usize;
            row.copy_from_slice(&self.weight.data[t * d..(t + 1) * d]);
        }
        x
    }

    /// Scatter-add `dx[N, D]` into the rows of the gradient.
    pub fn backward_weight(&mut self, tokens: &[u32], dx: &[f32]) {
        let d = self.weight.shape[1];
        for (row, &t) in dx.chunks(d).zip(tokens) {
            let t = t as usize;
            for (g, v) in self.weight.grad[t * d..(t + 1) * d].iter_mut().zip(row) {
                *g += v;
            }
        }
    }
}
