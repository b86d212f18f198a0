/* Random clients against one caked. Engines call libcake with random (often invalid)
 * layouts, policies and orders, open tensor-parallel shards of groups that rarely fill, fill their own K/V, query rings, indicators and sequence
 * descriptors with random bytes (NaN, Inf, huge), send requests of every type with random bodies and other tenants'
 * ids, write raw bytes, truncated and oversize frames, floods they never read, stray file
 * descriptors, and die mid-call. Beside them a well-behaved engine checks that every call it
 * makes succeeds and that every K/V row it holds is one it wrote (no page handed to two
 * sequences, nothing mixed up by compaction). At the end every page is back, the daemon
 * answers and exits cleanly on SIGTERM.
 *
 * CAKE_CHAOS_SEED=N repeats a run (a failure prints its seed); CAKE_CHAOS_ROUNDS=N runs longer
 * (default 12 rounds of 4 clients). */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../proto/frame.h"
#include "../../proto/shm.h"
#include "cake.pb-c.h"
#include "cake/cake.h"
#include "harness.h"
#include "internal.h"

/* ---- randomness: splitmix64, edge values first ---------------------------------------- */

struct rng {
    uint64_t s;
};

static uint64_t rnd(struct rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint32_t below(struct rng *r, uint32_t n) { return n ? (uint32_t)(rnd(r) % n) : 0; }
static int chance(struct rng *r, unsigned pct) { return below(r, 100) < pct; }

static uint32_t u32_any(struct rng *r)
{
    static const uint32_t edge[] = {0,    1,     2,     3,       7,        8,          16,
                                    31,   32,    33,    64,      128,      255,        256,
                                    1000, 4096,  65535, 65536,   1u << 20, 1u << 31,   UINT32_MAX - 1,
                                    UINT32_MAX};
    return chance(r, 70) ? edge[below(r, sizeof edge / sizeof *edge)] : (uint32_t)rnd(r);
}

static float f32_any(struct rng *r)
{
    static const float edge[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 200.0f, 1e30f, -1e30f,
                                 NAN,  INFINITY, -INFINITY, FLT_MIN, 1e-40f, FLT_MAX};
    if (chance(r, 80))
        return edge[below(r, sizeof edge / sizeof *edge)];
    uint32_t b = (uint32_t)rnd(r);
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Fills p with one of: random bytes, all ones (NaN in every float format), bf16 +Inf,
 * zeros, the largest bf16, or small plausible values. */
static void scribble(struct rng *r, void *p, size_t n)
{
    uint8_t *b = p;
    unsigned kind = below(r, 6);
    for (size_t i = 0; i < n; i++) {
        switch (kind) {
        case 0: b[i] = (uint8_t)rnd(r); break;
        case 1: b[i] = 0xff; break;
        case 2: b[i] = (i & 1) ? 0x7f : 0x80; break;
        case 3: b[i] = 0; break;
        case 4: b[i] = 0x7f; break;
        default: b[i] = (i & 1) ? (uint8_t)(0x3c + below(r, 4)) | (chance(r, 50) ? 0x80 : 0)
                                : (uint8_t)rnd(r);
        }
    }
}

static unsigned dtype_bytes(unsigned dt) { return dt == CAKE_F32 ? 4 : 2; }

/* ---- the well-behaved engine -------------------------------------------------------- */

#define BY_L 4
#define BY_H 8
#define BY_HKV 2
#define BY_D 64
#define BY_W 16

/* bf16 bits of k/128, |k| < 128 (exact in bf16) */
static uint16_t bf16_of(int k)
{
    float f = (float)k / 128.0f;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static int bf16_int(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return (int)lrintf(f * 128.0f);
}

/* The row the bystander writes for token t of (layer, head), keys (v = 0) or values (v = 1):
 * t in the first three elements (7 bits each), the rest a hash of everything. */
static void by_row(uint16_t *row, uint32_t l, uint32_t g, uint32_t t, int v)
{
    row[0] = bf16_of((int)(t & 127)), row[1] = bf16_of((int)((t >> 7) & 127));
    row[2] = bf16_of((int)(t >> 14));
    uint64_t h = ((uint64_t)l << 48) ^ ((uint64_t)g << 40) ^ ((uint64_t)t << 8) ^ (uint64_t)v;
    for (uint32_t x = 3; x < BY_D; x++) {
        h = h * 6364136223846793005ull + 1442695040888963407ull;
        row[x] = bf16_of((int)((h >> 33) % 255) - 127);
    }
}

static int by_write(cake_seq *s, uint32_t l, uint32_t t, uint32_t slot)
{
    uint16_t row[BY_D];
    for (uint32_t g = 0; g < BY_HKV; g++) {
        uint16_t *k = cake_key(s, l, g, slot), *v = cake_value(s, l, g, slot);
        if (!k || !v)
            return -1;
        by_row(row, l, g, t, 0), memcpy(k, row, sizeof row);
        by_row(row, l, g, t, 1), memcpy(v, row, sizeof row);
    }
    return 0;
}

/* Every slot of every prefilled layer holds a row the bystander wrote, each token at most
 * once per head, and the newest window of tokens is there. */
static int by_verify(cake_seq *s, uint32_t layers, uint32_t n_total, uint8_t *seen, char *why,
                     size_t wl)
{
    uint16_t want[BY_D];
    for (uint32_t l = 0; l < layers; l++) {
        uint32_t tokens = cake_layer_tokens(s, l);
        for (uint32_t g = 0; g < BY_HKV; g++) {
            memset(seen, 0, n_total);
            for (uint32_t slot = 0; slot < tokens; slot++) {
                const uint16_t *k = cake_key(s, l, g, slot), *v = cake_value(s, l, g, slot);
                if (!k || !v)
                    return snprintf(why, wl, "layer %u slot %u: no address", l, slot), -1;
                int t = bf16_int(k[0]) + (bf16_int(k[1]) << 7) + (bf16_int(k[2]) << 14);
                if (t < 0 || (uint32_t)t >= n_total)
                    return snprintf(why, wl, "layer %u head %u slot %u: token %d not written "
                                    "(of %u)", l, g, slot, t, n_total), -1;
                by_row(want, l, g, (uint32_t)t, 0);
                if (memcmp(k, want, sizeof want))
                    return snprintf(why, wl, "layer %u head %u slot %u: key of token %d "
                                    "changed", l, g, slot, t), -1;
                by_row(want, l, g, (uint32_t)t, 1);
                if (memcmp(v, want, sizeof want))
                    return snprintf(why, wl, "layer %u head %u slot %u: value of token %d "
                                    "changed", l, g, slot, t), -1;
                if (seen[t]++)
                    return snprintf(why, wl, "layer %u head %u: token %d twice", l, g, t), -1;
            }
            for (uint32_t t = n_total - BY_W; t < n_total; t++)
                if (!seen[t])
                    return snprintf(why, wl, "layer %u head %u: window token %u lost", l, g, t),
                           -1;
        }
    }
    return 0;
}

/* Prefill and decode cycles until `stop` reads EOF (and at least 3 cycles); each call must
 * succeed and the data must verify. Returns 0, or 1 with the reason on stderr. */
static int bystander(const char *sock, int stop, uint64_t seed)
{
    struct rng r = {seed};
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "bystander");
    if (cake_connect(c, sock, 1)) {
        fprintf(stderr, "bystander: connect: %s\n", cake_errstr(c));
        return 1;
    }
    fcntl(stop, F_SETFL, O_NONBLOCK);
    struct cake_layout lay = {.layers = BY_L, .q_heads = BY_H, .kv_heads = BY_HKV, .head_dim = BY_D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 96, pol.window = BY_W;
    uint8_t *seen = malloc(1 << 16);
    uint16_t *q = malloc((size_t)BY_H * BY_W * BY_D * 2);
    char why[256] = "";
    int rc = 0, cycle;
    for (cycle = 0;; cycle++) {
        char ch;
        if (cycle >= 3 && read(stop, &ch, 1) == 0)
            break;
        uint32_t n = 300 + below(&r, 2500), steps = 8 + below(&r, 24);
        pol.decode_slack = below(&r, 3);
        cake_seq *s;
        rc = cake_seq_open(c, &lay, &pol, n, steps, &s);
        if (rc) {
            snprintf(why, sizeof why, "open: %d %s", rc, cake_errstr(c));
            break;
        }
        for (uint32_t l = 0; !rc && l < BY_L; l++) {
            if ((rc = cake_prefill_reserve(s, l))) {
                snprintf(why, sizeof why, "reserve %u: %d %s", l, rc, cake_errstr(c));
                break;
            }
            for (uint32_t t = 0; t < n && !rc; t++)
                if (by_write(s, l, t, t))
                    rc = -1, snprintf(why, sizeof why, "layer %u token %u: no address", l, t);
            for (size_t i = 0; i < (size_t)BY_H * BY_W * BY_D; i++)
                q[i] = bf16_of((int)below(&r, 255) - 127);
            memcpy(cake_queries(s, l), q, (size_t)BY_H * BY_W * BY_D * 2);
            if (!rc && (rc = cake_prefill_observe(s, l, NULL)))
                snprintf(why, sizeof why, "observe %u: %d %s", l, rc, cake_errstr(c));
            if (!rc)
                rc = by_verify(s, l + 1, n, seen, why, sizeof why);
        }
        for (uint32_t step = 0; !rc && step < steps; step++) {
            if ((rc = cake_decode_step(c, &s, 1))) {
                snprintf(why, sizeof why, "decode step %u: %d %s", step, rc, cake_errstr(c));
                break;
            }
            for (uint32_t l = 0; !rc && l < BY_L; l++) {
                uint32_t slot = cake_layer_tokens(s, l) - 1;
                if (by_write(s, l, n + step, slot))
                    rc = -1, snprintf(why, sizeof why, "decode layer %u: no address", l);
                uint8_t *qr = cake_decode_query(s, l);
                for (uint32_t h = 0; qr && h < BY_H; h++)
                    memcpy(qr + (size_t)h * BY_W * BY_D * 2, q + (size_t)h * BY_D, BY_D * 2);
            }
            if (!rc)
                rc = by_verify(s, BY_L, n + step + 1, seen, why, sizeof why);
        }
        int rc2 = cake_seq_close(s);
        if (!rc && rc2) {
            rc = rc2;
            snprintf(why, sizeof why, "close: %d %s", rc2, cake_errstr(c));
        }
        if (rc)
            break;
    }
    if (rc)
        fprintf(stderr, "bystander (seed %llu) cycle %d: %s\n", (unsigned long long)seed, cycle,
                why);
    cake_destroy(c);
    free(seen), free(q);
    return rc != 0;
}

/* ---- chaos through libcake ------------------------------------------------------------- */

struct cseq {
    cake_seq *s;
    struct cake_layout lay;
    uint32_t n, w;
    uint32_t next; /* the next layer to prefill */
};

static void random_layout(struct rng *r, struct cake_layout *l)
{
    memset(l, 0, sizeof(*l));
    if (chance(r, 85)) {
        l->layers = 1 + below(r, 4), l->kv_heads = 1u << below(r, 3);
        l->q_heads = l->kv_heads << below(r, 3), l->head_dim = 16u << below(r, 4);
        l->dtype = (enum cake_dtype)below(r, 3);
        l->placement = chance(r, 5) ? CAKE_PLACE_GPU : CAKE_PLACE_HOST; /* no GPU pool here */
    } else {
        l->layers = u32_any(r), l->q_heads = u32_any(r), l->kv_heads = u32_any(r);
        l->head_dim = u32_any(r), l->dtype = (enum cake_dtype)below(r, 6);
        l->placement = (enum cake_placement)below(r, 3), l->gpu = u32_any(r);
    }
}

static void random_policy(struct rng *r, struct cake_policy *p)
{
    cake_policy_default(p);
    if (chance(r, 70)) {
        static const uint32_t win[] = {0, 1, 4, 8, 16, 32, 33};
        p->mode = (enum cake_mode)below(r, 2), p->cache_size = 8 + below(r, 600);
        p->window = win[below(r, 7)], p->kind = (enum cake_policy_kind)below(r, 8);
        p->alloc = (enum cake_alloc)below(r, 5), p->indicator = (enum cake_indicator)below(r, 6);
        p->pool = (enum cake_pool)below(r, 4), p->pool_kernel = chance(r, 50) ? 0 : below(r, 9);
        p->decode = (enum cake_decode)below(r, 3), p->decode_slack = below(r, 4);
        p->sinks = below(r, 8), p->cascading = (int)below(r, 2);
        p->run_width = chance(r, 70) ? 0 : below(r, 20);
    } else {
        p->mode = (enum cake_mode)u32_any(r), p->cache_size = u32_any(r), p->window = u32_any(r);
        p->kind = (enum cake_policy_kind)u32_any(r), p->alloc = (enum cake_alloc)u32_any(r);
        p->indicator = (enum cake_indicator)u32_any(r), p->pool = (enum cake_pool)u32_any(r);
        p->pool_kernel = u32_any(r), p->decode = (enum cake_decode)u32_any(r);
        p->decode_slack = u32_any(r), p->sinks = u32_any(r), p->run_width = u32_any(r);
    }
    if (chance(r, 30)) {
        p->tau1 = f32_any(r), p->tau2 = f32_any(r), p->gamma = f32_any(r);
        p->pyramid_beta = f32_any(r), p->ada_alpha = f32_any(r);
    }
}

/* Random bytes into what the sequence owns: K/V rows, its query rings, its indicator. */
static void scribble_seq(struct rng *r, struct cseq *q, uint32_t l)
{
    const struct cake_layout *y = &q->lay;
    size_t row = (size_t)y->head_dim * dtype_bytes(y->dtype);
    uint32_t tokens = cake_layer_tokens(q->s, l);
    for (uint32_t g = 0; g < y->kv_heads; g++)
        for (uint32_t t = 0; t < tokens; t += 1 + below(r, 4)) {
            void *k = cake_key(q->s, l, g, t), *v = cake_value(q->s, l, g, t);
            if (k)
                scribble(r, k, row);
            if (v)
                scribble(r, v, row);
        }
    void *qr = cake_queries(q->s, l);
    if (qr)
        scribble(r, qr, (size_t)y->q_heads * q->w * row);
    if (q->n > q->w)
        scribble(r, cake_indicator(q->s), (size_t)y->kv_heads * (q->n - q->w) * sizeof(float));
}

/* Garbage over the sequence's own descriptor (found as any client could: magic and id).
 * libcake must keep every address inside the pool, caked must not read it. */
static void scribble_desc(struct rng *r, cake_ctx *c, struct cseq *q)
{
    uint8_t *pool = cake_pool_base(c);
    for (size_t off = 0; off + 1024 <= cake_pool_bytes(c); off += 4096) {
        struct shm_desc *d = (struct shm_desc *)(pool + off);
        if (!cake_pool_mapped(c, d, 1024))
            continue; /* only its own tenant's segments are mapped here */
        if (d->magic == SHM_DESC_MAGIC && d->seq_id == cake_seq_id(q->s)) {
            scribble(r, d, 1024); /* the run holding it is at least one page */
            return;
        }
    }
}

/* A random request of a random type (often not the body's), with ids of its own, the
 * bystander's, or none. */
static void random_rpc(struct rng *r, cake_ctx *c, const struct cseq *seqs, int ns,
                       uint64_t foreign)
{
    uint64_t ids[8];
    int ni = 0;
    for (int i = 0; i < ns && ni < 6; i++)
        if (seqs[i].s)
            ids[ni++] = cake_seq_id(seqs[i].s);
    ids[ni++] = foreign, ids[ni++] = rnd(r);
    uint64_t id = chance(r, 20) ? u32_any(r) : ids[below(r, (uint32_t)ni)];
    static const uint16_t types[] = {0,  1,  2,  3,  4,  5,      6,      7,     8,
                                     9,  10, 11, 12, 13, 14,     15,     0x7fff, 0x8001};
    uint16_t type = types[below(r, sizeof types / sizeof *types)];
    Cake__SeqRef sr = CAKE__SEQ_REF__INIT;
    Cake__LayerRef lr = CAKE__LAYER_REF__INIT;
    Cake__PrefillSubmit ps = CAKE__PREFILL_SUBMIT__INIT;
    Cake__DecodeStep ds = CAKE__DECODE_STEP__INIT;
    Cake__Hello he = CAKE__HELLO__INIT;
    Cake__SetQuota sq = CAKE__SET_QUOTA__INIT;
    Cake__SeqOpen so = CAKE__SEQ_OPEN__INIT;
    Cake__Policy po = CAKE__POLICY__INIT;
    uint64_t many[300];
    ProtobufCMessage *m;
    switch (below(r, 8)) {
    case 0: sr.seq_id = id, m = &sr.base; break;
    case 1: lr.seq_id = id, lr.layer = u32_any(r), m = &lr.base; break;
    case 2:
        ps.seq_id = id, ps.layer = u32_any(r), ps.preference = (double)f32_any(r);
        m = &ps.base;
        break;
    case 3:
        ds.n_seq_ids = below(r, 300);
        for (size_t i = 0; i < ds.n_seq_ids; i++)
            many[i] = ids[below(r, (uint32_t)ni)];
        ds.seq_ids = many, m = &ds.base;
        break;
    case 4:
        he.protocol_version = chance(r, 50) ? CAKE_PROTOCOL_VERSION : u32_any(r);
        he.service = chance(r, 50) ? (char *)"chaos-x" : (char *)"", he.want_pool = 1;
        m = &he.base;
        break;
    case 5: /* quotas of the chaos tenants only: the bystander's would be a legitimate change */
        sq.tenant = chance(r, 70) ? (char *)"chaos-1" : (char *)"no-such-tenant";
        sq.weight = u32_any(r), sq.min_bytes = rnd(r) >> below(r, 64);
        sq.max_bytes = rnd(r) >> below(r, 64), m = &sq.base;
        break;
    case 6:
        so.layers = u32_any(r), so.q_heads = u32_any(r), so.kv_heads = u32_any(r);
        so.head_dim = u32_any(r), so.dtype = u32_any(r), so.prompt_len = u32_any(r);
        so.max_new_tokens = u32_any(r), so.placement = u32_any(r), so.shard_group = rnd(r);
        so.shards = u32_any(r), so.shard = u32_any(r);
        so.gpu_uuid = chance(r, 50) ? (char *)"" : (char *)"GPU-nonexistent";
        po.mode = u32_any(r), po.cache_size = u32_any(r), po.window = u32_any(r);
        po.tau1 = f32_any(r), po.gamma = f32_any(r), po.kind = u32_any(r);
        so.policy = chance(r, 70) ? &po : NULL, m = &so.base;
        break;
    default: m = NULL;
    }
    uint8_t *body = NULL;
    size_t len;
    if (cake_internal_rpc(c, type, m, &body, &len) == 0)
        cake_internal_free(c, body);
}

static cake_ctx *chaos_connect(struct rng *r, const char *sock)
{
    cake_ctx *c;
    if (cake_create(&c))
        return NULL;
    char name[32];
    snprintf(name, sizeof name, "chaos-%u", below(r, 3));
    cake_set_service(c, name);
    cake_set_timeout_ms(c, 2000); /* a shard group missing a rank waits at its barrier */
    if (cake_connect(c, sock, 1)) {
        cake_destroy(c);
        return NULL;
    }
    return c;
}

static int dead(int rc) { return rc == CAKE_ESHUTDOWN || rc == CAKE_ENOTCONN || rc == -ETIMEDOUT; }

/* Prefills the sequence's next layer, mostly as an engine would (reserve, write, observe or
 * submit), sometimes a random layer or a step left out. Returns the last call's code. */
static int advance(struct rng *r, struct cseq *q)
{
    uint32_t l = chance(r, 90) ? q->next : below(r, q->lay.layers + 1);
    int rc = chance(r, 95) ? cake_prefill_reserve(q->s, l) : 0;
    if (rc)
        return rc;
    if (chance(r, 80))
        scribble_seq(r, q, l);
    double pref;
    rc = chance(r, 70) ? cake_prefill_observe(q->s, l, &pref)
                       : cake_prefill_submit(q->s, l, chance(r, 80) ? 1.0 : (double)f32_any(r));
    if (!rc && l == q->next)
        q->next++;
    return rc;
}

/* One client: random operations; may die mid-way (exit 3). */
static int chaos_engine(const char *sock, uint64_t seed, uint64_t foreign)
{
    struct rng r = {seed};
    cake_ctx *c = chaos_connect(&r, sock);
    if (!c)
        return 1;
    struct cseq seqs[4] = {0};
    int ops = 20 + (int)below(&r, 200);
    for (int op = 0; op < ops; op++) {
        struct cseq *q = &seqs[below(&r, 4)];
        int rc = 0;
        switch (below(&r, 16)) {
        case 0:
        case 1:
            if (!q->s) {
                struct cake_policy p;
                random_layout(&r, &q->lay), random_policy(&r, &p);
                q->n = chance(&r, 80) ? below(&r, 3000) : u32_any(&r);
                q->w = p.window, q->next = 0;
                uint32_t max_new = chance(&r, 80) ? below(&r, 64) : u32_any(&r);
                if (chance(&r, 20)) { /* a tensor-parallel shard, its group shared across
                                       * clients of the same tenant, often incomplete */
                    uint32_t shards = 2u << below(&r, 2);
                    rc = cake_seq_open_shard(c, &q->lay, &p, q->n, max_new, 1 + below(&r, 3),
                                             shards, below(&r, shards + 1), &q->s);
                } else {
                    rc = cake_seq_open(c, &q->lay, &p, q->n, max_new, &q->s);
                }
                if (rc)
                    q->s = NULL;
            }
            break;
        case 2:
        case 3:
        case 4:
        case 5:
            if (q->s)
                rc = advance(&r, q);
            break;
        case 6:
            if (q->s && chance(&r, 10))
                scribble_desc(&r, c, q);
            else if (q->s)
                scribble_seq(&r, q, below(&r, q->lay.layers));
            break;
        case 7:
        case 8:
        case 9: {
            cake_seq *list[5];
            size_t n = 0;
            for (int i = 0; i < 4; i++)
                if (seqs[i].s && (seqs[i].next >= seqs[i].lay.layers || chance(&r, 10)))
                    list[n++] = seqs[i].s;
            if (chance(&r, 10) && n) /* the same sequence twice in one step */
                list[n++] = list[0];
            rc = cake_decode_step(c, list, n);
            for (size_t i = 0; !rc && i < n; i++) /* the new token, as an engine writes it */
                for (int j = 0; j < 4; j++)
                    if (seqs[j].s == list[i] && chance(&r, 50))
                        scribble_seq(&r, &seqs[j], below(&r, seqs[j].lay.layers));
            break;
        }
        case 10:
        case 11:
            random_rpc(&r, c, seqs, 4, foreign);
            break;
        case 12:
            if (q->s && chance(&r, 50)) {
                rc = cake_seq_close(q->s);
                q->s = NULL;
            }
            break;
        case 13:
            if (chance(&r, 6))
                _exit(3); /* sequences left open, maybe a reply unread */
            break;
        default:
            rc = cake_ping(c);
        }
        if (dead(rc) || (chance(&r, 5) && dead(cake_ping(c)))) {
            /* caked closed the connection (a protocol error of ours), or a reply is overdue
             * (a shard barrier that will not fill): start over */
            cake_destroy(c);
            memset(seqs, 0, sizeof seqs);
            if (!(c = chaos_connect(&r, sock)))
                return 1;
        }
    }
    if (chance(&r, 50))
        for (int i = 0; i < 4; i++)
            if (seqs[i].s)
                cake_seq_close(seqs[i].s);
    cake_destroy(c); /* the rest is left for caked to reclaim */
    return 0;
}

/* ---- chaos on the raw socket --------------------------------------------------------- */

static int raw_connect(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path)
        return -1;
    memcpy(a.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    struct timeval tv = {0, 200000}; /* caked may stop reading a client that reads nothing */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static int send_all(int fd, const void *p, size_t n)
{
    return send(fd, p, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static int send_frame(int fd, uint16_t type, uint32_t flags, uint32_t len_field, const void *body,
                      size_t n)
{
    uint8_t h[FRAME_HEADER_BYTES];
    struct frame_header fh = {FRAME_MAGIC, FRAME_VERSION, type, flags, len_field, 7};
    frame_write_header(h, &fh);
    if (send_all(fd, h, sizeof h))
        return -1;
    return n ? send_all(fd, body, n) : 0;
}

static int send_hello(int fd, int want_pool)
{
    Cake__Hello he = CAKE__HELLO__INIT;
    he.protocol_version = CAKE_PROTOCOL_VERSION, he.service = (char *)"chaos-raw";
    he.want_pool = want_pool;
    uint8_t b[128];
    size_t n = cake__hello__pack(&he, b);
    return send_frame(fd, MSG_HELLO, 0, (uint32_t)n, b, n);
}

/* A frame with an fd attached through SCM_RIGHTS (caked expects none from clients). */
static void send_with_fd(int fd, uint16_t type)
{
    uint8_t h[FRAME_HEADER_BYTES];
    struct frame_header fh = {FRAME_MAGIC, FRAME_VERSION, type, FRAME_FLAG_FDS, 0, 9};
    frame_write_header(h, &fh);
    int mfd = memfd_create("chaos", MFD_CLOEXEC);
    struct iovec iov = {h, sizeof h};
    union {
        struct cmsghdr c;
        char b[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
                         .msg_controllen = sizeof u.b};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS, cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &mfd, sizeof(int));
    sendmsg(fd, &msg, MSG_NOSIGNAL);
    close(mfd);
}

static void drain(int fd)
{
    char b[4096];
    while (recv(fd, b, sizeof b, 0) > 0) {
    }
}

static int chaos_raw(const char *sock, uint64_t seed)
{
    struct rng r = {seed};
    uint8_t buf[8192];
    for (int round = 0; round < 8; round++) {
        int fd = raw_connect(sock);
        if (fd < 0)
            return 1;
        int hello = chance(&r, 60);
        if (hello)
            send_hello(fd, (int)below(&r, 2));
        switch (below(&r, 8)) {
        case 0: /* noise */
            for (size_t i = 0; i < sizeof buf; i++)
                buf[i] = (uint8_t)rnd(&r);
            send_all(fd, buf, 1 + below(&r, sizeof buf));
            break;
        case 1: /* a body over the cap */
            send_frame(fd, (uint16_t)(1 + below(&r, MSG_TYPE_MAX)), 0,
                       FRAME_MAX_BODY + 1 + below(&r, UINT32_MAX - FRAME_MAX_BODY - 1), NULL, 0);
            break;
        case 2: /* a body announced and cut short */
            send_frame(fd, MSG_SEQ_OPEN, 0, 1000, buf, 10);
            break;
        case 3: /* frames of random types with random bodies, replies never read */
            for (int i = 0; i < 200; i++) {
                size_t n = below(&r, 64);
                for (size_t j = 0; j < n; j++)
                    buf[j] = (uint8_t)rnd(&r);
                if (send_frame(fd, (uint16_t)below(&r, 20), 0, (uint32_t)n, buf, n))
                    break;
            }
            break;
        case 4: /* a flood of pings, replies never read */
            for (int i = 0; i < 20000; i++)
                if (send_frame(fd, MSG_PING, 0, 0, NULL, 0))
                    break;
            break;
        case 5:
            send_with_fd(fd, chance(&r, 50) ? MSG_PING : MSG_HELLO);
            break;
        case 6: /* a header one byte at a time, then gone */
            for (int i = 0; i < 10; i++) {
                send_all(fd, "CAKE", 1);
                usleep(1000);
            }
            break;
        default: /* unknown flags, a wrong version */
            send_frame(fd, MSG_PING, 0x80, 0, NULL, 0);
        }
        if (chance(&r, 50))
            drain(fd); /* else close with replies pending */
        close(fd);
    }
    return 0;
}

/* ---- the test ------------------------------------------------------------------------ */

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : dflt;
}

Test(chaos, random_clients_harm_no_one, .timeout = 600)
{
    uint64_t seed = env_u64("CAKE_CHAOS_SEED", (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32));
    int rounds = (int)env_u64("CAKE_CHAOS_ROUNDS", 12);
    printf("chaos: seed %llu, %d rounds (CAKE_CHAOS_SEED, CAKE_CHAOS_ROUNDS)\n",
           (unsigned long long)seed, rounds);
    fflush(stdout);
    /* a small pool, so quotas and exhaustion are hit; the bystander is guaranteed what it
     * needs (the others, admins here, may reweigh their own tenants, not take that) */
    char conf[] = "/tmp/caked-chaos-XXXXXX";
    int cfd = mkstemp(conf);
    cr_assert_geq(cfd, 0);
    const char *text = "tenant bystander min=16M\n";
    cr_assert_eq(write(cfd, text, strlen(text)), (ssize_t)strlen(text));
    close(cfd);
    struct harness h;
    const char *args[] = {"--host-pool", "64M", "--config", conf, NULL};
    cr_assert_eq(harness_start(&h, args), 0);
    unlink(conf);
    unsigned long long base;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &base, &seqs), 0);

    /* the bystander's first sequence id, for the others to name */
    cake_ctx *probe;
    cake_create(&probe);
    cake_set_service(probe, "bystander");
    cr_assert_eq(cake_connect(probe, h.sock, 1), 0);
    struct cake_layout lay = {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 16,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    cake_seq *ps;
    cr_assert_eq(cake_seq_open(probe, &lay, &pol, 64, 0, &ps), 0, "%s", cake_errstr(probe));
    uint64_t foreign = cake_seq_id(ps);

    int stop[2];
    cr_assert_eq(pipe(stop), 0);
    pid_t by = fork();
    if (by == 0) {
        close(stop[1]);
        _exit(bystander(h.sock, stop[0], seed));
    }
    close(stop[0]);
    struct rng r = {seed ^ 0x5eed};
    int died = 0;
    for (int round = 0; round < rounds; round++) {
        pid_t kids[4];
        for (int i = 0; i < 4; i++) {
            uint64_t s = rnd(&r);
            int raw = i == 3;
            if ((kids[i] = fork()) == 0)
                _exit(raw ? chaos_raw(h.sock, s) : chaos_engine(h.sock, s, foreign));
        }
        for (int i = 0; i < 4; i++) {
            int st;
            cr_assert_eq(waitpid(kids[i], &st, 0), kids[i]);
            cr_assert(WIFEXITED(st) && (WEXITSTATUS(st) == 0 || WEXITSTATUS(st) == 3),
                      "seed %llu round %d client %d: %s %d (a crash in libcake?)",
                      (unsigned long long)seed, round, i,
                      WIFSIGNALED(st) ? "signal" : "exit",
                      WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
            died += WEXITSTATUS(st) == 3;
        }
    }
    close(stop[1]);
    int st;
    cr_assert_eq(waitpid(by, &st, 0), by);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "seed %llu: the bystander was harmed",
              (unsigned long long)seed);

    /* the probe's sequence survived everything that named it */
    cr_assert_eq(cake_seq_close(ps), 0, "seed %llu: %s", (unsigned long long)seed,
                 cake_errstr(probe));
    cake_destroy(probe);
    unsigned long long used = ~0ull;
    for (int i = 0; i < 100 && (used != base || seqs); i++) {
        cr_assert_eq(harness_status(&h, &used, &seqs), 0, "seed %llu: caked stopped answering",
                     (unsigned long long)seed);
        if (used != base || seqs)
            usleep(50000);
    }
    cr_assert_eq(used, base, "seed %llu: %llu pages in use at the end, baseline %llu",
                 (unsigned long long)seed, used, base);
    cr_assert_eq(seqs, 0, "seed %llu", (unsigned long long)seed);
    printf("chaos: %d rounds, %d clients died mid-way; every page back\n", rounds, died);
    cr_assert_eq(harness_stop(&h), 0, "seed %llu: caked did not exit cleanly (log %s)",
                 (unsigned long long)seed, h.log);
}
