// score_mma_dev.cuh - internal to the CUDA kernels: the device side of the scoring passes
// on mma.sync, and on Hopper's wgmma at one shape (score_mma.cu's plan, see there), as
// bodies a kernel runs over a range of one kv head's keys: score_mma.cu's passes (many
// blocks a head, partials merged after) and evict.cu's one-launch decode eviction (one block
// a head) share them. C++ only.
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

// byte offset of 16-byte piece v (of a key row's D8) of stage row r
template <int KS> __device__ __forceinline__ uint32_t swz(uint32_t r, uint32_t v)
{
    return (v / 8) * (uint32_t)shape<KS>::ATOM_BYTES + r * 128 + (((v % 8) ^ (r % 8)) << 4);
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

// Keys [j0, j0 + TK) of head g into a stage (rows at or past `end` zero filled) by cp.async:
// each warp copies TK / 8 consecutive rows; lane l finds row l's address once (its page from
// the fast divisor and the page table), and the warp's copies take it by shuffle, a row's
// 16-byte pieces on consecutive lanes (a per-thread walk over the pages cost ~280
// instructions a tile and thread).
template <int KS>
__device__ __forceinline__ void load_tile(const mparams &p, uint32_t g, uint32_t j0, uint32_t end, uint8_t *stage)
{
    using sh = shape<KS>;
    constexpr int RPW = TK / (THREADS / 32); // rows a warp copies
    constexpr int RPI = 32 / sh::D8;         // rows one copy instruction of the warp covers
    static_assert(RPW <= 32 && RPW % RPI == 0 && RPW % 8 == 0, "a warp's rows: one lane each");
    uint32_t lane = threadIdx.x % 32, r0 = threadIdx.x / 32 * RPW, j = j0 + r0 + lane % RPW;
    bool ok = j < end;
    uint64_t src = (uint64_t)p.base; // a valid address for the zero-filling copies
    if (ok)
        src += key_off(p, g, j);
    uint32_t v = lane % sh::D8, rl = lane / sh::D8, okr = __ballot_sync(0xffffffffu, ok) >> rl;
#pragma unroll
    for (int u = 0; u < RPW / RPI; u++) {
        uint64_t s = __shfl_sync(0xffffffffu, src, u * RPI + rl);
        cp_async16(stage + swz<KS>(r0 + u * RPI + rl, v), (const void *)(s + v * 16), (okr >> (u * RPI)) & 1);
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

// ---- pass 2 on Hopper's wgmma (sm_90a): the block's two warpgroups each multiply 64 keys of
// a stage by all 128 query columns of the kv head in one chain of 8 m64n128k16 (A the keys,
// B the queries, both from shared memory in the stages' 128-byte swizzled rows, which are
// wgmma's K-major layout with a 128-byte swizzle), so no query fragments sit in registers
// and the tensor work is 8 instructions a warpgroup and stage, not 128 mma.sync a warp. A
// thread then holds 2 keys x 32 columns: every head's 8 values of its keys, so a key's sum
// over the heads needs one quad's shuffles and no shared memory (no `part`, no finish).
// The shape: head_dim 128, 4 heads of 32 window rows a kv head (8B models' GQA with CAKE's
// default window), the queries' 32 KB beside ST stages. Compiled for other targets (no
// wgmma) the same entry runs pass2_body, the queries' room holding its partial sums.
__host__ __device__ constexpr bool wg_shape(uint32_t ks, uint32_t G, uint32_t nq, uint32_t nqp)
{
    return ks == 8 && G == 4 && nq == 32 && nqp == 32;
}
constexpr size_t WG_Q_BYTES = 2 * (size_t)TK * 128; // 128 query rows, two 64-element atoms
static_assert(WG_Q_BYTES >= (size_t)2 * TK * 4 * 1 * 2 * sizeof(float), "the fallback's partial sums fit");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// a K-major operand in 128-byte swizzled rows: 8-row groups 1024 bytes apart
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr)
{
    return (uint64_t)((saddr & 0x3ffff) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
           (uint64_t)1 << 62;
}
template <typename T> __device__ __forceinline__ void wg_mma(float (&d)[64], uint64_t da, uint64_t db, int acc);
template <> __device__ __forceinline__ void wg_mma<__nv_bfloat16>(float (&d)[64], uint64_t da, uint64_t db, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(acc));
}
template <> __device__ __forceinline__ void wg_mma<__half>(float (&d)[64], uint64_t da, uint64_t db, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(acc));
}
// The same with A (64 rows x 16) in registers, mma.sync's m16n8k16 A fragment for each warp's
// 16 rows: {a0, a1, a2, a3} = rows r, r + 8 at k 2 (lane % 4), then both at k + 8.
template <typename T> __device__ __forceinline__ void wg_mma_ra(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc);
#define CAKE_WG_MMA_RA(TY, PTX)                                                                                              \
    template <> __device__ __forceinline__ void wg_mma_ra<TY>(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc) \
    {                                                                                                                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                           \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));                                            \
    }
CAKE_WG_MMA_RA(__nv_bfloat16, "bf16")
CAKE_WG_MMA_RA(__half, "f16")
#undef CAKE_WG_MMA_RA
#endif

// pass2_body's contract (keys [c0, c1) of kv head g, acc[j], e_sum, v_sum) for wg_shape's
// shape, with ST stages and then WG_Q_BYTES of the queries at smem.
template <typename T, int ST, bool ENT = true>
__device__ void pass2_body_wg(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                              const float *rowM, const float *rowLnL, float *acc, double &e_sum,
                              double &v_sum)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using sh = shape<8>;
    uint8_t *qs = smem + ST * sh::STAGE_BYTES;
    uint32_t tid = threadIdx.x, wg = tid / 128, wi = tid % 128 / 32, lane = tid % 32;
    uint32_t nt = (c1 - c0 + TK - 1) / TK;
    for (uint32_t x = tid; x < 128 * 16; x += THREADS) { // column c's row, 16 pieces
        uint32_t c = x / 16, v = x % 16;
        const uint8_t *row = p.ring_off ? ring_row(p, g * p.G + c / p.nqp, (p.first + c % p.nqp) % p.w)
                                        : (const uint8_t *)p.q + ((size_t)g * p.G * p.nq + c) * p.d * 2;
        cp_async16(qs + swz<8>(c, v), row + v * 16, true);
    }
    // backwards, as pass2_body (the tail pass 1 read last is still in L2)
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load_tile<8>(p, g, c0 + (nt - 1 - s) * TK, c1, smem + s * sh::STAGE_BYTES);
        cp_async_commit();
    }
    float B2[32]; // the thread's columns 8i + 2 (lane % 4) + e: log2 of their normalizers
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            uint32_t c = 8 * i + 2 * (lane % 4) + e;
            B2[2 * i + e] = (rowM[c] + rowLnL[c]) * LOG2E;
        }
    const float nq = (float)p.nq, inq = 1.0f / p.nq, inq1 = 1.0f / (p.nq - 1);
    uint32_t qa = (uint32_t)__cvta_generic_to_shared(qs);
    for (uint32_t k = 0; k < nt; k++) {
        cp_async_wait<ST - 2>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // cp.async -> wgmma
        __syncthreads();
        if (k + ST - 1 < nt)
            load_tile<8>(p, g, c0 + (nt - 1 - (k + ST - 1)) * TK, c1,
                         smem + ((k + ST - 1) % ST) * sh::STAGE_BYTES);
        cp_async_commit();
        uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem + (k % ST) * sh::STAGE_BYTES) + wg * 64 * 128;
        uint32_t j0 = c0 + (nt - 1 - k) * TK;
        float d[64]; // the first step overwrites it (scale-d 0)
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < 8; kk++) { // k16 steps: 32 bytes into an atom's rows, 4 an atom
            uint32_t off = (kk / 4) * (uint32_t)sh::ATOM_BYTES + (kk % 4) * 32;
            wg_mma<T>(d, wg_desc(sa + off), wg_desc(qa + off), kk > 0);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < 64; i++) // the accumulators are read after the wait, not before
            asm volatile("" : "+f"(d[i])::"memory");
        float ent[2] = {0.0f, 0.0f};
        // a tile wholly inside the chunk needs no test of its keys (two selects a probability)
        auto epilogue = [&](auto tail) {
#pragma unroll
            for (int e2 = 0; e2 < 2; e2++) { // the thread's keys: rows lane / 4 and + 8 of its warp's 16
                uint32_t j = j0 + wg * 64 + wi * 16 + lane / 4 + e2 * 8;
                bool live = !decltype(tail)::value || j < c1;
                float I = 0.0f, V = 0.0f;
#pragma unroll
                for (int h = 0; h < 4; h++) { // head h: n8 chunks 4h..4h+3, two columns each
                    float pv[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int i = 4 * h + u / 2, e = u % 2;
                        float x = fmaf(d[4 * i + 2 * e2 + e], p.c2, -B2[2 * i + e]), pr = ex2(x);
                        if (decltype(tail)::value)
                            pr = live ? pr : 0.0f, x = live ? x : 0.0f;
                        pv[u] = pr;
                        if (ENT)
                            ent[e] = fmaf(pr, x, ent[e]);
                    }
                    // deviations from the head's first probability (quad lane 0's), as pass2_body
                    float p0 = __shfl_sync(0xffffffffu, pv[0], lane & ~3u);
                    float s1[2] = {0.0f, 0.0f}, s2[2] = {0.0f, 0.0f};
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        float dl = pv[u] - p0;
                        s1[u % 2] += dl, s2[u % 2] = fmaf(dl, dl, s2[u % 2]);
                    }
                    float a = s1[0] + s1[1], b = s2[0] + s2[1];
                    a += __shfl_xor_sync(0xffffffffu, a, 1);
                    b += __shfl_xor_sync(0xffffffffu, b, 1);
                    a += __shfl_xor_sync(0xffffffffu, a, 2);
                    b += __shfl_xor_sync(0xffffffffu, b, 2);
                    float mean = fmaf(nq, p0, a) * inq, var = fmaxf(fmaf(-a * inq, a, b), 0.0f) * inq1;
                    I += p.mw * mean + p.gamma * var;
                    V += var;
                }
                if (live && lane % 4 == 0) {
                    acc[j] = I;
                    v_sum += V;
                }
            }
        };
        if (j0 + TK <= c1)
            epilogue(std::false_type());
        else
            epilogue(std::true_type());
        if (ENT)
            e_sum += ent[0] + ent[1];
    }
    cp_async_wait<0>();
    __syncthreads(); // the stages are free for the caller
#else
    pass2_body<T, 8, 4, 1, ST, ENT>(p, g, c0, c1, smem, rowM, rowLnL, acc, e_sum, v_sum);
#endif
}

// Pass 1 on wgmma (pass1_body's contract: keys [c0, c1) of kv head g, each query column's
// max and exp-sum to m_out, l_out; wg_shape's shape, ST stages at smem). Oriented the other
// way from pass 2: the queries are A, in registers (warpgroup wg's 64 rows: its two heads),
// the stage's 128 keys B, so a thread's 64 accumulators are 2 query rows x 32 keys and its
// running max and sum are 2 pairs of registers; a row's four lanes merge once at the end
// (no shared memory, no cross-warp finish), and the queries take no shared memory, so three
// stages fit two blocks an SM. The base of a row's sum (log2 units) rises lazily: a tile's
// terms are summed against the base as it stands, and only where that sum passes 2^16 (some
// term then passes 2^11; on the first tile the base is -inf and the sum inf or NaN) is the
// tile's max taken and the sum redone against it: no term kept is above 2^16, none
// overflows, and the common tile costs an FMA, an exponential and an add a term.
template <typename T, int ST>
__device__ void pass1_body_wg(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                              float *m_out, float *l_out)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using sh = shape<8>;
    uint32_t tid = threadIdx.x, wg = tid / 128, wi = tid % 128 / 32, lane = tid % 32;
    uint32_t nt = (c1 - c0 + TK - 1) / TK, clean = min(c1, p.wb + 1); // keys below clean: no mask
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load_tile<8>(p, g, c0 + s * TK, c1, smem + s * sh::STAGE_BYTES);
        cp_async_commit();
    }
    // the thread's query rows: column 64 wg + 16 wi + lane / 4 and 8 more (head c / 32, window row c % 32)
    uint32_t qa[8][4];
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        uint32_t c = 64 * wg + 16 * wi + lane / 4 + 8 * e2;
        const T *row = p.ring_off ? (const T *)ring_row(p, g * p.G + c / p.nqp, (p.first + c % p.nqp) % p.w)
                                  : (const T *)p.q + ((size_t)g * p.G * p.nq + c) * p.d;
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            qa[kk][e2] = *(const uint32_t *)(row + kk * 16 + 2 * (lane % 4));
            qa[kk][2 + e2] = *(const uint32_t *)(row + kk * 16 + 8 + 2 * (lane % 4));
        }
    }
    const uint32_t qi[2] = {(16 * wi + lane / 4) % 32, (16 * wi + lane / 4 + 8) % 32}; // window rows
    float b[2] = {-INFINITY, -INFINITY}, sm[2] = {0.0f, 0.0f};
    for (uint32_t k = 0; k < nt; k++) {
        cp_async_wait<ST - 2>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // cp.async -> wgmma
        __syncthreads();
        if (k + ST - 1 < nt)
            load_tile<8>(p, g, c0 + (k + ST - 1) * TK, c1, smem + ((k + ST - 1) % ST) * sh::STAGE_BYTES);
        cp_async_commit();
        uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem + (k % ST) * sh::STAGE_BYTES);
        uint32_t j0 = c0 + k * TK;
        float d[64]; // the first step overwrites it (scale-d 0)
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            wg_mma_ra<T>(d, qa[kk], wg_desc(sa + (kk / 4) * (uint32_t)sh::ATOM_BYTES + (kk % 4) * 32), kk > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < 64; i++) // the accumulators are read after the wait, not before
            asm volatile("" : "+f"(d[i])::"memory");
        if (j0 + TK > clean) // keys past the chunk, or window keys a query must not see: -inf
#pragma unroll
            for (int i = 0; i < 16; i++)
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        uint32_t j = j0 + 8 * i + 2 * (lane % 4) + e;
                        if (j >= c1 || j > p.wb + qi[e2])
                            d[4 * i + 2 * e2 + e] = -INFINITY;
                    }
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) { // row e2: d[4 i + 2 e2 + e], key 8 i + 2 (lane % 4) + e
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                s0 += ex2(fmaf(d[4 * i + 2 * e2], p.c2, -b[e2]));
                s1 += ex2(fmaf(d[4 * i + 2 * e2 + 1], p.c2, -b[e2]));
            }
            float s = s0 + s1;
            if (!(s <= 65536.0f)) { // the first tile, or a term past 2^11: the tile's max as base
                float tm = -INFINITY;
#pragma unroll
                for (int i = 0; i < 32; i++)
                    tm = fmaxf(tm, d[4 * (i / 2) + 2 * e2 + i % 2]);
                float nb = fmaxf(b[e2], tm * p.c2);
                s = 0.0f;
                if (nb != -INFINITY) { // else every key so far masked: nothing to add
                    sm[e2] = rebase(sm[e2], b[e2], nb);
                    b[e2] = nb;
#pragma unroll
                    for (int i = 0; i < 32; i++)
                        s += ex2(fmaf(d[4 * (i / 2) + 2 * e2 + i % 2], p.c2, -nb));
                }
            }
            sm[e2] += s;
        }
    }
    cp_async_wait<0>();
    merge_xor(b, sm, 1, 4); // a row's 32 keys a tile are on its quad's four lanes
    if (lane % 4 == 0)
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
            uint32_t c = 64 * wg + 16 * wi + lane / 4 + 8 * e2;
            bool ok = b[e2] != -INFINITY;
            m_out[c] = ok ? b[e2] * LN2 : -INFINITY; // natural-log units, as pass1_body
            l_out[c] = ok ? sm[e2] : 0.0f;
        }
    __syncthreads(); // the stages are free for the caller
#else
    pass1_body<T, 8, 4, ST>(p, g, c0, c1, smem, m_out, l_out);
#endif
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
