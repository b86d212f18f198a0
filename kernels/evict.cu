// evict.cu - a decode step's eviction in one launch (see kern_cuda.h): one block per (layer,
// kv head) scores the layer's prefix against the window's queries read from the paged ring
// (score_mma_dev.cuh's two passes over the whole head), pools, picks the top k and compacts
// the head's K/V in place - the work that took a ring gather, the scoring passes, a merge,
// a pooling, a top-k and a compaction launch per layer, each issued by the host.
//
// The block keeps its head's indicator in shared memory beside two cp.async stages (two
// blocks fit an SM at 8B shapes with 1K-token caches). Top-k is a radix select over the
// indicator's sort keys (4 passes of 8 bits) and one ordered scan that lists the kept and
// the evicted slots (where at most 16 go, as a decode step's one a head: a block minimum a
// removed slot, select_dev.cuh's topk_few); the compaction then moves tokens down in rounds
// that read every source before writing any destination (a source is never below its
// destination, so no round overwrites what a later one reads), the next round's reads in
// flight while one is written.
// With a job's `order` the prefix's slots need not follow position order: the scores are
// pooled and ranked in position order through it, the holes below k take the kept tokens
// from k on (a bitmap of the removed slots and its words' counts find the i-th of either),
// only those and the window move, and the order is rewritten for the slots left.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "kern.h"
#include "kern_cuda.h"
#include "score_mma.h"
#include "score_mma_dev.cuh"
#include "score_wg_dev.cuh"
#include "select_dev.cuh"

using namespace smma;
static_assert(THREADS == seldev::THREADS, "a histogram bin a thread");

namespace {

constexpr int EST = 2; // cp.async stages
// the newest row alone (carried log-sum-exps): one query a head, padded to 8 columns; its
// pass 1 runs over nsp1(NSP) slices of 32 columns (a quarter of the full window's at w = 32)
constexpr uint32_t NQP1 = 8;
__host__ __device__ constexpr int nsp1(int nsp) { return nsp >= 4 ? nsp / 4 : 1; }

struct eparams {
    kern_cuda_evict e;
    const kern_cuda_evict_job *jobs;
    uint32_t nqp, Rp, hps, sph, max_S;
    size_t stage_bytes, part_bytes;
    float scale, c2;
};

__device__ __forceinline__ unsigned long long global_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned smid()
{
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}

// slot t of kv head g (as load_tile finds it)
__device__ __forceinline__ uint8_t *slot_ptr(const mparams &p, uint32_t g, uint32_t t)
{
    return (uint8_t *)p.base + key_off(p, g, t);
}

// where the carried log-sum-exp of q head h of kv head g's group, window row i (oldest
// first), sits in a job's lse ([q_heads][w] by ring slot)
__device__ __forceinline__ size_t lse_at(const mparams &p, uint32_t g, uint32_t h, uint32_t i)
{
    return (size_t)(g * p.G + h) * p.w + (p.first + i) % p.w;
}

// The t-th set bit (t-th clear bit with CLEAR) of the bitmap bits[0..nw) whose words' set
// bits before each are cnt[0..nw): that many exist (the caller's count says so).
template <bool CLEAR>
__device__ __forceinline__ uint32_t nth_bit(const uint32_t *bits, const uint32_t *cnt, uint32_t nw,
                                            uint32_t t)
{
    uint32_t lo = 0, hi = nw - 1; // the last word whose count before it is at most t
    while (lo < hi) {
        uint32_t mid = (lo + hi + 1) / 2, before = CLEAR ? 32 * mid - cnt[mid] : cnt[mid];
        if (before <= t)
            lo = mid;
        else
            hi = mid - 1;
    }
    uint32_t b = CLEAR ? ~bits[lo] : bits[lo];
    for (uint32_t j = t - (CLEAR ? 32 * lo - cnt[lo] : cnt[lo]); j; j--)
        b &= b - 1;
    return 32 * lo + (uint32_t)(__ffs(b) - 1);
}

// the slot of kv head g's r-th prefix token in position order (kern_cuda_evict_job.order)
__device__ __forceinline__ uint32_t ord_at(const kern_cuda_evict_job &job, uint32_t g, uint32_t r)
{
    return r < job.order_n ? job.order[(size_t)g * job.order_cap + r] : r;
}

// set bits of bits[] below slot s
__device__ __forceinline__ uint32_t bits_before(const uint32_t *bits, const uint32_t *cnt, uint32_t s)
{
    return cnt[s / 32] + (s % 32 ? (uint32_t)__popc(bits[s / 32] & ((1u << (s % 32)) - 1)) : 0u);
}

// The window rows' log-sum-exps over the cache the step leaves, to job.lse by ring slot: each
// row's (rowM + rowL, natural-log units) less the evicted keys' terms, ln(1 - sum of
// exp(s_e - lse)); NaN where those held more than half of the row's weight (the difference
// would lose its digits: the next step runs pass 1) or no scoring ran (k = 0). A thread a
// row; the evicted keys go through the stages, EC at a time. Ends with the block synced.
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }

template <typename T, int KS>
__device__ void lse_out(const mparams &p, uint32_t g, const kern_cuda_evict_job &job, uint32_t k,
                        const float *rowM, const float *rowL, uint8_t *smem)
{
    typedef typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type T2;
    constexpr uint32_t EC = 32, PIECES = 2 * KS; // 16-byte pieces a row
    uint32_t tid = threadIdx.x, S = p.S, ne = S - k, h = tid / p.nq, i = tid % p.nq;
    bool mine = tid < p.G * p.nq;
    float L = mine && k ? rowM[h * p.nqp + i] + rowL[h * p.nqp + i] : NAN, sum = 0.0f;
    const uint4 *qr = mine ? (const uint4 *)ring_row(p, g * p.G + h, (p.first + i) % p.w) : NULL;
    const uint32_t *evl = job.evicted + (size_t)g * ne;
    for (uint32_t e0 = 0; k && e0 < ne; e0 += EC) {
        uint32_t n = ne - e0 < EC ? ne - e0 : EC;
        for (uint32_t x = tid; x < n * PIECES; x += THREADS)
            ((uint4 *)smem)[x] = *(const uint4 *)(p.base + key_off(p, g, evl[e0 + x / PIECES]) + x % PIECES * 16);
        __syncthreads();
        if (mine)
            for (uint32_t t = 0; t < n; t++) {
                const uint4 *kr = (const uint4 *)smem + (size_t)t * PIECES;
                float dot = 0.0f;
#pragma unroll
                for (uint32_t v = 0; v < PIECES; v++) {
                    uint4 a = qr[v], b = kr[v]; // unrolled: the row's loads all in flight
                    const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        float2 x = to_f2(*(const T2 *)&av[c]), y = to_f2(*(const T2 *)&bv[c]);
                        dot = fmaf(x.x, y.x, fmaf(x.y, y.y, dot));
                    }
                }
                sum += expf(dot * p.scale - L);
            }
        __syncthreads();
    }
    if (mine)
        job.lse[lse_at(p, g, h, i)] = sum <= 0.5f ? L + log1pf(-sum) : NAN;
    __syncthreads();
}

// WG: passes 1 and 2 on wgmma (score_wg_dev.cuh's pass1_body_wg and pass2_body_wg; their
// shape only), a kernel of its own so that neither body's registers weigh on the other
template <typename T, int KS, int NSP, int HPS, bool WG = false>
__global__ void __launch_bounds__(THREADS, 2) devict(eparams ep, const __grid_constant__ wg_tma tm)
{
    extern __shared__ uint4 smem4[];
    uint8_t *smem = smem_aligned(smem4);
    __shared__ seldev::smem sel;
    __shared__ mparams sp, sp1; // sp1: the newest row alone (carried log-sum-exps)
    __shared__ kern_cuda_evict_job job;
    const kern_cuda_evict &e = ep.e;
    uint32_t g = blockIdx.x, tid = threadIdx.x;
    if (tid == 0) {
        job = ep.jobs[blockIdx.y];
        mparams q = {};
        q.base = e.base, q.page_off = job.page_off;
        set_tpp(q, e.tokens_per_page);
        q.n = job.n_tokens, q.wb = job.n_tokens - e.n_q, q.d = e.head_dim;
        q.G = e.q_heads / e.kv_heads, q.nq = e.n_q, q.nqp = ep.nqp, q.Rp = ep.Rp;
        q.hps = ep.hps, q.sph = ep.sph, q.S = job.n_tokens - e.w;
        q.scale = ep.scale, q.c2 = ep.c2;
        q.mw = e.var_only ? 0.0f : 1.0f, q.gamma = e.var_only ? 1.0f : e.gamma;
        q.ring_off = job.ring_off, q.w = e.w, q.rpp = e.ring_rows_per_page;
        q.hpp = e.ring_heads_per_page, q.pph = e.ring_pages_per_head, q.first = e.first;
        sp = q;
        q.nq = 1, q.nqp = NQP1, q.Rp = q.G * NQP1, q.hps = 32 / NQP1, q.sph = 1;
        q.first = (e.first + e.n_q - 1) % e.w, q.wb = job.n_tokens - 1;
        sp1 = q;
    }
    __syncthreads();
    const mparams &p = sp;
    uint32_t S = p.S, k = job.k;
    if (job.n_tokens <= e.w || S > ep.max_S || k >= S) {
        // the host checks these (kern_cuda_decode_evict's contract): nothing to do, but no
        // row's log-sum-exp is known (the newest was never computed): none carried next step
        for (uint32_t c = tid; job.lse && c < p.G * p.nq; c += THREADS)
            job.lse[lse_at(p, g, c / p.nq, c % p.nq)] = NAN;
        return;
    }
    // the block's phase i ends (0: it starts); the pointer is read from the parameters at
    // each mark, so no register holds it through the kernel (held, it spilled)
    auto mark = [&](int i) { // i past KERN_EVICT_PHASES: the global timer, then the SM
        if (ep.e.phase_clock && threadIdx.x == 0)
            ep.e.phase_clock[((size_t)blockIdx.y * gridDim.x + blockIdx.x) * KERN_EVICT_CLOCKS + i] =
                i == KERN_EVICT_PHASES + 3 ? smid() : i > KERN_EVICT_PHASES ? global_ns() : clock64();
    };
    mark(KERN_EVICT_PHASES + 3);
    mark(KERN_EVICT_PHASES + 1);
    mark(0);
    float *acc = (float *)(smem + ep.stage_bytes + ep.part_bytes), *ind = acc + ep.max_S;
    float *rowM = ind + ep.max_S, *rowL = rowM + p.Rp, *m1 = rowL + p.Rp, *l1 = m1 + sp1.Rp;

    // ---- scoring: pass 1 over every key (or the newest row's alone, the others' log-sum-exps
    // carried from the step before), pass 2 over the prefix, the pooling
    uint32_t need = 0; // k = 0 (or no indicator): every slot goes
    if (k || job.ind) {
        int bad = !(job.lse && job.carry && p.nq > 1 && sp1.Rp <= nsp1(NSP) * 32);
        if (!bad) // every older row's value finite (a NaN: not carried; run pass 1)
            for (uint32_t c = tid; c < p.G * (p.nq - 1); c += THREADS)
                bad |= !isfinite(job.lse[lse_at(p, g, c / (p.nq - 1), c % (p.nq - 1))]);
        if (!__syncthreads_or(bad)) {
            // the newest row's from the engine where every one of the group's is finite
            int given = job.lse_new != NULL;
            for (uint32_t h = tid; given && h < p.G; h += THREADS)
                given = isfinite(job.lse_new[g * p.G + h]);
            given = __syncthreads_and(given);
            if (!given) {
                pass1_body<T, KS, nsp1(NSP), EST>(sp1, g, 0, p.n, smem, m1, l1);
                __syncthreads();
            }
            for (uint32_t c = tid; c < p.Rp; c += THREADS) { // natural-log units, rowL = 0
                uint32_t h = c / p.nqp, i = c % p.nqp;
                float v = -INFINITY;
                if (i + 1 == p.nq && given)
                    v = job.lse_new[g * p.G + h];
                else if (i + 1 == p.nq)
                    v = l1[h * NQP1] > 0.0f ? m1[h * NQP1] + logf(l1[h * NQP1]) : -INFINITY;
                else if (i < p.nq)
                    v = job.lse[lse_at(p, g, h, i)];
                rowM[c] = v, rowL[c] = 0.0f;
            }
        } else {
            if constexpr (WG)
                pass1_body_wg<T, EST>(p, g, 0, p.n, smem, rowM, rowL, &tm);
            else
                pass1_body<T, KS, NSP, EST>(p, g, 0, p.n, smem, rowM, rowL);
            __syncthreads();
            for (uint32_t c = tid; c < p.Rp; c += THREADS)
                rowL[c] = rowL[c] > 0.0f ? logf(rowL[c]) : -INFINITY;
        }
        __syncthreads();
        mark(1);
        double e_sum = 0.0, v_sum = 0.0; // a step reads neither
        if constexpr (WG)
            pass2_body_wg<T, EST, false>(p, g, 0, S, smem, rowM, rowL, acc, e_sum, v_sum, &tm);
        else
            pass2_body<T, KS, NSP, HPS, EST, false>(p, g, 0, S, smem, rowM, rowL, acc, e_sum, v_sum);
        __syncthreads();
        if (job.order && job.order_n) { // the slots' sums in position order, for the pooling
            for (uint32_t j = tid; j < S; j += THREADS)
                ind[j] = acc[ord_at(job, g, j)];
            __syncthreads();
            for (uint32_t j = tid; j < S; j += THREADS)
                acc[j] = ind[j];
            __syncthreads();
        }
        // score.cu's pooling (pool_value), to the same rounding; then the group mean
        float post = 1.0f / p.G;
        for (uint32_t j = tid; j < S; j += THREADS) {
            float v = pool_value(acc, S, j, e.pool, e.radius);
            ind[j] = v * post;
            if (job.ind)
                job.ind[(size_t)g * S + j] = ind[j];
        }
        __syncthreads();
        need = k;
    } else {
        mark(1);
    }
    mark(2);

    // ---- top-k and one ordered walk: kept slots (for the compaction) and evicted ones (the
    // answer; select_dev.cuh) - ranks in position order where the job fills holes
    uint32_t *keep_src = (uint32_t *)acc; // the raw sums are no longer read
    uint32_t *evg = job.evicted + (size_t)g * (S - k);
    uint32_t first = need && S - need <= seldev::FEW ? seldev::topk_few(ind, S, need, keep_src, evg, sel)
                                                     : seldev::topk_list<4>(ind, S, need, keep_src, evg, sel);
    __syncthreads();
    // holes filled (job.order): the removed slots' bitmap and each word's count of set bits
    // before it ([0, nw]: the last the total); hole i takes hsrc[i]
    const bool fill = job.order != NULL;
    uint32_t *ebits = (uint32_t *)(ind + ep.max_S + 2 * p.Rp + 2 * sp1.Rp), *ecnt = ebits + ep.max_S / 32 + 2;
    uint32_t nh = 0, *hole = keep_src, *hsrc = keep_src;
    if (fill) {
        auto ord = [&](uint32_t r) { return ord_at(job, g, r); };
        // the removed ranks' slots in a bitmap, its words' counts before each
        uint32_t nw = (S + 31) / 32, per = (nw + THREADS - 1) / THREADS;
        for (uint32_t x = tid; x < nw; x += THREADS)
            ebits[x] = 0;
        __syncthreads();
        for (uint32_t i = tid; i < S - k; i += THREADS) {
            uint32_t s = ord(evg[i]);
            atomicOr(&ebits[s / 32], 1u << (s % 32));
        }
        __syncthreads();
        uint32_t c0 = tid * per < nw ? tid * per : nw, c1 = c0 + per < nw ? c0 + per : nw, mine = 0;
        for (uint32_t x = c0; x < c1; x++)
            mine += (uint32_t)__popc(ebits[x]);
        cub::BlockScan<uint32_t, THREADS>(sel.scan).ExclusiveSum(mine, mine);
        for (uint32_t x = c0; x < c1; x++)
            ecnt[x] = mine, mine += (uint32_t)__popc(ebits[x]);
        if (tid == 0)
            ecnt[nw] = S - k;
        __syncthreads();
        // the new order: the kept ranks' slots (ascending by position), a slot from k on
        // taking the hole it fills (the t-th kept slot from k fills the t-th hole)
        nh = k < S ? bits_before(ebits, ecnt, k) : 0;
        uint32_t *nord = (uint32_t *)ind; // the indicator is no longer read
        for (uint32_t i = tid; i < k; i += THREADS) {
            uint32_t s = ord(keep_src[i]);
            nord[i] = s < k ? s : nth_bit<false>(ebits, ecnt, nw, s - bits_before(ebits, ecnt, s) - (k - nh));
        }
        __syncthreads(); // every read of the old order and of the ranks done
        for (uint32_t x = tid; x < nw; x += THREADS) // the removed slots, ascending: the answer
            for (uint32_t b = ebits[x], at = ecnt[x]; b; b &= b - 1)
                evg[at++] = 32 * x + (uint32_t)(__ffs(b) - 1);
        for (uint32_t i = tid; i < k; i += THREADS)
            job.order[(size_t)g * job.order_cap + i] = nord[i];
        hole = keep_src, hsrc = keep_src + nh; // both at most half the prefix
        for (uint32_t t = tid; t < nh; t += THREADS)
            hole[t] = nth_bit<false>(ebits, ecnt, nw, t), hsrc[t] = nth_bit<true>(ebits, ecnt, nw, k - nh + t);
        __syncthreads();
    }
    if (job.lse) // before the compaction moves the evicted keys' slots
        lse_out<T, KS>(p, g, job, k, rowM, rowL, smem);
    mark(3);

    // ---- compaction: slot i < k gets keep_src[i], slot k + i the window's i-th; slots
    // below the first evicted one stay (holes filled: hole[i] gets hsrc[i], then the window
    // moves; nothing else). Move x of the list: rounds of CH moves through the two halves of
    // the stages, a warp's lanes on one token's pieces (its page looked up once, a broadcast):
    // every piece of a round comes in by cp.async, unrolled so the loads are all in flight
    // at once (a load then a shared store a piece, in a loop, waited on memory's latency
    // every piece: 120 us for a head whose first slot went), and round r + 1's copies are
    // issued before round r is written out. That needs no more care than the rounds did: a
    // source is never below its destination, so round r + 1's sources lie past every
    // destination of round r, and round r + 1 writes only after round r's sources were read.
    // Filling holes keeps that: the holes lie below k, where nothing is read; the window's
    // destination k + i is read (as a kept slot) only by an earlier move, and its source
    // S + i is written only by a later one.
    constexpr uint32_t VEC = 2 * KS, PER = 2 * VEC, TPI = 32 / PER; // pieces a row, a token (K, V)
    constexpr uint32_t CH = (uint32_t)(EST * shape<KS>::STAGE_BYTES / 2 / (16 * PER)); // tokens a round
    constexpr uint32_t TPW = CH / (THREADS / 32);                                     // a warp's
    constexpr size_t HALF = (size_t)CH * PER * 16;
    static_assert(32 % PER == 0 && TPW % TPI == 0 && 2 * HALF <= EST * shape<KS>::STAGE_BYTES, "rounds fit the stages");
    uint32_t moves = fill ? nh + e.w : k + e.w - first, warp = tid / 32, tl = tid % 32 / PER, r = tid % PER;
    size_t roff = (r / VEC) * e.v_offset_bytes + (r % VEC) * 16;
    auto dst_of = [&](uint32_t x) { return fill ? (x < nh ? hole[x] : k + x - nh) : first + x; };
    auto src_of = [&](uint32_t x) {
        uint32_t i = first + x;
        return fill ? (x < nh ? hsrc[x] : S + x - nh) : i < k ? keep_src[i] : S + i - k;
    };
    auto fetch = [&](uint32_t x0) {
        uint8_t *buf = smem + x0 / CH % 2 * HALF;
#pragma unroll
        for (uint32_t u = 0; u < TPW / TPI; u++) {
            uint32_t t = warp * TPW + u * TPI + tl, x = x0 + t;
            if (x < moves)
                cp_async16(buf + ((size_t)t * PER + r) * 16, slot_ptr(p, g, src_of(x)) + roff, true);
        }
        cp_async_commit(); // past the end an empty group: wait_group's counts stay right
    };
    fetch(0);
    for (uint32_t x0 = 0; x0 < moves; x0 += CH) {
        fetch(x0 + CH);
        cp_async_wait<1>();
        __syncthreads();
        const uint8_t *buf = smem + x0 / CH % 2 * HALF;
#pragma unroll
        for (uint32_t u = 0; u < TPW / TPI; u++) {
            uint32_t t = warp * TPW + u * TPI + tl, x = x0 + t;
            if (x < moves)
                *(uint4 *)(slot_ptr(p, g, dst_of(x)) + roff) = *(const uint4 *)(buf + ((size_t)t * PER + r) * 16);
        }
        __syncthreads(); // the buffer is fetched into again two rounds on
    }
    cp_async_wait<0>();
    mark(4);
    mark(KERN_EVICT_PHASES + 2);
}

struct plan {
    uint32_t G, nqp, Rp, hps, sph, nsp, ks, wg;
    size_t stage_bytes, part_bytes, smem;
};

int make_plan(const kern_cuda_evict *e, uint32_t max_S, plan *pl)
{
    if (!e || !e->kv_heads || !e->q_heads || e->q_heads % e->kv_heads || !e->w || !e->n_q ||
        e->n_q > e->w || e->first >= e->w || !e->tokens_per_page || !e->ring_rows_per_page ||
        !e->ring_heads_per_page || !e->ring_pages_per_head ||
        (e->ring_pages_per_head == 1 && e->ring_heads_per_page * e->w > e->ring_rows_per_page) ||
        e->pool < KERN_POOL_AVG || e->pool > KERN_POOL_NONE || e->radius > 1024 || !e->base)
        return -EINVAL;
    if ((e->dtype != KERN_BF16 && e->dtype != KERN_F16) || !score_mma_rows(e->q_heads / e->kv_heads, e->n_q, e->head_dim))
        return -ENOTSUP;
    plan p = {};
    p.G = e->q_heads / e->kv_heads;
    if (e->pool == KERN_POOL_MAX && p.G > 1) /* the reference pools each query head apart */
        return -ENOTSUP;
    p.nqp = pad_nq(e->n_q), p.Rp = p.G * p.nqp;
    p.hps = p.nqp < 32 ? 32 / p.nqp : 1, p.sph = p.nqp > 32 ? p.nqp / 32 : 1;
    uint32_t ns = (p.Rp + 31) / 32;
    p.nsp = ns <= 1 ? 1 : ns <= 2 ? 2 : ns <= 4 ? 4 : 8;
    p.ks = e->head_dim / 16;
    p.stage_bytes = EST * (p.ks == 8 ? shape<8>::STAGE_BYTES : shape<4>::STAGE_BYTES);
    p.part_bytes = (size_t)2 * TK * p.nsp * p.hps * 2 * sizeof(float);
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        cudaGetLastError();
        return -EIO;
    }
    p.wg = score_wg_on(dev) && wg_shape(p.ks, p.G, e->n_q, p.nqp);
    if (p.wg) /* the queries' tile takes part's place (and holds it where wgmma is not built) */
        p.part_bytes = WG_Q_BYTES;
    p.smem = SMEM_ALIGN + p.stage_bytes + p.part_bytes + 2 * sizeof(float) * ((size_t)max_S + p.Rp + p.G * NQP1) +
             2 * sizeof(uint32_t) * ((size_t)max_S / 32 + 2); /* the holes' bitmap, its counts */
    if (p.smem + 4096 > (size_t)optin) /* the static shared memory beside it */
        return -ENOTSUP;
    *pl = p;
    return 0;
}

template <typename T, int KS, int NSP, int HPS, bool WG = false>
int run(const eparams &ep, uint32_t kv_heads, uint32_t n_jobs, size_t smem, cudaStream_t st)
{
    static kern_attrs set[SCORE_MAX_DEV];
    int dev = 0;
    CK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= SCORE_MAX_DEV)
        return -EINVAL;
    /* all of the SM's shared memory: asked for when a launch's 114 us against 224-245 us
     * was put down to the carveout; it was where the data's evicted slots fell (the
     * compaction's length, kernels/README.md) - kept, as it never cost anything */
    if (int rc = smem_limit(devict<T, KS, NSP, HPS, WG>, set, dev, smem, 100))
        return rc;
    wg_tma tm;
    if (WG)
        tm = wg_tma_for(dev, ep.e.base, ep.e.tokens_per_page, ep.e.head_dim);
    else
        memset(&tm, 0, sizeof tm);
    devict<T, KS, NSP, HPS, WG><<<dim3(kv_heads, n_jobs), THREADS, smem, st>>>(ep, tm);
    CK(cudaGetLastError());
    return 0;
}

template <typename T, int KS, int NSP>
int run_h(const eparams &ep, const plan &pl, uint32_t n_jobs, cudaStream_t st)
{
    uint32_t hkv = ep.e.kv_heads;
    if constexpr (KS == 8 && NSP == 4)
        if (pl.wg) /* wg_shape: one segment a slice */
            return run<T, KS, NSP, 1, true>(ep, hkv, n_jobs, pl.smem, st);
    return pl.hps == 1 ? run<T, KS, NSP, 1>(ep, hkv, n_jobs, pl.smem, st)
         : pl.hps == 2 ? run<T, KS, NSP, 2>(ep, hkv, n_jobs, pl.smem, st)
                       : run<T, KS, NSP, 4>(ep, hkv, n_jobs, pl.smem, st);
}

template <typename T, int KS>
int run_ns(const eparams &ep, const plan &pl, uint32_t n_jobs, cudaStream_t st)
{
    switch (pl.nsp) {
    case 1: return run_h<T, KS, 1>(ep, pl, n_jobs, st);
    case 2: return run_h<T, KS, 2>(ep, pl, n_jobs, st);
    case 4: return run_h<T, KS, 4>(ep, pl, n_jobs, st);
    default: return run_h<T, KS, 8>(ep, pl, n_jobs, st);
    }
}

} // namespace

extern "C" int kern_cuda_decode_evict_check(const struct kern_cuda_evict *e, uint32_t max_S)
{
    plan pl;
    return make_plan(e, max_S, &pl);
}

extern "C" int kern_cuda_decode_evict(const struct kern_cuda_evict *e,
                                      const struct kern_cuda_evict_job *jobs_dev, uint32_t n_jobs,
                                      uint32_t max_S, void *stream)
{
    plan pl;
    int rc = make_plan(e, max_S, &pl);
    if (rc)
        return rc;
    if (!jobs_dev || n_jobs > 65535)
        return -EINVAL;
    if (!n_jobs)
        return 0;
    eparams ep = {};
    ep.e = *e, ep.jobs = jobs_dev, ep.nqp = pl.nqp, ep.Rp = pl.Rp, ep.hps = pl.hps, ep.sph = pl.sph;
    ep.max_S = max_S, ep.stage_bytes = pl.stage_bytes, ep.part_bytes = pl.part_bytes;
    ep.scale = 1.0f / sqrtf((float)e->head_dim), ep.c2 = ep.scale * LOG2E;
    cudaStream_t st = (cudaStream_t)stream;
    bool bf = e->dtype == KERN_BF16;
    if (pl.ks == 8)
        return bf ? run_ns<__nv_bfloat16, 8>(ep, pl, n_jobs, st) : run_ns<__half, 8>(ep, pl, n_jobs, st);
    return bf ? run_ns<__nv_bfloat16, 4>(ep, pl, n_jobs, st) : run_ns<__half, 4>(ep, pl, n_jobs, st);
}
