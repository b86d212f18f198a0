// select.cu - top-k on the GPU (one block per row, or many blocks per row for long rows:
// a cluster of blocks in one launch on Hopper, else a launch per step) and a score vector
// following the tokens a top-k kept (see kern_cuda.h).
#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "kern_cuda.h"
#include "select_dev.cuh"

// ---- top-k ---------------------------------------------------------------

#define TK_THREADS 1024

using seldev::sort_key; // the order every top-k here shares (kern.h's kern_sort_key)

// One radix pass's histogram of keys [a, e) (key(j): j's sort key; the block's threads,
// `step` apart): keys whose masked bits equal prefix, binned by their nb bins at `shift`.
// Scores crowd into a few buckets: lanes of a warp with the same bucket add once
// (warp-aggregated atomics), or the shared-memory atomics queue up.
template <typename Key>
__device__ __forceinline__ void hist_pass(Key key, uint32_t a, uint32_t e, uint32_t step, uint32_t prefix,
                                          uint32_t mask, int shift, uint32_t nb, uint32_t *hist)
{
    uint32_t lane = threadIdx.x % 32;
    for (uint32_t j0 = a + threadIdx.x - lane; j0 < e; j0 += step) {
        uint32_t j = j0 + lane, bin = 0xffffffffu;
        if (j < e) {
            uint32_t k = key(j);
            if ((k & mask) == prefix)
                bin = (k >> shift) & (nb - 1);
        }
        uint32_t peers = __match_any_sync(0xffffffffu, bin);
        if (bin != 0xffffffffu && lane == (uint32_t)(__ffs(peers) - 1))
            atomicAdd(&hist[bin], (uint32_t)__popc(peers));
    }
}

// the sort key of a row's score j (hist_pass's key for rows read from global memory)
struct row_key {
    const float *s;
    __device__ __forceinline__ uint32_t operator()(uint32_t j) const { return sort_key(s[j]); }
};

// The bucket of hist[0, nb) (NT threads, two bins each) holding the need-th largest key,
// counted from the top bucket down by a block scan: the one thread that finds it narrows
// *need, *prefix and *mask to it (every thread calls it; the caller syncs before reading them)
template <int NT>
__device__ __forceinline__ void pick_bucket(const uint32_t *hist, uint32_t nb, int shift, uint32_t need,
                                            uint32_t prefix, uint32_t mask,
                                            typename cub::BlockScan<uint32_t, NT>::TempStorage &tmp,
                                            uint32_t *sh_need, uint32_t *sh_prefix, uint32_t *sh_mask)
{
    uint32_t x[2], cum[2];
    for (int i = 0; i < 2; i++) {
        uint32_t r = threadIdx.x * 2 + i;
        x[i] = r < nb ? hist[nb - 1 - r] : 0;
    }
    cub::BlockScan<uint32_t, NT>(tmp).InclusiveSum(x, cum);
    for (int i = 0; i < 2; i++) {
        uint32_t r = threadIdx.x * 2 + i;
        if (r < nb && cum[i] >= need && cum[i] - x[i] < need) { /* exactly one thread */
            *sh_need = need - (cum[i] - x[i]);
            *sh_prefix = prefix | ((nb - 1 - r) << shift);
            *sh_mask = mask | ((nb - 1) << shift);
        }
    }
}

// The emit after the passes, for a block's part [a, e) of a row: each warp a contiguous run,
// read 32 keys at a time (coalesced, and conflict-free where the keys lie in shared memory).
// warp_counts: the run's keys above thr and equal to it, into gt[warp] / eq[warp] (the caller
// syncs before reading them).
__device__ __forceinline__ void warp_run(uint32_t a, uint32_t e, uint32_t *wa, uint32_t *we)
{
    uint32_t nw = blockDim.x / 32, per = ((e - a + nw - 1) / nw + 31) / 32 * 32;
    *wa = min(a + threadIdx.x / 32 * per, e), *we = min(*wa + per, e);
}

template <typename Key>
__device__ __forceinline__ void warp_counts(Key key, uint32_t a, uint32_t e, uint32_t thr, uint32_t *gt,
                                            uint32_t *eq)
{
    uint32_t wa, we, g = 0, q = 0, lane = threadIdx.x % 32;
    warp_run(a, e, &wa, &we);
    for (uint32_t j = wa + lane; j < we; j += 32) {
        uint32_t k = key(j);
        g += k > thr, q += k == thr;
    }
    for (int o = 16; o; o >>= 1)
        g += __shfl_xor_sync(0xffffffffu, g, o), q += __shfl_xor_sync(0xffffffffu, q, o);
    if (!lane)
        gt[threadIdx.x / 32] = g, eq[threadIdx.x / 32] = q;
}

// emit_runs: writes base + j for every key above thr and the first `need` equal to it (ties
// to the lower position), in position order; gt0 / eq0 count the row's keys above / at thr
// before a, gt / eq warp_counts' counts. The row's result: positions ascending.
template <typename Key>
__device__ __forceinline__ void emit_runs(Key key, uint32_t a, uint32_t e, uint32_t thr, uint32_t need,
                                          uint32_t gt0, uint32_t eq0, const uint32_t *gt, const uint32_t *eq,
                                          uint32_t *out, uint32_t base)
{
    uint32_t wa, we, w = threadIdx.x / 32, lane = threadIdx.x % 32, below = (1u << lane) - 1;
    warp_run(a, e, &wa, &we);
    for (uint32_t i = 0; i < w; i++)
        gt0 += gt[i], eq0 += eq[i];
    uint32_t off = gt0 + min(eq0, need); /* the row's winners before this run */
    for (uint32_t j0 = wa; j0 < we; j0 += 32) {
        uint32_t j = j0 + lane, k = j < we ? key(j) : 0;
        bool above = j < we && k > thr, at = j < we && k == thr;
        uint32_t ties = __ballot_sync(0xffffffffu, at);
        bool pick = above || (at && eq0 + __popc(ties & below) < need);
        uint32_t picks = __ballot_sync(0xffffffffu, pick);
        if (pick)
            out[off + __popc(picks & below)] = base + j;
        off += __popc(picks), eq0 += __popc(ties);
    }
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
        hist_pass(row_key{s}, 0, n, blockDim.x, prefix, mask, shift[pass], nb, hist);
        __syncthreads();
        /* a block scan (thread 0 walking 2048 buckets alone took most of the launch) */
        pick_bucket<TK_THREADS>(hist, nb, shift[pass], sh_need, prefix, mask, pick_tmp, &sh_need, &sh_prefix,
                                &sh_mask);
        __syncthreads();
    }
    // emit in positional order
    __shared__ uint32_t wgt[TK_THREADS / 32], weq[TK_THREADS / 32];
    warp_counts(row_key{s}, 0, n, sh_prefix, wgt, weq);
    __syncthreads();
    emit_runs(row_key{s}, 0, n, sh_prefix, sh_need, 0, 0, wgt, weq, out, 0);
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
    uint32_t a = blockIdx.x * TKM_SEG, e = min(a + TKM_SEG, n);
    hist_pass(row_key{s}, a, e, blockDim.x, st[row].prefix, st[row].mask, shift[pass], nb, hist);
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
    uint32_t row = blockIdx.y;
    const float *s = score + (size_t)row * n;
    __shared__ uint32_t sh_gt, sh_eq, wgt[TKM_THREADS / 32], weq[TKM_THREADS / 32];
    if (threadIdx.x == 0) { /* the row's keys above / at the threshold before this segment */
        uint32_t gt = 0, eq = 0;
        for (uint32_t b = 0; b < blockIdx.x; b++) {
            uint2 c = cnt[(size_t)row * segs + b];
            gt += c.x, eq += c.y;
        }
        sh_gt = gt, sh_eq = eq;
    }
    uint32_t a0 = blockIdx.x * TKM_SEG, e0 = min(a0 + TKM_SEG, n), thr = st[row].prefix;
    warp_counts(row_key{s}, a0, e0, thr, wgt, weq);
    __syncthreads();
    emit_runs(row_key{s}, a0, e0, thr, st[row].need, sh_gt, sh_eq, wgt, weq, idx + (size_t)row * k, 0);
}

__global__ void tkm_set_need(tkm_state *st, uint32_t rows, uint32_t k)
{
    uint32_t r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows)
        st[r].need = k;
}

// ---- top-k over a cluster of blocks a row (compute capability 9.0) ----------------------
//
// The same result in one launch where thread block clusters exist: a row's TKC_BLOCKS blocks
// are a cluster, each a contiguous segment of the row. Each pass's histogram is every block's
// own (over its segment's sort keys, read once into shared memory: up to 32K keys, 128 KiB),
// and each block sums the cluster's (their shared memory, read across the cluster), so
// every block picks the same bucket - no global histogram, no memset, no launch between
// passes (tkm's path above is 11 launches and two memsets a call). Then each block's keys above
// and at the threshold, read by the blocks after it, give its emit's offset and its share of
// the ties. A row longer than TKC_MAX keys goes to tkm's path (more blocks a row).

#define TKC_THREADS 1024
#define TKC_BLOCKS 8
#define TKC_MAX (TKC_BLOCKS * 32768u)

__global__ void __launch_bounds__(TKC_THREADS) tkc_rows(const float *score, uint32_t n, uint32_t k, uint32_t *idx)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    const int shift[3] = {21, 10, 0};
    const uint32_t width[3] = {11, 11, 10};
    typedef cub::BlockScan<uint32_t, TKC_THREADS> scan_t;
    __shared__ typename scan_t::TempStorage tmp;
    __shared__ uint32_t hist[2048], tot[2048];
    __shared__ uint32_t sh_prefix, sh_mask, sh_need;
    __shared__ uint2 counts; // the block's keys above / at the threshold
    extern __shared__ uint32_t keys[]; // the segment's sort keys
    uint32_t rank = cl.block_rank(), tid = threadIdx.x;
    uint32_t seg = (n + TKC_BLOCKS - 1) / TKC_BLOCKS, a0 = min(rank * seg, n), len = min(a0 + seg, n) - a0;
    const float *s = score + (size_t)blockIdx.y * n + a0;
    if (tid == 0)
        sh_prefix = 0, sh_mask = 0, sh_need = k;
    pdl_wait(); // the scores (a programmatic launch after the kernel that wrote them)
    pdl_trigger();
#pragma unroll 8
    for (uint32_t j = tid; j < len; j += TKC_THREADS)
        keys[j] = sort_key(s[j]);
    auto staged = [&](uint32_t j) { return keys[j]; };
    for (int pass = 0; pass < 3; pass++) {
        uint32_t nb = 1u << width[pass];
        for (uint32_t b = tid; b < nb; b += TKC_THREADS)
            hist[b] = 0;
        __syncthreads();
        uint32_t prefix = sh_prefix, mask = sh_mask;
        hist_pass(staged, 0, len, TKC_THREADS, prefix, mask, shift[pass], nb, hist);
        cl.sync(); // every block's histogram is complete
        for (uint32_t b = tid; b < nb; b += TKC_THREADS) {
            uint32_t t = 0;
            for (uint32_t r = 0; r < TKC_BLOCKS; r++)
                t += cl.map_shared_rank(hist, r)[b];
            tot[b] = t;
        }
        cl.sync(); // every block has read them: the next pass may clear its own
        // the same bucket in every block
        pick_bucket<TKC_THREADS>(tot, nb, shift[pass], sh_need, prefix, mask, tmp, &sh_need, &sh_prefix, &sh_mask);
        __syncthreads();
    }
    // emit in positional order, after the keys above / at the threshold in the cluster's blocks
    // before this one
    __shared__ uint32_t wgt[TKC_THREADS / 32], weq[TKC_THREADS / 32], sh_gt, sh_eq;
    uint32_t thr = sh_prefix;
    warp_counts(staged, 0, len, thr, wgt, weq);
    __syncthreads();
    if (tid < 32) { /* the block's counts, for the blocks after it */
        uint32_t g = wgt[tid], q = weq[tid];
        for (int o = 16; o; o >>= 1)
            g += __shfl_xor_sync(0xffffffffu, g, o), q += __shfl_xor_sync(0xffffffffu, q, o);
        if (!tid)
            counts = make_uint2(g, q);
    }
    cl.sync(); // every block's counts
    if (tid == 0) {
        uint32_t g = 0, q = 0;
        for (uint32_t r = 0; r < rank; r++) {
            uint2 c = *cl.map_shared_rank(&counts, r);
            g += c.x, q += c.y;
        }
        sh_gt = g, sh_eq = q;
    }
    cl.sync(); // the counts are read (no block leaves while another may read its memory)
    emit_runs(staged, 0, len, thr, sh_need, sh_gt, sh_eq, wgt, weq, idx + (size_t)blockIdx.y * k, a0);
#else
    (void)score, (void)n, (void)k, (void)idx;
    __trap(); // tkc_on sends only devices with this kernel built for them here
#endif
}

// kern_cuda_topk_set_cluster's setting; -1: CAKE_TOPK_CLUSTER's (on unless 0), read at first
// use (kern_cuda.h)
static std::atomic<int> tkc_setting{-1};

extern "C" int kern_cuda_topk_set_cluster(int on)
{
    int prev = env_switch(tkc_setting, "CAKE_TOPK_CLUSTER");
    tkc_setting.store(on ? 1 : 0);
    return prev;
}

// whether the current device runs tkc_rows: compute capability 9.0 or later, the kernel built
// for it (not an older target's code run as PTX) and its segment's keys in shared memory
static bool tkc_on(void)
{
    static std::atomic<int> ok[64]; // the kernel's code for the device: 0 not asked, 1 yes, 2 no
    int dev = 0;
    if (!env_switch(tkc_setting, "CAKE_TOPK_CLUSTER") || cudaGetDevice(&dev) != cudaSuccess || device_cc(dev) < 90)
        return false;
    int v = ok[dev].load();
    if (!v) {
        cudaFuncAttributes fa;
        bool yes = cudaFuncGetAttributes(&fa, tkc_rows) == cudaSuccess && fa.binaryVersion >= 90 &&
                   cudaFuncSetAttribute(tkc_rows, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)(TKC_MAX / TKC_BLOCKS * sizeof(uint32_t))) == cudaSuccess;
        cudaGetLastError();
        ok[dev].store(v = yes ? 1 : 2);
    }
    return v == 1;
}

bool topk_in_cluster(uint32_t rows, uint32_t n)
{
    return n > TKM_SEG && n <= TKC_MAX && rows <= 65535 && tkc_on();
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
    if (n <= TKM_SEG)
        return kern_cuda_topk(score, rows, n, k, idx, stream); /* one block per row is enough */
    cudaStream_t st = (cudaStream_t)stream;
    if (topk_in_cluster(rows, n)) { /* a cluster a row, one launch */
        size_t keys = (n + TKC_BLOCKS - 1) / TKC_BLOCKS * sizeof(uint32_t); /* a segment's */
        CK(launch_pdl(tkc_rows, dim3(TKC_BLOCKS, rows), dim3(TKC_THREADS), keys, st, TKC_BLOCKS, score, n, k, idx));
        return 0;
    }
    if (!ws || ws_bytes < kern_cuda_topk_workspace(rows, n))
        return kern_cuda_topk(score, rows, n, k, idx, stream);
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
