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
// When `out_bf` is not null the rotated values are also written there as bf16.
extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t, long rows, int seq, int width, int half,
                                float sign, bf16* __restrict__ out_bf) {
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
        float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        h[i] = y1;
        h[i + half] = y2;
        if (out_bf) {
            bf16* o = out_bf + row * width + head * 2 * half;
            o[i] = to_bf16(y1);
            o[i + half] = to_bf16(y2);
        }
    }
}

// ------------------------------------------------------------ SwiGLU

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + __expf(-g)); }

// h = silu(g)·u; the projections and the product are bf16 (f32 arithmetic).
extern "C" __global__ void swiglu_forward(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                          bf16* __restrict__ h, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = from_bf16(g[i]);
        h[i] = to_bf16(gi * sigmoidf(gi) * from_bf16(u[i]));
    }
}

// dg = dh·u·silu'(g), du = dh·silu(g), all bf16.
extern "C" __global__ void swiglu_backward(const bf16* __restrict__ dh, const bf16* __restrict__ g,
                                           const bf16* __restrict__ u, bf16* __restrict__ dg,
                                           bf16* __restrict__ du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = from_bf16(g[i]), s = sigmoidf(gi), d = from_bf16(dh[i]);
        dg[i] = to_bf16(d * from_bf16(u[i]) * s * (1.0f + gi * (1.0f - s)));
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
// Causal grouped-query attention on tensor cores, without a T×T matrix in
// memory (flash-attention style): a block takes a tile of 64 queries (or
// keys) through shared memory, each of its 4 warps 16 rows, and every
// product is a warp-level bf16 mma (m16n8k16, f32 accumulation). The
// forward keeps the log-sum-exp of each row; the backward recomputes the
// probabilities from it, in two kernels that need no atomics: one per query
// tile for dQ, one per key tile for dK and dV (summed over the query heads
// that share the key/value head). Query head h reads key/value head
// h / (H / KVH). q, k, v, dO are bf16 in the projections' token-major
// layout [B·T, heads·hd]; outputs are f32.

#define TILE 64
#define LOG2E 1.4426950408889634f

// Two f32 → one bf16x2 word (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 pack2(bf16 lo, bf16 hi) { return (u32)lo | ((u32)hi << 16); }

// d += a·b for a 16×16 (row) by 16×8 (col) bf16 tile, f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 bf16 matrices from shared memory, one row address per lane
// (lanes 8i..8i+7 give matrix i's rows); `trans` transposes each.
__device__ __forceinline__ void ldsm_x4(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Start copying rows [row0, row0+64) of a token-major bf16 tensor (row
// stride `stride`, head offset `col0`) into shared memory [64][HD+8] with
// cp.async (rows past `seq` are zero-filled); the caller commits the group
// and waits for it, so the copy overlaps the previous tile's products.
template <int HD>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, long base_row, int row0,
                                          int seq, long stride, int col0) {
    const int vecs = HD / 8;  // 16-byte vectors per row
    for (int e = threadIdx.x; e < TILE * vecs; e += blockDim.x) {
        int r = e / vecs, c = (e % vecs) * 8;
        bool live = row0 + r < seq;
        const bf16* from = src + (base_row + (live ? row0 + r : 0)) * stride + col0 + c;
        u32 to = (u32)__cvta_generic_to_shared(dst + r * (HD + 8) + c);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(live ? 16 : 0));
    }
}

// Start copying 64 per-row values of one head (`vals[(base + row)·heads + h]`,
// rows clamped to the sequence) into shared memory.
__device__ __forceinline__ void load_row_values(float* dst, const float* __restrict__ vals, long base, int row0,
                                                int seq, int heads, int h) {
    for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
        const float* from = vals + (base + min(row0 + i, seq - 1)) * heads + h;
        u32 to = (u32)__cvta_generic_to_shared(dst + i);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(to), "l"(from));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `pending` (0 or 1) committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
    if (pending) {
        asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
        asm volatile("cp.async.wait_group 0;\n" ::);
    }
}

// Wait for the key/value tile `it` (keys from k0) in buffer it % 2 of `sKV`
// and start the next one, if any up to key `last`, streaming into the other.
template <int HD>
__device__ __forceinline__ void next_kv_tile(bf16* sKV, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                             long base, int k0, int it, int last, int seq, long kv_rs,
                                             int col0) {
    const int T = TILE * (HD + 8);
    bool more = k0 + TILE <= last && k0 + TILE < seq;
    if (more) {
        bf16* nK = sKV + 2 * T * ((it + 1) & 1);
        load_tile<HD>(nK, k, base, k0 + TILE, seq, kv_rs, col0);
        load_tile<HD>(nK + T, v, base, k0 + TILE, seq, kv_rs, col0);
        cp_async_commit();
    }
    cp_async_wait(more ? 1 : 0);
    __syncthreads();
}

// A fragments (16 rows × HD) of a warp's rows r0.. of a shared tile.
template <int HD>
__device__ __forceinline__ void load_a_frags(u32 (*frag)[4], const bf16* tile, int r0, int lane) {
    int i = lane >> 3, row = r0 + (lane & 7) + 8 * (i & 1), col = 8 * (i >> 1);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) ldsm_x4(frag[kk], tile + row * (HD + 8) + 16 * kk + col);
}

// acc[n-tile][4] (16 rows × 64 cols) += A(16 × HD) · Bᵀ where B's rows are the
// 64 rows of a shared tile [64][HD+8] (S = Q·Kᵀ and friends).
template <int HD>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const u32 (*a)[4], const bf16* tile, int lane) {
    int i = lane >> 3, n_off = (lane & 7) + 8 * (i >> 1), k_off = 8 * (i & 1);
#pragma unroll
    for (int nt = 0; nt < TILE / 8; nt += 2) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 b[4];
            ldsm_x4(b, tile + (8 * nt + n_off) * (HD + 8) + 16 * kk + k_off);
            mma16816(acc[nt], a[kk], b[0], b[1]);
            mma16816(acc[nt + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc[d-tile][4] (16 rows × HD) += P(16 × 64, as C fragments) · V where V's
// rows are the 64 rows of a shared tile [64][HD+8].
template <int HD>
__device__ __forceinline__ void mma_pv(float (*acc)[4], const float (*p)[4], const bf16* tile, int lane) {
    int i = lane >> 3, k_off = (lane & 7) + 8 * (i & 1), n_off = 8 * (i >> 1);
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
        u32 a[4] = {pack_bf16(p[2 * kk][0], p[2 * kk][1]), pack_bf16(p[2 * kk][2], p[2 * kk][3]),
                    pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt += 2) {
            u32 b[4];
            ldsm_x4_trans(b, tile + (16 * kk + k_off) * (HD + 8) + 8 * dt + n_off);
            mma16816(acc[dt], a, b[0], b[1]);
            mma16816(acc[dt + 1], a, b[2], b[3]);
        }
    }
}

// o = softmax(q·kᵀ/√hd, causal)·v and lse (natural log). Grid (ceil(T/64), H, B), 128 threads.
template <int HD>
__device__ void attention_forward_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, float* __restrict__ o,
                                       bf16* __restrict__ o_bf, float* __restrict__ lse, int seq, int heads,
                                       int kv_heads, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int T = TILE * (HD + 8);
    bf16* sQ = (bf16*)smem;
    bf16* sKV = sQ + T;  // two buffers of (K, V) tiles
    int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    // The last query tiles see the most keys: start them first.
    int q0 = (gridDim.x - 1 - blockIdx.x) * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = 16 * warp;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD, base = (long)b * seq;
    load_tile<HD>(sQ, q, base, q0, seq, q_rs, h * HD);
    load_tile<HD>(sKV, k, base, 0, seq, kv_rs, kvh * HD);
    load_tile<HD>(sKV + T, v, base, 0, seq, kv_rs, kvh * HD);
    cp_async_commit();
    cp_async_wait(0);
    __syncthreads();
    u32 qa[HD / 16][4];
    load_a_frags<HD>(qa, sQ, r0, lane);
    float oacc[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float c = scale * LOG2E;
    int rows[2] = {q0 + r0 + g, q0 + r0 + g + 8};
    for (int k0 = 0, it = 0; k0 <= q0 && k0 < seq; k0 += TILE, it++) {
        bf16* sK = sKV + 2 * T * (it & 1);
        bf16* sV = sK + T;
        next_kv_tile<HD>(sKV, k, v, base, k0, it, q0, seq, kv_rs, kvh * HD);
        float s[TILE / 8][4];
#pragma unroll
        for (int i = 0; i < TILE / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
        mma_abt<HD>(s, qa, sK, lane);
        float mx[2] = {NEG_INF, NEG_INF};
        // Only the diagonal tile and the sequence's last tile need masks.
        bool edge = k0 == q0 || k0 + TILE > seq;
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = k0 + 8 * nt + 2 * t + (e & 1);
                int row = rows[e >> 1];
                float x = (edge && (col > row || col >= seq)) ? NEG_INF : s[nt][e] * c;
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float m_new = fmaxf(m[r], mx[r]);
            // A row with nothing visible yet (past the sequence) keeps zeros.
            float corr = (m_new == NEG_INF) ? 1.0f : exp2f(m[r] - m_new);
            l[r] *= corr;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                oacc[i][2 * r] *= corr;
                oacc[i][2 * r + 1] *= corr;
            }
            m[r] = m_new;
        }
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float mr = m[e >> 1];
                float p = (mr == NEG_INF) ? 0.0f : exp2f(s[nt][e] - mr);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
        mma_pv<HD>(oacc, s, sV, lane);
        __syncthreads();  // this buffer is refilled two tiles on
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = rows[r];
        if (row >= seq) continue;
        float inv = 1.0f / l[r];
        long off = (base + row) * q_rs + h * HD;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            int col = 8 * dt + 2 * t;
            float y0 = oacc[dt][2 * r] * inv, y1 = oacc[dt][2 * r + 1] * inv;
            o[off + col] = y0;
            o[off + col + 1] = y1;
            *(u32*)(o_bf + off + col) = pack_bf16(y0, y1);
        }
        if (t == 0) lse[(base + row) * heads + h] = m[r] / LOG2E + logf(l[r]);
    }
}

// delta[row, h] = Σ dO·O over the head (f32).
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

// dq = scale · Σ_j p·(dp − δ)·k_j; one block per query tile, 128 threads.
template <int HD>
__device__ void attention_backward_q_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq, int seq, int heads, int kv_heads,
                                          float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int T = TILE * (HD + 8);
    bf16* sQ = (bf16*)smem;
    bf16* sO = sQ + T;
    bf16* sKV = sO + T;  // two buffers of (K, V) tiles
    int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    // The last query tiles see the most keys: start them first.
    int q0 = (gridDim.x - 1 - blockIdx.x) * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = 16 * warp;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD, base = (long)b * seq;
    load_tile<HD>(sQ, q, base, q0, seq, q_rs, h * HD);
    load_tile<HD>(sO, dout, base, q0, seq, q_rs, h * HD);
    load_tile<HD>(sKV, k, base, 0, seq, kv_rs, kvh * HD);
    load_tile<HD>(sKV + T, v, base, 0, seq, kv_rs, kvh * HD);
    cp_async_commit();
    cp_async_wait(0);
    __syncthreads();
    u32 qa[HD / 16][4], da[HD / 16][4];
    load_a_frags<HD>(qa, sQ, r0, lane);
    load_a_frags<HD>(da, sO, r0, lane);
    int rows[2] = {q0 + r0 + g, q0 + r0 + g + 8};
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        long idx = (base + min(rows[r], seq - 1)) * heads + h;
        lse2[r] = lse[idx] * LOG2E;
        dl[r] = delta[idx];
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float c = scale * LOG2E;
    for (int k0 = 0, it = 0; k0 <= q0 && k0 < seq; k0 += TILE, it++) {
        bf16* sK = sKV + 2 * T * (it & 1);
        bf16* sV = sK + T;
        next_kv_tile<HD>(sKV, k, v, base, k0, it, q0, seq, kv_rs, kvh * HD);
        float s[TILE / 8][4], dp[TILE / 8][4];
#pragma unroll
        for (int i = 0; i < TILE / 8; i++) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.0f;
        }
        mma_abt<HD>(s, qa, sK, lane);
        mma_abt<HD>(dp, da, sV, lane);
        bool edge = k0 == q0 || k0 + TILE > seq || q0 + TILE > seq;
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = k0 + 8 * nt + 2 * t + (e & 1);
                int row = rows[e >> 1];
                bool hidden = edge && (col > row || col >= seq || row >= seq);
                float p = hidden ? 0.0f : exp2f(s[nt][e] * c - lse2[e >> 1]);
                s[nt][e] = p * (dp[nt][e] - dl[e >> 1]);
            }
        }
        mma_pv<HD>(acc, s, sK, lane);
        __syncthreads();  // this buffer is refilled two tiles on
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = rows[r];
        if (row >= seq) continue;
        long off = (base + row) * q_rs + h * HD;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            int col = 8 * dt + 2 * t;
            dq[off + col] = acc[dt][2 * r] * scale;
            dq[off + col + 1] = acc[dt][2 * r + 1] * scale;
        }
    }
}

// dk = scale · Σ_{i ≥ j} ds·q_i, dv = Σ p·dO_i for one query head; one block
// per (key tile, query head), 128 threads. Probabilities and their gradients
// are computed transposed (keys as rows), so every product stays inside a
// warp. With grouped heads each query head writes its own share (row stride
// `out_heads`·HD, at head `h`) and `attention_group_sum` adds the shares.
template <int HD>
__device__ void attention_backward_kv_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                           const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                           const float* __restrict__ lse, const float* __restrict__ delta,
                                           float* __restrict__ dk, float* __restrict__ dv, int seq, int heads,
                                           int kv_heads, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int T = TILE * (HD + 8);
    // Two buffers of (Q, dO) tiles, then two of (lse, δ) rows.
    bf16* sQO = (bf16*)smem;
    float* sLD = (float*)(sQO + 4 * T);
    bf16* sK = sQO;  // the key and value tiles are only read into registers
    bf16* sV = sQO + T;
    int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int k0 = blockIdx.x * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = 16 * warp;
    long q_rs = (long)heads * HD, kv_rs = (long)kv_heads * HD, base = (long)b * seq;
    load_tile<HD>(sK, k, base, k0, seq, kv_rs, kvh * HD);
    load_tile<HD>(sV, v, base, k0, seq, kv_rs, kvh * HD);
    cp_async_commit();
    cp_async_wait(0);
    __syncthreads();
    u32 ka[HD / 16][4], va[HD / 16][4];
    load_a_frags<HD>(ka, sK, r0, lane);
    load_a_frags<HD>(va, sV, r0, lane);
    __syncthreads();
    // The first query tile (the diagonal one) into buffer 0.
    load_tile<HD>(sQO, q, base, k0, seq, q_rs, h * HD);
    load_tile<HD>(sQO + T, dout, base, k0, seq, q_rs, h * HD);
    load_row_values(sLD, lse, base, k0, seq, heads, h);
    load_row_values(sLD + TILE, delta, base, k0, seq, heads, h);
    cp_async_commit();
    int keys[2] = {k0 + r0 + g, k0 + r0 + g + 8};
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = 0.0f;
        dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.0f;
    }
    float c = scale * LOG2E;
    for (int q0 = k0, it = 0; q0 < seq; q0 += TILE, it++) {
        bf16* sQ = sQO + 2 * T * (it & 1);
        bf16* sO = sQ + T;
        float* sL = sLD + 2 * TILE * (it & 1);
        float* sD = sL + TILE;
        bool more = q0 + TILE < seq;
        if (more) {  // the next query tile streams in while this one is used
            int nb = (it + 1) & 1, q1 = q0 + TILE;
            load_tile<HD>(sQO + 2 * T * nb, q, base, q1, seq, q_rs, h * HD);
            load_tile<HD>(sQO + 2 * T * nb + T, dout, base, q1, seq, q_rs, h * HD);
            load_row_values(sLD + 2 * TILE * nb, lse, base, q1, seq, heads, h);
            load_row_values(sLD + 2 * TILE * nb + TILE, delta, base, q1, seq, heads, h);
            cp_async_commit();
        }
        cp_async_wait(more ? 1 : 0);
        __syncthreads();
        float s[TILE / 8][4], dp[TILE / 8][4];
#pragma unroll
        for (int i = 0; i < TILE / 8; i++) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.0f;
        }
        mma_abt<HD>(s, ka, sQ, lane);   // Sᵀ: keys × queries
        mma_abt<HD>(dp, va, sO, lane);  // dPᵀ = V·dOᵀ
        bool edge = q0 == k0 || q0 + TILE > seq || k0 + TILE > seq;
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qc = 8 * nt + 2 * t + (e & 1);
                int col = q0 + qc;
                int key = keys[e >> 1];
                bool hidden = edge && (col < key || col >= seq || key >= seq);
                float p = hidden ? 0.0f : exp2f(s[nt][e] * c - sL[qc] * LOG2E);
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - sD[qc]);
            }
        }
        mma_pv<HD>(dva, s, sO, lane);   // dV += Pᵀ·dO
        mma_pv<HD>(dka, dp, sQ, lane);  // dK += dSᵀ·Q
        __syncthreads();  // this buffer is refilled two tiles on
    }
    // Grouped heads: this head's share goes to [B·T, heads·HD] at head h;
    // otherwise (one query head per key head) straight to [B·T, KVH·HD].
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int key = keys[r];
        if (key >= seq) continue;
        long off = (base + key) * q_rs + h * HD;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            int col = 8 * dt + 2 * t;
            dk[off + col] = dka[dt][2 * r] * scale;
            dk[off + col + 1] = dka[dt][2 * r + 1] * scale;
            dv[off + col] = dva[dt][2 * r];
            dv[off + col + 1] = dva[dt][2 * r + 1];
        }
    }
}

// dk[row, kvh] = Σ over the query heads of kvh's group of their shares.
extern "C" __global__ void attention_group_sum(const float* __restrict__ pk, const float* __restrict__ pv,
                                               float* __restrict__ dk, float* __restrict__ dv, long rows,
                                               int heads, int kv_heads, int hd) {
    long total = rows * kv_heads * hd;
    int group = heads / kv_heads;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        long row = idx / ((long)kv_heads * hd);
        int rem = (int)(idx % ((long)kv_heads * hd));
        int kvh = rem / hd, i = rem % hd;
        const float* a = pk + row * heads * hd + (long)kvh * group * hd + i;
        const float* c = pv + row * heads * hd + (long)kvh * group * hd + i;
        float sk = 0.0f, sv = 0.0f;
        for (int g = 0; g < group; g++) {
            sk += a[g * hd];
            sv += c[g * hd];
        }
        dk[idx] = sk;
        dv[idx] = sv;
    }
}

#define ATTENTION_KERNELS(HD)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) attention_forward_##HD(                              \
        const bf16* q, const bf16* k, const bf16* v, float* o, bf16* o_bf, float* lse, int seq, int heads, \
        int kv_heads, float scale) {                                                                        \
        attention_forward_impl<HD>(q, k, v, o, o_bf, lse, seq, heads, kv_heads, scale);                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_q_##HD(                           \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,                   \
        const float* delta, float* dq, int seq, int heads, int kv_heads, float scale) {                     \
        attention_backward_q_impl<HD>(q, k, v, dout, lse, delta, dq, seq, heads, kv_heads, scale);          \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_kv_##HD(                          \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,                   \
        const float* delta, float* dk, float* dv, int seq, int heads, int kv_heads, float scale) {          \
        attention_backward_kv_impl<HD>(q, k, v, dout, lse, delta, dk, dv, seq, heads, kv_heads, scale);     \
    }

ATTENTION_KERNELS(16)
ATTENTION_KERNELS(32)
ATTENTION_KERNELS(64)
ATTENTION_KERNELS(128)

// ------------------------------------------------------------ optimizer

// AdamW with decoupled decay on f32 master weights; the gradient is scaled
// by the clip factor; the bf16 copy the matrix products read is refreshed.
__device__ __forceinline__ float adamw_one(float w, float g, float& m, float& v, float b1, float b2,
                                           float step_size, float bc2_sqrt, float eps, float decay) {
    m = b1 * m + (1.0f - b1) * g;
    v = b2 * v + (1.0f - b2) * g * g;
    return w * decay - step_size * m / (sqrtf(v) / bc2_sqrt + eps);
}

extern "C" __global__ void adamw(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, bf16* __restrict__ w_bf, long n, float b1, float b2,
                                 float step_size, float bc2_sqrt, float eps, float decay, float clip) {
    // Four at a time (every buffer is 256-byte aligned), then the tail.
    long n4 = n / 4;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        float4 wi = ((float4*)w)[i], gi = ((const float4*)g)[i], mi = ((float4*)m)[i], vi = ((float4*)v)[i];
        wi.x = adamw_one(wi.x, gi.x * clip, mi.x, vi.x, b1, b2, step_size, bc2_sqrt, eps, decay);
        wi.y = adamw_one(wi.y, gi.y * clip, mi.y, vi.y, b1, b2, step_size, bc2_sqrt, eps, decay);
        wi.z = adamw_one(wi.z, gi.z * clip, mi.z, vi.z, b1, b2, step_size, bc2_sqrt, eps, decay);
        wi.w = adamw_one(wi.w, gi.w * clip, mi.w, vi.w, b1, b2, step_size, bc2_sqrt, eps, decay);
        ((float4*)w)[i] = wi;
        ((float4*)m)[i] = mi;
        ((float4*)v)[i] = vi;
        if (w_bf) ((uint2*)w_bf)[i] = make_uint2(pack_bf16(wi.x, wi.y), pack_bf16(wi.z, wi.w));
    }
    for (long i = 4 * n4 + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float mi = m[i], vi = v[i];
        float wi = adamw_one(w[i], g[i] * clip, mi, vi, b1, b2, step_size, bc2_sqrt, eps, decay);
        m[i] = mi;
        v[i] = vi;
        w[i] = wi;
        if (w_bf) w_bf[i] = to_bf16(wi);
    }
}
