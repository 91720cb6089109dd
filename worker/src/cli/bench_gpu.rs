//! `pipewright bench gpu`: training throughput, model FLOPs utilisation and
//! device memory of a Llama model on one CUDA GPU, on synthetic tokens.
//! `bench/gpu_torch.py` runs the same shapes in PyTorch for comparison.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;

use crate::kernels::cuda::Gpu;
use crate::model::cuda::DeviceModel;
use crate::model::{ModelConfig, Param};
use crate::optim::OptimConfig;

/// Dense bf16 peak of an H100/H200 SXM (TFLOP/s), the MFU denominator.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

/// Shapes and lengths of `pipewright bench gpu`.
#[derive(Debug, Args)]
pub struct GpuBenchArgs {
    /// Residual width.
    #[arg(long, default_value_t = 2048)]
    dim: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 22)]
    layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// SwiGLU inner width.
    #[arg(long, default_value_t = 5632)]
    ffn_dim: usize,
    /// Vocabulary.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Dense bf16 peak of the GPU in TFLOP/s (MFU's denominator).
    #[arg(long, default_value_t = H100_BF16_PEAK_TFLOPS)]
    peak_tflops: f64,
}

/// Deterministic pseudo-random values in ±`scale` (not zeros: a GPU runs
/// matrix products of zeros faster than real ones).
fn fill(p: &mut Param, seed: u64, scale: f32) {
    p.data
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut x = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for v in chunk {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
            }
        });
}

/// Run the benchmark and print one JSON line.
pub fn run(a: &GpuBenchArgs) -> Result<()> {
    let cfg = ModelConfig {
        vocab: a.vocab,
        dim: a.dim,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        ffn_dim: a.ffn_dim,
        seq_len: a.seq_len,
        tied: false,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
    };
    let gpu = Gpu::open(0).context("opening CUDA device 0")?;
    let name = gpu.name().to_string();
    let (free0, total) = gpu.memory()?;
    // Parameter tensors with the model's names and shapes; values are
    // pseudo-random (a real initialisation of 1B parameters on the CPU would
    // only cost set-up time).
    let (d, hd) = (cfg.dim, cfg.head_dim());
    let mut params = vec![
        Param::filled(
            crate::model::embedding::EMBED_NAME,
            &[cfg.vocab, d],
            0.0,
            true,
        ),
        Param::filled("model.norm.weight", &[d], 1.0, false),
        Param::filled(crate::model::head::LM_HEAD_NAME, &[cfg.vocab, d], 0.0, true),
    ];
    for l in 0..cfg.layers {
        let at = |n: &str| format!("model.layers.{l}.{n}.weight");
        params.push(Param::filled(at("input_layernorm"), &[d], 1.0, false));
        params.push(Param::filled(
            at("post_attention_layernorm"),
            &[d],
            1.0,
            false,
        ));
        for (n, rows, cols) in [
            ("self_attn.q_proj", cfg.heads * hd, d),
            ("self_attn.k_proj", cfg.kv_heads * hd, d),
            ("self_attn.v_proj", cfg.kv_heads * hd, d),
            ("self_attn.o_proj", d, cfg.heads * hd),
            ("mlp.gate_proj", cfg.ffn_dim, d),
            ("mlp.up_proj", cfg.ffn_dim, d),
            ("mlp.down_proj", d, cfg.ffn_dim),
        ] {
            params.push(Param::filled(at(n), &[rows, cols], 0.0, true));
        }
    }
    params.par_iter_mut().enumerate().for_each(|(i, p)| {
        if p.shape.len() == 2 {
            fill(p, i as u64 + 1, 0.02);
        }
    });
    let refs: Vec<&Param> = params.iter().collect();
    let rows = a.batch * a.seq_len;
    let mut model = DeviceModel::new(gpu, &cfg, &refs, None, 0, rows)?;
    drop(params);
    let optim = OptimConfig {
        lr: 1e-4,
        warmup: 0,
        steps: 1000,
        min_lr_ratio: 0.1,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
    };
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut tokens = vec![0u32; rows + 1];
    for t in tokens.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *t = (x % a.vocab as u64) as u32;
    }
    let (inp, tgt) = (&tokens[..rows], &tokens[1..]);
    let step = |model: &mut DeviceModel| -> Result<f32> {
        let loss = model.forward_backward(inp, tgt, a.batch, 1.0)?;
        let norm = model.grad_norm()?;
        model.step(&optim, optim.lr, optim.clip_factor(norm))?;
        Ok(loss)
    };
    for _ in 0..a.warmup {
        step(&mut model)?;
    }
    model.gpu().synchronize()?;
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..a.steps {
        loss = step(&mut model)?;
    }
    model.gpu().synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let (free1, _) = model.gpu().memory()?;
    // Where a step's time goes: forward, backward and optimizer timed apart
    // (waiting for the device between them), and attention alone.
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    let parts = 3;
    for _ in 0..parts {
        let (_, f, b) = model.timed_repeat(a.batch, 1.0)?;
        let t = Instant::now();
        let norm = model.grad_norm()?;
        model.step(&optim, optim.lr, optim.clip_factor(norm))?;
        model.gpu().synchronize()?;
        fwd += f / parts as f64;
        bwd += b / parts as f64;
        opt += t.elapsed().as_secs_f64() / parts as f64;
    }
    let attention = attention_seconds(model.gpu(), &cfg, a.batch)?;
    let tokens_per_sec = (rows * a.steps) as f64 / secs;
    let flops_per_token =
        cfg.layers as f64 * cfg.block_flops_per_token() + cfg.head_flops_per_token();
    let tflops = flops_per_token * tokens_per_sec / 1e12;
    let out = json!({
        "impl": "pipewright",
        "gpu": name,
        "params": cfg.total_params(),
        "shape": {"dim": a.dim, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
                  "ffn_dim": a.ffn_dim, "vocab": a.vocab, "seq_len": a.seq_len, "batch": a.batch},
        "tokens_per_sec": tokens_per_sec,
        "step_ms": secs * 1e3 / a.steps.max(1) as f64,
        "model_tflops": tflops,
        "mfu": tflops / a.peak_tflops,
        "flops_per_token": flops_per_token,
        "device_memory_gib": (free0 - free1) as f64 / (1u64 << 30) as f64,
        "device_total_gib": total as f64 / (1u64 << 30) as f64,
        "model_bytes_gib": model.device_bytes() as f64 / (1u64 << 30) as f64,
        "last_loss": loss,
        "breakdown_ms": {
            "forward": fwd * 1e3,
            "backward": bwd * 1e3,
            "optimizer": opt * 1e3,
            "attention_forward_backward_all_layers": attention * 1e3 * cfg.layers as f64,
        },
    });
    println!("{out}");
    Ok(())
}

/// Seconds of one layer's attention forward and backward at the model's
/// shape (the median of 5 runs).
fn attention_seconds(gpu: &Gpu, cfg: &ModelConfig, batch: usize) -> Result<f64> {
    use crate::kernels::cuda::AttnDims;
    let hd = cfg.head_dim();
    let dims = AttnDims {
        batch,
        seq: cfg.seq_len,
        heads: cfg.heads,
        kv_heads: cfg.kv_heads,
        head_dim: hd,
    };
    let rows = batch * cfg.seq_len;
    let (nq, nk) = (rows * cfg.heads * hd, rows * cfg.kv_heads * hd);
    let bits = |n: usize, seed: u64| -> Vec<u16> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                half::bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_bits()
            })
            .collect()
    };
    let (q, k, v) = (
        gpu.upload(&bits(nq, 1))?,
        gpu.upload(&bits(nk, 2))?,
        gpu.upload(&bits(nk, 3))?,
    );
    let dout_bf = gpu.upload(&bits(nq, 4))?;
    let dout = gpu.zeros::<f32>(nq)?;
    let mut o = gpu.zeros::<f32>(nq)?;
    let mut o_bf = gpu.zeros::<u16>(nq)?;
    let mut lse = gpu.zeros::<f32>(rows * cfg.heads)?;
    let mut delta = gpu.zeros::<f32>(rows * cfg.heads)?;
    let mut partial = gpu.zeros::<f32>(2 * nq)?;
    let (mut dq, mut dk, mut dv) = (
        gpu.zeros::<f32>(nq)?,
        gpu.zeros::<f32>(nk)?,
        gpu.zeros::<f32>(nk)?,
    );
    let mut times = Vec::new();
    for _ in 0..6 {
        gpu.synchronize()?;
        let t = Instant::now();
        gpu.attention_forward(&q, &k, &v, &mut o, &mut o_bf, &mut lse, dims)?;
        gpu.attention_backward(
            &q,
            &k,
            &v,
            &o,
            &lse,
            &dout,
            &dout_bf,
            &mut delta,
            &mut partial,
            &mut dq,
            &mut dk,
            &mut dv,
            dims,
        )?;
        gpu.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
