//! Self-attention sub-layer: q/k/v projections, rotary embedding, causal
//! grouped-query attention, output projection.

use super::{init, linear, ModelConfig, Param};
use crate::kernels::attention::{self as attn, AttnShape};
use crate::kernels::ops::{to_head_major, to_token_major, Rope};

/// Projections of one attention sub-layer.
#[derive(Clone, Debug)]
pub struct Attention {
    /// `[H·hd, D]`
    pub q: Param,
    /// `[KV·hd, D]`
    pub k: Param,
    /// `[KV·hd, D]`
    pub v: Param,
    /// `[D, H·hd]`
    pub o: Param,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What the backward needs from one forward, and (after the input half)
/// what the weight half needs.
#[derive(Debug, Default)]
pub struct AttentionCache {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    out_tokens: Vec<f32>,
    lse: Vec<f32>,
    batch: usize,
    seq: usize,
    // Filled by `backward_input` for `backward_weight`.
    dy: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Attention {
    /// Initialise the projections of block `layer`.
    pub fn new(cfg: &ModelConfig, layer: usize, seed: u64) -> Self {
        let (d, hd) = (cfg.dim, cfg.head_dim());
        let p = |name: &str, rows: usize, cols: usize, std: f64| {
            let name = format!("model.layers.{layer}.self_attn.{name}.weight");
            init::matrix(seed, &name, &name, rows, cols, std)
        };
        // Residual projections are scaled down so the residual stream's
        // variance does not grow with depth.
        let out_std = cfg.init_std / (2.0 * cfg.layers as f64).sqrt();
        Self {
            q: p("q_proj", cfg.heads * hd, d, cfg.init_std),
            k: p("k_proj", cfg.kv_heads * hd, d, cfg.init_std),
            v: p("v_proj", cfg.kv_heads * hd, d, cfg.init_std),
            o: p("o_proj", d, cfg.heads * hd, out_std),
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: hd,
        }
    }

    fn shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape {
            batch,
            seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// `x[B·T, D]` → `y[B·T, D]`.
    pub fn forward(
        &self,
        x: Vec<f32>,
        batch: usize,
        seq: usize,
        rope: &Rope,
    ) -> (Vec<f32>, AttentionCache) {
        let rows = batch * seq;
        let hd = self.head_dim;
        let mut q = to_head_major(
            &linear::forward(&self.q, &x, rows),
            batch,
            seq,
            self.heads,
            hd,
        );
        let mut k = to_head_major(
            &linear::forward(&self.k, &x, rows),
            batch,
            seq,
            self.kv_heads,
            hd,
        );
        let v = to_head_major(
            &linear::forward(&self.v, &x, rows),
            batch,
            seq,
            self.kv_heads,
            hd,
        );
        rope.forward(&mut q, seq);
        rope.forward(&mut k, seq);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; batch * self.heads * seq];
        attn::forward(&mut out, &mut lse, &q, &k, &v, self.shape(batch, seq));
        let out_tokens = to_token_major(&out, batch, seq, self.heads, hd);
        let y = linear::forward(&self.o, &out_tokens, rows);
        let cache = AttentionCache {
            x,
            q,
            k,
            v,
            out,
            out_tokens,
            lse,
            batch,
            seq,
            ..Default::default()
        };
        (y, cache)
    }

    /// Input half of the backward: `dy[B·T, D]` → `dx[B·T, D]`; keeps what
    /// the weight half needs in `cache`.
    pub fn backward_input(
        &self,
        cache: &mut AttentionCache,
        dy: Vec<f32>,
        rope: &Rope,
    ) -> Vec<f32> {
        let (batch, seq, hd) = (cache.batch, cache.seq, self.head_dim);
        let rows = batch * seq;
        let mut dout_tokens = vec![0.0; cache.out_tokens.len()];
        linear::backward_input(&self.o, &dy, &mut dout_tokens, rows, false);
        let dout = to_head_major(&dout_tokens, batch, seq, self.heads, hd);
        let mut dq = vec![0.0; cache.q.len()];
        let mut dk = vec![0.0; cache.k.len()];
        let mut dv = vec![0.0; cache.v.len()];
        let shape = self.shape(batch, seq);
        attn::backward(
            &mut dq, &mut dk, &mut dv, &dout, &cache.out, &cache.lse, &cache.q, &cache.k, &cache.v,
            shape,
        );
        rope.backward(&mut dq, seq);
        rope.backward(&mut dk, seq);
        cache.dq = to_token_major(&dq, batch, seq, self.heads, hd);
        cache.dk = to_token_major(&dk, batch, seq, self.kv_heads, hd);
        cache.dv = to_token_major(&dv, batch, seq, self.kv_heads, hd);
        cache.dy = dy;
        let mut dx = vec![0.0; cache.x.len()];
        linear::backward_input(&self.q, &cache.dq, &mut dx, rows, false);
        linear::backward_input(&self.k, &cache.dk, &mut dx, rows, true);
        linear::backward_input(&self.v, &cache.dv, &mut dx, rows, true);
        dx
    }

    /// Weight half of the backward: accumulate the four projection gradients.
    pub fn backward_weight(&mut self, cache: &AttentionCache) {
        let rows = cache.batch * cache.seq;
        linear::backward_weight(&mut self.o, &cache.dy, &cache.out_tokens, rows);
        linear::backward_weight(&mut self.q, &cache.dq, &cache.x, rows);
        linear::backward_weight(&mut self.k, &cache.dk, &cache.x, rows);
        linear::backward_weight(&mut self.v, &cache.dv, &cache.x, rows);
    }

    /// The four projections.
    pub fn params(&self) -> [&Param; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    /// The four projections, mutably.
    pub fn params_mut(&mut self) -> [&mut Param; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}
