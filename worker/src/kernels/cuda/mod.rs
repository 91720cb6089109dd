//! The CUDA side of the device boundary (cargo feature `cuda`).
//!
//! Kernels are CUDA C (`kernels.cu`) compiled at run time with NVRTC for the
//! device's own architecture, so building needs no CUDA toolkit; matrix
//! products go through cuBLAS with bf16 operands and f32 accumulation. Every
//! CUDA library is loaded when first needed (`cudarc`'s dynamic loading):
//! [`Gpu::open`] checks that each is present before touching it and returns
//! [`GpuError`] instead of panicking, so a machine without a GPU falls back
//! to the CPU kernels.
//!
//! The operations mirror the CPU kernels one for one (same shapes, same
//! layouts, same math); `tests/cuda_parity.rs` checks each against its CPU
//! twin. All work is queued on one stream, in order.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Rows (queries or keys) of one attention tile.
const ATTN_TILE: usize = 64;

/// Dynamic shared memory of the attention kernels for head width `hd`: the
/// largest need, the dQ kernel's, is six bf16 tiles of `[64][hd + 8]` (its
/// queries, their gradients, two buffers of keys and values); the dK/dV
/// kernel's four tiles and 256 row values fit in it.
fn attention_smem(hd: usize) -> u32 {
    (6 * ATTN_TILE * (hd + 8) * 2) as u32
}

/// Head widths the attention kernels are instantiated for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Names of every kernel in [`SOURCE`].
pub fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "cast_bf16",
        "sum_squares",
        "embed_forward",
        "embed_backward",
        "rmsnorm_forward",
        "rmsnorm_backward_input",
        "rmsnorm_backward_weight",
        "rope",
        "swiglu_forward",
        "swiglu_backward",
        "cross_entropy",
        "attention_delta",
        "attention_group_sum",
        "adamw",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for hd in ATTENTION_HEAD_DIMS {
        for k in [
            "attention_forward",
            "attention_backward_q",
            "attention_backward_kv",
        ] {
            names.push(format!("{k}_{hd}"));
        }
    }
    names
}

/// Why the CUDA backend is not available, or failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libcuda` (the driver) cannot be loaded: no NVIDIA driver here.
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    /// A CUDA library other than the driver cannot be loaded.
    #[error("the CUDA library {0} could not be loaded (set LD_LIBRARY_PATH to the directory that holds it)")]
    MissingLibrary(&'static str),
    /// The driver loaded but sees no device.
    #[error("the CUDA driver sees no device")]
    NoDevice,
    /// The kernels did not compile.
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile {
        /// Target architecture.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0:?}")]
    Blas(cudarc::cublas::result::CublasError),
    /// A shape the kernels do not support.
    #[error("unsupported on the CUDA device: {0}")]
    Unsupported(String),
}

impl From<cudarc::cublas::result::CublasError> for GpuError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        GpuError::Blas(e)
    }
}

/// Whether the driver library loads (no context is created).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library loads.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above, for NVRTC.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile every kernel to PTX for `arch` (for example `sm_90`). Needs only
/// the NVRTC library, no GPU.
pub fn compile(arch: &str) -> Result<Ptx, GpuError> {
    compile_source(SOURCE, arch)
}

/// Compile CUDA C `src` to PTX for `arch`; a compile error carries NVRTC's log.
pub fn compile_source(src: &str, arch: &str) -> Result<Ptx, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::MissingLibrary("libnvrtc"));
    }
    let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let opts = CompileOptions {
        arch: Some(arch_static),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| GpuError::Compile {
        arch: arch.to_string(),
        log: format!("{e:?}"),
    })
}

/// Device memory of `f32`.
pub type F32 = CudaSlice<f32>;
/// Device memory of bf16 values (raw 16-bit words).
pub type Bf16 = CudaSlice<u16>;

/// Shape of one attention call (token-major projections, as on the CPU).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    /// Sequences in the micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// One CUDA device: context, stream, cuBLAS handle and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
    name: String,
    capability: (i32, i32),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("capability", &self.capability)
            .finish()
    }
}

const THREADS: u32 = 256;

fn grid_for(n: usize) -> u32 {
    (n.div_ceil(THREADS as usize)).clamp(1, 65_535 * 8) as u32
}

impl Gpu {
    /// Open device `ordinal`: checks that the driver, NVRTC and cuBLAS load,
    /// creates a context and compiles the kernels for the device.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(GpuError::MissingLibrary("libnvrtc"));
        }
        // SAFETY: only tries to dlopen cuBLAS by its known names.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(GpuError::MissingLibrary("libcublas"));
        }
        if CudaContext::device_count()? <= ordinal as i32 {
            return Err(GpuError::NoDevice);
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, in order: the per-buffer event tracking is not needed.
        // SAFETY: every buffer is used only on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let capability = ctx.compute_capability()?;
        let name = ctx.name()?;
        let arch = format!("sm_{}{}", capability.0, capability.1);
        let ptx = compile(&arch)?;
        let module = ctx.load_module(ptx)?;
        let mut funcs = HashMap::new();
        for n in kernel_names() {
            let f = module.load_function(&n)?;
            if let Some(hd) = n.rsplit('_').next().and_then(|h| h.parse::<usize>().ok()) {
                // Attention tiles may need more than the default 48 KiB.
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    attention_smem(hd) as i32,
                )?;
            }
            funcs.insert(n, f);
        }
        let blas = CudaBlas::new(stream.clone())?;
        Ok(Self {
            ctx,
            stream,
            blas,
            _module: module,
            funcs,
            name,
            capability,
        })
    }

    /// The device's name (for example "NVIDIA H200").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// The stream all work goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// A zeroed buffer of `n` values.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    /// Copy host values to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copy host values into an existing device buffer.
    pub fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        Ok(self.stream.memcpy_htod(host, dst)?)
    }

    /// Copy a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
    ) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(src)?)
    }

    /// `dst ← src` on the device.
    pub fn copy(&self, src: &F32, dst: &mut F32) -> Result<(), GpuError> {
        Ok(self.stream.memcpy_dtod(src, dst)?)
    }

    /// Zero a buffer.
    pub fn zero<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        buf: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        Ok(self.stream.memset_zeros(buf)?)
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // Event tracking is off, so the guard has nothing to record.
        let (p, _guard) = s.device_ptr(&self.stream);
        p
    }

    fn func(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.funcs
            .get(name)
            .ok_or_else(|| GpuError::Unsupported(format!("kernel {name}")))
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[&dyn Arg],
    ) -> Result<(), GpuError> {
        self.launch_smem(name, grid, block, 0, args)
    }

    fn launch_smem(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[&dyn Arg],
    ) -> Result<(), GpuError> {
        let f = self.func(name)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: each kernel's argument list is the one its wrapper below
        // passes, and the buffers' lengths are checked by the wrappers.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    // ------------------------------------------------------------ casts

    /// `y ← bf16(x)`.
    pub fn cast_bf16(&self, x: &F32, y: &mut Bf16) -> Result<(), GpuError> {
        let n = x.len().min(y.len());
        self.launch(
            "cast_bf16",
            (grid_for(n), 1, 1),
            THREADS,
            &[&self.ptr(x), &self.ptr(y), &(n as i64)],
        )
    }

    /// `acc += Σ x²` (f64 accumulator of one element).
    pub fn sum_squares(&self, x: &F32, acc: &mut CudaSlice<f64>) -> Result<(), GpuError> {
        let n = x.len();
        self.launch(
            "sum_squares",
            (grid_for(n).min(1024), 1, 1),
            THREADS,
            &[&self.ptr(x), &(n as i64), &self.ptr(acc)],
        )
    }

    // ------------------------------------------------------------ layers

    /// `x[N, D] = table[tokens]` (tokens checked by the caller).
    pub fn embed_forward(
        &self,
        tokens: &CudaSlice<u32>,
        table: &F32,
        x: &mut F32,
        d: usize,
    ) -> Result<(), GpuError> {
        let rows = tokens.len();
        check(x.len() >= rows * d, "embedding output")?;
        self.launch(
            "embed_forward",
            (rows as u32, 1, 1),
            THREADS,
            &[
                &self.ptr(tokens),
                &self.ptr(table),
                &self.ptr(x),
                &(d as i32),
            ],
        )
    }

    /// `dtable[tokens[r]] += dx[r]`.
    pub fn embed_backward(
        &self,
        tokens: &CudaSlice<u32>,
        dx: &F32,
        dtable: &mut F32,
        d: usize,
    ) -> Result<(), GpuError> {
        let rows = tokens.len();
        self.launch(
            "embed_backward",
            (rows as u32, 1, 1),
            THREADS,
            &[
                &self.ptr(tokens),
                &self.ptr(dx),
                &self.ptr(dtable),
                &(d as i32),
            ],
        )
    }

    /// RMSNorm forward over `rows` rows of width `w.len()`: `y` (bf16) and `rstd`.
    pub fn rmsnorm_forward(
        &self,
        x: &F32,
        w: &F32,
        y: &mut Bf16,
        rstd: &mut F32,
        rows: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let d = w.len();
        check(
            x.len() >= rows * d && y.len() >= rows * d && rstd.len() >= rows,
            "rmsnorm forward",
        )?;
        self.launch(
            "rmsnorm_forward",
            (rows as u32, 1, 1),
            THREADS,
            &[
                &self.ptr(x),
                &self.ptr(w),
                &self.ptr(y),
                &self.ptr(rstd),
                &(d as i32),
                &eps,
            ],
        )
    }

    /// RMSNorm input gradient, added into `dx`.
    pub fn rmsnorm_backward_input(
        &self,
        dy: &F32,
        x: &F32,
        w: &F32,
        rstd: &F32,
        dx: &mut F32,
        rows: usize,
    ) -> Result<(), GpuError> {
        let d = w.len();
        check(
            dy.len() >= rows * d && dx.len() >= rows * d,
            "rmsnorm backward",
        )?;
        self.launch(
            "rmsnorm_backward_input",
            (rows as u32, 1, 1),
            THREADS,
            &[
                &self.ptr(dy),
                &self.ptr(x),
                &self.ptr(w),
                &self.ptr(rstd),
                &self.ptr(dx),
                &(d as i32),
            ],
        )
    }

    /// RMSNorm gain gradient, added into `dw`.
    pub fn rmsnorm_backward_weight(
        &self,
        dy: &F32,
        x: &F32,
        rstd: &F32,
        dw: &mut F32,
        rows: usize,
    ) -> Result<(), GpuError> {
        let d = dw.len();
        let chunks = rows.div_ceil(64).clamp(1, 256) as u32;
        self.launch(
            "rmsnorm_backward_weight",
            (d.div_ceil(THREADS as usize) as u32, chunks, 1),
            THREADS,
            &[
                &self.ptr(dy),
                &self.ptr(x),
                &self.ptr(rstd),
                &self.ptr(dw),
                &(d as i32),
                &(rows as i32),
            ],
        )
    }

    /// Rotate `x[rows, width]` in place by the tables `(cos, sin)`
    /// (`[seq, half]`); `sign = -1` is the backward. `out_bf`, when given,
    /// also receives the rotated values as bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut F32,
        cos: &F32,
        sin: &F32,
        rows: usize,
        seq: usize,
        width: usize,
        half: usize,
        sign: f32,
        out_bf: Option<&mut Bf16>,
    ) -> Result<(), GpuError> {
        check(half > 0 && width.is_multiple_of(2 * half), "rope width")?;
        if let Some(o) = &out_bf {
            check(o.len() >= rows * width, "rope bf16 output")?;
        }
        let out = out_bf.map(|o| self.ptr(o)).unwrap_or(0);
        let pairs = rows * width / 2;
        self.launch(
            "rope",
            (grid_for(pairs), 1, 1),
            THREADS,
            &[
                &self.ptr(x),
                &self.ptr(cos),
                &self.ptr(sin),
                &(rows as i64),
                &(seq as i32),
                &(width as i32),
                &(half as i32),
                &sign,
                &out,
            ],
        )
    }

    /// `h = silu(g)·u`, all bf16 (the gate and up projections write bf16).
    pub fn swiglu_forward(&self, g: &Bf16, u: &Bf16, h: &mut Bf16) -> Result<(), GpuError> {
        let n = g.len();
        self.launch(
            "swiglu_forward",
            (grid_for(n), 1, 1),
            THREADS,
            &[&self.ptr(g), &self.ptr(u), &self.ptr(h), &(n as i64)],
        )
    }

    /// SwiGLU backward: `dg`, `du` from `dh`, all bf16.
    pub fn swiglu_backward(
        &self,
        dh: &Bf16,
        g: &Bf16,
        u: &Bf16,
        dg: &mut Bf16,
        du: &mut Bf16,
    ) -> Result<(), GpuError> {
        let n = g.len();
        self.launch(
            "swiglu_backward",
            (grid_for(n), 1, 1),
            THREADS,
            &[
                &self.ptr(dh),
                &self.ptr(g),
                &self.ptr(u),
                &self.ptr(dg),
                &self.ptr(du),
                &(n as i64),
            ],
        )
    }

    /// Softmax cross-entropy of `logits[rows, vocab]`: per-row loss (nats)
    /// and the bf16 gradient of `scale · mean loss`.
    pub fn cross_entropy(
        &self,
        logits: &F32,
        targets: &CudaSlice<u32>,
        loss: &mut F32,
        dlogits: &mut Bf16,
        vocab: usize,
        scale: f32,
    ) -> Result<(), GpuError> {
        let rows = targets.len();
        check(
            logits.len() >= rows * vocab && loss.len() >= rows,
            "cross entropy",
        )?;
        let grad_scale = scale / rows as f32;
        self.launch(
            "cross_entropy",
            (rows as u32, 1, 1),
            THREADS,
            &[
                &self.ptr(logits),
                &self.ptr(targets),
                &self.ptr(loss),
                &self.ptr(dlogits),
                &(vocab as i32),
                &grad_scale,
            ],
        )
    }

    fn attention_check(&self, s: AttnDims) -> Result<(), GpuError> {
        if !ATTENTION_HEAD_DIMS.contains(&s.head_dim) {
            return Err(GpuError::Unsupported(format!(
                "attention head width {} (supported: {:?})",
                s.head_dim, ATTENTION_HEAD_DIMS
            )));
        }
        check(
            s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
            "attention heads",
        )
    }

    /// Causal attention forward on tensor cores: `o` (f32 and bf16) and
    /// the per-row log-sum-exp `lse[B·T, H]`, from bf16 `q`, `k`, `v`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        q: &Bf16,
        k: &Bf16,
        v: &Bf16,
        o: &mut F32,
        o_bf: &mut Bf16,
        lse: &mut F32,
        s: AttnDims,
    ) -> Result<(), GpuError> {
        self.attention_check(s)?;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        self.launch_smem(
            &format!("attention_forward_{}", s.head_dim),
            (
                s.seq.div_ceil(ATTN_TILE) as u32,
                s.heads as u32,
                s.batch as u32,
            ),
            128,
            attention_smem(s.head_dim),
            &[
                &self.ptr(q),
                &self.ptr(k),
                &self.ptr(v),
                &self.ptr(o),
                &self.ptr(o_bf),
                &self.ptr(lse),
                &(s.seq as i32),
                &(s.heads as i32),
                &(s.kv_heads as i32),
                &scale,
            ],
        )
    }

    /// Causal attention backward: `dq`, `dk`, `dv` (f32, overwritten) from
    /// the forward's bf16 inputs, its f32 output and `lse`, and the output
    /// gradient (f32 for the row sums δ, bf16 for the products). `delta`
    /// (`[B·T, H]`) and, with grouped heads, `partial` (twice the length of
    /// `dq`: each query head's share of dK and dV) are scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: &Bf16,
        k: &Bf16,
        v: &Bf16,
        o: &F32,
        lse: &F32,
        dout: &F32,
        dout_bf: &Bf16,
        delta: &mut F32,
        partial: &mut F32,
        dq: &mut F32,
        dk: &mut F32,
        dv: &mut F32,
        s: AttnDims,
    ) -> Result<(), GpuError> {
        self.attention_check(s)?;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let rows = s.batch * s.seq;
        let rows_heads = rows * s.heads;
        let nq = rows_heads * s.head_dim;
        let grouped = s.heads != s.kv_heads;
        check(
            !grouped || partial.len() >= 2 * nq,
            "attention backward scratch",
        )?;
        self.launch(
            "attention_delta",
            (grid_for(rows_heads), 1, 1),
            THREADS,
            &[
                &self.ptr(dout),
                &self.ptr(o),
                &self.ptr(delta),
                &(rows_heads as i64),
                &(s.head_dim as i32),
            ],
        )?;
        let dims = [
            &(s.seq as i32) as &dyn Arg,
            &(s.heads as i32),
            &(s.kv_heads as i32),
            &scale,
        ];
        let (qp, kp, vp, dop, lp, dp) = (
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(dout_bf),
            self.ptr(lse),
            self.ptr(delta),
        );
        let smem = attention_smem(s.head_dim);
        let tiles = s.seq.div_ceil(ATTN_TILE) as u32;
        let dqp = self.ptr(dq);
        let mut args: Vec<&dyn Arg> = vec![&qp, &kp, &vp, &dop, &lp, &dp, &dqp];
        args.extend(dims);
        self.launch_smem(
            &format!("attention_backward_q_{}", s.head_dim),
            (tiles, s.heads as u32, s.batch as u32),
            128,
            smem,
            &args,
        )?;
        // Every query head computes its share of dK and dV; with grouped
        // heads the shares are summed afterwards.
        let (dkp, dvp) = if grouped {
            let p = self.ptr(partial);
            (p, p + 4 * nq as u64)
        } else {
            (self.ptr(dk), self.ptr(dv))
        };
        let mut args: Vec<&dyn Arg> = vec![&qp, &kp, &vp, &dop, &lp, &dp, &dkp, &dvp];
        args.extend(dims);
        self.launch_smem(
            &format!("attention_backward_kv_{}", s.head_dim),
            (tiles, s.heads as u32, s.batch as u32),
            128,
            smem,
            &args,
        )?;
        if grouped {
            let total = rows * s.kv_heads * s.head_dim;
            self.launch(
                "attention_group_sum",
                (grid_for(total), 1, 1),
                THREADS,
                &[
                    &dkp,
                    &dvp,
                    &self.ptr(dk),
                    &self.ptr(dv),
                    &(rows as i64),
                    &(s.heads as i32),
                    &(s.kv_heads as i32),
                    &(s.head_dim as i32),
                ],
            )?;
        }
        Ok(())
    }

    /// Fused AdamW on one tensor (see `optim::AdamW::step` for the math);
    /// refreshes the bf16 copy when one is given.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        w: &mut F32,
        g: &F32,
        m: &mut F32,
        v: &mut F32,
        w_bf: Option<&mut Bf16>,
        h: AdamHyper,
    ) -> Result<(), GpuError> {
        let n = w.len();
        let wb = w_bf.map(|b| self.ptr(b)).unwrap_or(0);
        self.launch(
            "adamw",
            (grid_for(n), 1, 1),
            THREADS,
            &[
                &self.ptr(w),
                &self.ptr(g),
                &self.ptr(m),
                &self.ptr(v),
                &wb,
                &(n as i64),
                &h.beta1,
                &h.beta2,
                &h.step_size,
                &h.bc2_sqrt,
                &h.eps,
                &h.decay,
                &h.clip,
            ],
        )
    }

    // ------------------------------------------------------------ GEMM

    /// Row-major `C[m, n] = op(A)·op(B) + beta·C` with bf16 `A`, `B`, f32 `C`,
    /// f32 accumulation. `lda`, `ldb`, `ldc` are the stored matrices' row
    /// lengths; `ta`/`tb` mean the stored matrix is the transpose.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<C: GemmOut>(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &Bf16,
        lda: usize,
        b: &Bf16,
        ldb: usize,
        c: &mut CudaSlice<C>,
        ldc: usize,
        beta: f32,
    ) -> Result<(), GpuError> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let alpha = 1.0f32;
        // Column-major cuBLAS sees every row-major matrix transposed, so
        // Cᵀ = op(B)ᵀ·op(A)ᵀ: B goes first.
        // SAFETY: pointers are live device buffers of this context; sizes
        // are the callers' shapes.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                self.ptr(b) as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                ldb as i32,
                self.ptr(a) as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                lda as i32,
                &beta as *const f32 as *const _,
                self.ptr(c) as *mut _,
                C::DATA_TYPE,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// Linear layer forward `y[rows, out] = x[rows, in]·Wᵀ (+ beta·y)`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward<C: GemmOut>(
        &self,
        x: &Bf16,
        w: &Bf16,
        y: &mut CudaSlice<C>,
        rows: usize,
        input: usize,
        out: usize,
        beta: f32,
    ) -> Result<(), GpuError> {
        check(
            x.len() >= rows * input && w.len() >= out * input && y.len() >= rows * out,
            "linear forward",
        )?;
        self.gemm(
            false, true, rows, out, input, x, input, w, input, y, out, beta,
        )
    }

    /// Linear layer input gradient `dx[rows, in] = dy·W (+ beta·dx)`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward_input<C: GemmOut>(
        &self,
        dy: &Bf16,
        w: &Bf16,
        dx: &mut CudaSlice<C>,
        rows: usize,
        input: usize,
        out: usize,
        beta: f32,
    ) -> Result<(), GpuError> {
        check(
            dy.len() >= rows * out && dx.len() >= rows * input,
            "linear backward input",
        )?;
        self.gemm(
            false, false, rows, input, out, dy, out, w, input, dx, input, beta,
        )
    }

    /// Linear layer weight gradient `dW[out, in] += dyᵀ·x`.
    pub fn linear_backward_weight(
        &self,
        dy: &Bf16,
        x: &Bf16,
        dw: &mut F32,
        rows: usize,
        input: usize,
        out: usize,
    ) -> Result<(), GpuError> {
        check(dw.len() >= out * input, "linear backward weight")?;
        self.gemm(
            true, false, out, input, rows, dy, out, x, input, dw, input, 1.0,
        )
    }
}

/// Element types a matrix product may write: f32, or bf16 for a result
/// that only feeds bf16 operands (rounded once, by cuBLAS).
pub trait GemmOut: DeviceRepr {
    /// cuBLAS's name of the type.
    const DATA_TYPE: blas_sys::cudaDataType;
}

impl GemmOut for f32 {
    const DATA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
}

impl GemmOut for u16 {
    const DATA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
}

/// AdamW's per-step scalars, as `optim::AdamW::step` derives them.
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// lr / (1 − β₁ᵗ).
    pub step_size: f32,
    /// √(1 − β₂ᵗ).
    pub bc2_sqrt: f32,
    /// ε.
    pub eps: f32,
    /// 1 − lr·weight_decay, or 1 for tensors without decay.
    pub decay: f32,
    /// Gradient clip factor.
    pub clip: f32,
}

fn check(ok: bool, what: &str) -> Result<(), GpuError> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Unsupported(format!(
            "{what}: buffer too small for the shape"
        )))
    }
}

/// A kernel argument passed by value.
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
