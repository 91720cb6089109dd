//! Row-wise and element-wise kernels: RMSNorm, rotary embedding, SwiGLU,
//! softmax cross-entropy, layout changes. Each forward sits beside its
//! backward; shapes are in the doc comments (N = rows = batch·time).

use rayon::prelude::*;

use super::simd::{exp, sigmoid, simd_fn};

/// Rows per rayon task: large enough to amortise scheduling.
const ROW_CHUNK: usize = 16;

// ---------------------------------------------------------------- RMSNorm

simd_fn! {
    fn rmsnorm_forward_rows(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for ((o, r), x) in out.chunks_mut(d).zip(rstd.iter_mut()).zip(x.chunks(d)) {
            let ms = dot_lanes(x, x) / d as f32;
            let s = 1.0 / (ms + eps).sqrt();
            *r = s;
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * s * w;
            }
        }
    }
}

/// `out[N,D] = x / rms(x) · w`, with `rstd[N] = 1 / sqrt(mean(x²) + eps)`.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d * ROW_CHUNK)
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|((out, rstd), x)| rmsnorm_forward_rows(out, rstd, x, w, eps));
}

simd_fn! {
    fn rmsnorm_backward_rows(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) {
        let d = w.len();
        for (((dx, dy), x), &s) in dx.chunks_mut(d).zip(dy.chunks(d)).zip(x.chunks(d)).zip(rstd) {
            // Σ dy·w·x in eight lanes, then scaled: mean(w⊙dy⊙x̂).
            let mut acc = [0.0f32; 8];
            let (gc, xc, wc) = (dy.chunks_exact(8), x.chunks_exact(8), w.chunks_exact(8));
            let tail: f32 = gc
                .remainder()
                .iter()
                .zip(xc.remainder())
                .zip(wc.remainder())
                .map(|((g, x), w)| g * w * x)
                .sum();
            for ((g, x), w) in gc.zip(xc).zip(wc) {
                for l in 0..8 {
                    acc[l] += g[l] * w[l] * x[l];
                }
            }
            let mean = (acc.iter().sum::<f32>() + tail) * s / d as f32;
            for (((dx, g), x), w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *dx += s * (g * w - x * s * mean);
            }
        }
    }
}

/// Input half of the RMSNorm backward:
/// `dx = rstd · (w⊙dy − x̂ · mean(w⊙dy⊙x̂))` with `x̂ = x·rstd`; added to `dx`.
pub fn rmsnorm_backward_input(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    dx.par_chunks_mut(d * ROW_CHUNK)
        .zip(dy.par_chunks(d * ROW_CHUNK))
        .zip(x.par_chunks(d * ROW_CHUNK))
        .zip(rstd.par_chunks(ROW_CHUNK))
        .for_each(|(((dx, dy), x), rstd)| rmsnorm_backward_rows(dx, dy, x, w, rstd));
}

/// `Σ a·b` in eight independent lanes (vectorises; fixed order).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Weight half of the RMSNorm backward: `dw[D] += Σ_rows dy ⊙ x̂`.
pub fn rmsnorm_backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], rstd: &[f32]) {
    let d = dw.len();
    // Fixed chunking keeps the summation order, hence the result, the same
    // on every run.
    let partial: Vec<Vec<f32>> = dy
        .par_chunks(d * ROW_CHUNK * 4)
        .zip(x.par_chunks(d * ROW_CHUNK * 4))
        .zip(rstd.par_chunks(ROW_CHUNK * 4))
        .map(|((dy, x), rstd)| {
            let mut acc = vec![0.0f32; d];
            for ((dy, x), &s) in dy.chunks(d).zip(x.chunks(d)).zip(rstd) {
                for ((a, g), x) in acc.iter_mut().zip(dy).zip(x) {
                    *a += g * x * s;
                }
            }
            acc
        })
        .collect();
    for p in partial {
        for (w, p) in dw.iter_mut().zip(p) {
            *w += p;
        }
    }
}

// ---------------------------------------------------------------- Rotary

/// Precomputed rotary tables, Hugging Face "rotate half" convention:
/// dimension `i` of a head is paired with `i + hd/2`, both rotated by the
/// angle `t · θ^(−2i/hd)`.
#[derive(Clone, Debug)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `0..seq` and heads of width `head_dim` (even).
    pub fn new(seq: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = vec![0.0; seq * half];
        let mut sin = vec![0.0; seq * half];
        for t in 0..seq {
            for i in 0..half {
                // f32 inverse frequencies, as the reference implementation uses.
                let inv = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                let angle = t as f32 * inv;
                cos[t * half + i] = angle.cos();
                sin[t * half + i] = angle.sin();
            }
        }
        Self { half, cos, sin }
    }

    /// The tables `(cos, sin)`, each `[seq, head_dim / 2]` (a device
    /// backend uploads them so both rotate by the same angles).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotate `x[rows, hd]` in place, where row `r` is at position `r % seq`
    /// (head-major layout `[B, H, T, hd]`).
    pub fn forward(&self, x: &mut [f32], seq: usize) {
        self.apply(x, seq, 1.0);
    }

    /// The transpose rotation: gradient of [`Rope::forward`].
    pub fn backward(&self, dx: &mut [f32], seq: usize) {
        self.apply(dx, seq, -1.0);
    }

    fn apply(&self, x: &mut [f32], seq: usize, sign: f32) {
        let half = self.half;
        x.par_chunks_mut(2 * half * seq).for_each(|block| {
            for (t, row) in block.chunks_mut(2 * half).enumerate() {
                self.rotate(row, t, sign);
            }
        });
    }

    /// Rotate token-major `x[B·T, width]` in place, where `width` is a
    /// whole number of heads and row `r` is at position `r % seq`.
    pub fn forward_tokens(&self, x: &mut [f32], seq: usize, width: usize) {
        self.apply_tokens(x, seq, width, 1.0);
    }

    /// Gradient of [`Rope::forward_tokens`].
    pub fn backward_tokens(&self, dx: &mut [f32], seq: usize, width: usize) {
        self.apply_tokens(dx, seq, width, -1.0);
    }

    fn apply_tokens(&self, x: &mut [f32], seq: usize, width: usize, sign: f32) {
        assert_eq!(
            width % (2 * self.half).max(1),
            0,
            "rope: width is not whole heads"
        );
        if x.is_empty() || width == 0 {
            return;
        }
        x.par_chunks_mut(width * seq).for_each(|block| {
            for (t, row) in block.chunks_mut(width).enumerate() {
                for head in row.chunks_mut(2 * self.half) {
                    self.rotate(head, t, sign);
                }
            }
        });
    }

    #[inline]
    fn rotate(&self, head: &mut [f32], t: usize, sign: f32) {
        let half = self.half;
        let cos = &self.cos[t * half..(t + 1) * half];
        let sin = &self.sin[t * half..(t + 1) * half];
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            let s = sign * sin[i];
            a[i] = x1 * cos[i] - x2 * s;
            b[i] = x2 * cos[i] + x1 * s;
        }
    }
}

// ---------------------------------------------------------------- Layout

/// `[B, T, H, hd]` (token-major, as a linear layer writes it) to
/// `[B, H, T, hd]` (head-major, as attention reads it).
pub fn to_head_major(x: &[f32], b: usize, t: usize, h: usize, hd: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), b * t * h * hd);
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(t * hd)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                let src = ((bi * t + ti) * h + hi) * hd;
                dst[ti * hd..(ti + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        });
    out
}

/// Inverse of [`to_head_major`].
pub fn to_token_major(x: &[f32], b: usize, t: usize, h: usize, hd: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), b * t * h * hd);
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(h * hd)
        .enumerate()
        .for_each(|(bt, dst)| {
            let (bi, ti) = (bt / t, bt % t);
            for hi in 0..h {
                let src = ((bi * h + hi) * t + ti) * hd;
                dst[hi * hd..(hi + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        });
    out
}

// ---------------------------------------------------------------- SwiGLU

/// Elements per rayon task of the element-wise kernels.
const ELEM_CHUNK: usize = 16 * 1024;

simd_fn! {
    fn swiglu_forward_chunk(h: &mut [f32], g: &[f32], u: &[f32]) {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
            *h = g * sigmoid(g) * u;
        }
    }
}

simd_fn! {
    fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], dh: &[f32], g: &[f32], u: &[f32]) {
        for ((((dg, du), &dh), &g), &u) in dg.iter_mut().zip(du).zip(dh).zip(g).zip(u) {
            let s = sigmoid(g);
            *dg = dh * u * s * (1.0 + g * (1.0 - s));
            *du = dh * g * s;
        }
    }
}

/// `h = silu(g) ⊙ u`, element-wise over `[N, F]`.
pub fn swiglu_forward(h: &mut [f32], g: &[f32], u: &[f32]) {
    h.par_chunks_mut(ELEM_CHUNK)
        .zip(g.par_chunks(ELEM_CHUNK))
        .zip(u.par_chunks(ELEM_CHUNK))
        .for_each(|((h, g), u)| swiglu_forward_chunk(h, g, u));
}

/// Backward of [`swiglu_forward`]: `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
pub fn swiglu_backward(dg: &mut [f32], du: &mut [f32], dh: &[f32], g: &[f32], u: &[f32]) {
    dg.par_chunks_mut(ELEM_CHUNK)
        .zip(du.par_chunks_mut(ELEM_CHUNK))
        .zip(dh.par_chunks(ELEM_CHUNK))
        .zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)))
        .for_each(|(((dg, du), dh), (g, u))| swiglu_backward_chunk(dg, du, dh, g, u));
}

// ---------------------------------------------------------------- Loss

/// Mean softmax cross-entropy of `logits[N, V]` against `targets[N]`.
///
/// Overwrites `logits` with `scale · (softmax − onehot) / N`, the gradient of
/// `scale · loss`, and returns the loss (mean over rows, in nats). Sums run
/// in f64 so the loss of large vocabularies stays exact.
pub fn cross_entropy(logits: &mut [f32], targets: &[u32], vocab: usize, scale: f32) -> f32 {
    let n = targets.len();
    let per_row: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            exp_shifted(row, max);
            let sum: f64 = row.iter().map(|&e| e as f64).sum();
            let t = t as usize;
            let loss = -((row[t] as f64) / sum).ln();
            let k = scale / (n as f32 * sum as f32);
            for v in row.iter_mut() {
                *v *= k;
            }
            row[t] -= scale / n as f32;
            loss
        })
        .collect();
    (per_row.iter().sum::<f64>() / n as f64) as f32
}

simd_fn! {
    /// `x ← e^(x − shift)`.
    fn exp_shifted(x: &mut [f32], shift: f32) {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
    }
}

/// Log-softmax loss of each row without touching `logits` (evaluation).
pub fn cross_entropy_sum(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|v| ((v - max) as f64).exp()).sum();
            (max as f64 + sum.ln()) - row[t as usize] as f64
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

/// `y += x`, element-wise.
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(8192)
        .zip(x.par_chunks(8192))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y += x));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_major_round_trip() {
        let (b, t, h, hd) = (2, 3, 4, 2);
        let x: Vec<f32> = (0..b * t * h * hd).map(|i| i as f32).collect();
        let hm = to_head_major(&x, b, t, h, hd);
        // Element (b=1, t=2, h=3, d=1) sits at ((1*4+3)*3+2)*2+1 head-major.
        assert_eq!(hm[((4 + 3) * 3 + 2) * 2 + 1], x[((3 + 2) * 4 + 3) * 2 + 1]);
        assert_eq!(to_token_major(&hm, b, t, h, hd), x);
    }

    #[test]
    fn rope_backward_inverts_forward_and_keeps_norm() {
        let rope = Rope::new(5, 8, 10000.0);
        let x: Vec<f32> = (0..2 * 5 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        rope.forward(&mut y, 5);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() < 1e-4, "a rotation keeps the norm");
        rope.backward(&mut y, 5);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_vocab() {
        let mut logits = vec![0.0f32; 3 * 8];
        let loss = cross_entropy(&mut logits, &[1, 2, 7], 8, 1.0);
        assert!((loss - (8.0f32).ln()).abs() < 1e-6);
        // Each gradient row sums to zero.
        for row in logits.chunks(8) {
            assert!(row.iter().sum::<f32>().abs() < 1e-6);
        }
    }
}
