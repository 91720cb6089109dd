//! SwiGLU MLP sub-layer: `down(silu(gate(x)) ⊙ up(x))`.

use super::{init, linear, ModelConfig, Param};
use crate::kernels::ops::{swiglu_backward, swiglu_forward};
use crate::kernels::pool;

/// Projections of one MLP sub-layer.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `[F, D]`
    pub gate: Param,
    /// `[F, D]`
    pub up: Param,
    /// `[D, F]`
    pub down: Param,
}

/// What the backward needs from one forward.
#[derive(Debug, Default)]
pub struct MlpCache {
    x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    h: Vec<f32>,
    rows: usize,
    dy: Vec<f32>,
    dg: Vec<f32>,
    du: Vec<f32>,
}

impl Drop for MlpCache {
    fn drop(&mut self) {
        pool::give_all([
            &mut self.x,
            &mut self.g,
            &mut self.u,
            &mut self.h,
            &mut self.dy,
            &mut self.dg,
            &mut self.du,
        ]);
    }
}

impl Mlp {
    /// Initialise the projections of block `layer`.
    pub fn new(cfg: &ModelConfig, layer: usize, seed: u64) -> Self {
        let p = |name: &str, rows: usize, cols: usize, std: f64| {
            let name = format!("model.layers.{layer}.mlp.{name}.weight");
            init::matrix(seed, &name, &name, rows, cols, std)
        };
        let out_std = cfg.init_std / (2.0 * cfg.layers as f64).sqrt();
        Self {
            gate: p("gate_proj", cfg.ffn_dim, cfg.dim, cfg.init_std),
            up: p("up_proj", cfg.ffn_dim, cfg.dim, cfg.init_std),
            down: p("down_proj", cfg.dim, cfg.ffn_dim, out_std),
        }
    }

    /// `x[N, D]` → `y[N, D]`.
    pub fn forward(&self, x: Vec<f32>, rows: usize) -> (Vec<f32>, MlpCache) {
        let g = linear::forward(&self.gate, &x, rows);
        let u = linear::forward(&self.up, &x, rows);
        let mut h = pool::take(g.len());
        swiglu_forward(&mut h, &g, &u);
        let y = linear::forward(&self.down, &h, rows);
        (
            y,
            MlpCache {
                x,
                g,
                u,
                h,
                rows,
                dy: Vec::new(),
                dg: Vec::new(),
                du: Vec::new(),
            },
        )
    }

    /// Input half of the backward: `dy[N, D]` → `dx[N, D]`.
    pub fn backward_input(&self, cache: &mut MlpCache, dy: Vec<f32>) -> Vec<f32> {
        let rows = cache.rows;
        let mut dh = pool::take(cache.h.len());
        linear::backward_input(&self.down, &dy, &mut dh, rows, false);
        let mut dg = pool::take(dh.len());
        let mut du = pool::take(dh.len());
        swiglu_backward(&mut dg, &mut du, &dh, &cache.g, &cache.u);
        pool::give(dh);
        let mut dx = pool::take(cache.x.len());
        linear::backward_input(&self.gate, &dg, &mut dx, rows, false);
        linear::backward_input(&self.up, &du, &mut dx, rows, true);
        cache.dy = dy;
        cache.dg = dg;
        cache.du = du;
        dx
    }

    /// Weight half of the backward.
    pub fn backward_weight(&mut self, cache: &MlpCache) {
        let rows = cache.rows;
        linear::backward_weight(&mut self.down, &cache.dy, &cache.h, rows);
        linear::backward_weight(&mut self.gate, &cache.dg, &cache.x, rows);
        linear::backward_weight(&mut self.up, &cache.du, &cache.x, rows);
    }

    /// The three projections.
    pub fn params(&self) -> [&Param; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// The three projections, mutably.
    pub fn params_mut(&mut self) -> [&mut Param; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}
