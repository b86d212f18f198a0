/* kern.h - CAKE's portable C kernels: window scoring, top-k selection, compaction.
 *
 * These are the reference for the CUDA kernels (the kernels/ .cu files) and the CPU path of the
 * daemon. They read keys and values in the pool's page layout (proto/README.md):
 * a page holds tokens_per_page tokens of one (sequence, layer), K then V, each laid out
 * [kv_head][token][head_dim]. A plain contiguous [kv_head][n][head_dim] tensor is the
 * special case of one page with tokens_per_page = n.
 *
 * Thread-safety: every function is reentrant; callers share nothing but read-only inputs.
 * Functions taking n_threads spread work over that many OpenMP threads (<= 0: all). */
#ifndef CAKE_KERN_H
#define CAKE_KERN_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

/* Threads a kernel uses for a request of n (<= 0: every core OpenMP offers). */
int kern_threads(int n);

/* One layer's K and V in pages. Token t of kv head g lives in page t / tokens_per_page. */
struct kern_kv {
    enum kern_dtype dtype;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t tokens_per_page;
    uint32_t n_tokens;        /* tokens currently held */
    void *const *pages;       /* ceil(n_tokens / tokens_per_page) page bases */
    size_t v_offset_bytes;    /* page base -> its V block; 0 when V is absent */
};

static inline size_t kern_kv_row_bytes(const struct kern_kv *kv)
{
    return (size_t)kv->head_dim * kern_dtype_size(kv->dtype);
}

/* Address of K[g][t]; V[g][t] is that plus v_offset_bytes. */
static inline void *kern_kv_key(const struct kern_kv *kv, uint32_t g, uint32_t t)
{
    uint32_t tpp = kv->tokens_per_page;
    return (char *)kv->pages[t / tpp] + ((size_t)g * tpp + t % tpp) * kern_kv_row_bytes(kv);
}

/* How statistics are rounded. */
enum kern_stats {
    KERN_STATS_FP32 = 0, /* fixed mode: probabilities and statistics in f32, sums in f64 */
    KERN_STATS_REF = 1,  /* parity mode: as the reference, rounded to round_dtype */
};

/* Pooling of the indicator along the key axis (per query head, before the group mean). */
enum kern_pool {
    KERN_POOL_AVG = 0,  /* sum of the pool_kernel neighbours / pool_kernel, zero padded (CAKE) */
    KERN_POOL_MAX = 1,  /* max over the neighbours inside [0, S) (torch max_pool1d, same pad) */
    KERN_POOL_NONE = 2,
};

/* Window scoring of one layer.
 *
 * q holds the last n_q queries of every query head, [q_heads][n_q][head_dim] in q_dtype,
 * post-RoPE. Query row i (0-based among the n_q) sees keys j <= n - n_q + i (causal
 * inside the window, everything before it). Logits are q.k / sqrt(head_dim), softmax in
 * f32 over each row. Columns j < n_scored (S) are scored:
 *   entropy   = -sum_{h,i,j<S} A ln(A + 1e-10)
 *   variance  = sum_{h,j<S} var_i(A[h,i,j])           (unbiased, n_q >= 2)
 *   I0[h,j]   = mean_i A[h,i,j] + gamma * var_i A[h,i,j]   (var term only when n_q >= 2)
 *   indicator[g,j] = mean over the group's heads of avgpool5(I0[h,.])[j]
 *                    (zero padding outside [0,S), always divided by 5)
 * The zero defaults of var_only, pool and pool_kernel give that, CAKE's indicator; the
 * baseline policies change them: var_only makes I0 = var_i A alone, pool and pool_kernel
 * (odd, 0 meaning 5) pick the pooling. Entropy and variance do not depend on them.
 * lse (optional, [q_heads][n_q] f32): each window query row's log-sum-exp, ln sum_j
 * exp(q.k_j / sqrt(head_dim)) over the keys the row sees, as an engine's own attention over
 * the prompt returns it (FlashAttention's softmax_lse): the softmax then needs no pass of its
 * own over the keys (one pass instead of two). The rows' probabilities are exp(logit - lse)
 * as given: an lse that is not the row's normalizer gives an indicator that is not CAKE's.
 * Requirements: q_heads % kv_heads == 0, n_q >= 1, S <= n - n_q.
 * The result does not depend on n_threads (fixed reduction order). */
struct kern_score_args {
    const void *q;
    enum kern_dtype q_dtype;
    uint32_t q_heads;
    uint32_t n_q;
    const struct kern_kv *kv;
    uint32_t n_scored;
    float gamma;
    enum kern_stats stats;
    enum kern_dtype round_dtype; /* KERN_STATS_REF only: the model dtype */
    int n_threads;
    int var_only;
    enum kern_pool pool;
    uint32_t pool_kernel;
    const float *lse; /* NULL: computed (the first pass) */
};

struct kern_score_out {
    double entropy;
    double variance;
    float *indicator; /* caller-owned, [kv_heads][n_scored] */
};

/* Returns 0, or -EINVAL for inconsistent arguments, -ENOMEM. */
int kern_score_layer(const struct kern_score_args *a, struct kern_score_out *out);

/* The first pass alone: each query row's log-sum-exp, lse [q_heads][n_q] f32 (natural log,
 * over the keys the row sees, as kern_score_layer's `lse` takes it; q, q_dtype, q_heads,
 * n_q, kv and n_threads of a are read). A decode step's eviction computes the newest row's
 * this way and carries the older rows' (daemon/seq_host.c). Returns 0, -EINVAL, -ENOMEM. */
int kern_score_lse(const struct kern_score_args *a, float *lse);

/* The same rows' log-sum-exps carried over an eviction: from each row's value before it
 * (lse, kern_score_lse's layout) less the removed keys' terms, lse + ln(1 - sum over the
 * removed keys e of exp(s_e - lse)), into out (the same layout; out may be lse). kept holds
 * each kv head's k kept slots, [kv_heads][k], ascending and below a->n_scored; the prefix's
 * other slots are the removed ones (the window past n_scored stays). A row whose removed keys
 * held more than half its weight gets NaN (the difference would lose its digits: compute it
 * again), as does a row whose lse is NaN. q, q_dtype, q_heads, n_q, kv and n_scored of a are
 * read. The host's twin of the GPU eviction's (kernels/evict.cu, lse_out). Returns 0,
 * -EINVAL, -ENOMEM. */
int kern_lse_carry(const struct kern_score_args *a, const float *lse, const uint32_t *kept, uint32_t k,
                   float *out);

/* Straightforward double-precision version of kern_score_layer (tests' yardstick):
 * same contract, no rounding, O(n) memory per row. */
int kern_score_layer_ref(const struct kern_score_args *a, struct kern_score_out *out);

/* A score's rank as an unsigned integer: larger score, larger key; NaN lowest (the order
 * kern_topk and the daemon's run ranking select by). */
static inline uint32_t kern_sort_key(float f)
{
    uint32_t u = kern_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Top-k of one score vector.
 * Picks the k largest of score[0..n) with ties broken by lower position (NaN ranks
 * lowest). Writes the chosen positions to idx[0..k): ascending positions when
 * order == KERN_ORDER_POSITION, else descending score (then ascending position).
 * Returns k (clamped to n). O(n) time: a radix select over the float bits. */
enum kern_order {
    KERN_ORDER_POSITION = 0,
    KERN_ORDER_SCORE = 1,
};
uint32_t kern_topk(const float *score, uint32_t n, uint32_t k, enum kern_order order,
                   uint32_t *idx);
/* The same with the caller's scratch of 2 * n uint32 (kern_topk allocates it per call). */
uint32_t kern_topk_ws(const float *score, uint32_t n, uint32_t k, enum kern_order order,
                      uint32_t *idx, uint32_t *scratch);

/* Compaction of one kv head of a layer in place.
 * Token positions keep[0..k) of the prefix move to slots 0..k-1 and the window tokens
 * [win_start, win_start + win_len) follow them in slots k..k+win_len-1, for K and for V
 * (when present). keep must hold distinct positions < win_start. Ascending keep needs no
 * scratch; any other order uses scratch (k rows of K and V, kern_kv_row_bytes each x 2).
 * Returns 0 or -EINVAL (scratch missing when needed). */
int kern_compact_head(const struct kern_kv *kv, uint32_t g, const uint32_t *keep, uint32_t k,
                      uint32_t win_start, uint32_t win_len, void *scratch);

/* out[i] = in[keep[i]] for i < k (a score vector following its tokens). in and out may be
 * the same array when keep is ascending. */
void kern_gather_f32(const float *in, const uint32_t *keep, uint32_t k, float *out);

#endif
