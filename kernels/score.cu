// score.cu - CAKE's window scoring, top-k and compaction on the GPU (see kern_cuda.h).
//
// kern_cuda_score_layer runs the mma.sync passes of score_mma.cu where they apply (head_dim
// 64 or 128: every model we target), faster 1.8-3.3x on an H200; the WMMA passes here take
// every other shape. They follow the CPU kernel's plan (score.c): blocks own one kv head and a chunk of
// key columns; each 64-column tile of keys is staged in shared memory once and multiplied
// against all G*n_q query rows of the group with tensor cores (WMMA, bf16/fp16 in, f32
// out). Pass 1 keeps each row's running max and exp-sum; a merge kernel combines chunks;
// pass 2 recomputes the tile and accumulates the column statistics. The w x n probability
// block never reaches device memory. Per-block partial sums are reduced on the host in a
// fixed order, so results are reproducible.
#include <atomic>
#include <mutex>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_pipeline.h>
#include <mma.h>
#include <errno.h>
#include <stdio.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "dtype.h"
#include "kern_cuda.h"
#include "score_mma.h"

using namespace nvcuda;

#define TN 64          // key columns per tile
#ifndef TARGET_BLOCKS
#define TARGET_BLOCKS 264 // blocks per pass, 2 per SM on an H100: fewer did better than 512 or 1024
#endif
#ifndef MIN_CHUNK
#define MIN_CHUNK 128     // each block stages Q once: not too few columns per block
#endif
#define CHUNK_ALIGN 128 // a multiple of either kernel's tile of keys
#define THREADS 256
#define MAX_R 256      // G * n_q rows per kv head
#define MAX_D 128      /* Q fragments live in registers: 2 x 8 of them */
#define PAD 8          // halves of padding per shared row: rows no longer share banks
#define LDZ (TN + 4)   // floats per row of the logits tile

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "caked cuda: %s failed at %s:%d: %s\n", #call, __FILE__,      \
                    __LINE__, cudaGetErrorString(e_));                                    \
            return -EIO;                                                                  \
        }                                                                                 \
    } while (0)


struct params {
    const uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, n, d, G, nq, R, RP, S, hkv, chunks, chunk; /* chunk: columns per block */
    float scale, gamma;
    const void *q;
    float *m, *l;          // pass 1 partials [hkv][chunks][RP]
    float *rowM, *rowLnL;  // merged [hkv][RP]
    float *acc;            // raw group sums [hkv][S]
    double *ent, *var;     // per pass-2 block
};

template <typename T> struct wtype;
template <> struct wtype<__nv_bfloat16> { typedef __nv_bfloat16 t; };
template <> struct wtype<__half> { typedef __half t; };

__device__ __forceinline__ const uint8_t *key_row(const params &p, uint32_t g, uint32_t t)
{
    return p.base + p.page_off[t / p.tpp] + ((size_t)g * p.tpp + t % p.tpp) * p.d * 2;
}

// Stages Q of group g ([R][d], rows padded to RP with zeros) in shared memory.
template <typename T>
__device__ void load_q(const params &p, uint32_t g, T *qs)
{
    const T *q = (const T *)p.q + (size_t)g * p.R * p.d;
    uint32_t ld = p.d + PAD;
    for (uint32_t i = threadIdx.x; i < p.RP * p.d; i += blockDim.x) {
        uint32_t r = i / p.d, c = i % p.d;
        qs[r * ld + c] = r < p.R ? q[i] : T(0.0f);
    }
}

// Keys [j0, j0 + TN) of head g into ks ([TN][d + PAD]), columns at or past `end` zero, as
// asynchronous copies (cp.async, 16 bytes a thread) committed as one group: the next tile
// streams in while this one is computed.
template <typename T>
__device__ void load_k_async(const params &p, uint32_t g, uint32_t j0, uint32_t end, T *ks)
{
    uint32_t vec = p.d / 8;
    for (uint32_t i = threadIdx.x; i < TN * vec; i += blockDim.x) {
        uint32_t c = i / vec, v = i % vec;
        void *dst = (uint4 *)(ks + (size_t)c * (p.d + PAD)) + v;
        if (j0 + c < end)
            __pipeline_memcpy_async(dst, (const uint4 *)key_row(p, g, j0 + c) + v, 16);
        else
            __pipeline_memcpy_async(dst, p.base, 16, 16); /* zero fill past the end */
    }
    __pipeline_commit();
}

// Tile t of a double-buffered walk: starts the copy of tile t + 1 into the other buffer (last
// read before the previous barrier), waits for tile t, and returns it once every thread's
// copies have landed.
template <typename T>
__device__ T *next_tile(const params &p, uint32_t g, uint32_t j0, uint32_t end, T *kb, uint32_t t)
{
    T *ks = kb + (size_t)(t & 1) * TN * (p.d + PAD);
    if (j0 + TN < end) {
        load_k_async(p, g, j0 + TN, end, kb + (size_t)((t + 1) & 1) * TN * (p.d + PAD));
        __pipeline_wait_prior(1);
    } else {
        __pipeline_wait_prior(0);
    }
    __syncthreads();
    return ks;
}

// zs[RP][TN] = qs . ks^T with WMMA 16x16x16 tiles. Each warp owns row tiles and keeps
// their Q fragments in registers across the whole chunk (loaded once by load_afrag), so a
// tile costs only the K fragments.
#define MAX_KF (MAX_D / 16)
template <typename T>
struct afrag {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> f[2][MAX_KF];
};

template <typename T>
__device__ void load_afrag(const params &p, const T *qs, afrag<T> &a)
{
    int warp = threadIdx.x / 32, nwarps = blockDim.x / 32, rt = p.RP / 16;
#pragma unroll
    for (int s = 0; s < 2; s++) {
        int r = warp + s * nwarps;
        if (r < rt)
#pragma unroll
            for (int k = 0; k < MAX_KF; k++)
                if (k * 16 < (int)p.d)
                    wmma::load_matrix_sync(a.f[s][k], qs + (size_t)r * 16 * (p.d + PAD) + k * 16, p.d + PAD);
    }
}

template <typename T>
__device__ void tile_gemm(const params &p, const afrag<T> &a, const T *ks, float *zs)
{
    int warp = threadIdx.x / 32, nwarps = blockDim.x / 32, rt = p.RP / 16;
#pragma unroll
    for (int s = 0; s < 2; s++) {
        int r = warp + s * nwarps;
        if (r >= rt)
            continue;
        for (int c = 0; c < TN / 16; c++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < MAX_KF; k++) {
                if (k * 16 >= (int)p.d)
                    break;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                wmma::load_matrix_sync(b, ks + (size_t)c * 16 * (p.d + PAD) + k * 16, p.d + PAD);
                wmma::mma_sync(acc, a.f[s][k], b, acc);
            }
            wmma::store_matrix_sync(zs + (size_t)r * 16 * LDZ + c * 16, acc, LDZ, wmma::mem_row_major);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) pass1(params p)
{
    extern __shared__ __align__(16) uint8_t smem[];
    T *qs = (T *)smem;
    T *kb = qs + (size_t)p.RP * (p.d + PAD); /* two K tiles: double buffered */
    float *zs = (float *)(kb + (size_t)2 * TN * (p.d + PAD));
    float *rm = zs + (size_t)p.RP * LDZ, *rl = rm + p.RP;
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk;
    uint32_t c1 = min(c0 + p.chunk, p.n);
    load_q(p, g, qs);
    for (uint32_t r = threadIdx.x; r < p.RP; r += blockDim.x)
        rm[r] = -INFINITY, rl[r] = 0.0f;
    __syncthreads();
    afrag<T> af;
    load_afrag(p, qs, af);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    if (c0 < c1)
        load_k_async(p, g, c0, c1, kb);
    for (uint32_t j0 = c0, t = 0; j0 < c1; j0 += TN, t++) {
        T *ks = next_tile(p, g, j0, c1, kb, t);
        tile_gemm(p, af, ks, zs);
        __syncthreads();
        for (uint32_t r = warp; r < p.R; r += nw) {
            uint32_t i = r % p.nq, lim = p.n - p.nq + i + 1; // row sees keys < lim
            float v[TN / 32], mx = -INFINITY;
            for (int u = 0; u < TN / 32; u++) {
                uint32_t j = j0 + lane + 32 * u;
                v[u] = (j < c1 && j < lim) ? zs[r * LDZ + lane + 32 * u] * p.scale : -INFINITY;
                mx = fmaxf(mx, v[u]);
            }
            for (int o = 16; o; o >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            if (mx == -INFINITY)
                continue;
            float mo = rm[r], mn = fmaxf(mo, mx), s = 0.0f;
            for (int u = 0; u < TN / 32; u++)
                s += v[u] == -INFINITY ? 0.0f : __expf(v[u] - mn);
            for (int o = 16; o; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            __syncwarp(); /* every lane has read rm[r] before lane 0 updates it */
            if (lane == 0) {
                rl[r] = rl[r] * (mo == -INFINITY ? 0.0f : __expf(mo - mn)) + s;
                rm[r] = mn;
            }
        }
    }
    __syncthreads();
    size_t at = ((size_t)g * p.chunks + blockIdx.x) * p.RP;
    for (uint32_t r = threadIdx.x; r < p.RP; r += blockDim.x)
        p.m[at + r] = rm[r], p.l[at + r] = rl[r];
}

// One warp per (group, row): the lanes split the chunks, then reduce (a thread walking all
// chunks alone waited on one load after another).
__global__ void merge(const float *pm, const float *pl, float *rowM, float *rowLnL, uint32_t hkv,
                      uint32_t chunks, uint32_t R, uint32_t RP)
{
    uint32_t w = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    uint32_t g = w / RP, r = w % RP;
    if (g >= hkv || r >= R)
        return; /* whole warps leave together: w is uniform across the warp */
    float M = -INFINITY;
    for (uint32_t c = lane; c < chunks; c += 32)
        M = fmaxf(M, pm[((size_t)g * chunks + c) * RP + r]);
    for (int o = 16; o; o >>= 1)
        M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    double L = 0.0;
    for (uint32_t c = lane; c < chunks; c += 32) {
        size_t at = ((size_t)g * chunks + c) * RP + r;
        if (pl[at] > 0.0f)
            L += (double)pl[at] * exp((double)pm[at] - M);
    }
    for (int o = 16; o; o >>= 1)
        L += __shfl_xor_sync(0xffffffffu, L, o);
    if (lane == 0) {
        rowM[g * RP + r] = M;
        rowLnL[g * RP + r] = (float)log(L);
    }
}

static uint32_t div_up(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

int score_merge(const float *m, const float *l, float *rowM, float *rowLnL, uint32_t hkv,
                uint32_t chunks, uint32_t R, uint32_t RP, void *stream)
{
    merge<<<div_up((uint64_t)hkv * RP * 32, 256), 256, 0, (cudaStream_t)stream>>>(m, l, rowM, rowLnL, hkv,
                                                                                  chunks, R, RP);
    CK(cudaGetLastError());
    return 0;
}

/* raising a kernel's dynamic shared-memory limit: the attribute is per device (caked may
 * drive several GPUs) and caked's workers launch from several threads */
static std::mutex attr_mu;
score_attr_lock::score_attr_lock() { attr_mu.lock(); }
score_attr_lock::~score_attr_lock() { attr_mu.unlock(); }

template <typename T>
__global__ void __launch_bounds__(THREADS) pass2(params p)
{
    extern __shared__ __align__(16) uint8_t smem[];
    T *qs = (T *)smem;
    T *kb = qs + (size_t)p.RP * (p.d + PAD); /* two K tiles: double buffered */
    float *zs = (float *)(kb + (size_t)2 * TN * (p.d + PAD));
    float *i0 = zs + (size_t)p.RP * LDZ; // [G][TN]
    __shared__ double red_e[THREADS], red_v[THREADS];
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk;
    uint32_t c1 = min(c0 + p.chunk, p.S);
    load_q(p, g, qs);
    __syncthreads();
    afrag<T> af;
    load_afrag(p, qs, af);
    const float *M = p.rowM + g * p.RP, *LL = p.rowLnL + g * p.RP;
    double e_sum = 0.0, v_sum = 0.0;
    if (c0 < c1)
        load_k_async(p, g, c0, c1, kb);
    for (uint32_t j0 = c0, t = 0; j0 < c1; j0 += TN, t++) {
        T *ks = next_tile(p, g, j0, c1, kb, t);
        tile_gemm(p, af, ks, zs);
        __syncthreads();
        // one (head, column) pair per thread and step: probabilities, then mean and var
        for (uint32_t x = threadIdx.x; x < p.G * TN; x += blockDim.x) {
            uint32_t h = x / TN, c = x % TN;
            if (j0 + c >= c1) {
                i0[x] = 0.0f;
                continue;
            }
            float s = 0.0f, e = 0.0f;
            for (uint32_t i = 0; i < p.nq; i++) {
                uint32_t r = h * p.nq + i;
                float xx = zs[r * LDZ + c] * p.scale - M[r];
                float pr = __expf(xx - LL[r]);
                e -= pr * (xx - LL[r]);
                zs[r * LDZ + c] = pr;
                s += pr;
            }
            float mean = s / p.nq, var = 0.0f;
            if (p.nq > 1) {
                for (uint32_t i = 0; i < p.nq; i++) {
                    float dl = zs[(h * p.nq + i) * LDZ + c] - mean;
                    var += dl * dl;
                }
                var /= (p.nq - 1);
            }
            i0[x] = mean + p.gamma * var;
            e_sum += e, v_sum += var;
        }
        __syncthreads();
        for (uint32_t c = threadIdx.x; c < TN; c += blockDim.x) {
            if (j0 + c >= c1)
                continue;
            float a = 0.0f;
            for (uint32_t h = 0; h < p.G; h++)
                a += i0[h * TN + c];
            p.acc[(size_t)g * p.S + j0 + c] = a;
        }
    }
    red_e[threadIdx.x] = e_sum, red_v[threadIdx.x] = v_sum;
    __syncthreads();
    for (int o = THREADS / 2; o; o >>= 1) {
        if (threadIdx.x < o)
            red_e[threadIdx.x] += red_e[threadIdx.x + o], red_v[threadIdx.x] += red_v[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        size_t b = (size_t)g * gridDim.x + blockIdx.x;
        p.ent[b] = red_e[0], p.var[b] = red_v[0];
    }
}

// ind[g][j] = (acc[j-2] + ... + acc[j+2]) / 5 / G, zero padded.
__global__ void pool5(const float *acc, float *ind, uint32_t S, uint32_t hkv, float post)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)hkv * S)
        return;
    uint32_t g = x / S, j = x % S;
    const float *a = acc + (size_t)g * S;
    float s = a[j];
    if (j >= 1) s += a[j - 1];
    if (j >= 2) s += a[j - 2];
    if (j + 1 < S) s += a[j + 1];
    if (j + 2 < S) s += a[j + 2];
    ind[x] = s / 5.0f * post;
}

// Columns per block: long prompts get long chunks (Q is staged once per block), short ones
// enough blocks to fill the chip.
static uint32_t chunk_cols(uint32_t n, uint32_t hkv)
{
    uint32_t c = div_up(div_up((uint64_t)n * hkv, TARGET_BLOCKS), CHUNK_ALIGN) * CHUNK_ALIGN;
    return c < MIN_CHUNK ? MIN_CHUNK : c;
}

struct ws_layout {
    size_t m, l, rowM, rowLnL, acc, ent, var, total;
};

static ws_layout layout_ws(uint32_t hkv, uint32_t RP, uint32_t n, uint32_t S)
{
    ws_layout w;
    uint32_t ch = chunk_cols(n, hkv), ch1 = div_up(n, ch), ch2 = div_up(S ? S : 1, ch);
    size_t o = 0;
    auto take = [&](size_t bytes) { size_t at = o; o += (bytes + 255) & ~(size_t)255; return at; };
    w.m = take(sizeof(float) * hkv * ch1 * RP);
    w.l = take(sizeof(float) * hkv * ch1 * RP);
    w.rowM = take(sizeof(float) * hkv * RP);
    w.rowLnL = take(sizeof(float) * hkv * RP);
    w.acc = take(sizeof(float) * hkv * (size_t)(S ? S : 1));
    w.ent = take(sizeof(double) * hkv * ch2);
    w.var = take(sizeof(double) * hkv * ch2);
    w.total = o;
    return w;
}

extern "C" size_t kern_cuda_score_workspace(uint32_t hkv, uint32_t q_heads, uint32_t n_q,
                                            uint32_t n, uint32_t S)
{
    uint32_t R = q_heads / hkv * n_q, RP = (R + 15) / 16 * 16;
    uint32_t mr = hkv ? score_mma_rows(q_heads / hkv, n_q, 128) : 0; /* padding: same for d = 64 */
    return layout_ws(hkv, RP > mr ? RP : mr, n, S).total;
}

static std::atomic<int> force_wmma;

extern "C" int kern_cuda_score_set_wmma(int on) { return force_wmma.exchange(on ? 1 : 0); }

template <typename T>
static int launch(params &p, cudaStream_t st)
{
    size_t tiles = (size_t)(p.RP + 2 * TN) * (p.d + PAD) * 2 + (size_t)p.RP * LDZ * 4;
    size_t sm1 = tiles + 2 * p.RP * 4, sm2 = tiles + (size_t)p.G * TN * 4;
    static size_t set1[SCORE_MAX_DEV], set2[SCORE_MAX_DEV];
    int dev = 0;
    CK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= SCORE_MAX_DEV)
        return -EINVAL;
    {
        score_attr_lock lock;
        if (sm1 > set1[dev]) {
            CK(cudaFuncSetAttribute(pass1<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm1));
            set1[dev] = sm1;
        }
        if (sm2 > set2[dev]) {
            CK(cudaFuncSetAttribute(pass2<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm2));
            set2[dev] = sm2;
        }
    }
    pass1<T><<<dim3(p.chunks, p.hkv), THREADS, sm1, st>>>(p);
    CK(cudaGetLastError());
    int rc = score_merge(p.m, p.l, p.rowM, p.rowLnL, p.hkv, p.chunks, p.R, p.RP, st);
    if (rc)
        return rc;
    uint32_t ch2 = div_up(p.S, p.chunk);
    pass2<T><<<dim3(ch2, p.hkv), THREADS, sm2, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}

extern "C" int kern_cuda_score_layer(const struct kern_cuda_kv *kv, const void *q, uint32_t q_heads,
                                     uint32_t n_q, uint32_t S, float gamma, float *ind,
                                     double *entropy, double *variance, void *ws, size_t ws_bytes,
                                     void *stream)
{
    if (!kv || !q || kv->kv_heads == 0 || q_heads % kv->kv_heads || n_q == 0 ||
        kv->head_dim % 16 || kv->head_dim > MAX_D || n_q > kv->n_tokens ||
        S > kv->n_tokens - n_q || (kv->dtype != KERN_BF16 && kv->dtype != KERN_F16))
        return -EINVAL;
    params p = {};
    p.G = q_heads / kv->kv_heads, p.nq = n_q, p.R = p.G * n_q, p.RP = (p.R + 15) / 16 * 16;
    if (p.RP > MAX_R)
        return -EINVAL;
    p.base = kv->base, p.page_off = kv->page_off, p.tpp = kv->tokens_per_page, p.n = kv->n_tokens;
    p.d = kv->head_dim, p.S = S, p.hkv = kv->kv_heads, p.chunk = chunk_cols(p.n, p.hkv);
    p.chunks = div_up(p.n, p.chunk);
    p.scale = 1.0f / sqrtf((float)p.d), p.gamma = gamma, p.q = q;
    ws_layout w = layout_ws(p.hkv, p.RP, p.n, S);
    if (ws_bytes < w.total)
        return -EINVAL;
    uint8_t *b = (uint8_t *)ws;
    p.m = (float *)(b + w.m), p.l = (float *)(b + w.l), p.rowM = (float *)(b + w.rowM);
    p.rowLnL = (float *)(b + w.rowLnL), p.acc = (float *)(b + w.acc);
    p.ent = (double *)(b + w.ent), p.var = (double *)(b + w.var);
    cudaStream_t st = (cudaStream_t)stream;
    if (S == 0) {
        if (entropy) *entropy = 0;
        if (variance) *variance = 0;
        return 0;
    }
    uint32_t mrows = force_wmma.load() ? 0 : score_mma_rows(p.G, n_q, p.d);
    int rc;
    if (mrows) { /* the mma.sync passes: their own (padded) row layout in the same workspace */
        score_mma_args a = {};
        a.base = p.base, a.page_off = p.page_off, a.tpp = p.tpp, a.n = p.n, a.d = p.d, a.G = p.G;
        a.nq = n_q, a.S = S, a.hkv = p.hkv, a.chunk = p.chunk, a.chunks1 = p.chunks;
        a.chunks2 = div_up(S, p.chunk), a.gamma = gamma, a.bf16 = kv->dtype == KERN_BF16;
        a.q = q, a.acc = p.acc, a.ent = p.ent, a.var = p.var, a.stream = stream;
        ws_layout wm = layout_ws(p.hkv, mrows, p.n, S);
        if (ws_bytes < wm.total)
            return -EINVAL;
        a.m = (float *)(b + wm.m), a.l = (float *)(b + wm.l), a.rowM = (float *)(b + wm.rowM);
        a.rowLnL = (float *)(b + wm.rowLnL), a.acc = (float *)(b + wm.acc);
        a.ent = (double *)(b + wm.ent), a.var = (double *)(b + wm.var);
        CK(cudaGetDevice(&a.dev));
        rc = score_mma_run(a);
        p.acc = a.acc, p.ent = a.ent, p.var = a.var, p.chunk = a.chunk; /* the blocks it ran */
    } else {
        rc = kv->dtype == KERN_BF16 ? launch<__nv_bfloat16>(p, st) : launch<__half>(p, st);
    }
    if (rc)
        return rc;
    pool5<<<div_up((size_t)p.hkv * S, 256), 256, 0, st>>>(p.acc, ind, S, p.hkv, 1.0f / p.G);
    CK(cudaGetLastError());
    if (entropy || variance) {
        uint32_t nb = p.hkv * div_up(S, p.chunk);
        double *he = (double *)malloc(sizeof(double) * nb * 2);
        if (!he)
            return -EIO;
        CK(cudaMemcpyAsync(he, p.ent, sizeof(double) * nb, cudaMemcpyDeviceToHost, st));
        CK(cudaMemcpyAsync(he + nb, p.var, sizeof(double) * nb, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        double E = 0, V = 0;
        for (uint32_t i = 0; i < nb; i++)
            E += he[i], V += he[nb + i];
        free(he);
        if (entropy) *entropy = E;
        if (variance) *variance = V;
    }
    return 0;
}

// ---- top-k ---------------------------------------------------------------

#define TK_THREADS 1024

__device__ __forceinline__ uint32_t sort_key(float f)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(TK_THREADS) topk_rows(const float *score, uint32_t n, uint32_t k,
                                                        uint32_t *idx)
{
    const float *s = score + (size_t)blockIdx.x * n;
    uint32_t *out = idx + (size_t)blockIdx.x * k;
    __shared__ uint32_t hist[2048];
    __shared__ uint32_t sh_prefix, sh_mask, sh_need;
    typedef cub::BlockScan<uint32_t, TK_THREADS> pick_scan_t;
    __shared__ typename pick_scan_t::TempStorage pick_tmp;
    if (threadIdx.x == 0)
        sh_prefix = 0, sh_mask = 0, sh_need = k;
    const int shift[3] = {21, 10, 0};
    const uint32_t width[3] = {11, 11, 10};
    for (int pass = 0; pass < 3; pass++) {
        uint32_t nb = 1u << width[pass];
        for (uint32_t b = threadIdx.x; b < nb; b += blockDim.x)
            hist[b] = 0;
        __syncthreads();
        uint32_t prefix = sh_prefix, mask = sh_mask;
        /* scores crowd into a few buckets: lanes of a warp with the same bucket add once
         * (warp-aggregated atomics), or the shared-memory atomics queue up */
        uint32_t lane = threadIdx.x % 32;
        for (uint32_t j0 = threadIdx.x - lane; j0 < n; j0 += blockDim.x) {
            uint32_t j = j0 + lane, bin = 0xffffffffu;
            if (j < n) {
                uint32_t key = sort_key(s[j]);
                if ((key & mask) == prefix)
                    bin = (key >> shift[pass]) & (nb - 1);
            }
            uint32_t peers = __match_any_sync(0xffffffffu, bin);
            if (bin != 0xffffffffu && lane == (uint32_t)(__ffs(peers) - 1))
                atomicAdd(&hist[bin], (uint32_t)__popc(peers));
        }
        __syncthreads();
        /* the bucket holding the need-th largest key: counts from the top bucket down, summed
         * by a block scan (thread 0 walking 2048 buckets alone took most of the launch) */
        uint32_t need = sh_need, x[2], cum[2];
        for (int i = 0; i < 2; i++) {
            uint32_t r = threadIdx.x * 2 + i;
            x[i] = r < nb ? hist[nb - 1 - r] : 0;
        }
        pick_scan_t(pick_tmp).InclusiveSum(x, cum);
        for (int i = 0; i < 2; i++) {
            uint32_t r = threadIdx.x * 2 + i;
            if (r < nb && cum[i] >= need && cum[i] - x[i] < need) { /* exactly one thread */
                sh_need = need - (cum[i] - x[i]);
                sh_prefix = prefix | ((nb - 1 - r) << shift[pass]);
                sh_mask = mask | ((nb - 1) << shift[pass]);
            }
        }
        __syncthreads();
    }
    // emit in positional order: each thread a contiguous segment, block scans for offsets
    uint32_t thr = sh_prefix, need = sh_need;
    uint32_t seg = (n + blockDim.x - 1) / blockDim.x, a = threadIdx.x * seg, e = min(a + seg, n);
    uint32_t gt = 0, eq = 0;
    for (uint32_t j = a; j < e; j++) {
        uint32_t key = sort_key(s[j]);
        gt += key > thr, eq += key == thr;
    }
    typedef cub::BlockScan<uint32_t, TK_THREADS> scan_t;
    __shared__ typename scan_t::TempStorage tmp;
    uint32_t eq_before;
    scan_t(tmp).ExclusiveSum(eq, eq_before);
    __syncthreads();
    uint32_t take = eq_before >= need ? 0 : min(eq, need - eq_before);
    uint32_t mine = gt + take, off;
    scan_t(tmp).ExclusiveSum(mine, off);
    for (uint32_t j = a; j < e && mine; j++) {
        uint32_t key = sort_key(s[j]);
        if (key > thr || (key == thr && take && take--))
            out[off++] = j, mine--;
    }
}

extern "C" int kern_cuda_topk(const float *score, uint32_t rows, uint32_t n, uint32_t k, uint32_t *idx,
                              void *stream)
{
    if (k > n)
        return -EINVAL;
    if (!k || !rows)
        return 0;
    topk_rows<<<rows, TK_THREADS, 0, (cudaStream_t)stream>>>(score, n, k, idx);
    CK(cudaGetLastError());
    return 0;
}

// ---- compaction -----------------------------------------------------------

struct cparams {
    uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, d, hkv, k, win_start, win_len;
    size_t voff, row;
    const uint32_t *keep;
    uint8_t *tmp;
};

__device__ __forceinline__ uint8_t *row_at(const cparams &p, uint32_t g, uint32_t t)
{
    return p.base + p.page_off[t / p.tpp] + ((size_t)g * p.tpp + t % p.tpp) * p.row;
}

// tmp[g][i] <- K/V of the i-th kept token (gather), 16 bytes per thread
__global__ void gather(cparams p)
{
    uint32_t rows = p.k + p.win_len, vec = (uint32_t)(p.row / 16);
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)p.hkv * rows * vec;
    if (x >= total)
        return;
    uint32_t v = x % vec, i = (x / vec) % rows, g = x / vec / rows;
    uint32_t src = i < p.k ? p.keep[(size_t)g * p.k + i] : p.win_start + (i - p.k);
    const uint8_t *s = row_at(p, g, src);
    uint8_t *t = p.tmp + ((size_t)g * rows + i) * p.row * 2;
    ((uint4 *)t)[v] = ((const uint4 *)s)[v];
    ((uint4 *)(t + p.row))[v] = ((const uint4 *)(s + p.voff))[v];
}

__global__ void scatter(cparams p)
{
    uint32_t rows = p.k + p.win_len, vec = (uint32_t)(p.row / 16);
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)p.hkv * rows * vec;
    if (x >= total)
        return;
    uint32_t v = x % vec, i = (x / vec) % rows, g = x / vec / rows;
    uint8_t *d = row_at(p, g, i);
    const uint8_t *t = p.tmp + ((size_t)g * rows + i) * p.row * 2;
    ((uint4 *)d)[v] = ((const uint4 *)t)[v];
    ((uint4 *)(d + p.voff))[v] = ((const uint4 *)(t + p.row))[v];
}

extern "C" int kern_cuda_compact(const struct kern_cuda_kv *kv, const uint32_t *keep, uint32_t k,
                                 uint32_t win_start, uint32_t win_len, void *tmp, void *stream)
{
    size_t row = (size_t)kv->head_dim * 2;
    if (row % 16 || win_start + win_len > kv->n_tokens || k > win_start)
        return -EINVAL;
    cparams p = {kv->base, kv->page_off, kv->tokens_per_page, kv->head_dim, kv->kv_heads, k,
                 win_start, win_len, kv->v_offset_bytes, row, keep, (uint8_t *)tmp};
    size_t total = (size_t)kv->kv_heads * (k + win_len) * (row / 16);
    if (!total)
        return 0;
    cudaStream_t st = (cudaStream_t)stream;
    gather<<<div_up(total, 256), 256, 0, st>>>(p);
    CK(cudaGetLastError());
    scatter<<<div_up(total, 256), 256, 0, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}

// ---- a score vector following its tokens ------------------------------------

__global__ void gather_rows_f32(const float *in, uint32_t n_in, const uint32_t *keep, uint32_t k,
                                uint32_t rows, float *out)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)rows * k)
        return;
    uint32_t r = (uint32_t)(x / k);
    out[x] = in[(size_t)r * n_in + keep[x]];
}

extern "C" int kern_cuda_gather_rows_f32(const float *in, uint32_t rows, uint32_t n_in,
                                         const uint32_t *keep, uint32_t k, float *out,
                                         void *stream)
{
    if (k > n_in)
        return -EINVAL;
    size_t total = (size_t)rows * k;
    if (!total)
        return 0;
    gather_rows_f32<<<div_up(total, 256), 256, 0, (cudaStream_t)stream>>>(in, n_in, keep, k, rows,
                                                                          out);
    CK(cudaGetLastError());
    return 0;
}

// ---- top-k over many blocks per row -----------------------------------------
//
// topk_rows gives a row one block: 8 rows of 32K keep 8 SMs busy. Here every row is cut into
// segments of TKM_SEG keys, one block each: three histogram passes (a block's shared histogram,
// added to the row's global one; then one warp per row picks the bucket), a count of each
// segment's keys above / at the threshold, and the emit, each block at the offset the counts of
// the segments before it give. Same result as topk_rows (positions ascending, ties to the lower
// position).

#define TKM_THREADS 256
#define TKM_SEG 4096

struct tkm_state {
    uint32_t prefix, mask, need;
};

__global__ void __launch_bounds__(TKM_THREADS)
tkm_hist(const float *score, uint32_t n, const tkm_state *st, uint32_t *ghist, int pass)
{
    const int shift[3] = {21, 10, 0};
    const uint32_t width[3] = {11, 11, 10};
    uint32_t row = blockIdx.y, nb = 1u << width[pass];
    __shared__ uint32_t hist[2048];
    for (uint32_t b = threadIdx.x; b < nb; b += blockDim.x)
        hist[b] = 0;
    __syncthreads();
    const float *s = score + (size_t)row * n;
    uint32_t prefix = st[row].prefix, mask = st[row].mask, lane = threadIdx.x % 32;
    uint32_t a = blockIdx.x * TKM_SEG, e = min(a + TKM_SEG, n);
    for (uint32_t j0 = a + threadIdx.x - lane; j0 < e; j0 += blockDim.x) {
        uint32_t j = j0 + lane, bin = 0xffffffffu;
        if (j < e) {
            uint32_t key = sort_key(s[j]);
            if ((key & mask) == prefix)
                bin = (key >> shift[pass]) & (nb - 1);
        }
        uint32_t peers = __match_any_sync(0xffffffffu, bin);
        if (bin != 0xffffffffu && lane == (uint32_t)(__ffs(peers) - 1))
            atomicAdd(&hist[bin], (uint32_t)__popc(peers));
    }
    __syncthreads();
    uint32_t *g = ghist + (size_t)row * 2048;
    for (uint32_t b = threadIdx.x; b < nb; b += blockDim.x)
        if (hist[b])
            atomicAdd(&g[b], hist[b]);
}

// One warp per row: the bucket holding the need-th largest key, from the top; then the
// histogram is cleared for the next pass.
__global__ void tkm_pick(tkm_state *st, uint32_t *ghist, uint32_t rows, int pass)
{
    const int shift[3] = {21, 10, 0};
    const uint32_t width[3] = {11, 11, 10};
    uint32_t row = blockIdx.x, lane = threadIdx.x;
    if (row >= rows)
        return;
    uint32_t nb = 1u << width[pass], per = nb / 32;
    uint32_t *h = ghist + (size_t)row * 2048;
    uint32_t hi = nb - lane * per; /* lane owns bins [hi - per, hi): lane 0 the top */
    uint32_t mine = 0;
    for (uint32_t b = hi - per; b < hi; b++)
        mine += h[b];
    uint32_t incl = mine; /* keys in lanes 0..lane (the top down to this lane's bins) */
    for (int o = 1; o < 32; o <<= 1) {
        uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= (uint32_t)o)
            incl += v;
    }
    uint32_t need = st[row].need, excl = incl - mine;
    uint32_t hit = __ballot_sync(0xffffffffu, incl >= need && excl < need);
    uint32_t owner = hit ? (uint32_t)(__ffs(hit) - 1) : 31;
    if (lane == owner) {
        uint32_t left = need - excl, b = hi;
        while (b-- > hi - per) {
            if (h[b] >= left)
                break;
            left -= h[b];
        }
        st[row].need = left;
        st[row].prefix |= b << shift[pass];
        st[row].mask |= (nb - 1) << shift[pass];
    }
    __syncwarp();
    for (uint32_t b = hi - per; b < hi; b++)
        h[b] = 0;
}

// Keys above the threshold and equal to it, per segment: cnt[row][seg] = {gt, eq}.
__global__ void __launch_bounds__(TKM_THREADS)
tkm_count(const float *score, uint32_t n, const tkm_state *st, uint2 *cnt, uint32_t segs)
{
    uint32_t row = blockIdx.y, thr = st[row].prefix;
    const float *s = score + (size_t)row * n;
    uint32_t a = blockIdx.x * TKM_SEG, e = min(a + TKM_SEG, n), gt = 0, eq = 0;
    for (uint32_t j = a + threadIdx.x; j < e; j += blockDim.x) {
        uint32_t key = sort_key(s[j]);
        gt += key > thr, eq += key == thr;
    }
    typedef cub::BlockReduce<uint32_t, TKM_THREADS> red_t;
    __shared__ typename red_t::TempStorage t1, t2;
    uint32_t G = red_t(t1).Sum(gt), E = red_t(t2).Sum(eq);
    if (threadIdx.x == 0)
        cnt[(size_t)row * segs + blockIdx.x] = make_uint2(G, E);
}

__global__ void __launch_bounds__(TKM_THREADS)
tkm_emit(const float *score, uint32_t n, uint32_t k, const tkm_state *st, const uint2 *cnt,
         uint32_t segs, uint32_t *idx)
{
    uint32_t row = blockIdx.y, thr = st[row].prefix, need = st[row].need;
    const float *s = score + (size_t)row * n;
    uint32_t *out = idx + (size_t)row * k;
    __shared__ uint32_t sh_off, sh_take;
    if (threadIdx.x == 0) { /* where this segment's winners go, and how many ties it takes */
        uint32_t off = 0, eq_before = 0;
        for (uint32_t b = 0; b < blockIdx.x; b++) {
            uint2 c = cnt[(size_t)row * segs + b];
            uint32_t t = eq_before >= need ? 0 : min(c.y, need - eq_before);
            off += c.x + t, eq_before += c.y;
        }
        uint2 c = cnt[(size_t)row * segs + blockIdx.x];
        sh_off = off;
        sh_take = eq_before >= need ? 0 : min(c.y, need - eq_before);
    }
    __syncthreads();
    /* inside the segment: each thread a contiguous run, a block scan for offsets */
    uint32_t a0 = blockIdx.x * TKM_SEG, e0 = min(a0 + TKM_SEG, n);
    uint32_t seg = (e0 - a0 + blockDim.x - 1) / blockDim.x, a = a0 + threadIdx.x * seg;
    uint32_t e = min(a + seg, e0), gt = 0, eq = 0;
    for (uint32_t j = a; j < e; j++) {
        uint32_t key = sort_key(s[j]);
        gt += key > thr, eq += key == thr;
    }
    typedef cub::BlockScan<uint32_t, TKM_THREADS> scan_t;
    __shared__ typename scan_t::TempStorage tmp;
    uint32_t eq_before;
    scan_t(tmp).ExclusiveSum(eq, eq_before);
    __syncthreads();
    uint32_t take = eq_before >= sh_take ? 0 : min(eq, sh_take - eq_before);
    uint32_t mine = gt + take, off;
    scan_t(tmp).ExclusiveSum(mine, off);
    off += sh_off;
    for (uint32_t j = a; j < e && mine; j++) {
        uint32_t key = sort_key(s[j]);
        if (key > thr || (key == thr && take && take--))
            out[off++] = j, mine--;
    }
}

__global__ void tkm_set_need(tkm_state *st, uint32_t rows, uint32_t k)
{
    uint32_t r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows)
        st[r].need = k;
}

extern "C" size_t kern_cuda_topk_workspace(uint32_t rows, uint32_t n)
{
    uint32_t segs = div_up(n ? n : 1, TKM_SEG);
    return (size_t)rows * (sizeof(tkm_state) + 2048 * sizeof(uint32_t) + segs * sizeof(uint2)) + 256;
}

extern "C" int kern_cuda_topk_ws(const float *score, uint32_t rows, uint32_t n, uint32_t k,
                                 uint32_t *idx, void *ws, size_t ws_bytes, void *stream)
{
    if (k > n)
        return -EINVAL;
    if (!k || !rows)
        return 0;
    if (n <= TKM_SEG || !ws || ws_bytes < kern_cuda_topk_workspace(rows, n))
        return kern_cuda_topk(score, rows, n, k, idx, stream); /* one block per row is enough */
    cudaStream_t st = (cudaStream_t)stream;
    uint32_t segs = div_up(n, TKM_SEG);
    uint32_t *hist = (uint32_t *)ws;
    tkm_state *state = (tkm_state *)(hist + (size_t)rows * 2048);
    uint2 *cnt = (uint2 *)(((uintptr_t)(state + rows) + 15) & ~(uintptr_t)15);
    CK(cudaMemsetAsync(hist, 0, sizeof(uint32_t) * rows * 2048, st));
    CK(cudaMemsetAsync(state, 0, sizeof(tkm_state) * rows, st));
    tkm_set_need<<<div_up(rows, 128), 128, 0, st>>>(state, rows, k);
    CK(cudaGetLastError());
    for (int pass = 0; pass < 3; pass++) {
        tkm_hist<<<dim3(segs, rows), TKM_THREADS, 0, st>>>(score, n, state, hist, pass);
        CK(cudaGetLastError());
        tkm_pick<<<rows, 32, 0, st>>>(state, hist, rows, pass);
        CK(cudaGetLastError());
    }
    tkm_count<<<dim3(segs, rows), TKM_THREADS, 0, st>>>(score, n, state, cnt, segs);
    CK(cudaGetLastError());
    tkm_emit<<<dim3(segs, rows), TKM_THREADS, 0, st>>>(score, n, k, state, cnt, segs, idx);
    CK(cudaGetLastError());
    return 0;
}
