/* indicator.h - what ranks a layer's tokens under a sequence's policy.
 *
 * One entry point for prefill and decode: from the layer's recent queries and keys, the
 * per-(kv head, slot) score the policy keeps the top of (CAKE's mean + gamma * var, the
 * baselines' mean, variance, last-query attention or position; pooled as the policy says;
 * shared by all heads for TOVA), and the entropy and variance sums CAKE's preference
 * needs. The arithmetic is kern_score_layer's; this module only chooses its arguments and
 * post-processes. Thread-safe (no shared state). */
#ifndef CAKE_INDICATOR_H
#define CAKE_INDICATOR_H

#include "../kernels/kern.h"
#include "policy.h"

/* q: [q_heads][n_q][head_dim] in q_dtype, the most recent query last; the first S slots of
 * kv are scored (S <= kv->n_tokens - n_q). ind receives [kv_heads][S]. ent and var (may be
 * NULL) receive the window's entropy and variance sums when the policy allocates by
 * preference, else 0. POLICY_IND_POSITION ranks slot j by j (slots are in positional
 * order in fixed mode) with the first cfg->sinks slots above every other. lse (may be
 * NULL): the rows' log-sum-exps, [q_heads][n_q] (kern.h: one pass over the keys). Returns
 * 0, -EINVAL or -ENOMEM. */
int indicator_layer(const struct policy_cfg *cfg, const struct kern_kv *kv, const void *q,
                    const float *lse, enum kern_dtype q_dtype, uint32_t q_heads, uint32_t n_q,
                    uint32_t S, int n_threads, float *ind, double *ent, double *var);

#endif
