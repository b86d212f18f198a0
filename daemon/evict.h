/* evict.h - decode-phase eviction of one layer: which entries it keeps.
 *
 * Called once policy_decode_should_evict() says a layer holding N entries is over its
 * budget. The last w entries (the window) are always kept; of the N - w before them the
 * layer keeps `budget`, ranked per kv head:
 *  - parity: the reference's CakeDecodingKVCache_LayerWise: softmax of the current query
 *    alone over all N entries, average-pooled along storage order, mean over the GQA group;
 *    kept in descending score order;
 *  - fixed: the policy's indicator (indicator.h; CAKE: mean + gamma * var) over the last
 *    n_q queries (the layer's ring of recent queries, causal), pooled by position; kept in
 *    positional order.
 * Thread-safe (no shared state). */
#ifndef CAKE_EVICT_H
#define CAKE_EVICT_H

#include "../kernels/kern.h"
#include "policy.h"

/* kv: the layer as held (n_tokens = N). q: [q_heads][n_q][head_dim] in q_dtype, the
 * most recent query last (parity uses only that one). lse (NULL: computed): the rows'
 * log-sum-exps [q_heads][n_q] (kern_score_args.lse; fixed mode: one pass over the keys).
 * slots receives [kv_heads][kept]
 * storage slots to keep among the first N - w, for kern_compact_head; ind is scratch of
 * kv_heads * (N - w) floats. Returns kept (min(budget, N - w)) or -EINVAL / -ENOMEM. */
int evict_decode_select(const struct policy_cfg *cfg, uint32_t budget, const struct kern_kv *kv,
                        const void *q, const float *lse, enum kern_dtype q_dtype, uint32_t q_heads,
                        uint32_t n_q, uint32_t *slots, float *ind, int n_threads);

/* H2O's decode rule (accumulating kinds): acc [kv_heads][cap] holds each held token's
 * attention accumulated over the window and every decode query. evict_h2o_add adds the
 * newest query's, ind [kv_heads][n] over the first n tokens. evict_h2o_keep picks head g's
 * top `kept` of its first S tokens by acc (positional order, ties to the lower position) into
 * slots, and makes acc_g follow the tokens compaction will keep: those, then the w window
 * entries that followed S, zeros after. */
void evict_h2o_add(float *acc, uint32_t cap, const float *ind, uint32_t kv_heads, uint32_t n);
void evict_h2o_keep(float *acc_g, uint32_t cap, uint32_t S, uint32_t w, uint32_t kept,
                    uint32_t *slots);

#endif
