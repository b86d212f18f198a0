/* evict.c - decode-phase eviction (see evict.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "evict.h"
#include "indicator.h"

int evict_decode_select(const struct policy_cfg *cfg, uint32_t budget, const struct kern_kv *kv,
                        const void *q, const float *lse, enum kern_dtype q_dtype, uint32_t q_heads,
                        uint32_t n_q, uint32_t *slots, float *ind, int n_threads)
{
    uint32_t N = kv->n_tokens, w = cfg->window;
    if (N <= w || n_q == 0 || n_q > N)
        return -EINVAL;
    uint32_t S = N - w, d = kv->head_dim;
    struct kern_score_args a = {
        .q = q, .q_dtype = q_dtype, .q_heads = q_heads, .n_q = n_q, .kv = kv, .n_scored = S,
        .gamma = cfg->gamma, .stats = KERN_STATS_FP32, .round_dtype = cfg->model_dtype,
        .n_threads = n_threads,
    };
    char *last = NULL;
    if (cfg->mode == POLICY_PARITY) {
        /* the current query alone: no variance term, gamma unused */
        a.n_q = 1, a.gamma = 0.0f, a.stats = KERN_STATS_REF;
        if (n_q > 1) { /* take the last row of every head */
            size_t row = (size_t)d * kern_dtype_size(q_dtype);
            if (!(last = malloc(row * q_heads)))
                return -ENOMEM;
            for (uint32_t h = 0; h < q_heads; h++)
                memcpy(last + h * row, (const char *)q + ((size_t)h * n_q + n_q - 1) * row, row);
            a.q = last;
        }
    }
    int rc;
    if (cfg->mode == POLICY_PARITY) {
        struct kern_score_out o = {.indicator = ind};
        rc = kern_score_layer(&a, &o);
    } else { /* the policy's indicator over the ring */
        rc = indicator_layer(cfg, kv, q, lse, q_dtype, q_heads, n_q, S, n_threads, ind, NULL, NULL);
    }
    free(last);
    if (rc)
        return rc;
    enum kern_order order = cfg->mode == POLICY_FIXED ? KERN_ORDER_POSITION : KERN_ORDER_SCORE;
    uint32_t kept = budget < S ? budget : S;
    for (uint32_t g = 0; g < kv->kv_heads; g++)
        kern_topk(ind + (size_t)g * S, S, kept, order, slots + (size_t)g * kept);
    return (int)kept;
}

void evict_h2o_add(float *acc, uint32_t cap, const float *ind, uint32_t kv_heads, uint32_t n)
{
    for (uint32_t g = 0; g < kv_heads; g++)
        for (uint32_t j = 0; j < n; j++)
            acc[(size_t)g * cap + j] += ind[(size_t)g * n + j];
}

void evict_h2o_keep(float *acc_g, uint32_t cap, uint32_t S, uint32_t w, uint32_t kept,
                    uint32_t *slots)
{
    kern_topk(acc_g, S, kept, KERN_ORDER_POSITION, slots);
    kern_gather_f32(acc_g, slots, kept, acc_g); /* ascending: in place */
    memmove(acc_g + kept, acc_g + S, sizeof(float) * w);
    memset(acc_g + kept + w, 0, sizeof(float) * (cap - kept - w));
}
