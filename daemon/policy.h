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
#define POLICY_MAX_HEADS 1024 /* kv heads per layer (Ada-KV's per-head split) */

enum policy_mode {
    POLICY_PARITY = 0, /* reproduce the reference implementation, defects included */
    POLICY_FIXED = 1,  /* the serving default: shared/CAKE.md section 2 */
};

/* Which eviction policy a sequence runs: CAKE or a baseline (shared/CAKE.md section 3,
 * docs in daemon/README.md "Policies"). The kind sets the defaults of the components
 * below; policy_cfg_resolve() fills those left at zero. */
enum policy_kind {
    POLICY_CAKE = 0,
    POLICY_FULL = 1,      /* no eviction */
    POLICY_STREAMING = 2, /* StreamingLLM: sinks + most recent */
    POLICY_H2O = 3,       /* accumulated attention */
    POLICY_TOVA = 4,      /* the last query's attention, one token set for all heads */
    POLICY_SNAPKV = 5,    /* window attention, max-pooled, uniform budgets, prefill only */
    POLICY_PYRAMIDKV = 6, /* SnapKV's scores, pyramid budgets */
    POLICY_ADAKV = 7,     /* SnapKV's scores, per-head budgets inside each layer */
    POLICY_KIND_COUNT
};

/* How the total (C - w) * L is split among layers. */
enum policy_alloc {
    POLICY_ALLOC_DEFAULT = 0,    /* the kind's */
    POLICY_ALLOC_PREFERENCE = 1, /* CAKE: in proportion to the preference score */
    POLICY_ALLOC_UNIFORM = 2,    /* C - w per layer */
    POLICY_ALLOC_PYRAMID = 3,    /* PyramidKV's arithmetic series, layer 0 largest */
    POLICY_ALLOC_NONE = 4,       /* no budget: keep everything (full cache) */
};

/* What ranks a layer's tokens. */
enum policy_ind {
    POLICY_IND_DEFAULT = 0,
    POLICY_IND_MEAN_VAR = 1, /* CAKE: mean + gamma * var of the window's attention */
    POLICY_IND_MEAN = 2,     /* mean (= column sum, same ranking) of the window's attention */
    POLICY_IND_VAR = 3,      /* variance alone (the paper's ablation) */
    POLICY_IND_LAST = 4,     /* the last query's attention only (TOVA) */
    POLICY_IND_POSITION = 5, /* sinks, then the most recent (StreamingLLM) */
};

/* Pooling of the indicator along positions (kern_pool plus "the kind's"). */
enum policy_pool {
    POLICY_POOL_DEFAULT = 0,
    POLICY_POOL_AVG = 1,
    POLICY_POOL_MAX = 2,
    POLICY_POOL_NONE = 3,
};

/* What decode steps do. */
enum policy_decode {
    POLICY_DECODE_DEFAULT = 0,
    POLICY_DECODE_EVICT = 1,        /* hold each layer at its budget + w (CAKE's decode) */
    POLICY_DECODE_PREFILL_ONLY = 2, /* compress the prompt once; decoded tokens accumulate */
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
    /* policy (zero: CAKE with its own components) */
    enum policy_kind kind;
    enum policy_alloc alloc;
    enum policy_ind indicator;
    enum policy_pool pool;
    uint32_t pool_kernel;   /* odd; 0: the kind's (5 CAKE, 7 SnapKV family) */
    enum policy_decode decode;
    uint32_t sinks;         /* StreamingLLM: first tokens always kept (0: 4) */
    float pyramid_beta;     /* PyramidKV: smallest layer gets (C - w) / beta (0: 20) */
    float ada_alpha;        /* Ada-KV: share of a head's budget guaranteed (0: 0.2; < 0: none) */
    uint32_t run_width;     /* prefill keeps runs of this many positions (odd; 0, 1: top tokens) */
    int per_head_budgets;   /* Ada-KV: heads of a layer keep different counts */
    int shared_heads;       /* TOVA: one token set for every kv head of a layer */
    int accumulate;         /* H2O: scores carried across decode steps */
};

/* The prefill selection keeps runs (policy_runs_rank) rather than top tokens. */
static inline int policy_keeps_runs(const struct policy_cfg *cfg) { return cfg->run_width > 1; }
/* The kept set is chosen on the host even for GPU sequences (Ada-KV's per-head split, runs):
 * the GPU scores, the host selects from a copy of the indicator, the GPU compacts. */
static inline int policy_host_selects(const struct policy_cfg *cfg)
{
    return cfg->per_head_budgets || policy_keeps_runs(cfg);
}

/* Default CAKE parameters (paper: w 32, gamma 200; tau 1 where not tuned). */
void policy_cfg_default(struct policy_cfg *cfg, uint32_t layers, uint32_t cache_size);

/* Fills the components the kind decides and the caller left at zero (idempotent).
 * policy_cfg_check() calls it on its copy; the daemon resolves once at open. */
void policy_cfg_resolve(struct policy_cfg *cfg);

/* Returns NULL if cfg (resolved or not) is usable, else a static message saying what is
 * wrong. */
const char *policy_cfg_check(const struct policy_cfg *cfg);

const char *policy_kind_name(enum policy_kind k);
int policy_kind_parse(const char *s);   /* -1 if unknown */
const char *policy_alloc_name(enum policy_alloc a);
int policy_alloc_parse(const char *s);
const char *policy_ind_name(enum policy_ind i);
int policy_ind_parse(const char *s);

/* Static layer budgets (uniform, pyramid, none) of the scored prefix for a prompt whose
 * scored length is S; b gets L entries. Preference allocation is not static: 0 returned,
 * b untouched; else 1. */
int policy_budgets_static(const struct policy_cfg *cfg, int64_t S, int64_t *b);

/* Ada-KV's split of a layer's kv_heads * B tokens among its heads: the top kv_heads * B
 * of all heads' scores together give head g n_g of them; head g keeps
 * B_g = round(n_g (1 - alpha) + floor(alpha B)) (the floor share guaranteed), corrected so
 * that sum B_g = kv_heads * B and B_g <= S. ind is [kv_heads][S]. Returns 0 or -ENOMEM. */
int policy_head_budgets(const struct policy_cfg *cfg, const float *ind, uint32_t kv_heads,
                        uint32_t S, uint32_t B, uint32_t *bg);

/* Rewrites one head's scores ind[0..S) into ranks (S for the first kept, down to 1) whose
 * top b, for any b, is whole runs of `width` (odd) consecutive positions: greedy over the
 * positions by score (ties: the earlier first; NaN lowest, as kern_topk), each takes the
 * window of width positions centered on it (clipped at 0 and S) unless a position of it is
 * already taken, its positions ranked center first, then outward (the earlier of two at one
 * distance first); then every position left, by score (ranks exact below 2^24 positions).
 * key: 2 S uint64 of scratch; taken: S bytes. */
void policy_runs_rank(float *ind, uint32_t S, uint32_t width, uint64_t *key, uint8_t *taken);

/* cfg (resolved) in words, every component as it runs: "alloc preference (tau 1/1, gamma 200),
 * indicator mean+var, pool avg 5, decode evict, window 32" and what the kind adds (sinks, per-
 * head budgets, runs, ...). Writes at most n bytes (NUL included; cut short if smaller than
 * POLICY_DESCRIBE_MAX) and returns buf. */
#define POLICY_DESCRIBE_MAX 256
char *policy_describe(const struct policy_cfg *cfg, char *buf, size_t n);

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
