/* indicator.c - a layer's eviction scores under any policy (see indicator.h). */
#include <errno.h>
#include <float.h>
#include <stdlib.h>
#include <string.h>

#include "indicator.h"

static enum kern_pool kern_pool_of(enum policy_pool p)
{
    return p == POLICY_POOL_MAX ? KERN_POOL_MAX : p == POLICY_POOL_NONE ? KERN_POOL_NONE
                                                                        : KERN_POOL_AVG;
}

int indicator_layer(const struct policy_cfg *cfg, const struct kern_kv *kv, const void *q,
                    const float *lse, enum kern_dtype q_dtype, uint32_t q_heads, uint32_t n_q,
                    uint32_t S, int n_threads, float *ind, double *ent, double *var)
{
    uint32_t Hkv = kv->kv_heads;
    int parity = cfg->mode == POLICY_PARITY;
    struct kern_score_args a = {
        .q = q, .q_dtype = q_dtype, .q_heads = q_heads, .n_q = n_q, .kv = kv, .n_scored = S,
        .gamma = cfg->gamma, .stats = parity ? KERN_STATS_REF : KERN_STATS_FP32,
        .round_dtype = cfg->model_dtype, .n_threads = n_threads,
        .pool = kern_pool_of(cfg->pool), .pool_kernel = cfg->pool_kernel, .lse = lse,
    };
    struct kern_score_out o = {.indicator = ind};
    double e = 0.0, v = 0.0;
    int rc = 0;
    if (ent)
        *ent = 0.0;
    if (var)
        *var = 0.0;
    if (cfg->alloc == POLICY_ALLOC_PREFERENCE &&
        (cfg->indicator == POLICY_IND_LAST || cfg->indicator == POLICY_IND_POSITION)) {
        /* the window's statistics for the preference, its indicator thrown away */
        if ((rc = kern_score_layer(&a, &o)))
            return rc;
        e = o.entropy, v = o.variance;
    }
    switch (cfg->indicator) {
    case POLICY_IND_POSITION:
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t j = 0; j < S; j++)
                ind[(size_t)g * S + j] = j < cfg->sinks ? FLT_MAX : (float)j;
        break;
    case POLICY_IND_LAST: {
        /* the newest query of every head alone: it sees every key */
        size_t row = (size_t)kv->head_dim * kern_dtype_size(q_dtype);
        char *last = malloc(row * q_heads + sizeof(float) * q_heads);
        if (!last)
            return -ENOMEM;
        float *last_lse = (float *)(last + row * q_heads);
        for (uint32_t h = 0; h < q_heads; h++) {
            memcpy(last + h * row, (const char *)q + ((size_t)h * n_q + n_q - 1) * row, row);
            if (lse)
                last_lse[h] = lse[(size_t)h * n_q + n_q - 1];
        }
        a.q = last, a.n_q = 1, a.gamma = 0.0f, a.lse = lse ? last_lse : NULL;
        /* S <= n - n_q <= n - 1: the single row's own column is never among them */
        rc = kern_score_layer(&a, &o);
        free(last);
        break;
    }
    default:
        a.gamma = cfg->indicator == POLICY_IND_MEAN ? 0.0f : cfg->gamma;
        a.var_only = cfg->indicator == POLICY_IND_VAR;
        rc = kern_score_layer(&a, &o);
        e = o.entropy, v = o.variance;
        break;
    }
    if (rc)
        return rc;
    if (cfg->shared_heads && Hkv > 1) /* one ranking for the layer: the mean over heads */
        for (uint32_t j = 0; j < S; j++) {
            double m = 0.0;
            for (uint32_t g = 0; g < Hkv; g++)
                m += ind[(size_t)g * S + j];
            for (uint32_t g = 0; g < Hkv; g++)
                ind[(size_t)g * S + j] = (float)(m / Hkv);
        }
    if (ent)
        *ent = e;
    if (var)
        *var = v;
    return 0;
}
