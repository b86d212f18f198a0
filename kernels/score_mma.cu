// score_mma.cu - CAKE's window scoring on mma.sync with the keys as rows (see score_mma.h).
//
// The product is taken as K . Q^T: a 16-key m-tile of the keys (staged in shared memory by a
// 3-stage cp.async pipeline in 128-byte swizzled rows, read with ldmatrix) times the group's queries, whose fragments
// stay in registers for the whole block. In that orientation a thread's accumulators hold 2
// keys x 8 query columns, so
//  - pass 1 (each query's max and exp-sum over the keys) is a running max/sum per thread and
//    column, with no per-tile reductions: lanes and warps combine once, at the end;
//  - pass 2 (per key: the sum and sum of squares of its probabilities over the window
//    queries of each head) reduces along the thread's own registers and one quad.
// Exponentials are base 2 with the scale folded into one FMA. Pass 2 walks its chunk
// backwards: the tail pass 1 read last is still in L2. Per-block partial sums are reduced
// in a fixed order, so results are reproducible run to run. The passes' bodies are in
// score_mma_dev.cuh (evict.cu runs them too); the kernels here give them their chunk. At
// 8B models' shape on Hopper both passes run on wgmma instead (mpass1_wg, mpass2_wg:
// score_wg_dev.cuh's *_body_wg), the same contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <atomic>
#include <type_traits>

#include "cuda_internal.h"
#include "score_mma.h"
#include "score_mma_dev.cuh"
#include "score_wg_dev.cuh"

namespace {

using namespace smma;

constexpr int STAGES = SCORE_MMA_BPS == 1 ? 4 : 3;

template <typename T, int KS, int NSP>
__global__ void __launch_bounds__(THREADS, SCORE_MMA_BPS) mpass1(mparams p)
{
    extern __shared__ uint4 smem4[];
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk, c1 = min(c0 + p.chunk, p.n);
    size_t at = ((size_t)g * p.chunks1 + blockIdx.x) * p.Rp;
    pass1_body<T, KS, NSP, STAGES>(p, g, c0, c1, smem_aligned(smem4), p.m + at, p.l + at);
}

// Pass 1 on wgmma (score_wg_dev.cuh's pass1_body_wg, its shape): the queries in registers,
// three stages, two blocks an SM.
constexpr int WG1_STAGES = 3;
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) mpass1_wg(mparams p, const __grid_constant__ wg_tma tm)
{
    extern __shared__ uint4 smem4[];
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk, c1 = min(c0 + p.chunk, p.n);
    size_t at = ((size_t)g * p.chunks1 + blockIdx.x) * p.Rp;
    pass1_body_wg<T, WG1_STAGES>(p, g, c0, c1, smem_aligned(smem4), p.m + at, p.l + at, &tm);
}

// the block's entropy and variance sums, in a fixed order, to p.ent / p.var (smem free)
__device__ void block_sums(const mparams &p, uint8_t *smem, double e_sum, double v_sum)
{
    uint32_t g = blockIdx.y;
    double *red_e = (double *)smem, *red_v = red_e + THREADS; // the stages are free
    red_e[threadIdx.x] = -LN2 * e_sum, red_v[threadIdx.x] = v_sum;
    __syncthreads();
    for (int o = THREADS / 2; o; o >>= 1) {
        if ((int)threadIdx.x < o)
            red_e[threadIdx.x] += red_e[threadIdx.x + o], red_v[threadIdx.x] += red_v[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        size_t b = (size_t)g * gridDim.x + blockIdx.x;
        p.ent[b] = red_e[0], p.var[b] = red_v[0];
    }
}

template <typename T, int KS, int NSP, int HPS>
__global__ void __launch_bounds__(THREADS, SCORE_MMA_BPS) mpass2(mparams p)
{
    extern __shared__ uint4 smem4[];
    uint8_t *smem = smem_aligned(smem4);
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk, c1 = min(c0 + p.chunk, p.S);
    double e_sum = 0.0, v_sum = 0.0;
    pass2_body<T, KS, NSP, HPS, STAGES>(p, g, c0, c1, smem, p.rowM + g * p.Rp, p.rowLnL + g * p.Rp,
                                        p.acc + (size_t)g * p.S, e_sum, v_sum);
    block_sums(p, smem, e_sum, v_sum);
}

// The same on wgmma (score_wg_dev.cuh's pass2_body_wg, its shape): two stages and the
// queries' room, two blocks an SM.
constexpr int WG_STAGES = 2;
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) mpass2_wg(mparams p, const __grid_constant__ wg_tma tm)
{
    extern __shared__ uint4 smem4[];
    uint8_t *smem = smem_aligned(smem4);
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk, c1 = min(c0 + p.chunk, p.S);
    double e_sum = 0.0, v_sum = 0.0;
    pass2_body_wg<T, WG_STAGES>(p, g, c0, c1, smem, p.rowM + g * p.Rp, p.rowLnL ? p.rowLnL + g * p.Rp : nullptr,
                                p.acc + (size_t)g * p.S, e_sum, v_sum, &tm);
    pdl_trigger(); // the pooling may launch (it waits for this grid's end before it reads)
    block_sums(p, smem, e_sum, v_sum);
}

// wg: launch's choice of wgmma (taken once: the LSE path reads the rows where wgmma's pass 2
// runs, and the setting may change meanwhile); tm: the keys' map for the wgmma passes
template <typename T, int KS, int NSP, int HPS>
int launch_pass2(mparams &p, const score_mma_args &a, bool wg, const wg_tma &tm)
{
    if constexpr (KS == 8 && NSP == 4 && HPS == 1)
        if (wg) {
            static kern_attrs wset[SCORE_MAX_DEV];
            size_t wb = SMEM_ALIGN + WG_STAGES * shape<8>::STAGE_BYTES + WG_Q_BYTES;
            if (int rc = smem_limit(mpass2_wg<T>, wset, a.dev, wb, -1))
                return rc;
            mpass2_wg<T><<<dim3(a.chunks2, a.hkv), THREADS, wb, (cudaStream_t)a.stream>>>(p, tm);
            CK(cudaGetLastError());
            return 0;
        }
    static kern_attrs set[SCORE_MAX_DEV];
    size_t bytes = SMEM_ALIGN + STAGES * shape<KS>::STAGE_BYTES + (size_t)2 * TK * NSP * HPS * 2 * sizeof(float);
    if (int rc = smem_limit(mpass2<T, KS, NSP, HPS>, set, a.dev, bytes, -1))
        return rc;
    mpass2<T, KS, NSP, HPS><<<dim3(a.chunks2, a.hkv), THREADS, bytes, (cudaStream_t)a.stream>>>(p);
    CK(cudaGetLastError());
    return 0;
}

template <typename T, int KS, int NSP>
int launch(mparams &p, const score_mma_args &a)
{
    static kern_attrs set1[SCORE_MAX_DEV];
    size_t sm1 = SMEM_ALIGN + STAGES * shape<KS>::STAGE_BYTES;
    if (a.dev < 0 || a.dev >= SCORE_MAX_DEV)
        return -EINVAL;
    if (int rc = smem_limit(mpass1<T, KS, NSP>, set1, a.dev, sm1, -1))
        return rc;
    cudaStream_t st = (cudaStream_t)a.stream;
    const bool wg = KS == 8 && NSP == 4 && score_wg_on(a.dev) && wg_shape(KS, p.G, p.nq, p.nqp);
    wg_tma tm; // the keys' map for both wgmma passes, encoded once
    if (wg)
        tm = wg_tma_for(a.dev, a.base, a.tpp, a.d);
    else
        memset(&tm, 0, sizeof tm);
    int rc;
    if (a.lse && wg && p.hps == 1) { /* one pass on wgmma (launch_pass2 takes this wg): a kv
                                         head's rows are the engine's [G][nq] LSEs as they lie */
        p.rowM = a.lse, p.rowLnL = nullptr, rc = 0;
    } else if (a.lse) { /* the engine's normalizers: one pass over the keys */
        rc = score_lse_rows(a.lse, a.rowM, a.rowLnL, a.hkv, p.G, p.nq, p.nqp, p.Rp, st);
    } else if (wg) {
        static kern_attrs wset[SCORE_MAX_DEV];
        size_t wb = SMEM_ALIGN + WG1_STAGES * shape<8>::STAGE_BYTES;
        if (int rc1 = smem_limit(mpass1_wg<T>, wset, a.dev, wb, -1))
            return rc1;
        mpass1_wg<T><<<dim3(a.chunks1, a.hkv), THREADS, wb, st>>>(p, tm);
        CK(cudaGetLastError());
        rc = score_merge(a.m, a.l, a.rowM, a.rowLnL, a.hkv, a.chunks1, p.Rp, p.Rp, st);
    } else {
        mpass1<T, KS, NSP><<<dim3(a.chunks1, a.hkv), THREADS, sm1, st>>>(p);
        CK(cudaGetLastError());
        rc = score_merge(a.m, a.l, a.rowM, a.rowLnL, a.hkv, a.chunks1, p.Rp, p.Rp, st);
    }
    if (rc)
        return rc;
    return p.hps == 1 ? launch_pass2<T, KS, NSP, 1>(p, a, wg, tm)
         : p.hps == 2 ? launch_pass2<T, KS, NSP, 2>(p, a, wg, tm)
                      : launch_pass2<T, KS, NSP, 4>(p, a, wg, tm);
}

template <typename T, int KS>
int launch_ns(mparams &p, const score_mma_args &a, uint32_t nsp)
{
    switch (nsp) {
    case 1: return launch<T, KS, 1>(p, a);
    case 2: return launch<T, KS, 2>(p, a);
    case 4: return launch<T, KS, 4>(p, a);
    default: return launch<T, KS, 8>(p, a);
    }
}

} // namespace

// kern_cuda_set_carveout's setting; CARVE_OWN: none, each kernel asks for its own
constexpr int CARVE_OWN = -2;
static std::atomic<int> carveout{CARVE_OWN};

int score_carveout(int own)
{
    int cv = carveout.load();
    return cv == CARVE_OWN ? own : cv;
}

extern "C" int kern_cuda_set_carveout(int percent)
{
    return carveout.exchange(percent < -2 ? CARVE_OWN : percent < 0 ? percent : percent > 100 ? 100 : percent);
}

// kern_cuda_score_set_wgmma's setting; -1: CAKE_WGMMA's, read at first use
static std::atomic<int> wg_allowed{-1};

static int wg_setting() { return env_switch(wg_allowed, "CAKE_WGMMA"); }

extern "C" int kern_cuda_score_set_wgmma(int on)
{
    int prev = wg_setting();
    wg_allowed.store(on ? 1 : 0);
    return prev;
}

// CAKE_TMA ("0": off), read at first use
static std::atomic<int> tma_allowed{-1};

smma::wg_tma smma::wg_tma_for(int dev, const void *base, uint32_t tpp, uint32_t d)
{
    wg_tma t;
    memset(&t, 0, sizeof t);
    uint32_t rows = tpp & (~tpp + 1); // the largest power of two dividing tpp
    rows = rows > 64 ? 64 : rows;
    if (!env_switch(tma_allowed, "CAKE_TMA") || !score_wg_on(dev) || d != 128 || rows < 16 || (uintptr_t)base % 256)
        return t;
    static std::atomic<PFN_cuTensorMapEncodeTiled_v12000> enc{nullptr};
    PFN_cuTensorMapEncodeTiled_v12000 fn = enc.load();
    if (!fn) {
        cudaDriverEntryPointQueryResult q;
        void *f = nullptr;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess || !f) {
            cudaGetLastError();
            return t;
        }
        enc.store(fn = (PFN_cuTensorMapEncodeTiled_v12000)f);
    }
    // the pool as 2^31 rows of 128 two-byte elements from base: only the pages' rows are read
    cuuint64_t dims[2] = {128, (cuuint64_t)1 << 31}, strides[1] = {256};
    cuuint32_t box[2] = {64, rows}, es[2] = {1, 1};
    if (fn(&t.map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, (void *)base, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
           CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS)
        t.rows = rows;
    return t;
}

bool score_wg_on(int dev)
{
    return wg_setting() && device_cc(dev) == 90; /* 9.0: the sm_90a code's wgmma */
}

uint32_t score_mma_rows(uint32_t G, uint32_t nq, uint32_t d)
{
    if (d != 64 && d != 128)
        return 0;
    uint32_t rp = G * pad_nq(nq);
    return rp <= 256 ? rp : 0;
}

// One wave of blocks (or the caller's chunk, if longer): blocks of a kv head split its keys.
static uint32_t block_chunk(int dev, uint32_t n, uint32_t hkv, uint32_t at_least)
{
    static int sms[SCORE_MAX_DEV];
    if (!sms[dev] && cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        sms[dev] = 0;
    uint32_t slots = (uint32_t)sms[dev] * SCORE_MMA_BPS;
    uint32_t per = sms[dev] > 0 && slots >= hkv ? slots / hkv : 1;
    uint32_t c = (n + per - 1) / per;
    c = (c + TK - 1) / TK * TK;
    return c > at_least ? c : at_least;
}

int score_mma_run(score_mma_args &a)
{
    if (a.dev < 0 || a.dev >= SCORE_MAX_DEV || a.chunk % TK || !a.chunk)
        return -EINVAL;
    a.chunk = block_chunk(a.dev, a.n, a.hkv, a.chunk);
    a.chunks1 = (a.n + a.chunk - 1) / a.chunk, a.chunks2 = (a.S + a.chunk - 1) / a.chunk;
    mparams p = {};
    p.base = a.base, p.page_off = a.page_off;
    if (a.tpp == 0)
        return -EINVAL;
    set_tpp(p, a.tpp);
    p.n = a.n, p.wb = a.n - a.nq, p.d = a.d, p.G = a.G, p.nq = a.nq, p.nqp = pad_nq(a.nq), p.Rp = p.G * p.nqp;
    p.hps = p.nqp < 32 ? 32 / p.nqp : 1, p.sph = p.nqp > 32 ? p.nqp / 32 : 1;
    p.S = a.S, p.chunk = a.chunk, p.chunks1 = a.chunks1;
    p.scale = 1.0f / sqrtf((float)a.d), p.c2 = p.scale * LOG2E, p.mw = a.mw, p.gamma = a.gamma;
    p.q = a.q, p.m = a.m, p.l = a.l, p.rowM = a.rowM, p.rowLnL = a.rowLnL, p.acc = a.acc;
    p.ent = a.ent, p.var = a.var;
    if (p.Rp != score_mma_rows(a.G, a.nq, a.d))
        return -EINVAL;
    uint32_t ns = (p.Rp + 31) / 32, nsp = ns <= 1 ? 1 : ns <= 2 ? 2 : ns <= 4 ? 4 : 8;
    bool bf = a.bf16;
    if (a.d == 128)
        return bf ? launch_ns<__nv_bfloat16, 8>(p, a, nsp) : launch_ns<__half, 8>(p, a, nsp);
    return bf ? launch_ns<__nv_bfloat16, 4>(p, a, nsp) : launch_ns<__half, 4>(p, a, nsp);
}
