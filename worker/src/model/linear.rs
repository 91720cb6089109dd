//! A bias-free linear layer `y = x·Wᵀ` with `W[out, in]`.

use super::Param;
use crate::kernels::{matmul, pool, Trans};

/// Forward: `y[N,out] = x[N,in] · Wᵀ` (a pooled buffer).
pub fn forward(w: &Param, x: &[f32], rows: usize) -> Vec<f32> {
    let (out, inp) = (w.shape[0], w.shape[1]);
    let mut y = pool::take(rows * out);
    matmul(
        &mut y,
        x,
        Trans::No,
        &w.data,
        Trans::Yes,
        rows,
        inp,
        out,
        false,
    );
    y
}

/// Input gradient: `dx[N,in] (+)= dy[N,out] · W`.
pub fn backward_input(w: &Param, dy: &[f32], dx: &mut [f32], rows: usize, accumulate: bool) {
    let (out, inp) = (w.shape[0], w.shape[1]);
    matmul(
        dx,
        dy,
        Trans::No,
        &w.data,
        Trans::No,
        rows,
        out,
        inp,
        accumulate,
    );
}

/// Weight gradient: `dW[out,in] += dyᵀ · x`.
pub fn backward_weight(w: &mut Param, dy: &[f32], x: &[f32], rows: usize) {
    let (out, inp) = (w.shape[0], w.shape[1]);
    matmul(
        &mut w.grad,
        dy,
        Trans::Yes,
        x,
        Trans::No,
        out,
        rows,
        inp,
        true,
    );
}
