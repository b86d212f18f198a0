// score.cu - CAKE's window scoring on the GPU (see kern_cuda.h); top-k and the gather of
// a score vector are in select.cu, compaction in compact.cu.
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

#include "dtype.h"
#include "kern.h"
#include "kern_cuda.h"
#include "cuda_internal.h"
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



struct params {
    const uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, n, d, G, nq, R, RP, S, hkv, chunks, chunk; /* chunk: columns per block */
    float scale, mw, gamma; // the indicator: mw * mean + gamma * var
    const void *q;
    float *m, *l;          // pass 1 partials [hkv][chunks][RP]
    float *rowM, *rowLnL;  // merged [hkv][RP]
    float *acc;            // raw group sums [hkv][S]
    double *ent, *var;     // per pass-2 block
    const float *lse;      // the engine's row log-sum-exps [q_heads][nq], or NULL
};

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

int score_merge(const float *m, const float *l, float *rowM, float *rowLnL, uint32_t hkv,
                uint32_t chunks, uint32_t R, uint32_t RP, void *stream)
{
    merge<<<div_up((uint64_t)hkv * RP * 32, 256), 256, 0, (cudaStream_t)stream>>>(m, l, rowM, rowLnL, hkv,
                                                                                  chunks, R, RP);
    CK(cudaGetLastError());
    return 0;
}

// The engine's log-sum-exp of each window row as the merged (max, log-normalizer) pair the
// second pass reads: max = lse, ln l = 0. Row c of kv head g is query head g * G + c / nqp,
// window row c % nqp (padding rows get 0: no probability is taken from them).
__global__ void lse_rows(const float *lse, float *rowM, float *rowLnL, uint32_t hkv, uint32_t G,
                         uint32_t nq, uint32_t nqp, uint32_t RP)
{
    uint32_t x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= hkv * RP)
        return;
    uint32_t g = x / RP, c = x % RP, h = c / nqp, i = c % nqp;
    rowM[x] = h < G && i < nq ? lse[((size_t)g * G + h) * nq + i] : 0.0f;
    rowLnL[x] = 0.0f;
}

int score_lse_rows(const float *lse, float *rowM, float *rowLnL, uint32_t hkv, uint32_t G,
                   uint32_t nq, uint32_t nqp, uint32_t RP, void *stream)
{
    lse_rows<<<div_up((uint64_t)hkv * RP, 256), 256, 0, (cudaStream_t)stream>>>(lse, rowM, rowLnL, hkv,
                                                                               G, nq, nqp, RP);
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
            i0[x] = p.mw * mean + p.gamma * var;
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

// ind[g][j] = the pooled group sum (pool_value: kern.h's kern_pool over [j - r, j + r]) * post
// (the group mean).
__global__ void pool_rows(const float *acc, float *ind, uint32_t S, uint32_t hkv, float post,
                          int kind, uint32_t r)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    pdl_wait(); // the scoring pass's sums (launched programmatically after it)
    pdl_trigger();
    if (x >= (size_t)hkv * S)
        return;
    uint32_t g = x / S, j = x % S;
    ind[x] = pool_value(acc + (size_t)g * S, S, j, kind, r) * post;
}

// One ranking for every row (TOVA): each column's mean over the rows, in double as the C
// reference (indicator.c) takes it.
__global__ void rows_mean(float *ind, uint32_t rows, uint32_t n)
{
    size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n)
        return;
    double m = 0.0;
    for (uint32_t g = 0; g < rows; g++)
        m += ind[(size_t)g * n + j];
    float v = (float)(m / rows);
    for (uint32_t g = 0; g < rows; g++)
        ind[(size_t)g * n + j] = v;
}

// StreamingLLM: the first `sinks` positions, then the most recent.
__global__ void position_ind(float *ind, uint32_t rows, uint32_t n, uint32_t sinks)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)rows * n)
        return;
    uint32_t j = x % n;
    ind[x] = j < sinks ? 3.402823466e38f : (float)j;
}

__global__ void accumulate(float *dst, const float *src, size_t n, float scale, int first)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x < n)
        dst[x] = (first ? 0.0f : dst[x]) + src[x] * scale;
}

extern "C" int kern_cuda_accumulate(float *dst, const float *src, size_t n, float scale, int first,
                                    void *stream)
{
    if (!dst || !src)
        return -EINVAL;
    if (n)
        accumulate<<<div_up(n, 256), 256, 0, (cudaStream_t)stream>>>(dst, src, n, scale, first);
    CK(cudaGetLastError());
    return 0;
}

extern "C" int kern_cuda_rows_mean(float *ind, uint32_t rows, uint32_t n, void *stream)
{
    if (!ind || !rows)
        return -EINVAL;
    if (n && rows > 1)
        rows_mean<<<div_up(n, 256), 256, 0, (cudaStream_t)stream>>>(ind, rows, n);
    CK(cudaGetLastError());
    return 0;
}

extern "C" int kern_cuda_position_indicator(float *ind, uint32_t rows, uint32_t n, uint32_t sinks,
                                            void *stream)
{
    if (!ind || !rows)
        return -EINVAL;
    if (n)
        position_ind<<<div_up((size_t)rows * n, 256), 256, 0, (cudaStream_t)stream>>>(ind, rows, n,
                                                                                     sinks);
    CK(cudaGetLastError());
    return 0;
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

extern "C" size_t kern_cuda_score_pool_workspace(uint32_t hkv, uint32_t q_heads, uint32_t n_q,
                                                 uint32_t n, uint32_t S, int pool)
{
    size_t w = kern_cuda_score_workspace(hkv, q_heads, n_q, n, S);
    if (pool != KERN_POOL_MAX || !hkv || q_heads <= hkv)
        return w;
    /* one query head of every group at a time: its workspace, its rows, its pooled scores */
    size_t base = (kern_cuda_score_workspace(hkv, hkv, n_q, n, S) + 255) & ~(size_t)255;
    size_t qb = ((size_t)hkv * n_q * MAX_D * 2 + 255) & ~(size_t)255;
    size_t m = base + qb + ((sizeof(float) * hkv * S + 255) & ~(size_t)255) + sizeof(float) * hkv * n_q;
    return m > w ? m : w;
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
    int rc;
    if (p.lse) { /* the engine's normalizers: no first pass */
        rc = score_lse_rows(p.lse, p.rowM, p.rowLnL, p.hkv, p.G, p.nq, p.nq, p.RP, st);
    } else {
        pass1<T><<<dim3(p.chunks, p.hkv), THREADS, sm1, st>>>(p);
        CK(cudaGetLastError());
        rc = score_merge(p.m, p.l, p.rowM, p.rowLnL, p.hkv, p.chunks, p.R, p.RP, st);
    }
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
    return kern_cuda_score_layer_pool(kv, q, NULL, q_heads, n_q, S, gamma, 0, KERN_POOL_AVG, 2, ind,
                                      entropy, variance, ws, ws_bytes, stream);
}

/* The statistics' block sums ent[nb], var[nb] added up in order by one thread (the host's
 * order before: the same doubles), into out_e[0], out_v[0] - added to what they hold where
 * acc. out_e may be ent itself (read before written). */
__global__ void stats_sum(const double *ent, const double *var, uint32_t nb, double *out_e,
                          double *out_v, int acc)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double E = 0, V = 0;
    for (uint32_t i = 0; i < nb; i++)
        E += ent[i], V += var[i];
    *out_e = acc ? *out_e + E : E;
    *out_v = acc ? *out_v + V : V;
}

/* kern_cuda_score_layer_pool's body. The statistics (where asked) go to stats_dev[0..1] on
 * the device (added where acc), or where stats_dev is NULL and entropy / variance are not,
 * to the host after a wait. */
static int score_pool(const struct kern_cuda_kv *kv, const void *q, const float *lse,
                      uint32_t q_heads, uint32_t n_q, uint32_t S, float gamma, int var_only,
                      int pool, uint32_t radius, float *ind, double *entropy, double *variance,
                      double *stats_dev, int acc, void *ws, size_t ws_bytes, void *stream)
{
    if (pool < KERN_POOL_AVG || pool > KERN_POOL_NONE || radius > 1024)
        return -EINVAL;
    if (pool == KERN_POOL_MAX && kv && kv->kv_heads && q_heads > kv->kv_heads &&
        q_heads % kv->kv_heads == 0) {
        /* the reference pools each query head, then takes the group mean: the max does not
         * commute with the mean, so one query head of every group at a time ([kv_heads][n_q]
         * rows gathered from q), pooled, added up / G (the workspace's tail holds both) */
        uint32_t hkv = kv->kv_heads, G = q_heads / hkv;
        size_t row = (size_t)kv->head_dim * 2, base = kern_cuda_score_workspace(hkv, hkv, n_q, kv->n_tokens, S);
        base = (base + 255) & ~(size_t)255;
        size_t qb = ((size_t)hkv * n_q * row + 255) & ~(size_t)255;
        size_t pb = (sizeof(float) * hkv * S + 255) & ~(size_t)255;
        if (ws_bytes < base + qb + pb + sizeof(float) * hkv * n_q || !q || !ind)
            return -EINVAL;
        uint8_t *qi = (uint8_t *)ws + base;
        float *part = (float *)(qi + qb), *li = lse ? (float *)(qi + qb + pb) : NULL;
        cudaStream_t st = (cudaStream_t)stream;
        double e = 0, v = 0;
        int rc = 0;
        for (uint32_t i = 0; i < G && !rc; i++) {
            double ei = 0, vi = 0; /* (on the host; on the device stats_dev adds them up) */
            if (cudaMemcpy2DAsync(qi, n_q * row, (const uint8_t *)q + (size_t)i * n_q * row,
                                  (size_t)G * n_q * row, n_q * row, hkv, cudaMemcpyDeviceToDevice,
                                  st) != cudaSuccess)
                return -EIO;
            if (lse && cudaMemcpy2DAsync(li, n_q * 4, lse + (size_t)i * n_q, (size_t)G * n_q * 4,
                                         n_q * 4, hkv, cudaMemcpyDeviceToDevice, st) != cudaSuccess)
                return -EIO;
            rc = score_pool(kv, qi, li, hkv, n_q, S, gamma, var_only, pool, radius, part,
                            entropy ? &ei : NULL, variance ? &vi : NULL, stats_dev, acc || i > 0,
                            ws, base, stream);
            if (!rc)
                rc = kern_cuda_accumulate(ind, part, (size_t)hkv * S, 1.0f / G, i == 0, stream);
            e += ei, v += vi;
        }
        if (entropy)
            *entropy = e;
        if (variance)
            *variance = v;
        return rc;
    }
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
    p.scale = 1.0f / sqrtf((float)p.d), p.q = q, p.lse = lse;
    p.mw = var_only ? 0.0f : 1.0f, p.gamma = var_only ? 1.0f : gamma;
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
        if (stats_dev && !acc && cudaMemsetAsync(stats_dev, 0, 2 * sizeof(double), st) != cudaSuccess)
            return -EIO;
        return 0;
    }
    uint32_t mrows = force_wmma.load() ? 0 : score_mma_rows(p.G, n_q, p.d);
    int rc;
    if (mrows) { /* the mma.sync passes: their own (padded) row layout in the same workspace */
        score_mma_args a = {};
        a.base = p.base, a.page_off = p.page_off, a.tpp = p.tpp, a.n = p.n, a.d = p.d, a.G = p.G;
        a.nq = n_q, a.S = S, a.hkv = p.hkv, a.chunk = p.chunk, a.chunks1 = p.chunks;
        a.chunks2 = div_up(S, p.chunk), a.mw = p.mw, a.gamma = p.gamma, a.bf16 = kv->dtype == KERN_BF16;
        a.q = q, a.lse = lse, a.acc = p.acc, a.ent = p.ent, a.var = p.var, a.stream = stream;
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
    CK(launch_pdl(pool_rows, dim3(div_up((size_t)p.hkv * S, 256)), dim3(256), 0, st, 0, (const float *)p.acc, ind,
                  S, p.hkv, 1.0f / p.G, pool, radius));
    if (stats_dev || entropy || variance) { /* one sum, in place where the host takes it */
        uint32_t nb = p.hkv * div_up(S, p.chunk);
        double *oe = stats_dev ? stats_dev : p.ent, *ov = stats_dev ? stats_dev + 1 : p.var;
        stats_sum<<<1, 32, 0, st>>>(p.ent, p.var, nb, oe, ov, stats_dev ? acc : 0);
        CK(cudaGetLastError());
        if (!stats_dev) {
            double ev[2];
            CK(cudaMemcpyAsync(&ev[0], p.ent, sizeof(double), cudaMemcpyDeviceToHost, st));
            CK(cudaMemcpyAsync(&ev[1], p.var, sizeof(double), cudaMemcpyDeviceToHost, st));
            CK(cudaStreamSynchronize(st));
            if (entropy) *entropy = ev[0];
            if (variance) *variance = ev[1];
        }
    }
    return 0;
}

extern "C" int kern_cuda_score_layer_pool(const struct kern_cuda_kv *kv, const void *q,
                                          const float *lse, uint32_t q_heads, uint32_t n_q,
                                          uint32_t S, float gamma, int var_only,
                                          int pool, uint32_t radius, float *ind, double *entropy,
                                          double *variance, void *ws, size_t ws_bytes, void *stream)
{
    return score_pool(kv, q, lse, q_heads, n_q, S, gamma, var_only, pool, radius, ind, entropy,
                      variance, NULL, 0, ws, ws_bytes, stream);
}

extern "C" int kern_cuda_score_layer_pool_dev(const struct kern_cuda_kv *kv, const void *q,
                                              const float *lse, uint32_t q_heads, uint32_t n_q,
                                              uint32_t S, float gamma, int var_only, int pool,
                                              uint32_t radius, float *ind, double *stats_dev,
                                              int accumulate, void *ws, size_t ws_bytes,
                                              void *stream)
{
    return score_pool(kv, q, lse, q_heads, n_q, S, gamma, var_only, pool, radius, ind, NULL, NULL,
                      stats_dev, accumulate, ws, ws_bytes, stream);
}
