// compact.cu - compaction of kept tokens in the pool's pages on the GPU (see kern_cuda.h): one
// layer (kern_cuda_compact), or a cascading stage's every layer with its top-k and the
// indicator's and positions' gather in three launches (kern_cuda_compact_many), which also
// puts a prefix back in position order; a long row's top-k goes to the clusters of
// select.cu first (kern_cuda_compact_split).
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "kern.h"
#include "kern_cuda.h"
#include "select_dev.cuh"

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
    pdl_wait(); // keep (a programmatic launch after the top-k), the rows (after their writer)
    pdl_trigger();
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
    pdl_wait(); // every gather done before a row is overwritten
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
    CK(launch_pdl(gather, dim3(div_up(total, 256)), dim3(256), 0, st, 0, p));
    CK(launch_pdl(scatter, dim3(div_up(total, 256)), dim3(256), 0, st, 0, p));
    return 0;
}

__global__ void order_expand(uint32_t *keep, const uint32_t *order, uint32_t n_order,
                             uint32_t stride, uint32_t rows, uint32_t n)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)rows * n)
        return;
    uint32_t r = (uint32_t)(x / n), i = (uint32_t)(x % n);
    keep[x] = i < n_order ? order[(size_t)r * stride + i] : i;
}

extern "C" int kern_cuda_order_expand(uint32_t *keep, const uint32_t *order, uint32_t n_order,
                                      uint32_t order_stride, uint32_t rows, uint32_t n, void *stream)
{
    if (n_order > n || (n_order && (!order || order_stride < n_order)))
        return -EINVAL;
    if (!rows || !n)
        return 0;
    order_expand<<<div_up((uint64_t)rows * n, 256), 256, 0, (cudaStream_t)stream>>>(keep, order, n_order,
                                                                                    order_stride, rows, n);
    CK(cudaGetLastError());
    return 0;
}

// ---- a cascading stage: every layer in three launches -------------------------

namespace {

constexpr uint32_t CM_ROWS = 64; // K/V rows (tokens of one kv head) a gather/scatter block moves

struct cmparams {
    kern_cuda_layout lay;
    const kern_cuda_compact_job *jobs;
    size_t row; // bytes of one K (or V) row
};

__host__ __device__ inline size_t al16(size_t x) { return (x + 15) & ~(size_t)15; }

// A job's scratch: [kv_heads][k + win] rows of K then V, the gathered indicator
// [kv_heads][k], each head's first moved row [kv_heads], the gathered positions
// [kv_heads][k], and an order job's bitmap of positions with each word's rank
// [kv_heads][2][words of pos_span].
struct cm_tmp {
    uint8_t *rows;
    float *ind;
    uint32_t *first, *pos, *bits;
};

__host__ __device__ inline uint32_t span_words(uint32_t span) { return (span + 31) / 32; }

// the parts' sizes (kern_cuda_compact_many_tmp is their sum)
struct cm_tmp_size {
    size_t rows, ind, first, pos, bits;
};
__host__ __device__ inline cm_tmp_size tmp_size(uint32_t hkv, uint32_t k, uint32_t win, size_t row,
                                               uint32_t span)
{
    return cm_tmp_size{al16((size_t)hkv * (k + win) * 2 * row), al16(sizeof(float) * hkv * k),
                       al16(sizeof(uint32_t) * hkv), al16(sizeof(uint32_t) * hkv * k),
                       al16(sizeof(uint32_t) * hkv * 2 * span_words(span))};
}

__host__ __device__ inline cm_tmp tmp_of(const kern_cuda_compact_job &j, uint32_t hkv, size_t row)
{
    uint8_t *b = (uint8_t *)j.tmp;
    cm_tmp_size z = tmp_size(hkv, j.k, j.win, row, j.order ? j.pos_span : 0);
    size_t o = z.rows + z.ind;
    return cm_tmp{b, (float *)(b + z.rows), (uint32_t *)(b + o), (uint32_t *)(b + o + z.first),
                  (uint32_t *)(b + o + z.first + z.pos)};
}

// An order job's kept slots: keep[r] = the slot holding head g's r-th smallest position (a
// bitmap of the positions, each word's rank by a block scan of their counts, then each
// slot's rank). Returns the first slot out of place (k when sorted, or when the positions
// are not k distinct ones below pos_span: then keep is the identity and n_sorted says so).
__device__ uint32_t order_by_pos(const kern_cuda_compact_job &j, const cm_tmp &t, uint32_t g,
                                 uint32_t *keep, seldev::smem &sh)
{
    typedef cub::BlockScan<uint32_t, seldev::THREADS> scan_t;
    uint32_t tid = threadIdx.x, nw = span_words(j.pos_span), k = j.k;
    uint32_t *bits = t.bits + (size_t)g * 2 * nw, *rank = bits + nw;
    const uint32_t *pos = j.pos + (size_t)g * j.pos_stride;
    for (uint32_t w = tid; w < nw; w += seldev::THREADS)
        bits[w] = 0;
    __syncthreads();
    for (uint32_t i = tid; i < k; i += seldev::THREADS) {
        uint32_t p = j.pos_init ? i : pos[i];
        if (p < j.pos_span)
            atomicOr(&bits[p / 32], 1u << (p % 32));
    }
    __syncthreads();
    uint32_t per = (nw + seldev::THREADS - 1) / seldev::THREADS, w0 = tid * per;
    uint32_t w1 = w0 + per < nw ? w0 + per : nw, c = 0, before, total;
    for (uint32_t w = w0; w < w1; w++)
        c += __popc(bits[w]);
    scan_t(sh.scan).ExclusiveSum(c, before, total);
    for (uint32_t w = w0; w < w1; w++)
        rank[w] = before, before += __popc(bits[w]);
    if (tid == 0) {
        sh.first = k;
        if (j.n_sorted)
            j.n_sorted[g] = total;
    }
    __syncthreads(); // every rank written
    int sound = total == k;
    for (uint32_t i = tid; i < k; i += seldev::THREADS) {
        uint32_t p = j.pos_init ? i : pos[i];
        uint32_t r = sound ? rank[p / 32] + __popc(bits[p / 32] & ((1u << (p % 32)) - 1)) : i;
        keep[r] = i;
        if (r != i)
            atomicMin(&sh.first, r < i ? r : i);
    }
    __syncthreads();
    return sh.first;
}

__device__ __forceinline__ uint8_t *cm_row(const cmparams &p, const kern_cuda_compact_job &j,
                                           uint32_t g, uint32_t t)
{
    return p.lay.base + j.page_off[t / p.lay.tokens_per_page] +
           ((size_t)g * p.lay.tokens_per_page + t % p.lay.tokens_per_page) * p.row;
}

// A head's k kept slots as listed (ascending for a top k): copied to keep (unless nullptr:
// they are keep already); returns the first slot whose token moves (the first listed out of
// its own place; k when none). Each thread's first such slot is its least (its slots
// ascend), so one shared atomic a thread, not one a slot out of place (a row halved: 16K
// of them on one word, ~30 us). Ends with the block synced.
__device__ uint32_t listed(const uint32_t *list, uint32_t k, uint32_t *keep, seldev::smem &sh)
{
    if (threadIdx.x == 0)
        sh.first = k;
    __syncthreads();
    uint32_t mine = k;
    for (uint32_t i = threadIdx.x; i < k; i += seldev::THREADS) {
        uint32_t v = list[i];
        if (keep)
            keep[i] = v;
        if (v != i && mine == k) {
            mine = i;
            if (!keep)
                break; /* nothing left to copy */
        }
    }
    if (mine < k)
        atomicMin(&sh.first, mine);
    __syncthreads();
    return sh.first;
}

// grid (kv_heads, jobs): the kept slots of each head (the top k - chosen here, or already in
// keep for a keep_given job -, the host's slots, or an order job's slots by position), and
// the first row that moves (rows below it keep their
// slot: the top-k's first removed slot, or the first listed slot out of place). A fill
// job's keep then becomes the slot each new slot takes its token from: itself for a kept
// slot below k, else (a hole, the r-th removed slot below k) the r-th kept slot from k on.
__global__ void __launch_bounds__(seldev::THREADS) cm_select(cmparams p)
{
    __shared__ seldev::smem sh;
    __shared__ kern_cuda_compact_job j;
    uint32_t g = blockIdx.x, tid = threadIdx.x;
    if (tid == 0)
        j = p.jobs[blockIdx.y];
    __syncthreads();
    if (j.k > j.old)
        return; // the host checks it
    uint32_t *keep = j.keep + (size_t)g * j.k, first;
    cm_tmp t = tmp_of(j, p.lay.kv_heads, p.row);
    if (j.order) {
        if (j.k != j.old || !j.pos || j.slots)
            return; // the host checks it
        first = order_by_pos(j, t, g, keep, sh);
    } else if (j.slots) {
        first = listed(j.slots + (size_t)g * j.k, j.k, keep, sh);
    } else {
        first = j.keep_given ? listed(keep, j.k, nullptr, sh)
                             : seldev::topk_list<16>(j.ind + (size_t)g * j.old, j.old, j.k, keep, NULL, sh);
        if (j.fill && first < j.k) {
            __syncthreads(); // every slot of keep written
            // c: the kept slots below k (keep is ascending); slot h of [first, k) is kept
            // when it is listed among them, else a hole of rank h - (kept slots below h)
            uint32_t lo = 0, hi = j.k;
            while (lo < hi) {
                uint32_t m = (lo + hi) / 2;
                if (keep[m] < j.k)
                    lo = m + 1;
                else
                    hi = m;
            }
            uint32_t c = lo;
            uint32_t *map = (uint32_t *)t.rows + (size_t)g * (j.k + j.win) * 2 * p.row / 4;
            for (uint32_t h = first + tid; h < j.k; h += seldev::THREADS) {
                uint32_t a = 0, b = c;
                while (a < b) {
                    uint32_t m = (a + b) / 2;
                    if (keep[m] < h)
                        a = m + 1;
                    else
                        b = m;
                }
                int hole = !(a < c && keep[a] == h); // the (h - a)-th hole below k
                map[h - first] = hole ? keep[c + (h - a)] : h;
            }
            __syncthreads(); // every read of keep done
            for (uint32_t h = first + tid; h < j.k; h += seldev::THREADS)
                keep[h] = map[h - first];
        }
    }
    if (tid == 0)
        t.first[g] = first;
}

// grid (row blocks, kv_heads, jobs): gather (out = 0: slots into the scratch, the kept
// indicator beside them) or scatter (out = 1: the scratch to rows from the first that
// moves, the indicator to [kv_heads][k]). A fill job's kept rows move in the gather, each
// straight from its source (from k on) to its hole (below k): none is read after a write;
// only its window goes through the scratch, as its slots [k, k + win) may still be holes'
// sources until every gather block is done.
template <int OUT>
__global__ void __launch_bounds__(256) cm_move(cmparams p)
{
    __shared__ kern_cuda_compact_job j;
    uint32_t g = blockIdx.y, tid = threadIdx.x, hkv = p.lay.kv_heads;
    if (tid == 0)
        j = p.jobs[blockIdx.z];
    __syncthreads();
    uint32_t rows = j.k + j.win, r0 = blockIdx.x * CM_ROWS;
    if (j.k > j.old || r0 >= rows)
        return;
    cm_tmp t = tmp_of(j, hkv, p.row);
    const uint32_t *keep = j.keep + (size_t)g * j.k;
    uint32_t first = t.first[g], vec = (uint32_t)(p.row / 16), n = rows - r0;
    int fill = j.fill && !j.slots && !j.order;
    n = n < CM_ROWS ? n : CM_ROWS;
    for (uint32_t x = tid; x < n * 2 * vec; x += 256) {
        uint32_t i = r0 + x / (2 * vec), r = x % (2 * vec), v = r % vec;
        if (i < first)
            continue;
        size_t half = (size_t)(r / vec);
        if (fill && i < j.k) { /* a hole takes its token in the gather; a kept slot stays */
            if (!OUT && keep[i] != i)
                *((uint4 *)(cm_row(p, j, g, i) + half * p.lay.v_offset_bytes) + v) =
                    *((const uint4 *)(cm_row(p, j, g, keep[i]) + half * p.lay.v_offset_bytes) + v);
            continue;
        }
        uint4 *tp = (uint4 *)(t.rows + (((size_t)g * rows + i) * 2 + half) * p.row) + v;
        if (OUT) {
            *((uint4 *)(cm_row(p, j, g, i) + half * p.lay.v_offset_bytes) + v) = *tp;
        } else {
            uint32_t src = i < j.k ? keep[i] : j.old + (i - j.k);
            *tp = *((const uint4 *)(cm_row(p, j, g, src) + half * p.lay.v_offset_bytes) + v);
        }
    }
    if (j.ind)
        for (uint32_t i = r0 + tid; i < r0 + n && i < j.k; i += 256) {
            if (OUT)
                j.ind[(size_t)g * j.k + i] = t.ind[(size_t)g * j.k + i];
            else
                t.ind[(size_t)g * j.k + i] = j.ind[(size_t)g * j.old + keep[i]];
        }
    if (j.pos) // the positions the same way, at a fixed stride
        for (uint32_t i = r0 + tid; i < r0 + n && i < j.k; i += 256) {
            uint32_t *pg = j.pos + (size_t)g * j.pos_stride;
            if (OUT) {
                pg[i] = t.pos[(size_t)g * j.k + i];
                if (j.pos_out)
                    j.pos_out[(size_t)g * j.k + i] = t.pos[(size_t)g * j.k + i];
            } else
                t.pos[(size_t)g * j.k + i] = j.pos_init ? keep[i] : pg[keep[i]];
        }
}

} // namespace

extern "C" size_t kern_cuda_compact_many_tmp(uint32_t kv_heads, uint32_t head_dim, uint32_t k,
                                             uint32_t win, uint32_t pos_span)
{
    cm_tmp_size z = tmp_size(kv_heads, k, win, (size_t)head_dim * 2, pos_span);
    return z.rows + z.ind + z.first + z.pos + z.bits;
}

extern "C" int kern_cuda_compact_split(struct kern_cuda_compact_job *jobs, uint32_t n_jobs,
                                       uint32_t kv_heads, void *stream)
{
    if ((n_jobs && !jobs) || !kv_heads)
        return -EINVAL;
    int taken = 0;
    for (uint32_t i = 0; i < n_jobs; i++) {
        kern_cuda_compact_job &j = jobs[i];
        if (!j.ind || j.slots || j.order || j.keep_given || !j.k || j.k >= j.old ||
            !topk_in_cluster(kv_heads, j.old))
            continue;
        if (int rc = kern_cuda_topk_ws(j.ind, kv_heads, j.old, j.k, j.keep, nullptr, 0, stream))
            return rc;
        j.keep_given = 1, taken++;
    }
    return taken;
}

extern "C" int kern_cuda_compact_many(const struct kern_cuda_layout *lay,
                                      const struct kern_cuda_compact_job *jobs, uint32_t n_jobs,
                                      uint32_t max_rows, void *stream)
{
    if (!lay || !lay->kv_heads || !lay->tokens_per_page || !lay->base || (lay->head_dim * 2) % 16 ||
        (lay->dtype != KERN_BF16 && lay->dtype != KERN_F16) || (n_jobs && !jobs) || n_jobs > 65535 ||
        lay->kv_heads > 65535)
        return -EINVAL;
    if (!n_jobs || !max_rows)
        return 0;
    cmparams p = {*lay, jobs, (size_t)lay->head_dim * 2};
    cudaStream_t st = (cudaStream_t)stream;
    cm_select<<<dim3(lay->kv_heads, n_jobs), seldev::THREADS, 0, st>>>(p);
    CK(cudaGetLastError());
    dim3 grid(div_up(max_rows, CM_ROWS), lay->kv_heads, n_jobs);
    cm_move<0><<<grid, 256, 0, st>>>(p);
    CK(cudaGetLastError());
    cm_move<1><<<grid, 256, 0, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}
