/* policy.h - CAKE's layer-budget allocation: both modes, and the preference score.
 *
 * Pure functions over small arrays; no state, no allocation beyond the stack (layers are
 * bounded by POLICY_MAX_LAYERS). Thread-safe. shared/CAKE.md sections 1.2, 1.5 and 2 are
 * the specification. */
#ifndef CAKE_POLICY_H
#define CAKE_POLICY_H

#include <stdint.h>

#include "../kernels/dtype.h"

/* Deep models have ~128 layers; the bound keeps per-call arrays on the stack. */
#define POLICY_MAX_LAYERS 1024

enum policy_mode {
    POLICY_PARITY = 0, /* reproduce the reference implementation, defects included */
    POLICY_FIXED = 1,  /* the serving default: shared/CAKE.md section 2 */
};

struct policy_cfg {
    enum policy_mode mode;
    uint32_t layers;        /* L */
    uint32_t cache_size;    /* C: per-layer average budget including the window */
    uint32_t window;        /* w */
    float tau1, tau2, gamma;
    int cascading;
    uint32_t decode_slack;  /* fixed mode: evict once a layer exceeds budget + w + slack */
    enum kern_dtype model_dtype; /* parity mode rounds statistics to it */
};

/* Default CAKE parameters (paper: w 32, gamma 200; tau 1 where not tuned). */
void policy_cfg_default(struct policy_cfg *cfg, uint32_t layers, uint32_t cache_size);

/* Returns NULL if cfg is usable, else a static message saying what is wrong. */
const char *policy_cfg_check(const struct policy_cfg *cfg);

const char *policy_mode_name(enum policy_mode m);
int policy_mode_parse(const char *s); /* -1 if unknown */

/* P_l from the layer's entropy and variance sums (mode decides the arithmetic). */
double policy_preference(const struct policy_cfg *cfg, double entropy, double variance);

/* The reference's adjust_budgets (section 1.5 step 2), verbatim semantics:
 * truncate, cap at S, one-pass equal redistribution of the excess and of the deficit
 * without re-capping. f has n entries; b receives n budgets (not clamped to S). */
void policy_adjust_budgets(const double *f, uint32_t n, int64_t T, int64_t S, int64_t *b);

/* Parity budgets for layers 0..n-1 from preferences: float32 shares of the whole-model T,
 * adjust_budgets, then the caller's clamp to S. Returns the number of non-finite shares
 * met (the reference produces garbage there; we produce 0 and count). */
int policy_budgets_parity(const float *P, uint32_t n, int64_t T, int64_t S, int64_t *b);

/* Fixed budgets: capped water-filling of min(T, sum cap) over n layers in proportion to P,
 * integers by largest remainder (ties to the lower layer). b[l] <= cap[l] and
 * sum b = min(T, sum cap) exactly. Returns 1 when P was unusable (sum 0, negative or not
 * finite) and uniform weights were used instead, else 0. */
int policy_budgets_fixed(const double *P, const int64_t *cap, uint32_t n, int64_t T, int64_t *b);

/* Prefill: nothing is evicted for prompts of n tokens when this is true (early exit). */
int policy_prefill_early_exit(const struct policy_cfg *cfg, uint32_t n);

/* Decode: a layer holding `held` entries (prefix + window + appended) with recorded
 * budget `budget` (scored tokens) is evicted when this returns nonzero; it then keeps the
 * top `budget` of its first held - w entries plus the last w. */
int policy_decode_should_evict(const struct policy_cfg *cfg, uint32_t budget, uint32_t held);

#endif
