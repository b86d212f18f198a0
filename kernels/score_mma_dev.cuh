// score_mma_dev.cuh - internal to the CUDA kernels: the device side of the mma.sync
// scoring passes (score_mma.cu's plan, see there), as bodies a kernel runs over a range of
// one kv head's keys: score_mma.cu's passes (many blocks a head, partials merged after) and
// evict.cu's one-launch decode eviction (one block a head) share them; score_wg_dev.cuh has
// the same passes on Hopper's wgmma at one shape. C++ only.
#ifndef CAKE_SCORE_MMA_DEV_CUH
#define CAKE_SCORE_MMA_DEV_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <type_traits>

#include "mma_dev.cuh"

namespace smma {
using namespace cakeptx;
#ifndef SCORE_MMA_BPS
#define SCORE_MMA_BPS 2 // blocks per SM (the registers a thread may use follow)
#endif
#ifndef SCORE_MMA_NM
#define SCORE_MMA_NM 1  // m-tiles a warp multiplies side by side (2: same speed on the H200, spills)
#endif
constexpr int THREADS = 256, TK = 128;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

struct mparams {
    const uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, tpp_mul, tpp_shr; // tokens per page and its fast divisor
    uint32_t n, wb, d, G, nq, nqp, Rp, hps, sph, S, chunk, chunks1; // wb = n - nq
    float scale, c2, mw, gamma;     // c2 = scale * log2(e); the indicator mw * mean + gamma * var
    const void *q;
    float *m, *l;                   // pass 1: [hkv][chunks1][Rp]
    const float *rowM, *rowLnL;     // merged: [hkv][Rp]
    float *acc;                     // [hkv][S]
    double *ent, *var;              // [hkv][chunks2]
    // queries read from a paged ring (evict.cu) instead of q: row i of query head h is the
    // ring's row (first + i) mod w (kern_cuda_ring_gather's layout); NULL: q
    const uint64_t *ring_off;
    uint32_t w, rpp, hpp, pph, first;
};

// A stage holds TK keys in 128-byte swizzled atoms (the layout of TMA's 128-byte swizzle, which
// wgmma reads): atom a (elements [64a, 64a + 64) of every row) is TK rows of 128 bytes, 16-byte
// chunk c of row r at ((c ^ (r % 8)) * 16), so ldmatrix's 8 rows of one chunk fall in 8
// different bank groups, with no padding. Stages start 1024-byte aligned.
template <int KS> struct shape {
    static constexpr int D8 = KS * 2;       // 16-byte pieces per key row
    static constexpr int ATOMS = (KS + 3) / 4;
    static constexpr size_t ATOM_BYTES = (size_t)TK * 128;
    static constexpr size_t STAGE_BYTES = ATOMS * ATOM_BYTES;
    static_assert(KS % 4 == 0, "head_dim 64 or 128: whole atoms");
};

// byte offset of 16-byte piece v (of a key row's D8) of stage row r, in a stage of ROWS rows
// (atoms of ROWS x 128 bytes; pass2_body_wg's warpgroups stage 64 keys each)
template <int KS, int ROWS = TK> __device__ __forceinline__ uint32_t swz(uint32_t r, uint32_t v)
{
    static_assert(ROWS % 8 == 0, "whole 8-row swizzle groups");
    return (v / 8) * (uint32_t)ROWS * 128 + r * 128 + (((v % 8) ^ (r % 8)) << 4);
}

// The dynamic shared memory, 1024-byte aligned (kernels ask for SMEM_ALIGN bytes more). The
// pointer moves by an offset from the shared array itself (not through an integer), so the
// compiler still knows it points to shared memory: its loads and stores are LDS and STS, not
// generic accesses with 64-bit addresses.
constexpr size_t SMEM_ALIGN = 1024;
__device__ __forceinline__ uint8_t *smem_aligned(void *p)
{
    uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    return (uint8_t *)p + ((uint32_t)SMEM_ALIGN - s % (uint32_t)SMEM_ALIGN) % (uint32_t)SMEM_ALIGN;
}

// Column c of the padded query space: head c / nqp, window query c % nqp (padding past nq).
__device__ __forceinline__ bool col_valid(const mparams &p, uint32_t c)
{
    return c < p.Rp && c % p.nqp < p.nq;
}

// Query head hq's row in ring slot `slot` (p.ring_off's paged ring, kern_cuda_ring_gather's
// layout: whole heads a page, or a head over pph pages of rpp rows).
__device__ __forceinline__ const uint8_t *ring_row(const mparams &p, uint32_t hq, uint32_t slot)
{
    size_t rb = (size_t)p.d * 2;
    return p.pph == 1 ? p.base + p.ring_off[hq / p.hpp] + ((size_t)(hq % p.hpp) * p.w + slot) * rb
                      : p.base + p.ring_off[(size_t)hq * p.pph + slot / p.rpp] + (size_t)(slot % p.rpp) * rb;
}

// The B fragments (Q^T) of the warp's 32 query columns, all k steps: 4 n-tiles x KS x 2.
template <typename T, int KS>
__device__ void load_bfrag(const mparams &p, uint32_t g, uint32_t slice, uint32_t lane, uint32_t (&bq)[4][KS][2])
{
#pragma unroll
    for (int t = 0; t < 4; t++) {
        uint32_t c = slice * 32 + t * 8 + lane / 4;
        bool ok = col_valid(p, c);
        uint32_t r = c / p.nqp * p.nq + c % p.nqp;
        const T *row = (const T *)p.q + ((size_t)g * p.G * p.nq + (ok ? r : 0)) * p.d;
        if (p.ring_off) // query head g * G + c / nqp, window row c % nqp
            row = (const T *)ring_row(p, g * p.G + (ok ? c / p.nqp : 0), (p.first + (ok ? c % p.nqp : 0)) % p.w);
#pragma unroll
        for (int k = 0; k < KS; k++) {
            bq[t][k][0] = ok ? *(const uint32_t *)(row + k * 16 + 2 * (lane % 4)) : 0u;
            bq[t][k][1] = ok ? *(const uint32_t *)(row + k * 16 + 8 + 2 * (lane % 4)) : 0u;
        }
    }
}

// Slot t of kv head g: its key row's byte offset from p.base (the page by the fast
// divisor; the V row is v_offset_bytes further).
__device__ __forceinline__ uint64_t key_off(const mparams &p, uint32_t g, uint32_t t)
{
    uint32_t pg = p.tpp == 1 ? t : __umulhi(t, p.tpp_mul) >> p.tpp_shr;
    return p.page_off[pg] + ((uint64_t)g * p.tpp + (t - pg * p.tpp)) * p.d * 2;
}

// Keys [j0, j0 + ROWS) of head g into a stage of ROWS rows (rows at or past `end` zero
// filled) by cp.async from NT threads (the block's, or a warpgroup's: threadIdx.x % NT): each
// warp copies ROWS / (NT / 32) consecutive rows; lane l finds row l's address once (its page
// from the fast divisor and the page table), and the warp's copies take it by shuffle, a
// row's 16-byte pieces on consecutive lanes (a per-thread walk over the pages cost ~280
// instructions a tile and thread).
template <int KS, int ROWS = TK, int NT = THREADS>
__device__ __forceinline__ void load_tile(const mparams &p, uint32_t g, uint32_t j0, uint32_t end, uint8_t *stage)
{
    using sh = shape<KS>;
    constexpr int RPW = ROWS / (NT / 32); // rows a warp copies
    constexpr int RPI = 32 / sh::D8;      // rows one copy instruction of the warp covers
    static_assert(RPW <= 32 && RPW % RPI == 0 && RPW % 8 == 0, "a warp's rows: one lane each");
    uint32_t lane = threadIdx.x % 32, r0 = (NT == THREADS ? threadIdx.x : threadIdx.x % NT) / 32 * RPW;
    uint32_t j = j0 + r0 + lane % RPW;
    bool ok = j < end;
    uint64_t src = (uint64_t)p.base; // a valid address for the zero-filling copies
    if (ok)
        src += key_off(p, g, j);
    uint32_t v = lane % sh::D8, rl = lane / sh::D8, okr = __ballot_sync(0xffffffffu, ok) >> rl;
#pragma unroll
    for (int u = 0; u < RPW / RPI; u++) {
        uint64_t s = __shfl_sync(0xffffffffu, src, u * RPI + rl);
        cp_async16(stage + swz<KS, ROWS>(r0 + u * RPI + rl, v), (const void *)(s + v * 16), (okr >> (u * RPI)) & 1);
    }
}

// acc[i][t] = keys[m-tile mt0 + i * mstep] . Q^T[n-tile t] over all k: NM m-tiles side by side
// (independent accumulator chains for the tensor pipe).
template <typename T, int KS, int NM>
__device__ __forceinline__ void mma_tiles(const uint8_t *st, uint32_t mt0, uint32_t mstep, const uint32_t (&bq)[4][KS][2],
                                          float (&acc)[NM][4][4], uint32_t lane)
{
    using sh = shape<KS>;
    // lane l reads row l % 16 of the m-tile, chunk 2 (k % 4) + l / 16 of atom k / 4: its
    // swizzled place is that chunk ^ (row % 8), and row % 8 = l % 8
    const uint8_t *ap[NM];
    uint32_t x0 = ((lane / 16) ^ (lane % 8)) << 4;
#pragma unroll
    for (int i = 0; i < NM; i++) {
        ap[i] = st + ((mt0 + i * mstep) * 16 + lane % 16) * 128;
#pragma unroll
        for (int t = 0; t < 4; t++)
            acc[i][t][0] = acc[i][t][1] = acc[i][t][2] = acc[i][t][3] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < KS; k++) {
        uint32_t a[NM][4], off = (k / 4) * (uint32_t)sh::ATOM_BYTES + (x0 ^ ((k % 4) << 5));
#pragma unroll
        for (int i = 0; i < NM; i++)
            ldmatrix_x4(a[i], ap[i] + off);
#pragma unroll
        for (int i = 0; i < NM; i++)
#pragma unroll
            for (int t = 0; t < 4; t++)
                mma16816<T>(acc[i][t], a[i], bq[t][k]);
    }
}

// an exp-sum relative to base b (log2 units) made relative to base nb >= b
__device__ __forceinline__ float rebase(float s, float b, float nb)
{
    return b == -INFINITY ? 0.0f : s * ex2(b - nb);
}

// Each (base, exp-sum) pair merged with lane ^ o's, for o = o0, 2 o0, ... below o1
template <int N> __device__ __forceinline__ void merge_xor(float (&b)[N], float (&s)[N], int o0, int o1)
{
#pragma unroll
    for (int o = o0; o < o1; o <<= 1)
#pragma unroll
        for (int c = 0; c < N; c++) {
            float bo = __shfl_xor_sync(0xffffffffu, b[c], o), so = __shfl_xor_sync(0xffffffffu, s[c], o);
            float nb = fmaxf(b[c], bo);
            s[c] = rebase(s[c], b[c], nb) + rebase(so, bo, nb);
            b[c] = nb;
        }
}

// Pass 1 of one block: keys [c0, c1) of kv head g against the group's queries, in ST
// cp.async stages at smem. Writes each padded query column's max (natural-log units of the
// scaled logits, -inf for none) and exp-sum relative to it to m_out[col], l_out[col].
template <typename T, int KS, int NSP, int ST>
__device__ void pass1_body(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                           float *m_out, float *l_out)
{
    using sh = shape<KS>;
    constexpr int KW = 8 / NSP; // warps sharing a slice of 32 query columns
    constexpr int NM = NSP >= 2 ? SCORE_MMA_NM : 1; // m-tiles multiplied side by side
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % NSP, kw = warp / NSP;
    uint32_t nt = (c1 - c0 + TK - 1) / TK, clean = min(c1, p.wb + 1); // rows below clean: no mask
    uint32_t bq[4][KS][2];
    load_bfrag<T, KS>(p, g, slice, lane, bq);
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load_tile<KS>(p, g, c0 + s * TK, c1, smem + s * sh::STAGE_BYTES);
        cp_async_commit();
    }
    // Per column: b = the exponent base (a running max in log2 units, raised only when a
    // value passes it by more than 8: terms stay below 2^8) and the exp-sum relative to it.
    float b[8], sm[8];
#pragma unroll
    for (int c = 0; c < 8; c++)
        b[c] = -INFINITY, sm[c] = 0.0f;
    for (uint32_t k = 0; k < nt; k++) {
        cp_async_wait<ST - 2>();
        __syncthreads();
        if (k + ST - 1 < nt)
            load_tile<KS>(p, g, c0 + (k + ST - 1) * TK, c1, smem + ((k + ST - 1) % ST) * sh::STAGE_BYTES);
        cp_async_commit();
        const uint8_t *st = smem + (k % ST) * sh::STAGE_BYTES;
        uint32_t j0 = c0 + k * TK;
        bool full = j0 + TK <= clean;
        // the warp's NSP m-tiles of the stage, NM at a time
        for (uint32_t u = 0; u < (uint32_t)NSP; u += NM) {
            if (!full && (kw + u * KW) * 16 >= c1 - j0)
                continue; // m-tiles wholly past the chunk (a warp's choice: no shuffle waits)
            float acc[NM][4][4];
            mma_tiles<T, KS, NM>(st, kw + u * KW, KW, bq, acc, lane);
            if (full) { // straight-line: one vote decides whether any base must rise
                bool up = false;
                float tm[8];
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    tm[c] = -INFINITY;
#pragma unroll
                    for (int i = 0; i < NM; i++)
                        tm[c] = fmaxf(tm[c], fmaxf(acc[i][c / 2][c % 2], acc[i][c / 2][c % 2 + 2]));
                    up |= fmaf(tm[c], p.c2, -b[c]) > 8.0f;
                }
                if (__any_sync(0xffffffffu, up))
#pragma unroll
                    for (int c = 0; c < 8; c++) {
                        float nb = fmaxf(b[c], tm[c] * p.c2);
                        sm[c] = b[c] == -INFINITY ? 0.0f : sm[c] * ex2(b[c] - nb);
                        b[c] = nb;
                    }
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    float s2 = 0.0f;
#pragma unroll
                    for (int i = 0; i < NM; i++)
                        s2 += ex2(fmaf(acc[i][c / 2][c % 2], p.c2, -b[c])) + ex2(fmaf(acc[i][c / 2][c % 2 + 2], p.c2, -b[c]));
                    sm[c] += s2;
                }
                continue;
            }
            // past the chunk, or window keys a query must not see
#pragma unroll
            for (int mi = 0; mi < NM; mi++) {
                uint32_t ja = j0 + (kw + (u + mi) * KW) * 16 + lane / 4;
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    uint32_t col = slice * 32 + (c / 2) * 8 + 2 * (lane % 4) + c % 2;
                    uint32_t i = col % p.nqp; // window query i sees keys up to n - nq + i
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        uint32_t j = ja + e * 8;
                        float v = acc[mi][c / 2][c % 2 + 2 * e];
                        if (j >= c1 || j > p.wb + i)
                            continue;
                        if (v * p.c2 > b[c]) {
                            sm[c] = b[c] == -INFINITY ? 0.0f : sm[c] * ex2(b[c] - v * p.c2);
                            b[c] = v * p.c2;
                        }
                        sm[c] += ex2(fmaf(v, p.c2, -b[c]));
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    // lanes with the same lane % 4 hold the same columns; then the KW warps of a slice
    merge_xor(b, sm, 4, 32);
    __syncthreads(); // every warp is done with the stages: reuse them
    float *rb = (float *)smem, *rl = rb + KW * NSP * 32;
    if (lane < 4)
#pragma unroll
        for (int c = 0; c < 8; c++) {
            uint32_t col = slice * 32 + (c / 2) * 8 + 2 * lane + c % 2;
            rb[kw * NSP * 32 + col] = b[c], rl[kw * NSP * 32 + col] = sm[c];
        }
    __syncthreads();
    for (uint32_t col = threadIdx.x; col < p.Rp; col += THREADS) {
        float B = -INFINITY, L = 0.0f;
        for (int w = 0; w < KW; w++) {
            float bo = rb[w * NSP * 32 + col], nb = fmaxf(B, bo);
            L = rebase(L, B, nb) + rebase(rl[w * NSP * 32 + col], bo, nb);
            B = nb;
        }
        bool ok = col_valid(p, col) && B != -INFINITY;
        m_out[col] = ok ? B * LN2 : -INFINITY; // natural-log units of the scaled logits, as merge reads them
        l_out[col] = ok ? L : 0.0f;
    }
}

// HPS: heads a slice's 32 columns hold (32 / nqp, or 1), known when compiled so that the
// segment sums unroll into straight-line code
// Pass 2 of one block: keys [c0, c1) of kv head g (c1 <= S) against the group's queries
// normalized by rowM/rowLnL (kv head g's merged rows). acc[j] = the sum over the group's heads
// of mean + gamma * var of key j's probabilities; e_sum gains the thread's share of
// sum p log2 p (the entropy is -ln 2 times the block's total; ENT false: left alone, one FMA
// an element saved where nobody reads it), v_sum of the variances. ST cp.async stages at smem,
// then the partial sums.
template <typename T, int KS, int NSP, int HPS, int ST, bool ENT = true>
__device__ void pass2_body(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                           const float *rowM, const float *rowLnL, float *acc, double &e_sum,
                           double &v_sum)
{
    using sh = shape<KS>;
    constexpr int KW = 8 / NSP;
    constexpr int NM = NSP >= 2 ? SCORE_MMA_NM : 1;
    constexpr uint32_t SEG = NSP * HPS; // (slice, head within slice) partial sums per key
    float *part = (float *)(smem + ST * sh::STAGE_BYTES); // [2][TK][SEG][2]
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % NSP, kw = warp / NSP;
    uint32_t nt = (c1 - c0 + TK - 1) / TK;
    uint32_t bq[4][KS][2];
    load_bfrag<T, KS>(p, g, slice, lane, bq);
    float B2[8]; // log2 of each column's normalizer, prescaled; padding gets no probability
    uint32_t vbits = 0; // which of the thread's 8 columns are queries
#pragma unroll
    for (int c = 0; c < 8; c++) {
        uint32_t col = slice * 32 + (c / 2) * 8 + 2 * (lane % 4) + c % 2;
        bool ok = col_valid(p, col);
        B2[c] = ok ? (rowM[col] + rowLnL[col]) * LOG2E : 1e30f;
        vbits |= (uint32_t)ok << c;
    }
    // backwards: tile of step k is nt - 1 - k
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load_tile<KS>(p, g, c0 + (nt - 1 - s) * TK, c1, smem + s * sh::STAGE_BYTES);
        cp_async_commit();
    }
    float ent[NM * 2][2] = {}; // two chains per key the thread holds
    const float inq = 1.0f / p.nq, inq1 = p.nq > 1 ? 1.0f / (p.nq - 1) : 0.0f;
    // queries in a segment: the head's window when it fits the slice, else 32 (only a head's
    // last segment may hold fewer, and it is the one that gets padding)
    uint32_t seg_q = p.nqp <= 32 ? p.nq : (slice % p.sph == p.sph - 1 ? p.nq - (p.sph - 1) * 32 : 32);
    const float nseg = (float)seg_q, nseg_inv = 1.0f / seg_q;
    // the last segment of a head split over slices holds nq - (sph - 1) * 32 queries
    const float inlast = p.sph > 1 ? 1.0f / (p.nq - (p.sph - 1) * 32) : 0.0f;
    // Per key of a finished step: each head's mean and unbiased variance over its queries.
    // Two threads a key (every thread of the block: the warps finish together), half of the
    // group's heads each, summed over the pair.
    static_assert(THREADS == 2 * TK, "two threads a key");
    auto finish = [&](uint32_t k) {
        uint32_t kk = threadIdx.x / 2, half = threadIdx.x % 2;
        uint32_t j = c0 + (nt - 1 - k) * TK + kk;
        const float *pp = part + ((size_t)(k & 1) * TK + kk) * SEG * 2;
        float I = 0.0f, V = 0.0f;
        if (j < c1)
            for (uint32_t h = half; h < p.G; h += 2) {
                float mean, m2;
                if (p.sph == 1) { // one segment: its deviations are the head's
                    mean = pp[h * 2] * inq, m2 = pp[h * 2 + 1];
                } else { // deviations about the head's mean from each segment's (Chan et al.)
                    const float *q = pp + h * p.sph * 2;
                    float s1 = 0.0f;
                    for (uint32_t u = 0; u < p.sph; u++)
                        s1 += q[u * 2];
                    mean = s1 * inq, m2 = 0.0f;
                    for (uint32_t u = 0; u < p.sph; u++) {
                        bool last = u == p.sph - 1;
                        float nu = last ? (float)(p.nq - u * 32) : 32.0f;
                        float dm = q[u * 2] * (last ? inlast : 1.0f / 32) - mean;
                        m2 += q[u * 2 + 1] + nu * dm * dm;
                    }
                }
                float var = m2 * inq1;
                I += p.mw * mean + p.gamma * var;
                V += var;
            }
        I += __shfl_xor_sync(0xffffffffu, I, 1);
        V += __shfl_xor_sync(0xffffffffu, V, 1);
        if (j < c1 && !half) {
            acc[j] = I;
            v_sum += V;
        }
    };
    for (uint32_t k = 0; k < nt; k++) {
        cp_async_wait<ST - 2>();
        __syncthreads();
        if (k + ST - 1 < nt)
            load_tile<KS>(p, g, c0 + (nt - 1 - (k + ST - 1)) * TK, c1,
                          smem + ((k + ST - 1) % ST) * sh::STAGE_BYTES);
        cp_async_commit();
        if (k)
            finish(k - 1);
        const uint8_t *st = smem + (k % ST) * sh::STAGE_BYTES;
        uint32_t j0 = c0 + (nt - 1 - k) * TK;
        bool full = j0 + TK <= c1;
        float *pk = part + (size_t)(k & 1) * TK * SEG * 2;
        for (uint32_t u = 0; u < (uint32_t)NSP; u += NM) {
            // m-tiles wholly past the chunk: none of their keys is read (a decode step's
            // prefix of k + 1 keys leaves one in its last tile)
            if (!full && (kw + u * KW) * 16 >= c1 - j0)
                continue;
            float acc[NM][4][4];
            mma_tiles<T, KS, NM>(st, kw + u * KW, KW, bq, acc, lane);
            // the thread's two keys of each m-tile; a tail tile's rows past the chunk count nothing
            // Per key and segment (a head's window queries within the slice): the sum of the
            // probabilities and the sum of squared deviations about the segment's mean, from
            // sums of the deviations from the segment's first probability p0 (quad lane 0's,
            // one shuffle): with p0 one of the values, the squares exceed the deviations about
            // the mean at most (n + 1)-fold, so the difference keeps its digits where plain
            // sums of squares cancel (peaked attention), and no reduction waits on another.
            auto epilogue = [&](auto tail, auto padded) {
#pragma unroll
                for (int i2 = 0; i2 < NM * 2; i2++) {
                    int mi = i2 / 2, e2 = i2 % 2;
                    uint32_t row = (kw + (u + mi) * KW) * 16 + lane / 4 + e2 * 8;
                    bool live = j0 + row < c1; // rows past the chunk (zero filled) count nothing
                    float(&pv)[4][4] = acc[mi]; // probabilities replace the logits
#pragma unroll
                    for (int t = 0; t < 4; t++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float x = fmaf(pv[t][e2 * 2 + e], p.c2, -B2[t * 2 + e]), pr = ex2(x);
                            if (decltype(tail)::value)
                                pr = live ? pr : 0.0f, x = live ? x : 0.0f;
                            pv[t][e2 * 2 + e] = pr;
                            if (ENT)
                                ent[i2][e] = fmaf(pr, x, ent[i2][e]);
                        }
                    // the 4 n-tiles hold HPS segments: each one's sums, then the quad's
#pragma unroll
                    for (int hs = 0; hs < HPS; hs++) {
                        constexpr int TS = 4 / HPS; // n-tiles a segment
                        float p0 = __shfl_sync(0xffffffffu, pv[hs * TS][e2 * 2], lane & ~3u);
                        float s1[2] = {-0.0f, -0.0f}, s2[2] = {0.0f, 0.0f};
#pragma unroll
                        for (int t = hs * TS; t < hs * TS + TS; t++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                float dl = pv[t][e2 * 2 + e] - p0;
                                if (decltype(padded)::value) // padding columns are no queries
                                    dl = (vbits >> (t * 2 + e)) & 1 ? dl : 0.0f;
                                s1[t % 2] += dl;
                                s2[t % 2] = fmaf(dl, dl, s2[t % 2]);
                            }
                        float a = s1[0] + s1[1], b = s2[0] + s2[1];
                        a += __shfl_xor_sync(0xffffffffu, a, 1);
                        b += __shfl_xor_sync(0xffffffffu, b, 1);
                        a += __shfl_xor_sync(0xffffffffu, a, 2);
                        b += __shfl_xor_sync(0xffffffffu, b, 2);
                        if (lane % 4 == 0) {
                            float *q = pk + ((size_t)row * SEG + slice * HPS + hs) * 2;
                            q[0] = fmaf(nseg, p0, a);                             // the sum
                            q[1] = fmaxf(fmaf(-a * nseg_inv, a, b), 0.0f);        // about the mean
                        }
                    }
                }
            };
            if (p.nq != p.nqp) {
                if (full)
                    epilogue(std::false_type(), std::true_type());
                else
                    epilogue(std::true_type(), std::true_type());
                continue;
            }
            if (full)
                epilogue(std::false_type(), std::false_type());
            else
                epilogue(std::true_type(), std::false_type());
        }
#pragma unroll
        for (int i = 0; i < NM * 2; i++)
            e_sum += ent[i][0] + ent[i][1], ent[i][0] = ent[i][1] = 0.0f;
    }
    cp_async_wait<0>();
    __syncthreads();
    if (nt)
        finish(nt - 1);
}

// Query columns padded per head to nqp: 8, 16 or 32 (a divisor of a warp's 32 columns) or
// a multiple of 32, so no n-tile mixes heads.
__host__ __device__ inline uint32_t pad_nq(uint32_t nq)
{
    uint32_t n8 = (nq + 7) / 8 * 8;
    if (n8 <= 32)
        return 32 % n8 ? 32 : n8;
    return (nq + 31) / 32 * 32;
}

// The fast divisor of tokens per page (load_tile): p.tpp_mul, p.tpp_shr.
__host__ __device__ inline void set_tpp(mparams &p, uint32_t tpp)
{
    uint32_t lg = 0;
    while ((1ull << lg) < tpp)
        lg++;
    p.tpp = tpp;
    p.tpp_mul = tpp <= 1 ? 0u : (uint32_t)(((1ull << (31 + lg)) + tpp - 1) / tpp);
    p.tpp_shr = tpp <= 1 ? 0u : lg - 1;
}

} // namespace smma

#endif
