// attn.cu - paged decode attention over the compacted cache (see kern_cuda.h).
//
// Split-K: a block owns (split of tokens, kv head, layer); each of its warps walks a
// contiguous run of tokens with lanes across head_dim (8-byte loads, a whole row per warp
// per step), keeping for every query head of the GQA group an online softmax (max, sum, and
// the weighted V in registers). Warps merge in shared memory; a second kernel merges the
// splits. All layers go in one launch, so a 1K-token cache is not launch bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

#include "dtype.h"
#include "kern_cuda.h"

#define AW 4          // warps per block
#define SPLIT 512     // tokens per block
#define MAXG 8        // query heads per kv head
#define MAXE 8        // head_dim / 32 elements per lane


struct aparams {
    uint8_t *base;
    const uint64_t *const *page_offs;
    const uint32_t *ntok;
    uint32_t L, H, hkv, G, d, tpp, splits;
    size_t voff, row;
    const void *q;
    float *part; // [L][H][splits][d + 2]: acc, m, l
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

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// One block's share of split-K decode attention: the tokens [t0, t1) of kv head g but the
// hole_n from hole (Ada-KV's holes: slots that hold no token), its group's G query heads
// (qb: their rows, d apart), K of token t at row_at(t) and V voff bytes after it; writes
// each head's partial (acc[d], max, sum) to part_at(h).
template <typename T, int E, typename RowAt, typename PartAt>
__device__ __forceinline__ void split_partial(uint32_t t0, uint32_t t1, uint32_t hole,
                                              uint32_t hole_n, const T *qb, uint32_t G,
                                              uint32_t d, float scale, size_t voff,
                                              RowAt row_at, PartAt part_at)
{
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __shared__ float sm_m[AW][MAXG], sm_l[AW][MAXG], sm_acc[AW][MAXG][MAXE * 32];
    float q[MAXG][E], m[MAXG], s[MAXG], acc[MAXG][E];
#pragma unroll
    for (int h = 0; h < MAXG; h++) {
        m[h] = -INFINITY, s[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            acc[h][e] = 0.0f;
            q[h][e] = h < (int)G ? to_f(qb[(size_t)h * d + lane * E + e]) * scale : 0.0f;
        }
    }
    uint32_t per = (SPLIT + AW - 1) / AW, w0 = t0 + warp * per, w1 = min(w0 + per, t1);
    for (uint32_t t = w0; t < w1; t++) {
        if (t - hole < hole_n) { // warp-uniform: the whole hole skipped at once
            t = hole + hole_n - 1;
            continue;
        }
        const T *k = (const T *)row_at(t);
        const T *v = (const T *)((const uint8_t *)k + voff);
        float kf[E], vf[E];
#pragma unroll
        for (int e = 0; e < E; e++)
            kf[e] = to_f(k[lane * E + e]), vf[e] = to_f(v[lane * E + e]);
#pragma unroll
        for (int h = 0; h < MAXG; h++) {
            if (h >= (int)G)
                break;
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < E; e++)
                dot += q[h][e] * kf[e];
#pragma unroll
            for (int o = 16; o; o >>= 1)
                dot += __shfl_xor_sync(0xffffffffu, dot, o);
            float mn = fmaxf(m[h], dot), corr = __expf(m[h] - mn), pe = __expf(dot - mn);
            s[h] = s[h] * corr + pe;
#pragma unroll
            for (int e = 0; e < E; e++)
                acc[h][e] = acc[h][e] * corr + pe * vf[e];
            m[h] = mn;
        }
    }
#pragma unroll
    for (int h = 0; h < MAXG; h++) { /* constant indices: the arrays stay in registers */
        if (h >= (int)G)
            break;
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
            float c = sm_m[w][h] == -INFINITY ? 0.0f : __expf(sm_m[w][h] - M);
            S += sm_l[w][h] * c, A += sm_acc[w][h][e] * c;
        }
        float *dst = part_at(h);
        dst[e] = A;
        if (e == 0)
            dst[d] = M, dst[d + 1] = S;
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
        float c = ps[d] == -INFINITY ? 0.0f : __expf(ps[d] - M);
        S += ps[d + 1] * c, A += ps[e] * c;
    }
    return S > 0.0f ? A / S : 0.0f;
}

template <typename T, int E>
__global__ void __launch_bounds__(AW * 32) attn_split(aparams p)
{
    uint32_t split = blockIdx.x, g = blockIdx.y, l = blockIdx.z;
    uint32_t n = p.ntok[l], t0 = split * SPLIT, t1 = min(t0 + SPLIT, n);
    const T *qb = (const T *)p.q + ((size_t)l * p.H + g * p.G) * p.d;
    const uint64_t *po = p.page_offs[l];
    uint32_t hole, hole_n;
    hole_of(p.holes ? p.holes + ((size_t)l * p.hkv + g) * 2 : NULL, &hole, &hole_n);
    split_partial<T, E>(
        t0, t1, hole, hole_n, qb, p.G, p.d, p.scale, p.voff,
        [&](uint32_t t) { return p.base + po[t / p.tpp] + ((size_t)g * p.tpp + t % p.tpp) * p.row; },
        [&](uint32_t h) {
            return p.part + (((size_t)l * p.H + g * p.G + h) * p.splits + split) * (p.d + 2);
        });
}

__global__ void attn_merge(aparams p)
{
    uint32_t lh = blockIdx.x, l = lh / p.H; // one block per (layer, head)
    uint32_t n = p.ntok[l], used = (n + SPLIT - 1) / SPLIT;
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
    uint32_t B, H, hkv, G, d, tpp, splits, max_pages, max_tokens;
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

template <typename T, int E>
__global__ void __launch_bounds__(AW * 32) battn_split(bparams p)
{
    uint32_t split = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    uint32_t n = batch_tokens(p, b);
    if (n == UINT32_MAX || (split && split * SPLIT >= n))
        return; // the merge uses only the splits that hold tokens
    uint32_t t0 = split * SPLIT, t1 = min(t0 + SPLIT, n);
    const int32_t *pg = p.pages[b];
    // every page this block reads lies in the pool, or the row is NaN (the merge sees it)
    int bad = 0;
    for (uint32_t i = t0 / p.tpp + threadIdx.x; t1 > t0 && i <= (t1 - 1) / p.tpp; i += blockDim.x)
        bad |= pg[i] < 0 || (uint64_t)pg[i] >= p.pool_pages;
    float *rowpart = p.part + ((size_t)b * p.H + g * p.G) * p.splits * (p.d + 2);
    if (__syncthreads_or(bad)) {
        for (uint32_t h = threadIdx.x; h < p.G; h += blockDim.x)
            rowpart[((size_t)h * p.splits + split) * (p.d + 2) + p.d] = NAN;
        return;
    }
    const T *qb = (const T *)p.q + ((size_t)b * p.H + g * p.G) * p.d;
    uint32_t hole, hole_n;
    hole_of(p.holes ? p.holes[b] + (size_t)g * 2 : NULL, &hole, &hole_n);
    split_partial<T, E>(
        t0, t1, hole, hole_n, qb, p.G, p.d, p.scale, p.voff,
        [&](uint32_t t) {
            return p.base + (uint64_t)pg[t / p.tpp] * p.page_bytes +
                   ((size_t)g * p.tpp + t % p.tpp) * p.row;
        },
        [&](uint32_t h) { return rowpart + ((size_t)h * p.splits + split) * (p.d + 2); });
}

__device__ __forceinline__ void store(__nv_bfloat16 *o, float x) { *o = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half *o, float x) { *o = __float2half(x); }

template <typename T>
__global__ void battn_merge(bparams p)
{
    uint32_t bh = blockIdx.x, b = bh / p.H; // one block per (sequence, head)
    uint32_t n = batch_tokens(p, b), used = n == UINT32_MAX ? 0 : (n + SPLIT - 1) / SPLIT;
    const float *part = p.part + (size_t)bh * p.splits * (p.d + 2);
    int bad = n == UINT32_MAX;
    for (uint32_t s = 0; s < used; s++)
        bad |= isnan(part[(size_t)s * (p.d + 2) + p.d]);
    for (uint32_t e = threadIdx.x; e < p.d; e += blockDim.x)
        store((T *)p.out + (size_t)bh * p.d + e, bad ? NAN : merge_splits(part, used, p.d, e));
}

extern "C" size_t kern_cuda_paged_decode_workspace(uint32_t batch, uint32_t q_heads,
                                                   uint32_t head_dim, uint32_t max_tokens)
{
    uint32_t splits = (max_tokens + SPLIT - 1) / SPLIT;
    return sizeof(float) * (size_t)batch * q_heads * (splits ? splits : 1) * (head_dim + 2);
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
        ws_bytes < kern_cuda_paged_decode_workspace(batch, H, d, max_tokens))
        return -EINVAL;
    bparams p = {pk->base, pk->page_bytes, pk->pool_pages, pages, n_tokens, holes, batch, H, hkv, H / hkv,
                 d, pk->tokens_per_page, (max_tokens + SPLIT - 1) / SPLIT, pk->max_pages,
                 max_tokens, pk->v_offset_bytes, (size_t)d * 2, q, out, (float *)ws, 1.0f / sqrtf((float)d)};
    cudaStream_t st = (cudaStream_t)stream;
    dim3 grid(p.splits, hkv, batch);
#define BATTN(T)                                                                           \
    do {                                                                                   \
        switch (d / 32) {                                                                  \
        case 1: battn_split<T, 1><<<grid, AW * 32, 0, st>>>(p); break;                     \
        case 2: battn_split<T, 2><<<grid, AW * 32, 0, st>>>(p); break;                     \
        case 4: battn_split<T, 4><<<grid, AW * 32, 0, st>>>(p); break;                     \
        default: battn_split<T, 8><<<grid, AW * 32, 0, st>>>(p); break;                    \
        }                                                                                  \
        battn_merge<T><<<batch * H, 128, 0, st>>>(p);                                      \
    } while (0)
    if (pk->dtype == KERN_BF16)
        BATTN(__nv_bfloat16);
    else
        BATTN(__half);
#undef BATTN
    cudaError_t e = cudaGetLastError();
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
                 pk->kv_heads, 1, pk->head_dim, pk->tokens_per_page, 1, pk->max_pages,
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
    uint32_t splits = (max_tokens + SPLIT - 1) / SPLIT;
    return sizeof(float) * (size_t)L * H * (splits ? splits : 1) * (d + 2);
}

template <typename T>
static void launch(aparams &p, cudaStream_t st)
{
    dim3 grid(p.splits, p.hkv, p.L);
    switch (p.d / 32) {
    case 1: attn_split<T, 1><<<grid, AW * 32, 0, st>>>(p); break;
    case 2: attn_split<T, 2><<<grid, AW * 32, 0, st>>>(p); break;
    case 4: attn_split<T, 4><<<grid, AW * 32, 0, st>>>(p); break;
    default: attn_split<T, 8><<<grid, AW * 32, 0, st>>>(p); break;
    }
}

extern "C" int kern_cuda_decode_attention(int dtype, uint8_t *base, const uint64_t *const *page_offs,
                                          const uint32_t *n_tokens, const int32_t *holes,
                                          uint32_t max_tokens, uint32_t L,
                                          uint32_t H, uint32_t hkv, uint32_t d, uint32_t tpp,
                                          size_t voff, const void *q, float *out, void *ws,
                                          size_t ws_bytes, void *stream)
{
    if (!hkv || H % hkv || H / hkv > MAXG || (d != 32 && d != 64 && d != 128 && d != 256) ||
        (dtype != KERN_BF16 && dtype != KERN_F16) || !L ||
        ws_bytes < kern_cuda_attn_workspace(L, H, d, max_tokens))
        return -EINVAL;
    aparams p = {base, page_offs, n_tokens, L, H, hkv, H / hkv, d, tpp,
                 (max_tokens + SPLIT - 1) / SPLIT, voff, (size_t)d * 2, q, (float *)ws, out,
                 1.0f / sqrtf((float)d), holes};
    if (!p.splits)
        p.splits = 1;
    cudaStream_t st = (cudaStream_t)stream;
    if (dtype == KERN_BF16)
        launch<__nv_bfloat16>(p, st);
    else
        launch<__half>(p, st);
    cudaError_t e = cudaGetLastError();
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
