//! Causal grouped-query attention, forward and backward.
//!
//! Layout is head-major: `q[B, H, T, hd]`, `k, v[B, KV, T, hd]`. Query heads
//! `g·(H/KV) .. (g+1)·(H/KV)` share key/value head `g`. Work is split over
//! (batch, kv head), so the gradients of a shared key/value head are summed
//! inside one task, in a fixed order, without locks.
//!
//! Only the log-sum-exp of each score row is kept between forward and
//! backward; the probabilities are recomputed from `q` and `k`, so no
//! `T × T` matrix outlives a task.

use rayon::prelude::*;

use super::matmul::{matmul_serial, Trans};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Batch rows.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Scores `s = scale·q·kᵀ` of one head, masked causally, turned into
/// probabilities in place. With `lse` given (backward) it is reused;
/// otherwise it is computed and written.
fn probabilities(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    shape: &AttnShape,
    lse: &mut [f32],
    known: bool,
) {
    let (t, hd) = (shape.seq, shape.head_dim);
    matmul_serial(s, q, Trans::No, k, Trans::Yes, t, hd, t, false);
    let scale = shape.scale();
    for (i, row) in s.chunks_mut(t).enumerate() {
        let visible = &mut row[..=i];
        if known {
            let l = lse[i];
            for v in visible.iter_mut() {
                *v = (*v * scale - l).exp();
            }
        } else {
            // One exponential per score: normalise the shifted exponentials.
            let max = visible.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
            let mut sum = 0.0f32;
            for v in visible.iter_mut() {
                *v = (*v * scale - max).exp();
                sum += *v;
            }
            lse[i] = max + sum.ln();
            let inv = 1.0 / sum;
            visible.iter_mut().for_each(|v| *v *= inv);
        }
        row[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    }
}

/// `out[B,H,T,hd] = softmax(q·kᵀ/√hd + causal mask)·v`; writes `lse[B,H,T]`.
pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
) {
    let (t, hd, g) = (shape.seq, shape.head_dim, shape.group());
    let head = t * hd;
    out.par_chunks_mut(g * head)
        .zip(lse.par_chunks_mut(g * t))
        .zip(q.par_chunks(g * head))
        .zip(k.par_chunks(head).zip(v.par_chunks(head)))
        .for_each(|(((out, lse), q), (k, v))| {
            let mut s = vec![0.0f32; t * t];
            for j in 0..g {
                let lse = &mut lse[j * t..(j + 1) * t];
                probabilities(&mut s, &q[j * head..(j + 1) * head], k, &shape, lse, false);
                matmul_serial(
                    &mut out[j * head..(j + 1) * head],
                    &s,
                    Trans::No,
                    v,
                    Trans::No,
                    t,
                    t,
                    hd,
                    false,
                );
            }
        });
}

/// Gradients of [`forward`]: from `dout[B,H,T,hd]` to `dq`, `dk`, `dv`
/// (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
) {
    let (t, hd, g) = (shape.seq, shape.head_dim, shape.group());
    let head = t * hd;
    let scale = shape.scale();
    dq.par_chunks_mut(g * head)
        .zip(dk.par_chunks_mut(head).zip(dv.par_chunks_mut(head)))
        .zip(dout.par_chunks(g * head).zip(out.par_chunks(g * head)))
        .zip(lse.par_chunks(g * t).zip(q.par_chunks(g * head)))
        .zip(k.par_chunks(head).zip(v.par_chunks(head)))
        .for_each(|((((dq, (dk, dv)), (dout, out)), (lse, q)), (k, v))| {
            let mut p = vec![0.0f32; t * t];
            let mut dp = vec![0.0f32; t * t];
            let mut lse_row = vec![0.0f32; t];
            dk.iter_mut().for_each(|x| *x = 0.0);
            dv.iter_mut().for_each(|x| *x = 0.0);
            for j in 0..g {
                let range = j * head..(j + 1) * head;
                let (qh, douth, outh) =
                    (&q[range.clone()], &dout[range.clone()], &out[range.clone()]);
                lse_row.copy_from_slice(&lse[j * t..(j + 1) * t]);
                probabilities(&mut p, qh, k, &shape, &mut lse_row, true);
                // dv += pᵀ·dout
                matmul_serial(dv, &p, Trans::Yes, douth, Trans::No, t, t, hd, true);
                // dp = dout·vᵀ
                matmul_serial(&mut dp, douth, Trans::No, v, Trans::Yes, t, hd, t, false);
                // ds = p ⊙ (dp − rowsum(dout ⊙ out)), pre-multiplied by the scale.
                for i in 0..t {
                    let o = &outh[i * hd..(i + 1) * hd];
                    let d = &douth[i * hd..(i + 1) * hd];
                    let delta: f32 = o.iter().zip(d).map(|(a, b)| a * b).sum();
                    let pr = &p[i * t..i * t + i + 1];
                    let dr = &mut dp[i * t..(i + 1) * t];
                    for (x, &pv) in dr[..=i].iter_mut().zip(pr) {
                        *x = pv * (*x - delta) * scale;
                    }
                    dr[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                }
                // dq = ds·k ; dk += dsᵀ·q
                matmul_serial(
                    &mut dq[range.clone()],
                    &dp,
                    Trans::No,
                    k,
                    Trans::No,
                    t,
                    t,
                    hd,
                    false,
                );
                matmul_serial(dk, &dp, Trans::Yes, qh, Trans::No, t, t, hd, true);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention with the full score matrix, for reference.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let (t, hd) = (s.seq, s.head_dim);
        let mut out = vec![0.0; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kvh = h / s.group();
                let qo = (b * s.heads + h) * t * hd;
                let ko = (b * s.kv_heads + kvh) * t * hd;
                for i in 0..t {
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[qo + i * hd + d] * k[ko + j * hd + d])
                                .sum::<f32>()
                                * s.scale()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = scores.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        out[qo + i * hd + d] = (0..=i)
                            .map(|j| (scores[j] - m).exp() / z * v[ko + j * hd + d])
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference_with_grouped_heads() {
        let s = AttnShape {
            batch: 2,
            seq: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
        };
        let nq = s.batch * s.heads * s.seq * s.head_dim;
        let nk = s.batch * s.kv_heads * s.seq * s.head_dim;
        let q: Vec<f32> = (0..nq)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let k: Vec<f32> = (0..nk)
            .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
            .collect();
        let v: Vec<f32> = (0..nk)
            .map(|i| ((i * 29 % 89) as f32 / 44.0) - 1.0)
            .collect();
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; s.batch * s.heads * s.seq];
        forward(&mut out, &mut lse, &q, &k, &v, s);
        for (a, b) in out.iter().zip(reference(&q, &k, &v, s)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
