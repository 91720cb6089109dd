//! The CUDA backend against the CPU reference, on a real GPU: every kernel's
//! forward and backward, the whole model's loss and every parameter's
//! gradient, 50 training steps of the quickstart model, and NCCL with one
//! rank. Tolerances are those of bf16 matrix operands (8 significant bits)
//! with f32 accumulation.
//!
//! Without a usable GPU every test skips (prints why), unless
//! `PIPEWRIGHT_REQUIRE_GPU=1` (set by `scripts/gpu-check.sh`), which makes a
//! missing GPU a failure.
#![cfg(feature = "cuda")]

use pipewright::kernels::attention::{self as cpu_attn, AttnShape};
use pipewright::kernels::cuda::{AdamHyper, AttnDims, Gpu};
use pipewright::kernels::ops;
use pipewright::model::cuda::DeviceModel;
use pipewright::model::{ModelConfig, Stage, StageInput, StageOutput};
use pipewright::optim::{AdamW, OptimConfig};

fn gpu_or_skip() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var("PIPEWRIGHT_REQUIRE_GPU").as_deref() != Ok("1"),
                "PIPEWRIGHT_REQUIRE_GPU=1 but no GPU: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Deterministic values in ±scale.
fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect()
}

/// Bit patterns of values already rounded to bf16.
fn to_bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| (x.to_bits() >> 16) as u16).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// Relative L2 error ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite values"
    );
}

const BF16_TOL: f64 = 1e-2;
const F32_TOL: f64 = 1e-5;

#[test]
fn rmsnorm_rope_swiglu_loss_and_adamw_match_the_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let (rows, d) = (96, 320);
    let x = rand_vec(rows * d, 1, 2.0);
    let w = rand_vec(d, 2, 1.0);
    let dy = rand_vec(rows * d, 3, 1.0);

    // RMSNorm forward (bf16 out) and both backward halves (f32).
    let (mut y, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows]);
    ops::rmsnorm_forward(&mut y, &mut rstd, &x, &w, 1e-5);
    let (gx, gw, gdy) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&w).unwrap(),
        gpu.upload(&dy).unwrap(),
    );
    let mut gy = gpu.zeros::<u16>(rows * d).unwrap();
    let mut grstd = gpu.zeros::<f32>(rows).unwrap();
    gpu.rmsnorm_forward(&gx, &gw, &mut gy, &mut grstd, rows, 1e-5)
        .unwrap();
    assert_close(
        "rmsnorm forward",
        &bf16_to_f32(&gpu.download(&gy).unwrap()),
        &y,
        BF16_TOL,
    );
    assert_close(
        "rmsnorm rstd",
        &gpu.download(&grstd).unwrap(),
        &rstd,
        F32_TOL,
    );
    let mut dx = vec![0.5; rows * d];
    ops::rmsnorm_backward_input(&mut dx, &dy, &x, &w, &rstd);
    let mut gdx = gpu.upload(&vec![0.5f32; rows * d]).unwrap();
    gpu.rmsnorm_backward_input(&gdy, &gx, &gw, &grstd, &mut gdx, rows)
        .unwrap();
    assert_close(
        "rmsnorm backward input",
        &gpu.download(&gdx).unwrap(),
        &dx,
        1e-5,
    );
    let mut dw = vec![0.0; d];
    ops::rmsnorm_backward_weight(&mut dw, &dy, &x, &rstd);
    let mut gdw = gpu.zeros::<f32>(d).unwrap();
    gpu.rmsnorm_backward_weight(&gdy, &gx, &grstd, &mut gdw, rows)
        .unwrap();
    assert_close(
        "rmsnorm backward weight",
        &gpu.download(&gdw).unwrap(),
        &dw,
        1e-5,
    );

    // Rotary embedding, forward and its transpose.
    let (seq, hd, width) = (48, 32, 4 * 32);
    let rope = ops::Rope::new(seq, hd, 10000.0);
    let (cos, sin) = rope.tables();
    let (gcos, gsin) = (gpu.upload(cos).unwrap(), gpu.upload(sin).unwrap());
    let r = rand_vec(2 * seq * width, 4, 1.0);
    for sign in [1.0f32, -1.0] {
        let mut want = r.clone();
        if sign > 0.0 {
            rope.forward_tokens(&mut want, seq, width);
        } else {
            rope.backward_tokens(&mut want, seq, width);
        }
        let mut g = gpu.upload(&r).unwrap();
        let mut gb = gpu.zeros::<u16>(r.len()).unwrap();
        gpu.rope(
            &mut g,
            &gcos,
            &gsin,
            2 * seq,
            seq,
            width,
            hd / 2,
            sign,
            Some(&mut gb),
        )
        .unwrap();
        let tag = format!("rope (sign {sign})");
        assert_close(&tag, &gpu.download(&g).unwrap(), &want, 1e-6);
        let rounded = bf16_to_f32(&gpu.download(&gb).unwrap());
        assert_close(&format!("{tag}, bf16 copy"), &rounded, &want, BF16_TOL);
    }

    // SwiGLU.
    let n = rows * 200;
    // The projections arrive as bf16: the CPU gets the same rounded values.
    let (g, u, dh) = (
        round_bf16(&rand_vec(n, 5, 3.0)),
        round_bf16(&rand_vec(n, 6, 1.0)),
        round_bf16(&rand_vec(n, 7, 1.0)),
    );
    let mut h = vec![0.0; n];
    ops::swiglu_forward(&mut h, &g, &u);
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    ops::swiglu_backward(&mut dg, &mut du, &dh, &g, &u);
    let (gg, gu, gdh) = (
        gpu.upload(&to_bf(&g)).unwrap(),
        gpu.upload(&to_bf(&u)).unwrap(),
        gpu.upload(&to_bf(&dh)).unwrap(),
    );
    let mut gh = gpu.zeros::<u16>(n).unwrap();
    gpu.swiglu_forward(&gg, &gu, &mut gh).unwrap();
    assert_close(
        "swiglu forward",
        &bf16_to_f32(&gpu.download(&gh).unwrap()),
        &h,
        BF16_TOL,
    );
    let (mut gdg, mut gdu) = (gpu.zeros::<u16>(n).unwrap(), gpu.zeros::<u16>(n).unwrap());
    gpu.swiglu_backward(&gdh, &gg, &gu, &mut gdg, &mut gdu)
        .unwrap();
    assert_close(
        "swiglu backward g",
        &bf16_to_f32(&gpu.download(&gdg).unwrap()),
        &dg,
        BF16_TOL,
    );
    assert_close(
        "swiglu backward u",
        &bf16_to_f32(&gpu.download(&gdu).unwrap()),
        &du,
        BF16_TOL,
    );

    // Softmax cross-entropy: loss and gradient.
    let (rows_l, vocab) = (64, 1000);
    let logits = rand_vec(rows_l * vocab, 8, 6.0);
    let targets: Vec<u32> = (0..rows_l as u32)
        .map(|i| (i * 37) % vocab as u32)
        .collect();
    let mut grad = logits.clone();
    let loss = ops::cross_entropy(&mut grad, &targets, vocab, 0.5);
    let (gl, gt) = (gpu.upload(&logits).unwrap(), gpu.upload(&targets).unwrap());
    let mut gloss = gpu.zeros::<f32>(rows_l).unwrap();
    let mut gdl = gpu.zeros::<u16>(rows_l * vocab).unwrap();
    gpu.cross_entropy(&gl, &gt, &mut gloss, &mut gdl, vocab, 0.5)
        .unwrap();
    let gpu_loss = gpu
        .download(&gloss)
        .unwrap()
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / rows_l as f64;
    eprintln!("cross entropy: cpu {loss:.6} gpu {gpu_loss:.6}");
    assert!((gpu_loss as f32 - loss).abs() < 1e-4 * loss.abs().max(1.0));
    assert_close(
        "cross entropy gradient",
        &bf16_to_f32(&gpu.download(&gdl).unwrap()),
        &grad,
        BF16_TOL,
    );

    // AdamW against the CPU optimizer, two steps with clipping and decay.
    let cfg = OptimConfig {
        lr: 1e-2,
        warmup: 0,
        steps: 10,
        min_lr_ratio: 0.1,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
    };
    let mut p = pipewright::model::Param::filled("w", &[4000], 0.0, true);
    p.data = rand_vec(4000, 9, 1.0);
    let mut opt = AdamW::new(&[&mut p]);
    let (mut gw2, mut gm, mut gv) = (
        gpu.upload(&p.data).unwrap(),
        gpu.zeros::<f32>(4000).unwrap(),
        gpu.zeros::<f32>(4000).unwrap(),
    );
    let mut gbf = gpu.zeros::<u16>(4000).unwrap();
    for t in 1..=2u64 {
        p.grad = rand_vec(4000, 10 + t, 1.0);
        opt.step(&mut [&mut p], &cfg, cfg.lr, 0.7);
        let gg = gpu.upload(&p.grad).unwrap();
        let h = AdamHyper {
            beta1: 0.9,
            beta2: 0.95,
            step_size: (cfg.lr / (1.0 - 0.9f64.powi(t as i32))) as f32,
            bc2_sqrt: (1.0 - 0.95f64.powi(t as i32)).sqrt() as f32,
            eps: 1e-8,
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            clip: 0.7,
        };
        gpu.adamw(&mut gw2, &gg, &mut gm, &mut gv, Some(&mut gbf), h)
            .unwrap();
    }
    assert_close("adamw weights", &gpu.download(&gw2).unwrap(), &p.data, 1e-6);
    assert_close(
        "adamw bf16 copy",
        &bf16_to_f32(&gpu.download(&gbf).unwrap()),
        &p.data,
        5e-3,
    );
}

#[test]
fn attention_and_matrix_products_match_the_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [
        (2, 100, 4, 2, 32),
        (1, 130, 4, 1, 64),
        (2, 33, 2, 2, 16),
        (1, 70, 2, 1, 128),
        (1, 1024, 8, 2, 64),
    ];
    for (batch, seq, heads, kv_heads, hd) in shapes {
        let s = AttnShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: hd,
        };
        let dims = AttnDims {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: hd,
        };
        let (nq, nk) = (batch * seq * heads * hd, batch * seq * kv_heads * hd);
        // The kernels take bf16 operands: the CPU gets the same rounded values.
        let q = round_bf16(&rand_vec(nq, 11, 1.0));
        let k = round_bf16(&rand_vec(nk, 12, 1.0));
        let v = round_bf16(&rand_vec(nk, 13, 1.0));
        let dout = round_bf16(&rand_vec(nq, 14, 1.0));
        let mut out = vec![0.0; nq];
        let mut p = vec![0.0; s.probs_len()];
        cpu_attn::forward(&mut out, &mut p, &q, &k, &v, s);
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        cpu_attn::backward(&mut dq, &mut dk, &mut dv, &dout, &out, &p, &q, &k, &v, s);

        let up_bf = |x: &[f32]| gpu.upload(&to_bf(x)).unwrap();
        let (gq, gk, gv, gdo_bf) = (up_bf(&q), up_bf(&k), up_bf(&v), up_bf(&dout));
        let gdo = gpu.upload(&dout).unwrap();
        let mut go = gpu.zeros::<f32>(nq).unwrap();
        let mut gob = gpu.zeros::<u16>(nq).unwrap();
        let mut lse = gpu.zeros::<f32>(batch * seq * heads).unwrap();
        gpu.attention_forward(&gq, &gk, &gv, &mut go, &mut gob, &mut lse, dims)
            .unwrap();
        let tag = format!("B{batch} T{seq} H{heads}/{kv_heads} hd{hd}");
        let o = gpu.download(&go).unwrap();
        assert_close(&format!("attention forward {tag}"), &o, &out, BF16_TOL);
        let mut delta = gpu.zeros::<f32>(batch * seq * heads).unwrap();
        let mut partial = gpu.zeros::<f32>(2 * nq).unwrap();
        let mut gdq = gpu.zeros::<f32>(nq).unwrap();
        let mut gdk = gpu.zeros::<f32>(nk).unwrap();
        let mut gdv = gpu.zeros::<f32>(nk).unwrap();
        gpu.attention_backward(
            &gq,
            &gk,
            &gv,
            &go,
            &lse,
            &gdo,
            &gdo_bf,
            &mut delta,
            &mut partial,
            &mut gdq,
            &mut gdk,
            &mut gdv,
            dims,
        )
        .unwrap();
        assert_close(
            &format!("attention dq {tag}"),
            &gpu.download(&gdq).unwrap(),
            &dq,
            2e-2,
        );
        assert_close(
            &format!("attention dk {tag}"),
            &gpu.download(&gdk).unwrap(),
            &dk,
            2e-2,
        );
        assert_close(
            &format!("attention dv {tag}"),
            &gpu.download(&gdv).unwrap(),
            &dv,
            2e-2,
        );
    }

    // Linear layer: forward, input and weight gradients against the CPU
    // product of the same bf16-rounded operands.
    use pipewright::kernels::{matmul, Trans};
    let (rows, input, out) = (72, 96, 40);
    let x = round_bf16(&rand_vec(rows * input, 21, 1.0));
    let w = round_bf16(&rand_vec(out * input, 22, 1.0));
    let dy = round_bf16(&rand_vec(rows * out, 23, 1.0));
    let (gx, gw, gdy) = (
        gpu.upload(&to_bf(&x)).unwrap(),
        gpu.upload(&to_bf(&w)).unwrap(),
        gpu.upload(&to_bf(&dy)).unwrap(),
    );
    let mut y = vec![0.0; rows * out];
    matmul(
        &mut y,
        &x,
        Trans::No,
        &w,
        Trans::Yes,
        rows,
        input,
        out,
        false,
    );
    let mut gy = gpu.zeros::<f32>(rows * out).unwrap();
    gpu.linear_forward(&gx, &gw, &mut gy, rows, input, out, 0.0)
        .unwrap();
    assert_close("linear forward", &gpu.download(&gy).unwrap(), &y, 1e-5);
    let mut dx = vec![0.0; rows * input];
    matmul(
        &mut dx,
        &dy,
        Trans::No,
        &w,
        Trans::No,
        rows,
        out,
        input,
        false,
    );
    let mut gdx = gpu.zeros::<f32>(rows * input).unwrap();
    gpu.linear_backward_input(&gdy, &gw, &mut gdx, rows, input, out, 0.0)
        .unwrap();
    assert_close(
        "linear backward input",
        &gpu.download(&gdx).unwrap(),
        &dx,
        1e-5,
    );
    let mut dw = vec![1.0; out * input];
    matmul(
        &mut dw,
        &dy,
        Trans::Yes,
        &x,
        Trans::No,
        out,
        rows,
        input,
        true,
    );
    let mut gdw = gpu.upload(&vec![1.0f32; out * input]).unwrap();
    gpu.linear_backward_weight(&gdy, &gx, &mut gdw, rows, input, out)
        .unwrap();
    assert_close(
        "linear backward weight (accumulating)",
        &gpu.download(&gdw).unwrap(),
        &dw,
        1e-5,
    );
}

fn small_config(tied: bool) -> ModelConfig {
    ModelConfig {
        vocab: 97,
        dim: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 224,
        seq_len: 40,
        tied,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.05,
    }
}

#[test]
fn whole_model_loss_and_every_gradient_match_the_cpu() {
    let Some(_) = gpu_or_skip() else { return };
    for tied in [false, true] {
        let cfg = small_config(tied);
        let batch = 3;
        let rows = batch * cfg.seq_len;
        let tokens: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 31 + 7) % cfg.vocab as u32)
            .collect();
        let targets: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 17 + 3) % cfg.vocab as u32)
            .collect();
        let mut stage = Stage::new(&cfg, 0, 1, 0..cfg.layers, 42);
        let out = stage
            .forward(0, StageInput::Tokens(&tokens), Some(&targets), batch, 0.5)
            .unwrap();
        let StageOutput::Loss(cpu_loss) = out else {
            panic!("last stage returns a loss")
        };
        stage.backward(0, None).unwrap();
        if tied {
            // One stage holds both copies; the trainer sums them.
            pipewright::model::stage::tie_gradients(std::slice::from_mut(&mut stage));
        }
        let gpu = Gpu::open(0).unwrap();
        let params = stage.params();
        let mut model = DeviceModel::new(gpu, &cfg, &params, None, 0, rows).unwrap();
        let gpu_loss = model
            .forward_backward(&tokens, &targets, batch, 0.5)
            .unwrap();
        eprintln!("tied={tied}: loss cpu {cpu_loss:.6} gpu {gpu_loss:.6}");
        assert!(
            (gpu_loss - cpu_loss).abs() < 2e-3 * cpu_loss,
            "loss {gpu_loss} vs {cpu_loss}"
        );
        let host = model.download().unwrap();
        for p in stage.params() {
            let g = &host[&p.name].grad;
            assert_close(&format!("tied={tied} grad {}", p.name), g, &p.grad, 3e-2);
        }
    }
}

/// The quickstart manifest, its corpus moved to `PIPEWRIGHT_QUICKSTART_CORPUS`
/// when set (a GPU machine without Debian's `fortunes` package).
fn quickstart() -> Option<pipewright_spec::TrainingRun> {
    // From the repository root (scripts/gpu-check.sh), else from the source tree.
    let here = std::path::PathBuf::from("examples/quickstart.yaml");
    let root = if here.exists() {
        here
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml")
    };
    let mut m = pipewright_spec::load_manifest(&root).expect("quickstart manifest");
    if let Ok(dir) = std::env::var("PIPEWRIGHT_QUICKSTART_CORPUS") {
        m.spec.data.sources = vec![dir];
    }
    let src = std::path::Path::new(&m.spec.data.sources[0]);
    if !src.exists() {
        eprintln!(
            "skipped: the quickstart corpus {} is missing",
            src.display()
        );
        return None;
    }
    Some(m)
}

#[test]
fn fifty_quickstart_steps_on_the_gpu_follow_the_cpu_loss_curve() {
    let Some(gpu) = gpu_or_skip() else { return };
    let Some(manifest) = quickstart() else { return };
    let mut cpu = pipewright::train::Trainer::new(manifest.clone()).unwrap();
    let mut dev = pipewright::train::Trainer::new(manifest).unwrap();
    dev.use_device(gpu).unwrap();
    let mut worst = 0.0f64;
    let mut lines = vec!["step cpu_loss gpu_loss rel_diff".to_string()];
    for _ in 0..50 {
        let a = cpu.train_step().unwrap();
        let b = dev.train_step().unwrap();
        let rel = ((b.loss - a.loss) / a.loss).abs() as f64;
        worst = worst.max(rel);
        lines.push(format!("{} {:.5} {:.5} {:.4}", a.step, a.loss, b.loss, rel));
    }
    let report = lines.join("\n");
    eprintln!("{report}\nworst relative difference {worst:.4}");
    if let Ok(dir) = std::env::var("PIPEWRIGHT_GPU_OUT") {
        std::fs::write(format!("{dir}/loss_curve.txt"), &report).unwrap();
    }
    assert!(
        worst <= 0.02,
        "the GPU loss curve leaves the CPU's by {worst:.4} (> 2%)"
    );
    // The host copy follows the device: evaluation runs on the synced stages.
    let e = dev.evaluate(4).unwrap();
    assert!(
        e.loss.is_finite() && e.loss < 5.0,
        "evaluation after GPU training: {}",
        e.loss
    );
}

#[test]
fn nccl_with_one_rank_averages_to_the_input() {
    let Some(gpu) = gpu_or_skip() else { return };
    use pipewright::sync::nccl::{nccl_present, NcclGroup};
    if !nccl_present() {
        assert!(
            std::env::var("PIPEWRIGHT_REQUIRE_GPU").as_deref() != Ok("1"),
            "libnccl does not load"
        );
        eprintln!("skipped: libnccl is not on the library path");
        return;
    }
    let id = NcclGroup::new_id().unwrap();
    let group = NcclGroup::join(&gpu, 0, 1, id).unwrap();
    assert_eq!(group.world(), 1);
    let v = rand_vec(1 << 20, 31, 1.0);
    let mut buf = gpu.upload(&v).unwrap();
    group.all_reduce_mean(&mut buf).unwrap();
    assert_eq!(
        gpu.download(&buf).unwrap(),
        v,
        "a mean over one rank is the input"
    );
}
