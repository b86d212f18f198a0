/* policy.c - layer-budget allocation (see policy.h). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "../kernels/kern.h"
#include "policy.h"

void policy_cfg_default(struct policy_cfg *cfg, uint32_t layers, uint32_t cache_size)
{
    *cfg = (struct policy_cfg){
        .mode = POLICY_FIXED, .layers = layers, .cache_size = cache_size, .window = 32,
        .tau1 = 1.0f, .tau2 = 1.0f, .gamma = 200.0f, .cascading = 1, .decode_slack = 0,
        .model_dtype = KERN_BF16,
    };
}

void policy_cfg_resolve(struct policy_cfg *cfg)
{
    static const struct {
        enum policy_alloc alloc;
        enum policy_ind ind;
        enum policy_pool pool;
        uint32_t kernel;
        enum policy_decode decode;
    } kd[POLICY_KIND_COUNT] = {
        [POLICY_CAKE] = {POLICY_ALLOC_PREFERENCE, POLICY_IND_MEAN_VAR, POLICY_POOL_AVG, 5,
                         POLICY_DECODE_EVICT},
        [POLICY_FULL] = {POLICY_ALLOC_NONE, POLICY_IND_MEAN, POLICY_POOL_NONE, 1,
                         POLICY_DECODE_PREFILL_ONLY},
        [POLICY_STREAMING] = {POLICY_ALLOC_UNIFORM, POLICY_IND_POSITION, POLICY_POOL_NONE, 1,
                              POLICY_DECODE_EVICT},
        [POLICY_H2O] = {POLICY_ALLOC_UNIFORM, POLICY_IND_MEAN, POLICY_POOL_NONE, 1,
                        POLICY_DECODE_EVICT},
        [POLICY_TOVA] = {POLICY_ALLOC_UNIFORM, POLICY_IND_LAST, POLICY_POOL_NONE, 1,
                         POLICY_DECODE_EVICT},
        [POLICY_SNAPKV] = {POLICY_ALLOC_UNIFORM, POLICY_IND_MEAN, POLICY_POOL_MAX, 7,
                           POLICY_DECODE_PREFILL_ONLY},
        [POLICY_PYRAMIDKV] = {POLICY_ALLOC_PYRAMID, POLICY_IND_MEAN, POLICY_POOL_MAX, 7,
                              POLICY_DECODE_PREFILL_ONLY},
        [POLICY_ADAKV] = {POLICY_ALLOC_UNIFORM, POLICY_IND_MEAN, POLICY_POOL_MAX, 7,
                          POLICY_DECODE_PREFILL_ONLY},
    };
    if ((unsigned)cfg->kind >= POLICY_KIND_COUNT)
        return; /* policy_cfg_check says so */
    if (!cfg->alloc)
        cfg->alloc = kd[cfg->kind].alloc;
    if (!cfg->indicator)
        cfg->indicator = kd[cfg->kind].ind;
    if (!cfg->pool)
        cfg->pool = kd[cfg->kind].pool;
    if (!cfg->pool_kernel)
        cfg->pool_kernel = cfg->pool == kd[cfg->kind].pool ? kd[cfg->kind].kernel
                         : cfg->pool == POLICY_POOL_NONE  ? 1 : 5;
    if (!cfg->decode)
        cfg->decode = kd[cfg->kind].decode;
    if (!cfg->sinks)
        cfg->sinks = 4;
    if (cfg->pyramid_beta == 0.0f)
        cfg->pyramid_beta = 20.0f;
    if (cfg->ada_alpha == 0.0f)
        cfg->ada_alpha = 0.2f;
    if (cfg->kind == POLICY_ADAKV)
        cfg->per_head_budgets = 1;
    if (cfg->kind == POLICY_TOVA)
        cfg->shared_heads = 1;
    if (cfg->kind == POLICY_H2O)
        cfg->accumulate = 1;
}

const char *policy_cfg_check(const struct policy_cfg *in)
{
    struct policy_cfg r = *in, *cfg = &r;
    if ((unsigned)cfg->kind >= POLICY_KIND_COUNT)
        return "unknown policy kind";
    policy_cfg_resolve(cfg);
    if (cfg->alloc > POLICY_ALLOC_NONE)
        return "unknown allocation";
    if (cfg->indicator > POLICY_IND_POSITION)
        return "unknown indicator";
    if (cfg->pool > POLICY_POOL_NONE || cfg->pool_kernel % 2 == 0 || cfg->pool_kernel > 255)
        return "pooling must be avg, max or none with an odd kernel up to 255";
    if (cfg->decode > POLICY_DECODE_PREFILL_ONLY)
        return "unknown decode behaviour";
    if (cfg->mode == POLICY_PARITY &&
        (cfg->kind != POLICY_CAKE || cfg->alloc != POLICY_ALLOC_PREFERENCE ||
         cfg->indicator != POLICY_IND_MEAN_VAR || cfg->pool != POLICY_POOL_AVG ||
         cfg->pool_kernel != 5 || cfg->decode != POLICY_DECODE_EVICT))
        return "parity mode reproduces CAKE's reference only: use fixed mode for baselines "
               "and ablations";
    if (!(cfg->pyramid_beta >= 1.0f) || !isfinite(cfg->pyramid_beta))
        return "pyramid_beta must be at least 1";
    if (!(cfg->ada_alpha <= 1.0f) || !isfinite(cfg->ada_alpha))
        return "ada_alpha must be at most 1 (negative: no floor)";
    if (cfg->per_head_budgets &&
        (cfg->shared_heads || cfg->decode == POLICY_DECODE_EVICT ||
         cfg->alloc == POLICY_ALLOC_PREFERENCE))
        return "per-head budgets (Ada-KV) need prefill-only decoding, per-head token sets and "
               "static layer budgets (uniform or pyramid)";
    if (cfg->run_width > 1 &&
        (cfg->run_width % 2 == 0 || cfg->run_width > 255 || cfg->mode == POLICY_PARITY ||
         cfg->per_head_budgets || cfg->accumulate || cfg->indicator == POLICY_IND_POSITION))
        return "run_width (odd, up to 255) reshapes a scored prefill selection in fixed mode: "
               "not with parity mode, per-head budgets (Ada-KV), accumulated scores (H2O) or "
               "the position indicator (StreamingLLM)";
    if (cfg->mode != POLICY_PARITY && cfg->mode != POLICY_FIXED)
        return "unknown policy mode";
    if (cfg->layers == 0 || cfg->layers > POLICY_MAX_LAYERS)
        return "layers must be in 1..1024";
    if (cfg->window == 0)
        return "window must be at least 1";
    if (cfg->cache_size < cfg->window)
        return "cache_size must be at least the window";
    if (!(cfg->tau1 > 0.0f) || !(cfg->tau2 > 0.0f) || !isfinite(cfg->tau1) || !isfinite(cfg->tau2))
        return "tau1 and tau2 must be positive and finite";
    if (!(cfg->gamma >= 0.0f) || !isfinite(cfg->gamma))
        return "gamma must be finite and >= 0";
    return NULL;
}

static const char *const kind_names[POLICY_KIND_COUNT] = {
    "cake", "full", "streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "adakv",
};
static const char *const alloc_names[] = {"default", "preference", "uniform", "pyramid", "none"};
static const char *const ind_names[] = {"default", "mean+var", "mean", "var", "last", "position"};

static int name_parse(const char *const *names, int n, const char *s)
{
    for (int i = 0; i < n; i++)
        if (!strcasecmp(s, names[i]))
            return i;
    return -1;
}

const char *policy_kind_name(enum policy_kind k)
{
    return (unsigned)k < POLICY_KIND_COUNT ? kind_names[k] : "?";
}
int policy_kind_parse(const char *s) { return name_parse(kind_names, POLICY_KIND_COUNT, s); }
const char *policy_alloc_name(enum policy_alloc a)
{
    return (unsigned)a <= POLICY_ALLOC_NONE ? alloc_names[a] : "?";
}
int policy_alloc_parse(const char *s) { return name_parse(alloc_names, 5, s); }
const char *policy_ind_name(enum policy_ind i)
{
    return (unsigned)i <= POLICY_IND_POSITION ? ind_names[i] : "?";
}
int policy_ind_parse(const char *s) { return name_parse(ind_names, 6, s); }

static const char *const pool_names[] = {"default", "avg", "max", "none"};
static const char *const decode_names[] = {"default", "evict", "prefill-only"};

char *policy_describe(const struct policy_cfg *cfg, char *buf, size_t n)
{
    size_t at = 0;
#define PUT(...)                                                             \
    do {                                                                     \
        int k_ = snprintf(at < n ? buf + at : NULL, at < n ? n - at : 0,     \
                          __VA_ARGS__);                                      \
        at += k_ > 0 ? (size_t)k_ : 0;                                       \
    } while (0)
    if (!n)
        return buf;
    buf[0] = 0;
    PUT("alloc %s", policy_alloc_name(cfg->alloc));
    if (cfg->alloc == POLICY_ALLOC_PREFERENCE)
        PUT(" (tau %g/%g, gamma %g%s)", cfg->tau1, cfg->tau2, cfg->gamma,
            cfg->cascading ? "" : ", no cascade");
    else if (cfg->alloc == POLICY_ALLOC_PYRAMID)
        PUT(" (beta %g)", cfg->pyramid_beta);
    PUT(", indicator %s", policy_ind_name(cfg->indicator));
    if (cfg->accumulate)
        PUT(" accumulated");
    if ((unsigned)cfg->pool <= POLICY_POOL_NONE)
        PUT(", pool %s", pool_names[cfg->pool]);
    if (cfg->pool != POLICY_POOL_NONE)
        PUT(" %u", cfg->pool_kernel);
    if ((unsigned)cfg->decode <= POLICY_DECODE_PREFILL_ONLY)
        PUT(", decode %s", decode_names[cfg->decode]);
    if (cfg->decode_slack)
        PUT(" (slack %u)", cfg->decode_slack);
    PUT(", window %u", cfg->window);
    if (cfg->indicator == POLICY_IND_POSITION)
        PUT(", sinks %u", cfg->sinks);
    if (cfg->per_head_budgets)
        PUT(", per-head budgets (alpha %g)", cfg->ada_alpha);
    if (cfg->shared_heads)
        PUT(", one set for all heads");
    if (policy_keeps_runs(cfg))
        PUT(", runs of %u", cfg->run_width);
#undef PUT
    if (at >= n && n > 4) /* cut short: say so */
        memcpy(buf + n - 4, "...", 4);
    return buf;
}

int policy_budgets_static(const struct policy_cfg *cfg, int64_t S, int64_t *b)
{
    uint32_t L = cfg->layers;
    int64_t avg = (int64_t)cfg->cache_size - cfg->window;
    switch (cfg->alloc) {
    case POLICY_ALLOC_NONE:
        for (uint32_t l = 0; l < L; l++)
            b[l] = S;
        return 1;
    case POLICY_ALLOC_UNIFORM:
        for (uint32_t l = 0; l < L; l++)
            b[l] = avg < S ? avg : S;
        return 1;
    case POLICY_ALLOC_PYRAMID: {
        /* PyramidKV (KVCache-Factory @5a1f543): min = avg // beta, max = 2 avg - min; if max
         * reaches S: max = S, min = 2 avg - max; step = (max - min) // (L - 1); layer l gets
         * max - l * step. Below 2 avg scored tokens it is uniform (SnapKV). */
        if (S < 2 * avg || L == 1)
            goto uniform;
        int64_t mn = (int64_t)floor((double)avg / cfg->pyramid_beta), mx = 2 * avg - mn;
        if (mx >= S)
            mx = S, mn = 2 * avg - mx;
        int64_t step = (mx - mn) / (int64_t)(L - 1);
        for (uint32_t l = 0; l < L; l++) {
            b[l] = mx - (int64_t)l * step;
            b[l] = b[l] < 0 ? 0 : b[l] > S ? S : b[l];
        }
        return 1;
    }
    default:
        return 0;
    }
uniform:
    for (uint32_t l = 0; l < L; l++)
        b[l] = avg < S ? avg : S;
    return 1;
}

struct head_score {
    float v;
    uint32_t at; /* g * S + j */
};

static int head_score_cmp(const void *x, const void *y)
{
    const struct head_score *a = x, *b = y;
    if (a->v != b->v)
        return a->v > b->v ? -1 : 1;
    return a->at < b->at ? -1 : a->at > b->at;
}

int policy_head_budgets(const struct policy_cfg *cfg, const float *ind, uint32_t kv_heads,
                        uint32_t S, uint32_t B, uint32_t *bg)
{
    uint64_t total = (uint64_t)kv_heads * (B < S ? B : S), all = (uint64_t)kv_heads * S;
    struct head_score *hs = malloc(sizeof(*hs) * (all + 1));
    if (!hs)
        return -ENOMEM;
    for (uint64_t i = 0; i < all; i++)
        hs[i] = (struct head_score){isnan(ind[i]) ? -INFINITY : ind[i], (uint32_t)i};
    qsort(hs, all, sizeof(*hs), head_score_cmp);
    uint32_t cnt[POLICY_MAX_HEADS] = {0};
    for (uint64_t i = 0; i < total; i++)
        cnt[hs[i].at / S]++;
    free(hs);
    double alpha = cfg->ada_alpha < 0.0f ? 0.0 : cfg->ada_alpha;
    double floor_share = floor(alpha * (double)(B < S ? B : S));
    int64_t got = 0;
    for (uint32_t g = 0; g < kv_heads; g++) {
        double x = floor((double)cnt[g] * (1.0 - alpha) + floor_share + 0.5);
        bg[g] = x > S ? S : (uint32_t)x;
        got += bg[g];
    }
    /* rounding may miss the total by a few: give or take from the heads with the most or
     * fewest, lowest index first, within [0, S] */
    while ((uint64_t)got < total) {
        uint32_t best = UINT32_MAX;
        for (uint32_t g = 0; g < kv_heads; g++)
            if (bg[g] < S && (best == UINT32_MAX || cnt[g] > cnt[best]))
                best = g;
        if (best == UINT32_MAX)
            break;
        bg[best]++, got++;
    }
    while ((uint64_t)got > total) {
        uint32_t best = UINT32_MAX;
        for (uint32_t g = 0; g < kv_heads; g++)
            if (bg[g] > 0 && (best == UINT32_MAX || cnt[g] < cnt[best]))
                best = g;
        bg[best]--, got--;
    }
    return 0;
}

/* Stable LSD radix sort of a[0..n) by each entry's upper 32 bits (4 passes of 8 bits; a
 * digit all entries share is skipped); tmp: n more. The result is in a. */
static void sort_hi32(uint64_t *a, uint64_t *tmp, uint32_t n)
{
    uint64_t *out = a;
    for (int shift = 32; shift < 64; shift += 8) {
        uint32_t count[257] = {0};
        for (uint32_t i = 0; i < n; i++)
            count[((a[i] >> shift) & 0xff) + 1]++;
        int one = 0;
        for (int d = 1; d <= 256 && !one; d++)
            one = count[d] == n;
        if (one)
            continue;
        for (int d = 1; d <= 256; d++)
            count[d] += count[d - 1];
        for (uint32_t i = 0; i < n; i++)
            tmp[count[(a[i] >> shift) & 0xff]++] = a[i];
        uint64_t *t = a;
        a = tmp, tmp = t;
    }
    if (a != out) /* an odd number of passes ran: the sorted copy is in the scratch */
        memcpy(out, a, sizeof *a * n);
}

void policy_runs_rank(float *ind, uint32_t S, uint32_t width, uint64_t *key, uint8_t *taken)
{
    /* best score first, the earlier position first among equals */
    for (uint32_t j = 0; j < S; j++)
        key[j] = (uint64_t)~kern_sort_key(ind[j]) << 32 | j;
    sort_hi32(key, key + S, S); /* stable: the earlier of equal scores stays first */
    memset(taken, 0, S);
    uint32_t h = width / 2, r = S;
    for (uint32_t i = 0; i < S; i++) {
        uint32_t c = (uint32_t)key[i], lo = c > h ? c - h : 0, hi = c + h < S ? c + h : S - 1;
        int free_run = 1;
        for (uint32_t t = lo; t <= hi && free_run; t++)
            free_run = !taken[t];
        if (!free_run)
            continue;
        ind[c] = (float)r--, taken[c] = 1;
        for (uint32_t dd = 1; dd <= h; dd++) {
            if (c >= lo + dd)
                ind[c - dd] = (float)r--, taken[c - dd] = 1;
            if (c + dd <= hi)
                ind[c + dd] = (float)r--, taken[c + dd] = 1;
        }
    }
    for (uint32_t i = 0; i < S; i++) /* what no run took, by score */
        if (!taken[(uint32_t)key[i]])
            ind[(uint32_t)key[i]] = (float)r--;
}

const char *policy_mode_name(enum policy_mode m)
{
    return m == POLICY_PARITY ? "parity" : "fixed";
}

int policy_mode_parse(const char *s)
{
    if (!strcasecmp(s, "parity"))
        return POLICY_PARITY;
    if (!strcasecmp(s, "fixed"))
        return POLICY_FIXED;
    return -1;
}

double policy_preference(const struct policy_cfg *cfg, double entropy, double variance)
{
    if (cfg->mode == POLICY_FIXED)
        return pow(entropy, 1.0 / cfg->tau1) * pow(variance, 1.0 / cfg->tau2);
    /* reference: H^(1/tau1) in f32, V^(1/tau2) evaluated in the model dtype, product f32 */
    float h = powf((float)entropy, (float)(1.0 / cfg->tau1));
    float v = kern_round_to(cfg->model_dtype,
                            powf(kern_round_to(cfg->model_dtype, (float)variance),
                                 (float)(1.0 / cfg->tau2)));
    return (double)(h * v);
}

/* Adds q to every member of set (size k) and r more, one each, to its first r members. */
static void spread(int64_t *b, const uint32_t *set, uint32_t k, int64_t total, int sign)
{
    int64_t q = total / k, r = total % k;
    for (uint32_t i = 0; i < k; i++)
        b[set[i]] += sign * (q + ((int64_t)i < r ? 1 : 0));
}

void policy_adjust_budgets(const double *f, uint32_t n, int64_t T, int64_t S, int64_t *b)
{
    uint32_t set[POLICY_MAX_LAYERS], k = 0;
    int64_t E = 0, sum = 0;
    for (uint32_t l = 0; l < n; l++) {
        /* Python int() truncates toward zero; NaN would raise there, we take 0 */
        b[l] = isfinite(f[l]) ? (int64_t)f[l] : 0;
        if (b[l] > S) {
            E += b[l] - S;
            b[l] = S;
        }
    }
    if (E > 0) {
        for (uint32_t l = 0; l < n; l++)
            if (b[l] < S)
                set[k++] = l;
        if (k)
            spread(b, set, k, E, +1);
    }
    for (uint32_t l = 0; l < n; l++)
        sum += b[l];
    int64_t D = T - sum;
    k = 0;
    if (D > 0) {
        for (uint32_t l = 0; l < n; l++)
            if (b[l] < S)
                set[k++] = l;
        if (k)
            spread(b, set, k, D, +1);
    } else if (D < 0) {
        for (uint32_t l = 0; l < n; l++)
            if (b[l] > 1)
                set[k++] = l;
        if (k)
            spread(b, set, k, -D, -1);
    }
}

int policy_budgets_parity(const float *P, uint32_t n, int64_t T, int64_t S, int64_t *b)
{
    double f[POLICY_MAX_LAYERS];
    int bad = 0;
    if (n == 0 || n > POLICY_MAX_LAYERS)
        return 0;
    float sum = 0.0f;
    for (uint32_t l = 0; l < n; l++)
        sum += P[l];
    for (uint32_t l = 0; l < n; l++) {
        float share = P[l] / sum * (float)T;
        if (!isfinite(share))
            bad++;
        f[l] = share;
    }
    policy_adjust_budgets(f, n, T, S, b);
    for (uint32_t l = 0; l < n; l++)
        if (b[l] > S)
            b[l] = S;
    return bad;
}

int policy_budgets_fixed(const double *P, const int64_t *cap, uint32_t n, int64_t T, int64_t *b)
{
    double w[POLICY_MAX_LAYERS], x[POLICY_MAX_LAYERS];
    uint8_t active[POLICY_MAX_LAYERS];
    int fallback = 0;
    double psum = 0.0;
    int64_t capsum = 0;
    for (uint32_t l = 0; l < n; l++) {
        if (!isfinite(P[l]) || P[l] < 0.0)
            fallback = 1;
        psum += P[l];
        capsum += cap[l] > 0 ? cap[l] : 0;
    }
    if (!(psum > 0.0) || !isfinite(psum))
        fallback = 1;
    for (uint32_t l = 0; l < n; l++) {
        w[l] = fallback ? 1.0 : P[l];
        active[l] = cap[l] > 0;
        x[l] = 0.0;
    }
    int64_t total = T < capsum ? T : capsum;
    if (total < 0)
        total = 0;
    /* water-filling: layers whose proportional share reaches their cap are pinned there
     * and the rest is re-spread among the others until nothing new is pinned */
    double R = (double)total;
    for (;;) {
        double W = 0.0;
        uint32_t na = 0;
        for (uint32_t l = 0; l < n; l++)
            if (active[l])
                W += w[l], na++;
        if (na == 0)
            break;
        int equal = !(W > 0.0); /* only zero-preference layers left: spread evenly */
        int pinned = 0;
        for (uint32_t l = 0; l < n; l++) {
            if (!active[l])
                continue;
            double share = (equal ? 1.0 / na : w[l] / W) * R;
            if (share >= (double)cap[l]) {
                x[l] = (double)cap[l];
                active[l] = 0;
                pinned = 1;
            }
        }
        if (pinned) {
            R = (double)total;
            for (uint32_t l = 0; l < n; l++)
                if (!active[l] && cap[l] > 0)
                    R -= x[l];
            continue;
        }
        for (uint32_t l = 0; l < n; l++)
            if (active[l])
                x[l] = (equal ? 1.0 / na : w[l] / W) * R;
        break;
    }
    /* largest remainder: floor everything, then +1 by descending fraction */
    int64_t got = 0;
    for (uint32_t l = 0; l < n; l++) {
        b[l] = (int64_t)floor(x[l]);
        if (b[l] > cap[l])
            b[l] = cap[l] > 0 ? cap[l] : 0;
        if (b[l] < 0)
            b[l] = 0;
        got += b[l];
    }
    while (got < total) {
        int best = -1;
        double bf = -1.0;
        for (uint32_t l = 0; l < n; l++) {
            if (b[l] >= cap[l])
                continue;
            double fr = x[l] - (double)b[l];
            if (fr > bf)
                bf = fr, best = (int)l;
        }
        if (best < 0)
            break; /* unreachable: total <= sum cap */
        b[best]++;
        x[best] = (double)b[best]; /* its fraction is spent */
        got++;
    }
    while (got > total) { /* float error only: take back from the smallest fractions */
        int best = -1;
        double bf = 2.0;
        for (uint32_t l = 0; l < n; l++) {
            double fr = x[l] - (double)b[l] + 1.0;
            if (b[l] > 0 && fr < bf)
                bf = fr, best = (int)l;
        }
        if (best < 0)
            break;
        b[best]--;
        got--;
    }
    return fallback;
}

int policy_prefill_early_exit(const struct policy_cfg *cfg, uint32_t n)
{
    if (n <= cfg->window)
        return 1; /* nothing scorable (the reference crashes here) */
    if (cfg->mode == POLICY_PARITY)
        return n <= cfg->cache_size + cfg->window;
    return n <= cfg->cache_size;
}

int policy_decode_should_evict(const struct policy_cfg *cfg, uint32_t budget, uint32_t held)
{
    if (cfg->decode == POLICY_DECODE_PREFILL_ONLY || cfg->alloc == POLICY_ALLOC_NONE)
        return 0;
    uint64_t lim = (uint64_t)budget + cfg->window;
    if (cfg->mode == POLICY_FIXED)
        lim += cfg->decode_slack;
    return held > lim;
}
