/* GPU-resident sequences through caked, across processes: an engine process writes K/V and
 * queries into caked's GPU pool, caked scores and compacts them there with its CUDA
 * kernels, and the engine reads back the bytes it expects.
 *
 *  - submit: the engine's own indicator (distinct values) decides exactly which tokens
 *    each layer keeps, so every byte of every layer is known; a host sequence fed the same
 *    gets the same budgets and the same bytes; again at 9000 tokens, where a stage's long
 *    rows are selected over several blocks first (test_submit_long).
 *  - observe + decode: caked scores on the GPU; budgets and kept tokens agree with a host
 *    sequence scored on the CPU (within float tolerance), every kept row is an original
 *    row in positional order, the window is intact; decode steps evict on the GPU (the
 *    prefix then in any order, each position once).
 *  - cake_decode_attention against a double-precision reference over the read-back cache.
 *  - kept positions: caked's account equals the bytes' (GPU and host), also mid-prompt,
 *    while a GPU sequence's are still on the device.
 *  - a batch: device page tables, K/V appended, attention and the decode queries into the
 *    rings in one launch per layer each, a CUDA graph (test_batch).
 *  - the engine's decode log-sum-exps (cake_put_decode_lse) taken by the eviction, the
 *    same tokens kept as without them (test_decode_lse).
 *  - decode evictions launched by caked's loop (a step of one sequence) and by its workers
 *    (a step of five) keep the same tokens (test_loop_launch); they fill holes (a prefix
 *    leaves position order, its positions still the bytes'), and every fifth step
 *    (CAKED_TEST_LAYERWISE) runs layer by layer, which puts the prefix back in order first.
 *  - layouts the GPU path does not take are refused; an engine killed while holding GPU
 *    pages gives them all back.
 * Exit 77 without a GPU. */
#include <cuda_runtime.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include "dtype.h"
#include "../integration/harness.h"
#include "gputest.h"

enum { L = 4, H = 8, HKV = 2, D = 64, N = 600, W = 32, CACHE = 128, MAXNEW = 48 };
enum { S = N - W, T = N + MAXNEW, ROW = D * 2 };

static int scattered; /* the GPU pool's free pages are scattered (fragment_gpu_pool) */

/* original rows: [L][HKV][T] rows of K and of V */
static uint16_t Ko[L][HKV][T][D], Vo[L][HKV][T][D];

static void write_token(cake_seq *s, int l, uint32_t slot, int pos)
{
    for (int g = 0; g < HKV; g++) {
        put(s, cake_key(s, l, g, slot), Ko[l][g][pos], ROW);
        put(s, cake_value(s, l, g, slot), Vo[l][g][pos], ROW);
    }
}

/* The original position of every row of (layer, g), -1 where a row is no original one
 * or its V does not match its K. */
static void positions(cake_seq *s, int l, int g, int *pos, uint32_t n)
{
    uint16_t k[D], v[D];
    for (uint32_t i = 0; i < n; i++) {
        get(s, k, cake_key(s, l, g, i), ROW);
        get(s, v, cake_value(s, l, g, i), ROW);
        pos[i] = -1;
        for (int t = 0; t < T && pos[i] < 0; t++)
            if (!memcmp(k, Ko[l][g][t], ROW))
                pos[i] = memcmp(v, Vo[l][g][t], ROW) ? -2 : t;
    }
}

/* caked's own account of the original positions (cake_kept_positions) equals what the
 * bytes say, slot for slot. */
static void check_told(cake_seq *s, int l, int g, const int *pos, uint32_t n, const char *what)
{
    static uint32_t told[N + MAXNEW];
    uint32_t tokens = 0;
    int rc = cake_kept_positions(s, l, g, told, N + MAXNEW, &tokens);
    CHECK(rc == 0 && tokens == n, "%s layer %d head %d positions: %s, %u tokens (want %u)", what,
          l, g, cake_strerror(rc), tokens, n);
    for (uint32_t i = 0; i < n && !fails; i++)
        CHECK(pos[i] >= 0 && told[i] == (uint32_t)pos[i], "%s layer %d head %d slot %u: caked "
              "says position %u, the bytes %d", what, l, g, i, told[i], pos[i]);
}

static void open_pair(cake_ctx *c, uint32_t max_new, cake_seq **gs, cake_seq **hs)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    int rc = cake_seq_open(c, &lay, &pol, N, max_new, gs);
    CHECK(rc == 0, "GPU sequence open: %s (%s)", cake_strerror(rc), cake_errstr(c));
    lay.placement = CAKE_PLACE_HOST;
    rc = cake_seq_open(c, &lay, &pol, N, max_new, hs);
    CHECK(rc == 0, "host sequence open: %s", cake_strerror(rc));
    CHECK(cake_seq_on_gpu(*gs) && !cake_seq_on_gpu(*hs), "placements");
}

static void fill_pattern(void)
{
    for (int l = 0; l < L; l++)
        for (int g = 0; g < HKV; g++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < D; j++) {
                    uint64_t x = mix(((uint64_t)l << 48) | ((uint64_t)g << 40) | ((uint64_t)t << 16) | j);
                    Ko[l][g][t][j] = (uint16_t)x, Vo[l][g][t][j] = (uint16_t)(x >> 16);
                }
}

static void fill_random(void)
{
    for (int l = 0; l < L; l++)
        for (int g = 0; g < HKV; g++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < D; j++) {
                    Ko[l][g][t][j] = kern_f32_to_bf16(gauss());
                    Vo[l][g][t][j] = kern_f32_to_bf16(gauss());
                }
}

/* ind[0..n) a random permutation of 0..n-1: an indicator without ties */
static void permutation(float *ind, int n)
{
    for (int t = 0; t < n; t++)
        ind[t] = (float)t;
    for (int t = n - 1; t > 0; t--) {
        int u = (int)(unif() * (t + 1));
        float x = ind[t];
        ind[t] = ind[u], ind[u] = x;
    }
}

/* submit: the engine's indicator decides; every byte is predictable */
static void test_submit(cake_ctx *c)
{
    fill_pattern();
    cake_seq *gs, *hs;
    open_pair(c, 0, &gs, &hs);
    if (fails)
        return;
    static float ind[L][HKV][S];
    for (int l = 0; l < L; l++) {
        CHECK(cake_prefill_reserve(gs, l) == 0 && cake_prefill_reserve(hs, l) == 0, "reserve %d", l);
        for (int t = 0; t < N; t++) {
            write_token(gs, l, t, t);
            write_token(hs, l, t, t);
        }
        for (int g = 0; g < HKV; g++)
            permutation(ind[l][g], S);
        memcpy(cake_indicator(gs), ind[l], sizeof ind[l]);
        memcpy(cake_indicator(hs), ind[l], sizeof ind[l]);
        double pref = 0.5 + (double)(mix((uint64_t)l) % 100) / 40.0;
        int a = cake_prefill_submit(gs, l, pref), b = cake_prefill_submit(hs, l, pref);
        CHECK(a == 0 && b == 0, "submit %d: %s / %s (%s)", l, cake_strerror(a), cake_strerror(b),
              cake_errstr(c));
    }
    int evicted = 0;
    for (int l = 0; l < L && !fails; l++) {
        uint32_t n = cake_layer_tokens(gs, l), k = n - W;
        CHECK(cake_layer_budget(gs, l) == cake_layer_budget(hs, l) && n == cake_layer_tokens(hs, l),
              "layer %d: GPU budget %u tokens %u, host %u %u", l, cake_layer_budget(gs, l), n,
              cake_layer_budget(hs, l), cake_layer_tokens(hs, l));
        evicted += n < N;
        for (int g = 0; g < HKV; g++) {
            /* expected: the k largest indicator values in positional order, then the window */
            int want[N], got[N], hgot[N];
            char keep[S] = {0};
            for (uint32_t i = 0; i < k; i++) {
                int best = -1;
                for (int t = 0; t < S; t++)
                    if (!keep[t] && (best < 0 || ind[l][g][t] > ind[l][g][best]))
                        best = t;
                keep[best] = 1;
            }
            uint32_t m = 0;
            for (int t = 0; t < S; t++)
                if (keep[t])
                    want[m++] = t;
            for (int t = S; t < N; t++)
                want[m++] = t;
            positions(gs, l, g, got, n);
            positions(hs, l, g, hgot, n);
            for (uint32_t i = 0; i < n; i++) {
                CHECK(got[i] == want[i], "GPU layer %d head %d slot %u holds %d, want %d", l, g, i,
                      got[i], want[i]);
                CHECK(hgot[i] == want[i], "host layer %d head %d slot %u holds %d, want %d", l, g,
                      i, hgot[i], want[i]);
                if (fails > 8)
                    return;
            }
        }
    }
    CHECK(evicted == L, "every layer should have been compacted (%d were)", evicted);
    CHECK(cake_seq_close(gs) == 0 && cake_seq_close(hs) == 0, "close");
    printf("submit: %d layers compacted in the GPU pool byte for byte as predicted\n", L);
}

/* submit at a length whose stages select over rows of thousands of slots: a long row's top-k
 * runs over several blocks before the stage's one launch (kern_cuda_compact_split, a cluster
 * a row on Hopper), and the result must be the same bytes as the host's. Rows carry their
 * position in K's first two elements (the rest a hash), so no table of the originals. */
enum { NL = 9000, LL = 2, SL = NL - W };
static void long_row(int l, int g, int t, uint16_t *k, uint16_t *v)
{
    k[0] = (uint16_t)t, k[1] = (uint16_t)(t >> 16);
    for (int j = 0; j < D; j++) {
        uint64_t x = mix(((uint64_t)l << 48) | ((uint64_t)g << 40) | ((uint64_t)t << 8) | (uint64_t)j);
        if (j >= 2)
            k[j] = (uint16_t)x;
        v[j] = (uint16_t)(x >> 16);
    }
}

static void test_submit_long(cake_ctx *c)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = LL, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    cake_seq *sq[2] = {NULL, NULL}; /* GPU, host */
    int rc = cake_seq_open(c, &lay, &pol, NL, 0, &sq[0]);
    lay.placement = CAKE_PLACE_HOST;
    int rc2 = cake_seq_open(c, &lay, &pol, NL, 0, &sq[1]);
    CHECK(rc == 0 && rc2 == 0, "long sequences open: %s / %s (%s)", cake_strerror(rc), cake_strerror(rc2),
          cake_errstr(c));
    if (fails)
        return;
    static float ind[LL][HKV][SL];
    uint16_t k[D], v[D];
    for (int l = 0; l < LL && !fails; l++) {
        for (int g = 0; g < HKV; g++)
            permutation(ind[l][g], SL);
        double pref = 0.5 + l;
        for (int i = 0; i < 2; i++) {
            CHECK(cake_prefill_reserve(sq[i], l) == 0, "long reserve %d", l);
            for (int t = 0; t < NL; t++)
                for (int g = 0; g < HKV; g++) {
                    long_row(l, g, t, k, v);
                    put(sq[i], cake_key(sq[i], l, g, t), k, ROW);
                    put(sq[i], cake_value(sq[i], l, g, t), v, ROW);
                }
            memcpy(cake_indicator(sq[i]), ind[l], sizeof ind[l]);
            rc = cake_prefill_submit(sq[i], l, pref);
            CHECK(rc == 0, "long submit %d: %s (%s)", l, cake_strerror(rc), cake_errstr(c));
        }
    }
    for (int l = 0; l < LL && !fails; l++) {
        uint32_t n = cake_layer_tokens(sq[0], l), kk = n - W;
        CHECK(n == cake_layer_tokens(sq[1], l) && n < NL, "long layer %d: GPU %u tokens, host %u", l, n,
              cake_layer_tokens(sq[1], l));
        for (int g = 0; g < HKV && !fails; g++) {
            /* expected: the kk largest values (SL - kk and up) in positional order, the window */
            for (int i = 0; i < 2; i++) {
                uint32_t at = 0;
                for (int t = 0; t < NL && !fails; t++) {
                    if (t < SL && ind[l][g][t] < (float)(SL - kk))
                        continue;
                    long_row(l, g, t, k, v);
                    uint16_t gk[D], gv[D];
                    get(sq[i], gk, cake_key(sq[i], l, g, at), ROW);
                    get(sq[i], gv, cake_value(sq[i], l, g, at), ROW);
                    CHECK(!memcmp(gk, k, ROW) && !memcmp(gv, v, ROW), "%s long layer %d head %d slot %u: "
                          "position %u there, want %d", i ? "host" : "GPU", l, g, at,
                          gk[0] | (uint32_t)gk[1] << 16, t);
                    at++;
                }
                CHECK(at == n, "long layer %d head %d: %u rows expected, %u kept", l, g, at, n);
            }
        }
    }
    CHECK(cake_seq_close(sq[0]) == 0 && cake_seq_close(sq[1]) == 0, "long close");
    if (!fails)
        printf("submit at %d tokens: %d layers compacted in the GPU pool as the host's, byte for byte "
               "(stages over rows of %d slots)\n", NL, LL, SL);
}

/* the share of a's entries found in b, in any order (positions may be -1) */
static double overlap_any(const int *a, uint32_t na, const int *b, uint32_t nb)
{
    uint32_t same = 0;
    for (uint32_t i = 0; i < na; i++)
        for (uint32_t j = 0; j < nb; j++)
            same += a[i] == b[j];
    return na ? (double)same / na : 1.0;
}

/* every row original, strictly increasing positions, the newest `recent` rows the newest
 * positions; with any_prefix the rows before those may be in any order (a decode step's one
 * launch fills holes), each once and older than them. Returns whether they were out of
 * order. */
static int check_rows(const int *pos, uint32_t n, int newest, uint32_t recent, const char *what, int l,
                      int any_prefix)
{
    static char seen[T];
    int unordered = 0;
    memset(seen, 0, sizeof seen);
    for (uint32_t i = 0; i < n; i++) {
        CHECK(pos[i] >= 0, "%s layer %d slot %u is not an original row (%d)", what, l, i, pos[i]);
        int up = i == 0 || pos[i] > pos[i - 1];
        if (any_prefix && i + recent < n) {
            unordered |= !up;
            CHECK(pos[i] < 0 || (pos[i] <= newest - (int)recent && !seen[pos[i]]), "%s layer %d: "
                  "slot %u holds position %d twice or after the window", what, l, i, pos[i]);
            if (pos[i] >= 0 && pos[i] < T)
                seen[pos[i]] = 1;
        } else {
            CHECK(up, "%s layer %d: positions out of order at slot %u", what, l, i);
        }
    }
    for (uint32_t i = 0; i < recent; i++)
        CHECK(pos[n - 1 - i] == newest - (int)i, "%s layer %d: slot %u holds %d, the window wants %d",
              what, l, n - 1 - i, pos[n - 1 - i], newest - (int)i);
    return unordered;
}

static void write_queries(cake_seq *s, int l, const uint16_t *q /* [H][W][D] */)
{
    int rc = cake_put_queries(s, l, q, W, NULL);
    CHECK(rc == 0, "queries of layer %d: %s", l, cake_strerror(rc));
    if (cake_seq_on_gpu(s))
        CU(cudaDeviceSynchronize());
}

/* Decode attention in doubles over layer l of s as read back from the pool (cake_key,
 * cake_value): q [H][D] bf16 -> ref [H][D]. */
static void ref_attention(cake_seq *s, int l, const uint16_t *q, double ref[H][D])
{
    static uint16_t kr[N + MAXNEW][D], vr[N + MAXNEW][D];
    uint32_t n = cake_layer_tokens(s, l);
    for (int g = 0; g < HKV; g++) {
        for (uint32_t t = 0; t < n; t++) {
            get(s, kr[t], cake_key(s, l, g, t), ROW);
            get(s, vr[t], cake_value(s, l, g, t), ROW);
        }
        for (int h = g * (H / HKV); h < (g + 1) * (H / HKV); h++) {
            double m = -1e300, z = 0, acc[D] = {0}, sc[N + MAXNEW];
            for (uint32_t t = 0; t < n; t++) {
                double dot = 0;
                for (int j = 0; j < D; j++)
                    dot += (double)kern_bf16_to_f32(q[h * D + j]) * kern_bf16_to_f32(kr[t][j]);
                sc[t] = dot / sqrt((double)D);
                m = sc[t] > m ? sc[t] : m;
            }
            for (uint32_t t = 0; t < n; t++) {
                double p = exp(sc[t] - m);
                z += p;
                for (int j = 0; j < D; j++)
                    acc[j] += p * kern_bf16_to_f32(vr[t][j]);
            }
            for (int j = 0; j < D; j++)
                ref[h][j] = acc[j] / z;
        }
    }
}

static void test_observe_decode(cake_ctx *c)
{
    fill_random();
    cake_seq *gs, *hs;
    open_pair(c, MAXNEW, &gs, &hs);
    if (fails)
        return;
    if (scattered) { /* the rings really are pages apart (in a one-run ring they follow) */
        int apart = 0;
        for (int l = 1; l < L; l++)
            apart |= (uint8_t *)cake_query_row(gs, l, 0, 0) - (uint8_t *)cake_query_row(gs, l - 1, 0, 0) !=
                     65536;
        CHECK(apart, "the GPU rings are one run of pages in a fragmented pool");
    }
    static uint16_t q[H][W][D];
    double max_rel = 0;
    for (int l = 0; l < L; l++) {
        CHECK(cake_prefill_reserve(gs, l) == 0 && cake_prefill_reserve(hs, l) == 0, "reserve %d", l);
        for (int t = 0; t < N; t++) {
            write_token(gs, l, t, t);
            write_token(hs, l, t, t);
        }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                for (int j = 0; j < D; j++)
                    q[h][i][j] = kern_f32_to_bf16(gauss() * (1.0f + (float)l)); /* layers differ */
        write_queries(gs, l, &q[0][0][0]);
        write_queries(hs, l, &q[0][0][0]);
        double pg = 0, ph = 0;
        int a = cake_prefill_observe(gs, l, &pg), b = cake_prefill_observe(hs, l, &ph);
        CHECK(a == 0 && b == 0, "observe %d: %s / %s (%s)", l, cake_strerror(a), cake_strerror(b),
              cake_errstr(c));
        double rel = fabs(pg - ph) / (fabs(ph) + 1e-12);
        max_rel = rel > max_rel ? rel : max_rel;
        CHECK(rel < 1e-3, "layer %d preference: GPU %.9g, host %.9g", l, pg, ph);
        for (int m = 0; m <= l && l < L - 1 && !fails; m++) { /* mid-prompt: the stages' slots
                                     (out of position order) and their positions, still on the GPU */
            static int pm[N + MAXNEW];
            uint32_t nm = cake_layer_tokens(gs, m);
            for (int g = 0; g < HKV; g++) {
                positions(gs, m, g, pm, nm);
                check_told(gs, m, g, pm, nm, "GPU mid-prompt");
            }
        }
    }
    uint32_t sum_g = 0, sum_h = 0;
    double worst = 1;
    static int pg[N + MAXNEW], ph[N + MAXNEW];
    for (int l = 0; l < L && !fails; l++) {
        uint32_t bg = cake_layer_budget(gs, l), bh = cake_layer_budget(hs, l);
        sum_g += bg, sum_h += bh;
        CHECK(bg + 2 >= bh && bh + 2 >= bg, "layer %d budget: GPU %u, host %u", l, bg, bh);
        uint32_t ng = cake_layer_tokens(gs, l), nh = cake_layer_tokens(hs, l);
        for (int g = 0; g < HKV; g++) {
            positions(gs, l, g, pg, ng);
            positions(hs, l, g, ph, nh);
            check_told(gs, l, g, pg, ng, "GPU observe");
            check_told(hs, l, g, ph, nh, "host observe");
            check_rows(pg, ng, N - 1, W, "GPU", l, 0);
            double o = overlap_any(pg, ng - W, ph, nh - W);
            worst = o < worst ? o : worst;
        }
    }
    CHECK(sum_g == sum_h, "total budget: GPU %u, host %u", sum_g, sum_h);
    CHECK(worst >= 0.95, "kept prefix tokens agree with the CPU's for %.1f%% only", 100 * worst);
    printf("observe: preferences within %.2g (relative) of the CPU's, budgets sum %u, kept tokens "
           "%.1f%% the CPU's\n", max_rel, sum_g, 100 * worst);

    /* decode: both sequences in one step; the GPU one evicts on the GPU */
    cake_seq *both[2] = {gs, hs};
    uint16_t qd[H][D];
    for (int step = 0; step < MAXNEW && !fails; step++) {
        int rc = cake_decode_step(c, both, 2);
        CHECK(rc == 0, "decode step %d: %s (%s)", step, cake_strerror(rc), cake_errstr(c));
        for (int l = 0; l < L; l++) {
            write_token(gs, l, cake_layer_tokens(gs, l) - 1, N + step);
            write_token(hs, l, cake_layer_tokens(hs, l) - 1, N + step);
            for (int h = 0; h < H; h++)
                for (int j = 0; j < D; j++)
                    qd[h][j] = kern_f32_to_bf16(gauss());
            CHECK(cake_put_decode_query(gs, l, qd, NULL) == 0, "decode query %d", l);
            CHECK(cake_put_decode_query(hs, l, qd, NULL) == 0, "decode query %d", l);
            CU(cudaDeviceSynchronize());
        }
    }
    worst = 1;
    for (int l = 0; l < L && !fails; l++) {
        uint32_t ng = cake_layer_tokens(gs, l), nh = cake_layer_tokens(hs, l);
        CHECK(ng <= cake_layer_budget(gs, l) + W + 1, "layer %d holds %u tokens over budget %u + w + 1",
              l, ng, cake_layer_budget(gs, l));
        CHECK(ng + 2 >= nh && nh + 2 >= ng, "layer %d after decode: GPU %u tokens, host %u", l, ng, nh);
        for (int g = 0; g < HKV; g++) {
            positions(gs, l, g, pg, ng);
            positions(hs, l, g, ph, nh);
            check_told(gs, l, g, pg, ng, "GPU decode");
            check_told(hs, l, g, ph, nh, "host decode");
            check_rows(pg, ng, T - 1, W + 1, "GPU decode", l, 1);
            double o = overlap_any(pg, ng, ph, nh);
            worst = o < worst ? o : worst;
        }
    }
    CHECK(worst >= 0.9, "after decode, kept tokens agree with the CPU's for %.1f%% only", 100 * worst);
    printf("decode: %d steps, layers evicted on the GPU to their budgets, kept tokens %.1f%% the "
           "CPU's\n", MAXNEW, 100 * worst);

    /* decode attention straight from the GPU pool against doubles over the read-back cache */
    static uint16_t qa[L][H][D];
    static float out[L][H][D];
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            for (int j = 0; j < D; j++)
                qa[l][h][j] = kern_f32_to_bf16(gauss());
    void *q_dev = NULL;
    float *o_dev = NULL;
    CU(cudaMalloc(&q_dev, sizeof qa));
    CU(cudaMalloc((void **)&o_dev, sizeof out));
    CU(cudaMemcpy(q_dev, qa, sizeof qa, cudaMemcpyHostToDevice));
    int rc = cake_decode_attention(gs, q_dev, o_dev, NULL);
    CHECK(rc == 0, "cake_decode_attention: %s (%s)", cake_strerror(rc), cake_errstr(c));
    CU(cudaMemcpy(out, o_dev, sizeof out, cudaMemcpyDeviceToHost));
    CHECK(cake_decode_attention(hs, q_dev, o_dev, NULL) == CAKE_EINVAL, "attention on a host sequence");
    double max_err = 0;
    for (int l = 0; l < L && !fails; l++) {
        static double ref[H][D];
        ref_attention(gs, l, &qa[l][0][0], ref);
        for (int h = 0; h < H; h++)
            for (int j = 0; j < D; j++) {
                double e = fabs(ref[h][j] - out[l][h][j]);
                max_err = e > max_err ? e : max_err;
            }
    }
    CHECK(max_err < 2e-3, "decode attention differs from doubles by %.3g", max_err);
    printf("attention: cake_decode_attention within %.2g of doubles over the compacted cache\n", max_err);
    cudaFree(q_dev), cudaFree(o_dev);
    CHECK(cake_seq_close(gs) == 0 && cake_seq_close(hs) == 0, "close");
}

/* ns GPU sequences (CAKE's policy at CACHE, window W, MAXNEW decode tokens) prefilled
 * alike from fill_random's rows: the same K/V and window queries in every layer. 0, or -1
 * with the failure checked. */
static int open_alike(cake_ctx *c, cake_seq **s, int ns)
{
    fill_random();
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    for (int i = 0; i < ns; i++) {
        int rc = cake_seq_open(c, &lay, &pol, N, MAXNEW, &s[i]);
        CHECK(rc == 0, "GPU sequence %d open: %s (%s)", i, cake_strerror(rc), cake_errstr(c));
        if (rc)
            return -1;
    }
    static uint16_t q[H][W][D];
    for (int l = 0; l < L && !fails; l++) {
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                for (int j = 0; j < D; j++)
                    q[h][i][j] = kern_f32_to_bf16(gauss() * (1.0f + (float)l));
        for (int i = 0; i < ns; i++) {
            CHECK(cake_prefill_reserve(s[i], l) == 0, "reserve %d", l);
            for (int t = 0; t < N; t++)
                write_token(s[i], l, t, t);
            write_queries(s[i], l, &q[0][0][0]);
            CHECK(cake_prefill_observe(s[i], l, NULL) == 0, "observe %d: %s", l, cake_errstr(c));
        }
    }
    return fails ? -1 : 0;
}

/* A decode step's evictions launched by caked's loop itself (up to 4 GPU sequences with
 * work in a step) and by its workers (more): six GPU sequences given the same tokens and
 * queries, the first stepped alone, the other five in one step, keep the same tokens in
 * every layer and head after each step (the kernels are deterministic: integer atomics
 * only), and the steps did evict. */
static void test_loop_launch(cake_ctx *c, const char *sock)
{
    const char *by_loop = "caked_decode_evictions_total{by=\"loop\"}";
    const char *by_worker = "caked_decode_evictions_total{by=\"worker\"}";
    double loop0 = harness_metric(sock, by_loop), worker0 = harness_metric(sock, by_worker);
    enum { NS = 6 };
    cake_seq *s[NS];
    if (open_alike(c, s, NS))
        return;
    static int p0[N + MAXNEW], pi[N + MAXNEW];
    uint16_t qd[H][D];
    uint32_t evicted = 0, unordered = 0;
    for (int step = 0; step < MAXNEW && !fails; step++) {
        uint32_t before = cake_layer_tokens(s[0], 0);
        int a = cake_decode_step(c, s, 1), b = cake_decode_step(c, s + 1, NS - 1);
        CHECK(a == 0 && b == 0, "decode step %d: %s / %s (%s)", step, cake_strerror(a),
              cake_strerror(b), cake_errstr(c));
        evicted += cake_layer_tokens(s[0], 0) <= before; /* the new slot came with an eviction */
        for (int l = 0; l < L && !fails; l++) {
            for (int h = 0; h < H; h++)
                for (int j = 0; j < D; j++)
                    qd[h][j] = kern_f32_to_bf16(gauss());
            for (int i = 0; i < NS; i++) {
                write_token(s[i], l, cake_layer_tokens(s[i], l) - 1, N + step);
                CHECK(cake_put_decode_query(s[i], l, qd, NULL) == 0, "decode query %d", l);
            }
            uint32_t n0 = cake_layer_tokens(s[0], l);
            for (int g = 0; g < HKV && !fails; g++) {
                positions(s[0], l, g, p0, n0);
                check_told(s[0], l, g, p0, n0, "stepped alone (the loop's launch)");
                unordered += check_rows(p0, n0, N + step, W + 1, "stepped alone", l, 1);
                for (int i = 1; i < NS && !fails; i++) {
                    uint32_t ni = cake_layer_tokens(s[i], l);
                    positions(s[i], l, g, pi, ni);
                    CHECK(ni == n0 && !memcmp(p0, pi, sizeof(int) * n0), "step %d layer %d head %d: "
                          "sequence %d (five in a step: the workers') keeps other tokens than the "
                          "one stepped alone (the loop's launch): %u vs %u tokens", step, l, g, i,
                          ni, n0);
                }
            }
        }
    }
    CHECK(evicted >= MAXNEW / 2, "only %u of %d decode steps evicted in layer 0", evicted, MAXNEW);
    const char *shift = getenv("CAKED_DECODE_SHIFT");
    CHECK(unordered > 0 || (shift && !strcmp(shift, "1")), "no step filled a hole (every prefix "
          "stayed in position order)");
    printf("holes filled: a prefix out of position order in %u (layer, head, step)s; every %s "
           "step layer by layer, putting them back first\n", unordered, getenv("CAKED_TEST_LAYERWISE"));
    if (loop0 >= 0 && worker0 >= 0) { /* the two paths were taken (a launch the loop could not
                                          make without waiting goes to a worker: rare) */
        double dl = harness_metric(sock, by_loop) - loop0, dw = harness_metric(sock, by_worker) - worker0;
        CHECK(dl >= evicted / 2 && dw >= evicted, "evictions launched by the loop %.0f, on "
              "workers %.0f, over %u evicting steps", dl, dw, evicted);
        printf("caked_decode_evictions_total: %.0f launched by the loop, %.0f on workers\n", dl, dw);
    } else {
        printf("CACHECTL_BIN unset: which path each eviction took is not checked\n");
    }
    printf("decode evictions launched by the loop (one sequence a step) and by the workers (five): "
           "the same tokens kept after each of %d steps (%u evicted in layer 0)\n", MAXNEW, evicted);
    for (int i = 0; i < NS; i++)
        CHECK(cake_seq_close(s[i]) == 0, "close %d", i);
}

/* A batch of GPU sequences of different lengths: the device page tables equal the
 * descriptors' after prefill and after decode steps; one launch per layer gives every
 * sequence the doubles' attention over its read-back cache; a CUDA graph captured once
 * replays correctly after caked compacted and libcake refreshed the tables; a sequence over
 * max_tokens gets NaN rows and the others are untouched. */
enum { NB = 3 };

static void check_tables(cake_seq *s, const char *when)
{
    const int32_t *tok_d, *pg_d;
    uint32_t mp = 0;
    int rc = cake_device_tables(s, &tok_d, &pg_d, &mp);
    CHECK(rc == 0, "device tables: %s", cake_strerror(rc));
    if (rc)
        return;
    int32_t tok[L];
    int32_t *pg = malloc(sizeof(int32_t) * L * mp);
    CU(cudaMemcpy(tok, tok_d, sizeof tok, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(pg, pg_d, sizeof(int32_t) * L * mp, cudaMemcpyDeviceToHost));
    uint64_t pb = 0, vo = 0;
    cake_seq_page_layout(s, &pb, &vo);
    CHECK(vo == (uint64_t)HKV * cake_seq_tokens_per_page(s) * ROW, "V follows K: HND pages");
    for (int l = 0; l < L && !fails; l++) {
        uint32_t np = 0;
        const uint64_t *off = cake_layer_pages(s, l, &np);
        CHECK(tok[l] == (int32_t)cake_layer_tokens(s, l), "%s: layer %d device count %d, "
              "descriptor %u", when, l, tok[l], cake_layer_tokens(s, l));
        for (uint32_t i = 0; i < np; i++)
            CHECK((uint64_t)pg[l * mp + i] * pb == off[i], "%s: layer %d page %u: device %d, "
                  "offset %llu", when, l, i, pg[l * mp + i], (unsigned long long)off[i]);
    }
    free(pg);
}

static void test_batch(cake_ctx *c)
{
    fill_random();
    static const uint32_t len[NB] = {N, N / 2 + 7, 100}; /* the last under the budget */
    cake_seq *b[NB];
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    static uint16_t q[H][W][D];
    for (int i = 0; i < NB && !fails; i++) {
        int rc = cake_seq_open(c, &lay, &pol, len[i], 4, &b[i]);
        CHECK(rc == 0, "batch sequence %d: %s (%s)", i, cake_strerror(rc), cake_errstr(c));
        if (rc)
            return;
        for (int l = 0; l < L; l++) {
            CHECK(cake_prefill_reserve(b[i], l) == 0, "reserve");
            if (l == 0) /* tables made mid-prefill follow the rest */
                check_tables(b[i], "first reserve");
            for (uint32_t t = 0; t < len[i]; t++)
                write_token(b[i], l, t, (int)t);
            for (int h = 0; h < H; h++)
                for (int k = 0; k < W; k++)
                    for (int j = 0; j < D; j++)
                        q[h][k][j] = kern_f32_to_bf16(gauss());
            write_queries(b[i], l, &q[0][0][0]);
            CHECK(cake_prefill_observe(b[i], l, NULL) == 0, "observe: %s", cake_errstr(c));
        }
        check_tables(b[i], "prefill");
    }
    cake_batch *bt = NULL;
    int rc = cake_batch_create(c, b, NB, &bt);
    CHECK(rc == 0, "cake_batch_create: %s (%s)", cake_strerror(rc), cake_errstr(c));
    if (rc)
        return;
    static uint16_t qb[NB][H][D], ob[NB][H][D], og[L][NB][H][D];
    void *q_dev, *o_dev, *g_dev;
    CU(cudaMalloc(&q_dev, sizeof qb));
    CU(cudaMalloc(&o_dev, sizeof ob));
    CU(cudaMalloc(&g_dev, sizeof og));
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    /* captured once, before the decode steps; replayed after them */
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int l = 0; l < L; l++) {
        CHECK(cake_batch_attention(bt, l, q_dev, (uint16_t *)g_dev + (size_t)l * NB * H * D,
                                   N + 4, st) == 0, "captured attention of layer %d", l);
        CHECK(cake_batch_put_decode_query(bt, l, q_dev, st) == 0, "captured queries of layer %d", l);
    }
    CU(cudaStreamEndCapture(st, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    double max_err = 0;
    for (int step = 0; step < 3 && !fails; step++) {
        CHECK(cake_decode_step(c, b, NB) == 0, "decode step: %s", cake_errstr(c));
        for (int i = 0; i < NB; i++) /* layer 0 through cake_batch_append, one launch */
            for (int l = 1; l < L; l++)
                write_token(b[i], l, cake_layer_tokens(b[i], l) - 1, N + step);
        static uint16_t ka[NB][HKV][D], va[NB][HKV][D], got[D];
        for (int i = 0; i < NB; i++)
            for (int g = 0; g < HKV; g++)
                memcpy(ka[i][g], Ko[0][g][N + step], ROW), memcpy(va[i][g], Vo[0][g][N + step], ROW);
        void *kv_dev;
        CU(cudaMalloc(&kv_dev, 2 * sizeof ka));
        CU(cudaMemcpy(kv_dev, ka, sizeof ka, cudaMemcpyHostToDevice));
        CU(cudaMemcpy((uint8_t *)kv_dev + sizeof ka, va, sizeof va, cudaMemcpyHostToDevice));
        CHECK(cake_batch_append(bt, 0, kv_dev, (uint8_t *)kv_dev + sizeof ka, st) == 0, "append");
        CU(cudaStreamSynchronize(st));
        cudaFree(kv_dev);
        for (int i = 0; i < NB; i++)
            for (int g = 0; g < HKV; g++) {
                uint32_t t = cake_layer_tokens(b[i], 0) - 1;
                get(b[i], got, cake_key(b[i], 0, g, t), ROW);
                CHECK(!memcmp(got, Ko[0][g][N + step], ROW), "appended K of sequence %d head %d", i, g);
                get(b[i], got, cake_value(b[i], 0, g, t), ROW);
                CHECK(!memcmp(got, Vo[0][g][N + step], ROW), "appended V of sequence %d head %d", i, g);
            }
        for (int i = 0; i < NB; i++)
            check_tables(b[i], "decode");
        for (int i = 0; i < NB; i++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < D; j++)
                    qb[i][h][j] = kern_f32_to_bf16(gauss());
        CU(cudaMemcpy(q_dev, qb, sizeof qb, cudaMemcpyHostToDevice));
        CU(cudaGraphLaunch(exec, st));
        CU(cudaStreamSynchronize(st));
        for (int i = 0; i < NB; i++) /* the replay put each query at this step's ring slot */
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H && !fails; h++) {
                    static uint16_t row[D];
                    uint32_t slot = cake_decode_slot(b[i], l);
                    CHECK(slot < W, "sequence %d layer %d: no decode slot", i, l);
                    get(b[i], row, cake_query_row(b[i], l, h, slot), ROW);
                    CHECK(!memcmp(row, qb[i][h], ROW), "step %d: sequence %d layer %d head %d: "
                          "the ring's slot %u is not the query", step, i, l, h, slot);
                }
        for (int l = 0; l < L && !fails; l++) {
            CHECK(cake_batch_attention(bt, l, q_dev, o_dev, 0, st) == 0, "attention: %s",
                  cake_errstr(c));
            CU(cudaStreamSynchronize(st));
            CU(cudaMemcpy(ob, o_dev, sizeof ob, cudaMemcpyDeviceToHost));
            CU(cudaMemcpy(og[l], (uint16_t *)g_dev + (size_t)l * NB * H * D, sizeof ob,
                          cudaMemcpyDeviceToHost));
            CHECK(!memcmp(ob, og[l], sizeof ob), "step %d layer %d: the graph's replay differs "
                  "from a direct call", step, l);
            for (int i = 0; i < NB; i++) {
                static double ref[H][D];
                ref_attention(b[i], l, &qb[i][0][0], ref);
                for (int h = 0; h < H; h++)
                    for (int j = 0; j < D; j++) {
                        double e = fabs(ref[h][j] - kern_bf16_to_f32(ob[i][h][j]));
                        max_err = e > max_err ? e : max_err;
                    }
            }
        }
    }
    CHECK(max_err < 1.5e-2, "batched attention differs from doubles by %.3g", max_err);
    /* a bound below the longest sequence: its rows NaN, the others as before */
    uint32_t t0 = cake_layer_tokens(b[0], 0), t2 = cake_layer_tokens(b[2], 0);
    CHECK(t2 < t0, "the batch's lengths differ (%u, %u)", t0, t2);
    CHECK(cake_batch_attention(bt, 0, q_dev, o_dev, t0 - 1, st) == 0, "bounded attention");
    CU(cudaStreamSynchronize(st));
    static uint16_t on[NB][H][D];
    CU(cudaMemcpy(on, o_dev, sizeof on, cudaMemcpyDeviceToHost));
    CHECK(isnan(kern_bf16_to_f32(on[0][0][0])), "a sequence over max_tokens is not NaN");
    CHECK(!isnan(kern_bf16_to_f32(on[2][0][0])) && !memcmp(on[2], og[0][2], sizeof on[2]),
          "the others differ under a smaller bound");
    CHECK(cake_batch_attention(bt, L, q_dev, o_dev, 0, st) == CAKE_EINVAL, "layer out of range");
    CHECK(cake_batch_put_decode_query(bt, L, q_dev, st) == CAKE_EINVAL, "queries: layer out of range");
    printf("batch: %d GPU sequences (%u, %u, %u prompt tokens), device tables equal the "
           "descriptors, one launch per layer within %.2g of doubles, a CUDA graph replays "
           "after caked compacted and puts each step's queries in their ring slots\n", NB, len[0], len[1], len[2], max_err);
    cudaGraphExecDestroy(exec), cudaGraphDestroy(graph), cudaStreamDestroy(st);
    cudaFree(q_dev), cudaFree(o_dev), cudaFree(g_dev);
    cake_batch_destroy(bt);
    for (int i = 0; i < NB; i++)
        CHECK(cake_seq_close(b[i]) == 0, "close");
}

static void test_refusals(cake_ctx *c)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    cake_seq *s = NULL;
    struct cake_layout f32 = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_F32, .placement = CAKE_PLACE_GPU};
    struct cake_layout odd = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 72,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    struct cake_layout ok = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                             .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    CHECK(cake_seq_open(c, &f32, &pol, 100, 0, &s) == CAKE_EINVAL, "f32 on the GPU accepted");
    CHECK(cake_seq_open(c, &odd, &pol, 100, 0, &s) == CAKE_EINVAL, "head_dim 72 on the GPU accepted");
    pol.mode = CAKE_MODE_PARITY;
    CHECK(cake_seq_open(c, &ok, &pol, 100, 0, &s) == CAKE_EINVAL, "parity mode on the GPU accepted");
    pol.mode = CAKE_MODE_FIXED, pol.pool_kernel = 65;
    CHECK(cake_seq_open(c, &ok, &pol, 100, 0, &s) == CAKE_EINVAL, "a 65-wide pooling accepted");
    pol.pool_kernel = 0;
    /* every policy and ablation runs there: the full cache, Ada-KV, the variance alone */
    static const enum cake_policy_kind kinds[] = {CAKE_POLICY_FULL, CAKE_POLICY_ADAKV, CAKE_POLICY_CAKE};
    for (int i = 0; i < 3; i++) {
        pol.kind = kinds[i], pol.indicator = i == 2 ? CAKE_IND_VAR : CAKE_IND_DEFAULT;
        CHECK(cake_seq_open(c, &ok, &pol, 100, 0, &s) == 0 && cake_seq_close(s) == 0,
              "policy %d on the GPU: %s", (int)kinds[i], cake_errstr(c));
    }
    ok.placement = (enum cake_placement)7;
    CHECK(cake_seq_open(c, &ok, NULL, 100, 0, &s) == CAKE_EINVAL, "placement 7 accepted");
    printf("refusals: f32, head_dim 72, parity mode, a 65-wide pooling, bad placement (full, "
           "Ada-KV, the variance alone accepted)\n");
}

/* Fills the GPU pool with one-page sequences until it refuses, then closes every other:
 * free GPU pages remain, no two adjacent. Returns how many were opened (the odd ones stay
 * open in f). */
static uint32_t fragment_gpu_pool(cake_ctx *c, cake_seq **f, uint32_t cap)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 8, pol.window = 4;
    struct cake_layout tiny = {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 16,
                               .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    uint32_t n = 0;
    int rc = 0;
    while (n < cap && !(rc = cake_seq_open(c, &tiny, &pol, 8, 0, &f[n])))
        n++;
    CHECK(rc == CAKE_EOOM && n > 64, "filling the GPU pool: %u sequences, then %s", n,
          cake_strerror(rc));
    for (uint32_t i = 0; i < n; i += 2)
        CHECK(cake_seq_close(f[i]) == 0, "close filler %u", i);
    printf("GPU pool fragmented: %u one-page sequences, every other one closed\n", n);
    return n;
}

/* The decode token's log-sum-exp per query head over layer l of s as its bytes stand (what
 * an engine's decode attention returns), in double from the bf16 rows. */
static void decode_lse(cake_seq *s, int l, const uint16_t qd[H][D], float *lse)
{
    static uint16_t kr[HKV][T][D];
    uint32_t n = cake_layer_tokens(s, l);
    for (int g = 0; g < HKV; g++)
        for (uint32_t t = 0; t < n; t++)
            get(s, kr[g][t], cake_key(s, l, g, t), ROW);
    for (int h = 0; h < H; h++) {
        int g = h / (H / HKV);
        double z[T], mx = -INFINITY, sum = 0;
        for (uint32_t t = 0; t < n; t++) {
            double dot = 0;
            for (int j = 0; j < D; j++)
                dot += (double)kern_bf16_to_f32(qd[h][j]) * kern_bf16_to_f32(kr[g][t][j]);
            z[t] = dot / sqrt((double)D), mx = fmax(mx, z[t]);
        }
        for (uint32_t t = 0; t < n; t++)
            sum += exp(z[t] - mx);
        lse[h] = (float)(mx + log(sum));
    }
}

/* cake_put_decode_lse: two GPU sequences given the same tokens and queries, the first also
 * each step's newest log-sum-exps (decode_lse, as an engine's decode attention gives them):
 * caked's eviction takes them (caked_decode_lse_layers_total grows, at most a layer a step)
 * and both keep the same tokens, to the few near-ties the two roundings can split (overlap
 * >= 0.98 every step), their positions the bytes'; a host sequence takes the call too, and
 * out-of-range calls are refused. */
static void test_decode_lse(cake_ctx *c, const char *sock)
{
    const char *given_m = "caked_decode_lse_layers_total";
    double given0 = harness_metric(sock, given_m);
    cake_seq *s[2];
    if (open_alike(c, s, 2))
        return;
    float lse[H];
    static int p0[T], p1[T];
    uint16_t qd[H][D];
    double worst = 1;
    for (int step = 0; step < MAXNEW && !fails; step++) {
        int rc = cake_decode_step(c, s, 2);
        CHECK(rc == 0, "decode step %d: %s (%s)", step, cake_strerror(rc), cake_errstr(c));
        for (int l = 0; l < L && !fails; l++) {
            for (int h = 0; h < H; h++)
                for (int j = 0; j < D; j++)
                    qd[h][j] = kern_f32_to_bf16(gauss());
            for (int i = 0; i < 2; i++) {
                write_token(s[i], l, cake_layer_tokens(s[i], l) - 1, N + step);
                CHECK(cake_put_decode_query(s[i], l, qd, NULL) == 0, "decode query %d", l);
            }
            uint32_t n0 = cake_layer_tokens(s[0], l), n1 = cake_layer_tokens(s[1], l);
            CHECK(n0 == n1, "step %d layer %d: %u tokens against %u", step, l, n0, n1);
            for (int g = 0; g < HKV && !fails; g++) {
                positions(s[0], l, g, p0, n0);
                positions(s[1], l, g, p1, n1);
                check_told(s[0], l, g, p0, n0, "given log-sum-exps");
                uint32_t a[T], b[T];
                for (uint32_t t = 0; t < n0; t++)
                    a[t] = (uint32_t)p0[t], b[t] = (uint32_t)p1[t];
                double o = overlap(a, n0, b, n1);
                worst = o < worst ? o : worst;
            }
            decode_lse(s[0], l, qd, lse);
            CHECK(cake_put_decode_lse(s[0], l, lse, NULL) == 0, "decode log-sum-exps %d: %s", l,
                  cake_errstr(c));
        }
    }
    CHECK(worst >= 0.98, "given the engine's log-sum-exps, the kept tokens overlap the computed "
          "ones' by %.3f only", worst);
    CHECK(cake_put_decode_lse(s[0], L, lse, NULL) == CAKE_EINVAL, "a layer out of range");
    CHECK(cake_put_decode_lse(s[0], 0, NULL, NULL) == CAKE_EINVAL, "no values");
    double given = harness_metric(sock, given_m) - given0;
    if (given0 >= 0) /* CACHECTL_BIN set: caked's own count */
        CHECK(given >= MAXNEW / 2 && given <= (double)MAXNEW * L, "caked took the engine's "
              "log-sum-exps in %.0f layer evictions over %d steps of %d layers", given, MAXNEW, L);
    cake_seq *hs = NULL;
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    CHECK(cake_seq_open(c, &lay, &pol, N, 2, &hs) == 0, "host sequence open");
    for (int l = 0; l < L && hs && !fails; l++) {
        CHECK(cake_prefill_reserve(hs, l) == 0, "host reserve %d", l);
        CHECK(cake_prefill_observe(hs, l, NULL) == 0, "host observe %d", l);
    }
    CHECK(hs && cake_decode_step(c, &hs, 1) == 0 && cake_put_decode_lse(hs, 0, lse, NULL) == 0 &&
              cake_decode_step(c, &hs, 1) == 0, "a host sequence's decode log-sum-exps: %s",
          cake_errstr(c));
    printf("decode log-sum-exps given (cake_put_decode_lse): kept tokens overlap the computed "
           "ones' >= %.3f over %d steps; caked took them in %.0f layer evictions\n", worst,
           MAXNEW, given);
    if (hs)
        cake_seq_close(hs);
    cake_seq_close(s[0]), cake_seq_close(s[1]);
}

/* The prefill observe caked's loop runs itself (its scoring and its stage launched and
 * polled by the loop; every even layer's stage sent on to a worker, CAKED_TEST_STAGE_ON_WORKER
 * =2, as where a context's buffers must grow) against the workers' way (a second caked with
 * CAKED_OBSERVE_ON_WORKERS=1): the same prompt in both keeps the same tokens in the same
 * slots with the same preferences and budgets, layer after layer (the kernels are
 * deterministic), and each caked's metrics say which way its observes went (the prompt's
 * first layer makes the sequence's device buffers and its last puts every layer back in
 * position order: a worker's in both). */
static int engine_paths(const char *sock_loop, const char *sock_workers)
{
    const char *socks[2] = {sock_loop, sock_workers};
    const char *by_loop = "caked_prefill_observes_total{by=\"loop\"}";
    const char *by_worker = "caked_prefill_observes_total{by=\"worker\"}";
    double m0[2][2];
    cake_ctx *c[2];
    cake_seq *s[2];
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    for (int i = 0; i < 2; i++) {
        cake_create(&c[i]);
        if (cake_connect(c[i], socks[i], 1) || !cake_gpu_pool_base_at(c[i], 0)) {
            fprintf(stderr, "connect / GPU pool: %s\n", cake_errstr(c[i]));
            return 2;
        }
        m0[i][0] = harness_metric(socks[i], by_loop), m0[i][1] = harness_metric(socks[i], by_worker);
        int rc = cake_seq_open(c[i], &lay, &pol, N, MAXNEW, &s[i]);
        CHECK(rc == 0, "open in caked %d: %s (%s)", i, cake_strerror(rc), cake_errstr(c[i]));
    }
    fill_random();
    static uint16_t q[H][W][D];
    static int p0[N + MAXNEW], p1[N + MAXNEW];
    for (int l = 0; l < L && !fails; l++) {
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                for (int j = 0; j < D; j++)
                    q[h][i][j] = kern_f32_to_bf16(gauss() * (1.0f + (float)l));
        double pref[2] = {0, 0};
        for (int i = 0; i < 2; i++) {
            CHECK(cake_prefill_reserve(s[i], l) == 0, "reserve %d", l);
            for (int t = 0; t < N; t++)
                write_token(s[i], l, t, t);
            write_queries(s[i], l, &q[0][0][0]);
            CHECK(cake_prefill_observe(s[i], l, &pref[i]) == 0, "observe %d in caked %d: %s", l,
                  i, cake_errstr(c[i]));
        }
        CHECK(pref[0] == pref[1], "layer %d preference: the loop's %.17g, the workers' %.17g", l,
              pref[0], pref[1]);
        for (int m = 0; m <= l && !fails; m++) { /* every layer so far, slot for slot */
            uint32_t n0 = cake_layer_tokens(s[0], m), n1 = cake_layer_tokens(s[1], m);
            CHECK(n0 == n1 && cake_layer_budget(s[0], m) == cake_layer_budget(s[1], m),
                  "after layer %d, layer %d: %u / %u tokens, budgets %u / %u", l, m, n0, n1,
                  cake_layer_budget(s[0], m), cake_layer_budget(s[1], m));
            for (int g = 0; g < HKV && !fails; g++) {
                positions(s[0], m, g, p0, n0);
                positions(s[1], m, g, p1, n1);
                check_told(s[0], m, g, p0, n0, "the loop's observes");
                CHECK(n0 == n1 && !memcmp(p0, p1, sizeof(int) * n0), "after layer %d, layer %d "
                      "head %d: the loop's observes keep other tokens or slots than the workers'",
                      l, m, g);
            }
        }
    }
    double d[2][2];
    for (int i = 0; i < 2; i++) {
        d[i][0] = harness_metric(socks[i], by_loop) - m0[i][0];
        d[i][1] = harness_metric(socks[i], by_worker) - m0[i][1];
    }
    if (m0[0][0] >= 0 && m0[1][0] >= 0) {
        CHECK(d[0][0] == L - 2 && d[0][1] == 2 && d[1][0] == 0 && d[1][1] == L,
              "observes by the loop / on workers: %.0f / %.0f (want %d / 2), with "
              "CAKED_OBSERVE_ON_WORKERS=1 %.0f / %.0f (want 0 / %d)", d[0][0], d[0][1], L - 2,
              d[1][0], d[1][1], L);
        printf("prefill observes: %.0f of %d launched by the loop (every other stage on a worker), "
               "0 of %d with CAKED_OBSERVE_ON_WORKERS=1\n", d[0][0], L, L);
    } else {
        printf("CACHECTL_BIN unset: which way each observe went is not checked\n");
    }
    printf("prefill observe by the loop against the workers: the same preferences, budgets and "
           "slots in all %d layers\n", L);
    for (int i = 0; i < 2; i++) {
        CHECK(cake_seq_close(s[i]) == 0, "close %d", i);
        cake_destroy(c[i]);
    }
    fflush(stdout);
    return fails ? 1 : 0;
}

static int engine(const char *sock, int crash)
{
    cake_ctx *c;
    cake_create(&c);
    if (cake_connect(c, sock, 1) || !cake_gpu_pool_base_at(c, 0)) {
        fprintf(stderr, "connect / GPU pool: %s\n", cake_errstr(c));
        return 2;
    }
    if (crash) { /* hold GPU pages, then die without a word */
        cake_seq *gs, *hs;
        open_pair(c, 8, &gs, &hs);
        for (int l = 0; l < 2; l++)
            cake_prefill_reserve(gs, l);
        raise(SIGKILL);
    }
    test_refusals(c);
    test_submit(c);
    if (!fails)
        test_submit_long(c);
    if (!fails)
        test_observe_decode(c);
    if (!fails)
        test_batch(c);
    if (!fails)
        test_loop_launch(c, sock);
    if (!fails)
        test_decode_lse(c, sock);
    if (!fails) { /* again with the GPU pool's free pages scattered: paged rings */
        static cake_seq *f[8192];
        uint32_t nf = fragment_gpu_pool(c, f, 8192);
        scattered = 1;
        test_observe_decode(c);
        for (uint32_t i = 1; i < nf; i += 2)
            CHECK(cake_seq_close(f[i]) == 0, "close filler %u", i);
    }
    cake_destroy(c);
    fflush(stdout); /* the engine leaves through _exit */
    return fails ? 1 : 0;
}

static int run_engine(const char *sock, int crash)
{
    pid_t p = fork();
    if (p == 0)
        _exit(engine(sock, crash));
    int st;
    waitpid(p, &st, 0);
    if (crash)
        return WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL ? 0 : 1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

int main(void)
{
    if (!gputest_has_gpu()) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    struct harness h;
    const char *extra[] = {"--gpu-pool", "256M", NULL};
    setenv("CAKED_TEST_LAYERWISE", "5", 0); /* every fifth step the layer-by-layer way */
    setenv("CAKED_TEST_STAGE_ON_WORKER", "2", 0); /* the loop's observes: every even layer's
                                                     stage on a worker */
    if (harness_start(&h, extra)) {
        fprintf(stderr, "FAIL: caked did not start with a GPU pool\n");
        return 1;
    }
    int rc = run_engine(h.sock, 0);
    if (rc)
        fprintf(stderr, "FAIL: the engine exited %d\n", rc);
    { /* the loop's prefill observes against a second caked's workers */
        struct harness hw;
        setenv("CAKED_OBSERVE_ON_WORKERS", "1", 1);
        int started = harness_start(&hw, extra);
        unsetenv("CAKED_OBSERVE_ON_WORKERS");
        if (started) {
            fprintf(stderr, "FAIL: a second caked did not start with a GPU pool\n");
            rc = 1;
        } else {
            pid_t p = fork();
            if (p == 0)
                _exit(engine_paths(h.sock, hw.sock));
            int st;
            waitpid(p, &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st)) {
                fprintf(stderr, "FAIL: the engine of the two paths exited %d\n",
                        WIFEXITED(st) ? WEXITSTATUS(st) : -1);
                rc = 1;
            }
            if (harness_stop(&hw)) {
                fprintf(stderr, "FAIL: the second caked did not stop cleanly\n");
                rc = 1;
            }
        }
    }
    unsigned long long used = 1, gused = 1;
    unsigned seqs = 1;
    for (int crash = 0; crash < 2; crash++) {
        if (crash && run_engine(h.sock, 1)) {
            fprintf(stderr, "FAIL: the crashing engine did not die as planned\n");
            rc = 1;
        }
        for (int i = 0; i < 100; i++) { /* caked notices the hangup on its own schedule */
            if (harness_status_gpu(&h, &used, &seqs, &gused) == 0 && !used && !gused && !seqs)
                break;
            usleep(20000);
        }
        if (used || gused || seqs) {
            fprintf(stderr, "FAIL: after %s: %llu host pages, %llu GPU pages, %u sequences held\n",
                    crash ? "a killed engine" : "the engine", used, gused, seqs);
            rc = 1;
        }
    }
    if (harness_stop(&h)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        rc = 1;
    }
    printf("%s\n", rc ? "FAILED" : "GPU sequences: caked scores and compacts in the GPU pool");
    return rc ? 1 : 0;
}
