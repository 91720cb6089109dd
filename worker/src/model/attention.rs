//! Self-attention sub-layer: q/k/v projections, rotary embedding, causal
//! grouped-query attention, output projection.

use super::{init, linear, ModelConfig, Param};
use crate::kernels::attention::{self as attn, AttnShape};
use crate::kernels::ops::Rope;
use crate::kernels::pool;

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
/// what the weight half needs. Tensors are token-major (`[B·T, heads·hd]`).
#[derive(Debug, Default)]
pub struct AttentionCache {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, also the output projection's input.
    out: Vec<f32>,
    /// Probabilities `[B, H, T, T]` (causal blocks only).
    p: Vec<f32>,
    batch: usize,
    seq: usize,
    // Filled by `backward_input` for `backward_weight`.
    dy: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Drop for AttentionCache {
    fn drop(&mut self) {
        pool::give_all([
            &mut self.x,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.out,
            &mut self.p,
            &mut self.dy,
            &mut self.dq,
            &mut self.dk,
            &mut self.dv,
        ]);
    }
}

impl AttentionCache {
    /// Take out the input (the normed residual stream), which a block
    /// under selective recomputation recomputes instead of keeping.
    pub fn take_input(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.x)
    }

    /// Put back a recomputed input; it must be the bits the forward saw.
    pub fn restore_input(&mut self, x: Vec<f32>) {
        pool::give(std::mem::replace(&mut self.x, x));
    }
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
        let mut q = linear::forward(&self.q, &x, rows);
        let mut k = linear::forward(&self.k, &x, rows);
        let v = linear::forward(&self.v, &x, rows);
        rope.forward_tokens(&mut q, seq, self.heads * hd);
        rope.forward_tokens(&mut k, seq, self.kv_heads * hd);
        let shape = self.shape(batch, seq);
        let mut out = pool::take(q.len());
        let mut p = pool::take(shape.probs_len());
        attn::forward(&mut out, &mut p, &q, &k, &v, shape);
        let y = linear::forward(&self.o, &out, rows);
        let cache = AttentionCache {
            x,
            q,
            k,
            v,
            out,
            p,
            batch,
            seq,
            dy: Vec::new(),
            dq: Vec::new(),
            dk: Vec::new(),
            dv: Vec::new(),
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
        let mut dout = pool::take(cache.out.len());
        linear::backward_input(&self.o, &dy, &mut dout, rows, false);
        let mut dq = pool::take(cache.q.len());
        let mut dk = pool::take(cache.k.len());
        let mut dv = pool::take(cache.v.len());
        let shape = self.shape(batch, seq);
        attn::backward(
            &mut dq, &mut dk, &mut dv, &dout, &cache.out, &cache.p, &cache.q, &cache.k, &cache.v,
            shape,
        );
        pool::give(dout);
        rope.backward_tokens(&mut dq, seq, self.heads * hd);
        rope.backward_tokens(&mut dk, seq, self.kv_heads * hd);
        let mut dx = pool::take(cache.x.len());
        linear::backward_input(&self.q, &dq, &mut dx, rows, false);
        linear::backward_input(&self.k, &dk, &mut dx, rows, true);
        linear::backward_input(&self.v, &dv, &mut dx, rows, true);
        // The probabilities are not needed any more; the weight half may
        // run much later.
        pool::give(std::mem::take(&mut cache.p));
        cache.dq = dq;
        cache.dk = dk;
        cache.dv = dv;
        cache.dy = dy;
        dx
    }

    /// Weight half of the backward: accumulate the four projection gradients.
    pub fn backward_weight(&mut self, cache: &AttentionCache) {
        let rows = cache.batch * cache.seq;
        linear::backward_weight(&mut self.o, &cache.dy, &cache.out, rows);
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
