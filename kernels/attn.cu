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
};

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T, int E>
__global__ void __launch_bounds__(AW * 32) attn_split(aparams p)
{
    uint32_t split = blockIdx.x, g = blockIdx.y, l = blockIdx.z;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t n = p.ntok[l], t0 = split * SPLIT, t1 = min(t0 + SPLIT, n);
    __shared__ float sm_m[AW][MAXG], sm_l[AW][MAXG], sm_acc[AW][MAXG][MAXE * 32];
    float q[MAXG][E], m[MAXG], s[MAXG], acc[MAXG][E];
    const T *qb = (const T *)p.q + ((size_t)l * p.H + g * p.G) * p.d;
#pragma unroll
    for (int h = 0; h < MAXG; h++) {
        m[h] = -INFINITY, s[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            acc[h][e] = 0.0f;
            q[h][e] = h < (int)p.G ? to_f(qb[(size_t)h * p.d + lane * E + e]) * p.scale : 0.0f;
        }
    }
    const uint64_t *po = p.page_offs[l];
    uint32_t per = (SPLIT + AW - 1) / AW, w0 = t0 + warp * per, w1 = min(w0 + per, t1);
    for (uint32_t t = w0; t < w1; t++) {
        const T *k = (const T *)(p.base + po[t / p.tpp] + ((size_t)g * p.tpp + t % p.tpp) * p.row);
        const T *v = (const T *)((const uint8_t *)k + p.voff);
        float kf[E], vf[E];
#pragma unroll
        for (int e = 0; e < E; e++)
            kf[e] = to_f(k[lane * E + e]), vf[e] = to_f(v[lane * E + e]);
#pragma unroll
        for (int h = 0; h < MAXG; h++) {
            if (h >= (int)p.G)
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
        if (h >= (int)p.G)
            break;
        if (lane == 0)
            sm_m[warp][h] = m[h], sm_l[warp][h] = s[h];
#pragma unroll
        for (int e = 0; e < E; e++)
            sm_acc[warp][h][lane * E + e] = acc[h][e];
    }
    __syncthreads();
    // merge the warps: thread x handles (head, dim) pairs
    for (uint32_t x = threadIdx.x; x < p.G * p.d; x += blockDim.x) {
        uint32_t h = x / p.d, e = x % p.d;
        float M = -INFINITY;
        for (int w = 0; w < AW; w++)
            M = fmaxf(M, sm_m[w][h]);
        float S = 0.0f, A = 0.0f;
        for (int w = 0; w < AW; w++) {
            float c = sm_m[w][h] == -INFINITY ? 0.0f : __expf(sm_m[w][h] - M);
            S += sm_l[w][h] * c, A += sm_acc[w][h][e] * c;
        }
        float *dst = p.part + (((size_t)l * p.H + g * p.G + h) * p.splits + split) * (p.d + 2);
        dst[e] = A;
        if (e == 0)
            dst[p.d] = M, dst[p.d + 1] = S;
    }
}

__global__ void attn_merge(aparams p)
{
    uint32_t lh = blockIdx.x, l = lh / p.H; // one block per (layer, head)
    uint32_t n = p.ntok[l], used = (n + SPLIT - 1) / SPLIT;
    const float *part = p.part + (size_t)lh * p.splits * (p.d + 2);
    for (uint32_t e = threadIdx.x; e < p.d; e += blockDim.x) {
        float M = -INFINITY;
        for (uint32_t s = 0; s < used; s++)
            M = fmaxf(M, part[(size_t)s * (p.d + 2) + p.d]);
        float S = 0.0f, A = 0.0f;
        for (uint32_t s = 0; s < used; s++) {
            const float *ps = part + (size_t)s * (p.d + 2);
            float c = ps[p.d] == -INFINITY ? 0.0f : __expf(ps[p.d] - M);
            S += ps[p.d + 1] * c, A += ps[e] * c;
        }
        p.out[(size_t)lh * p.d + e] = S > 0.0f ? A / S : 0.0f;
    }
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
                                          const uint32_t *n_tokens, uint32_t max_tokens, uint32_t L,
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
                 1.0f / sqrtf((float)d)};
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
