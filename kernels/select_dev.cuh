// select_dev.cuh - one block's top-k of one indicator row, listed in position order: the
// device code the one-launch eviction (evict.cu) and the one-pass compaction of many layers
// (compact.cu) share. A radix select finds the k-th largest sort key (4 passes of 8 bits over
// the row; a warp's lanes that fall in one bin add once), then one walk lists the kept slots
// (ascending) and the removed ones: each warp a contiguous chunk of the row, its offsets from
// the warps before it and its lanes' ballots (no block-wide scan inside the loop).
// Ties go to the lower position and NaN ranks lowest (select.cu's and kern_topk's
// KERN_ORDER_POSITION), so both equal the CPU's choice on the same row.
#pragma once

#include <cub/block/block_scan.cuh>
#include <stdint.h>

namespace seldev {

constexpr int THREADS = 256; // one histogram bin a thread

// kern.h's kern_sort_key on the device: larger floats larger keys, NaN lowest
__device__ __forceinline__ uint32_t sort_key(float f)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int WARPS = THREADS / 32;

constexpr uint32_t FEW = 16; // topk_few: at most this many slots removed

struct smem {
    typename cub::BlockScan<uint32_t, THREADS>::TempStorage scan;
    uint32_t hist[256], digit, need, first;
    uint32_t wgt[WARPS], weq[WARPS]; // each warp's keys above / at the threshold
    unsigned long long wmin[WARPS];  // topk_few: each warp's least
    uint32_t gone[FEW];              // topk_few: the removed slots, as found
};

// Block-wide (blockDim.x == THREADS, every thread calls it): the top k of ind[0..S) (shared
// or global memory) in ascending slot order to keep[0..k), the removed slots ascending to
// evo[0..S-k) unless evo is NULL. Returns the first removed slot (S when k == S), the same
// in every thread. k == 0 removes every slot. UNROLL: the loads a thread keeps in flight in
// every pass over the row and in the walk: 4 for a row in shared memory, more for one in
// global memory, whose passes otherwise wait on its latency (a 32K-slot row in one block:
// 113 us at 4 and one load ahead in the walk).
template <int UNROLL>
__device__ __forceinline__ uint32_t topk_list(const float *ind, uint32_t S, uint32_t k,
                                              uint32_t *keep, uint32_t *evo, smem &sh)
{
    typedef cub::BlockScan<uint32_t, THREADS> scan_t;
    uint32_t tid = threadIdx.x, lane = tid % 32, w = tid / 32, key_t = 0xffffffffu, need = 0;
    if (tid == 0)
        sh.first = S;
    if (k) { // the k-th largest key, 8 bits a pass; `need` of the keys equal to it stay
        uint32_t prefix = 0, mask = 0;
        need = k;
        for (int pass = 0; pass < 4; pass++) {
            int shift = 24 - 8 * pass;
            sh.hist[tid] = 0;
            __syncthreads();
            // scores crowd into a few bins (their exponents): one add per bin and warp, or
            // the shared-memory atomics on those bins queue up
            // (UNROLL loads in flight a thread: a long row's passes wait on memory)
            for (uint32_t j0 = tid - lane; j0 < S; j0 += UNROLL * THREADS) {
                float v[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    uint32_t j = j0 + u * THREADS + lane;
                    v[u] = j < S ? ind[j] : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    uint32_t j = j0 + u * THREADS + lane, bin = 0xffffffffu;
                    if (j < S) {
                        uint32_t key = sort_key(v[u]);
                        if ((key & mask) == prefix)
                            bin = (key >> shift) & 255u;
                    }
                    uint32_t peers = __match_any_sync(0xffffffffu, bin);
                    if (bin != 0xffffffffu && lane == (uint32_t)(__ffs(peers) - 1))
                        atomicAdd(&sh.hist[bin], (uint32_t)__popc(peers));
                }
            }
            __syncthreads();
            uint32_t c = sh.hist[255 - tid], incl; // counted from the top bin down
            scan_t(sh.scan).InclusiveSum(c, incl);
            if (incl - c < need && incl >= need)
                sh.digit = 255 - tid, sh.need = need - (incl - c);
            __syncthreads();
            prefix |= sh.digit << shift, mask |= 0xffu << shift, need = sh.need;
            __syncthreads();
        }
        key_t = prefix;
    }
    // warp w walks [a, e): first its counts above / at the threshold (coalesced), then its
    // offsets from the warps before it, then the lists, a ballot per 32 slots
    uint32_t cw = ((S + WARPS - 1) / WARPS + 31) & ~31u;
    uint32_t a = w * cw < S ? w * cw : S, e = a + cw < S ? a + cw : S;
    uint32_t gt = 0, eq = 0;
    for (uint32_t j1 = a; k && j1 < e; j1 += 32 * UNROLL) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j1 + u * 32 + lane;
            v[u] = j < e ? ind[j] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t key = sort_key(v[u]), in = j1 + u * 32 + lane < e;
            gt += in && key > key_t, eq += in && key == key_t;
        }
    }
    for (int o = 16; o; o >>= 1)
        gt += __shfl_xor_sync(0xffffffffu, gt, o), eq += __shfl_xor_sync(0xffffffffu, eq, o);
    if (lane == 0)
        sh.wgt[w] = gt, sh.weq[w] = eq;
    __syncthreads();
    uint32_t gt_before = 0, eq_before = 0;
    for (uint32_t i = 0; i < w; i++)
        gt_before += sh.wgt[i], eq_before += sh.weq[i];
    // equal keys stay in slot order: the first `need` of them in the row
    uint32_t take = eq_before >= need ? 0 : (eq < need - eq_before ? eq : need - eq_before);
    uint32_t off = gt_before + (eq_before < need ? eq_before : need); // kept before the chunk
    uint32_t ro = a - off, eq_seen = 0, lt = (1u << lane) - 1;         // removed before it
    for (uint32_t j1 = a; j1 < e; j1 += 32 * UNROLL) { // UNROLL steps' values read ahead
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j1 + u * 32 + lane;
            v[u] = j < e && k ? ind[j] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j1 + u * 32 + lane, in = j < e, key = in && k ? sort_key(v[u]) : 0;
            uint32_t is_gt = in && k && key > key_t, is_eq = in && k && key == key_t;
            uint32_t beq = __ballot_sync(0xffffffffu, is_eq);
            uint32_t kp = is_gt || (is_eq && eq_seen + __popc(beq & lt) < take);
            uint32_t bk = __ballot_sync(0xffffffffu, kp), bin = __ballot_sync(0xffffffffu, in);
            if (kp) {
                keep[off + __popc(bk & lt)] = j;
            } else if (in) {
                uint32_t at = ro + __popc(bin & ~bk & lt);
                if (evo)
                    evo[at] = j;
                if (at == 0)
                    sh.first = j;
            }
            off += __popc(bk), ro += __popc(bin & ~bk), eq_seen += __popc(beq);
        }
    }
    __syncthreads();
    return sh.first;
}

// topk_list's answer where few slots go (1 <= S - k <= FEW; a decode step removes one a
// head): the removed slots are the S - k least in the order (key, then position descending:
// ties keep the lower position, NaN goes first), found one a round as the block's least of
// those past the round before (a key and the position's complement in 64 bits), against the
// radix select's 4 passes, scans and walk; then one pass lists the kept slots.
__device__ __forceinline__ uint32_t topk_few(const float *ind, uint32_t S, uint32_t k, uint32_t *keep,
                                             uint32_t *evo, smem &sh)
{
    uint32_t tid = threadIdx.x, lane = tid % 32, w = tid / 32, e = S - k;
    unsigned long long last = 0;
    for (uint32_t r = 0; r < e; r++) {
        unsigned long long best = ~0ull;
        for (uint32_t j = tid; j < S; j += THREADS) {
            unsigned long long c = (unsigned long long)sort_key(ind[j]) << 32 | (uint32_t)~j;
            best = (r == 0 || c > last) && c < best ? c : best;
        }
        for (int o = 16; o; o >>= 1) {
            unsigned long long x = __shfl_xor_sync(0xffffffffu, best, o);
            best = x < best ? x : best;
        }
        if (lane == 0)
            sh.wmin[w] = best;
        __syncthreads();
        best = sh.wmin[0];
        for (int i = 1; i < WARPS; i++)
            best = sh.wmin[i] < best ? sh.wmin[i] : best;
        last = best;
        if (tid == 0)
            sh.gone[r] = ~(uint32_t)best;
        __syncthreads(); // wmin is written again next round
    }
    if (tid < e) { // the removed slots ascending: each one's rank among them
        uint32_t mine = sh.gone[tid], at = 0;
        for (uint32_t i = 0; i < e; i++)
            at += sh.gone[i] < mine;
        if (evo)
            evo[at] = mine;
        if (at == 0)
            sh.first = mine;
    }
    for (uint32_t j = tid; j < S; j += THREADS) {
        uint32_t below = 0, out = 0;
        for (uint32_t i = 0; i < e; i++)
            below += sh.gone[i] < j, out |= sh.gone[i] == j;
        if (!out)
            keep[j - below] = j;
    }
    __syncthreads();
    return sh.first;
}

} // namespace seldev
