// Pipewright's CUDA kernels, compiled at run time with NVRTC (no nvcc, no
// CUDA headers: bf16 is handled as raw 16-bit words).
//
// Layout conventions match the CPU kernels (`kernels/ops.rs`,
// `kernels/attention.rs`): row-major, N = rows = batch·time, projections in
// token-major layout [B·T, heads·hd]. Matrix products are not here: they go
// through cuBLAS (bf16 operands, f32 accumulation). Every element-wise kernel
// reads f32 and writes the bf16 copy the next matrix product needs.

typedef unsigned short bf16;
typedef unsigned int u32;
#define NEG_INF (__int_as_float(0xff800000))

// f32 -> bf16, round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16 to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float from_bf16(bf16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024).
__device__ float block_sum(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? shared32[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared32[0] = v;
    }
    __syncthreads();
    return shared32[0];
}

__device__ float block_max(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? shared32[threadIdx.x] : NEG_INF;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) shared32[0] = v;
    }
    __syncthreads();
    return shared32[0];
}

// ------------------------------------------------------------ casts, sums

extern "C" __global__ void cast_bf16(const float* __restrict__ x, bf16* __restrict__ y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = to_bf16(x[i]);
}

// Σ x² into *out (f64), for the global gradient norm.
extern "C" __global__ void sum_squares(const float* __restrict__ x, long n, double* out) {
    __shared__ float s32[32];
    float acc = 0.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc, s32);
    if (threadIdx.x == 0) atomicAdd(out, (double)acc);
}

// ------------------------------------------------------------ embedding

// x[N, D] = E[tokens]; tokens were checked against the vocabulary on the host.
extern "C" __global__ void embed_forward(const u32* __restrict__ tokens, const float* __restrict__ table,
                                         float* __restrict__ x, int d) {
    int row = blockIdx.x;
    const float* src = table + (long)tokens[row] * d;
    float* dst = x + (long)row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// dE[tokens[r]] += dx[r]
extern "C" __global__ void embed_backward(const u32* __restrict__ tokens, const float* __restrict__ dx,
                                          float* __restrict__ dtable, int d) {
    int row = blockIdx.x;
    float* dst = dtable + (long)tokens[row] * d;
    const float* src = dx + (long)row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(dst + i, src[i]);
}

// ------------------------------------------------------------ RMSNorm

// y = x · rstd · w (bf16), rstd = 1/sqrt(mean(x²) + eps); one block per row.
extern "C" __global__ void rmsnorm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           bf16* __restrict__ y, float* __restrict__ rstd, int d, float eps) {
    __shared__ float s32[32];
    long row = blockIdx.x;
    const float* xr = x + row * d;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) acc += xr[i] * xr[i];
    float s = rsqrtf(block_sum(acc, s32) / d + eps);
    if (threadIdx.x == 0) rstd[row] = s;
    bf16* yr = y + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = to_bf16(xr[i] * s * w[i]);
}

// dx += s·(dy⊙w − x̂·mean(dy⊙w⊙x̂)), x̂ = x·s; one block per row.
extern "C" __global__ void rmsnorm_backward_input(const float* __restrict__ dy, const float* __restrict__ x,
                                                  const float* __restrict__ w, const float* __restrict__ rstd,
                                                  float* __restrict__ dx, int d) {
    __shared__ float s32[32];
    long row = blockIdx.x;
    const float* g = dy + row * d;
    const float* xr = x + row * d;
    float s = rstd[row];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) acc += g[i] * w[i] * xr[i];
    float mean = block_sum(acc, s32) * s / d;
    float* o = dx + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] += s * (g[i] * w[i] - xr[i] * s * mean);
}

// dw[i] += Σ_rows dy·x·rstd; grid (ceil(d/256), row chunks).
extern "C" __global__ void rmsnorm_backward_weight(const float* __restrict__ dy, const float* __restrict__ x,
                                                   const float* __restrict__ rstd, float* __restrict__ dw,
                                                   int d, int rows) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    int per = (rows + gridDim.y - 1) / gridDim.y;
    int r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) acc += dy[(long)r * d + i] * x[(long)r * d + i] * rstd[r];
    if (r1 > r0) atomicAdd(dw + i, acc);
}

// ------------------------------------------------------------ rotary

// Rotate x[N, width] in place, "rotate half" pairs (i, i+half) of each head;
// row r is at position r % seq; sign −1 applies the transpose (backward).
extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t, long rows, int seq, int width, int half,
                                float sign) {
    long pairs_per_row = width / 2;
    long total = rows * pairs_per_row;
    for (long p = blockIdx.x * (long)blockDim.x + threadIdx.x; p < total; p += (long)gridDim.x * blockDim.x) {
        long row = p / pairs_per_row;
        int in_row = (int)(p % pairs_per_row);
        int head = in_row / half, i = in_row % half;
        int t = (int)(row % seq);
        float c = cos_t[t * half + i], s = sign * sin_t[t * half + i];
        float* h = x + row * width + head * 2 * half;
        float x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}

// ------------------------------------------------------------ SwiGLU

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + __expf(-g)); }

// h = silu(g)·u, written as bf16 for the down projection.
extern "C" __global__ void swiglu_forward(const float* __restrict__ g, const float* __restrict__ u,
                                          bf16* __restrict__ h, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i];
        h[i] = to_bf16(gi * sigmoidf(gi) * u[i]);
    }
}

// dg = dh·u·silu'(g), du = dh·silu(g), both bf16.
extern "C" __global__ void swiglu_backward(const float* __restrict__ dh, const float* __restrict__ g,
                                           const float* __restrict__ u, bf16* __restrict__ dg,
                                           bf16* __restrict__ du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i], s = sigmoidf(gi), d = dh[i];
        dg[i] = to_bf16(d * u[i] * s * (1.0f + gi * (1.0f - s)));
        du[i] = to_bf16(d * gi * s);
    }
}

// ------------------------------------------------------------ loss

// Softmax cross-entropy of logits[N, V]: loss[r] (nats) and the gradient of
// scale·mean loss, scale·(softmax − onehot)/N, as bf16. One block per row.
extern "C" __global__ void cross_entropy(const float* __restrict__ logits, const u32* __restrict__ targets,
                                         float* __restrict__ loss, bf16* __restrict__ dlogits, int v,
                                         float grad_scale) {
    __shared__ float s32[32];
    long row = blockIdx.x;
    const float* l = logits + row * v;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_max(m, s32);
    float acc = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) acc += __expf(l[i] - m);
    float sum = block_sum(acc, s32);
    u32 t = targets[row];
    if (threadIdx.x == 0) loss[row] = logf(sum) + m - l[t];
    float k = grad_scale / sum;
    bf16* dl = dlogits + row * v;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float p = __expf(l[i] - m) * k;
        dl[i] = to_bf16(i == (int)t ? p - grad_scale : p);
    }
}

// ------------------------------------------------------------ attention
//
// Causal grouped-query attention without a T×T matrix in memory: queries
// and keys go in tiles through shared memory with an online softmax (flash
// style). Forward keeps the log-sum-exp of each row; backward recomputes the
// probabilities from it. Query head h reads key/value head h / (H / KVH).

// o = softmax(q·kᵀ·scale, causal) · v; lse = log Σ exp. Grid (ceil(T/64), H, B), 64 threads.
template <int HD, int KT>
__device__ void attention_forward_impl(const float* __restrict__ q, const float* __restrict__ k,
                                       const float* __restrict__ v, float* __restrict__ o,
                                       bf16* __restrict__ o_bf, float* __restrict__ lse, int seq, int heads,
                                       int kv_heads, float scale) {
    __shared__ float sk[KT][HD];
    __shared__ float sv[KT][HD];
    __shared__ float ss[KT][64];
    int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int t0 = blockIdx.x * 64, t = t0 + threadIdx.x;
    bool live = t < seq;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD;
    float qr[HD], acc[HD];
    const float* qp = q + ((long)b * seq + (live ? t : 0)) * q_rs + h * HD;
#pragma unroll
    for (int i = 0; i < HD; i++) {
        qr[i] = qp[i] * scale;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    int t_last = min(seq - 1, t0 + 63);
    for (int k0 = 0; k0 <= t_last; k0 += KT) {
        __syncthreads();
        for (int e = threadIdx.x; e < KT * HD; e += 64) {
            int j = e / HD, i = e % HD, key = k0 + j;
            long off = ((long)b * seq + key) * kv_rs + kvh * HD + i;
            sk[j][i] = key < seq ? k[off] : 0.0f;
            sv[j][i] = key < seq ? v[off] : 0.0f;
        }
        __syncthreads();
        int jn = live ? min(KT, t - k0 + 1) : 0;
        float tile_max = NEG_INF;
        for (int j = 0; j < jn; j++) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < HD; i++) s += qr[i] * sk[j][i];
            ss[j][threadIdx.x] = s;
            tile_max = fmaxf(tile_max, s);
        }
        if (jn > 0) {
            float m_new = fmaxf(m, tile_max);
            float corr = __expf(m - m_new);
            l *= corr;
#pragma unroll
            for (int i = 0; i < HD; i++) acc[i] *= corr;
            for (int j = 0; j < jn; j++) {
                float p = __expf(ss[j][threadIdx.x] - m_new);
                l += p;
#pragma unroll
                for (int i = 0; i < HD; i++) acc[i] += p * sv[j][i];
            }
            m = m_new;
        }
    }
    if (!live) return;
    long row = (long)b * seq + t;
    float inv = 1.0f / l;
    float* op = o + row * q_rs + h * HD;
    bf16* ob = o_bf + row * q_rs + h * HD;
#pragma unroll
    for (int i = 0; i < HD; i++) {
        float y = acc[i] * inv;
        op[i] = y;
        ob[i] = to_bf16(y);
    }
    lse[row * heads + h] = m + logf(l);
}

// delta[row, h] = Σ dO·O over the head.
extern "C" __global__ void attention_delta(const float* __restrict__ dout, const float* __restrict__ out,
                                           float* __restrict__ delta, long rows_heads, int hd) {
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < rows_heads; r += (long)gridDim.x * blockDim.x) {
        const float* a = dout + r * hd;
        const float* c = out + r * hd;
        float acc = 0.0f;
        for (int i = 0; i < hd; i++) acc += a[i] * c[i];
        delta[r] = acc;
    }
}

// dq = scale · Σ_j p·(dp − δ)·k_j. Thread per query row; grid (ceil(T/64), H, B), 64 threads.
template <int HD, int KT>
__device__ void attention_backward_q_impl(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq, int seq, int heads, int kv_heads,
                                          float scale) {
    __shared__ float sk[KT][HD];
    __shared__ float sv[KT][HD];
    int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int t0 = blockIdx.x * 64, t = t0 + threadIdx.x;
    bool live = t < seq;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD;
    long row = (long)b * seq + (live ? t : 0);
    float qr[HD], dor[HD], acc[HD];
#pragma unroll
    for (int i = 0; i < HD; i++) {
        qr[i] = q[row * q_rs + h * HD + i] * scale;
        dor[i] = dout[row * q_rs + h * HD + i];
        acc[i] = 0.0f;
    }
    float lr = lse[row * heads + h], dr = delta[row * heads + h];
    int t_last = min(seq - 1, t0 + 63);
    for (int k0 = 0; k0 <= t_last; k0 += KT) {
        __syncthreads();
        for (int e = threadIdx.x; e < KT * HD; e += 64) {
            int j = e / HD, i = e % HD, key = k0 + j;
            long off = ((long)b * seq + key) * kv_rs + kvh * HD + i;
            sk[j][i] = key < seq ? k[off] : 0.0f;
            sv[j][i] = key < seq ? v[off] : 0.0f;
        }
        __syncthreads();
        int jn = live ? min(KT, t - k0 + 1) : 0;
        for (int j = 0; j < jn; j++) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int i = 0; i < HD; i++) {
                s += qr[i] * sk[j][i];
                dp += dor[i] * sv[j][i];
            }
            float ds = __expf(s - lr) * (dp - dr);
#pragma unroll
            for (int i = 0; i < HD; i++) acc[i] += ds * sk[j][i];
        }
    }
    if (!live) return;
#pragma unroll
    for (int i = 0; i < HD; i++) dq[row * q_rs + h * HD + i] = acc[i] * scale;
}

// dk = scale · Σ_{h in group} Σ_{i ≥ j} ds·q_i, dv = Σ p·dO_i. Thread per key
// row; grid (ceil(T/32), KVH, B), 32 threads. A thread's own key and value
// rows sit in padded shared memory (no bank conflicts), query tiles of QT.
template <int HD, int QT>
__device__ void attention_backward_kv_impl(const float* __restrict__ q, const float* __restrict__ k,
                                           const float* __restrict__ v, const float* __restrict__ dout,
                                           const float* __restrict__ lse, const float* __restrict__ delta,
                                           float* __restrict__ dk, float* __restrict__ dv, int seq, int heads,
                                           int kv_heads, float scale) {
    __shared__ float sk[32][HD + 1];
    __shared__ float sv[32][HD + 1];
    __shared__ float sq[QT][HD];
    __shared__ float sdo[QT][HD];
    __shared__ float sl[QT];
    __shared__ float sd[QT];
    int b = blockIdx.z, kvh = blockIdx.y, group = heads / kv_heads;
    int j0 = blockIdx.x * 32, j = j0 + threadIdx.x;
    bool live = j < seq;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD;
    long krow = (long)b * seq + (live ? j : 0);
    for (int i = 0; i < HD; i++) {
        sk[threadIdx.x][i] = k[krow * kv_rs + kvh * HD + i];
        sv[threadIdx.x][i] = v[krow * kv_rs + kvh * HD + i];
    }
    float dka[HD], dva[HD];
#pragma unroll
    for (int i = 0; i < HD; i++) {
        dka[i] = 0.0f;
        dva[i] = 0.0f;
    }
    for (int g = 0; g < group; g++) {
        int h = kvh * group + g;
        for (int i0 = j0; i0 < seq; i0 += QT) {
            __syncthreads();
            for (int e = threadIdx.x; e < QT * HD; e += 32) {
                int r = e / HD, c = e % HD, qi = i0 + r;
                long off = ((long)b * seq + qi) * q_rs + h * HD + c;
                sq[r][c] = qi < seq ? q[off] * scale : 0.0f;
                sdo[r][c] = qi < seq ? dout[off] : 0.0f;
            }
            for (int r = threadIdx.x; r < QT; r += 32) {
                int qi = i0 + r;
                long idx = ((long)b * seq + qi) * heads + h;
                sl[r] = qi < seq ? lse[idx] : 0.0f;
                sd[r] = qi < seq ? delta[idx] : 0.0f;
            }
            __syncthreads();
            if (!live) continue;
            int rn = min(QT, seq - i0);
            for (int r = 0; r < rn; r++) {
                if (i0 + r < j) continue;
                float s = 0.0f, dp = 0.0f;
#pragma unroll
                for (int c = 0; c < HD; c++) {
                    s += sq[r][c] * sk[threadIdx.x][c];
                    dp += sdo[r][c] * sv[threadIdx.x][c];
                }
                float p = __expf(s - sl[r]);
                float ds = p * (dp - sd[r]);
#pragma unroll
                for (int c = 0; c < HD; c++) {
                    dva[c] += p * sdo[r][c];
                    dka[c] += ds * sq[r][c];
                }
            }
        }
    }
    if (!live) return;
    // sq holds q·scale, so dka already carries the one factor of scale.
#pragma unroll
    for (int i = 0; i < HD; i++) {
        dk[krow * kv_rs + kvh * HD + i] = dka[i];
        dv[krow * kv_rs + kvh * HD + i] = dva[i];
    }
}

#define ATTENTION_KERNELS(HD, KT, QT)                                                                       \
    extern "C" __global__ void __launch_bounds__(64) attention_forward_##HD(                               \
        const float* q, const float* k, const float* v, float* o, bf16* o_bf, float* lse, int seq,         \
        int heads, int kv_heads, float scale) {                                                             \
        attention_forward_impl<HD, KT>(q, k, v, o, o_bf, lse, seq, heads, kv_heads, scale);                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(64) attention_backward_q_##HD(                            \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,               \
        const float* delta, float* dq, int seq, int heads, int kv_heads, float scale) {                     \
        attention_backward_q_impl<HD, KT>(q, k, v, dout, lse, delta, dq, seq, heads, kv_heads, scale);      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(32) attention_backward_kv_##HD(                           \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,               \
        const float* delta, float* dk, float* dv, int seq, int heads, int kv_heads, float scale) {          \
        attention_backward_kv_impl<HD, QT>(q, k, v, dout, lse, delta, dk, dv, seq, heads, kv_heads, scale); \
    }

ATTENTION_KERNELS(16, 64, 32)
ATTENTION_KERNELS(32, 64, 32)
ATTENTION_KERNELS(64, 32, 32)
ATTENTION_KERNELS(128, 16, 8)

// ------------------------------------------------------------ optimizer

// AdamW with decoupled decay on f32 master weights; the gradient is scaled
// by the clip factor; the bf16 copy the matrix products read is refreshed.
extern "C" __global__ void adamw(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, bf16* __restrict__ w_bf, long n, float b1, float b2,
                                 float step_size, float bc2_sqrt, float eps, float decay, float clip) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] * clip;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float wi = w[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        w[i] = wi;
        if (w_bf) w_bf[i] = to_bf16(wi);
    }
}
