//! Model hyper-parameters resolved from the manifest and the tokenizer.

use crate::ModelSpec;
use serde::{Deserialize, Serialize};

/// Everything that fixes the shapes of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (from the tokenizer).
    pub vocab: usize,
    /// Residual width.
    pub dim: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// SwiGLU inner width.
    pub ffn_dim: usize,
    /// Context length.
    pub seq_len: usize,
    /// LM head shares the embedding matrix.
    pub tied: bool,
    /// Rotary base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Initial weight standard deviation.
    pub init_std: f64,
}

impl ModelConfig {
    /// Resolve a manifest's model section with the tokenizer's vocabulary.
    pub fn from_spec(spec: &ModelSpec, vocab: usize) -> Self {
        Self {
            vocab,
            dim: spec.dim,
            layers: spec.layers,
            heads: spec.heads,
            kv_heads: spec.kv_heads(),
            ffn_dim: spec.ffn_dim,
            seq_len: spec.seq_len,
            tied: spec.tied_embeddings,
            rope_theta: spec.rope_theta,
            norm_eps: spec.norm_eps,
            init_std: spec.init_std,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Parameters of one transformer block.
    pub fn block_params(&self) -> usize {
        let hd = self.head_dim();
        let attn = self.dim * hd * (2 * self.heads + 2 * self.kv_heads);
        let mlp = 3 * self.dim * self.ffn_dim;
        attn + mlp + 2 * self.dim
    }

    /// Trainable parameters of the whole model (a tied head counted once).
    pub fn total_params(&self) -> usize {
        let embed = self.vocab * self.dim;
        let head = if self.tied { 0 } else { embed };
        embed + head + self.dim + self.layers * self.block_params()
    }

    /// Forward+backward FLOPs of one block per token (matmuls and attention).
    pub fn block_flops_per_token(&self) -> f64 {
        let matmul = 6.0 * (self.block_params() - 2 * self.dim) as f64;
        // Causal attention: q·kᵀ and p·v, about half the square is used.
        let attn = 6.0 * self.seq_len as f64 * self.dim as f64;
        matmul + attn
    }

    /// Forward+backward FLOPs of the LM head per token.
    pub fn head_flops_per_token(&self) -> f64 {
        6.0 * (self.vocab * self.dim) as f64
    }
}
