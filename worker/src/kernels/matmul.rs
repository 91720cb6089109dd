//! Matrix multiplication through `gemm`, with a FLOP counter for reporting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static FLOPS: AtomicU64 = AtomicU64::new(0);
static NANOS: AtomicU64 = AtomicU64::new(0);

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Use the matrix as stored (row-major).
    No,
    /// Use its transpose.
    Yes,
}

/// Totals of the matrix products run so far in this process.
#[derive(Clone, Copy, Debug, Default)]
pub struct MatmulStats {
    /// Floating-point operations (2·m·n·k per product).
    pub flops: u64,
    /// Wall time spent inside products.
    pub seconds: f64,
}

impl MatmulStats {
    /// Achieved GFLOP/s over the counted products.
    pub fn gflops(&self) -> f64 {
        if self.seconds > 0.0 {
            self.flops as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// Totals since the process started (take differences to time a region).
pub fn matmul_stats() -> MatmulStats {
    MatmulStats {
        flops: FLOPS.load(Ordering::Relaxed),
        seconds: NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// `out[m,n] (+)= op(a)[m,k] · op(b)[k,n]`, all row-major.
///
/// `a` is stored as `[m,k]` (or `[k,m]` when `ta` is `Yes`), `b` as `[k,n]`
/// (or `[n,k]` when `tb` is `Yes`). With `accumulate` the product is added
/// to `out`, otherwise it overwrites it. Runs on the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    matmul_with(out, a, ta, b, tb, m, k, n, accumulate, true);
}

/// Like [`matmul`], single-threaded: for callers that already run inside a
/// parallel loop (attention per head).
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial(
    out: &mut [f32],
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    matmul_with(out, a, ta, b, tb, m, k, n, accumulate, false);
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    out: &mut [f32],
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(out.len(), m * n, "matmul: out is not [m,n]");
    assert_eq!(a.len(), m * k, "matmul: a is not [m,k]");
    assert_eq!(b.len(), k * n, "matmul: b is not [k,n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    // Row-major [r,c] has row stride c and column stride 1; a transpose
    // swaps the two strides, so no copy is needed.
    let (a_rs, a_cs) = match ta {
        Trans::No => (k as isize, 1),
        Trans::Yes => (1, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Trans::No => (n as isize, 1),
        Trans::Yes => (1, k as isize),
    };
    let parallelism = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let start = Instant::now();
    // SAFETY: the asserts above guarantee every index gemm touches through
    // these strides lies inside the three slices, and `out` does not alias
    // `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    if parallel {
        FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
        NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], ta: Trans, b: &[f32], tb: Trans, m: usize, k: usize, n: usize) -> Vec<f32> {
        let at = |i: usize, p: usize| match ta {
            Trans::No => a[i * k + p],
            Trans::Yes => a[p * m + i],
        };
        let bt = |p: usize, j: usize| match tb {
            Trans::No => b[p * n + j],
            Trans::Yes => b[j * k + p],
        };
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn all_transpose_combinations_match_naive_product() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let want = naive(&a, ta, &b, tb, m, k, n);
                let mut got = vec![1.0; m * n];
                matmul(&mut got, &a, ta, &b, tb, m, k, n, false);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-4, "{ta:?} {tb:?}: {g} vs {w}");
                }
                // Accumulating adds the product on top of what is there.
                matmul(&mut got, &a, ta, &b, tb, m, k, n, true);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - 2.0 * w).abs() < 1e-4);
                }
            }
        }
    }
}
