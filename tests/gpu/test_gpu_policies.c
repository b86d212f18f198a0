/* Every policy GPU sequences run (StreamingLLM, TOVA, H2O, SnapKV and PyramidKV evicting
 * while decoding, Ada-KV's per-head budgets, CAKE with SnapKV's pooling, the mean alone, the
 * variance alone and the last query, CAKE and SnapKV keeping runs) against a host twin fed
 * the same keys, values and queries: the same budgets, the same tokens kept after the prompt
 * and after every decode step (up to near-ties of the float scores: StreamingLLM's positions
 * exactly; TOVA one token set for every kv head; Ada-KV's heads the same counts within a
 * token or two, the layer's total exactly, holes where cake_head_holes says; runs from the
 * engine's own indicator exactly, from caked's scores within a run or so, since a near-tie
 * there moves a whole run), the bytes where caked's account says, the window intact. Exit 77
 * without a GPU. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "dtype.h"
#include "../integration/harness.h"
#include "gputest.h"

enum { L = 3, H = 8, HKV = 2, D = 64, N = 900, W = 16, C = 160, STEPS = 6, T = N + STEPS };
enum { ROW = D * 2 };

static uint16_t Ko[L][HKV][T][D], Vo[L][HKV][T][D], Q[L][H][W][D], Qd[STEPS][L][H][D];

static void fill(void)
{
    for (int l = 0; l < L; l++) {
        for (int g = 0; g < HKV; g++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < D; j++) { /* a few loud keys: the rankings have a head */
                    Ko[l][g][t][j] = kern_f32_to_bf16(gauss() * (mix(t * 31 + l) % 23 == 0 ? 2.5f : 1.0f));
                    Vo[l][g][t][j] = kern_f32_to_bf16(gauss());
                }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                for (int j = 0; j < D; j++)
                    Q[l][h][i][j] = kern_f32_to_bf16(gauss() * (1.0f + 0.5f * l));
        for (int s = 0; s < STEPS; s++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < D; j++)
                    Qd[s][l][h][j] = kern_f32_to_bf16(gauss() * (1.0f + 0.5f * l));
    }
}

/* caked's positions of (l, g) checked against the bytes, holes (Ada-KV) exactly where
 * cake_head_holes says; pos keeps the tokens' positions. Returns their count. */
static uint32_t account(cake_seq *s, int l, int g, uint32_t *pos)
{
    uint32_t n = 0, real = 0, first = 0, holes = cake_head_holes(s, l, g, &first);
    CHECK(cake_kept_positions(s, l, g, pos, T, &n) == 0, "positions");
    uint16_t k[D], v[D];
    for (uint32_t i = 0; i < n && !fails; i++) {
        int hole = i >= first && i - first < holes;
        CHECK(hole == (pos[i] == CAKE_NO_POSITION), "layer %d head %d slot %u: position %u, "
              "holes %u from %u", l, g, i, pos[i], holes, first);
        if (hole)
            continue;
        get(s, k, cake_key(s, l, g, i), ROW);
        get(s, v, cake_value(s, l, g, i), ROW);
        CHECK(pos[i] < T && !memcmp(k, Ko[l][g][pos[i]], ROW) && !memcmp(v, Vo[l][g][pos[i]], ROW),
              "layer %d head %d slot %u: not position %u's bytes", l, g, i, pos[i]);
        pos[real++] = pos[i];
    }
    return real;
}

struct pcase {
    const char *name;
    enum cake_policy_kind kind;
    enum cake_indicator ind;
    enum cake_pool pool;
    uint32_t pool_kernel;
    enum cake_decode decode;
    int exact;  /* no float ranking: the same tokens, exactly */
    uint32_t runs;  /* run_width */
    int submit; /* the engine's own indicator (cake_prefill_submit), the same floats for both */
};

static float Ind[L][HKV][N];

static cake_seq *open_one(cake_ctx *c, const struct pcase *pc, int gpu)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = C, pol.window = W, pol.kind = pc->kind, pol.indicator = pc->ind;
    pol.pool = pc->pool, pol.pool_kernel = pc->pool_kernel, pol.decode = pc->decode;
    pol.run_width = pc->runs;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = gpu ? CAKE_PLACE_GPU : CAKE_PLACE_HOST};
    cake_seq *s = NULL;
    int rc = cake_seq_open(c, &lay, &pol, N, STEPS, &s);
    CHECK(rc == 0, "%s: open (%s): %s (%s)", pc->name, gpu ? "GPU" : "host", cake_strerror(rc),
          cake_errstr(c));
    return s;
}

/* GPU against host, every layer and head: equal counts, kept sets within near-ties */
static double compare(const struct pcase *pc, cake_seq *gs, cake_seq *hs, const char *when,
                      int exact)
{
    static uint32_t pg[T], ph[T], p0[T];
    double worst = 1;
    int per_head = pc->kind == CAKE_POLICY_ADAKV; /* counts follow the float scores too */
    for (int l = 0; l < L && !fails; l++) {
        CHECK(cake_layer_budget(gs, l) == cake_layer_budget(hs, l), "%s %s layer %d: budget GPU %u, "
              "host %u", pc->name, when, l, cake_layer_budget(gs, l), cake_layer_budget(hs, l));
        uint32_t sum_g = 0, sum_h = 0;
        for (int g = 0; g < HKV && !fails; g++) {
            uint32_t ng = account(gs, l, g, pg), nh = account(hs, l, g, ph);
            sum_g += ng, sum_h += nh;
            CHECK(per_head ? ng <= nh + 2 && nh <= ng + 2 : ng == nh,
                  "%s %s layer %d head %d: GPU holds %u, host %u", pc->name, when, l, g, ng, nh);
            if (per_head ? ng > nh + 2 || nh > ng + 2 : ng != nh)
                return 0;
            double o = overlap(pg, ng, ph, nh);
            worst = o < worst ? o : worst;
            if (exact)
                CHECK(!memcmp(pg, ph, 4 * ng), "%s %s layer %d head %d: not the same tokens",
                      pc->name, when, l, g);
            if (pc->kind == CAKE_POLICY_TOVA && g == 0)
                memcpy(p0, pg, 4 * ng);
            else if (pc->kind == CAKE_POLICY_TOVA)
                CHECK(!memcmp(p0, pg, 4 * ng), "%s %s layer %d: kv heads keep different sets",
                      pc->name, when, l);
        }
        CHECK(sum_g == sum_h, "%s %s layer %d: GPU holds %u tokens, host %u", pc->name, when, l,
              sum_g, sum_h);
    }
    double least = pc->runs && !pc->submit ? 0.9 : 0.97;
    CHECK(worst >= least, "%s %s: GPU and host keep different tokens (overlap %.3f)", pc->name,
          when, worst);
    return worst;
}

static void run(cake_ctx *c, const struct pcase *pc)
{
    cake_seq *gs = open_one(c, pc, 1), *hs = open_one(c, pc, 0);
    if (fails)
        return;
    cake_seq *both[2] = {gs, hs};
    for (int l = 0; l < L && !fails; l++) {
        for (int k = 0; k < 2; k++) {
            cake_seq *s = both[k];
            CHECK(cake_prefill_reserve(s, l) == 0, "reserve");
            for (int g = 0; g < HKV; g++)
                for (int t = 0; t < N; t++) {
                    put(s, cake_key(s, l, g, t), Ko[l][g][t], ROW);
                    put(s, cake_value(s, l, g, t), Vo[l][g][t], ROW);
                }
            for (int h = 0; h < H; h++)
                for (int i = 0; i < W; i++)
                    put(s, cake_query_row(s, l, h, i), Q[l][h][i], ROW);
        }
        double pg = 0, ph = 0;
        int a, b;
        if (pc->submit) {
            for (int k = 0; k < 2; k++)
                memcpy(cake_indicator(both[k]), Ind[l], sizeof Ind[l]);
            a = cake_prefill_submit(gs, l, 1.0 + l), b = cake_prefill_submit(hs, l, 1.0 + l);
        } else {
            a = cake_prefill_observe(gs, l, &pg), b = cake_prefill_observe(hs, l, &ph);
        }
        CHECK(a == 0 && b == 0, "%s observe %d: %s / %s (%s)", pc->name, l, cake_strerror(a),
              cake_strerror(b), cake_errstr(c));
    }
    /* the engine's own indicator: both select from the same floats */
    double worst = compare(pc, gs, hs, "after the prompt", pc->exact || pc->submit);
    uint32_t holes = 0;
    for (int l = 0; l < L; l++)
        for (int g = 0; g < HKV; g++)
            holes += cake_head_holes(gs, l, g, NULL);
    if (pc->kind == CAKE_POLICY_ADAKV) /* the heads split each layer unevenly */
        CHECK(holes > 0, "%s: no holes on the GPU", pc->name);
    else
        CHECK(holes == 0, "%s: %u holes", pc->name, holes);
    /* the prompt's kept prefix: whole runs of consecutive positions, but for the two ends'
     * clipped ones and the last one cut */
    if (pc->runs)
        for (int l = 0; l < L && !fails; l++)
            for (int g = 0; g < HKV; g++) {
                static uint32_t pos[T];
                uint32_t n = account(gs, l, g, pos), b = cake_layer_budget(gs, l), runs = 0;
                for (uint32_t i = 0; i < b && i < n; i++)
                    runs += i == 0 || pos[i] != pos[i - 1] + 1;
                CHECK(runs <= b / pc->runs + 3, "%s layer %d head %d: %u "
                      "tokens in %u runs", pc->name, l, g, b, runs);
            }
    for (int st = 0; st < STEPS && !fails; st++) {
        for (int k = 0; k < 2 && !fails; k++) {
            cake_seq *s = both[k];
            CHECK(cake_decode_step(c, &s, 1) == 0, "%s step %d: %s", pc->name, st, cake_errstr(c));
            for (int l = 0; l < L && !fails; l++) {
                uint32_t slot = cake_layer_tokens(s, l) - 1;
                for (int g = 0; g < HKV; g++) {
                    put(s, cake_key(s, l, g, slot), Ko[l][g][N + st], ROW);
                    put(s, cake_value(s, l, g, slot), Vo[l][g][N + st], ROW);
                }
                CHECK(cake_put_decode_query(s, l, Qd[st][l], NULL) == 0, "decode query");
            }
        }
        if (cudaDeviceSynchronize() != cudaSuccess)
            fails++;
        char when[32];
        snprintf(when, sizeof when, "after step %d", st);
        double o = compare(pc, gs, hs, when, pc->exact);
        worst = o < worst ? o : worst;
    }
    printf("%-22s GPU = host: budgets equal, kept sets overlap >= %.3f%s, through %d decode steps\n",
           pc->name, worst, pc->exact ? " (exact)" : pc->submit ? " (exact after the prompt)" : "",
           STEPS);
    cake_seq_close(gs), cake_seq_close(hs);
}

int main(void)
{
    rng = 4242;
    if (!gputest_has_gpu()) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    fill();
    for (int l = 0; l < L; l++)
        for (int g = 0; g < HKV; g++)
            for (int j = 0; j < N; j++)
                Ind[l][g][j] = (float)gauss();
    struct harness h;
    const char *extra[] = {"--gpu-pool", "256M", NULL};
    if (harness_start(&h, extra)) {
        fprintf(stderr, "FAIL: caked did not start with a GPU pool\n");
        return 1;
    }
    cake_ctx *c = harness_client(h.sock, "policies", 1, 0);
    if (!c || !cake_gpu_pool_base_at(c, 0)) {
        fprintf(stderr, "FAIL: connect / GPU pool\n");
        return 1;
    }
    static const struct pcase cases[] = {
        {"streamingllm", CAKE_POLICY_STREAMINGLLM, 0, 0, 0, 0, 1, 0, 0},
        {"tova", CAKE_POLICY_TOVA, 0, 0, 0, 0, 0, 0, 0},
        {"h2o", CAKE_POLICY_H2O, 0, 0, 0, 0, 0, 0, 0},
        {"snapkv (decode evict)", CAKE_POLICY_SNAPKV, 0, 0, 0, CAKE_DECODE_EVICT, 0, 0, 0},
        {"pyramidkv (evict)", CAKE_POLICY_PYRAMIDKV, 0, 0, 0, CAKE_DECODE_EVICT, 0, 0, 0},
        {"adakv", CAKE_POLICY_ADAKV, 0, 0, 0, 0, 0, 0, 0},
        {"cake pool=max7", CAKE_POLICY_CAKE, 0, CAKE_POOL_MAX, 7, 0, 0, 0, 0},
        {"cake ind=mean", CAKE_POLICY_CAKE, CAKE_IND_MEAN, 0, 0, 0, 0, 0, 0},
        {"cake ind=var", CAKE_POLICY_CAKE, CAKE_IND_VAR, 0, 0, 0, 0, 0, 0},
        {"cake ind=last", CAKE_POLICY_CAKE, CAKE_IND_LAST, CAKE_POOL_NONE, 0, 0, 0, 0, 0},
        {"cake runs=9", CAKE_POLICY_CAKE, 0, 0, 0, 0, 0, 9, 0},
        {"snapkv runs=15 (evict)", CAKE_POLICY_SNAPKV, 0, 0, 0, CAKE_DECODE_EVICT, 0, 15, 0},
        {"cake runs=15 submitted", CAKE_POLICY_CAKE, 0, 0, 0, 0, 0, 15, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && !fails; i++)
        run(c, &cases[i]);
    cake_destroy(c);
    if (harness_stop(&h)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        fails++;
    }
    printf("%s\n", fails ? "FAILED" : "GPU policies: every one keeps what the host keeps");
    return fails ? 1 : 0;
}
