/* cakeseq.h - one sequence's CAKE state: preferences, indicators, budgets, cascading.
 *
 * The controller between the kernels and the policy. It owns per layer the preference
 * P_l, the eviction indicator of the prefix tokens the layer still holds (per kv head),
 * their original positions, and the recorded budget. It decides and selects; moving K/V
 * is the caller's job (kern_compact_head on the slots it returns), so the same state
 * drives contiguous buffers in tools and pool pages in the daemon.
 *
 * Not thread-safe: one sequence is driven by one thread at a time. */
#ifndef CAKE_CAKESEQ_H
#define CAKE_CAKESEQ_H

#include <stdint.h>

#include "policy.h"

struct cakeseq;

/* One eviction decided by cakeseq_prefill_layer: layer `layer` keeps `kept` prefix tokens
 * per kv head. slots[g * kept + i] is the prefix slot (0-based, in the layer's current
 * storage) that moves to slot i; the window (slots old_prefix .. old_prefix + w - 1)
 * follows. slots is owned by the sequence and valid until its next call. */
struct cakeseq_evict {
    uint32_t layer;
    uint32_t kept;
    uint32_t old_prefix;
    const uint32_t *slots;
    const uint32_t *head_kept; /* per-head budgets (Ada-KV): head g's first head_kept[g]
                                  slots are tokens, the rest of its `kept` are holes (slots
                                  lists fillers there); NULL: every head keeps `kept` */
};

/* Bytes of memory the state for such a prompt may hold at most (what caked charges a
 * sequence for: tenant_admit_heap). */
uint64_t cakeseq_heap_bytes(const struct policy_cfg *cfg, uint32_t kv_heads, uint32_t n);
/* Creates the state for a prompt of n tokens with kv_heads kv heads per layer.
 * Returns 0, -EINVAL (with *why set to a static message) or -ENOMEM. */
int cakeseq_create(const struct policy_cfg *cfg, uint32_t kv_heads, uint32_t n,
                   struct cakeseq **out, const char **why);
void cakeseq_destroy(struct cakeseq *s);

/* Threads selecting a layer's kv heads in parallel (kern_threads() semantics: <= 0 all
 * cores; default 1). Results do not depend on it. */
void cakeseq_set_threads(struct cakeseq *s, int n);

/* Scored prefix length S = n - w (0 when n <= w). */
uint32_t cakeseq_scored_len(const struct cakeseq *s);

/* Layer `layer` of the prompt was scored: its preference P_l (policy_preference of the
 * entropy and variance sums, or the client's own) and its indicator [kv_heads][S]
 * (copied). Layers must arrive in order 0, 1, ... Evictions to apply now
 * are written to ev (room for L entries) and counted in *n_ev, in ascending layer order.
 * indicator NULL (from layer 0 on, fixed mode, no per-head budgets): the caller keeps the
 * indicators and selects itself (GPU sequences select on the GPU); evictions then carry the
 * counts only (slots NULL) and positions / indicators are not kept here.
 * Returns 0, -EINVAL (layer out of order, or NULL after a non-NULL), -ENOMEM. */
int cakeseq_prefill_layer(struct cakeseq *s, uint32_t layer, double pref, const float *indicator,
                          struct cakeseq_evict *ev, uint32_t *n_ev);

/* The prompt's last layer was applied: frees the selection buffers (eviction slots and
 * scratch, O(L * kv_heads * S)) and trims each layer's indicator and positions to the tokens
 * it holds, so a long-lived sequence keeps O(held tokens). Inspection keeps working;
 * cakeseq_prefill_layer then returns -EINVAL. */
void cakeseq_prefill_done(struct cakeseq *s);

/* Recorded state, for inspection. budget: what the layer records (parity may record a
 * budget above what it holds, shared/CAKE.md 2 row 4); prefix: prefix tokens held. */
double cakeseq_preference(const struct cakeseq *s, uint32_t layer);
uint32_t cakeseq_budget(const struct cakeseq *s, uint32_t layer);
uint32_t cakeseq_prefix_len(const struct cakeseq *s, uint32_t layer);
/* Pressure (caked's re-slicing): layer l's recorded budget becomes min(budget, recorded);
 * the next eviction of the layer keeps that many. */
void cakeseq_lower_budget(struct cakeseq *s, uint32_t l, uint32_t budget);
/* Pressure during the prompt (fixed mode, CAKE's preference allocation, cascading, while
 * the prompt's layers arrive): the whole model's total T = (C - w) L can be lowered. Can
 * it now? */
int cakeseq_can_restage(const struct cakeseq *s);
int64_t cakeseq_total(const struct cakeseq *s);
/* The total becomes min(T, total): the cascade's next stage allocates from it. */
void cakeseq_lower_total(struct cakeseq *s, int64_t T);
/* The budgets layers 0 .. scored - 1 would get at total min(T, current) - the cascade's
 * rule - into b (nothing changes). */
void cakeseq_restage_preview(const struct cakeseq *s, int64_t T, int64_t *b);
/* Re-selects the scored layers now at the total, as the cascade's next stage would
 * (evictions into ev, room for L). 0, -EINVAL (not now), -ENOMEM. */
int cakeseq_restage(struct cakeseq *s, struct cakeseq_evict *ev, uint32_t *n_ev);
/* Original positions of the held prefix tokens of (layer, g), in storage order. */
const uint32_t *cakeseq_positions(const struct cakeseq *s, uint32_t layer, uint32_t g);
/* Ada-KV: tokens each kv head of the layer keeps in its prefix slots (the rest of
 * prefix_len are holes), or NULL when every head keeps prefix_len. */
const uint32_t *cakeseq_head_kept(const struct cakeseq *s, uint32_t layer);
/* The indicator of the held prefix tokens of (layer, g), in storage order (prefix_len). */
const float *cakeseq_indicator(const struct cakeseq *s, uint32_t layer, uint32_t g);
/* Budgets recorded right after layer m was scored (row m of the stage table), L entries,
 * -1 beyond m. */
const int64_t *cakeseq_stage_budgets(const struct cakeseq *s, uint32_t m);
/* How many times unusable preferences forced uniform budgets (fixed) or produced
 * non-finite shares (parity). */
uint32_t cakeseq_fallbacks(const struct cakeseq *s);

#endif
