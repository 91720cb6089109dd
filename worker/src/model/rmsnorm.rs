//! RMSNorm with a learned gain: `y = x / rms(x) · w`.

use super::Param;
use crate::kernels::ops::{rmsnorm_backward_input, rmsnorm_backward_weight, rmsnorm_forward};
use crate::kernels::pool;

/// One RMSNorm.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Gain `[D]`, initialised to one.
    pub weight: Param,
    eps: f32,
}

/// What the backward needs from one forward.
#[derive(Debug, Default)]
pub struct RmsNormCache {
    x: Vec<f32>,
    rstd: Vec<f32>,
    dy: Vec<f32>,
}

impl Drop for RmsNormCache {
    fn drop(&mut self) {
        pool::give_all([&mut self.x, &mut self.rstd, &mut self.dy]);
    }
}

impl RmsNorm {
    /// A norm of width `dim` named `name` (the gain's full name).
    pub fn new(name: String, dim: usize, eps: f64) -> Self {
        Self {
            weight: Param::filled(name, &[dim], 1.0, false),
            eps: eps as f32,
        }
    }

    /// `x[N, D]` → `y[N, D]`.
    pub fn forward(&self, x: Vec<f32>) -> (Vec<f32>, RmsNormCache) {
        let d = self.weight.len();
        let mut y = pool::take(x.len());
        let mut rstd = pool::take(x.len() / d);
        rmsnorm_forward(&mut y, &mut rstd, &x, &self.weight.data, self.eps);
        (
            y,
            RmsNormCache {
                x,
                rstd,
                dy: Vec::new(),
            },
        )
    }

    /// Input half: adds the gradient w.r.t. `x` into `dx`; keeps `dy`.
    pub fn backward_input(&self, cache: &mut RmsNormCache, dy: Vec<f32>, dx: &mut [f32]) {
        rmsnorm_backward_input(dx, &dy, &cache.x, &self.weight.data, &cache.rstd);
        cache.dy = dy;
    }

    /// Weight half: accumulates the gain gradient.
    pub fn backward_weight(&mut self, cache: &RmsNormCache) {
        rmsnorm_backward_weight(&mut self.weight.grad, &cache.dy, &cache.x, &cache.rstd);
    }
}

impl RmsNormCache {
    /// The input the norm saw (the residual stream at that point).
    pub fn input(&self) -> &[f32] {
        &self.x
    }

    /// Give up the input, returning the rest of the cache to the pool
    /// (activation recomputation keeps only the input).
    pub fn into_input(mut self) -> Vec<f32> {
        std::mem::take(&mut self.x)
    }
}
