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

// One radix pass's histogram of s[a, e) (the block's threads, `step` apart): keys whose masked
// bits equal prefix, binned by their nb bins at `shift`. Scores crowd into a few buckets:
// lanes of a warp with the same bucket add once (warp-aggregated atomics), or the
// shared-memory atomics queue up.
__device__ __forceinline__ void hist_pass(const float *s, uint32_t a, uint32_t e, uint32_t step, uint32_t prefix,
                                          uint32_t mask, int shift, uint32_t nb, uint32_t *hist)
{
    uint32_t lane = threadIdx.x % 32;
    for (uint32_t j0 = a + threadIdx.x - lane; j0 < e; j0 += step) {
        uint32_t j = j0 + lane, bin = 0xffffffffu;
        if (j < e) {
            uint32_t key = sort_key(s[j]);
            if ((key & mask) == prefix)
                bin = (key >> shift) & (nb - 1);
        }
        uint32_t peers = __match_any_sync(0xffffffffu, bin);
        if (bin != 0xffffffffu && lane == (uint32_t)(__ffs(peers) - 1))
            atomicAdd(&hist[bin], (uint32_t)__popc(peers));
    }
}

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
        hist_pass(s, 0, n, blockDim.x, prefix, mask, shift[pass], nb, hist);
        __syncthreads();
        /* a block scan (thread 0 walking 2048 buckets alone took most of the launch) */
        pick_bucket<TK_THREADS>(hist, nb, shift[pass], sh_need, prefix, mask, pick_tmp, &sh_need, &sh_prefix,
                                &sh_mask);
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
    hist_pass(s, a, e, blockDim.x, st[row].prefix, st[row].mask, shift[pass], nb, hist);
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

// ---- top-k over a cluster of blocks a row (compute capability 9.0) ----------------------
//
// The same result in one launch where thread block clusters exist: a row's TKC_BLOCKS blocks
// are a cluster, each a contiguous segment of the row. Each pass's histogram is every block's
// own, and each block sums the cluster's (their shared memory, read across the cluster), so
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
    __shared__ uint32_t sh_prefix, sh_mask, sh_need, sh_off, sh_take;
    __shared__ uint2 counts; // the block's keys above / at the threshold
    uint32_t rank = cl.block_rank(), tid = threadIdx.x;
    uint32_t seg = (n + TKC_BLOCKS - 1) / TKC_BLOCKS, a0 = min(rank * seg, n), e0 = min(a0 + seg, n);
    const float *s = score + (size_t)blockIdx.y * n;
    if (tid == 0)
        sh_prefix = 0, sh_mask = 0, sh_need = k;
    pdl_wait(); // the scores (a programmatic launch after the kernel that wrote them)
    pdl_trigger();
    for (int pass = 0; pass < 3; pass++) {
        uint32_t nb = 1u << width[pass];
        for (uint32_t b = tid; b < nb; b += TKC_THREADS)
            hist[b] = 0;
        __syncthreads();
        uint32_t prefix = sh_prefix, mask = sh_mask;
        hist_pass(s, a0, e0, TKC_THREADS, prefix, mask, shift[pass], nb, hist);
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
    // emit in positional order: each thread a contiguous run of the segment, offsets from a
    // block scan and from the cluster's blocks before this one
    uint32_t thr = sh_prefix, need = sh_need, len = e0 - a0, per = (len + TKC_THREADS - 1) / TKC_THREADS;
    uint32_t a = a0 + min(tid * per, len), e = min(a + per, e0), gt = 0, eq = 0;
    for (uint32_t j = a; j < e; j++) {
        uint32_t key = sort_key(s[j]);
        gt += key > thr, eq += key == thr;
    }
    uint32_t eq_before, eq_all, gt_before, gt_all;
    scan_t(tmp).ExclusiveSum(eq, eq_before, eq_all);
    __syncthreads();
    scan_t(tmp).ExclusiveSum(gt, gt_before, gt_all);
    if (tid == 0)
        counts = make_uint2(gt_all, eq_all);
    cl.sync(); // every block's counts
    if (tid == 0) { /* where this segment's winners go, and how many ties it takes */
        uint32_t off = 0, eq_seen = 0;
        for (uint32_t r = 0; r < rank; r++) {
            uint2 c = *cl.map_shared_rank(&counts, r);
            off += c.x + (eq_seen >= need ? 0 : min(c.y, need - eq_seen)), eq_seen += c.y;
        }
        sh_off = off, sh_take = eq_seen >= need ? 0 : min(eq_all, need - eq_seen);
    }
    cl.sync(); // the counts are read (no block leaves while another may read its memory)
    uint32_t take = eq_before >= sh_take ? 0 : min(eq, sh_take - eq_before);
    uint32_t mine = gt + take, off;
    scan_t(tmp).ExclusiveSum(mine, off);
    off += sh_off;
    uint32_t *out = idx + (size_t)blockIdx.y * k;
    for (uint32_t j = a; j < e && mine; j++) {
        uint32_t key = sort_key(s[j]);
        if (key > thr || (key == thr && take && take--))
            out[off++] = j, mine--;
    }
#else
    (void)score, (void)n, (void)k, (void)idx;
    __trap(); // tkc_on sends only devices with this kernel built for them here
#endif
}

// kern_cuda_topk_set_cluster's setting; -1: CAKE_TOPK_CLUSTER's, read at first use. Off
// unless asked for: test_gpu_kernels' comparison of its choices with the CPU's has not yet
// run on a GPU (kern_cuda.h)
static std::atomic<int> tkc_setting{-1};

extern "C" int kern_cuda_topk_set_cluster(int on)
{
    int prev = env_switch(tkc_setting, "CAKE_TOPK_CLUSTER", 0);
    tkc_setting.store(on ? 1 : 0);
    return prev;
}

// whether the current device runs tkc_rows: compute capability 9.0 or later and the kernel
// built for it (not an older target's code run as PTX)
static bool tkc_on(void)
{
    static std::atomic<int> ok[64]; // the kernel's code for the device: 0 not asked, 1 yes, 2 no
    int dev = 0;
    if (!env_switch(tkc_setting, "CAKE_TOPK_CLUSTER", 0) || cudaGetDevice(&dev) != cudaSuccess || device_cc(dev) < 90)
        return false;
    int v = ok[dev].load();
    if (!v) {
        cudaFuncAttributes fa;
        bool yes = cudaFuncGetAttributes(&fa, tkc_rows) == cudaSuccess && fa.binaryVersion >= 90;
        cudaGetLastError();
        ok[dev].store(v = yes ? 1 : 2);
    }
    return v == 1;
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
    if (n <= TKC_MAX && rows <= 65535 && tkc_on()) { /* a cluster a row, one launch */
        CK(launch_pdl(tkc_rows, dim3(TKC_BLOCKS, rows), dim3(TKC_THREADS), 0, st, TKC_BLOCKS, score, n, k, idx));
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
