//! What one micro-batch of a stage costs, from the model's shape alone, so
//! that a worker's credit never rests on what it says it spent.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

/// FLOPs per token of a block and of the head, by half of the work, with
/// the sizes that set the all-reduce's bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Forward, input-gradient, weight-gradient FLOPs per token of one
    /// block: each matrix product costs `2·n` per token and half (forward,
    /// input gradient, weight gradient); attention's scores cost `2·T·d`
    /// forward and twice that backward, all of it input gradient.
    pub block: [f64; 3],
    /// The same for the LM head (last stage).
    pub head: [f64; 3],
    /// Tokens in one micro-batch.
    pub tokens_per_micro_batch: u64,
    /// Parameters of one block.
    pub block_params: u64,
    /// Parameters of the embedding (first stage) and of the head with the
    /// final norm (last stage).
    pub embed_params: u64,
    /// Parameters of the head and final norm.
    pub head_params: u64,
}

impl CostModel {
    /// The cost model of `cfg` with micro-batches of `micro_batch_size`
    /// sequences.
    pub fn new(cfg: &ModelConfig, micro_batch_size: usize) -> Self {
        let matmul = (cfg.block_params() - 2 * cfg.dim) as f64;
        let attn = cfg.seq_len as f64 * cfg.dim as f64;
        let head = (cfg.vocab * cfg.dim) as f64;
        CostModel {
            block: [
                2.0 * matmul + 2.0 * attn,
                2.0 * matmul + 4.0 * attn,
                2.0 * matmul,
            ],
            head: [2.0 * head, 2.0 * head, 2.0 * head],
            tokens_per_micro_batch: (micro_batch_size * cfg.seq_len) as u64,
            block_params: cfg.block_params() as u64,
            embed_params: (cfg.vocab * cfg.dim) as u64,
            head_params: (cfg.vocab * cfg.dim + cfg.dim) as u64,
        }
    }

    /// FLOPs of `micro_batches` micro-batches of stage `stage` of
    /// `stages` holding `layers`: forward, input gradient, weight gradient.
    pub fn flops(
        &self,
        stage: usize,
        stages: usize,
        layers: &Range<usize>,
        micro_batches: u64,
    ) -> [f64; 3] {
        let tokens = (micro_batches * self.tokens_per_micro_batch) as f64;
        let n = layers.len() as f64;
        let last = stage + 1 == stages;
        std::array::from_fn(|k| {
            let per_token = n * self.block[k] + if last { self.head[k] } else { 0.0 };
            per_token * tokens
        })
    }

    /// Bytes one replica of `stage` sends in a ring all-reduce of its f32
    /// gradients among `replicas` replicas: `2(n−1)/n` of them.
    pub fn allreduce_bytes(
        &self,
        stage: usize,
        stages: usize,
        layers: &Range<usize>,
        replicas: usize,
    ) -> u64 {
        if replicas < 2 {
            return 0;
        }
        let mut params = layers.len() as u64 * self.block_params;
        if stage == 0 {
            params += self.embed_params;
        }
        if stage + 1 == stages {
            params += self.head_params;
        }
        let bytes = params * 4;
        bytes * 2 * (replicas as u64 - 1) / replicas as u64
    }
}
