/* score.c - CAKE window scoring on the CPU (see kern.h for the contract).
 *
 * The w x n attention block is never stored. Work is cut into items of one kv head and
 * CHUNK key columns; each item tiles its columns TILE at a time and computes the logits
 * of all the group's query rows against the tile (a small GEMM, keys converted once per
 * tile). Two passes: the first finds each row's max and exp-sum (online softmax), merged
 * across items in a fixed order; the second recomputes the logits, forms probabilities
 * and accumulates the column statistics. Recomputing costs a second GEMM but keeps the
 * memory at O(TILE) per thread and every core busy; results do not depend on how many
 * threads ran (partial sums are reduced in item order). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_BF16_DP 1
#endif

#include "fastmath.h"
#include "kern.h"

#define TILE 64     /* key columns per GEMM tile: 64 x head_dim f32 stays in L1 */
#define CHUNK 2048  /* columns per work item: enough items for many cores */

/* vector width in floats and vectors per register block: match the ISA, since GCC lowers
 * wider generic vectors than the target has into slow piecewise code */
#if defined(__AVX512F__)
#define VW 16
#define NB 4
#elif defined(__AVX__)
#define VW 8
#define NB 2
#else
#define VW 4
#define NB 2
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
/* the same with 4-byte alignment, for loads and stores at any float address (a memcpy
 * into a vf goes through the stack in halves and stalls store forwarding) */
typedef float vfu __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));

static inline int omp_thread(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

struct item {
    uint32_t g;
    uint32_t j0, j1;
};

/* z[r][t] = q[r] . kt[.][t] for R rows, t < TILE. */
static void gemm_tile(const float *restrict q, uint32_t R, uint32_t d,
                      const float *restrict kt, float *restrict z)
{
    for (uint32_t cb = 0; cb < TILE; cb += NB * VW) {
        uint32_t r = 0;
        for (; r + 4 <= R; r += 4) {
            vf acc[4][NB] = {{{0}}};
            const float *q0 = q + (size_t)r * d;
            for (uint32_t k = 0; k < d; k++) {
                vf b[NB];
                for (int v = 0; v < NB; v++)
                    b[v] = *(const vfu *)(kt + (size_t)k * TILE + cb + v * VW);
                for (int rr = 0; rr < 4; rr++) {
                    float s = q0[(size_t)rr * d + k];
                    for (int v = 0; v < NB; v++)
                        acc[rr][v] += b[v] * s;
                }
            }
            for (int rr = 0; rr < 4; rr++)
                for (int v = 0; v < NB; v++)
                    *(vfu *)(z + (size_t)(r + rr) * TILE + cb + v * VW) = acc[rr][v];
        }
        for (; r < R; r++) {
            vf acc[NB] = {{0}};
            const float *q0 = q + (size_t)r * d;
            for (uint32_t k = 0; k < d; k++)
                for (int v = 0; v < NB; v++)
                    acc[v] += *(const vfu *)(kt + (size_t)k * TILE + cb + v * VW) * q0[k];
            for (int v = 0; v < NB; v++)
                *(vfu *)(z + (size_t)r * TILE + cb + v * VW) = acc[v];
        }
    }
}

#ifdef HAVE_BF16_DP
/* bf16 x bf16 -> f32 with AVX512-BF16 (vdpbf16ps: two products per lane per step), for
 * bf16 queries and keys: the products are exact in f32, as in the f32 path. q holds R rows
 * of d/2 bf16 pairs, kp holds [d/2][TILE] pairs. */
static void gemm_tile_bf16(const uint32_t *restrict q, uint32_t R, uint32_t d2,
                           const uint32_t *restrict kp, float *restrict z)
{
    uint32_t r = 0;
    for (; r + 4 <= R; r += 4) {
        __m512 acc[4][4];
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++)
                acc[a][b] = _mm512_setzero_ps();
        const uint32_t *q0 = q + (size_t)r * d2;
        for (uint32_t k = 0; k < d2; k++) {
            __m512bh b[4];
            for (int v = 0; v < 4; v++)
                b[v] = (__m512bh)_mm512_loadu_si512(kp + (size_t)k * TILE + 16 * v);
            for (int rr = 0; rr < 4; rr++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)q0[(size_t)rr * d2 + k]);
                for (int v = 0; v < 4; v++)
                    acc[rr][v] = _mm512_dpbf16_ps(acc[rr][v], a, b[v]);
            }
        }
        for (int rr = 0; rr < 4; rr++)
            for (int v = 0; v < 4; v++)
                _mm512_storeu_ps(z + (size_t)(r + rr) * TILE + 16 * v, acc[rr][v]);
    }
    for (; r < R; r++) {
        __m512 acc[4];
        for (int v = 0; v < 4; v++)
            acc[v] = _mm512_setzero_ps();
        for (uint32_t k = 0; k < d2; k++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)q[(size_t)r * d2 + k]);
            for (int v = 0; v < 4; v++)
                acc[v] = _mm512_dpbf16_ps(
                    acc[v], a, (__m512bh)_mm512_loadu_si512(kp + (size_t)k * TILE + 16 * v));
        }
        for (int v = 0; v < 4; v++)
            _mm512_storeu_ps(z + (size_t)r * TILE + 16 * v, acc[v]);
    }
}

/* Loads bf16 keys [j, j + tj) of head g as [d/2][TILE] pairs (zero padded). */
static void load_keys_bf16(const struct kern_kv *kv, uint32_t g, uint32_t j, uint32_t tj,
                           uint32_t *restrict kp)
{
    uint32_t d2 = kv->head_dim / 2;
    if (tj < TILE)
        memset(kp, 0, sizeof(uint32_t) * d2 * TILE);
    for (uint32_t t = 0; t < tj; t++) {
        const uint32_t *src = kern_kv_key(kv, g, j + t); /* a tile may span pages */
        for (uint32_t k = 0; k < d2; k++)
            kp[(size_t)k * TILE + t] = src[k];
    }
}
#endif

/* Loads keys [j, j + tj) of head g (or, given slot, keys slot[0..tj)) transposed into
 * kt[d][TILE] (zero padded). */
static void load_keys(const struct kern_kv *kv, uint32_t g, uint32_t j, uint32_t tj,
                      const uint32_t *slot, float *restrict kt, float *restrict row)
{
    uint32_t d = kv->head_dim;
    if (tj < TILE)
        memset(kt, 0, sizeof(float) * d * TILE);
    for (uint32_t t = 0; t < tj; t++) { /* a tile may span pages: address each row */
        kern_to_f32(kv->dtype, kern_kv_key(kv, g, slot ? slot[t] : j + t), row, d);
        for (uint32_t k = 0; k < d; k++)
            kt[(size_t)k * TILE + t] = row[k];
    }
}

/* Next tile length from column j, bounded by end (tiles may span pages). */
static uint32_t tile_len(const struct kern_kv *kv, uint32_t j, uint32_t end)
{
    (void)kv;
    return end - j > TILE ? TILE : end - j;
}

struct ctx {
    const struct kern_score_args *a;
    uint32_t G, R, S, n, d;
    float scale;
    const float *qf;     /* [Hkv][R][d] f32 */
    const uint32_t *qp;  /* [Hkv][R][d/2] bf16 pairs when the bf16 dot path runs, else NULL */
    float *m, *l;        /* pass 1 partials, [n_items1][R]; merged into row 0 of each g */
    const float *rowm;   /* merged per-row max, [Hkv][R] */
    const float *rowl;   /* merged per-row log-sum (ln l) */
    float *ind;          /* out->indicator */
    float *perhead;      /* parity with a half dtype, or max pooling: [Hkv][G][S] */
    int per_head;        /* statistics go to perhead (pooled per head afterwards) */
    float mw, gw;        /* I0 = mw * mean + gw * var */
    double *ent, *var;   /* per pass-2 item */
};

struct scratch {
    float *kt, *z, *row;
};

static int scratch_init(struct scratch *s, uint32_t R, uint32_t d)
{
    s->kt = aligned_alloc(64, sizeof(float) * ((size_t)d * TILE + 16));
    s->z = aligned_alloc(64, sizeof(float) * (size_t)R * TILE);
    s->row = malloc(sizeof(float) * d);
    if (!s->kt || !s->z || !s->row) {
        free(s->kt), free(s->z), free(s->row);
        return -ENOMEM;
    }
    return 0;
}

static void scratch_free(struct scratch *s)
{
    free(s->kt), free(s->z), free(s->row);
}

/* z <- logits (unscaled) of the group's R rows against keys [j, j + tj) of head g. */
static void logits_tile(const struct ctx *c, uint32_t g, uint32_t j, uint32_t tj,
                        struct scratch *s)
{
#ifdef HAVE_BF16_DP
    if (c->qp) {
        load_keys_bf16(c->a->kv, g, j, tj, (uint32_t *)s->kt);
        gemm_tile_bf16(c->qp + (size_t)g * c->R * (c->d / 2), c->R, c->d / 2,
                       (const uint32_t *)s->kt, s->z);
        return;
    }
#endif
    load_keys(c->a->kv, g, j, tj, NULL, s->kt, s->row);
    gemm_tile(c->qf + (size_t)g * c->R * c->d, c->R, c->d, s->kt, s->z);
}

static void pass1_item(const struct ctx *c, const struct item *it, float *m, float *l,
                       struct scratch *s)
{
    const struct kern_kv *kv = c->a->kv;
    uint32_t nq = c->a->n_q;
    for (uint32_t r = 0; r < c->R; r++)
        m[r] = -INFINITY, l[r] = 0.0f;
    for (uint32_t j = it->j0; j < it->j1;) {
        uint32_t tj = tile_len(kv, j, it->j1);
        logits_tile(c, it->g, j, tj, s);
        for (uint32_t r = 0; r < c->R; r++) {
            uint32_t i = r % nq;
            uint32_t lim = c->n - nq + i + 1; /* row sees keys < lim */
            if (j >= lim)
                continue;
            uint32_t te = lim - j < tj ? lim - j : tj;
            float *zr = s->z + (size_t)r * TILE;
            float mt = -INFINITY;
            for (uint32_t t = 0; t < te; t++) {
                zr[t] *= c->scale;
                mt = zr[t] > mt ? zr[t] : mt;
            }
            if (mt > m[r]) {
                l[r] *= expf(m[r] - mt);
                m[r] = mt;
            }
            float mr = m[r], sum = 0.0f;
            for (uint32_t t = 0; t < te; t++)
                sum += fm_expf(zr[t] - mr);
            l[r] += sum;
        }
        j += tj;
    }
}

/* Column statistics of one tile for the group's heads. mode: 0 fixed/f32, 1 parity with
 * f32 model, 2 parity with a half model dtype (rounded). */
static inline __attribute__((always_inline)) void
pass2_tile(const struct ctx *c, uint32_t g, uint32_t j, uint32_t tj, float *restrict z,
           double *ent, double *var, const int mode)
{
    uint32_t nq = c->a->n_q, G = c->G, S = c->S;
    enum kern_dtype dt = c->a->round_dtype;
    const float *M = c->rowm + (size_t)g * c->R, *LL = c->rowl + (size_t)g * c->R;
    float mw = c->mw, gw = c->gw;
    int want_var = nq >= 2;
    double e_sum = 0.0, v_sum = 0.0;

    /* probabilities in place, entropy */
    for (uint32_t r = 0; r < c->R; r++) {
        float *zr = z + (size_t)r * TILE;
        float mr = M[r], lnl = LL[r], inv = expf(-lnl);
        float acc = 0.0f;
        for (uint32_t t = 0; t < tj; t++) {
            float x = zr[t] * c->scale - mr;
            float p = fm_expf(x) * inv;
            if (mode == 0) {
                acc -= p * (x - lnl); /* ln p, without the reference's + 1e-10 */
            } else {
                if (mode == 2)
                    p = kern_round_to(dt, p);
                acc -= p * fm_logf(p + 1e-10f);
            }
            zr[t] = p;
        }
        for (uint32_t t = tj; t < TILE; t++)
            zr[t] = 0.0f; /* padding columns of a short tile */
        e_sum += acc;
    }
    /* per head: mean and unbiased variance over its nq rows */
    float mean[TILE], sq[TILE];
    for (uint32_t h = 0; h < G; h++) {
        const float *zh = z + (size_t)h * nq * TILE;
        for (uint32_t t = 0; t < TILE; t++)
            mean[t] = 0.0f, sq[t] = 0.0f;
        for (uint32_t i = 0; i < nq; i++)
            for (uint32_t t = 0; t < TILE; t++)
                mean[t] += zh[(size_t)i * TILE + t];
        for (uint32_t t = 0; t < TILE; t++)
            mean[t] /= (float)nq;
        if (want_var) {
            for (uint32_t i = 0; i < nq; i++)
                for (uint32_t t = 0; t < TILE; t++) {
                    float dlt = zh[(size_t)i * TILE + t] - mean[t];
                    sq[t] += dlt * dlt;
                }
            for (uint32_t t = 0; t < TILE; t++)
                sq[t] /= (float)(nq - 1);
        }
        float vs = 0.0f;
        if (mode == 2) {
            float *ph = c->perhead + ((size_t)g * G + h) * S + j;
            for (uint32_t t = 0; t < tj; t++) {
                float mu = kern_round_to(dt, mean[t]), v = kern_round_to(dt, sq[t]);
                vs += v;
                ph[t] = kern_round_to(dt, mw * mu + kern_round_to(dt, gw * v));
            }
        } else if (c->per_head) {
            float *ph = c->perhead + ((size_t)g * G + h) * S + j;
            for (uint32_t t = 0; t < tj; t++) {
                vs += sq[t];
                ph[t] = mw * mean[t] + gw * sq[t];
            }
        } else {
            float *ind = c->ind + (size_t)g * S + j;
            for (uint32_t t = 0; t < tj; t++) {
                vs += sq[t];
                ind[t] += mw * mean[t] + gw * sq[t];
            }
        }
        v_sum += vs;
    }
    *ent += e_sum;
    *var += v_sum;
}

static void pass2_item(const struct ctx *c, const struct item *it, double *ent, double *var,
                       struct scratch *s)
{
    const struct kern_kv *kv = c->a->kv;
    int mode = c->a->stats == KERN_STATS_FP32 ? 0 : c->a->round_dtype == KERN_F32 ? 1 : 2;
    if (mode != 2 && !c->per_head)
        memset(c->ind + (size_t)it->g * c->S + it->j0, 0, sizeof(float) * (it->j1 - it->j0));
    for (uint32_t j = it->j0; j < it->j1;) {
        uint32_t tj = tile_len(kv, j, it->j1);
        logits_tile(c, it->g, j, tj, s);
        if (mode == 0)
            pass2_tile(c, it->g, j, tj, s->z, ent, var, 0);
        else if (mode == 1)
            pass2_tile(c, it->g, j, tj, s->z, ent, var, 1);
        else
            pass2_tile(c, it->g, j, tj, s->z, ent, var, 2);
        j += tj;
    }
}

/* In place: x[j] <- (x[j-r] + ... + x[j+r]) / (2r+1) * post, zero padded. */
static void pool_avg(float *x, uint32_t S, uint32_t r, float post, float *tmp)
{
    if (r == 2) { /* CAKE's: no scratch, the common case */
        float a2 = 0.0f, a1 = 0.0f; /* originals of x[j-2], x[j-1] */
        for (uint32_t j = 0; j < S; j++) {
            float c0 = x[j];
            float p1 = j + 1 < S ? x[j + 1] : 0.0f, p2 = j + 2 < S ? x[j + 2] : 0.0f;
            x[j] = (a2 + a1 + c0 + p1 + p2) / 5.0f * post;
            a2 = a1, a1 = c0;
        }
        return;
    }
    memcpy(tmp, x, sizeof(float) * S);
    for (uint32_t j = 0; j < S; j++) {
        float acc = 0.0f;
        uint32_t lo = j > r ? j - r : 0, hi = j + r < S ? j + r : S - 1;
        for (uint32_t t = lo; t <= hi; t++)
            acc += tmp[t];
        x[j] = acc / (float)(2 * r + 1) * post;
    }
}

/* In place: x[j] <- max(x[j-r .. j+r] inside [0, S)). */
static void pool_max(float *x, uint32_t S, uint32_t r, float *tmp)
{
    memcpy(tmp, x, sizeof(float) * S);
    for (uint32_t j = 0; j < S; j++) {
        uint32_t lo = j > r ? j - r : 0, hi = j + r < S ? j + r : S - 1;
        float m = tmp[lo];
        for (uint32_t t = lo + 1; t <= hi; t++)
            m = tmp[t] > m ? tmp[t] : m;
        x[j] = m;
    }
}

static void pool_row(enum kern_pool p, float *x, uint32_t S, uint32_t r, float post, float *tmp)
{
    if (p == KERN_POOL_AVG) {
        pool_avg(x, S, r, post, tmp);
    } else {
        if (p == KERN_POOL_MAX)
            pool_max(x, S, r, tmp);
        if (post != 1.0f)
            for (uint32_t j = 0; j < S; j++)
                x[j] *= post;
    }
}

static uint32_t make_items(uint32_t Hkv, uint32_t end, struct item *out)
{
    uint32_t k = 0;
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t j = 0; j < end; j += CHUNK)
            out[k++] = (struct item){g, j, j + CHUNK < end ? j + CHUNK : end};
    return k;
}

/* Pass 1: each window row's max and log-normalizer over the keys it sees, rowml[g][r] and
 * rowml[Hkv][g][r] (ni1 items of CHUNK keys per kv head, merged in item order). 0 or
 * -ENOMEM. */
static int softmax_rows(struct ctx *c, struct item *items, uint32_t ni1, int nt, float *rowml)
{
    uint32_t Hkv = c->a->kv->kv_heads;
    int fail = 0;
    make_items(Hkv, c->n, items);
#pragma omp parallel num_threads(nt) if (ni1 > 1)
    {
        struct scratch s;
        if (scratch_init(&s, c->R, c->d)) {
#pragma omp atomic write
            fail = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (uint32_t k = 0; k < ni1; k++)
                pass1_item(c, &items[k], c->m + (size_t)k * c->R, c->l + (size_t)k * c->R, &s);
            scratch_free(&s);
        }
    }
    if (fail)
        return -ENOMEM;
    /* merge the per-item softmax partials in item order */
    uint32_t per_g = ni1 / Hkv;
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t r = 0; r < c->R; r++) {
            float M = -INFINITY;
            for (uint32_t k = 0; k < per_g; k++)
                M = fmaxf(M, c->m[(size_t)(g * per_g + k) * c->R + r]);
            double L = 0.0;
            for (uint32_t k = 0; k < per_g; k++) {
                size_t at = (size_t)(g * per_g + k) * c->R + r;
                if (c->l[at] > 0.0f)
                    L += (double)c->l[at] * exp((double)c->m[at] - M);
            }
            rowml[(size_t)g * c->R + r] = M;
            rowml[(size_t)Hkv * c->R + (size_t)g * c->R + r] = (float)log(L);
        }
    return 0;
}

int kern_score_lse(const struct kern_score_args *a, float *lse)
{
    const struct kern_kv *kv = a->kv;
    if (!kv || !a->q || !lse || kv->kv_heads == 0 || a->q_heads % kv->kv_heads || a->n_q == 0 ||
        kv->head_dim == 0 || kv->tokens_per_page == 0 || a->n_q > kv->n_tokens)
        return -EINVAL;
    struct ctx c = {
        .a = a, .G = a->q_heads / kv->kv_heads, .n = kv->n_tokens, .d = kv->head_dim,
        .scale = 1.0f / sqrtf((float)kv->head_dim),
    };
    c.R = c.G * a->n_q;
    uint32_t Hkv = kv->kv_heads, ni1 = Hkv * ((c.n + CHUNK - 1) / CHUNK);
    int rc = -ENOMEM;
    float *qf = malloc(sizeof(float) * (size_t)Hkv * c.R * c.d);
    struct item *items = malloc(sizeof(*items) * ni1);
    float *ml = malloc(sizeof(float) * 2 * ((size_t)ni1 * c.R + 1));
    float *rowml = malloc(sizeof(float) * 2 * (size_t)Hkv * c.R);
    if (!qf || !items || !ml || !rowml)
        goto out;
#ifdef HAVE_BF16_DP
    if (a->q_dtype == KERN_BF16 && kv->dtype == KERN_BF16 && c.d % 2 == 0)
        c.qp = a->q;
#endif
    if (!c.qp)
        kern_to_f32(a->q_dtype, a->q, qf, (size_t)a->q_heads * a->n_q * c.d);
    c.qf = qf, c.m = ml, c.l = ml + (size_t)ni1 * c.R;
    if ((rc = softmax_rows(&c, items, ni1, kern_threads(a->n_threads), rowml)))
        goto out;
    for (size_t r = 0; r < (size_t)Hkv * c.R; r++) /* [Hkv][R] is [q_heads][n_q] */
        lse[r] = rowml[r] + rowml[(size_t)Hkv * c.R + r];
out:
    free(qf), free(items), free(ml), free(rowml);
    return rc;
}

int kern_lse_carry(const struct kern_score_args *a, const float *lse, const uint32_t *kept, uint32_t k,
                   float *out)
{
    const struct kern_kv *kv = a->kv;
    uint32_t S = a->n_scored;
    if (!kv || !a->q || !lse || !out || (k && !kept) || kv->kv_heads == 0 || a->q_heads % kv->kv_heads ||
        a->n_q == 0 || kv->head_dim == 0 || kv->tokens_per_page == 0 || S > kv->n_tokens || k > S)
        return -EINVAL;
    uint32_t Hkv = kv->kv_heads, d = kv->head_dim, R = a->q_heads / Hkv * a->n_q;
    for (uint32_t g = 0; g < Hkv; g++) /* ascending and below S: the walk below relies on it */
        for (uint32_t i = 0; i < k; i++)
            if (kept[(size_t)g * k + i] >= S || (i && kept[(size_t)g * k + i] <= kept[(size_t)g * k + i - 1]))
                return -EINVAL;
    float *qf = malloc(sizeof(float) * (size_t)a->q_heads * a->n_q * d), scale = 1.0f / sqrtf((float)d);
    double *sum = malloc(sizeof(double) * R);
    struct scratch s;
    int rc = -ENOMEM, have_s = 0;
    if (!qf || !sum || !(have_s = !scratch_init(&s, R, d)))
        goto out;
    kern_to_f32(a->q_dtype, a->q, qf, (size_t)a->q_heads * a->n_q * d);
    for (uint32_t g = 0; g < Hkv; g++) {
        const uint32_t *kp = kept + (size_t)g * k;
        const float *L = lse + (size_t)g * R;
        uint32_t slot[TILE], tj = 0, at = 0;
        for (uint32_t r = 0; r < R; r++)
            sum[r] = 0.0;
        for (uint32_t j = 0; j <= S; j++) { /* the removed slots, TILE at a time: kept's complement */
            if (j < S && at < k && kp[at] == j) {
                at++;
                continue;
            }
            if (j < S)
                slot[tj++] = j;
            if (tj == TILE || (j == S && tj)) {
                load_keys(kv, g, 0, tj, slot, s.kt, s.row);
                gemm_tile(qf + (size_t)g * R * d, R, d, s.kt, s.z);
                for (uint32_t r = 0; r < R; r++)
                    for (uint32_t t = 0; t < tj; t++)
                        sum[r] += exp((double)s.z[(size_t)r * TILE + t] * scale - L[r]);
                tj = 0;
            }
        }
        for (uint32_t r = 0; r < R; r++) /* L before out: out may be lse */
            out[(size_t)g * R + r] = sum[r] <= 0.5 ? L[r] + (float)log1p(-sum[r]) : NAN;
    }
    rc = 0;
out:
    free(qf), free(sum);
    if (have_s)
        scratch_free(&s);
    return rc;
}

int kern_score_layer(const struct kern_score_args *a, struct kern_score_out *out)
{
    const struct kern_kv *kv = a->kv;
    if (!kv || !a->q || !out || kv->kv_heads == 0 || a->q_heads % kv->kv_heads ||
        a->n_q == 0 || kv->head_dim == 0 || kv->tokens_per_page == 0 ||
        a->n_q > kv->n_tokens || a->n_scored > kv->n_tokens - a->n_q ||
        (a->n_scored && !out->indicator) || a->pool > KERN_POOL_NONE ||
        (a->pool_kernel && a->pool_kernel % 2 == 0))
        return -EINVAL;
    uint32_t pr = a->pool_kernel ? a->pool_kernel / 2 : 2; /* pooling radius */
    struct ctx c = {
        .a = a, .G = a->q_heads / kv->kv_heads, .S = a->n_scored, .n = kv->n_tokens,
        .d = kv->head_dim, .scale = 1.0f / sqrtf((float)kv->head_dim), .ind = out->indicator,
    };
    c.R = c.G * a->n_q;
    uint32_t Hkv = kv->kv_heads;
    out->entropy = 0.0, out->variance = 0.0;
    if (c.S == 0)
        return 0;
    int nt = kern_threads(a->n_threads);
    int mode2 = a->stats == KERN_STATS_REF && a->round_dtype != KERN_F32;
    c.per_head = !mode2 && a->pool == KERN_POOL_MAX; /* max does not commute with the mean */
    c.mw = a->var_only ? 0.0f : 1.0f, c.gw = a->var_only ? 1.0f : a->gamma;
    uint32_t ni1 = Hkv * ((c.n + CHUNK - 1) / CHUNK), ni2 = Hkv * ((c.S + CHUNK - 1) / CHUNK);
    int rc = -ENOMEM;

    float *qf = malloc(sizeof(float) * (size_t)Hkv * c.R * c.d);
    if (a->lse) /* the engine's normalizers: no first pass */
        ni1 = 0;
    struct item *items = malloc(sizeof(*items) * (ni1 > ni2 ? ni1 : ni2));
    float *ml = malloc(sizeof(float) * 2 * ((size_t)ni1 * c.R + 1));
    float *rowml = malloc(sizeof(float) * 2 * (size_t)Hkv * c.R);
    double *acc = calloc(2 * (size_t)ni2, sizeof(double));
    int ph = mode2 || c.per_head;
    float *perhead = ph ? malloc(sizeof(float) * (size_t)a->q_heads * c.S) : NULL;
    float *ptmp = malloc(sizeof(float) * ((size_t)kern_threads(a->n_threads) * c.S + 1));
    if (!qf || !items || !ml || !rowml || !acc || (ph && !perhead) || !ptmp)
        goto out;
#ifdef HAVE_BF16_DP
    if (a->q_dtype == KERN_BF16 && kv->dtype == KERN_BF16 && c.d % 2 == 0)
        c.qp = a->q; /* [H][nq][d] bf16 is already [Hkv][R][d/2] pairs */
#endif
    /* queries of head h = g*G + hl, row i -> qf[g][hl*nq + i] (the repeat_kv grouping) */
    if (!c.qp)
        kern_to_f32(a->q_dtype, a->q, qf, (size_t)a->q_heads * a->n_q * c.d);
    c.qf = qf, c.m = ml, c.l = ml + (size_t)ni1 * c.R, c.perhead = perhead;

    int fail = 0;
    if (a->lse) { /* [q_heads][n_q] is [Hkv][R]: row r = hl * nq + i of group g (as qf) */
        memcpy(rowml, a->lse, sizeof(float) * (size_t)Hkv * c.R);
        memset(rowml + (size_t)Hkv * c.R, 0, sizeof(float) * (size_t)Hkv * c.R);
    } else if (softmax_rows(&c, items, ni1, nt, rowml)) {
        goto out;
    }
    c.rowm = rowml, c.rowl = rowml + (size_t)Hkv * c.R;

    make_items(Hkv, c.S, items);
    c.ent = acc, c.var = acc + ni2;
#pragma omp parallel num_threads(nt) if (ni2 > 1)
    {
        struct scratch s;
        if (scratch_init(&s, c.R, c.d)) {
#pragma omp atomic write
            fail = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (uint32_t k = 0; k < ni2; k++)
                pass2_item(&c, &items[k], &c.ent[k], &c.var[k], &s);
            scratch_free(&s);
        }
    }
    if (fail)
        goto out;

    /* pooling and the group mean */
    if (!ph) { /* the group's heads were summed: pool the sum (linear) */
#pragma omp parallel for num_threads(nt) if (Hkv > 1)
        for (uint32_t g = 0; g < Hkv; g++)
            pool_row(a->pool, c.ind + (size_t)g * c.S, c.S, pr, 1.0f / (float)c.G,
                     ptmp + (size_t)omp_thread() * c.S);
    } else if (!mode2) {
#pragma omp parallel for num_threads(nt) if (Hkv > 1)
        for (uint32_t g = 0; g < Hkv; g++) {
            float *ind = c.ind + (size_t)g * c.S;
            memset(ind, 0, sizeof(float) * c.S);
            for (uint32_t h = 0; h < c.G; h++) {
                float *x = perhead + ((size_t)g * c.G + h) * c.S;
                pool_row(a->pool, x, c.S, pr, 1.0f, ptmp + (size_t)omp_thread() * c.S);
                for (uint32_t j = 0; j < c.S; j++)
                    ind[j] += x[j];
            }
            for (uint32_t j = 0; j < c.S; j++)
                ind[j] /= (float)c.G;
        }
    } else {
        enum kern_dtype dt = a->round_dtype;
        for (uint32_t g = 0; g < Hkv; g++) {
            float *ind = c.ind + (size_t)g * c.S;
            memset(ind, 0, sizeof(float) * c.S);
            for (uint32_t h = 0; h < c.G; h++) {
                float *x = perhead + ((size_t)g * c.G + h) * c.S;
                pool_row(a->pool, x, c.S, pr, 1.0f, ptmp);
                for (uint32_t j = 0; j < c.S; j++)
                    ind[j] += kern_round_to(dt, x[j]);
            }
            for (uint32_t j = 0; j < c.S; j++)
                ind[j] = kern_round_to(dt, ind[j] / (float)c.G);
        }
    }
    double E = 0.0, V = 0.0;
    for (uint32_t k = 0; k < ni2; k++)
        E += c.ent[k], V += c.var[k];
    if (mode2)
        V = kern_round_to(a->round_dtype, (float)V);
    out->entropy = E, out->variance = V;
    rc = 0;
out:
    free(qf), free(items), free(ml), free(rowml), free(acc), free(perhead), free(ptmp);
    return rc;
}
