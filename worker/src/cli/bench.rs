//! `pipewright bench`: throughput measurements printed as JSON, so a script
//! can set them beside a reference implementation's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use crate::kernels::matmul_stats;
use crate::train::Trainer;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training tokens/s of a manifest's model (one process, all stages).
    Train {
        /// TrainingRun manifest.
        manifest: PathBuf,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Kernel threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Training tokens/s and model FLOPs utilisation of a Llama model on
    /// one CUDA GPU (synthetic tokens; default shapes: TinyLlama 1.1B).
    #[cfg(feature = "cuda")]
    Gpu(super::bench_gpu::GpuBenchArgs),
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train {
            manifest,
            steps,
            warmup,
            threads,
        } => train(&manifest, steps, warmup, threads),
        #[cfg(feature = "cuda")]
        BenchCommand::Gpu(args) => super::bench_gpu::run(&args),
    }
}

fn train(path: &Path, steps: u64, warmup: u64, threads: usize) -> Result<()> {
    let mut manifest = pipewright_spec::load_manifest(path)
        .with_context(|| format!("reading {}", path.display()))?;
    manifest.spec.training.steps = warmup + steps;
    crate::kernels::init_threads(threads);
    let mut trainer = Trainer::new(manifest)?;
    for _ in 0..warmup {
        trainer.train_step()?;
    }
    let mm0 = matmul_stats();
    let start = Instant::now();
    let mut tokens = 0usize;
    for _ in 0..steps {
        tokens += trainer.train_step()?.tokens;
    }
    let secs = start.elapsed().as_secs_f64();
    let mm1 = matmul_stats();
    let mm = crate::kernels::MatmulStats {
        flops: mm1.flops - mm0.flops,
        seconds: mm1.seconds - mm0.seconds,
    };
    let out = json!({
        "impl": "pipewright",
        "tokens_per_sec": tokens as f64 / secs,
        "step_ms": secs * 1e3 / steps.max(1) as f64,
        "matmul_gflops": mm.gflops(),
        "matmul_time_fraction": mm.seconds / secs,
        "peak_rss_mib": peak_rss_mib(),
        "params": trainer.model.total_params(),
        "tokens_per_step": trainer.tokens_per_step(),
        "threads": rayon::current_num_threads(),
    });
    println!("{out}");
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
fn peak_rss_mib() -> f64 {
    crate::plan::own_status("VmHWM").map_or(0.0, |b| b as f64 / (1u64 << 20) as f64)
}
