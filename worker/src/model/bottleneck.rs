//! The learned low-rank bottleneck at a stage boundary (codec `lowrank`).
//!
//! Boundary `b` sits between stage `b` and stage `b + 1`. Stage `b` ends
//! with a down-projection `D[r, dim]` (`z = h·Dᵀ`), stage `b + 1` begins
//! with an up-projection `U[dim, r]` (`h' = z·Uᵀ`), and only `z`, `r`
//! values per token, crosses the link. Both are plain bias-free linear
//! layers, trained like every other matrix (AdamW with weight decay, global
//! clipping, checkpointed with the stage).
//!
//! Initialisation: `D` gets `r` orthonormal rows (Gram–Schmidt on a
//! Gaussian matrix drawn from the stream keyed by (seed, boundary)), and
//! `U = Dᵀ`. Then `U·D` is the orthogonal projection onto an `r`-dimensional
//! subspace: the identity on that subspace and, among all maps of rank `r`,
//! the nearest to the identity (`‖I − U·D‖²_F = dim − r`). So at the start
//! the residual stream passes the boundary unchanged in the kept directions
//! and nothing is amplified; training then chooses which directions to keep.
//! Both sides compute the same basis from the seed, so the two stages of a
//! boundary agree however the pipeline is placed.

use super::{init, linear, Param};

/// Name of boundary `b`'s down-projection (held by stage `b`).
pub fn down_name(boundary: usize) -> String {
    format!("boundary.{boundary}.down.weight")
}

/// Name of boundary `b`'s up-projection (held by stage `b + 1`).
pub fn up_name(boundary: usize) -> String {
    format!("boundary.{boundary}.up.weight")
}

/// Whether `name` is a bottleneck parameter.
pub fn is_bottleneck(name: &str) -> bool {
    name.starts_with("boundary.")
}

/// One projection of a bottleneck: `y[N, out] = x[N, in]·Wᵀ`.
#[derive(Clone, Debug)]
pub struct Projection {
    /// `W[out, in]`.
    pub weight: Param,
}

/// What a projection's backward needs from its forward.
#[derive(Debug, Default)]
pub struct ProjectionCache {
    x: Vec<f32>,
    dy: Vec<f32>,
    rows: usize,
}

/// `r` orthonormal rows of width `dim` (row-major `[r, dim]`), a pure
/// function of (seed, boundary). Needs `r <= dim`.
fn orthonormal_rows(seed: u64, boundary: usize, r: usize, dim: usize) -> Vec<f32> {
    let g = init::normal(seed, &format!("boundary.{boundary}.basis"), r * dim, 1.0);
    let mut q: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    for i in 0..r {
        // Modified Gram–Schmidt, twice for numerical orthogonality.
        for _ in 0..2 {
            for j in 0..i {
                let (done, rest) = q.split_at_mut(i * dim);
                let qj = &done[j * dim..(j + 1) * dim];
                let qi = &mut rest[..dim];
                let dot: f64 = qi.iter().zip(qj).map(|(a, b)| a * b).sum();
                qi.iter_mut().zip(qj).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let row = &mut q[i * dim..(i + 1) * dim];
        let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
        // A Gaussian row is independent of the previous ones with
        // probability one; the guard only keeps a freak draw finite.
        let inv = if norm > 1e-12 { 1.0 / norm } else { 0.0 };
        row.iter_mut().for_each(|a| *a *= inv);
    }
    q.into_iter().map(|v| v as f32).collect()
}

impl Projection {
    /// The down-projection `D[rank, dim]` of `boundary`.
    pub fn down(seed: u64, boundary: usize, dim: usize, rank: usize) -> Self {
        let data = orthonormal_rows(seed, boundary, rank, dim);
        Self {
            weight: Param {
                grad: vec![0.0; data.len()],
                data,
                name: down_name(boundary),
                shape: vec![rank, dim],
                decay: true,
            },
        }
    }

    /// The up-projection `U[dim, rank] = Dᵀ` of `boundary`.
    pub fn up(seed: u64, boundary: usize, dim: usize, rank: usize) -> Self {
        let d = orthonormal_rows(seed, boundary, rank, dim);
        let mut data = vec![0.0; dim * rank];
        for i in 0..rank {
            for j in 0..dim {
                data[j * rank + i] = d[i * dim + j];
            }
        }
        Self {
            weight: Param {
                grad: vec![0.0; data.len()],
                data,
                name: up_name(boundary),
                shape: vec![dim, rank],
                decay: true,
            },
        }
    }

    /// Width of the input.
    pub fn width_in(&self) -> usize {
        self.weight.shape[1]
    }

    /// Width of the output.
    pub fn width_out(&self) -> usize {
        self.weight.shape[0]
    }

    /// `x[rows, in]` → `y[rows, out]`; keeps `x` for the weight gradient.
    pub fn forward(&self, x: Vec<f32>) -> (Vec<f32>, ProjectionCache) {
        let rows = x.len() / self.width_in();
        let y = linear::forward(&self.weight, &x, rows);
        (
            y,
            ProjectionCache {
                x,
                dy: Vec::new(),
                rows,
            },
        )
    }

    /// Input half: `dx[rows, in] = dy·W`; keeps `dy` for the weight half.
    pub fn backward_input(&self, cache: &mut ProjectionCache, dy: Vec<f32>) -> Vec<f32> {
        let mut dx = vec![0.0; cache.rows * self.width_in()];
        linear::backward_input(&self.weight, &dy, &mut dx, cache.rows, false);
        cache.dy = dy;
        dx
    }

    /// Weight half: `dW += dyᵀ·x`.
    pub fn backward_weight(&mut self, cache: &ProjectionCache) {
        linear::backward_weight(&mut self.weight, &cache.dy, &cache.x, cache.rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_has_orthonormal_rows_and_up_is_its_transpose() {
        let (dim, rank) = (48, 6);
        let d = Projection::down(3, 1, dim, rank);
        let u = Projection::up(3, 1, dim, rank);
        assert_eq!(d.weight.shape, [rank, dim]);
        assert_eq!(u.weight.shape, [dim, rank]);
        for i in 0..rank {
            for j in 0..rank {
                let dot: f32 = (0..dim)
                    .map(|k| d.weight.data[i * dim + k] * d.weight.data[j * dim + k])
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "row {i}·row {j} = {dot}");
            }
            for k in 0..dim {
                assert_eq!(d.weight.data[i * dim + k], u.weight.data[k * rank + i]);
            }
        }
        // Another boundary gets another subspace; the same boundary the same.
        assert_ne!(d.weight.data, Projection::down(3, 2, dim, rank).weight.data);
        assert_eq!(d.weight.data, Projection::down(3, 1, dim, rank).weight.data);
    }

    #[test]
    fn up_after_down_keeps_what_lies_in_the_subspace() {
        let (dim, rank, rows) = (32, 4, 3);
        let d = Projection::down(9, 0, dim, rank);
        let u = Projection::up(9, 0, dim, rank);
        // A vector already in the kept subspace (a mix of D's rows) passes
        // unchanged; a random one loses what lies outside it.
        let mut inside = vec![0.0f32; rows * dim];
        for r in 0..rows {
            for i in 0..rank {
                let c = (r + 2 * i) as f32 - 2.5;
                for k in 0..dim {
                    inside[r * dim + k] += c * d.weight.data[i * dim + k];
                }
            }
        }
        let (z, _) = d.forward(inside.clone());
        assert_eq!(z.len(), rows * rank);
        let (back, _) = u.forward(z);
        for (a, b) in inside.iter().zip(&back) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let x = init::normal(1, "x", rows * dim, 1.0);
        let (z, _) = d.forward(x.clone());
        let (back, _) = u.forward(z);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(norm(&back) < norm(&x));
    }
}
