// attn.cu - paged decode attention over the compacted cache (see kern_cuda.h).
//
// Split-K: a block owns (split of tokens, kv head, layer or sequence); its AW warps each walk
// a contiguous run of the split; warps merge in shared memory and a second kernel merges the
// splits. Tokens a split holds follow the longest count (split_of), so short caches still
// fill the GPU with blocks and long ones keep the merge small. All layers of a sequence, or
// one layer of a batch, go in one launch. Two bodies:
// - on the tensor cores (head_dim 64 and 128; split_partial_tc, below): S = Q K^T and
//   O += P V by mma.sync over 16-token tiles staged by cp.async;
// - on CUDA cores (any head_dim of 32 to 256; split_partial): a tile's K and V rows loaded at
//   once (U rows of each in flight per warp: the loads, not the arithmetic, bound a decode
//   step), its U * GP partial dot products (GP: the GQA group padded to a power of two)
//   reduced across the warp by one reduce-scatter (31 shuffles for 32 sums, where reducing
//   each would take 5 apiece), the tile's probabilities through shared memory to every lane,
//   which adds them times its slice of V.
// Both keep the online softmax in base 2 (the scores carry log2(e) / sqrt(d)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <atomic>
#include <errno.h>
#include <stdio.h>

#include "dtype.h"
#include "kern_cuda.h"
#include "mma_dev.cuh"

using namespace cakeptx;

#define AW 4          // warps per block
#define MAXG 8        // query heads per kv head
#define LOG2E 1.4426950408889634f

// Tokens a block holds for a launch whose longest count is n: a multiple of AW * 8.
static uint32_t split_of(uint32_t n) { return n <= 2048 ? 128 : n <= 16384 ? 512 : 2048; }
static __host__ __device__ uint32_t div_up(uint32_t a, uint32_t b) { return (a + b - 1) / b; }
// The most splits any launch with counts up to n uses (its workspace).
static uint32_t splits_bound(uint32_t n)
{
    uint32_t a = div_up(n < 2048 ? n : 2048, 128), b = div_up(n < 16384 ? n : 16384, 512);
    uint32_t c = div_up(n, 2048), m = a > b ? a : b;
    m = m > c ? m : c;
    return m ? m : 1;
}

struct aparams {
    uint8_t *base;
    const uint64_t *const *page_offs;
    const uint32_t *ntok;
    uint32_t L, H, hkv, G, d, tpp, splits, split;
    size_t voff, row;
    const void *q;
    float *part; // [L][H][splits][d + 2]: acc, m (base 2), l
    float *out;
    float scale;
    const int32_t *holes; // [L][hkv][2]: each head's hole (first slot, count), or NULL
};

// A head's hole from a table of (first, count) pairs (NULL: none); a pair that is not a
// range of slots masks nothing.
__device__ __forceinline__ void hole_of(const int32_t *pair, uint32_t *first, uint32_t *n)
{
    *first = 0, *n = 0;
    if (pair && pair[0] >= 0 && pair[1] > 0)
        *first = (uint32_t)pair[0], *n = (uint32_t)pair[1];
}

// E consecutive 16-bit elements: one load.
template <int E> struct raw;
template <> struct raw<1> { unsigned short v; };
template <> struct raw<2> { unsigned int v; };
template <> struct raw<4> { uint2 v; };
template <> struct raw<8> { uint4 v; };

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T, int E> __device__ __forceinline__ float elem(const raw<E> &r, int e)
{
    return to_f(reinterpret_cast<const T *>(&r)[e]);
}

// Sums x[i] of every lane, scattered: the step over lanes `off` apart keeps the half of the
// sums the lane's bit selects, added to its partner's; lane L ends with sum L / (32 / V) in
// x[0] (partial over the lanes sharing it, which the caller adds up).
template <int V, int HALF> __device__ __forceinline__ void reduce_scatter(float (&x)[V], int lane)
{
    if constexpr (HALF >= 1) {
        constexpr int off = HALF * 32 / V;
        bool up = lane & off;
#pragma unroll
        for (int i = 0; i < HALF; i++) {
            float lo = x[i], hi = x[i + HALF];
            float send = up ? lo : hi, keep = up ? hi : lo;
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
        reduce_scatter<V, HALF / 2>(x, lane);
    }
}

// One block's share of split-K decode attention: the tokens [t0, t1) of kv head g but the
// hole_n from hole (Ada-KV's holes: slots that hold no token), its group's G query heads
// (qb: their rows, d apart; G <= GP), the K row of token t at page_at(t / tpp) + (t % tpp) *
// row and its V voff bytes after; `split` tokens a block (AW warps of split / AW). Writes each
// head's partial (acc[d], max in base 2, sum) to part_at(h).
template <typename T, int E, int GP, typename PageAt, typename PartAt>
__device__ __forceinline__ void split_partial(uint32_t t0, uint32_t t1, uint32_t split,
                                              uint32_t hole, uint32_t hole_n, const T *qb,
                                              uint32_t G, uint32_t d, float scale, uint32_t tpp,
                                              size_t row, size_t voff, PageAt page_at,
                                              PartAt part_at)
{
    constexpr int V = GP >= 4 ? 32 : 8 * GP; // (token, head) sums a tile reduces
    constexpr int U = V / GP;                // tokens a tile
    constexpr int R = V == 32 ? 0 : V == 16 ? 1 : V == 8 ? 2 : 3; // lanes sharing a sum: 2^R
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __shared__ float sm_m[AW][GP], sm_l[AW][GP], sm_acc[AW][GP][E * 32];
    __shared__ float sm_p[AW][V];
    float q[GP][E], m[GP], s[GP], acc[GP][E];
#pragma unroll
    for (int h = 0; h < GP; h++) {
        m[h] = -INFINITY, s[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            acc[h][e] = 0.0f;
            q[h][e] = h < (int)G ? to_f(qb[(size_t)h * d + lane * E + e]) * scale * LOG2E : 0.0f;
        }
    }
    const int idx = lane >> R, u_own = idx / GP, h_own = idx % GP;
    uint32_t per = split / AW, w0 = t0 + warp * per, w1 = min(w0 + per, t1);
    for (uint32_t tb = w0; tb < w1; tb += U) {
        uint32_t te = min(tb + U, w1);
        if (hole_n && tb >= hole && te - hole <= hole_n)
            continue; // the whole tile is a hole
        raw<E> kr[U], vr[U];
        uint32_t pi = tb / tpp, pr = tb - pi * tpp;
        const uint8_t *pg = page_at(pi);
#pragma unroll
        for (int u = 0; u < U; u++) {
            uint32_t t = tb + u;
            if (t < te && t - hole >= hole_n) {
                const uint8_t *k = pg + pr * row + (size_t)lane * E * 2;
                kr[u] = *reinterpret_cast<const raw<E> *>(k);
                vr[u] = *reinterpret_cast<const raw<E> *>(k + voff);
            } else {
                kr[u] = raw<E>{}, vr[u] = raw<E>{};
            }
            if (++pr == tpp && t + 1 < te)
                pr = 0, pg = page_at(++pi);
        }
        float x[V];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int h = 0; h < GP; h++) {
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < E; e++)
                    dot += q[h][e] * elem<T, E>(kr[u], e);
                x[u * GP + h] = dot;
            }
        // lane L ends with the sum L >> R, its lanes' partials added after
        reduce_scatter<V, V / 2>(x, lane);
#pragma unroll
        for (int off = (1 << R) / 2; off >= 1; off /= 2)
            x[0] += __shfl_xor_sync(0xffffffffu, x[0], off);
        uint32_t t_own = tb + u_own;
        float sc = t_own < te && t_own - hole >= hole_n && h_own < (int)G ? x[0] : -INFINITY;
        // the tile's max per head (lanes of one head differ in the token bits), then to all
        float mx = sc;
#pragma unroll
        for (int off = GP << R; off < 32; off *= 2)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float corr[GP], mo = 0.0f;
#pragma unroll
        for (int h = 0; h < GP; h++) {
            float mn = fmaxf(m[h], __shfl_sync(0xffffffffu, mx, h << R));
            corr[h] = mn == -INFINITY ? 1.0f : exp2f(m[h] - mn);
            m[h] = mn;
            mo = h == h_own ? mn : mo;
        }
        float pe = sc == -INFINITY ? 0.0f : exp2f(sc - mo), ps = pe;
#pragma unroll
        for (int off = GP << R; off < 32; off *= 2)
            ps += __shfl_xor_sync(0xffffffffu, ps, off);
#pragma unroll
        for (int h = 0; h < GP; h++)
            s[h] = s[h] * corr[h] + __shfl_sync(0xffffffffu, ps, h << R);
        if ((lane & ((1 << R) - 1)) == 0)
            sm_p[warp][idx] = pe;
        __syncwarp();
#pragma unroll
        for (int h = 0; h < GP; h++)
#pragma unroll
            for (int e = 0; e < E; e++)
                acc[h][e] *= corr[h];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int h = 0; h < GP; h++) {
                float pv = sm_p[warp][u * GP + h];
#pragma unroll
                for (int e = 0; e < E; e++)
                    acc[h][e] += pv * elem<T, E>(vr[u], e);
            }
        __syncwarp(); // the next tile's probabilities overwrite these
    }
#pragma unroll
    for (int h = 0; h < GP; h++) { /* constant indices: the arrays stay in registers */
        if (lane == 0)
            sm_m[warp][h] = m[h], sm_l[warp][h] = s[h];
#pragma unroll
        for (int e = 0; e < E; e++)
            sm_acc[warp][h][lane * E + e] = acc[h][e];
    }
    __syncthreads();
    // merge the warps: thread x handles (head, dim) pairs
    for (uint32_t x = threadIdx.x; x < G * d; x += blockDim.x) {
        uint32_t h = x / d, e = x % d;
        float M = -INFINITY;
        for (int w = 0; w < AW; w++)
            M = fmaxf(M, sm_m[w][h]);
        float S = 0.0f, A = 0.0f;
        for (int w = 0; w < AW; w++) {
            float c = sm_m[w][h] == -INFINITY ? 0.0f : exp2f(sm_m[w][h] - M);
            S += sm_l[w][h] * c, A += sm_acc[w][h][e] * c;
        }
        float *dst = part_at(h);
        dst[e] = A;
        if (e == 0)
            dst[d] = M, dst[d + 1] = S;
    }
}

// ---- the same on the tensor cores (mma.sync), head_dim 64 or 128 ----
//
// The group's query heads are the rows of a 16-row A tile (G real, the rest zero), a tile of
// 16 tokens the columns: S = Q K^T by ldmatrix from the staged keys, the online softmax on
// the accumulators (base 2; a row's 4 lanes share its max), then O += P V with P from the
// same registers (the accumulator layout is the A layout) and V by ldmatrix.trans. P goes
// in as two halves of the 16-bit type (P = hi + lo), so the output keeps f32 accuracy.
// Each warp streams its run through TC_ST cp.async stages of K and V rows of its own
// (padded: ldmatrix reads without bank conflicts); rows outside the run or in a hole are
// zero filled without a read.
#define TC_ST 2 // cp.async stages a warp
#define TC_TT 16 // tokens a tile

template <int D> struct tc_geo {
    static constexpr int LD = D + 8;                 // halves a staged row
    static constexpr int STAGE = 2 * TC_TT * LD * 2; // bytes: K rows, then V rows
    static constexpr int PR = D / 8;                 // 16-byte pieces a row
    static constexpr int RS = 32 / PR;               // rows a warp copies side by side
    static constexpr int KS = D / 16;                // k steps of Q K^T
    static constexpr int NV = D / 8;                 // n tiles of P V
};

// Shared memory bytes of a tensor-core block: the warps' stages, reused for their merge.
template <int D> constexpr size_t tc_smem()
{
    size_t st = (size_t)AW * TC_ST * tc_geo<D>::STAGE, mg = sizeof(float) * AW * 16 * (2 + D);
    return st > mg ? st : mg;
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b)
{
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}
// x rounded to T and back
template <typename T> __device__ __forceinline__ float round_to(float x);
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float x)
{
    return __bfloat162float(__float2bfloat16_rn(x));
}
template <> __device__ __forceinline__ float round_to<__half>(float x)
{
    return __half2float(__float2half_rn(x));
}

// smem: tc_smem<D>() bytes (dynamic shared memory).
template <typename T, int D, typename PageAt, typename PartAt>
__device__ __forceinline__ void split_partial_tc(uint32_t t0, uint32_t t1, uint32_t split,
                                                 uint32_t hole, uint32_t hole_n, const T *qb,
                                                 uint32_t G, float scale, uint32_t tpp,
                                                 size_t row, size_t voff, PageAt page_at,
                                                 PartAt part_at, uint8_t *smem)
{
    using gm = tc_geo<D>;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint8_t *mine = smem + (size_t)warp * TC_ST * gm::STAGE;
    uint32_t per = split / AW, w0 = t0 + warp * per, w1 = min(w0 + per, t1);
    uint32_t nt = w1 > w0 ? (w1 - w0 + TC_TT - 1) / TC_TT : 0;
    // Q as the A tile, every k step: rows lane / 4 and lane / 4 + 8
    uint32_t qa[gm::KS][4];
    {
        uint32_t r0 = lane / 4, r1 = r0 + 8, c = (lane % 4) * 2;
#pragma unroll
        for (int k = 0; k < gm::KS; k++) {
            const T *a = qb + (size_t)r0 * D + k * 16 + c, *b = qb + (size_t)r1 * D + k * 16 + c;
            qa[k][0] = r0 < G ? *(const uint32_t *)a : 0u;
            qa[k][1] = r1 < G ? *(const uint32_t *)b : 0u;
            qa[k][2] = r0 < G ? *(const uint32_t *)(a + 8) : 0u;
            qa[k][3] = r1 < G ? *(const uint32_t *)(b + 8) : 0u;
        }
    }
    // tile i's K and V rows into stage i % TC_ST
    auto load = [&](uint32_t i) {
        uint8_t *st = mine + (size_t)(i % TC_ST) * gm::STAGE;
        uint32_t tb = w0 + i * TC_TT, r = lane / gm::PR, v = lane % gm::PR, t = tb + r;
        uint32_t pg = t / tpp, w = t - pg * tpp;
#pragma unroll
        for (int j = 0; j < TC_TT / gm::RS; j++, r += gm::RS, t += gm::RS) {
            bool ok = t < w1 && t - hole >= hole_n;
            const uint8_t *src = ok ? page_at(pg) + w * row + v * 16 : (const uint8_t *)qb;
            cp_async16(st + ((size_t)r * gm::LD + v * 8) * 2, src, ok);
            cp_async16(st + ((size_t)(TC_TT + r) * gm::LD + v * 8) * 2, src + (ok ? voff : 0), ok);
            w += gm::RS;
            while (w >= tpp)
                w -= tpp, pg++;
        }
    };
    float o[gm::NV][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < gm::NV; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    const float c2 = scale * LOG2E;
#pragma unroll
    for (int i = 0; i < TC_ST - 1; i++) {
        if (i < (int)nt)
            load(i);
        cp_async_commit();
    }
    for (uint32_t i = 0; i < nt; i++) {
        if (i + TC_ST - 1 < nt)
            load(i + TC_ST - 1);
        cp_async_commit();
        cp_async_wait<TC_ST - 1>();
        __syncwarp();
        const uint8_t *st = mine + (size_t)(i % TC_ST) * gm::STAGE;
        // S = Q K^T: two n tiles of 8 tokens
        float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        const uint8_t *kp = st + ((size_t)((lane / 16) * 8 + lane % 8) * gm::LD + ((lane / 8) % 2) * 8) * 2;
#pragma unroll
        for (int k = 0; k < gm::KS; k++) {
            uint32_t b[4];
            ldmatrix_x4(b, kp + k * 32);
            uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma16816<T>(sc[0], qa[k], b0);
            mma16816<T>(sc[1], qa[k], b1);
        }
        // online softmax: rows lane / 4 (e < 2) and + 8 (e >= 2); token j * 8 + (lane % 4) * 2 + e % 2
        uint32_t tb = w0 + i * TC_TT;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                uint32_t t = tb + j * 8 + (lane % 4) * 2 + e % 2;
                float x = t < w1 && t - hole >= hole_n ? sc[j][e] * c2 : -INFINITY;
                sc[j][e] = x;
                mx[e / 2] = fmaxf(mx[e / 2], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float mn = fmaxf(m[r], mx[r]);
            corr[r] = mn == -INFINITY ? 1.0f : ex2(m[r] - mn);
            m[r] = mn;
            l[r] *= corr[r];
        }
        uint32_t ph[4], pl[4]; // P as the A tile, in two halves
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) { // row half h: elements 2h, 2h + 1
                float p0 = sc[j][2 * h] == -INFINITY ? 0.0f : ex2(sc[j][2 * h] - m[h]);
                float p1 = sc[j][2 * h + 1] == -INFINITY ? 0.0f : ex2(sc[j][2 * h + 1] - m[h]);
                l[h] += p0 + p1;
                float r0 = round_to<T>(p0), r1 = round_to<T>(p1);
                ph[j * 2 + h] = pack2<T>(r0, r1);
                pl[j * 2 + h] = pack2<T>(p0 - r0, p1 - r1);
            }
#pragma unroll
        for (int n = 0; n < gm::NV; n++)
            o[n][0] *= corr[0], o[n][1] *= corr[0], o[n][2] *= corr[1], o[n][3] *= corr[1];
        // O += P V: V rows by ldmatrix.trans, two n tiles (16 dims) at once
        const uint8_t *vp = st + ((size_t)(TC_TT + ((lane / 8) % 2) * 8 + lane % 8) * gm::LD + (lane / 16) * 8) * 2;
#pragma unroll
        for (int n = 0; n < gm::NV; n += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vp + n * 16);
            uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma16816<T>(o[n], ph, b0);
            mma16816<T>(o[n], pl, b0);
            mma16816<T>(o[n + 1], ph, b1);
            mma16816<T>(o[n + 1], pl, b1);
        }
        __syncwarp(); // the stage is reloaded TC_ST - 1 tiles later
    }
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    // the warps merged in shared memory (the stages no longer needed): row h of warp w
    __syncthreads();
    float *sm_m = (float *)smem, *sm_l = sm_m + AW * 16, *sm_o = sm_l + AW * 16; // [AW][16][D]
#pragma unroll
    for (int r = 0; r < 2; r++) {
        uint32_t h = lane / 4 + r * 8;
        if (lane % 4 == 0)
            sm_m[warp * 16 + h] = m[r], sm_l[warp * 16 + h] = l[r];
#pragma unroll
        for (int n = 0; n < gm::NV; n++) {
            float *dst = sm_o + ((size_t)warp * 16 + h) * D + n * 8 + (lane % 4) * 2;
            dst[0] = o[n][2 * r], dst[1] = o[n][2 * r + 1];
        }
    }
    __syncthreads();
    for (uint32_t x = threadIdx.x; x < G * D; x += blockDim.x) {
        uint32_t h = x / D, e = x % D;
        float M = -INFINITY;
        for (int w = 0; w < AW; w++)
            M = fmaxf(M, sm_m[w * 16 + h]);
        float S = 0.0f, A = 0.0f;
        for (int w = 0; w < AW; w++) {
            float c = sm_m[w * 16 + h] == -INFINITY ? 0.0f : ex2(sm_m[w * 16 + h] - M);
            S += sm_l[w * 16 + h] * c, A += sm_o[((size_t)w * 16 + h) * D + e] * c;
        }
        float *dst = part_at(h);
        dst[e] = A;
        if (e == 0)
            dst[D] = M, dst[D + 1] = S;
    }
}

// The splits' partials of one (row, head) merged: element e of the output.
__device__ __forceinline__ float merge_splits(const float *part, uint32_t used, uint32_t d,
                                              uint32_t e)
{
    float M = -INFINITY;
    for (uint32_t s = 0; s < used; s++)
        M = fmaxf(M, part[(size_t)s * (d + 2) + d]);
    float S = 0.0f, A = 0.0f;
    for (uint32_t s = 0; s < used; s++) {
        const float *ps = part + (size_t)s * (d + 2);
        float c = ps[d] == -INFINITY ? 0.0f : exp2f(ps[d] - M);
        S += ps[d + 1] * c, A += ps[e] * c;
    }
    return S > 0.0f ? A / S : 0.0f;
}

template <typename T, int E, int GP>
__global__ void __launch_bounds__(AW * 32) attn_split(aparams p)
{
    uint32_t split = blockIdx.x, g = blockIdx.y, l = blockIdx.z;
    uint32_t n = p.ntok[l], t0 = split * p.split, t1 = min(t0 + p.split, n);
    if (split && t0 >= n)
        return; // the merge uses only the splits that hold tokens
    const T *qb = (const T *)p.q + ((size_t)l * p.H + g * p.G) * p.d;
    const uint64_t *po = p.page_offs[l];
    uint32_t hole, hole_n;
    hole_of(p.holes ? p.holes + ((size_t)l * p.hkv + g) * 2 : NULL, &hole, &hole_n);
    split_partial<T, E, GP>(
        t0, t1, p.split, hole, hole_n, qb, p.G, p.d, p.scale, p.tpp, p.row, p.voff,
        [&](uint32_t i) { return (const uint8_t *)p.base + po[i] + (size_t)g * p.tpp * p.row; },
        [&](uint32_t h) {
            return p.part + (((size_t)l * p.H + g * p.G + h) * p.splits + split) * (p.d + 2);
        });
}

template <typename T, int D>
__global__ void __launch_bounds__(AW * 32) attn_split_tc(aparams p)
{
    extern __shared__ __align__(16) uint8_t dsm[];
    uint32_t split = blockIdx.x, g = blockIdx.y, l = blockIdx.z;
    uint32_t n = p.ntok[l], t0 = split * p.split, t1 = min(t0 + p.split, n);
    if (split && t0 >= n)
        return;
    const T *qb = (const T *)p.q + ((size_t)l * p.H + g * p.G) * p.d;
    const uint64_t *po = p.page_offs[l];
    uint32_t hole, hole_n;
    hole_of(p.holes ? p.holes + ((size_t)l * p.hkv + g) * 2 : NULL, &hole, &hole_n);
    split_partial_tc<T, D>(
        t0, t1, p.split, hole, hole_n, qb, p.G, p.scale, p.tpp, p.row, p.voff,
        [&](uint32_t i) { return (const uint8_t *)p.base + po[i] + (size_t)g * p.tpp * p.row; },
        [&](uint32_t h) {
            return p.part + (((size_t)l * p.H + g * p.G + h) * p.splits + split) * (p.d + 2);
        },
        dsm);
}

__global__ void attn_merge(aparams p)
{
    uint32_t lh = blockIdx.x, l = lh / p.H; // one block per (layer, head)
    uint32_t n = p.ntok[l], used = div_up(n, p.split);
    const float *part = p.part + (size_t)lh * p.splits * (p.d + 2);
    for (uint32_t e = threadIdx.x; e < p.d; e += blockDim.x)
        p.out[(size_t)lh * p.d + e] = merge_splits(part, used, p.d, e);
}

// ---- one layer of a batch of sequences (kern_cuda_paged_decode) ----

struct bparams {
    uint8_t *base;
    uint64_t page_bytes, pool_pages;
    const int32_t *const *pages; // [B] device pointers: each sequence's page indices
    const int32_t *const *ntok;  // [B] device pointers: its token count
    const int32_t *const *holes; // [B] device pointers: its heads' holes [hkv][2], or NULL
    uint32_t B, H, hkv, G, d, tpp, splits, split, max_pages, max_tokens;
    size_t voff, row;
    const void *q;               // [B][H][d]
    void *out;                   // [B][H][d], the same dtype
    float *part;                 // [B][H][splits][d + 2]
    float scale;
};

// A sequence's count, or UINT32_MAX where its table cannot be trusted (more tokens than
// its pages hold or the launch was sized for): its rows come out NaN.
__device__ __forceinline__ uint32_t batch_tokens(const bparams &p, uint32_t b)
{
    int32_t n = *p.ntok[b];
    return n < 0 || (uint64_t)n > (uint64_t)p.max_pages * p.tpp || (uint32_t)n > p.max_tokens
               ? UINT32_MAX
               : (uint32_t)n;
}

// A batch block's share: split `split` of sequence b's tokens for kv head g. False where it
// has nothing to do - no tokens there, or a page outside the pool (its rows' partials then
// marked NaN, which the merge turns into NaN rows). Block-uniform.
struct bblock {
    uint32_t t0, t1, hole, hole_n;
    const int32_t *pg; // the sequence's page indices
    float *rowpart;    // its group's partials [G][splits][d + 2]
};
__device__ __forceinline__ bool batch_block(const bparams &p, uint32_t split, uint32_t g,
                                            uint32_t b, bblock &k)
{
    uint32_t n = batch_tokens(p, b);
    if (n == UINT32_MAX || (split && split * p.split >= n))
        return false; // the merge uses only the splits that hold tokens
    k.t0 = split * p.split, k.t1 = min(k.t0 + p.split, n), k.pg = p.pages[b];
    int bad = 0;
    for (uint32_t i = k.t0 / p.tpp + threadIdx.x; k.t1 > k.t0 && i <= (k.t1 - 1) / p.tpp;
         i += blockDim.x)
        bad |= k.pg[i] < 0 || (uint64_t)k.pg[i] >= p.pool_pages;
    k.rowpart = p.part + ((size_t)b * p.H + g * p.G) * p.splits * (p.d + 2);
    if (__syncthreads_or(bad)) {
        for (uint32_t h = threadIdx.x; h < p.G; h += blockDim.x)
            k.rowpart[((size_t)h * p.splits + split) * (p.d + 2) + p.d] = NAN;
        return false;
    }
    hole_of(p.holes ? p.holes[b] + (size_t)g * 2 : NULL, &k.hole, &k.hole_n);
    return true;
}

template <typename T, int E, int GP>
__global__ void __launch_bounds__(AW * 32) battn_split(bparams p)
{
    uint32_t split = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    bblock k;
    if (!batch_block(p, split, g, b, k))
        return;
    const T *qb = (const T *)p.q + ((size_t)b * p.H + g * p.G) * p.d;
    split_partial<T, E, GP>(
        k.t0, k.t1, p.split, k.hole, k.hole_n, qb, p.G, p.d, p.scale, p.tpp, p.row, p.voff,
        [&](uint32_t i) {
            return (const uint8_t *)p.base + (uint64_t)k.pg[i] * p.page_bytes + (size_t)g * p.tpp * p.row;
        },
        [&](uint32_t h) { return k.rowpart + ((size_t)h * p.splits + split) * (p.d + 2); });
}

template <typename T, int D>
__global__ void __launch_bounds__(AW * 32) battn_split_tc(bparams p)
{
    extern __shared__ __align__(16) uint8_t dsm[];
    uint32_t split = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    bblock k;
    if (!batch_block(p, split, g, b, k))
        return;
    const T *qb = (const T *)p.q + ((size_t)b * p.H + g * p.G) * p.d;
    split_partial_tc<T, D>(
        k.t0, k.t1, p.split, k.hole, k.hole_n, qb, p.G, p.scale, p.tpp, p.row, p.voff,
        [&](uint32_t i) {
            return (const uint8_t *)p.base + (uint64_t)k.pg[i] * p.page_bytes + (size_t)g * p.tpp * p.row;
        },
        [&](uint32_t h) { return k.rowpart + ((size_t)h * p.splits + split) * (p.d + 2); }, dsm);
}

// The tensor-core kernel K<T, D> launched (its shared memory allowed once a device: the
// attribute is each device's).
template <typename P, void (*K)(P), int D>
static cudaError_t launch_tc(dim3 grid, cudaStream_t st, const P &p)
{
    static std::atomic<uint64_t> ready; // a bit a device (beyond 64: every launch)
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return e;
    uint64_t bit = dev >= 0 && dev < 64 ? 1ull << dev : 0;
    if (!bit || !(ready.load() & bit)) {
        e = cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tc_smem<D>());
        if (e != cudaSuccess)
            return e;
        ready.fetch_or(bit);
    }
    K<<<grid, AW * 32, tc_smem<D>(), st>>>(p);
    return cudaGetLastError();
}

static std::atomic<int> force_simt;
extern "C" int kern_cuda_attn_set_simt(int on) { return force_simt.exchange(on ? 1 : 0); }
// Whether a launch runs on the tensor cores.
static bool use_tc(uint32_t d) { return (d == 64 || d == 128) && !force_simt.load(); }

__device__ __forceinline__ void store(__nv_bfloat16 *o, float x) { *o = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half *o, float x) { *o = __float2half(x); }

template <typename T>
__global__ void battn_merge(bparams p)
{
    uint32_t bh = blockIdx.x, b = bh / p.H; // one block per (sequence, head)
    uint32_t n = batch_tokens(p, b), used = n == UINT32_MAX ? 0 : div_up(n, p.split);
    const float *part = p.part + (size_t)bh * p.splits * (p.d + 2);
    int bad = n == UINT32_MAX;
    for (uint32_t s = 0; s < used; s++)
        bad |= isnan(part[(size_t)s * (p.d + 2) + p.d]);
    for (uint32_t e = threadIdx.x; e < p.d; e += blockDim.x)
        store((T *)p.out + (size_t)bh * p.d + e, bad ? NAN : merge_splits(part, used, p.d, e));
}

// The split kernel for a dtype, head_dim (E = d / 32) and group (padded to GP).
#define PICK_GP(KER, T, E)                                                                     \
    (gp == 1 ? KER<T, E, 1> : gp == 2 ? KER<T, E, 2> : gp == 4 ? KER<T, E, 4> : KER<T, E, 8>)
#define PICK(KER, T)                                                                           \
    (E == 1 ? PICK_GP(KER, T, 1) : E == 2 ? PICK_GP(KER, T, 2) : E == 4 ? PICK_GP(KER, T, 4)   \
            : PICK_GP(KER, T, 8))

static uint32_t group_pad(uint32_t G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8; }

// The split kernels of a launch's parameters: all layers of a sequence, or a batch.
template <typename P> struct splits_of;
template <> struct splits_of<aparams> {
    template <typename T, int D> static constexpr void (*tc)(aparams) = attn_split_tc<T, D>;
    template <typename T, int E, int GP> static constexpr void (*simt)(aparams) = attn_split<T, E, GP>;
};
template <> struct splits_of<bparams> {
    template <typename T, int D> static constexpr void (*tc)(bparams) = battn_split_tc<T, D>;
    template <typename T, int E, int GP> static constexpr void (*simt)(bparams) = battn_split<T, E, GP>;
};

// The split kernel launched: on the tensor cores where use_tc(d), else on CUDA cores.
template <typename P>
static cudaError_t launch_split(const P &p, dim3 grid, cudaStream_t st, bool bf)
{
    using K = splits_of<P>;
    uint32_t d = p.d, E = d / 32, gp = group_pad(p.G);
    if (use_tc(d) && bf)
        return d == 64 ? launch_tc<P, K::template tc<__nv_bfloat16, 64>, 64>(grid, st, p)
                       : launch_tc<P, K::template tc<__nv_bfloat16, 128>, 128>(grid, st, p);
    if (use_tc(d))
        return d == 64 ? launch_tc<P, K::template tc<__half, 64>, 64>(grid, st, p)
                       : launch_tc<P, K::template tc<__half, 128>, 128>(grid, st, p);
    if (bf)
        PICK(K::template simt, __nv_bfloat16)<<<grid, AW * 32, 0, st>>>(p);
    else
        PICK(K::template simt, __half)<<<grid, AW * 32, 0, st>>>(p);
    return cudaGetLastError();
}

extern "C" size_t kern_cuda_paged_decode_workspace(uint32_t batch, uint32_t q_heads,
                                                   uint32_t head_dim, uint32_t max_tokens)
{
    return sizeof(float) * (size_t)batch * q_heads * splits_bound(max_tokens) * (head_dim + 2);
}

extern "C" int kern_cuda_paged_decode(const struct kern_cuda_paged *pk, const int32_t *const *pages,
                                      const int32_t *const *n_tokens,
                                      const int32_t *const *holes, uint32_t batch,
                                      uint32_t max_tokens, const void *q, void *out, void *ws,
                                      size_t ws_bytes, void *stream)
{
    uint32_t H = pk->q_heads, hkv = pk->kv_heads, d = pk->head_dim;
    if (!hkv || H % hkv || H / hkv > MAXG || (d != 32 && d != 64 && d != 128 && d != 256) ||
        (pk->dtype != KERN_BF16 && pk->dtype != KERN_F16) || !batch || !max_tokens ||
        !pk->tokens_per_page || ws_bytes < kern_cuda_paged_decode_workspace(batch, H, d, max_tokens))
        return -EINVAL;
    uint32_t split = split_of(max_tokens);
    bparams p = {pk->base, pk->page_bytes, pk->pool_pages, pages, n_tokens, holes, batch, H, hkv,
                 H / hkv, d, pk->tokens_per_page, div_up(max_tokens, split), split,
                 pk->max_pages, max_tokens, pk->v_offset_bytes, (size_t)d * 2, q, out,
                 (float *)ws, 1.0f / sqrtf((float)d)};
    cudaStream_t st = (cudaStream_t)stream;
    dim3 grid(p.splits, hkv, batch);
    bool bf = pk->dtype == KERN_BF16;
    cudaError_t e = launch_split(p, grid, st, bf);
    if (e == cudaSuccess && bf)
        battn_merge<__nv_bfloat16><<<batch * H, 128, 0, st>>>(p);
    else if (e == cudaSuccess)
        battn_merge<__half><<<batch * H, 128, 0, st>>>(p);
    if (e == cudaSuccess)
        e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "caked cuda: paged decode attention: %s\n", cudaGetErrorString(e));
        return -EIO;
    }
    return 0;
}

// The newest token's K and V of each sequence of a batch into its reserved slot (count - 1)
// of its pages: one block per (sequence, kv head); a sequence whose table cannot be trusted
// is left alone (its attention rows come out NaN anyway).
template <typename T>
__global__ void bappend(bparams p, const T *k, const T *v)
{
    uint32_t b = blockIdx.x, g = blockIdx.y;
    uint32_t n = batch_tokens(p, b);
    if (n == UINT32_MAX || n == 0)
        return;
    int32_t idx = p.pages[b][(n - 1) / p.tpp];
    if (idx < 0 || (uint64_t)idx >= p.pool_pages)
        return;
    T *dst = (T *)(p.base + (uint64_t)idx * p.page_bytes +
                   ((size_t)g * p.tpp + (n - 1) % p.tpp) * p.row);
    T *dv = (T *)((uint8_t *)dst + p.voff);
    size_t src = ((size_t)b * p.hkv + g) * p.d;
    for (uint32_t e = threadIdx.x; e < p.d; e += blockDim.x)
        dst[e] = k[src + e], dv[e] = v[src + e];
}

extern "C" int kern_cuda_paged_append(const struct kern_cuda_paged *pk, const int32_t *const *pages,
                                      const int32_t *const *n_tokens, uint32_t batch,
                                      const void *k, const void *v, void *stream)
{
    if (!batch || !pk->kv_heads || (pk->dtype != KERN_BF16 && pk->dtype != KERN_F16))
        return -EINVAL;
    bparams p = {pk->base, pk->page_bytes, pk->pool_pages, pages, n_tokens, NULL, batch, pk->q_heads,
                 pk->kv_heads, 1, pk->head_dim, pk->tokens_per_page, 1, 128, pk->max_pages,
                 pk->max_pages * pk->tokens_per_page, pk->v_offset_bytes,
                 (size_t)pk->head_dim * 2, NULL, NULL, NULL, 0.0f};
    cudaStream_t st = (cudaStream_t)stream;
    dim3 grid(batch, pk->kv_heads);
    if (pk->dtype == KERN_BF16)
        bappend<__nv_bfloat16><<<grid, 128, 0, st>>>(p, (const __nv_bfloat16 *)k,
                                                      (const __nv_bfloat16 *)v);
    else
        bappend<__half><<<grid, 128, 0, st>>>(p, (const __half *)k, (const __half *)v);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "caked cuda: paged append: %s\n", cudaGetErrorString(e));
        return -EIO;
    }
    return 0;
}

extern "C" size_t kern_cuda_attn_workspace(uint32_t L, uint32_t H, uint32_t d, uint32_t max_tokens)
{
    return sizeof(float) * (size_t)L * H * splits_bound(max_tokens) * (d + 2);
}

extern "C" int kern_cuda_decode_attention(int dtype, uint8_t *base, const uint64_t *const *page_offs,
                                          const uint32_t *n_tokens, const int32_t *holes,
                                          uint32_t max_tokens, uint32_t L,
                                          uint32_t H, uint32_t hkv, uint32_t d, uint32_t tpp,
                                          size_t voff, const void *q, float *out, void *ws,
                                          size_t ws_bytes, void *stream)
{
    if (!hkv || H % hkv || H / hkv > MAXG || (d != 32 && d != 64 && d != 128 && d != 256) ||
        (dtype != KERN_BF16 && dtype != KERN_F16) || !L || !tpp ||
        ws_bytes < kern_cuda_attn_workspace(L, H, d, max_tokens))
        return -EINVAL;
    uint32_t split = split_of(max_tokens), splits = div_up(max_tokens, split);
    aparams p = {base, page_offs, n_tokens, L, H, hkv, H / hkv, d, tpp, splits ? splits : 1,
                 split, voff, (size_t)d * 2, q, (float *)ws, out, 1.0f / sqrtf((float)d), holes};
    cudaStream_t st = (cudaStream_t)stream;
    dim3 grid(p.splits, hkv, L);
    cudaError_t e = launch_split(p, grid, st, dtype == KERN_BF16);
    if (e == cudaSuccess) {
        attn_merge<<<L * H, 128, 0, st>>>(p);
        e = cudaGetLastError();
    }
    if (e != cudaSuccess) {
        fprintf(stderr, "caked cuda: decode attention: %s\n", cudaGetErrorString(e));
        return -EIO;
    }
    return 0;
}
