/* bench-gpu - CAKE's GPU kernels at Llama-3.1-8B shapes, on the card this runs on.
 *
 *   bench-gpu [--sizes 4096,32768,131072] [--reps R] [--no-torch] [--no-attn] [--no-caked]
 *             [--carveout P]
 *
 * --carveout: the shared-memory carveout this process's scoring and eviction kernels ask for
 * (kern_cuda_set_carveout: a percent, -1 the driver's choice; default each kernel's own).
 * Compare in two processes: an SM seems to keep the split a kernel asked for, so a later
 * launch without a preference inherits it.
 * Prints, in one run: the card and its measured device-to-device copy bandwidth (bytes read
 * plus written); per prompt length the scoring time of one layer (32 query heads, 8 kv
 * heads, head_dim 128, window 32, bf16) against the floor (the layer's key bytes read once at
 * that bandwidth) and against the same scoring in PyTorch on the same GPU
 * (tools/bench_score_torch.py --device cuda) and against the WMMA scoring passes caked used
 * before (wmma_us: kern_cuda_score_set_wmma, same inputs); and score + select (992 kept per
 * kv head) + compact; then both again in one pass with the engine's log-sum-exps (lse_us:
 * kern_cuda_score_layer_pool with lse, the values random rows would give). Median of R runs
 * timed with CUDA events; each n's "queued" row times the same chains enqueued behind a hold
 * (gpu_hold.cu: the GPU starts them only once the host has queued them all), so their
 * launches' host cost - which an engine's stream hides behind its own work - stays out of
 * the events (nvbench's blocking kernel). Then a decode step's attention over 32
 * layers (full cache vs CAKE, and torch SDPA), a decode step's eviction of 32 layers by the
 * per-layer kernels and by the one launch (kern_cuda_decode_evict) with where the launch's
 * time goes (each block's phases from its clocks; the launch's events against its blocks'
 * span, the SMs they ran on and the SM clock), a cascading stage's compactions layer by
 * layer and in one pass (kern_cuda_compact_many), and, through a caked
 * started with a GPU pool
 * (--no-caked skips it): the attach cost (connect + GPU pool import + map + host pool
 * registration), host<->GPU bandwidth between the registered host pool and the GPU pool, and
 * a GPU-resident sequence of 32 layers: prefill observe per layer as the engine sees it (round
 * trip: score, select, compact in caked), decode steps that evict every layer on the GPU (each
 * with caked's own account of its jobs: waiting for a worker, run, back to the loop), and
 * cake_decode_attention over the compacted cache. */
#include <cuda_runtime.h>
#include <math.h>
#include <getopt.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "gpu_hold.h"
#include "gpupool.h"
#include "kern.h"
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

static double dmedian(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), util_cmp_double);
    return v[n / 2];
}

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

/* One decode step's attention over 32 layers of n tokens each (our kernel, one launch), in
 * pages of tpp tokens ([2][kv heads][tpp][d]; n a multiple of tpp), on CUDA cores (simt)
 * or the tensor cores. */
static double attn_us(uint32_t n, int reps, uint32_t tpp, int simt)
{
    enum { L = 32 };
    size_t half = (size_t)HKV * tpp * D * 2, layer = (size_t)2 * HKV * n * D * 2, np = n / tpp;
    uint8_t *kv;
    uint64_t *offs, *host_off = malloc(sizeof(uint64_t) * L * np), *ptrs[L], **dptrs;
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
    CK(cudaMalloc((void **)&offs, sizeof(uint64_t) * L * np));
    for (int l = 0; l < L; l++) {
        ntok[l] = n;
        for (size_t i = 0; i < np; i++)
            host_off[l * np + i] = (uint64_t)l * layer + i * 2 * half;
    }
    CK(cudaMemcpy(offs, host_off, sizeof(uint64_t) * L * np, cudaMemcpyHostToDevice));
    free(host_off);
    for (int l = 0; l < L; l++)
        ptrs[l] = offs + l * np;
    CK(cudaMalloc((void **)&dptrs, sizeof ptrs));
    CK(cudaMemcpy(dptrs, ptrs, sizeof ptrs, cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&dn, sizeof ntok));
    CK(cudaMemcpy(dn, ntok, sizeof ntok, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&q, (size_t)L * H * D * 2));
    CK(cudaMemset(q, 0x3c, (size_t)L * H * D * 2)); /* bf16 0x3c3c ~ 0.0115 */
    CK(cudaMalloc((void **)&out, sizeof(float) * L * H * D));
    size_t wsb = kern_cuda_attn_workspace(L, H, D, n);
    CK(cudaMalloc(&ws, wsb));
    int was = kern_cuda_attn_set_simt(simt);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float t[64];
    for (int r = -3; r < reps; r++) {
        cudaEventRecord(e0, 0);
        if (kern_cuda_decode_attention(KERN_BF16, kv, (const uint64_t *const *)dptrs, dn, NULL, n, L, H, HKV, D,
                                       tpp, half, q, out, ws, wsb, NULL))
            exit(1);
        cudaEventRecord(e1, 0);
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            cudaEventElapsedTime(&t[r], e0, e1);
    }
    kern_cuda_attn_set_simt(was);
    cudaFree(kv), cudaFree(offs), cudaFree(dptrs), cudaFree(dn), cudaFree(q), cudaFree(out), cudaFree(ws);
    return median(t, reps) * 1e3;
}


static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* A block of the last launch: its duration and start (global timer, ns), its index. */
struct blk {
    uint64_t dur, start;
    uint32_t b;
};

static int slower_first(const void *a, const void *b)
{
    uint64_t x = ((const struct blk *)a)->dur, y = ((const struct blk *)b)->dur;
    return x > y ? -1 : x < y;
}

/* The last launch's blocks by their global-timer time: the spread of their durations and
 * starts, how many SMs ran them, and the slowest few with their phases (at the nominal
 * clock), their SM and how many of the launch's blocks that SM ran: whether the launch's
 * span beyond its median block comes from late starts, slow phases or crowded SMs. */
static void evict_spread(const unsigned long long *pc, uint32_t nb, uint32_t kv_heads, int khz)
{
    enum { C = KERN_EVICT_CLOCKS, P = KERN_EVICT_PHASES, SHOW = 4 };
    struct blk *bl = malloc(sizeof(*bl) * (nb + 1));
    uint32_t per_sm[1024] = {0}, m = 0, sms = 0;
    uint64_t t0 = UINT64_MAX, late = 0;
    if (!bl)
        return;
    for (uint32_t b = 0; b < nb; b++)
        if (pc[(size_t)b * C + P])
            t0 = pc[(size_t)b * C + P + 1] < t0 ? pc[(size_t)b * C + P + 1] : t0;
    for (uint32_t b = 0; b < nb; b++) {
        const unsigned long long *c = pc + (size_t)b * C;
        if (!c[P])
            continue;
        uint32_t sm = (uint32_t)c[P + 3] & 1023;
        sms += !per_sm[sm]++;
        bl[m++] = (struct blk){.dur = c[P + 2] - c[P + 1], .start = c[P + 1] - t0, .b = b};
        late = c[P + 1] - t0 > late ? c[P + 1] - t0 : late;
    }
    if (!m) {
        free(bl);
        return;
    }
    qsort(bl, m, sizeof(*bl), slower_first);
    printf("    the last launch's blocks (global timer): %u blocks on %u SMs; duration max %.1f, p90 %.1f, median %.1f, "
           "p10 %.1f, min %.1f us; the latest start %.1f us after the first\n",
           m, sms, bl[0].dur * 1e-3, bl[m / 10].dur * 1e-3, bl[m / 2].dur * 1e-3,
           bl[m - 1 - m / 10].dur * 1e-3, bl[m - 1].dur * 1e-3, late * 1e-3);
    for (uint32_t i = 0; i < m && i < SHOW; i++) {
        const unsigned long long *c = pc + (size_t)bl[i].b * C;
        printf("      slow block %u (layer %u, kv head %u) on SM %llu (%u blocks there): start +%.1f, %.1f us;",
               bl[i].b, bl[i].b / kv_heads, bl[i].b % kv_heads, c[P + 3], per_sm[c[P + 3] & 1023],
               bl[i].start * 1e-3, bl[i].dur * 1e-3);
        for (int ph = 0; ph < P; ph++)
            printf(" %.1f", (c[ph + 1] - c[ph]) / (khz * 1e-3));
        printf(" us by phase\n");
    }
    free(bl);
}

/* Where the one launch's time goes: reps more launches over caked's page layout with each
 * block's clocks (kern_cuda_evict.phase_clock) and events around each; the medians of the
 * events' time, of the launch's span (the first block's start to the last one's end, by the
 * global timer), of the blocks that started only after another had ended (a second wave),
 * of the most blocks one SM ran at once, and of the SM clock the blocks ran at (their
 * cycles over their global-timer time); then the last launch's median block, phase by
 * phase, at the SM's nominal clock. */
static void evict_phases(const char *label, const struct kern_cuda_evict *ke,
                         const struct kern_cuda_evict_job *djobs, uint32_t L, uint32_t S, int reps)
{
    enum { C = KERN_EVICT_CLOCKS, P = KERN_EVICT_PHASES };
    uint32_t nb = L * ke->kv_heads;
    size_t bytes = sizeof(unsigned long long) * nb * C;
    unsigned long long *dpc, *pc = calloc(1, bytes);
    uint64_t *col = malloc(sizeof(uint64_t) * nb);
    double ev[64], span[64], late[64], most[64], mhz[64], *clk = malloc(sizeof(double) * nb);
    int khz = 0;
    CK(cudaMalloc((void **)&dpc, bytes));
    CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    struct kern_cuda_evict kp = *ke;
    kp.phase_clock = dpc;
    reps = reps > 64 ? 64 : reps;
    for (int r = -1; r < reps; r++) {
        CK(cudaMemset(dpc, 0, bytes));
        CK(cudaDeviceSynchronize());
        cudaEventRecord(e0, 0);
        if (kern_cuda_decode_evict(&kp, djobs, L, S, NULL))
            exit(1);
        cudaEventRecord(e1, 0);
        CK(cudaEventSynchronize(e1));
        CK(cudaMemcpy(pc, dpc, bytes, cudaMemcpyDeviceToHost));
        if (r < 0)
            continue;
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        ev[r] = ms * 1e3;
        uint64_t t0 = UINT64_MAX, t1 = 0, first_end = UINT64_MAX;
        uint32_t m = 0, n_late = 0, top = 0;
        for (uint32_t b = 0; b < nb; b++) {
            const unsigned long long *c = pc + (size_t)b * C;
            if (!c[P]) /* the block did not run */
                continue;
            t0 = c[P + 1] < t0 ? c[P + 1] : t0, t1 = c[P + 2] > t1 ? c[P + 2] : t1;
            first_end = c[P + 2] < first_end ? c[P + 2] : first_end;
            if (c[P + 2] > c[P + 1])
                clk[m++] = (double)(c[P] - c[0]) / (double)(c[P + 2] - c[P + 1]) * 1e3;
        }
        for (uint32_t b = 0; b < nb; b++) { /* late starters; the most blocks at once on an SM */
            const unsigned long long *c = pc + (size_t)b * C;
            if (!c[P])
                continue;
            n_late += c[P + 1] >= first_end;
            uint32_t at = 1;
            for (uint32_t o = 0; o < nb; o++) {
                const unsigned long long *x = pc + (size_t)o * C;
                at += o != b && x[P] && x[P + 3] == c[P + 3] && x[P + 1] <= c[P + 1] && x[P + 2] > c[P + 1];
            }
            top = at > top ? at : top;
        }
        span[r] = t1 > t0 ? (t1 - t0) * 1e-3 : 0.0, late[r] = n_late, most[r] = top;
        mhz[r] = m ? dmedian(clk, (int)m) : 0.0;
    }
    printf("  where the one launch goes (%s, caked's pages; medians of %d): events %.1f us, blocks span %.1f us, "
           "%.0f of %u blocks started after another ended, at most %.0f blocks at once on an SM, SM clock %.0f MHz "
           "(nominal %d)\n", label, reps, dmedian(ev, reps), dmedian(span, reps), dmedian(late, reps), nb,
           dmedian(most, reps), dmedian(mhz, reps), khz / 1000);
    static const char *const name[P + 1] = {"pass 1", "pass 2 + pooling", "top-k and ordered walk",
                                            "compaction", "the block"};
    printf("    the last launch's median block at the nominal clock:");
    for (int ph = 0; ph <= P; ph++) {
        uint32_t m = 0;
        for (uint32_t b = 0; b < nb; b++) {
            const unsigned long long *c = pc + (size_t)b * C;
            if (c[P]) /* the block ran */
                col[m++] = ph < P ? c[ph + 1] - c[ph] : c[P] - c[0];
        }
        qsort(col, m, sizeof *col, cmp_u64);
        printf("%s %s %.1f us", ph ? "," : "", name[ph], m ? col[m / 2] / (khz * 1e-3) : 0.0);
    }
    printf("\n");
    evict_spread(pc, nb, ke->kv_heads, khz);
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    cudaFree(dpc);
    free(pc), free(col), free(clk);
}

/* A decode step's eviction of one token in each of 32 layers (1024 kept + 1 new before a
 * window of W, CAKE's ranking), three ways on the same random values: the per-layer kernels
 * caked ran before (ring gather, scoring passes, pooling, top-k, compaction: one stream, no
 * page uploads, so a lower bound on that path) and kern_cuda_decode_evict's one launch, each
 * layer one page; then the one launch over caked's layout (64 KiB pages of 16 tokens, in
 * reverse order; carrying the window rows' log-sum-exps from step to step, so one scoring
 * pass; then also filling the step's holes through each prefix's position order instead of
 * shifting every row after them; scattered over 10 GiB; beside another process's idle
 * context; after an idle GPU; in a VMM pool of cuMemCreate segments, caked's kind of
 * memory). Prints the GPU time (events)
 * and the wall time from the first launch to the end (the host's issue cost included),
 * medians of reps, and the floor: the 32 layers' key bytes read once at the measured copy
 * rate (as the scoring table's). The carried way relaunches on the same values, so its
 * log-sum-exps are not the cache's: its time is the one-pass launch's, not its answer. */
static void decode_evict(double bw, int reps)
{
    enum { L = 32, TPP = 16 };
    uint32_t S = 1025, n = S + W, k = 1024, np = (n + TPP - 1) / TPP;
    size_t half = (size_t)HKV * n * D * 2, layer = 2 * half, ring = (size_t)H * W * D * 2;
    size_t pb = 2 * (size_t)HKV * TPP * D * 2, player = np * pb; /* caked's 64 KiB pages */
    size_t span = (layer > player ? layer : player) + ring;
    uint8_t *base;
    CK(cudaMalloc((void **)&base, span * L));
    uint16_t *h = malloc(span);
    uint64_t seed = 0x853c49e6748fea9bull;
    for (size_t i = 0; i < span / 2; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        h[i] = kern_f32_to_bf16((float)((seed >> 40) * (2.0 / 16777216.0) - 1.0));
    }
    /* per layer: its page offsets (one page; then np pages), its ring's, the removed slots */
    uint64_t *ho = malloc(sizeof(uint64_t) * L * (2 + np + 1)), *doff;
    uint64_t *po = ho + 2 * L;
    for (int l = 0; l < L; l++) {
        ho[2 * l] = (uint64_t)l * span, ho[2 * l + 1] = ho[2 * l] + span - ring;
        for (uint32_t i = 0; i < np; i++)
            po[(size_t)l * (np + 1) + i] = ho[2 * l] + (uint64_t)(np - 1 - i) * pb;
        po[(size_t)l * (np + 1) + np] = ho[2 * l + 1];
    }
    CK(cudaMalloc((void **)&doff, sizeof(uint64_t) * L * (2 + np + 1)));
    CK(cudaMemcpy(doff, ho, sizeof(uint64_t) * L * (2 + np + 1), cudaMemcpyHostToDevice));
    uint64_t *dpo = doff + 2 * L;
    uint32_t *dev_ev;
    CK(cudaMalloc((void **)&dev_ev, sizeof(uint32_t) * L * HKV * (S - k)));
    /* jobs[2]: jobs[1] carrying the window rows' log-sum-exps (the first launch finds NaN and
     * runs both passes; every later one carries); jobs[3]: jobs[2] filling holes, each prefix's
     * order (identity at first) rewritten by every launch */
    struct kern_cuda_evict_job jobs[5][L], *djobs;
    float *dlse, *dnew, *hnew = malloc(sizeof(float) * L * H);
    uint32_t *dord, *hord = malloc(sizeof(uint32_t) * L * HKV * k);
    for (int i = 0; i < L * H; i++) /* what random rows give, ln(keys) + var(logit) / 2 */
        hnew[i] = logf((float)n) + 1.0f / 18.0f;
    CK(cudaMalloc((void **)&dnew, sizeof(float) * L * H));
    CK(cudaMemcpy(dnew, hnew, sizeof(float) * L * H, cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&dlse, sizeof(float) * L * H * W));
    CK(cudaMemset(dlse, 0xff, sizeof(float) * L * H * W));
    for (size_t i = 0; i < (size_t)L * HKV * k; i++)
        hord[i] = (uint32_t)(i % k);
    CK(cudaMalloc((void **)&dord, sizeof(uint32_t) * L * HKV * k));
    CK(cudaMemcpy(dord, hord, sizeof(uint32_t) * L * HKV * k, cudaMemcpyHostToDevice));
    for (int l = 0; l < L; l++) {
        jobs[0][l] = (struct kern_cuda_evict_job){.page_off = doff + 2 * l, .ring_off = doff + 2 * l + 1,
                                                 .n_tokens = n, .k = k, .evicted = dev_ev + l * HKV * (S - k)};
        jobs[1][l] = (struct kern_cuda_evict_job){.page_off = dpo + (size_t)l * (np + 1),
                                                 .ring_off = dpo + (size_t)l * (np + 1) + np, .n_tokens = n,
                                                 .k = k, .evicted = dev_ev + l * HKV * (S - k)};
        jobs[2][l] = jobs[1][l], jobs[2][l].lse = dlse + (size_t)l * H * W, jobs[2][l].carry = 1;
        jobs[3][l] = jobs[2][l], jobs[3][l].order = dord + (size_t)l * HKV * k;
        jobs[3][l].order_n = k, jobs[3][l].order_cap = k;
        jobs[4][l] = jobs[3][l], jobs[4][l].lse_new = dnew + (size_t)l * H;
    }
    CK(cudaMalloc((void **)&djobs, sizeof jobs));
    CK(cudaMemcpy(djobs, jobs, sizeof jobs, cudaMemcpyHostToDevice));
    struct kern_cuda_evict ke[2] = {{
        .dtype = KERN_BF16, .q_heads = H, .kv_heads = HKV, .head_dim = D, .tokens_per_page = n,
        .w = W, .base = base, .v_offset_bytes = half, .ring_rows_per_page = H * W,
        .ring_heads_per_page = H, .ring_pages_per_head = 1, .first = 0, .n_q = W, .gamma = 200.0f,
        .pool = KERN_POOL_AVG, .radius = 2,
    }};
    ke[1] = ke[0], ke[1].tokens_per_page = TPP, ke[1].v_offset_bytes = pb / 2;
    /* caked's pool: the same 64 KiB pages scattered in random order over 10 GiB (the layers'
     * pages and rings wherever a page was free) */
    size_t big = (size_t)10 << 30, slots = big / pb, rs = (ring + pb - 1) / pb;
    uint8_t *pool = NULL;
    uint64_t *so = malloc(sizeof(uint64_t) * L * (np + 1)), *dso = NULL;
    struct kern_cuda_evict_job sjobs[L], *dsjobs = NULL;
    if (cudaMalloc((void **)&pool, big) != cudaSuccess) {
        cudaGetLastError();
        pool = NULL;
    }
    if (pool) {
        uint8_t *used = calloc(slots, 1);
        for (int l = 0; l < L; l++)
            for (uint32_t i = 0; i <= np; i++) { /* np pages, then the ring's rs pages */
                size_t at;
                do {
                    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
                    at = (size_t)(seed % (slots - rs));
                } while (used[at] || (i == np && memchr(used + at, 1, rs)));
                memset(used + at, 1, i == np ? rs : 1);
                so[(size_t)l * (np + 1) + i] = (uint64_t)at * pb;
                /* the same bytes the contiguous layout has at this page */
                CK(cudaMemcpy(pool + at * pb, (const uint8_t *)h + (i == np ? span - ring : (size_t)(np - 1 - i) * pb),
                              i == np ? ring : pb, cudaMemcpyHostToDevice));
            }
        free(used);
        CK(cudaMalloc((void **)&dso, sizeof(uint64_t) * L * (np + 1)));
        CK(cudaMemcpy(dso, so, sizeof(uint64_t) * L * (np + 1), cudaMemcpyHostToDevice));
        for (int l = 0; l < L; l++)
            sjobs[l] = (struct kern_cuda_evict_job){.page_off = dso + (size_t)l * (np + 1),
                                                    .ring_off = dso + (size_t)l * (np + 1) + np, .n_tokens = n,
                                                    .k = k, .evicted = dev_ev + l * HKV * (S - k)};
        CK(cudaMalloc((void **)&dsjobs, sizeof sjobs));
        CK(cudaMemcpy(dsjobs, sjobs, sizeof sjobs, cudaMemcpyHostToDevice));
    }
    struct kern_cuda_evict kes = ke[1];
    kes.base = pool;
    /* the per-layer path's buffers */
    void *q, *ws, *tws, *tmp;
    float *ind;
    uint32_t *idx;
    size_t wsb = kern_cuda_score_pool_workspace(HKV, H, W, n, S, KERN_POOL_AVG);
    size_t twsb = kern_cuda_topk_workspace(HKV, S);
    CK(cudaMalloc(&q, ring));
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMalloc(&tws, twsb));
    CK(cudaMalloc(&tmp, 2 * (size_t)HKV * (k + W) * D * 2));
    CK(cudaMalloc((void **)&ind, sizeof(float) * HKV * S));
    CK(cudaMalloc((void **)&idx, sizeof(uint32_t) * HKV * k));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float tg[10][64];
    double tw[10][64];
    pid_t hold = -1;
    for (int l = 0; l < L; l++) /* the values the ways start from */
        CK(cudaMemcpy(base + l * span, h, span, cudaMemcpyHostToDevice));
    evict_phases("first", &ke[1], djobs + L, L, S, reps);
    static const int ways[10] = {0, 1, 2, 7, 8, 9, 3, 4, 5, 6};
    for (int wi = 0; wi < 10; wi++) {
        /* way 7: way 2 carrying the rows' log-sum-exps, way 8 filling holes too, way 9 given
         * the newest row's as well (no pass over the keys for it); ways 3-5: 64 KiB pages scattered over
         * 10 GiB; then 64 KiB pages with another process's CUDA context open and idle on the
         * GPU (an engine waiting for caked's reply), contiguous and scattered */
        int way = ways[wi];
        if (way >= 3 && way < 7 && !pool)
            break;
        if (way >= 8) /* way 7's launches left log-sum-exps the fill's first one carries */
            CK(cudaMemset(dlse, 0xff, sizeof(float) * L * H * W));
        if (way == 4 && (hold = fork()) == 0) { /* exec at once: nothing of this CUDA state */
            char me[4096];
            ssize_t ml = readlink("/proc/self/exe", me, sizeof me - 1);
            if (ml > 0) {
                me[ml] = 0;
                execl(me, me, "--hold-context", "30", (char *)NULL);
            }
            _exit(127);
        }
        if (way == 4)
            sleep(3); /* its context made */
        for (int l = 0; l < L && (way < 3 || way >= 7); l++) /* the same values each way */
            CK(cudaMemcpy(base + l * span, h, span, cudaMemcpyHostToDevice));
        for (int r = -3; r < reps; r++) {
            if (way == 6) /* the GPU idle between launches, as between a caked's steps */
                usleep(1000);
            double t0 = util_now_s();
            cudaEventRecord(e0, 0);
            if (way == 0) {
                for (int l = 0; l < L; l++) {
                    struct kern_cuda_kv kv = {KERN_BF16, HKV, D, n, n, base, doff + 2 * l, half};
                    if (kern_cuda_ring_gather(q, base, doff + 2 * l + 1, H, W, D * 2, H * W, H, 1, 0, W, NULL) ||
                        kern_cuda_score_layer_pool(&kv, q, NULL, H, W, S, 200.0f, 0, KERN_POOL_AVG, 2, ind, NULL,
                                                   NULL, ws, wsb, NULL) ||
                        kern_cuda_topk_ws(ind, HKV, S, k, idx, tws, twsb, NULL) ||
                        kern_cuda_compact(&kv, idx, k, S, W, tmp, NULL))
                        exit(1);
                }
            } else if (way == 1 || way == 2 || way == 4 || way == 6 || way >= 7) {
                if (kern_cuda_decode_evict(&ke[way == 1 ? 0 : 1], djobs + (way == 1 ? 0 : way >= 7 ? (size_t)(way - 5) * L : L), L, S, NULL))
                    exit(1);
            } else if (kern_cuda_decode_evict(&kes, dsjobs, L, S, NULL)) {
                exit(1);
            }
            cudaEventRecord(e1, 0);
            CK(cudaEventSynchronize(e1));
            if (r >= 0) {
                tw[way][r] = (util_now_s() - t0) * 1e6;
                cudaEventElapsedTime(&tg[way][r], e0, e1);
            }
        }
    }
    if (hold > 0) {
        kill(hold, SIGTERM);
        waitpid(hold, NULL, 0);
    }
    float g[10];
    double w[10];
    for (int i = 0; i < 10; i++)
        if (i < 3 || i >= 7 || pool)
            g[i] = median(tg[i], reps) * 1e3f, w[i] = dmedian(tw[i], reps);
    double floor_us = (double)L * HKV * n * D * 2 / bw * 1e6; /* the layers' keys read once */
    printf("decode eviction, 32 layers (%u kept of %u, window %d, CAKE's ranking; floor %.1f us = "
           "the keys read once):\n", k, S, W, floor_us);
    printf("  per-layer kernels (~10 launches a layer, one stream): GPU %8.1f us, wall %8.1f us\n", g[0], w[0]);
    printf("  one launch (kern_cuda_decode_evict):                 GPU %8.1f us, wall %8.1f us   "
           "(%.1fx, %.1fx; %.1fx the floor)\n", g[1], w[1], g[0] / g[1], w[0] / w[1], g[1] / floor_us);
    printf("  one launch, caked's 64 KiB pages of %d tokens:       GPU %8.1f us, wall %8.1f us\n", TPP,
           g[2], w[2]);
    printf("  the same carrying the rows' log-sum-exps (one pass): GPU %8.1f us, wall %8.1f us   "
           "(%.2fx; %.1fx the floor)\n", g[7], w[7], g[2] / g[7], g[7] / floor_us);
    printf("  the same filling its holes (a prefix order):          GPU %8.1f us, wall %8.1f us   "
           "(%.2fx; %.1fx the floor)\n", g[8], w[8], g[7] / g[8], g[8] / floor_us);
    printf("  the same given the newest row's (no pass for it):    GPU %8.1f us, wall %8.1f us   "
           "(%.2fx; %.1fx the floor)\n", g[9], w[9], g[8] / g[9], g[9] / floor_us);
    if (pool) {
        printf("  the same pages scattered over 10 GiB:                GPU %8.1f us, wall %8.1f us\n",
               g[3], w[3]);
        printf("  with another process's idle CUDA context: contiguous GPU %8.1f us, scattered %8.1f us\n",
               g[4], g[5]);
        printf("  launched after 1 ms of an idle GPU (caked's steps):  GPU %8.1f us, wall %8.1f us\n",
               g[6], w[6]);
    } else {
        printf("  the same pages scattered over 10 GiB: no room for 10 GiB\n");
    }
    if (pool) { /* caked's kind of memory: the scattered pages' bytes at the same offsets of a
                   VMM pool (cuMemCreate segments mapped into one reserved range, gpupool.h,
                   segments as caked cuts a pool of this size: at most 1024) */
        struct gpupool vp = {0};
        const char *why = "";
        uint64_t gran = 2u << 20, seg;
        int ok = !gpupool_granularity(NULL, &gran, &why);
        seg = (big / 1024 + gran - 1) / gran * gran;
        ok = ok && !gpupool_create(&vp, big, seg, NULL, &why);
        for (uint32_t i = 0; ok && i < vp.n_segs; i++)
            ok = !gpupool_seg_fresh(&vp, i, &why);
        if (ok) {
            for (int l = 0; l < L; l++)
                for (uint32_t i = 0; i <= np; i++) {
                    size_t at = so[(size_t)l * (np + 1) + i];
                    CK(cudaMemcpy((uint8_t *)(uintptr_t)vp.va + at, pool + at, i == np ? ring : pb,
                                  cudaMemcpyDeviceToDevice));
                }
            struct kern_cuda_evict kv = kes;
            kv.base = (uint8_t *)(uintptr_t)vp.va;
            float tv[64];
            for (int r = -3; r < reps; r++) {
                cudaEventRecord(e0, 0);
                if (kern_cuda_decode_evict(&kv, dsjobs, L, S, NULL))
                    exit(1);
                cudaEventRecord(e1, 0);
                CK(cudaEventSynchronize(e1));
                if (r >= 0)
                    cudaEventElapsedTime(&tv[r], e0, e1);
            }
            printf("  the scattered pages in a VMM pool like caked's (%llu MiB segments): GPU %8.1f us\n",
                   (unsigned long long)(seg >> 20), median(tv, reps) * 1e3);
        } else {
            printf("  the scattered pages in a VMM pool like caked's: %s\n", why);
        }
        if (vp.va)
            gpupool_destroy(&vp);
    }
    evict_phases("last", &ke[1], djobs + L, L, S, reps);
    evict_phases("carrying the log-sum-exps", &ke[1], djobs + 2 * L, L, S, reps);
    evict_phases("filling holes", &ke[1], djobs + 3 * L, L, S, reps);
    evict_phases("given the newest row's", &ke[1], djobs + 4 * L, L, S, reps);
    cudaFree(pool), cudaFree(dso), cudaFree(dsjobs), cudaFree(dlse), cudaFree(dord), cudaFree(dnew);
    free(hord), free(hnew);
    free(so);
    cudaFree(base), cudaFree(doff), cudaFree(dev_ev), cudaFree(djobs), cudaFree(q), cudaFree(ws);
    cudaFree(tws), cudaFree(tmp), cudaFree(ind), cudaFree(idx);
    free(h), free(ho);
}

/* A cascading stage's compactions (what caked does after each prefill layer's scoring): nl
 * layers of caked's 64 KiB pages, each keeping k of its first `old` slots by its indicator
 * (the first layer `old0` of them, where old0 is not 0: a prompt's newest, full-length
 * layer), the window of W after them; with `fill`, holes filled as caked's stages do. Wall
 * time from the first launch to the wait's end, the data restored before each run, of: the
 * per-layer path caked took before (top-k over many blocks, the compaction, the indicator's
 * gather and copy, the kept slots back: ~15 launches a layer on 8 streams; not with fill,
 * which it does not do), kern_cuda_compact_many (three launches), and the same with the long
 * rows' top-k taken first (kern_cuda_compact_split). Floor: the kept rows and windows read
 * and written once at the copy rate (what a stage without fill moves; one with fill moves
 * fewer). */
static void cascade_stage(double bw, int reps, uint32_t nl, uint32_t old0, uint32_t old, uint32_t k, int fill)
{
    enum { TPP = 16, NS = 8 };
    uint32_t mx = old0 > old ? old0 : old, n = mx + W, np = (n + TPP - 1) / TPP;
    size_t pb = 2 * (size_t)HKV * TPP * D * 2, lb = np * pb, ib = sizeof(float) * HKV * mx;
    size_t kb = sizeof(uint32_t) * HKV * k, tb = kern_cuda_compact_many_tmp(HKV, D, k, W, 0);
    size_t twsb = kern_cuda_topk_workspace(HKV, mx), sb = (tb + kb + twsb + 255) & ~(size_t)255;
    uint8_t *base, *orig, *scratch;
    float *ind, *iorig;
    CK(cudaMalloc((void **)&base, lb * nl));
    CK(cudaMalloc((void **)&orig, lb * nl));
    CK(cudaMalloc((void **)&ind, ib * nl));
    CK(cudaMalloc((void **)&iorig, ib * nl));
    CK(cudaMalloc((void **)&scratch, sb * nl)); /* a layer's: rows, kept slots, top-k's */
    uint16_t *h = malloc(lb);
    float *hi = malloc(ib);
    uint64_t seed = 0x9e3779b97f4a7c15ull, *off = malloc(sizeof(uint64_t) * np * nl), *doff;
    for (uint32_t l = 0; l < nl; l++) {
        for (size_t i = 0; i < lb / 2; i++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            h[i] = kern_f32_to_bf16((float)((seed >> 40) * (2.0 / 16777216.0) - 1.0));
        }
        for (size_t i = 0; i < (size_t)HKV * mx; i++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            hi[i] = (float)((seed >> 40) * (1.0 / 16777216.0));
        }
        CK(cudaMemcpy(orig + l * lb, h, lb, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(iorig + (size_t)l * HKV * mx, hi, ib, cudaMemcpyHostToDevice));
        for (uint32_t i = 0; i < np; i++) /* the layer's pages in reverse order */
            off[(size_t)l * np + i] = l * lb + (uint64_t)(np - 1 - i) * pb;
    }
    CK(cudaMalloc((void **)&doff, sizeof(uint64_t) * np * nl));
    CK(cudaMemcpy(doff, off, sizeof(uint64_t) * np * nl, cudaMemcpyHostToDevice));
    struct kern_cuda_compact_job *jobs = malloc(sizeof(*jobs) * nl), *djobs;
    for (uint32_t l = 0; l < nl; l++) {
        uint8_t *sc = scratch + (size_t)l * sb;
        jobs[l] = (struct kern_cuda_compact_job){
            .page_off = doff + (size_t)l * np, .ind = ind + (size_t)l * HKV * mx,
            .keep = (uint32_t *)(sc + tb), .tmp = sc, .old = l == 0 && old0 ? old0 : old, .k = k,
            .win = W, .fill = fill};
    }
    CK(cudaMalloc((void **)&djobs, sizeof(*jobs) * 2 * nl));
    CK(cudaMemcpy(djobs, jobs, sizeof(*jobs) * nl, cudaMemcpyHostToDevice));
    /* the third way's jobs: as kern_cuda_compact_split marks them (the same each run: it is
     * called again in each, for its launches, on a copy) */
    struct kern_cuda_compact_job *split = malloc(sizeof(*jobs) * nl);
    memcpy(split, jobs, sizeof(*jobs) * nl);
    int n_split = kern_cuda_compact_split(split, nl, HKV, NULL);
    CK(cudaDeviceSynchronize());
    if (n_split < 0)
        exit(1);
    CK(cudaMemcpy(djobs + nl, split, sizeof(*jobs) * nl, cudaMemcpyHostToDevice));
    uint32_t *hkeep;
    CK(cudaMallocHost((void **)&hkeep, kb * nl));
    cudaStream_t st[NS];
    for (int i = 0; i < NS; i++)
        CK(cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking));
    struct kern_cuda_layout lay = {KERN_BF16, HKV, D, TPP, base, pb / 2};
    double tw[3][64];
    for (int way = fill ? 1 : 0; way < 3; way++)
        for (int r = -2; r < reps; r++) {
            CK(cudaMemcpy(base, orig, lb * nl, cudaMemcpyDeviceToDevice));
            CK(cudaMemcpy(ind, iorig, ib * nl, cudaMemcpyDeviceToDevice));
            CK(cudaDeviceSynchronize());
            double t0 = util_now_s();
            if (way == 0) {
                for (uint32_t l = 0; l < nl; l++) {
                    cudaStream_t s = st[l % NS];
                    uint32_t o = jobs[l].old;
                    struct kern_cuda_kv kv = {KERN_BF16, HKV, D, TPP, o + W, base, doff + (size_t)l * np, pb / 2};
                    uint8_t *sc = (uint8_t *)jobs[l].tmp; /* compaction's rows, then the gather */
                    if (kern_cuda_topk_ws(jobs[l].ind, HKV, o, k, jobs[l].keep, sc + tb + kb, twsb, s) ||
                        kern_cuda_compact(&kv, jobs[l].keep, k, o, W, sc, s) ||
                        kern_cuda_gather_rows_f32(jobs[l].ind, HKV, o, jobs[l].keep, k, (float *)sc, s) ||
                        cudaMemcpyAsync(jobs[l].ind, sc, sizeof(float) * HKV * k, cudaMemcpyDeviceToDevice, s) ||
                        cudaMemcpyAsync(hkeep + (size_t)l * HKV * k, jobs[l].keep, kb, cudaMemcpyDeviceToHost, s))
                        exit(1);
                }
                for (int i = 0; i < NS; i++)
                    CK(cudaStreamSynchronize(st[i]));
            } else {
                if (way == 2) {
                    memcpy(split, jobs, sizeof(*jobs) * nl);
                    if (kern_cuda_compact_split(split, nl, HKV, st[0]) < 0)
                        exit(1);
                }
                if (kern_cuda_compact_many(&lay, djobs + (way == 2 ? nl : 0), nl, k + W, st[0]))
                    exit(1);
                for (uint32_t l = 0; l < nl; l++)
                    CK(cudaMemcpyAsync(hkeep + (size_t)l * HKV * k, jobs[l].keep, kb, cudaMemcpyDeviceToHost, st[0]));
                CK(cudaStreamSynchronize(st[0]));
            }
            if (r >= 0)
                tw[way][r] = (util_now_s() - t0) * 1e6;
        }
    double a = fill ? 0 : dmedian(tw[0], reps), b = dmedian(tw[1], reps), c = dmedian(tw[2], reps);
    double floor_us = 2.0 * nl * HKV * (k + W) * 2 * D * 2 / bw * 1e6; /* K and V rows, read + written */
    char first[48] = "";
    if (old0)
        snprintf(first, sizeof first, "the first from %u, the others ", old0);
    printf("cascading stage, %u layers, %sfrom %u to %u kept (window %d, 64 KiB pages%s; floor %.1f us = "
           "the rows kept, read and written once):\n", nl, first, old, k, W, fill ? ", filling holes" : "",
           floor_us);
    if (!fill)
        printf("  per layer (~15 launches a layer, 8 streams):  wall %8.1f us\n", a);
    if (fill)
        printf("  one pass (kern_cuda_compact_many):            wall %8.1f us   (%.1fx the floor)\n", b,
               b / floor_us);
    else
        printf("  one pass (kern_cuda_compact_many):            wall %8.1f us   (%.1fx; %.1fx the floor)\n",
               b, a / b, b / floor_us);
    printf("  the same, long rows' top-k first (%u of %u layers over clusters, kern_cuda_compact_split):"
           " wall %8.1f us   (%.2fx the one pass; %.1fx the floor)\n", (unsigned)n_split, nl, c, b / c,
           c / floor_us);
    for (int i = 0; i < NS; i++)
        cudaStreamDestroy(st[i]);
    cudaFreeHost(hkeep);
    cudaFree(base), cudaFree(orig), cudaFree(ind), cudaFree(iorig), cudaFree(scratch), cudaFree(doff);
    cudaFree(djobs);
    free(h), free(hi), free(off), free(jobs), free(split);
}

/* ---- through caked ------------------------------------------------------------------ */

static char cdir[64], csock[128];

static double caked_start_ms; /* start_caked's: from fork to the socket answering */

static pid_t start_caked(const char *gpu_pool)
{
    snprintf(cdir, sizeof cdir, "/tmp/bench-gpu-XXXXXX");
    if (!mkdtemp(cdir))
        return -1;
    snprintf(csock, sizeof csock, "%s/caked.sock", cdir);
    pid_t p = fork();
    if (p == 0) { /* exec at once: nothing of this process's CUDA state is used */
        const char *log = getenv("BENCH_CAKED_LOG"); /* caked's stderr (e.g. CAKED_TRACE) */
        if (!freopen(log ? log : "/dev/null", "w", stderr))
            _exit(127);
        execl(CAKED_BIN, CAKED_BIN, "--socket", csock, "--host-pool", "2G", "--gpu-pool", gpu_pool,
              NULL);
        _exit(127);
    }
    double t0 = util_now_s();
    for (int i = 0; i < 2000; i++) {
        cake_ctx *c;
        cake_create(&c);
        int rc = cake_connect(c, csock, 0);
        cake_destroy(c);
        if (!rc) {
            caked_start_ms = (util_now_s() - t0) * 1e3;
            return p;
        }
        usleep(5000);
    }
    kill(p, SIGKILL);
    return -1;
}

static void stop_caked(pid_t p)
{
    kill(p, SIGTERM);
    waitpid(p, NULL, 0);
    rmdir(cdir);
}

/* --decode-lse: the caked section's engine also puts each decode token's log-sum-exps
 * (cake_put_decode_lse; the values random rows give), so caked's steps skip that pass */
static int decode_lse;

static int caked_section(uint32_t n, int reps, uint16_t *rnd, size_t rnd_bytes)
{
    const uint32_t L = 32, steps = 32;
    pid_t pid = start_caked("10G");
    if (pid < 0) {
        printf("through caked: could not start %s with a GPU pool\n", CAKED_BIN);
        return 1;
    }
    double at[16];
    int na = reps < 16 ? reps : 16;
    cake_ctx *c = NULL;
    for (int r = 0; r < na; r++) { /* attach: the last context stays connected */
        if (c)
            cake_destroy(c);
        cake_create(&c);
        double t0 = util_now_s();
        int rc = cake_connect(c, csock, 1);
        at[r] = (util_now_s() - t0) * 1e3;
        if (rc || !cake_gpu_pool_base_at(c, 0)) {
            printf("through caked: attach failed: %s\n", cake_errstr(c));
            stop_caked(pid);
            return 1;
        }
    }
    printf("through caked (%s, GPU pool %.0f GiB on %s; answering %.0f ms after it was started):\n",
           CAKED_BIN, cake_gpu_pool_bytes_at(c, 0) / 1073741824.0, cake_gpu_uuid_at(c, 0), caked_start_ms);
    printf("  attach (connect + GPU pool range reservation; segments map as they are used): %.2f ms median of %d\n",
           dmedian(at, na), na);
    /* host <-> GPU between a host sequence's pages and a GPU sequence's (each tenant maps
     * only its own segments, which fresh pools hand out in order: the layers' pages are
     * contiguous, checked below) */
    size_t bb = 256u << 20;
    struct cake_layout hl = {.layers = 1, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                             .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_layout gl = {.layers = 1, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                             .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    struct cake_policy fp;
    cake_policy_default(&fp);
    fp.kind = CAKE_POLICY_FULL;
    cake_seq *hs = NULL, *gs = NULL;
    uint32_t big = 131072; /* 512 MiB of K/V per layer: 256 MiB aligned inside it */
    fp.kind = CAKE_POLICY_FULL;
    int crc = cake_seq_open(c, &hl, &fp, big, 1, &hs);
    if (!crc)
        crc = cake_prefill_reserve(hs, 0);
    cake_policy_default(&fp); /* GPU sequences run CAKE */
    if (!crc)
        crc = cake_seq_open(c, &gl, &fp, big, 1, &gs);
    if (!crc)
        crc = cake_prefill_reserve(gs, 0);
    uint32_t hn = 0, gn = 0;
    const uint64_t *hpg = crc ? NULL : cake_layer_pages(hs, 0, &hn);
    const uint64_t *gpg = crc ? NULL : cake_layer_pages(gs, 0, &gn);
    const size_t ck = 4u << 20; /* copies of 4 MiB at 4 MiB boundaries: see below */
    uint64_t hoff = crc ? 0 : (hpg[0] + ck - 1) / ck * ck, goff = crc ? 0 : (gpg[0] + ck - 1) / ck * ck;
    if (crc || !hn || !gn || !cake_pool_mapped(c, (uint8_t *)cake_pool_base(c) + hoff, bb) ||
        !cake_gpu_pool_mapped(c, 0, goff, bb)) {
        printf("through caked: no 256 MiB run for the copies: %s\n", crc ? cake_errstr(c) : "");
        stop_caked(pid);
        return 1;
    }
    uint8_t *hp = (uint8_t *)cake_pool_base(c) + hoff, *gp = (uint8_t *)(uintptr_t)cake_gpu_pool_base_at(c, 0) + goff;
    /* one copy per 4 MiB (segments are multiples of it, and each host segment is registered
     * with CUDA on its own: a copy must not span two) */
    double h2d[8], d2h[8];
    for (int r = -1; r < 8; r++) {
        double t0 = util_now_s();
        for (size_t x = 0; x < bb; x += ck)
            CK(cudaMemcpyAsync(gp + x, hp + x, ck, cudaMemcpyHostToDevice, 0));
        CK(cudaStreamSynchronize(0));
        double t1 = util_now_s();
        for (size_t x = 0; x < bb; x += ck)
            CK(cudaMemcpyAsync(hp + x, gp + x, ck, cudaMemcpyDeviceToHost, 0));
        CK(cudaStreamSynchronize(0));
        double t2 = util_now_s();
        if (r >= 0)
            h2d[r] = bb / (t1 - t0) / 1e9, d2h[r] = bb / (t2 - t1) / 1e9;
    }
    printf("  registered host pool <-> GPU pool, 256 MiB copies: H2D %.1f GB/s, D2H %.1f GB/s\n",
           dmedian(h2d, 8), dmedian(d2h, 8));
    cake_seq_close(hs), cake_seq_close(gs);

    /* a GPU sequence at Llama-3.1-8B shapes */
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    struct cake_policy pol;
    cake_policy_default(&pol); /* fixed mode, cache 1024, window 32 */
    cake_seq *s;
    int rc = cake_seq_open(c, &lay, &pol, n, steps + 16, &s); /* 8 more steps below */
    if (rc) {
        printf("through caked: open: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        stop_caked(pid);
        return 1;
    }
    uint32_t tpp = cake_seq_tokens_per_page(s);
    size_t page_kv = (size_t)tpp * HKV * D * 2 * 2; /* K block then V block */
    uint8_t *base = (uint8_t *)(uintptr_t)cake_gpu_pool_base_at(c, 0);
    void *qsrc;
    CK(cudaMalloc(&qsrc, (size_t)H * W * D * 2));
    CK(cudaMemcpy(qsrc, rnd, (size_t)H * W * D * 2, cudaMemcpyHostToDevice));
    uint8_t *src; /* random K/V to copy into the pages */
    CK(cudaMalloc((void **)&src, rnd_bytes));
    CK(cudaMemcpy(src, rnd, rnd_bytes, cudaMemcpyHostToDevice));
    double obs[64], js0[3] = {0}, jn0[3] = {0}, js1[3] = {0}, jn1[3] = {0};
    int jobs_ok = 0; /* caked's account from layer 1 on (layer 0 sets caked's buffers up) */
    for (uint32_t l = 0; l < L; l++) {
        if (l == 1)
            jobs_ok = !util_work_seconds(CACHECTL_BIN, csock, "prefill", js0, jn0);
        if ((rc = cake_prefill_reserve(s, l)))
            break;
        uint32_t np;
        const uint64_t *pg = cake_layer_pages(s, l, &np);
        for (uint32_t i = 0; i < np; i++)
            CK(cudaMemcpyAsync(base + pg[i], src + (i * page_kv) % (rnd_bytes - page_kv), page_kv,
                               cudaMemcpyDeviceToDevice, 0));
        if ((rc = cake_put_queries(s, l, qsrc, W, NULL)))
            break;
        CK(cudaStreamSynchronize(0)); /* the ordering contract: writes complete, then call */
        double t0 = util_now_s();
        rc = cake_prefill_observe(s, l, NULL);
        obs[l] = (util_now_s() - t0) * 1e6;
        if (rc)
            break;
    }
    if (rc) {
        printf("through caked: prefill: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        stop_caked(pid);
        return 1;
    }
    double obs_sorted[64];
    memcpy(obs_sorted, obs, sizeof(double) * L);
    printf("  GPU sequence, %u layers x %u tokens: prefill observe round trip per layer %.1f us median "
           "(layer 0 %.1f us, layer %u %.1f us)\n", L, n, dmedian(obs_sorted, (int)L), obs[0], L - 1,
           obs[L - 1]);
    if (jobs_ok && !util_work_seconds(CACHECTL_BIN, csock, "prefill", js1, jn1) && jn1[1] > jn0[1])
        printf("    caked's account of those observes' jobs (caked_work_seconds, mean of the %.0f after layer 0): waiting "
               "for a worker %.1f us, run %.1f us, back to the loop %.1f us\n", jn1[1] - jn0[1],
               (js1[0] - js0[0]) / (jn1[0] - jn0[0]) * 1e6, (js1[1] - js0[1]) / (jn1[1] - jn0[1]) * 1e6,
               (js1[2] - js0[2]) / (jn1[2] - jn0[2]) * 1e6);
    { /* the same prompt again, each layer with the engine's log-sum-exps (cake_put_lse, from
         the device): one pass over the keys; the values random rows give, ln(keys seen) +
         var(logit) / 2 (they do not change the time) */
        cake_seq *s2 = NULL;
        float *lh = malloc(sizeof(float) * H * W), *dl;
        for (uint32_t r = 0; r < (uint32_t)(H * W); r++)
            lh[r] = logf((float)(n - W + r % W + 1)) + 1.0f / 18.0f;
        CK(cudaMalloc((void **)&dl, sizeof(float) * H * W));
        CK(cudaMemcpy(dl, lh, sizeof(float) * H * W, cudaMemcpyHostToDevice));
        free(lh);
        rc = cake_seq_open(c, &lay, &pol, n, steps + 1, &s2);
        for (uint32_t l = 0; l < L && !rc; l++) {
            if ((rc = cake_prefill_reserve(s2, l)))
                break;
            uint32_t np;
            const uint64_t *pg = cake_layer_pages(s2, l, &np);
            for (uint32_t i = 0; i < np; i++)
                CK(cudaMemcpyAsync(base + pg[i], src + (i * page_kv) % (rnd_bytes - page_kv),
                                   page_kv, cudaMemcpyDeviceToDevice, 0));
            if ((rc = cake_put_queries(s2, l, qsrc, W, NULL)) || (rc = cake_put_lse(s2, l, dl, W, NULL)))
                break;
            CK(cudaStreamSynchronize(0));
            double t0 = util_now_s();
            rc = cake_prefill_observe(s2, l, NULL);
            obs[l] = (util_now_s() - t0) * 1e6;
        }
        if (rc)
            printf("  with log-sum-exps: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        else
            printf("  the same with the engine's log-sum-exps (cake_put_lse): %.1f us median per layer\n",
                   dmedian(obs, (int)L));
        if (s2)
            cake_seq_close(s2);
        cudaFree(dl);
        rc = 0;
    }
    double dec[64];
    cake_seq *one[1] = {s};
    float hnl[256], *dnl; /* the decode token's log-sum-exps (--decode-lse): random rows' */
    for (int h = 0; h < H && h < 256; h++)
        hnl[h] = logf((float)(1024 + W + 1)) + 1.0f / 18.0f;
    CK(cudaMalloc((void **)&dnl, sizeof(float) * H));
    CK(cudaMemcpy(dnl, hnl, sizeof(float) * H, cudaMemcpyHostToDevice));
    uint32_t t_before = cake_layer_tokens(s, 0);
    jobs_ok = 0; /* from the second step on, as the median */
    for (uint32_t st = 0; st < steps; st++) {
        if (st == 1)
            jobs_ok = !util_work_seconds(CACHECTL_BIN, csock, "decode", js0, jn0);
        /* the new token's K/V and query (stream-ordered, then synchronized) */
        double t0 = util_now_s();
        rc = cake_decode_step(c, one, 1);
        dec[st] = (util_now_s() - t0) * 1e6;
        if (rc)
            break;
        for (uint32_t l = 0; l < L; l++) {
            uint32_t slot = cake_layer_tokens(s, l) - 1;
            for (uint32_t g = 0; g < HKV; g++) {
                CK(cudaMemcpyAsync(cake_key(s, l, g, slot), src + g * 256, D * 2, cudaMemcpyDeviceToDevice, 0));
                CK(cudaMemcpyAsync(cake_value(s, l, g, slot), src + g * 512, D * 2, cudaMemcpyDeviceToDevice, 0));
            }
            if ((rc = cake_put_decode_query(s, l, qsrc, NULL)) ||
                (decode_lse && (rc = cake_put_decode_lse(s, l, dnl, NULL))))
                break;
        }
        CK(cudaStreamSynchronize(0));
        if (rc)
            break;
    }
    if (rc) {
        printf("through caked: decode: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        stop_caked(pid);
        return 1;
    }
    printf("  decode step with every layer evicting on the GPU (%u -> %u tokens in layer 0%s): %.1f us "
           "median of %u\n", t_before, cake_layer_tokens(s, 0), decode_lse ? "; the engine's log-sum-exps" : "",
           dmedian(dec + 1, (int)steps - 1), steps - 1);
    if (jobs_ok && !util_work_seconds(CACHECTL_BIN, csock, "decode", js1, jn1) && jn1[1] > jn0[1])
        printf("    caked's account of those steps' jobs (caked_work_seconds, mean of the %.0f after the first): waiting for "
               "a worker %.1f us, run %.1f us, back to the loop %.1f us\n", jn1[1] - jn0[1],
               (js1[0] - js0[0]) / (jn1[0] - jn0[0]) * 1e6, (js1[1] - js0[1]) / (jn1[1] - jn0[1]) * 1e6,
               (js1[2] - js0[2]) / (jn1[2] - jn0[2]) * 1e6);
    { /* what surrounds the step: the same steps with nothing done on the GPU by this process
         between them (no K/V written, no query put: whether another context's work just
         before the launch slows caked's kernel), and the socket's own round trip */
        double idle[8], png[31];
        for (int st = 0; st < 8 && !rc; st++) {
            for (uint32_t l = 0; decode_lse && l < L && !rc; l++) /* from host memory */
                rc = cake_put_decode_lse(s, l, hnl, NULL);
            double t0 = util_now_s();
            rc = rc ? rc : cake_decode_step(c, one, 1);
            idle[st] = (util_now_s() - t0) * 1e6;
        }
        for (int i = 0; i < 31 && !rc; i++) {
            double t0 = util_now_s();
            rc = cake_ping(c);
            png[i] = (util_now_s() - t0) * 1e6;
        }
        if (rc)
            printf("  steps with the GPU idle / ping: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        else
            printf("  the same steps with this process idle on the GPU between them: %.1f us median of "
                   "8; cake_ping round trip %.1f us median of 31\n", dmedian(idle, 8), dmedian(png, 31));
        rc = 0;
    }
    void *qa;
    float *out;
    CK(cudaMalloc(&qa, (size_t)L * H * D * 2));
    CK(cudaMalloc((void **)&out, sizeof(float) * L * H * D));
    CK(cudaMemcpy(qa, rnd, (size_t)L * H * D * 2, cudaMemcpyHostToDevice));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float ta[64];
    int nr = reps < 64 ? reps : 64;
    for (int r = -3; r < nr; r++) {
        cudaEventRecord(e0, 0);
        if ((rc = cake_decode_attention(s, qa, out, NULL)))
            break;
        cudaEventRecord(e1, 0);
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            cudaEventElapsedTime(&ta[r], e0, e1);
    }
    if (rc)
        printf("  cake_decode_attention: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
    else
        printf("  cake_decode_attention over the compacted cache (%u tokens in layer 0, page tables "
               "uploaded each call): %.1f us\n", cake_layer_tokens(s, 0), median(ta, nr) * 1e3);
    cudaFree(qa), cudaFree(out), cudaFree(src), cudaFree(qsrc), cudaFree(dnl);
    cake_seq_close(s);
    cake_destroy(c);
    stop_caked(pid);
    return 0;
}

/* One layer's inputs and buffers for time_score. */
struct score_run {
    struct kern_cuda_kv *kv;
    uint32_t n;
    const void *q;
    float *ind;
    uint32_t *idx;
    void *tmp, *ws;
    size_t wsb;
    void *tws;
    size_t twsb;
    cudaEvent_t e0, e1;
    int reps;
    struct gpu_hold *hold; /* non-NULL: each rep queued behind a hold (gpu_hold.h) */
};

/* Median ms over reps runs (after 3 to warm up) of the layer's scoring (lse: one pass with
 * them; NULL: two passes), with `select` its top-k and compaction too (the layer's n tokens
 * restored before each run: compaction moves data). -1 when a kernel fails. */
static double time_score(struct score_run *r, const float *lse, int select)
{
    float t[64];
    uint32_t S = r->n - W;
    for (int i = -3; i < r->reps; i++) {
        r->kv->n_tokens = r->n;
        if (r->hold && gpu_hold(r->hold, NULL))
            return -1;
        cudaEventRecord(r->e0, 0);
        if (kern_cuda_score_layer_pool(r->kv, r->q, lse, H, W, S, 200.0f, 0, KERN_POOL_AVG, 2, r->ind,
                                       NULL, NULL, r->ws, r->wsb, NULL))
            return -1;
        if (select) {
            kern_cuda_topk_ws(r->ind, HKV, S, KEEP, r->idx, r->tws, r->twsb, NULL);
            kern_cuda_compact(r->kv, r->idx, KEEP, S, W, r->tmp, NULL);
        }
        cudaEventRecord(r->e1, 0);
        if (r->hold)
            gpu_release(r->hold);
        CK(cudaEventSynchronize(r->e1));
        CK(cudaGetLastError());
        if (r->hold && gpu_hold_timed_out(r->hold)) {
            fprintf(stderr, "bench-gpu: the timed work waited for the host while held\n");
            return -1;
        }
        if (i >= 0)
            cudaEventElapsedTime(&t[i], r->e0, r->e1);
    }
    return median(t, r->reps);
}

static void attention(double bw, int reps, int torch);

int main(int argc, char **argv)
{
    uint32_t sizes[8] = {4096, 32768, 131072}, ns = 3;
    int reps = 20, torch = 1, attn = 1, caked = 1, carve = -2, o;
    static const struct option opts[] = {
        {"sizes", 1, 0, 's'}, {"reps", 1, 0, 'r'}, {"no-torch", 0, 0, 'n'}, {"no-attn", 0, 0, 'a'},
        {"no-caked", 0, 0, 'c'}, {"carveout", 1, 0, 'v'}, {"decode-lse", 0, 0, 'l'},
        {0, 0, 0, 0}};
    if (argc == 3 && !strcmp(argv[1], "--hold-context")) { /* decode_evict's idle neighbour */
        cudaFree(0);
        sleep((unsigned)atoi(argv[2]));
        return 0;
    }
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 's') {
            ns = 0;
            for (char *t = strtok(optarg, ","); t && ns < 8; t = strtok(NULL, ","))
                sizes[ns++] = (uint32_t)strtoul(t, NULL, 0);
        } else if (o == 'r') {
            reps = atoi(optarg) > 0 ? (atoi(optarg) < 64 ? atoi(optarg) : 64) : 1; /* up to 64 */
        } else if (o == 'n') {
            torch = 0;
        } else if (o == 'a') {
            attn = 0;
        } else if (o == 'c') {
            caked = 0;
        } else if (o == 'v') {
            carve = atoi(optarg);
        } else if (o == 'l') {
            decode_lse = 1;
        } else {
            fprintf(stderr, "usage: bench-gpu [--sizes N,..] [--reps R] [--no-torch] [--no-attn] [--no-caked] "
                    "[--carveout P] [--decode-lse]\n");
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
    kern_cuda_set_carveout(carve);
    printf("bench-gpu: %s, %d SMs; device copy %.2f TB/s (read + write); scoring and eviction kernels' "
           "carveout: %s\n", prop.name, prop.multiProcessorCount, bw / 1e12, carve == -2 ? "their own"
           : carve == -1 ? "the driver's" : carve >= 100 ? "100% shared" : "partial");
    printf("one layer: H=%d Hkv=%d d=%d w=%d bf16; median of %d; floor = key bytes / copy bandwidth;\n"
           "each n's \"queued\" row: the same chains enqueued behind a hold before the GPU starts them "
           "(their launches' host cost hidden, as behind an engine's own work)\n", H, HKV, D, W, reps);
    printf("%8s %10s %10s %8s %10s %8s %9s %7s %14s %8s %9s %8s %14s %8s\n", "n", "score_us", "floor_us",
           "x_floor", "torch_us", "speedup", "wmma_us", "x_wmma", "s+sel+cmp_us", "x_floor", "lse_us",
           "x_floor", "lse+sel+cmp_us", "x_floor");
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    struct gpu_hold hold;
    if (gpu_hold_init(&hold)) {
        fprintf(stderr, "bench-gpu: no mapped host memory for the hold\n");
        return 1;
    }
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
        void *q, *ws, *tmp, *tws;
        float *ind;
        uint32_t *idx;
        CK(cudaMalloc((void **)&page, half * 2));
        CK(cudaMalloc((void **)&off, sizeof(uint64_t)));
        CK(cudaMalloc(&q, (size_t)H * W * D * 2));
        CK(cudaMalloc((void **)&ind, sizeof(float) * HKV * S));
        CK(cudaMalloc((void **)&idx, sizeof(uint32_t) * HKV * KEEP));
        CK(cudaMalloc(&tmp, 2 * (size_t)HKV * (KEEP + W) * D * 2));
        size_t twsb = kern_cuda_topk_workspace(HKV, S);
        CK(cudaMalloc(&tws, twsb));
        CK(cudaMemcpy(page, hk, half, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(page + half, hk, half, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(off, &zero, sizeof zero, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(q, hq, (size_t)H * W * D * 2, cudaMemcpyHostToDevice));
        size_t wsb = kern_cuda_score_workspace(HKV, H, W, n, S);
        CK(cudaMalloc(&ws, wsb));
        struct kern_cuda_kv kv = {KERN_BF16, HKV, D, n, n, page, off, half};
        /* the engine's log-sum-exps (one pass): their values do not change the time; these
         * are what random rows give, ln(keys seen) + var(logit) / 2 */
        float *hl = malloc(sizeof(float) * H * W), *lse;
        for (uint32_t r = 0; r < (uint32_t)(H * W); r++)
            hl[r] = logf((float)(n - W + r % W + 1)) + 0.5f * (4.0f / 3.0f) * (1.0f / 3.0f);
        CK(cudaMalloc((void **)&lse, sizeof(float) * H * W));
        CK(cudaMemcpy(lse, hl, sizeof(float) * H * W, cudaMemcpyHostToDevice));
        free(hl);
        struct score_run sr = {&kv, n, q, ind, idx, tmp, ws, wsb, tws, twsb, e0, e1, reps, NULL};
        kern_cuda_score_set_wmma(1);
        double ms3 = time_score(&sr, NULL, 0); /* the WMMA passes */
        kern_cuda_score_set_wmma(0);
        double ms = time_score(&sr, NULL, 0), ms2 = time_score(&sr, NULL, 1);
        double ms4 = time_score(&sr, lse, 0), ms5 = time_score(&sr, lse, 1);
        if (ms < 0 || ms2 < 0 || ms3 < 0 || ms4 < 0 || ms5 < 0)
            return 1;
        /* the floor: the layer's key bytes read once at the rate the copy moved bytes
         * (read + write counted), which is what the memory sustains */
        double floor_us = (double)half / bw * 1e6;
        char why[160] = "--no-torch", tcol[48] = "         -        -";
        double tms = torch ? torch_ms(n, "score", why, sizeof why) : -1;
        if (tms > 0)
            snprintf(tcol, sizeof tcol, "%10.1f %7.1fx", tms * 1e3, tms / ms);
        printf("%8u %10.1f %10.1f %7.2fx %s %9.1f %6.2fx %14.1f %7.2fx %9.1f %7.2fx %14.1f %7.2fx%s%s%s\n", n,
               ms * 1e3, floor_us, ms * 1e3 / floor_us, tcol, ms3 * 1e3, ms3 / ms, ms2 * 1e3,
               ms2 * 1e3 / floor_us, ms4 * 1e3, ms4 * 1e3 / floor_us, ms5 * 1e3, ms5 * 1e3 / floor_us,
               tms > 0 ? "" : "  (torch: ", tms > 0 ? "" : why, tms > 0 ? "" : ")");
        /* the same chains queued behind a hold: the GPU's time with their launches' host
         * cost hidden, as behind an engine's own work (gpu_hold.cu) */
        sr.hold = &hold;
        double q1 = time_score(&sr, NULL, 0), q2 = time_score(&sr, NULL, 1);
        double q4 = time_score(&sr, lse, 0), q5 = time_score(&sr, lse, 1);
        sr.hold = NULL;
        if (q1 < 0 || q2 < 0 || q4 < 0 || q5 < 0)
            return 1;
        printf("%8s %10.1f %10s %7.2fx %19s %9s %7s %14.1f %7.2fx %9.1f %7.2fx %14.1f %7.2fx\n", "queued",
               q1 * 1e3, "", q1 * 1e3 / floor_us, "", "", "", q2 * 1e3, q2 * 1e3 / floor_us, q4 * 1e3,
               q4 * 1e3 / floor_us, q5 * 1e3, q5 * 1e3 / floor_us);
        fflush(stdout);
        cudaFree(page), cudaFree(off), cudaFree(q), cudaFree(ind), cudaFree(idx), cudaFree(tmp), cudaFree(ws), cudaFree(tws);
        cudaFree(lse);
        free(hk), free(hq);
    }
    gpu_hold_free(&hold);
    if (attn)
        attention(bw, reps, torch);
    decode_evict(bw, reps);
    cascade_stage(bw, reps, 1, 0, 32736, 16368, 0); /* stage 1 of a 32K prompt: layer 0 halves */
    cascade_stage(bw, reps, 20, 0, 1638, 1560, 0);  /* stage 20: every earlier layer shrinks a little */
    /* stage 16 of a 32K prompt (C 1024, 32 layers) as caked runs it: the newest layer from
     * the whole prompt, the 16 before it from 1984 each, all to 1867, holes filled */
    cascade_stage(bw, reps, 17, 32736, 1984, 1867, 1);
    if (caked) {
        size_t rb = 64u << 20; /* random bf16 for the sequence's pages */
        uint16_t *rnd = malloc(rb);
        uint64_t seed = 0x2545f4914f6cdd1dull;
        for (size_t i = 0; i < rb / 2; i++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            rnd[i] = kern_f32_to_bf16((float)((seed >> 40) * (2.0 / 16777216.0) - 1.0));
        }
        caked_section(32768, reps, rnd, rb);
        free(rnd);
    }
    return 0;
}

static void attention(double bw, int reps, int torch)
{
    /* a decode step's attention over 32 layers: full 128K cache vs CAKE at 1024 + window, a
     * layer in one run of pages and in caked's 64 KiB pages of 16 tokens */
    uint32_t len[2] = {131072, 1024 + W};
    double us[2][3];
    for (int i = 0; i < 2; i++)
        us[i][0] = attn_us(len[i], reps, len[i], 0), us[i][1] = attn_us(len[i], reps, len[i], 1),
        us[i][2] = attn_us(len[i], reps, 16, 0);
    printf("decode attention, 32 layers (H=%d Hkv=%d d=%d bf16), our paged kernel, one launch;\n"
           "floor = every layer's K and V read once:\n", H, HKV, D);
    printf("  %-24s %13s %11s %14s %10s %8s\n", "", "tensor cores", "CUDA cores", "64 KiB pages", "floor",
           "x_floor");
    for (int i = 0; i < 2; i++) {
        double floor_us = 32.0 * 2 * HKV * len[i] * D * 2 / bw * 1e6;
        char name[32];
        snprintf(name, sizeof name, i ? "CAKE %u+%d tokens/layer" : "full %u tokens/layer", i ? 1024 : len[i], W);
        printf("  %-24s %10.1f us %8.1f us %11.1f us %7.1f us %7.2fx\n", name, us[i][0], us[i][1], us[i][2],
               floor_us, us[i][0] / floor_us);
    }
    printf("  full / CAKE = %.1fx (tensor cores)\n", us[0][0] / us[1][0]);
    char why[160] = "--no-torch";
    double sd = torch ? torch_ms(131072, "sdpa", why, sizeof why) : -1;
    if (sd > 0)
        printf("  torch SDPA, full cache, 32 calls: %.1f us; ours (tensor cores) / SDPA = %.2fx, "
               "64 KiB pages / SDPA = %.2fx; SDPA / CAKE = %.1fx\n", sd * 1e3, us[0][0] / (sd * 1e3),
               us[0][2] / (sd * 1e3), sd * 1e3 / us[1][0]);
    else
        printf("  torch SDPA: %s\n", why);
}
