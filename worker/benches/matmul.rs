//! GFLOP/s of the matrix products a training step of the quickstart model
//! runs (2,048 rows per micro-batch, width 256, MLP width 704, vocabulary
//! 256), in each operand layout the layers use, plus a square 1024³ product.
//!
//! `cargo bench -p pipewright --bench matmul [-- THREADS]`

use std::time::Instant;

use pipewright::kernels::{matmul, Trans};

fn rate(m: usize, k: usize, n: usize, ta: Trans, tb: Trans) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    matmul(&mut c, &a, ta, &b, tb, m, k, n, false);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            matmul(&mut c, &a, ta, &b, tb, m, k, n, true);
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

fn main() {
    let threads = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(0);
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .expect("thread pool");
    }
    println!("threads: {}", rayon::current_num_threads());
    println!("| product | m×k×n | GFLOP/s |");
    println!("| --- | --- | ---: |");
    let rows = 2048;
    let cases = [
        (
            "linear forward x·Wᵀ (256→704)",
            rows,
            256,
            704,
            Trans::No,
            Trans::Yes,
        ),
        (
            "linear input grad dy·W (704→256)",
            rows,
            704,
            256,
            Trans::No,
            Trans::No,
        ),
        (
            "linear weight grad dyᵀ·x [704,256]",
            704,
            rows,
            256,
            Trans::Yes,
            Trans::No,
        ),
        (
            "linear forward x·Wᵀ (256→256)",
            rows,
            256,
            256,
            Trans::No,
            Trans::Yes,
        ),
        (
            "weight grad dyᵀ·x [256,256]",
            256,
            rows,
            256,
            Trans::Yes,
            Trans::No,
        ),
        ("square", 1024, 1024, 1024, Trans::No, Trans::No),
    ];
    for (name, m, k, n, ta, tb) in cases {
        println!("| {name} | {m}×{k}×{n} | {:.1} |", rate(m, k, n, ta, tb));
    }
}
