/* Sequences (seq.c with the host executor), shard group bookkeeping (shard.c) and the
 * metrics' pieces (metrics.c), without a server: a sequence over a real pool opens, reserves,
 * prefills and decodes; its window is one run or pages mapped side by side, and reads the
 * same either way; every page, byte of caked's own memory and tenant charge comes back. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "metrics.h"
#include "seq.h"
#include "seq_int.h"
#include "shard.h"
#include "testutil.h"

struct fixture {
    struct pool pool;
    struct tenants ts;
    struct tenant *t;
    uint64_t heap_used;
    struct seq_env env;
};

static void setup(struct fixture *f, uint64_t pool_bytes)
{
    memset(f, 0, sizeof(*f));
    const char *why = NULL;
    cr_assert_eq(pool_init(&f->pool, pool_bytes, 64 << 10, 0, 0, &why), 0, "%s", why);
    int err = 0;
    cr_assert_not_null(f->t = tenant_get(&f->ts, "unit", 1000, 1, &err));
    f->env = (struct seq_env){.pool = &f->pool, .tenants = &f->ts, .threads = 1,
                              .heap_limit = pool_bytes, .heap_used = &f->heap_used};
}

static void teardown(struct fixture *f)
{
    tenants_fini(&f->ts);
    pool_fini(&f->pool);
}

static struct seq_open_args args(uint32_t L, uint32_t H, uint32_t Hkv, uint32_t n)
{
    struct seq_open_args a = {.layers = L, .q_heads = H, .kv_heads = Hkv, .head_dim = 64,
                              .dtype = KERN_BF16, .prompt_len = n, .max_new = 8};
    policy_cfg_default(&a.cfg, L, 96);
    a.cfg.mode = POLICY_FIXED, a.cfg.window = 8;
    return a;
}

/* Reserves, fills with deterministic K/V and queries, and observes layer l. */
static void prefill_layer(struct fixture *f, struct seq *s, uint32_t l)
{
    const char *why = "";
    {
        cr_assert_eq(seq_reserve(&f->env, s, l, &why), 0, "%s", why);
        for (uint32_t p = 0; p < s->layer[l].n_pages; p++) {
            uint16_t *pg = pool_ptr(&f->pool, s->layer[l].pages[p]);
            for (size_t i = 0; i < f->pool.page_bytes / 2; i++)
                pg[i] = (uint16_t)(0x3c00 + ((l * 7919u + p * 104729u + i * 31u) % 1021));
        }
        /* the host ring is where the descriptor says, inside the window */
        uint16_t *q = (uint16_t *)((uint8_t *)s->desc + s->desc->ring_offset +
                                   (uint64_t)l * s->desc->ring_layer_bytes);
        for (size_t i = 0; i < (size_t)s->H * s->cfg.window * 64; i++)
            q[i] = (uint16_t)(0x3c00 + ((l * 31u + i * 17u) % 997));
        cr_assert_eq(seq_prefill_check(s, l, &why), 0, "%s", why);
        struct seq_result r;
        seq_prefill_work(&f->env, s, l, 1, 0, &r);
        cr_assert_eq(r.rc, 0, "layer %u: %d", l, r.rc);
        seq_prefill_commit(&f->env, s, &r);
        cr_assert_eq(s->pub[l].tokens, s->layer[l].tokens, "published at commit");
    }
}

/* Opens, prefills with deterministic K/V and queries, decodes `steps`; returns a hash of
 * what every layer keeps. */
static uint64_t run(struct fixture *f, struct seq *s, uint32_t steps)
{
    const char *why = "";
    size_t row = 64 * 2;
    for (uint32_t l = 0; l < s->L; l++)
        prefill_layer(f, s, l);
    for (uint32_t st = 0; st < steps; st++) {
        cr_assert_eq(seq_decode_check(s, &why), 0, "%s", why);
        struct seq_result r = {0};
        if (seq_decode_needs_evict(s))
            seq_decode_evict_work(&f->env, s, &r);
        cr_assert_eq(r.rc, 0);
        seq_trim_pages(&f->env, s);
        struct seq *one[1] = {s};
        cr_assert_eq(seq_decode_admit(&f->env, s->tenant, one, 1, &why), 0, "%s", why);
        cr_assert_eq(seq_decode_reserve(&f->env, s), 0);
        seq_publish(&f->env, s);
        for (uint32_t l = 0; l < s->L; l++) { /* the new token's K and V, every kv head */
            uint32_t t = s->layer[l].tokens - 1;
            uint8_t *pg = pool_ptr(&f->pool, s->layer[l].pages[t / s->tpp]);
            for (uint32_t g = 0; g < s->Hkv; g++) {
                uint16_t *k = (uint16_t *)(pg + ((size_t)g * s->tpp + t % s->tpp) * row);
                uint16_t *v = (uint16_t *)((uint8_t *)k + (size_t)s->Hkv * s->tpp * row);
                for (uint32_t i = 0; i < 64; i++)
                    k[i] = (uint16_t)(0x3c00 + (st * 13u + g * 7u + i) % 1019),
                    v[i] = (uint16_t)(0x3c00 + (st * 17u + g * 5u + i) % 1013);
            }
        }
    }
    uint64_t h = 1469598103934665603ull;
    for (uint32_t l = 0; l < s->L; l++) {
        h = (h ^ s->layer[l].tokens) * 1099511628211ull;
        void *pages[64];
        struct kern_kv kv = {.dtype = KERN_BF16, .kv_heads = s->Hkv, .head_dim = 64,
                             .tokens_per_page = s->tpp, .n_tokens = s->layer[l].tokens,
                             .pages = pages};
        for (uint32_t p = 0; p < s->layer[l].n_pages; p++)
            pages[p] = pool_ptr(&f->pool, s->layer[l].pages[p]);
        for (uint32_t g = 0; g < s->Hkv; g++)
            for (uint32_t t = 0; t + 1 < kv.n_tokens; t++) {
                const uint8_t *k = (const uint8_t *)pages[t / s->tpp] +
                                   ((size_t)g * s->tpp + t % s->tpp) * row;
                for (size_t i = 0; i < row; i++)
                    h = (h ^ k[i]) * 1099511628211ull;
            }
    }
    return h;
}

Test(seq, a_host_sequence_gives_back_everything_it_took)
{
    struct fixture f;
    setup(&f, 64u << 20);
    struct seq_open_args a = args(4, 8, 2, 600);
    struct seq *s;
    const char *why = "";
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), 0, "%s", why);
    cr_assert_eq(s->desc->magic, SHM_DESC_MAGIC);
    cr_assert_eq(s->desc->layers, 4);
    cr_assert_gt(f.heap_used, 0);
    cr_assert_eq(f.t->heap_bytes, f.heap_used);
    run(&f, s, 8); /* max_new 8 */
    cr_assert_gt(f.t->used_bytes, 0);
    seq_free(&f.env, s);
    cr_assert_eq(f.pool.used, 0, "pages left: %u", f.pool.used);
    cr_assert_eq(f.t->used_bytes, 0);
    cr_assert_eq(f.t->heap_bytes, 0);
    cr_assert_eq(f.heap_used, 0);
    cr_assert_eq(f.t->sequences, 0);
    teardown(&f);
}

/* The same sequence in an empty pool (its window one run) and in one whose free pages are
 * scattered (pages mapped side by side) keeps the same tokens. */
Test(seq, a_scattered_window_reads_as_one_run)
{
    struct fixture f;
    setup(&f, 32u << 20);
    struct seq_open_args a = args(8, 32, 8, 300);
    struct seq *s;
    const char *why = "";
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), 0, "%s", why);
    cr_assert_eq(s->win_stitched, 0);
    cr_assert_gt(s->win_n, 1);
    uint64_t want = run(&f, s, 6);
    seq_free(&f.env, s);
    /* every page taken, then every other one given back: no two free pages adjacent */
    uint32_t n = f.pool.pages, *all = malloc(sizeof(uint32_t) * n), *held = malloc(sizeof(uint32_t) * n);
    uint32_t na = 0, nh = 0;
    for (int64_t p; (p = pool_alloc(&f.pool, f.t->id)) >= 0;)
        all[na++] = (uint32_t)p;
    cr_assert_eq(na, n);
    for (uint32_t i = 0; i < na; i++)
        if (all[i] % 2)
            held[nh++] = all[i];
        else
            pool_free_run(&f.pool, all[i], 1);
    cr_assert_eq(seq_open(&f.env, &a, f.t, 2, 1, &s, &why), 0, "%s", why);
    cr_assert_eq(s->win_stitched, 1, "scattered pages are mapped side by side");
    cr_assert_eq(run(&f, s, 6), want);
    seq_free(&f.env, s);
    pool_free_list(&f.pool, held, nh);
    cr_assert_eq(f.pool.used, 0);
    free(held), free(all);
    teardown(&f);
}

Test(seq, refusals_say_why_and_take_nothing)
{
    struct fixture f;
    setup(&f, 8u << 20);
    struct seq *s;
    const char *why = "";
    struct seq_open_args a = args(4, 6, 4, 100); /* q_heads not a multiple of kv_heads */
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), CAKE_EINVAL);
    cr_assert(strstr(why, "multiple"), "%s", why);
    a = args(32, 32, 8, 60000); /* caked's own memory: ~190 MB over an 8 MiB limit */
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), CAKE_EOOM);
    cr_assert(strstr(why, "heap-limit"), "%s", why);
    a = args(2, 4, 2, 100);
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), 0, "%s", why);
    cr_assert_eq(seq_prefill_check(s, 1, &why), CAKE_ESTATE); /* layer 0 first */
    cr_assert_eq(seq_decode_check(s, &why), CAKE_ESTATE);     /* not prefilled */
    seq_free(&f.env, s);
    cr_assert_eq(f.pool.used, 0);
    cr_assert_eq(f.heap_used, 0);
    teardown(&f);
}

Test(shard, join_rules_and_the_group_preference)
{
    struct shard_group g = {.key = 7, .n = 2};
    struct seq_open_args a = args(4, 8, 2, 100);
    cr_assert_null(shard_join_check(NULL, &a, 2, 1));
    cr_assert_not_null(shard_join_check(NULL, &a, 65, 0));
    cr_assert_not_null(shard_join_check(NULL, &a, 2, 2));
    cr_assert_not_null(shard_join_check(&g, &a, 3, 0), "another number of shards");
    struct seq first = {.L = 4, .H = 8, .Hkv = 2, .d = 64, .n = 100, .max_new = 8,
                        .dt = KERN_BF16};
    first.cfg = a.cfg;
    first.cfg.layers = 4, first.cfg.model_dtype = KERN_BF16;
    policy_cfg_resolve(&first.cfg);
    g.member[0] = &first;
    cr_assert_not_null(shard_join_check(&g, &a, 2, 0), "that shard is open");
    cr_assert_null(shard_join_check(&g, &a, 2, 1), "the same layout and policy");
    struct seq_open_args b = a;
    b.prompt_len = 101;
    cr_assert_not_null(shard_join_check(&g, &b, 2, 1), "another prompt");
    b = a, b.cfg.cache_size = 128;
    cr_assert_not_null(shard_join_check(&g, &b, 2, 1), "another policy");
    first.next_observe = 1;
    cr_assert_not_null(shard_join_check(&g, &a, 2, 1), "the prefill has started");
    struct shard_group h = {.n = 2, .arrived = 2, .observed = 2, .ent = 3, .var = 0.5};
    cr_assert_float_eq(shard_preference(&h, &first.cfg), policy_preference(&first.cfg, 3, 0.5), 1e-12);
    h.observed = 1, h.pref_sum = 3.0; /* one shard submitted its own: the mean */
    cr_assert_float_eq(shard_preference(&h, &first.cfg), 1.5, 1e-12);
    struct shard_group *list = &h;
    h.key = 9, h.tenant = NULL, h.next = &g;
    cr_assert_eq(shard_find(list, NULL, 7), &g);
    cr_assert_null(shard_find(list, NULL, 8));
}

Test(metrics, latency_buckets_error_kinds_and_text)
{
    struct metrics m = {0};
    metrics_observe_latency(&m, MSG_DECODE_STEP, 30e-6);
    metrics_observe_latency(&m, MSG_DECODE_STEP, 2.0);
    metrics_observe_latency(&m, MSG_DECODE_STEP, 100.0);
    metrics_observe_latency(&m, MSG_PING, 1e-6);
    metrics_observe_latency(&m, 0x7123, 1e-6); /* not a type: counted as unknown (0) */
    const struct metrics_lat *d = &m.lat[MSG_DECODE_STEP];
    cr_assert_eq(d->count, 3, "each type its own histogram");
    cr_assert_eq(m.lat[MSG_PING].count, 1);
    cr_assert_eq(m.lat[0].count, 1);
    cr_assert_float_eq(d->sum_s, 30e-6 + 2.0 + 100.0, 1e-9);
    uint64_t total = 0;
    for (int i = 0; i < METRICS_LAT_BUCKETS; i++)
        total += d->bucket[i];
    cr_assert_eq(total, 2, "the 100 s one is only in +Inf");
    cr_assert_eq(d->bucket[2], 1, "30 us falls in the <= 50 us bucket");
    cr_assert_eq(m.lat[MSG_PING].bucket[0], 1);
    cr_assert_eq(metrics_err_kind(CAKE_EOOM), ERR_OOM);
    cr_assert_eq(metrics_err_kind(CAKE_EPERM), ERR_PERM);
    cr_assert_eq(metrics_err_kind(-ENOMEM), ERR_INTERNAL);
    cr_assert_str_eq(metrics_err_name(ERR_NOSEQ), "no_sequence");
    struct strbuf b = {0};
    for (int i = 0; i < 10000; i++)
        cr_assert_eq(strbuf_printf(&b, "line %d\n", i), 0);
    cr_assert(strstr(b.s, "line 9999\n") && b.len == strlen(b.s));
    free(b.s);
}

/* Pressure (seq.h's re-slicing): a prefilled sequence's budgets at a smaller total keep the
 * floors and what each layer holds as bounds, add up to the total, follow the preferences;
 * the re-slice job keeps a subset of each layer's tokens at exactly its budget plus the
 * window and gives back at least the pages it said. During the prompt, the cascade's total
 * comes down and every later layer is allocated from it. */
static uint64_t kv_pages(const struct seq *s)
{
    uint64_t n = 0;
    for (uint32_t l = 0; l < s->L; l++)
        n += s->layer[l].n_pages;
    return n;
}

Test(seq, a_reslice_keeps_the_top_of_what_each_layer_held)
{
    struct fixture f;
    setup(&f, 64u << 20);
    struct seq_open_args a = args(6, 4, 2, 2000);
    a.cfg.cache_size = 600;
    struct seq *s;
    const char *why = "";
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), 0, "%s", why);
    run(&f, s, 0);
    uint32_t L = s->L, w = s->cfg.window, mt = 24, fl = mt - w, held[6], before[6][2][2048], nb[6];
    uint64_t want_room = 0, want_floor = 0;
    for (uint32_t l = 0; l < L; l++) {
        held[l] = s->layer[l].tokens - w;
        want_room += held[l], want_floor += held[l] < fl ? held[l] : fl;
        for (uint32_t g = 0; g < 2; g++)
            nb[l] = (uint32_t)seq_positions(&f.env, s, l, g, 0, 2048, before[l][g]);
    }
    uint64_t floor = 0, room = seq_reslice_room(s, mt, &floor);
    cr_assert_eq(room, want_room);
    cr_assert_eq(floor, want_floor);
    cr_assert(seq_reslice_ok(s));
    uint64_t total = floor + (room - floor) / 3;
    uint32_t b[6];
    seq_reslice_budgets(s, mt, total, b);
    uint64_t sum = 0;
    for (uint32_t l = 0; l < L; l++) {
        cr_assert_leq(b[l], held[l], "layer %u over what it holds", l);
        cr_assert_geq(b[l], held[l] < fl ? held[l] : fl, "layer %u under its floor", l);
        sum += b[l];
    }
    cr_assert_eq(sum, total, "the total exactly");
    for (uint32_t i = 0; i < L; i++) /* capped water-filling by preference above the floors */
        for (uint32_t j = 0; j < L; j++)
            if (cakeseq_preference(s->cs, i) > cakeseq_preference(s->cs, j) && b[i] < held[i])
                cr_assert_geq(b[i] - fl + 1, b[j] - fl, "layers %u and %u against preferences", i, j);
    uint64_t said = seq_reslice_pages_freed(s, b), had = kv_pages(s);
    cr_assert_gt(seq_reslice_commit(&f.env, s, total, b), 0);
    cr_assert(s->rs_pending);
    cr_assert_eq(s->reslices, 1);
    struct seq_result r;
    seq_reslice_work(&f.env, s, &r);
    cr_assert_eq(r.rc, 0);
    cr_assert(!s->rs_pending);
    seq_trim_pages(&f.env, s);
    cr_assert_geq(had - kv_pages(s), said, "gave back %llu pages, said %llu",
                  (unsigned long long)(had - kv_pages(s)), (unsigned long long)said);
    for (uint32_t l = 0; l < L; l++) {
        cr_assert_eq(s->layer[l].tokens, b[l] + w, "layer %u", l);
        cr_assert_eq(cakeseq_budget(s->cs, l), b[l]);
        for (uint32_t g = 0; g < 2; g++) {
            uint32_t now[2048], n = (uint32_t)seq_positions(&f.env, s, l, g, 0, 2048, now), k = 0;
            cr_assert_eq(n, b[l] + w);
            for (uint32_t i = 0; i < n; i++) { /* in order, and among what it held */
                while (k < nb[l] && before[l][g][k] != now[i])
                    k++;
                cr_assert_lt(k, nb[l], "layer %u head %u: position %u was not kept", l, g, now[i]);
            }
            cr_assert_eq(memcmp(now + b[l], before[l][g] + nb[l] - w, 4 * w), 0, "the window");
        }
    }
    seq_free(&f.env, s);

    /* during the prompt: half the layers scored, then the total lowered */
    cr_assert_eq(seq_open(&f.env, &a, f.t, 2, 1, &s, &why), 0, "%s", why);
    for (uint32_t l = 0; l < 3; l++)
        prefill_layer(&f, s, l);
    cr_assert(seq_reslice_ok(s));
    room = seq_reslice_room(s, mt, &floor);
    cr_assert_eq(room, (uint64_t)(600 - w) * L, "the whole model's total");
    cr_assert_eq(floor, (uint64_t)fl * L);
    total = room / 2;
    seq_reslice_budgets(s, mt, total, b);
    for (uint32_t l = 3; l < L; l++)
        cr_assert_eq(b[l], UINT32_MAX, "layer %u is not scored yet", l);
    cr_assert_eq(seq_reslice_commit(&f.env, s, total, b), room - total);
    seq_reslice_work(&f.env, s, &r);
    cr_assert_eq(r.rc, 0);
    seq_trim_pages(&f.env, s);
    for (uint32_t l = 0; l < 3; l++)
        cr_assert_eq(s->layer[l].tokens, b[l] + w, "re-staged layer %u", l);
    for (uint32_t l = 3; l < L; l++)
        prefill_layer(&f, s, l);
    sum = 0;
    for (uint32_t l = 0; l < L; l++)
        sum += cakeseq_budget(s->cs, l);
    cr_assert_eq(sum, total, "every layer allocated from the lowered total");
    seq_free(&f.env, s);
    cr_assert_eq(f.pool.used, 0);
    teardown(&f);
}

/* seq_positions_compact takes keep in any order: kept slots ascending (an ordered
 * compaction, updated in place), holes below k filled from the kept slots above it (in
 * place too: every source at or above its slot), and a source below its slot (the host's
 * own order, per-head holes filled from below: through a copy) all give new[j] =
 * old[keep[j]] and the window after them, on a layer compacted before. */
Test(seq, positions_compact_any_order)
{
    struct seq s = {.Hkv = 2, .max_new = 8};
    uint64_t r = 7;
    for (int round = 0; round < 60; round++) {
        uint32_t old = 10 + (uint32_t)(round * 13 % 90), win = (uint32_t)(round % 5);
        uint32_t k = (uint32_t)((r = r * 6364136223846793005ull + 1) >> 33) % (old + 1);
        struct seq_layer a = {0};
        uint32_t first[2 * 128]; /* a first compaction: slot j of old + win holds position 3 j */
        for (uint32_t g = 0; g < s.Hkv; g++)
            for (uint32_t j = 0; j < old + win; j++)
                first[g * (old + win) + j] = j;
        cr_assert_eq(seq_positions_compact(&s, &a, first, old + win, old + win, 0), 0);
        for (uint32_t g = 0; g < s.Hkv; g++)
            for (uint32_t j = 0; j < old + win; j++)
                a.pos[(size_t)g * a.pos_cap + j] = 3 * j + g;
        uint32_t keep[2 * 128], want[2 * 136];
        int kind = round % 3;
        for (uint32_t g = 0; g < s.Hkv; g++) {
            uint8_t in[128] = {0};
            uint32_t *kp = keep + g * k, asc[128];
            for (uint32_t c = 0; c < k;) { /* k distinct slots below old */
                uint32_t j = (uint32_t)((r = r * 6364136223846793005ull + 1) >> 33) % old;
                c += !in[j], in[j] = 1;
            }
            for (uint32_t j = 0, m = 0; j < old; j++)
                if (in[j])
                    asc[m++] = j;
            uint32_t c = 0; /* kept below k */
            while (c < k && asc[c] < k)
                c++;
            for (uint32_t j = 0, rank = 0, a2 = 0; j < k; j++) {
                if (kind == 0) {
                    kp[j] = asc[j];
                } else if (kind == 1) { /* holes filled from above k */
                    if (a2 < c && asc[a2] == j)
                        kp[j] = j, a2++;
                    else
                        kp[j] = asc[c + rank++];
                } else {
                    kp[j] = asc[(j + 1) % k]; /* rotated: a source below its slot */
                }
            }
            for (uint32_t j = 0; j < k; j++)
                want[g * (k + win) + j] = 3 * kp[j] + g;
            for (uint32_t j = 0; j < win; j++)
                want[g * (k + win) + k + j] = 3 * (old + j) + g;
        }
        cr_assert_eq(seq_positions_compact(&s, &a, keep, k, old, win), 0);
        for (uint32_t g = 0; g < s.Hkv; g++)
            cr_assert_arr_eq(a.pos + (size_t)g * a.pos_cap, want + g * (k + win),
                             sizeof(uint32_t) * (k + win), "round %d kind %d head %u", round, kind, g);
        free(a.pos);
    }
}

/* A GPU decode eviction answers with the removed slots (seq_positions_evict), the host path
 * and prefill with the kept ones (seq_positions_compact): the same removals give the same
 * positions, on a layer never compacted and on one compacted before; lists out of order or
 * range are refused before anything moves. */
Test(seq, positions_evict_equals_compact)
{
    struct seq s = {.Hkv = 3, .max_new = 40, .decoded = 5};
    uint64_t r = 99;
    for (int round = 0; round < 50; round++) {
        struct seq_layer a = {0}, b = {0};
        uint32_t win = 1 + (uint32_t)(round % 8), old = 20 + (uint32_t)(round * 7 % 60);
        for (int pass = 0; pass < 3; pass++) { /* three evictions in a row */
            uint32_t n_ev = 1 + (uint32_t)((r = r * 6364136223846793005ull + 1) >> 60) % (old / 2);
            uint32_t k = old - n_ev, keep[3 * 128], gone[3 * 128];
            for (uint32_t g = 0; g < s.Hkv; g++) { /* n_ev distinct slots below old, ascending */
                uint8_t out[128] = {0};
                for (uint32_t c = 0; c < n_ev;) {
                    uint32_t j = (uint32_t)((r = r * 6364136223846793005ull + 1) >> 33) % old;
                    c += !out[j], out[j] = 1;
                }
                for (uint32_t j = 0, ik = 0, ie = 0; j < old; j++)
                    if (out[j])
                        gone[g * n_ev + ie++] = j;
                    else
                        keep[g * k + ik++] = j;
            }
            cr_assert_eq(seq_positions_compact(&s, &a, keep, k, old, win), 0);
            cr_assert_eq(seq_positions_evict(&s, &b, gone, n_ev, old, win), 0);
            for (uint32_t g = 0; g < s.Hkv; g++)
                cr_assert_arr_eq(a.pos + (size_t)g * a.pos_cap, b.pos + (size_t)g * b.pos_cap,
                                 sizeof(uint32_t) * (k + win), "round %d pass %d head %u", round, pass, g);
            old = k + 1; /* a decoded token joined the prefix */
            for (uint32_t g = 0; g < s.Hkv; g++) {
                a.pos[(size_t)g * a.pos_cap + k + win] = 1000u + (uint32_t)pass;
                b.pos[(size_t)g * b.pos_cap + k + win] = 1000u + (uint32_t)pass;
            }
            if (old < 4)
                break;
        }
        uint32_t bad[3] = {5, 5, 6}, snap[8];
        memcpy(snap, b.pos, sizeof(snap));
        cr_assert_eq(seq_positions_evict(&s, &b, bad, 1, 5, win), -EIO, "a slot past the prefix");
        uint32_t twice[6] = {1, 1, 0, 2, 0, 3};
        cr_assert_eq(seq_positions_evict(&s, &b, twice, 2, 6, win), -EIO, "not ascending");
        cr_assert_arr_eq(b.pos, snap, sizeof(snap), "a refused list moved nothing");
        free(a.pos), free(b.pos);
    }
}

/* A GPU decode step that fills its holes (seq_positions_fill) equals a compaction given the
 * fill's keep (the removed slots below k, ascending, take the kept slots from k on,
 * ascending: seq_positions_compact's "holes filled from above k"), step after step, on a
 * layer never compacted and on one compacted before; seq_positions_sort then puts each
 * head's prefix in ascending order (what the layer-by-layer way does to the rows); lists
 * out of order or range are refused before anything moves. */
Test(seq, positions_fill_equals_compact)
{
    struct seq s = {.Hkv = 2, .max_new = 40, .decoded = 3};
    uint64_t r = 1234;
    for (int round = 0; round < 50; round++) {
        struct seq_layer a = {0}, b = {0};
        uint32_t win = 1 + (uint32_t)(round % 6), old = 12 + (uint32_t)(round * 11 % 70), k = 0;
        for (int pass = 0; pass < 4; pass++) {
            uint32_t n_ev = 1 + (uint32_t)((r = r * 6364136223846793005ull + 1) >> 60) % (old / 2);
            uint32_t keep[2 * 128], gone[2 * 128];
            k = old - n_ev;
            for (uint32_t g = 0; g < s.Hkv; g++) {
                uint8_t out[128] = {0};
                for (uint32_t c = 0; c < n_ev;) {
                    uint32_t j = (uint32_t)((r = r * 6364136223846793005ull + 1) >> 33) % old;
                    c += !out[j], out[j] = 1;
                }
                uint32_t src = k;
                for (uint32_t j = 0, ie = 0; j < old; j++)
                    if (out[j])
                        gone[g * n_ev + ie++] = j;
                for (uint32_t j = 0; j < k; j++) { /* a kept slot below k stays; a hole fills */
                    if (!out[j]) {
                        keep[g * k + j] = j;
                        continue;
                    }
                    while (out[src])
                        src++;
                    keep[g * k + j] = src++;
                }
            }
            cr_assert_eq(seq_positions_compact(&s, &a, keep, k, old, win), 0);
            cr_assert_eq(seq_positions_fill(&s, &b, gone, n_ev, old, win), 0);
            for (uint32_t g = 0; g < s.Hkv; g++)
                cr_assert_arr_eq(a.pos + (size_t)g * a.pos_cap, b.pos + (size_t)g * b.pos_cap,
                                 sizeof(uint32_t) * (k + win), "round %d pass %d head %u", round, pass, g);
            old = k + 1;
            for (uint32_t g = 0; g < s.Hkv; g++) {
                a.pos[(size_t)g * a.pos_cap + k + win] = 1000u + (uint32_t)pass;
                b.pos[(size_t)g * b.pos_cap + k + win] = 1000u + (uint32_t)pass;
            }
            if (old < 4)
                break;
        }
        seq_positions_sort(&s, &b, k);
        for (uint32_t g = 0; g < s.Hkv; g++) {
            const uint32_t *p = b.pos + (size_t)g * b.pos_cap;
            uint32_t sorted[128];
            memcpy(sorted, a.pos + (size_t)g * a.pos_cap, sizeof(uint32_t) * k);
            for (uint32_t i = 1; i < k; i++) /* insertion sort: the model */
                for (uint32_t j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
                    uint32_t t = sorted[j];
                    sorted[j] = sorted[j - 1], sorted[j - 1] = t;
                }
            cr_assert_arr_eq(p, sorted, sizeof(uint32_t) * k, "round %d head %u: sorted", round, g);
            cr_assert_arr_eq(p + k, a.pos + (size_t)g * a.pos_cap + k, sizeof(uint32_t) * (win + 1),
                             "round %d head %u: the sort moved the window", round, g);
        }
        uint32_t bad[2] = {7, 7}, snap[8];
        memcpy(snap, b.pos, sizeof(snap));
        cr_assert_eq(seq_positions_fill(&s, &b, bad, 1, 7, win), -EIO, "a slot past the prefix");
        uint32_t twice[4] = {1, 1, 0, 2};
        cr_assert_eq(seq_positions_fill(&s, &b, twice, 2, 6, win), -EIO, "not ascending");
        cr_assert_arr_eq(b.pos, snap, sizeof(snap), "a refused list moved nothing");
        free(a.pos), free(b.pos);
    }
}

/* Each window row's log-sum-exp in double over layer l's cache as it stands: row i of the
 * `valid` newest (oldest first, ring slot (first + i) mod w) sees the keys up to
 * n - valid + i. */
static double row_lse_double(const struct fixture *f, const struct seq *s, uint32_t l,
                             uint32_t h, uint32_t i, uint32_t valid, uint32_t first)
{
    void *pages[64];
    struct kern_kv kv = seq_layer_view(&f->env, s, l, pages);
    const uint16_t *ring = seq_ring_ptr(&f->env, s, l);
    uint32_t w = s->cfg.window, d = s->d, lim = kv.n_tokens - valid + i + 1;
    const uint16_t *q = ring + ((size_t)h * w + (first + i) % w) * d;
    double mx = -INFINITY, sum = 0.0, *z = malloc(sizeof(double) * lim);
    for (uint32_t j = 0; j < lim; j++) {
        const uint16_t *k = kern_kv_key(&kv, h / (s->H / s->Hkv), j);
        double dot = 0.0;
        for (uint32_t x = 0; x < d; x++)
            dot += (double)kern_bf16_to_f32(q[x]) * kern_bf16_to_f32(k[x]);
        z[j] = dot / sqrt((double)d), mx = fmax(mx, z[j]);
    }
    for (uint32_t j = 0; j < lim; j++)
        sum += exp(z[j] - mx);
    free(z);
    return mx + log(sum);
}

/* A host sequence's decode steps carry the window rows' log-sum-exps (lse_host): after every
 * eviction each row's value is its normalizer over the cache left, within 1e-4 of doubles
 * (or NaN, where the evicted keys held over half its weight), and the kept tokens are what
 * a twin computing them every step (CAKED_DECODE_RECOMPUTE) keeps, up to near-ties. A
 * re-slice removing three quarters of a layer's prefix leaves its rows NaN, and the step
 * after computes them again, right. */
Test(seq, host_decode_carries_the_window_rows_log_sum_exps)
{
    struct fixture f, g;
    setup(&f, 64u << 20), setup(&g, 64u << 20);
    g.env.recompute = 1;
    struct seq_open_args a = args(3, 8, 2, 300);
    a.max_new = 12;
    struct seq *s, *t;
    const char *why = "";
    cr_assert_eq(seq_open(&f.env, &a, f.t, 1, 1, &s, &why), 0, "%s", why);
    cr_assert_eq(seq_open(&g.env, &a, g.t, 1, 1, &t, &why), 0, "%s", why);
    cr_assert_not_null(s->lse_host, "a host sequence of CAKE's ranking carries them");
    cr_assert_null(t->lse_host);
    for (uint32_t l = 0; l < s->L; l++)
        prefill_layer(&f, s, l), prefill_layer(&g, t, l);
    uint32_t w = s->cfg.window, v0 = s->n < w ? s->n : w, checked = 0, nans = 0, carried = 0;
    double worst = 0;
    for (uint32_t st = 0; st < 10; st++) {
        struct fixture *fx[2] = {&f, &g};
        struct seq *sq[2] = {s, t};
        uint32_t valid = v0 + s->decoded < w ? v0 + s->decoded : w;
        uint32_t first = (v0 + s->decoded - valid) % w;
        for (int k = 0; k < 2; k++) {
            struct seq_result r = {0};
            carried += k == 0 && st > 1 && seq_lse_carry(s, 0);
            if (seq_decode_needs_evict(sq[k]))
                seq_decode_evict_work(&fx[k]->env, sq[k], &r);
            cr_assert_eq(r.rc, 0);
        }
        for (uint32_t l = 0; l < s->L; l++) {
            if (s->layer[l].lse_next != s->decoded + 1)
                continue; /* not evicted this step */
            for (uint32_t h = 0; h < s->H; h++)
                for (uint32_t i = 0; i < valid; i++) {
                    float v = s->lse_host[((size_t)l * s->H + h) * w + (first + i) % w];
                    checked++;
                    if (isnan(v)) {
                        nans++;
                        continue;
                    }
                    double e = fabs(v - row_lse_double(&f, s, l, h, i, valid, first));
                    worst = e > worst ? e : worst;
                }
        }
        for (int k = 0; k < 2; k++) {
            seq_trim_pages(&fx[k]->env, sq[k]);
            struct seq *one[1] = {sq[k]};
            cr_assert_eq(seq_decode_admit(&fx[k]->env, sq[k]->tenant, one, 1, &why), 0, "%s", why);
            cr_assert_eq(seq_decode_reserve(&fx[k]->env, sq[k]), 0);
            seq_publish(&fx[k]->env, sq[k]);
            for (uint32_t l = 0; l < s->L; l++) { /* the new token's K/V, the same in both */
                struct seq *q = sq[k];
                uint32_t tk = q->layer[l].tokens - 1;
                uint8_t *pg = pool_ptr(&fx[k]->pool, q->layer[l].pages[tk / q->tpp]);
                for (uint32_t gh = 0; gh < q->Hkv; gh++) {
                    uint16_t *kk = (uint16_t *)(pg + ((size_t)gh * q->tpp + tk % q->tpp) * 128);
                    uint16_t *vv = (uint16_t *)((uint8_t *)kk + (size_t)q->Hkv * q->tpp * 128);
                    for (uint32_t i = 0; i < 64; i++)
                        kk[i] = (uint16_t)(0x3c00 + (st * 13u + gh * 7u + i * 3u) % 1019),
                        vv[i] = (uint16_t)(0x3c00 + (st * 17u + gh * 5u + i) % 1013);
                }
            }
        }
    }
    cr_log_info("carried log-sum-exps: %u rows checked, %u NaN, worst %.3g; %u steps carried",
                checked, nans, worst, carried);
    cr_assert_gt(checked, 0, "no eviction checked");
    cr_assert_gt(carried, 0, "no step carried");
    cr_assert_leq(worst, 1e-4, "a carried log-sum-exp off by %g", worst);
    cr_assert_lt(nans, checked / 2, "%u of %u NaN", nans, checked);
    for (uint32_t l = 0; l < s->L; l++) {
        cr_assert_eq(s->layer[l].tokens, t->layer[l].tokens);
        for (uint32_t gh = 0; gh < s->Hkv; gh++) {
            uint32_t ps[1024], pt[1024], n = s->layer[l].tokens, same = 0;
            cr_assert_eq(seq_positions(&f.env, s, l, gh, 0, n, ps), (int)n);
            cr_assert_eq(seq_positions(&g.env, t, l, gh, 0, n, pt), (int)n);
            for (uint32_t i = 0; i < n; i++)
                for (uint32_t j = 0; j < n; j++)
                    same += ps[i] == pt[j];
            cr_assert_geq(same, n - n / 50, "layer %u head %u: %u of %u the same", l, gh, same, n);
        }
    }
    /* a re-slice removing over half of layer 0's prefix: its rows NaN, so the next step
     * computes them again (and they are right after it) */
    uint32_t b0 = cakeseq_budget(s->cs, 0);
    cakeseq_lower_budget(s->cs, 0, b0 / 4);
    s->rs_pending = 1;
    struct seq_result rr;
    seq_reslice_work(&f.env, s, &rr);
    cr_assert_eq(rr.rc, 0);
    cr_assert_eq(s->layer[0].tokens, b0 / 4 + w, "the re-slice evicted");
    uint32_t valid = v0 + s->decoded < w ? v0 + s->decoded : w, first = (v0 + s->decoded - valid) % w;
    for (uint32_t h = 0; h < s->H; h++)
        for (uint32_t i = 0; i < valid; i++)
            cr_assert(isnan(s->lse_host[(size_t)h * w + (first + i) % w]), "head %u row %u", h, i);
    seq_trim_pages(&f.env, s);
    struct seq *one[1] = {s};
    cr_assert_eq(seq_decode_admit(&f.env, s->tenant, one, 1, &why), 0, "%s", why);
    cr_assert_eq(seq_decode_reserve(&f.env, s), 0);
    struct seq_result r2 = {0};
    cr_assert(seq_decode_needs_evict(s), "layer 0 is a token over its budget");
    valid = v0 + s->decoded < w ? v0 + s->decoded : w, first = (v0 + s->decoded - valid) % w;
    seq_decode_evict_work(&f.env, s, &r2);
    cr_assert_eq(r2.rc, 0);
    cr_assert_eq(s->layer[0].lse_next, s->decoded + 1, "that step left them");
    for (uint32_t h = 0; h < s->H; h++)
        for (uint32_t i = 0; i < valid; i++) {
            float v = s->lse_host[(size_t)h * w + (first + i) % w];
            cr_assert(isfinite(v) && fabs(v - row_lse_double(&f, s, 0, h, i, valid, first)) <= 1e-4,
                      "after the re-slice, head %u row %u: %g", h, i, v);
        }
    seq_free(&f.env, s), seq_free(&g.env, t);
    teardown(&f), teardown(&g);
}
