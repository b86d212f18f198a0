/* bench-gpu - CAKE's GPU kernels at Llama-3.1-8B shapes, on the card this runs on.
 *
 *   bench-gpu [--sizes 4096,32768,131072] [--reps R] [--no-torch] [--no-attn]
 *
 * Prints, in one run: the card and its measured device-to-device copy bandwidth (bytes read
 * plus written); per prompt length the scoring time of one layer (32 query heads, 8 kv
 * heads, head_dim 128, window 32, bf16) against the floor (the layer's key bytes read once at
 * that bandwidth) and against the same scoring in PyTorch on the same GPU
 * (tools/bench_score_torch.py --device cuda); and score + select (992 kept per kv head) +
 * compact. Median of R runs timed with CUDA events. */
#include <cuda_runtime.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "kern_cuda.h"
#include "util.h"

#define H 32
#define HKV 8
#define D 128
#define W 32
#define KEEP 992

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "bench-gpu: %s: %s\n", #x, cudaGetErrorString(e_));            \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static float median(float *v, int n)
{
    for (int i = 1; i < n; i++) /* insertion sort: n is small */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            float t = v[j];
            v[j] = v[j - 1], v[j - 1] = t;
        }
    return v[n / 2];
}

static double copy_bandwidth(void)
{
    size_t bytes = 1ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemset(a, 1, bytes));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float t[10];
    for (int i = 0; i < 12; i++) {
        cudaEventRecord(e0, 0);
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        if (i >= 2)
            cudaEventElapsedTime(&t[i - 2], e0, e1);
    }
    cudaFree(a), cudaFree(b);
    return 2.0 * bytes / (median(t, 10) / 1e3);
}

static double torch_ms(uint32_t n, const char *what, char *why, size_t wl)
{
    char cmd[512], line[256];
    snprintf(cmd, sizeof cmd, "python3 '%s/bench_score_torch.py' --device cuda --n %u --what %s "
             "--layers 32 --reps 20 2>&1", CAKE_TOOLS_DIR, n, what);
    FILE *p = popen(cmd, "r");
    double t = -1;
    snprintf(why, wl, "no output");
    while (p && fgets(line, sizeof line, p)) {
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "seconds %lf", &t) == 1)
            break;
        snprintf(why, wl, "%.120s", line);
    }
    if (p)
        pclose(p);
    return t > 0 ? t * 1e3 : -1;
}

/* One decode step's attention over 32 layers of n tokens each (our kernel, one launch). */
static double attn_us(uint32_t n, int reps)
{
    enum { L = 32 };
    size_t half = (size_t)HKV * n * D * 2, layer = 2 * half;
    uint8_t *kv;
    uint64_t *offs, host_off[L], *ptrs[L], **dptrs;
    uint32_t *dn, ntok[L];
    void *q, *ws;
    float *out;
    CK(cudaMalloc((void **)&kv, layer * L));
    /* random bf16 in [-1, 1): K and V are the same bytes here; their values do not change the
     * work */
    uint16_t *h = malloc(layer);
    uint64_t seed = 88172645463325252ull;
    for (size_t i = 0; i < layer / 2; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        h[i] = kern_f32_to_bf16((float)((seed >> 40) * (2.0 / 16777216.0) - 1.0));
    }
    for (int l = 0; l < L; l++)
        CK(cudaMemcpy(kv + l * layer, h, layer, cudaMemcpyHostToDevice));
    free(h);
    CK(cudaMalloc((void **)&offs, sizeof host_off));
    for (int l = 0; l < L; l++)
        host_off[l] = (uint64_t)l * layer, ntok[l] = n;
    CK(cudaMemcpy(offs, host_off, sizeof host_off, cudaMemcpyHostToDevice));
    for (int l = 0; l < L; l++)
        ptrs[l] = offs + l;
    CK(cudaMalloc((void **)&dptrs, sizeof ptrs));
    CK(cudaMemcpy(dptrs, ptrs, sizeof ptrs, cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&dn, sizeof ntok));
    CK(cudaMemcpy(dn, ntok, sizeof ntok, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&q, (size_t)L * H * D * 2));
    CK(cudaMemset(q, 0x3c, (size_t)L * H * D * 2)); /* bf16 0x3c3c ~ 0.0115 */
    CK(cudaMalloc((void **)&out, sizeof(float) * L * H * D));
    size_t wsb = kern_cuda_attn_workspace(L, H, D, n);
    CK(cudaMalloc(&ws, wsb));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float t[64];
    for (int r = -3; r < reps; r++) {
        cudaEventRecord(e0, 0);
        if (kern_cuda_decode_attention(KERN_BF16, kv, (const uint64_t *const *)dptrs, dn, n, L, H, HKV, D,
                                       n, half, q, out, ws, wsb, NULL))
            exit(1);
        cudaEventRecord(e1, 0);
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            cudaEventElapsedTime(&t[r], e0, e1);
    }
    cudaFree(kv), cudaFree(offs), cudaFree(dptrs), cudaFree(dn), cudaFree(q), cudaFree(out), cudaFree(ws);
    return median(t, reps) * 1e3;
}

int main(int argc, char **argv)
{
    uint32_t sizes[8] = {4096, 32768, 131072}, ns = 3;
    int reps = 20, torch = 1, attn = 1, o;
    static const struct option opts[] = {
        {"sizes", 1, 0, 's'}, {"reps", 1, 0, 'r'}, {"no-torch", 0, 0, 'n'}, {"no-attn", 0, 0, 'a'},
        {0, 0, 0, 0}};
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 's') {
            ns = 0;
            for (char *t = strtok(optarg, ","); t && ns < 8; t = strtok(NULL, ","))
                sizes[ns++] = (uint32_t)strtoul(t, NULL, 0);
        } else if (o == 'r') {
            reps = atoi(optarg) > 0 ? atoi(optarg) : 1;
        } else if (o == 'n') {
            torch = 0;
        } else if (o == 'a') {
            attn = 0;
        } else {
            fprintf(stderr, "usage: bench-gpu [--sizes N,..] [--reps R] [--no-torch] [--no-attn]\n");
            return 2;
        }
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || !ndev) {
        printf("bench-gpu: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    double bw = copy_bandwidth();
    printf("bench-gpu: %s, %d SMs; device copy %.2f TB/s (read + write)\n", prop.name,
           prop.multiProcessorCount, bw / 1e12);
    printf("one layer: H=%d Hkv=%d d=%d w=%d bf16; median of %d; floor = key bytes / copy bandwidth\n",
           H, HKV, D, W, reps);
    printf("%8s %10s %10s %8s %10s %8s %14s %8s\n", "n", "score_us", "floor_us", "x_floor",
           "torch_us", "speedup", "s+sel+cmp_us", "x_floor");
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    for (uint32_t si = 0; si < ns; si++) {
        uint32_t n = sizes[si], S = n - W;
        size_t half = (size_t)HKV * n * D * 2;
        uint16_t *hk = malloc(half * 2), *hq = malloc((size_t)H * W * D * 2);
        uint64_t seed = 0x9e3779b97f4a7c15ull;
        for (size_t i = 0; i < half; i++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            hk[i] = kern_f32_to_bf16((float)((seed >> 40) * (2.0 / 16777216.0) - 1.0));
        }
        for (size_t i = 0; i < (size_t)H * W * D; i++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            hq[i] = kern_f32_to_bf16((float)((seed >> 40) * (4.0 / 16777216.0) - 2.0));
        }
        uint8_t *page;
        uint64_t *off, zero = 0;
        void *q, *ws, *tmp;
        float *ind;
        uint32_t *idx;
        CK(cudaMalloc((void **)&page, half * 2));
        CK(cudaMalloc((void **)&off, sizeof(uint64_t)));
        CK(cudaMalloc(&q, (size_t)H * W * D * 2));
        CK(cudaMalloc((void **)&ind, sizeof(float) * HKV * S));
        CK(cudaMalloc((void **)&idx, sizeof(uint32_t) * HKV * KEEP));
        CK(cudaMalloc(&tmp, 2 * (size_t)HKV * (KEEP + W) * D * 2));
        CK(cudaMemcpy(page, hk, half, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(page + half, hk, half, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(off, &zero, sizeof zero, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(q, hq, (size_t)H * W * D * 2, cudaMemcpyHostToDevice));
        size_t wsb = kern_cuda_score_workspace(HKV, H, W, n, S);
        CK(cudaMalloc(&ws, wsb));
        struct kern_cuda_kv kv = {KERN_BF16, HKV, D, n, n, page, off, half};
        float t[64], t2[64];
        for (int r = -3; r < reps; r++) {
            cudaEventRecord(e0, 0);
            if (kern_cuda_score_layer(&kv, q, H, W, S, 200.0f, ind, NULL, NULL, ws, wsb, NULL))
                return 1;
            cudaEventRecord(e1, 0);
            CK(cudaEventSynchronize(e1));
            if (r >= 0)
                cudaEventElapsedTime(&t[r], e0, e1);
        }
        for (int r = -3; r < reps; r++) { /* compaction moves data: restore n tokens each time */
            kv.n_tokens = n;
            cudaEventRecord(e0, 0);
            kern_cuda_score_layer(&kv, q, H, W, S, 200.0f, ind, NULL, NULL, ws, wsb, NULL);
            kern_cuda_topk(ind, HKV, S, KEEP, idx, NULL);
            kern_cuda_compact(&kv, idx, KEEP, S, W, tmp, NULL);
            cudaEventRecord(e1, 0);
            CK(cudaEventSynchronize(e1));
            CK(cudaGetLastError());
            if (r >= 0)
                cudaEventElapsedTime(&t2[r], e0, e1);
        }
        /* the floor: the layer's key bytes read once at the rate the copy moved bytes
         * (read + write counted), which is what the memory sustains */
        double ms = median(t, reps), ms2 = median(t2, reps), floor_us = (double)half / bw * 1e6;
        char why[160] = "--no-torch";
        double tms = torch ? torch_ms(n, "score", why, sizeof why) : -1;
        if (tms > 0)
            printf("%8u %10.1f %10.1f %7.2fx %10.1f %7.1fx %14.1f %7.2fx\n", n, ms * 1e3, floor_us,
                   ms * 1e3 / floor_us, tms * 1e3, tms / ms, ms2 * 1e3, ms2 * 1e3 / floor_us);
        else
            printf("%8u %10.1f %10.1f %7.2fx %10s %8s %14.1f %7.2fx  (torch: %s)\n", n, ms * 1e3,
                   floor_us, ms * 1e3 / floor_us, "-", "-", ms2 * 1e3, ms2 * 1e3 / floor_us, why);
        fflush(stdout);
        cudaFree(page), cudaFree(off), cudaFree(q), cudaFree(ind), cudaFree(idx), cudaFree(tmp), cudaFree(ws);
        free(hk), free(hq);
    }
    if (!attn)
        return 0;
    /* a decode step's attention over 32 layers: full 128K cache vs CAKE at 1024 + window */
    double full = attn_us(131072, reps), cake = attn_us(1024 + W, reps);
    double data_full = 32.0 * 2 * HKV * 131072 * D * 2, data_cake = 32.0 * 2 * HKV * (1024 + W) * D * 2;
    printf("decode attention, 32 layers (H=%d Hkv=%d d=%d bf16), our paged kernel, one launch:\n", H, HKV, D);
    printf("  full cache 131072 tokens/layer: %9.1f us (floor %.1f us)\n", full, data_full / bw * 1e6);
    printf("  CAKE 1024+%d tokens/layer:      %9.1f us (floor %.1f us)   full / CAKE = %.1fx\n", W, cake,
           data_cake / bw * 1e6, full / cake);
    char why[160] = "--no-torch";
    double sd = torch ? torch_ms(131072, "sdpa", why, sizeof why) : -1;
    if (sd > 0)
        printf("  torch SDPA, full cache, 32 calls: %7.1f us   torch full / CAKE = %.1fx\n", sd * 1e3, sd * 1e3 / cake);
    else
        printf("  torch SDPA: %s\n", why);
    return 0;
}
