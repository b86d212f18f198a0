/* Pressure on the GPU pool (daemon/pressure.h): caked makes room by re-slicing GPU sequences
 * with its CUDA kernels, and every byte left is where caked says it is.
 *
 *  - a prefilled GPU sequence gives room to a full-cache prompt that does not fit beside it
 *    (its engine lets caked shrink its idle sequences): every layer keeps a subset of what
 *    it held, at most its lowered budget plus the window, the window intact, the K/V bytes
 *    of every slot the original row caked's account names; a host twin fed the same K/V and
 *    queries, re-sliced under the same pressure in the host pool, keeps the same tokens up
 *    to its budget (the pools' other pages differ a little) and float rounding: top-k sets
 *    are nested, so the shorter prefix lies inside the longer; the idle sequence's device
 *    page tables follow its re-slice;
 *  - a GPU prompt that does not fit alone completes: the cascade's total comes down, each
 *    layer holds its budget plus the window, bytes and account agree;
 *  - parking: a GPU sequence parked in the host pool gives its GPU pages back and shows
 *    none; restored (on request, or by its next decode step) it holds the same tokens byte
 *    for byte; under pressure=park caked parks the idle sequence instead of re-slicing it;
 *  - another tenant beyond its share gives room: a GPU prompt within its own share waits while
 *    caked drains the other's least used GPU segment for it; the other's sequences shrink and
 *    move (device to device) at their own decode steps, and every slot of both tenants holds
 *    the bytes of the position caked names (cachectl's metrics count the pages moved).
 * Exit 77 without a GPU. */
#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include "dtype.h"
#include "../integration/harness.h"
#include "gputest.h"

enum { L = 4, H = 8, HKV = 2, D = 64, W = 32, ROW = D * 2, NMAX = 12288 };

static cake_ctx *ctx_now; /* for cake_errstr in messages */

/* the K/V rows written: distinct random bf16 rows, [L][HKV][NMAX][D]; and the queries */
static uint16_t (*Ko)[HKV][NMAX][D], (*Vo)[HKV][NMAX][D];
static uint16_t Q[L][H][W][D];

static void fill(void)
{
    for (int l = 0; l < L; l++) {
        for (int g = 0; g < HKV; g++)
            for (int t = 0; t < NMAX; t++)
                for (int j = 0; j < D; j++) {
                    Ko[l][g][t][j] = kern_f32_to_bf16(gauss() * (t % 97 == 0 ? 3.0f : 1.0f));
                    Vo[l][g][t][j] = kern_f32_to_bf16(gauss());
                }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                for (int j = 0; j < D; j++)
                    Q[l][h][i][j] = kern_f32_to_bf16(gauss() * (1.0f + (float)l));
    }
}

static cake_seq *open_seq_new(cake_ctx *c, int gpu, uint32_t n, uint32_t cache, int full,
                              uint32_t max_new)
{
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = cache, pol.window = W;
    if (full)
        pol.kind = CAKE_POLICY_FULL;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = HKV, .head_dim = D,
                              .dtype = CAKE_BF16,
                              .placement = gpu ? CAKE_PLACE_GPU : CAKE_PLACE_HOST};
    cake_seq *s = NULL;
    int rc = cake_seq_open(c, &lay, &pol, n, max_new, &s);
    CHECK(rc == 0, "open (%s, n %u): %s (%s)", gpu ? "GPU" : "host", n, cake_strerror(rc),
          cake_errstr(c));
    return s;
}

static cake_seq *open_seq(cake_ctx *c, int gpu, uint32_t n, uint32_t cache, int full)
{
    return open_seq_new(c, gpu, n, cache, full, 4);
}

/* Reserves, writes and observes every layer of s (n tokens of Ko/Vo, the queries Q):
 * 0 or the first failing call's code, with which layer and call in *what. */
static int prefill_rc(cake_seq *s, uint32_t n, int *layer, const char **what)
{
    for (int l = 0; l < L; l++) {
        *layer = l, *what = "reserve";
        int rc = cake_prefill_reserve(s, l);
        if (rc)
            return rc;
        for (int g = 0; g < HKV; g++) { /* each head's rows are one run of slots per page */
            for (uint32_t t = 0; t < n; t++) {
                put(s, cake_key(s, l, g, t), Ko[l][g][t], ROW);
                put(s, cake_value(s, l, g, t), Vo[l][g][t], ROW);
            }
        }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++)
                put(s, cake_query_row(s, l, h, i), Q[l][h][i], ROW);
        double p;
        *what = "observe";
        if ((rc = cake_prefill_observe(s, l, &p)))
            return rc;
    }
    return 0;
}

static void prefill(cake_seq *s, uint32_t n)
{
    int l;
    const char *what;
    int rc = fails ? 0 : prefill_rc(s, n, &l, &what);
    CHECK(rc == 0, "%s %d: %s (%s)", what, l, cake_strerror(rc), cake_errstr(ctx_now));
}

/* caked's account of layer l, head g (pos[tokens]) checked against the bytes of every slot. */
static uint32_t account(cake_seq *s, int l, int g, uint32_t *pos)
{
    uint32_t n = 0;
    int rc = cake_kept_positions(s, l, g, pos, NMAX, &n);
    CHECK(rc == 0, "positions: %s", cake_strerror(rc));
    uint16_t k[D], v[D];
    for (uint32_t i = 0; i < n && !fails; i++) {
        get(s, k, cake_key(s, l, g, i), ROW);
        get(s, v, cake_value(s, l, g, i), ROW);
        CHECK(pos[i] < NMAX && !memcmp(k, Ko[l][g][pos[i]], ROW) && !memcmp(v, Vo[l][g][pos[i]], ROW),
              "layer %d head %d slot %u: the bytes are not position %u's", l, g, i, pos[i]);
    }
    return n;
}

/* a (any order: a GPU decode step fills holes) within b (ascending) */
static int subset(const uint32_t *a0, uint32_t na, const uint32_t *b, uint32_t nb)
{
    uint32_t *a = malloc(sizeof(uint32_t) * (na + 1));
    int ok = a != NULL;
    if (ok) {
        memcpy(a, a0, sizeof(uint32_t) * na);
        qsort(a, na, sizeof(uint32_t), gputest_u32_cmp);
    }
    for (uint32_t i = 0, j = 0; ok && i < na; i++) {
        while (j < nb && b[j] < a[i])
            j++;
        ok = j < nb && b[j] == a[i];
    }
    free(a);
    return ok;
}

static uint32_t before[L][HKV][NMAX], after_[L][HKV][NMAX], twin[L][HKV][NMAX];
static uint32_t nbefore[L][HKV];

/* A gives room to F (full cache) in the pool its placement uses; returns A's budgets. */
static void give_room(const char *sock, int gpu, uint32_t (*got)[HKV][NMAX], uint32_t *budgets,
                      uint32_t *reslices)
{
    cake_ctx *c = harness_client(sock, gpu ? "gpu-svc" : "host-svc", 1, 0);
    CHECK(c != NULL, "connect");
    if (!c)
        return;
    cake_destroy(c); /* again, with shrink_idle (harness_client connects at once) */
    CHECK(cake_create(&c) == 0 && cake_set_service(c, gpu ? "gpu-svc" : "host-svc") == 0 &&
              cake_set_shrink_idle(c, 1) == 0 && cake_connect(c, sock, 1) == 0,
          "connect with shrink_idle: %s", cake_errstr(c));
    ctx_now = c;
    cake_seq *a = open_seq(c, gpu, 4096, 2048, 0);
    if (!fails)
        prefill(a, 4096);
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++)
            nbefore[l][g] = account(a, l, g, before[l][g]);
    const int32_t *tok_dev = NULL, *pg_dev = NULL;
    uint32_t mp = 0;
    if (gpu && !fails) /* device tables made now: libcake must follow the re-slice */
        CHECK(cake_device_tables(a, &tok_dev, &pg_dev, &mp) == 0, "device tables");
    cake_seq *f = fails ? NULL : open_seq(c, gpu, 4096, 4096, 1);
    if (f)
        prefill(f, 4096);
    *reslices = fails ? 0 : cake_seq_reslices(a);
    if (tok_dev && !fails) { /* a was idle while it shrank: its tables still say what it holds */
        int32_t t[L];
        CHECK(cudaMemcpy(t, tok_dev, sizeof t, cudaMemcpyDeviceToHost) == cudaSuccess, "D2H");
        for (int l = 0; l < L; l++)
            CHECK((uint32_t)t[l] == cake_layer_tokens(a, l), "layer %d: device table says %d "
                  "tokens, the descriptor %u", l, t[l], cake_layer_tokens(a, l));
    }
    for (int l = 0; l < L && !fails; l++) {
        budgets[l] = cake_layer_budget(a, l);
        uint32_t n = cake_layer_tokens(a, l);
        CHECK(n <= budgets[l] + W, "%s layer %d: %u tokens over budget %u + w", gpu ? "GPU" : "host",
              l, n, budgets[l]);
        for (int g = 0; g < HKV; g++) {
            uint32_t m = account(a, l, g, got[l][g]);
            CHECK(m == n, "layer %d head %d: account %u, tokens %u", l, g, m, n);
            CHECK(subset(got[l][g], m, before[l][g], nbefore[l][g]), "layer %d head %d: a token "
                  "it had not kept", l, g);
            CHECK(!memcmp(got[l][g] + m - W, before[l][g] + nbefore[l][g] - W, 4 * W),
                  "layer %d head %d: the window moved", l, g);
        }
    }
    cake_destroy(c);
}

static void test_prefilled_gives_room(const char *gsock, const char *hsock)
{
    uint32_t bg[L], bh[L], rg = 0, rh = 0;
    give_room(gsock, 1, after_, bg, &rg);
    CHECK(rg >= 1, "the GPU sequence was not re-sliced");
    give_room(hsock, 0, twin, bh, &rh);
    CHECK(rh >= 1, "the host twin was not re-sliced");
    double worst = 1;
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++) { /* the prefixes: tokens - w slots */
            uint32_t ng = bg[l], nh = bh[l];
            double o = overlap(after_[l][g], ng, twin[l][g], nh);
            worst = o < worst ? o : worst;
        }
    CHECK(worst >= 0.95, "GPU and host re-slices keep different tokens: overlap %.3f", worst);
    printf("prefilled GPU sequence re-sliced %u times (host twin %u); budgets GPU %u %u %u %u, "
           "host %u %u %u %u; kept prefixes vs the host's: overlap >= %.3f\n", rg, rh, bg[0],
           bg[1], bg[2], bg[3], bh[0], bh[1], bh[2], bh[3], worst);
}

static void test_prompt_restaged(const char *gsock)
{
    cake_ctx *c = harness_client(gsock, "gpu-prompt", 1, 0);
    CHECK(c != NULL, "connect");
    if (!c)
        return;
    ctx_now = c;
    uint32_t n = NMAX, C = 8192;
    cake_seq *s = open_seq(c, 1, n, C, 0);
    if (!fails)
        prefill(s, n); /* layer 0 alone keeps 12256 tokens of a total of 32640 */
    uint64_t total = 0;
    static uint32_t pos[NMAX];
    for (int l = 0; l < L && !fails; l++) {
        uint32_t b = cake_layer_budget(s, l), t = cake_layer_tokens(s, l);
        total += b;
        CHECK(t == b + W, "layer %d: %u tokens, budget %u", l, t, b);
        for (int g = 0; g < HKV; g++) {
            uint32_t m = account(s, l, g, pos);
            for (uint32_t i = 1; i < m; i++)
                CHECK(pos[i] > pos[i - 1], "layer %d head %d: positions out of order", l, g);
            CHECK(m >= W && pos[m - W] == n - W, "layer %d head %d: the window", l, g);
        }
    }
    CHECK(!fails && cake_seq_reslices(s) >= 1, "the prompt was not re-sliced");
    CHECK(total < (uint64_t)(C - W) * L, "total %llu not below %u", (unsigned long long)total,
          (C - W) * L);
    printf("GPU prompt of %u tokens in a pool too small for it: re-sliced %u times, %llu of %u "
           "tokens kept\n", n, cake_seq_reslices(s), (unsigned long long)total, (C - W) * L);
    cake_destroy(c);
}

/* Every layer's positions and bytes (account) equal what was recorded in want[][]. */
static void same_as(cake_seq *s, uint32_t (*want)[HKV][NMAX], uint32_t (*nwant)[HKV], const char *what)
{
    static uint32_t pos[NMAX];
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++) {
            uint32_t n = account(s, l, g, pos);
            CHECK(n == nwant[l][g] && !memcmp(pos, want[l][g], 4 * n), "%s: layer %d head %d "
                  "holds other tokens (%u, had %u)", what, l, g, n, nwant[l][g]);
        }
}

/* After a decode step of a (prompt of 4096, prefilled, nothing evicted): the new token
 * (position 4096) written into its slot, every layer holds what it held before the step
 * and that token, byte for byte. */
static void after_step(cake_seq *a, const char *what)
{
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++) {
            uint32_t slot = cake_layer_tokens(a, l) - 1;
            put(a, cake_key(a, l, g, slot), Ko[l][g][4096], ROW);
            put(a, cake_value(a, l, g, slot), Vo[l][g][4096], ROW);
        }
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++) {
            static uint32_t pos[NMAX];
            uint32_t n = account(a, l, g, pos);
            CHECK(n == nbefore[l][g] + 1 && !memcmp(pos, before[l][g], 4 * (n - 1)),
                  "%s: layer %d head %d", what, l, g);
        }
}

/* Parking: on request (and back on request or by a decode step), and by caked under
 * pressure=park; every token comes back byte for byte, the GPU pages go and return. */
static void test_park(const char *sock, const struct harness *hp, const char *psock)
{
    cake_ctx *c = harness_client(sock, "park-svc", 1, 0);
    CHECK(c != NULL, "connect");
    if (!c)
        return;
    ctx_now = c;
    cake_seq *a = open_seq(c, 1, 4096, 2048, 0);
    if (!fails)
        prefill(a, 4096);
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++)
            nbefore[l][g] = account(a, l, g, before[l][g]);
    unsigned long long used0 = 0, gused0 = 0, used1 = 0, gused1 = 0;
    unsigned seqs = 0;
    CHECK(harness_status_gpu(hp, &used0, &seqs, &gused0) == 0, "status");
    int rc = cake_seq_park(a, 1);
    CHECK(rc == 0 && cake_seq_parked(a), "park: %s (%s)", cake_strerror(rc), cake_errstr(c));
    CHECK(cake_layer_tokens(a, 0) == 0 && !cake_key(a, 0, 0, 0), "a parked sequence shows pages");
    CHECK(harness_status_gpu(hp, &used1, &seqs, &gused1) == 0, "status");
    CHECK(gused1 < gused0 && used1 > used0, "parking moved no pages: GPU %llu -> %llu, host %llu "
          "-> %llu", gused0, gused1, used0, used1);
    CHECK(cake_seq_park(a, 1) == 0, "parking a parked sequence is a no-op");
    rc = cake_seq_park(a, 0);
    CHECK(rc == 0 && !cake_seq_parked(a), "restore: %s (%s)", cake_strerror(rc), cake_errstr(c));
    same_as(a, before, nbefore, "parked and restored");
    CHECK(cake_seq_park(a, 1) == 0 && cake_seq_parked(a), "park again");
    rc = cake_decode_step(c, &a, 1); /* brings it back by itself */
    CHECK(rc == 0 && !cake_seq_parked(a), "decode of a parked sequence: %s (%s)", cake_strerror(rc),
          cake_errstr(c));
    after_step(a, "after the restoring step");
    cake_seq *h = NULL;
    struct cake_layout lay = {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 16,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 8, pol.window = 4;
    CHECK(cake_seq_open(c, &lay, &pol, 8, 0, &h) == 0 && cake_seq_park(h, 1) == CAKE_EINVAL,
          "a host sequence does not park");
    cake_destroy(c);
    printf("parking: on request and back (by request and by a decode step), byte for byte; "
           "GPU pool pages %llu -> %llu while parked, host %llu -> %llu\n", gused0, gused1, used0,
           used1);

    /* pressure=park: the full-cache prompt's room comes from parking the idle sequence */
    CHECK(cake_create(&c) == 0 && cake_set_service(c, "park-svc") == 0 &&
              cake_set_shrink_idle(c, 1) == 0 && cake_connect(c, psock, 1) == 0,
          "connect: %s", cake_errstr(c));
    ctx_now = c;
    a = open_seq(c, 1, 4096, 2048, 0);
    if (!fails)
        prefill(a, 4096);
    for (int l = 0; l < L && !fails; l++)
        for (int g = 0; g < HKV; g++)
            nbefore[l][g] = account(a, l, g, before[l][g]);
    cake_seq *f = fails ? NULL : open_seq(c, 1, 4096, 4096, 1);
    if (f)
        prefill(f, 4096);
    CHECK(!fails && cake_seq_parked(a) && cake_seq_reslices(a) == 0, "pressure=park: parked %d, "
          "re-sliced %u", cake_seq_parked(a), cake_seq_reslices(a));
    /* a's next step needs its GPU room back while f holds it: f, idle now, is parked */
    int rc2 = fails ? -1 : cake_decode_step(c, &a, 1);
    CHECK(rc2 == 0 && !cake_seq_parked(a) && cake_seq_parked(f), "a's step under pressure=park: "
          "%s (%s), a parked %d, f parked %d", cake_strerror(rc2), cake_errstr(c),
          cake_seq_parked(a), cake_seq_parked(f));
    after_step(a, "parked by caked, back by its step");
    cake_destroy(c);
    printf("pressure=park: the idle GPU sequence parked (not re-sliced), and back for its next "
           "step byte for byte by parking the other\n");
}

/* The small tenant's prompt, on its own thread: it waits for the big tenant's steps. */
struct small_run {
    const char *sock;
    int rc, done;
};

static void *small_prompt(void *arg)
{
    struct small_run *r = arg;
    cake_ctx *c = NULL;
    if (cake_create(&c) || cake_set_service(c, "gsmall") || cake_connect(c, r->sock, 1)) {
        r->rc = -1;
        goto out;
    }
    cake_seq *f = open_seq(c, 1, 4096, 4096, 1);
    int layer;
    const char *what;
    r->rc = f ? prefill_rc(f, 4096, &layer, &what) : -1;
    static uint32_t pos[NMAX];
    for (int l = 0; l < L && !r->rc; l++)
        for (int g = 0; g < HKV; g++)
            CHECK(account(f, l, g, pos) == 4096, "the small tenant's layer %d head %d", l, g);
out:
    if (r->rc)
        fprintf(stderr, "small tenant: %s (%s)\n", cake_strerror(r->rc), c ? cake_errstr(c) : "");
    cake_destroy(c);
    __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Three GPU sequences of "gbig" fill the pool alone; "gsmall" attaches (big's share halves)
 * and prefills a full-cache prompt that fits only in a segment of big's. */
static void test_cross_tenant(const char *sock)
{
    enum { NB = 3 };
    cake_ctx *c = NULL;
    CHECK(cake_create(&c) == 0 && cake_set_service(c, "gbig") == 0 && cake_connect(c, sock, 1) == 0,
          "connect: %s", cake_errstr(c));
    ctx_now = c;
    cake_seq *a[NB] = {0};
    static uint32_t bpos[NB][L][HKV][NMAX], nb[NB][L][HKV];
    for (int i = 0; i < NB && !fails; i++) {
        a[i] = open_seq_new(c, 1, 4096, 3800, 0, 64);
        if (fails)
            break;
        prefill(a[i], 4096);
        for (int l = 0; l < L && !fails; l++)
            for (int g = 0; g < HKV; g++)
                nb[i][l][g] = account(a[i], l, g, bpos[i][l][g]);
    }
    struct small_run r = {.sock = sock};
    pthread_t th;
    int started = !fails && pthread_create(&th, NULL, small_prompt, &r) == 0;
    CHECK(fails || started, "thread");
    uint32_t rs = 0;
    for (int k = 0; k < 300 && started && !rs; k++) {
        for (int i = 0; i < NB; i++)
            rs += cake_seq_reslices(a[i]);
        if (!rs)
            usleep(10000);
    }
    CHECK(!started || rs > 0, "the big tenant's budgets were not lowered");
    CHECK(!started || !__atomic_load_n(&r.done, __ATOMIC_ACQUIRE), "the prompt did not wait");
    int steps = 0;
    for (; started && !fails && steps < 60 && !__atomic_load_n(&r.done, __ATOMIC_ACQUIRE); steps++)
        for (int i = 0; i < NB && !fails; i++) {
            int rc = cake_decode_step(c, &a[i], 1);
            CHECK(rc == 0, "big's step %d: %s (%s)", steps, cake_strerror(rc), cake_errstr(c));
            for (int l = 0; l < L && !rc; l++) /* the step's token: position 4096 + step */
                for (int g = 0; g < HKV; g++) {
                    uint32_t slot = cake_layer_tokens(a[i], l) - 1;
                    put(a[i], cake_key(a[i], l, g, slot), Ko[l][g][4096 + steps], ROW);
                    put(a[i], cake_value(a[i], l, g, slot), Vo[l][g][4096 + steps], ROW);
                }
        }
    if (started)
        pthread_join(th, NULL);
    CHECK(!started || r.rc == 0, "the small tenant's prompt failed");
    static uint32_t pos[NMAX];
    for (int i = 0; i < NB && !fails; i++)
        for (int l = 0; l < L && !fails; l++)
            for (int g = 0; g < HKV; g++) {
                uint32_t n = account(a[i], l, g, pos), m = 0; /* every slot's bytes */
                for (uint32_t j = 0; j < n; j++) /* the prompt's (decoded ones fill holes too) */
                    if (pos[j] < 4096)
                        pos[m++] = pos[j];
                CHECK(subset(pos, m, bpos[i][l][g], nb[i][l][g]), "big %d layer %d head %d: a "
                      "token it had not kept", i, l, g);
            }
    double moved = harness_metric(sock, "caked_pages_relocated_total");
    if (!getenv("CACHECTL_BIN"))
        printf("cross-tenant: CACHECTL_BIN unset, the pages moved not counted\n");
    else
        CHECK(moved > 0, "no page was relocated (%.0f)", moved);
    cake_destroy(c);
    printf("cross-tenant: the small tenant's prompt completed after %d steps of the big one; "
           "%.0f GPU pages moved device to device, every slot's bytes where caked says\n",
           steps, moved);
}

int main(void)
{
    rng = 777;
    if (!gputest_has_gpu()) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    Ko = malloc(sizeof(*Ko) * L), Vo = malloc(sizeof(*Vo) * L);
    if (!Ko || !Vo)
        return 1;
    fill();
    /* 64 KiB pages hold 128 tokens of a layer: A (4096 tokens, cache 2048) ~68 pages, the
     * full-cache prompt 132; a 12 MiB GPU pool holds 192. The host caked the same. */
    struct harness g, h, p;
    const char *gx[] = {"--gpu-pool", "12M", "--segment-size", "4M", NULL};
    const char *hx[] = {"--host-pool", "12M", "--segment-size", "4M", NULL};
    const char *px[] = {"--gpu-pool", "12M", "--segment-size", "4M", "--pressure", "park", NULL};
    if (harness_start(&g, gx) || harness_start(&h, hx) || harness_start(&p, px)) {
        fprintf(stderr, "FAIL: caked did not start\n");
        return 1;
    }
    struct harness x;
    const char *xx[] = {"--gpu-pool", "32M", "--segment-size", "4M", NULL};
    if (harness_start(&x, xx)) {
        fprintf(stderr, "FAIL: caked did not start\n");
        return 1;
    }
    test_cross_tenant(x.sock);
    if (harness_stop(&x)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        fails++;
    }
    test_prefilled_gives_room(g.sock, h.sock);
    if (!fails)
        test_prompt_restaged(g.sock);
    if (!fails)
        test_park(g.sock, &g, p.sock);
    if (harness_stop(&g) || harness_stop(&h) || harness_stop(&p)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        fails++;
    }
    printf("%s\n", fails ? "FAILED" : "GPU pressure: re-slices on the GPU keep what caked says");
    return fails ? 1 : 0;
}
