// select_dev.cuh - one block's top-k of one indicator row, listed in position order: the
// device code the one-launch eviction (evict.cu) and the one-pass compaction of many layers
// (compact.cu) share. A radix select finds the k-th largest sort key (4 passes of 8 bits over
// the row), then one ordered walk lists the kept slots (ascending) and the removed ones.
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

struct smem {
    typename cub::BlockScan<uint32_t, THREADS>::TempStorage scan;
    uint32_t hist[256], digit, need, first;
};

// Block-wide (blockDim.x == THREADS, every thread calls it): the top k of ind[0..S) (shared
// or global memory) in ascending slot order to keep[0..k), the removed slots ascending to
// evo[0..S-k) unless evo is NULL. Returns the first removed slot (S when k == S), the same
// in every thread. k == 0 removes every slot.
__device__ __forceinline__ uint32_t topk_list(const float *ind, uint32_t S, uint32_t k,
                                              uint32_t *keep, uint32_t *evo, smem &sh)
{
    typedef cub::BlockScan<uint32_t, THREADS> scan_t;
    uint32_t tid = threadIdx.x, key_t = 0xffffffffu, need = 0; // k = 0: no key reaches it
    if (tid == 0)
        sh.first = S;
    if (k) { // the k-th largest key, 8 bits a pass; `need` of the keys equal to it stay
        uint32_t prefix = 0, mask = 0;
        need = k;
        for (int pass = 0; pass < 4; pass++) {
            int shift = 24 - 8 * pass;
            sh.hist[tid] = 0;
            __syncthreads();
            for (uint32_t j = tid; j < S; j += THREADS) {
                uint32_t key = sort_key(ind[j]);
                if ((key & mask) == prefix)
                    atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
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
    // one ordered walk: kept slots to keep, removed ones to evo
    uint32_t kept = 0, evd = 0, eq_seen = 0;
    for (uint32_t b0 = 0; b0 < S; b0 += THREADS) {
        uint32_t j = b0 + tid, in = j < S, key = in && k ? sort_key(ind[j]) : 0;
        uint32_t eq = in && k && key == key_t, gt = in && k && key > key_t, eqr, eq_tot;
        scan_t(sh.scan).ExclusiveSum(eq, eqr, eq_tot);
        __syncthreads();
        uint32_t kp = gt || (eq && eq_seen + eqr < need), kr, k_tot;
        scan_t(sh.scan).ExclusiveSum(kp, kr, k_tot);
        __syncthreads();
        if (kp) {
            keep[kept + kr] = j;
        } else if (in) {
            uint32_t at = evd + (tid - kr);
            if (evo)
                evo[at] = j;
            if (at == 0)
                sh.first = j;
        }
        uint32_t here = S - b0 < THREADS ? S - b0 : THREADS;
        eq_seen += eq_tot, kept += k_tot, evd += here - k_tot;
    }
    __syncthreads();
    return sh.first;
}

} // namespace seldev
