//! Numeric primitives the model calls, on the CPU.
//!
//! This is the device boundary: the layers in `model` call only these
//! functions on plain row-major `f32` slices, so another backend can provide
//! the same set. Matrix products go through the `gemm` crate (packed,
//! vectorised, multithreaded with rayon); the rest is written so the compiler
//! vectorises the inner loops, and parallelised over rows with rayon.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod matmul;
pub mod ops;
pub mod pool;
pub(crate) mod simd;

pub use matmul::{matmul, matmul_stats, MatmulStats, Trans};

/// Sizes rayon's global pool, where the kernels run (0: one thread per
/// core). Only the first call in a process takes effect.
pub fn init_threads(threads: usize) {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    // Fails only if the pool was already built, which is harmless.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}
