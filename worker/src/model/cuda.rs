//! The whole model on one CUDA device (cargo feature `cuda`).
//!
//! The same layers as the CPU model, composed in the same order
//! (embedding, pre-norm blocks, final norm, LM head, cross-entropy), with the
//! same parameter names and shapes; every numeric step is a
//! [`crate::kernels::cuda::Gpu`] operation, the device twin of the CPU
//! kernel the CPU layer calls. Mixed precision as usual for transformer
//! training: f32 master weights, gradients and Adam moments; bf16 copies of
//! the weight matrices and of every matrix-product operand; f32
//! accumulation; the residual stream in f32. Activations stay on the device
//! for the whole forward and backward.
//!
//! Built from the CPU model's parameters (so initialisation, checkpoints and
//! export are the CPU path's), and written back to them for evaluation and
//! checkpoints ([`DeviceModel::download`]).

use std::collections::HashMap;

use cudarc::driver::CudaSlice;

use super::embedding::EMBED_NAME;
use super::head::LM_HEAD_NAME;
use super::{ModelConfig, Param};
use crate::kernels::cuda::{AdamHyper, AttnDims, Bf16, Gpu, GpuError, F32};
use crate::kernels::ops::Rope;
use crate::optim::OptimConfig;

/// One parameter on the device: master weight, gradient, Adam moments and,
/// for matrices, the bf16 copy matrix products read.
struct DeviceParam {
    name: String,
    w: F32,
    g: F32,
    m: F32,
    v: F32,
    bf: Option<Bf16>,
    decay: bool,
}

/// Indices into [`DeviceModel::params`] of one block's tensors.
struct BlockParams {
    attn_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    mlp_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// What one block's forward keeps for its backward.
struct BlockActs {
    rstd1: F32,
    xn1: Bf16,
    q: Bf16,
    k: Bf16,
    v: Bf16,
    o: F32,
    o_bf: Bf16,
    lse: F32,
    h: F32,
    rstd2: F32,
    xn2: Bf16,
    g: Bf16,
    u: Bf16,
    hb: Bf16,
}

/// Scratch shared by every block.
struct Scratch {
    /// Forward: the projections in f32, before rotation and rounding.
    qf: F32,
    kf: F32,
    vf: F32,
    dres: F32,
    dres_bf: Bf16,
    dxn: F32,
    dff: Bf16,
    dg: Bf16,
    du: Bf16,
    dout: F32,
    dout_bf: Bf16,
    delta: F32,
    /// Each query head's share of dK and dV (grouped heads).
    partial: F32,
    dq: F32,
    dk: F32,
    dv: F32,
    dq_bf: Bf16,
    dk_bf: Bf16,
    dv_bf: Bf16,
}

/// The model's parameters, optimizer state and activations on one device.
pub struct DeviceModel {
    gpu: Gpu,
    cfg: ModelConfig,
    params: Vec<DeviceParam>,
    embed: usize,
    blocks: Vec<BlockParams>,
    final_norm: usize,
    head: usize,
    rope_cos: F32,
    rope_sin: F32,
    /// Rows (batch·seq) the activation buffers hold.
    capacity: usize,
    /// Residual stream at each block's input; `xs[layers]` feeds the head.
    xs: Vec<F32>,
    acts: Vec<BlockActs>,
    head_rstd: F32,
    head_xn: Bf16,
    logits: F32,
    dlogits: Bf16,
    loss: F32,
    tokens: CudaSlice<u32>,
    targets: CudaSlice<u32>,
    scratch: Scratch,
    norm_acc: CudaSlice<f64>,
    /// AdamW's step count.
    pub adam_t: u64,
}

impl std::fmt::Debug for DeviceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("gpu", &self.gpu)
            .field("params", &self.params.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Adam moments `(m, v)` of every parameter, in the parameters' order.
pub type Moments<'a> = (&'a [&'a [f32]], &'a [&'a [f32]]);

/// A parameter's host values with its Adam moments.
#[derive(Clone, Debug, PartialEq)]
pub struct HostParam {
    /// Weights.
    pub data: Vec<f32>,
    /// Accumulated gradient.
    pub grad: Vec<f32>,
    /// Adam first moment.
    pub m: Vec<f32>,
    /// Adam second moment.
    pub v: Vec<f32>,
}

fn err(msg: String) -> GpuError {
    GpuError::Unsupported(msg)
}

impl DeviceModel {
    /// Upload the whole model: `params` must hold every tensor of the model
    /// (all stages), `moments` their Adam moments in the same order (zeros
    /// when `None`), `adam_t` AdamW's step count. Activation buffers are
    /// sized for micro-batches of `rows = batch·seq` rows.
    pub fn new(
        gpu: Gpu,
        cfg: &ModelConfig,
        params: &[&Param],
        moments: Option<Moments<'_>>,
        adam_t: u64,
        rows: usize,
    ) -> Result<Self, GpuError> {
        let hd = cfg.head_dim();
        if !crate::kernels::cuda::ATTENTION_HEAD_DIMS.contains(&hd) {
            return Err(err(format!(
                "head width {hd} (dim / heads); the CUDA attention supports {:?}",
                crate::kernels::cuda::ATTENTION_HEAD_DIMS
            )));
        }
        let mut uploaded = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            if cfg.tied && p.name == LM_HEAD_NAME {
                continue; // the tied head is the embedding itself
            }
            if index.contains_key(&p.name) {
                return Err(err(format!("parameter {} given twice", p.name)));
            }
            let w = gpu.upload(&p.data)?;
            let (m, v) = match moments {
                Some((m, v)) => (gpu.upload(m[i])?, gpu.upload(v[i])?),
                None => (gpu.zeros(p.len())?, gpu.zeros(p.len())?),
            };
            let bf = if p.shape.len() == 2 {
                let mut b = gpu.zeros::<u16>(p.len())?;
                gpu.cast_bf16(&w, &mut b)?;
                Some(b)
            } else {
                None
            };
            index.insert(p.name.clone(), uploaded.len());
            uploaded.push(DeviceParam {
                name: p.name.clone(),
                g: gpu.zeros(p.len())?,
                w,
                m,
                v,
                bf,
                decay: p.decay,
            });
        }
        let find = |name: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| err(format!("the model has no parameter {name}")))
        };
        let embed = find(EMBED_NAME)?;
        let head = if cfg.tied { embed } else { find(LM_HEAD_NAME)? };
        let final_norm = find("model.norm.weight")?;
        let mut blocks = Vec::new();
        for l in 0..cfg.layers {
            let p = |s: &str| find(&format!("model.layers.{l}.{s}.weight"));
            blocks.push(BlockParams {
                attn_norm: p("input_layernorm")?,
                q: p("self_attn.q_proj")?,
                k: p("self_attn.k_proj")?,
                v: p("self_attn.v_proj")?,
                o: p("self_attn.o_proj")?,
                mlp_norm: p("post_attention_layernorm")?,
                gate: p("mlp.gate_proj")?,
                up: p("mlp.up_proj")?,
                down: p("mlp.down_proj")?,
            });
        }
        if uploaded.len() != 2 + 9 * cfg.layers + usize::from(!cfg.tied) {
            return Err(err(format!(
                "{} parameters given; a {}-layer model has {}",
                uploaded.len(),
                cfg.layers,
                2 + 9 * cfg.layers + usize::from(!cfg.tied)
            )));
        }
        let rope = Rope::new(cfg.seq_len, hd, cfg.rope_theta);
        let (cos, sin) = rope.tables();
        let (d, f, v) = (cfg.dim, cfg.ffn_dim, cfg.vocab);
        let (qw, kw) = (cfg.heads * hd, cfg.kv_heads * hd);
        let n = rows;
        let mut acts = Vec::new();
        let mut xs = vec![gpu.zeros(n * d)?];
        for _ in 0..cfg.layers {
            xs.push(gpu.zeros(n * d)?);
            acts.push(BlockActs {
                rstd1: gpu.zeros(n)?,
                xn1: gpu.zeros(n * d)?,
                q: gpu.zeros(n * qw)?,
                k: gpu.zeros(n * kw)?,
                v: gpu.zeros(n * kw)?,
                o: gpu.zeros(n * qw)?,
                o_bf: gpu.zeros(n * qw)?,
                lse: gpu.zeros(n * cfg.heads)?,
                h: gpu.zeros(n * d)?,
                rstd2: gpu.zeros(n)?,
                xn2: gpu.zeros(n * d)?,
                g: gpu.zeros(n * f)?,
                u: gpu.zeros(n * f)?,
                hb: gpu.zeros(n * f)?,
            });
        }
        let scratch = Scratch {
            qf: gpu.zeros(n * qw)?,
            kf: gpu.zeros(n * kw)?,
            vf: gpu.zeros(n * kw)?,
            dres: gpu.zeros(n * d)?,
            dres_bf: gpu.zeros(n * d)?,
            dxn: gpu.zeros(n * d)?,
            dff: gpu.zeros(n * f)?,
            dg: gpu.zeros(n * f)?,
            du: gpu.zeros(n * f)?,
            dout: gpu.zeros(n * qw)?,
            dout_bf: gpu.zeros(n * qw)?,
            delta: gpu.zeros(n * cfg.heads)?,
            partial: gpu.zeros(if cfg.heads == cfg.kv_heads {
                1
            } else {
                2 * n * qw
            })?,
            dq: gpu.zeros(n * qw)?,
            dk: gpu.zeros(n * kw)?,
            dv: gpu.zeros(n * kw)?,
            dq_bf: gpu.zeros(n * qw)?,
            dk_bf: gpu.zeros(n * kw)?,
            dv_bf: gpu.zeros(n * kw)?,
        };
        Ok(Self {
            rope_cos: gpu.upload(cos)?,
            rope_sin: gpu.upload(sin)?,
            head_rstd: gpu.zeros(n)?,
            head_xn: gpu.zeros(n * d)?,
            logits: gpu.zeros(n * v)?,
            dlogits: gpu.zeros(n * v)?,
            loss: gpu.zeros(n)?,
            tokens: gpu.zeros(n)?,
            targets: gpu.zeros(n)?,
            norm_acc: gpu.zeros(1)?,
            cfg: cfg.clone(),
            params: uploaded,
            embed,
            blocks,
            final_norm,
            head,
            capacity: rows,
            xs,
            acts,
            scratch,
            gpu,
            adam_t,
        })
    }

    fn attn_dims(&self, batch: usize) -> AttnDims {
        AttnDims {
            batch,
            seq: self.cfg.seq_len,
            heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim(),
        }
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Forward and backward of one micro-batch of `batch` sequences:
    /// gradients of `scale · mean loss` are added to the parameters'
    /// gradients. Returns the mean loss (nats per token).
    pub fn forward_backward(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        scale: f32,
    ) -> Result<f32, GpuError> {
        let seq = self.cfg.seq_len;
        let rows = batch * seq;
        if tokens.len() != rows || targets.len() != rows || rows > self.capacity {
            return Err(err(format!(
                "micro-batch of {} tokens / {} targets for {batch}×{seq} (capacity {} rows)",
                tokens.len(),
                targets.len(),
                self.capacity
            )));
        }
        if let Some(&t) = tokens
            .iter()
            .chain(targets)
            .find(|&&t| t as usize >= self.cfg.vocab)
        {
            return Err(err(format!(
                "token id {t} is outside the vocabulary of {}",
                self.cfg.vocab
            )));
        }
        // The kernels take the row count from these buffers' lengths: they
        // are resized only when the micro-batch's shape changes.
        if self.tokens.len() != rows {
            self.tokens = self.gpu.zeros(rows)?;
            self.targets = self.gpu.zeros(rows)?;
        }
        self.gpu.upload_into(tokens, &mut self.tokens)?;
        self.gpu.upload_into(targets, &mut self.targets)?;
        self.forward(batch, scale)?;
        self.backward(batch)?;
        self.mean_loss(rows)
    }

    fn mean_loss(&self, rows: usize) -> Result<f32, GpuError> {
        let losses = self.gpu.download(&self.loss)?;
        let sum: f64 = losses[..rows].iter().map(|&l| l as f64).sum();
        Ok((sum / rows as f64) as f32)
    }

    /// [`DeviceModel::forward_backward`] for a micro-batch already uploaded
    /// by an earlier call, waiting for the device after the forward and
    /// after the backward: returns (loss, forward seconds, backward seconds).
    /// For benchmarks; the wait costs a little overlap.
    pub fn timed_repeat(&mut self, batch: usize, scale: f32) -> Result<(f32, f64, f64), GpuError> {
        let rows = batch * self.cfg.seq_len;
        if rows != self.tokens.len() {
            return Err(err(
                "timed_repeat needs the same shape as the last micro-batch".into(),
            ));
        }
        self.gpu.synchronize()?;
        let t0 = std::time::Instant::now();
        self.forward(batch, scale)?;
        self.gpu.synchronize()?;
        let t1 = std::time::Instant::now();
        self.backward(batch)?;
        self.gpu.synchronize()?;
        let t2 = std::time::Instant::now();
        Ok((
            self.mean_loss(rows)?,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
        ))
    }

    fn forward(&mut self, batch: usize, scale: f32) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let (seq, d, f, hd) = (cfg.seq_len, cfg.dim, cfg.ffn_dim, cfg.head_dim());
        let (qw, kw) = (cfg.heads * hd, cfg.kv_heads * hd);
        let n = batch * seq;
        let eps = cfg.norm_eps as f32;
        let dims = self.attn_dims(batch);
        let gpu = &self.gpu;
        let p = &self.params;
        let bf = |i: usize| p[i].bf.as_ref().expect("matrices have a bf16 copy");
        gpu.embed_forward(&self.tokens, &p[self.embed].w, &mut self.xs[0], d)?;
        for (l, (b, a)) in self.blocks.iter().zip(self.acts.iter_mut()).enumerate() {
            let (lo, hi) = self.xs.split_at_mut(l + 1);
            let (x, y) = (&lo[l], &mut hi[0]);
            gpu.rmsnorm_forward(x, &p[b.attn_norm].w, &mut a.xn1, &mut a.rstd1, n, eps)?;
            let s = &mut self.scratch;
            gpu.linear_forward(&a.xn1, bf(b.q), &mut s.qf, n, d, qw, 0.0)?;
            gpu.linear_forward(&a.xn1, bf(b.k), &mut s.kf, n, d, kw, 0.0)?;
            gpu.linear_forward(&a.xn1, bf(b.v), &mut s.vf, n, d, kw, 0.0)?;
            let (cos, sin) = (&self.rope_cos, &self.rope_sin);
            gpu.rope(&mut s.qf, cos, sin, n, seq, qw, hd / 2, 1.0, Some(&mut a.q))?;
            gpu.rope(&mut s.kf, cos, sin, n, seq, kw, hd / 2, 1.0, Some(&mut a.k))?;
            gpu.cast_bf16(&s.vf, &mut a.v)?;
            gpu.attention_forward(&a.q, &a.k, &a.v, &mut a.o, &mut a.o_bf, &mut a.lse, dims)?;
            gpu.copy(x, &mut a.h)?;
            gpu.linear_forward(&a.o_bf, bf(b.o), &mut a.h, n, qw, d, 1.0)?;
            gpu.rmsnorm_forward(&a.h, &p[b.mlp_norm].w, &mut a.xn2, &mut a.rstd2, n, eps)?;
            gpu.linear_forward(&a.xn2, bf(b.gate), &mut a.g, n, d, f, 0.0)?;
            gpu.linear_forward(&a.xn2, bf(b.up), &mut a.u, n, d, f, 0.0)?;
            gpu.swiglu_forward(&a.g, &a.u, &mut a.hb)?;
            gpu.copy(&a.h, y)?;
            gpu.linear_forward(&a.hb, bf(b.down), y, n, f, d, 1.0)?;
        }
        let x = &self.xs[cfg.layers];
        gpu.rmsnorm_forward(
            x,
            &p[self.final_norm].w,
            &mut self.head_xn,
            &mut self.head_rstd,
            n,
            eps,
        )?;
        gpu.linear_forward(
            &self.head_xn,
            bf(self.head),
            &mut self.logits,
            n,
            d,
            cfg.vocab,
            0.0,
        )?;
        gpu.cross_entropy(
            &self.logits,
            &self.targets,
            &mut self.loss,
            &mut self.dlogits,
            cfg.vocab,
            scale,
        )
    }

    fn backward(&mut self, batch: usize) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let (seq, d, f, hd, v) = (cfg.seq_len, cfg.dim, cfg.ffn_dim, cfg.head_dim(), cfg.vocab);
        let (qw, kw) = (cfg.heads * hd, cfg.kv_heads * hd);
        let n = batch * seq;
        let dims = self.attn_dims(batch);
        let gpu = &self.gpu;
        let s = &mut self.scratch;
        let p = &mut self.params;
        // Head: the loss gradient was written by `cross_entropy`.
        {
            let x = &self.xs[cfg.layers];
            let head = &mut p[self.head];
            gpu.linear_backward_weight(&self.dlogits, &self.head_xn, &mut head.g, n, d, v)?;
            let hb = head.bf.as_ref().expect("matrix");
            gpu.linear_backward_input(&self.dlogits, hb, &mut s.dxn, n, d, v, 0.0)?;
            gpu.zero(&mut s.dres)?;
            let norm = &mut p[self.final_norm];
            gpu.rmsnorm_backward_input(&s.dxn, x, &norm.w, &self.head_rstd, &mut s.dres, n)?;
            gpu.rmsnorm_backward_weight(&s.dxn, x, &self.head_rstd, &mut norm.g, n)?;
        }
        for (l, (b, a)) in self.blocks.iter().zip(self.acts.iter()).enumerate().rev() {
            let x = &self.xs[l];
            // MLP: y = h + down(silu(gate(hn))·up(hn)), hn = norm(h).
            gpu.cast_bf16(&s.dres, &mut s.dres_bf)?;
            gpu.linear_backward_weight(&s.dres_bf, &a.hb, &mut p[b.down].g, n, f, d)?;
            gpu.linear_backward_input(&s.dres_bf, bf_of(&p[b.down]), &mut s.dff, n, f, d, 0.0)?;
            gpu.swiglu_backward(&s.dff, &a.g, &a.u, &mut s.dg, &mut s.du)?;
            gpu.linear_backward_weight(&s.dg, &a.xn2, &mut p[b.gate].g, n, d, f)?;
            gpu.linear_backward_weight(&s.du, &a.xn2, &mut p[b.up].g, n, d, f)?;
            gpu.linear_backward_input(&s.dg, bf_of(&p[b.gate]), &mut s.dxn, n, d, f, 0.0)?;
            gpu.linear_backward_input(&s.du, bf_of(&p[b.up]), &mut s.dxn, n, d, f, 1.0)?;
            gpu.rmsnorm_backward_input(&s.dxn, &a.h, &p[b.mlp_norm].w, &a.rstd2, &mut s.dres, n)?;
            gpu.rmsnorm_backward_weight(&s.dxn, &a.h, &a.rstd2, &mut p[b.mlp_norm].g, n)?;
            // Attention: h = x + o_proj(attn(rope(q), rope(k), v)).
            gpu.cast_bf16(&s.dres, &mut s.dres_bf)?;
            gpu.linear_backward_weight(&s.dres_bf, &a.o_bf, &mut p[b.o].g, n, qw, d)?;
            gpu.linear_backward_input(&s.dres_bf, bf_of(&p[b.o]), &mut s.dout, n, qw, d, 0.0)?;
            gpu.cast_bf16(&s.dout, &mut s.dout_bf)?;
            gpu.attention_backward(
                &a.q,
                &a.k,
                &a.v,
                &a.o,
                &a.lse,
                &s.dout,
                &s.dout_bf,
                &mut s.delta,
                &mut s.partial,
                &mut s.dq,
                &mut s.dk,
                &mut s.dv,
                dims,
            )?;
            let (cos, sin) = (&self.rope_cos, &self.rope_sin);
            gpu.rope(
                &mut s.dq,
                cos,
                sin,
                n,
                seq,
                qw,
                hd / 2,
                -1.0,
                Some(&mut s.dq_bf),
            )?;
            gpu.rope(
                &mut s.dk,
                cos,
                sin,
                n,
                seq,
                kw,
                hd / 2,
                -1.0,
                Some(&mut s.dk_bf),
            )?;
            gpu.cast_bf16(&s.dv, &mut s.dv_bf)?;
            gpu.linear_backward_weight(&s.dq_bf, &a.xn1, &mut p[b.q].g, n, d, qw)?;
            gpu.linear_backward_weight(&s.dk_bf, &a.xn1, &mut p[b.k].g, n, d, kw)?;
            gpu.linear_backward_weight(&s.dv_bf, &a.xn1, &mut p[b.v].g, n, d, kw)?;
            gpu.linear_backward_input(&s.dq_bf, bf_of(&p[b.q]), &mut s.dxn, n, d, qw, 0.0)?;
            gpu.linear_backward_input(&s.dk_bf, bf_of(&p[b.k]), &mut s.dxn, n, d, kw, 1.0)?;
            gpu.linear_backward_input(&s.dv_bf, bf_of(&p[b.v]), &mut s.dxn, n, d, kw, 1.0)?;
            gpu.rmsnorm_backward_input(&s.dxn, x, &p[b.attn_norm].w, &a.rstd1, &mut s.dres, n)?;
            gpu.rmsnorm_backward_weight(&s.dxn, x, &a.rstd1, &mut p[b.attn_norm].g, n)?;
        }
        gpu.embed_backward(&self.tokens, &s.dres, &mut p[self.embed].g, d)?;
        Ok(())
    }

    /// The gradient's global L2 norm (a tied head counted once, as on the CPU).
    pub fn grad_norm(&mut self) -> Result<f64, GpuError> {
        self.gpu.zero(&mut self.norm_acc)?;
        for p in &self.params {
            self.gpu.sum_squares(&p.g, &mut self.norm_acc)?;
        }
        Ok(self.gpu.download(&self.norm_acc)?[0].sqrt())
    }

    /// One AdamW step at learning rate `lr` with the clip factor `clip`
    /// (the math of `optim::AdamW::step`), then zero the gradients.
    pub fn step(&mut self, cfg: &OptimConfig, lr: f64, clip: f32) -> Result<(), GpuError> {
        self.adam_t += 1;
        let t = self.adam_t as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2 = 1.0 - cfg.beta2.powi(t);
        for p in &mut self.params {
            let h = AdamHyper {
                beta1: cfg.beta1 as f32,
                beta2: cfg.beta2 as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                eps: cfg.eps as f32,
                decay: if p.decay {
                    (1.0 - lr * cfg.weight_decay) as f32
                } else {
                    1.0
                },
                clip,
            };
            self.gpu
                .adamw(&mut p.w, &p.g, &mut p.m, &mut p.v, p.bf.as_mut(), h)?;
            self.gpu.zero(&mut p.g)?;
        }
        Ok(())
    }

    /// Every parameter's values, gradient and moments, by name; a tied
    /// head appears under both names.
    pub fn download(&self) -> Result<HashMap<String, HostParam>, GpuError> {
        let mut out = HashMap::new();
        for p in &self.params {
            let host = HostParam {
                data: self.gpu.download(&p.w)?,
                grad: self.gpu.download(&p.g)?,
                m: self.gpu.download(&p.m)?,
                v: self.gpu.download(&p.v)?,
            };
            if self.cfg.tied && p.name == EMBED_NAME {
                out.insert(LM_HEAD_NAME.to_string(), host.clone());
            }
            out.insert(p.name.clone(), host);
        }
        Ok(out)
    }

    /// Bytes of device memory this model holds (parameters, optimizer
    /// state, activations).
    pub fn device_bytes(&self) -> usize {
        let p: usize = self
            .params
            .iter()
            .map(|p| 16 * p.w.len() + p.bf.as_ref().map_or(0, |b| 2 * b.len()))
            .sum();
        let a: usize = self
            .acts
            .iter()
            .map(|a| {
                4 * (a.rstd1.len() + a.o.len() + a.lse.len())
                    + 4 * (a.h.len() + a.rstd2.len())
                    + 2 * (a.g.len() + a.u.len())
                    + 2 * (a.xn1.len() + a.q.len() + a.k.len() + a.v.len())
                    + 2 * (a.o_bf.len() + a.xn2.len() + a.hb.len())
            })
            .sum();
        p + a + self.xs.iter().map(|x| 4 * x.len()).sum::<usize>()
    }
}

fn bf_of(p: &DeviceParam) -> &Bf16 {
    p.bf.as_ref().expect("matrices have a bf16 copy")
}
