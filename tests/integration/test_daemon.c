/* caked end to end: several engine processes at once, each checking that budgets, token
 * counts and the compacted K/V bytes in the pool equal what the in-process core computes
 * on the same data, through prefill (observe and submit), cascading and decode eviction. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include "cakeseq.h"
#include "evict.h"
#include "harness.h"
#include "kern.h"
#include "synth.h"

#define FAILF(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); return 1; } while (0)
#define OK(x) do { int rc_ = (x); if (rc_) FAILF("%s: %s (%s)", #x, cake_strerror(rc_), cake_errstr(ctx)); } while (0)

struct mirror {
    uint32_t L, H, Hkv, d, n, w, cap;
    uint16_t **k, **v, **ring; /* per layer: [Hkv][cap][d], same, [H][w][d] */
    uint32_t *tokens;
};

static struct kern_kv view(struct mirror *m, uint32_t l, void **page)
{
    *page = m->k[l];
    return (struct kern_kv){KERN_BF16, m->Hkv, m->d, m->cap, m->tokens[l], page,
                            (size_t)((char *)m->v[l] - (char *)m->k[l])};
}

static int compare(struct mirror *m, cake_seq *s, uint32_t upto, const char *when)
{
    for (uint32_t l = 0; l < upto; l++) {
        if (cake_layer_tokens(s, l) != m->tokens[l])
            FAILF("%s: layer %u holds %u tokens in caked, %u in process", when, l,
                  cake_layer_tokens(s, l), m->tokens[l]);
        for (uint32_t g = 0; g < m->Hkv; g++)
            for (uint32_t t = 0; t < m->tokens[l]; t++) {
                size_t at = ((size_t)g * m->cap + t) * m->d;
                if (memcmp(cake_key(s, l, g, t), m->k[l] + at, m->d * 2) ||
                    memcmp(cake_value(s, l, g, t), m->v[l] + at, m->d * 2))
                    FAILF("%s: layer %u head %u slot %u: K/V bytes differ", when, l, g, t);
            }
    }
    return 0;
}

static int engine(const char *sock, int mode, int submit, uint64_t seed)
{
    srand((unsigned)seed);
    struct synth_cfg sc = {4, 8, 2, 32, 500 + (uint32_t)(rand() % 400), 16, seed};
    uint32_t C = 48 + (uint32_t)(rand() % 64), max_new = 40;
    struct mirror m = {sc.layers, sc.q_heads, sc.kv_heads, sc.head_dim, sc.n, sc.window,
                       sc.n + max_new, NULL, NULL, NULL, NULL};
    cake_ctx *ctx;
    cake_create(&ctx);
    char name[32];
    snprintf(name, sizeof name, "engine-%llu", (unsigned long long)seed);
    OK(cake_set_service(ctx, name));
    OK(cake_connect(ctx, sock, 1));
    struct cake_layout lay = {.layers = m.L, .q_heads = m.H, .kv_heads = m.Hkv, .head_dim = m.d,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.mode = (enum cake_mode)mode, pol.cache_size = C, pol.window = m.w;
    pol.tau1 = 0.8f, pol.tau2 = 1.5f;
    cake_seq *s;
    OK(cake_seq_open(ctx, &lay, &pol, m.n, max_new, &s));
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, m.L, C);
    cfg.mode = (enum policy_mode)mode, cfg.window = m.w, cfg.tau1 = 0.8f, cfg.tau2 = 1.5f;
    cfg.model_dtype = KERN_BF16;
    struct cakeseq *cs;
    if (cakeseq_create(&cfg, m.Hkv, m.n, &cs, NULL))
        FAILF("cakeseq_create");
    m.k = calloc(m.L, sizeof(*m.k)), m.v = calloc(m.L, sizeof(*m.v));
    m.ring = calloc(m.L, sizeof(*m.ring)), m.tokens = calloc(m.L, sizeof(uint32_t));
    uint32_t S = m.n - m.w;
    float *ind = malloc(sizeof(float) * m.Hkv * S);
    uint16_t *kt = malloc((size_t)m.Hkv * m.n * m.d * 2), *vt = malloc((size_t)m.Hkv * m.n * m.d * 2);
    void *scratch = malloc((size_t)4 * m.d * m.cap);
    for (uint32_t l = 0; l < m.L; l++) {
        m.k[l] = calloc((size_t)m.Hkv * m.cap * m.d * 2, 2); /* K then V in one block */
        m.v[l] = m.k[l] + (size_t)m.Hkv * m.cap * m.d;
        m.ring[l] = calloc((size_t)m.H * m.w * m.d, 2);
        OK(cake_prefill_reserve(s, l));
        synth_layer(&sc, l, kt, vt, m.ring[l], NULL);
        for (uint32_t g = 0; g < m.Hkv; g++)
            for (uint32_t t = 0; t < m.n; t++) {
                memcpy(m.k[l] + ((size_t)g * m.cap + t) * m.d, kt + ((size_t)g * m.n + t) * m.d, m.d * 2);
                memcpy(m.v[l] + ((size_t)g * m.cap + t) * m.d, vt + ((size_t)g * m.n + t) * m.d, m.d * 2);
                memcpy(cake_key(s, l, g, t), kt + ((size_t)g * m.n + t) * m.d, m.d * 2);
                memcpy(cake_value(s, l, g, t), vt + ((size_t)g * m.n + t) * m.d, m.d * 2);
            }
        memcpy(cake_queries(s, l), m.ring[l], (size_t)m.H * m.w * m.d * 2);
        m.tokens[l] = m.n;
        void *page;
        struct kern_kv kv = view(&m, l, &page);
        struct kern_score_args a = {
            .q = m.ring[l], .q_dtype = KERN_BF16, .q_heads = m.H, .n_q = m.w, .kv = &kv,
            .n_scored = S, .gamma = cfg.gamma,
            .stats = mode ? KERN_STATS_FP32 : KERN_STATS_REF, .round_dtype = KERN_BF16, .n_threads = 2,
        };
        struct kern_score_out o = {.indicator = ind};
        if (kern_score_layer(&a, &o))
            FAILF("kern_score_layer, layer %u", l);
        double P = policy_preference(&cfg, o.entropy, o.variance), Pd = -1;
        if (submit) {
            memcpy(cake_indicator(s), ind, sizeof(float) * m.Hkv * S);
            OK(cake_prefill_submit(s, l, P));
        } else {
            OK(cake_prefill_observe(s, l, &Pd));
            if (Pd != P)
                FAILF("layer %u: caked's preference %.9g, in process %.9g", l, Pd, P);
        }
        struct cakeseq_evict ev[8];
        uint32_t nev;
        if (cakeseq_prefill_layer(cs, l, P, ind, ev, &nev))
            FAILF("cakeseq_prefill_layer, layer %u", l);
        for (uint32_t e = 0; e < nev; e++) {
            void *pg;
            struct kern_kv kx = view(&m, ev[e].layer, &pg);
            uint32_t win = m.tokens[ev[e].layer] - ev[e].old_prefix;
            for (uint32_t g = 0; g < m.Hkv; g++)
                kern_compact_head(&kx, g, ev[e].slots + (size_t)g * ev[e].kept, ev[e].kept,
                                  ev[e].old_prefix, win, scratch);
            m.tokens[ev[e].layer] = ev[e].kept + win;
        }
        for (uint32_t x = 0; x <= l; x++)
            if (cake_layer_budget(s, x) != cakeseq_budget(cs, x))
                FAILF("after layer %u: budget of layer %u is %u in caked, %u in process", l, x,
                      cake_layer_budget(s, x), cakeseq_budget(cs, x));
        char when[64];
        snprintf(when, sizeof when, "prefill layer %u", l);
        if (compare(&m, s, l + 1, when))
            return 1;
    }
    /* decode: caked evicts layers over budget before reserving the next token */
    uint32_t v0 = m.n < m.w ? m.n : m.w, decoded = 0;
    uint16_t *q = malloc((size_t)m.H * m.w * m.d * 2), row[64];
    uint32_t *slots = malloc(sizeof(uint32_t) * m.Hkv * m.cap);
    float *ind2 = malloc(sizeof(float) * m.Hkv * m.cap), lse0[256] = {0};
    /* before the first decode step no token has a ring slot: the prompt's rows are not
     * overwritten by a decode query or log-sum-exp written too early */
    if (m.H > 256 || cake_decode_slot(s, 0) != UINT32_MAX || cake_decode_query(s, 0) ||
        cake_put_decode_query(s, 0, q, NULL) != CAKE_EINVAL ||
        cake_put_decode_lse(s, 0, lse0, NULL) != CAKE_EINVAL)
        FAILF("a decode slot before the first decode step (%u)", cake_decode_slot(s, 0));
    for (int step = 0; step < 30; step++) {
        OK(cake_decode_step(ctx, &s, 1));
        for (uint32_t l = 0; l < m.L; l++) {
            uint32_t budget = cakeseq_budget(cs, l);
            if (decoded && policy_decode_should_evict(&cfg, budget, m.tokens[l])) {
                uint32_t valid = v0 + decoded < m.w ? v0 + decoded : m.w;
                for (uint32_t h = 0; h < m.H; h++)
                    for (uint32_t i = 0; i < valid; i++)
                        memcpy(q + ((size_t)h * valid + i) * m.d,
                               m.ring[l] + ((size_t)h * m.w + (v0 + decoded - valid + i) % m.w) * m.d, m.d * 2);
                void *pg;
                struct kern_kv kx = view(&m, l, &pg);
                int kept = evict_decode_select(&cfg, budget, &kx, q, NULL, KERN_BF16, m.H, valid, slots, ind2, 1);
                if (kept < 0)
                    FAILF("evict_decode_select, layer %u", l);
                uint32_t Sx = m.tokens[l] - m.w;
                for (uint32_t g = 0; g < m.Hkv; g++)
                    kern_compact_head(&kx, g, slots + (size_t)g * kept, (uint32_t)kept, Sx, m.w, scratch);
                m.tokens[l] = (uint32_t)kept + m.w;
            }
            m.tokens[l]++;
            uint32_t t = m.tokens[l] - 1;
            for (uint32_t g = 0; g < m.Hkv; g++) {
                for (uint32_t x = 0; x < m.d; x++)
                    row[x] = kern_f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
                memcpy(m.k[l] + ((size_t)g * m.cap + t) * m.d, row, m.d * 2);
                memcpy(cake_key(s, l, g, t), row, m.d * 2);
                for (uint32_t x = 0; x < m.d; x++) /* V unlike K: a K/V swap shows */
                    row[x] = kern_f32_to_bf16((float)(rand() % 2001 - 1000) / 250.0f);
                memcpy(m.v[l] + ((size_t)g * m.cap + t) * m.d, row, m.d * 2);
                memcpy(cake_value(s, l, g, t), row, m.d * 2);
            }
            uint8_t *dq = cake_decode_query(s, l);
            uint32_t slot = (v0 + decoded) % m.w;
            for (uint32_t h = 0; h < m.H; h++) {
                for (uint32_t x = 0; x < m.d; x++)
                    row[x] = kern_f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
                memcpy(m.ring[l] + ((size_t)h * m.w + slot) * m.d, row, m.d * 2);
                memcpy(dq + (size_t)h * m.w * m.d * 2, row, m.d * 2);
            }
        }
        decoded++;
        char when[64];
        snprintf(when, sizeof when, "decode step %d", step);
        if (compare(&m, s, m.L, when))
            return 1;
    }
    OK(cake_seq_close(s));
    cake_destroy(ctx);
    cakeseq_destroy(cs);
    return 0;
}

static void run_engines(int n, const int *modes, const int *submits)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0, "caked did not start");
    pid_t pids[8];
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        if (pids[i] == 0)
            _exit(engine(h.sock, modes[i], submits[i], (uint64_t)getpid() * 7919u + (uint64_t)i));
    }
    for (int i = 0; i < n; i++) {
        int st;
        waitpid(pids[i], &st, 0);
        cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "engine %d (mode %d, submit %d) failed",
                  i, modes[i], submits[i]);
    }
    unsigned long long used;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &used, &seqs), 0);
    cr_expect_eq(used, 0, "pages still in use after every engine closed: %llu", used);
    cr_expect_eq(seqs, 0);
    cr_expect_eq(harness_stop(&h), 0, "caked did not exit cleanly");
}

Test(daemon, three_engines_fixed_mode_match_the_core, .timeout = 120)
{
    int modes[3] = {1, 1, 1}, submits[3] = {0, 1, 0};
    run_engines(3, modes, submits);
}

Test(daemon, three_engines_parity_mode_match_the_core, .timeout = 120)
{
    int modes[3] = {0, 0, 0}, submits[3] = {0, 0, 1};
    run_engines(3, modes, submits);
}
