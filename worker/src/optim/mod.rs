//! AdamW with decoupled weight decay, global gradient-norm clipping, and the
//! warm-up + cosine learning-rate schedule.

use serde::{Deserialize, Serialize};

use crate::model::Param;

/// Hyper-parameters of the optimiser and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Total steps (the cosine reaches its floor here).
    pub steps: u64,
    /// Floor of the schedule as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
}

impl OptimConfig {
    /// From the manifest's training section.
    pub fn from_spec(t: &pipewright_spec::TrainingSpec) -> Self {
        Self {
            lr: t.learning_rate,
            warmup: t.warmup_steps,
            steps: t.steps,
            min_lr_ratio: t.min_lr_ratio,
            weight_decay: t.weight_decay,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            grad_clip: t.grad_clip,
        }
    }

    /// Learning rate of (0-based) `step`: linear warm-up to `lr` over
    /// `warmup` steps, then a half cosine down to `min_lr_ratio · lr` at the
    /// last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// Factor that brings a gradient of global norm `norm` under the clip.
    pub fn clip_factor(&self, norm: f64) -> f32 {
        if self.grad_clip > 0.0 && norm > self.grad_clip {
            (self.grad_clip / (norm + 1e-6)) as f32
        } else {
            1.0
        }
    }
}

/// Sum of squared gradients of `params` (f64, fixed order). Combine the sums
/// of all stages, then take the square root, for the global norm.
pub fn grad_sq_sum<'a>(params: impl IntoIterator<Item = &'a Param>) -> f64 {
    params
        .into_iter()
        .map(|p| p.grad.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
        .sum()
}

/// Adam moments of one stage's parameters, in the stage's parameter order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamW {
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Steps taken (for bias correction).
    pub t: u64,
}

impl AdamW {
    /// Zero moments for these parameters.
    pub fn new(params: &[&mut Param]) -> Self {
        Self {
            m: params.iter().map(|p| vec![0.0; p.len()]).collect(),
            v: params.iter().map(|p| vec![0.0; p.len()]).collect(),
            t: 0,
        }
    }

    /// One step on `params` (same order as at creation) with learning rate
    /// `lr`, after scaling gradients by `clip` (see [`OptimConfig::clip_factor`]).
    pub fn step(&mut self, params: &mut [&mut Param], cfg: &OptimConfig, lr: f64, clip: f32) {
        self.t += 1;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let bc1 = 1.0 - cfg.beta1.powi(self.t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = cfg.eps as f32;
        for ((p, m), v) in params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            let decay = if p.decay {
                (1.0 - lr * cfg.weight_decay) as f32
            } else {
                1.0
            };
            let Param { data, grad, .. } = &mut **p;
            for (((w, &g), m), v) in data
                .iter_mut()
                .zip(grad.iter())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                let g = g * clip;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *w = *w * decay - step_size * *m / ((*v).sqrt() / bc2_sqrt + eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            warmup: 10,
            steps: 110,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = cfg();
        assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!(
            (c.lr_at(60) - 0.55e-3).abs() < 1e-9,
            "half way is the mid point"
        );
        assert!((c.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(500) - 1e-4).abs() < 1e-12);
        for s in 10..110 {
            assert!(c.lr_at(s + 1) <= c.lr_at(s));
        }
    }

    #[test]
    fn clipping_scales_to_the_limit() {
        let c = cfg();
        assert_eq!(c.clip_factor(0.5), 1.0);
        assert!((c.clip_factor(4.0) - 0.25).abs() < 1e-6);
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let c = OptimConfig {
            weight_decay: 0.0,
            ..cfg()
        };
        let mut p = Param::filled("w", &[3], 1.0, true);
        p.grad = vec![0.5, -2.0, 0.0];
        let mut opt = AdamW::new(&[&mut p]);
        opt.step(&mut [&mut p], &c, 1e-3, 1.0);
        // Bias-corrected Adam's first update is lr·sign(g).
        assert!((p.data[0] - (1.0 - 1e-3)).abs() < 1e-6);
        assert!((p.data[1] - (1.0 + 1e-3)).abs() < 1e-6);
        assert_eq!(p.data[2], 1.0);
    }

    #[test]
    fn decay_is_decoupled_and_skips_gains() {
        let c = cfg();
        let mut w = Param::filled("w", &[1], 2.0, true);
        let mut g = Param::filled("g", &[1], 2.0, false);
        let mut opt = AdamW::new(&[&mut w, &mut g]);
        opt.step(&mut [&mut w, &mut g], &c, 1e-2, 1.0);
        assert!((w.data[0] - 2.0 * (1.0 - 1e-3)).abs() < 1e-6);
        assert_eq!(g.data[0], 2.0);
    }
}
