/* policy.c - layer-budget allocation (see policy.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "policy.h"

void policy_cfg_default(struct policy_cfg *cfg, uint32_t layers, uint32_t cache_size)
{
    *cfg = (struct policy_cfg){
        .mode = POLICY_FIXED, .layers = layers, .cache_size = cache_size, .window = 32,
        .tau1 = 1.0f, .tau2 = 1.0f, .gamma = 200.0f, .cascading = 1, .decode_slack = 0,
        .model_dtype = KERN_BF16,
    };
}

const char *policy_cfg_check(const struct policy_cfg *cfg)
{
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
    uint64_t lim = (uint64_t)budget + cfg->window;
    if (cfg->mode == POLICY_FIXED)
        lim += cfg->decode_slack;
    return held > lim;
}
