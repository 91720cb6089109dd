//! Causal grouped-query attention, forward and backward.
//!
//! Tensors are token-major, as the projections write them: `q[B·T, H·hd]`,
//! `k, v[B·T, KV·hd]`, `out[B·T, H·hd]`; a head is a strided column block,
//! read and written in place by the matrix products, so no layout copies are
//! made. Query heads `g·(H/KV) .. (g+1)·(H/KV)` share key/value head `g`.
//!
//! Work is split over (batch, kv head) pairs; the gradients of a shared
//! key/value head are summed inside one task, in a fixed order, without
//! locks. Within a head, query rows go in blocks of [`BLOCK`]: a block's
//! scores are computed only against the keys it can see, so the products
//! skip the masked upper triangle, block by block.
//!
//! The forward keeps the probabilities `p[B, H, T, T]` (the causal blocks
//! of each row; the rest of the buffer is never read) for the backward.

use rayon::prelude::*;

use super::simd::{exp, simd_fn};

/// Query rows per block of the causal product.
const BLOCK: usize = 32;

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
    fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }
    fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }
    /// Length of the probability buffer `[B, H, T, T]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
}

/// A matrix inside a buffer: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    fn rows(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m,n] (+)= beta · a[m,k] · b[k,n]` on the calling thread; `dst` is
/// row-major with row stride `dst_rs`.
///
/// # Safety
/// Every element the three views address for these sizes must lie inside a
/// live allocation, and `dst`'s elements must not be accessed by anyone
/// else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0f32,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes only its own (batch, head) columns; see the
// callers.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the whole `Shared`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Offsets of one task's heads in the token-major tensors.
#[derive(Clone, Copy)]
struct Task {
    /// Row stride of `q`/`out` (`H·hd`) and of `k`/`v` (`KV·hd`).
    q_rs: usize,
    kv_rs: usize,
    /// Start of sequence `b`, head 0, in `q` and in `k`.
    q0: usize,
    kv0: usize,
}

impl Task {
    fn new(s: &AttnShape, b: usize, g: usize) -> Self {
        let (q_rs, kv_rs) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        Self {
            q_rs,
            kv_rs,
            q0: b * s.seq * q_rs,
            kv0: b * s.seq * kv_rs + g * s.head_dim,
        }
    }
    /// Offset of row `t` of query head `h` (global head index).
    fn q_at(&self, h: usize, hd: usize, t: usize) -> usize {
        self.q0 + t * self.q_rs + h * hd
    }
    /// Offset of row `t` of this task's key/value head.
    fn kv_at(&self, t: usize) -> usize {
        self.kv0 + t * self.kv_rs
    }
}

simd_fn! {
    /// Softmax of the causal rows `r0 .. r0+rows` of one head, in place:
    /// `p` holds those rows (stride `t`), each with its first `r0 + rows`
    /// scores; entries past the diagonal become zero.
    fn softmax_block(p: &mut [f32], t: usize, r0: usize, rows: usize) {
        let end = r0 + rows;
        for ii in 0..rows {
            let i = r0 + ii;
            let row = &mut p[ii * t..ii * t + end];
            let (visible, masked) = row.split_at_mut(i + 1);
            let max = lanes_max(visible);
            for v in visible.iter_mut() {
                *v = exp(*v - max);
            }
            let inv = 1.0 / lanes_sum(visible);
            for v in visible.iter_mut() {
                *v *= inv;
            }
            masked.fill(0.0);
        }
    }
}

simd_fn! {
    /// `ds = p ⊙ (dp − δ) · scale` over the causal part of rows
    /// `r0 .. r0+rows` (stride `t`); zero past the diagonal.
    fn softmax_grad_block(
        ds: &mut [f32],
        p: &[f32],
        delta: &[f32],
        t: usize,
        r0: usize,
        rows: usize,
        scale: f32,
    ) {
        let end = r0 + rows;
        for ii in 0..rows {
            let i = r0 + ii;
            let d = delta[ii];
            let row = &mut ds[ii * t..ii * t + end];
            let (visible, masked) = row.split_at_mut(i + 1);
            for (x, &pv) in visible.iter_mut().zip(&p[ii * t..ii * t + i + 1]) {
                *x = pv * (*x - d) * scale;
            }
            masked.fill(0.0);
        }
    }
}

/// Sum with eight independent accumulators (vectorises; fixed order).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in rest {
        s += v;
    }
    s
}

/// Maximum with eight independent lanes (vectorises).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for &v in rest {
        m = m.max(v);
    }
    m
}

/// `out = softmax(q·kᵀ/√hd + causal mask)·v` (token-major); writes the
/// probabilities to `p[B, H, T, T]`.
pub fn forward(out: &mut [f32], p: &mut [f32], q: &[f32], k: &[f32], v: &[f32], shape: AttnShape) {
    let s = shape;
    let (t, hd, g) = (s.seq, s.head_dim, s.group());
    assert_eq!(q.len(), s.q_len(), "attention: q shape");
    assert_eq!(out.len(), s.q_len(), "attention: out shape");
    assert_eq!(k.len(), s.kv_len(), "attention: k shape");
    assert_eq!(v.len(), s.kv_len(), "attention: v shape");
    assert_eq!(p.len(), s.probs_len(), "attention: p shape");
    if p.is_empty() || hd == 0 {
        out.fill(0.0);
        return;
    }
    let scale = s.scale();
    let out_ptr = Shared(out.as_mut_ptr());
    p.par_chunks_mut(g * t * t)
        .enumerate()
        .for_each(|(task, p)| {
            let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
            let at = Task::new(&s, b, kvh);
            for j in 0..g {
                let h = kvh * g + j;
                let ph = &mut p[j * t * t..(j + 1) * t * t];
                for r0 in (0..t).step_by(BLOCK) {
                    let rows = BLOCK.min(t - r0);
                    let end = r0 + rows;
                    let q_blk = View::rows(q[at.q_at(h, hd, r0)..].as_ptr(), at.q_rs);
                    let k_all = View::rows(k[at.kv_at(0)..].as_ptr(), at.kv_rs);
                    let v_all = View::rows(v[at.kv_at(0)..].as_ptr(), at.kv_rs);
                    let p_blk = &mut ph[r0 * t..];
                    // SAFETY: q_blk spans rows r0..end of head h, k_all and
                    // v_all rows 0..end of head kvh, all inside q, k, v
                    // (asserted lengths); p_blk rows 0..rows of stride t
                    // fit in ph; this task alone owns ph and head h's
                    // columns of out for sequence b.
                    unsafe {
                        product(
                            rows,
                            end,
                            hd,
                            p_blk.as_mut_ptr(),
                            t,
                            false,
                            q_blk,
                            k_all.t(),
                            scale,
                        );
                    }
                    softmax_block(p_blk, t, r0, rows);
                    unsafe {
                        product(
                            rows,
                            hd,
                            end,
                            out_ptr.get().add(at.q_at(h, hd, r0)),
                            at.q_rs,
                            false,
                            View::rows(p_blk.as_ptr(), t),
                            v_all,
                            1.0,
                        );
                    }
                }
            }
        });
}

/// Gradients of [`forward`]: from `dout` to `dq`, `dk`, `dv` (overwritten;
/// all token-major).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    p: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
) {
    let s = shape;
    let (t, hd, g) = (s.seq, s.head_dim, s.group());
    for (x, what) in [(dq.len(), "dq"), (dout.len(), "dout"), (out.len(), "out")] {
        assert_eq!(x, s.q_len(), "attention: {what} shape");
    }
    assert_eq!(q.len(), s.q_len(), "attention: q shape");
    for (x, what) in [(dk.len(), "dk"), (dv.len(), "dv"), (k.len(), "k")] {
        assert_eq!(x, s.kv_len(), "attention: {what} shape");
    }
    assert_eq!(v.len(), s.kv_len(), "attention: v shape");
    assert_eq!(p.len(), s.probs_len(), "attention: p shape");
    if p.is_empty() || hd == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    let scale = s.scale();
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    p.par_chunks(g * t * t).enumerate().for_each(|(task, p)| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        let at = Task::new(&s, b, kvh);
        // SAFETY (for every raw access below): this task alone touches
        // sequence b's columns of query heads kvh·g .. (kvh+1)·g in dq and
        // of kv head kvh in dk and dv; offsets come from `Task`, inside
        // the asserted lengths.
        for ti in 0..t {
            unsafe {
                std::slice::from_raw_parts_mut(dk_ptr.get().add(at.kv_at(ti)), hd).fill(0.0);
                std::slice::from_raw_parts_mut(dv_ptr.get().add(at.kv_at(ti)), hd).fill(0.0);
            }
        }
        let mut ds = vec![0.0f32; BLOCK * t];
        let mut delta = [0.0f32; BLOCK];
        let k_all = View::rows(k[at.kv_at(0)..].as_ptr(), at.kv_rs);
        let v_all = View::rows(v[at.kv_at(0)..].as_ptr(), at.kv_rs);
        for j in 0..g {
            let h = kvh * g + j;
            let ph = &p[j * t * t..(j + 1) * t * t];
            for r0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - r0);
                let end = r0 + rows;
                // δ_i = Σ_d dout_id · out_id
                for (ii, d) in delta[..rows].iter_mut().enumerate() {
                    let o = at.q_at(h, hd, r0 + ii);
                    *d = dout[o..o + hd]
                        .iter()
                        .zip(&out[o..o + hd])
                        .map(|(a, b)| a * b)
                        .sum();
                }
                let p_blk = View::rows(ph[r0 * t..].as_ptr(), t);
                let dout_blk = View::rows(dout[at.q_at(h, hd, r0)..].as_ptr(), at.q_rs);
                let q_blk = View::rows(q[at.q_at(h, hd, r0)..].as_ptr(), at.q_rs);
                unsafe {
                    // dv[0..end] += p_blkᵀ · dout_blk
                    product(
                        end,
                        hd,
                        rows,
                        dv_ptr.get().add(at.kv_at(0)),
                        at.kv_rs,
                        true,
                        p_blk.t(),
                        dout_blk,
                        1.0,
                    );
                    // dp = dout_blk · v[0..end]ᵀ
                    product(
                        rows,
                        end,
                        hd,
                        ds.as_mut_ptr(),
                        t,
                        false,
                        dout_blk,
                        v_all.t(),
                        1.0,
                    );
                }
                softmax_grad_block(&mut ds, &ph[r0 * t..], &delta[..rows], t, r0, rows, scale);
                let ds_blk = View::rows(ds.as_ptr(), t);
                unsafe {
                    // dq_blk = ds · k[0..end]
                    product(
                        rows,
                        hd,
                        end,
                        dq_ptr.get().add(at.q_at(h, hd, r0)),
                        at.q_rs,
                        false,
                        ds_blk,
                        k_all,
                        1.0,
                    );
                    // dk[0..end] += dsᵀ · q_blk
                    product(
                        end,
                        hd,
                        rows,
                        dk_ptr.get().add(at.kv_at(0)),
                        at.kv_rs,
                        true,
                        ds_blk.t(),
                        q_blk,
                        1.0,
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention on token-major tensors, for reference.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let (t, hd) = (s.seq, s.head_dim);
        let mut out = vec![0.0; q.len()];
        let qi = |b: usize, h: usize, i: usize| ((b * t + i) * s.heads + h) * hd;
        let ki = |b: usize, h: usize, i: usize| ((b * t + i) * s.kv_heads + h) * hd;
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kvh = h / s.group();
                for i in 0..t {
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[qi(b, h, i) + d] * k[ki(b, kvh, j) + d])
                                .sum::<f32>()
                                * s.scale()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = scores.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        out[qi(b, h, i) + d] = (0..=i)
                            .map(|j| (scores[j] - m).exp() / z * v[ki(b, kvh, j) + d])
                            .sum();
                    }
                }
            }
        }
        out
    }

    fn filled(n: usize, a: usize, m: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * a % m) as f32 / (m as f32 / 2.0)) - 1.0)
            .collect()
    }

    #[test]
    fn forward_matches_reference_with_grouped_heads_and_partial_blocks() {
        // 70 positions: two full blocks and a partial one.
        for seq in [7, 70] {
            let s = AttnShape {
                batch: 2,
                seq,
                heads: 4,
                kv_heads: 2,
                head_dim: 6,
            };
            let (q, k, v) = (
                filled(s.q_len(), 37, 101),
                filled(s.kv_len(), 53, 97),
                filled(s.kv_len(), 29, 89),
            );
            let mut out = vec![0.0; s.q_len()];
            let mut p = vec![f32::NAN; s.probs_len()];
            forward(&mut out, &mut p, &q, &k, &v, s);
            for (a, b) in out.iter().zip(reference(&q, &k, &v, s)) {
                assert!((a - b).abs() < 1e-5, "seq {seq}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_of_the_reference() {
        let s = AttnShape {
            batch: 1,
            seq: 40,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        let (q, k, v) = (
            filled(s.q_len(), 37, 101),
            filled(s.kv_len(), 53, 97),
            filled(s.kv_len(), 29, 89),
        );
        let r = filled(s.q_len(), 17, 83);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            reference(q, k, v, s)
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let mut out = vec![0.0; s.q_len()];
        let mut p = vec![0.0; s.probs_len()];
        forward(&mut out, &mut p, &q, &k, &v, s);
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; q.len()],
            vec![f32::NAN; k.len()],
            vec![f32::NAN; v.len()],
        );
        backward(&mut dq, &mut dk, &mut dv, &r, &out, &p, &q, &k, &v, s);
        let eps = 1e-2f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for idx in [0, 5, 17, grad.len() / 2, grad.len() - 1] {
                let shifted = |d: f32| {
                    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                    [&mut q2, &mut k2, &mut v2][which][idx] += d;
                    loss(&q2, &k2, &v2)
                };
                let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
                let exact = grad[idx] as f64;
                assert!(
                    (numeric - exact).abs() < 2e-3 * numeric.abs().max(1.0),
                    "tensor {which} index {idx}: numeric {numeric} vs {exact}"
                );
            }
        }
    }
}
