/* Clients killed with SIGKILL at random points (mid-prefill, mid-decode, mid-request)
 * have every page returned at once; a client running beside them is not affected; pool
 * accounting returns exactly to its baseline. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../proto/frame.h"
#include "cake.pb-c.h"
#include "cake/cake.h"
#include "harness.h"
#include "internal.h"

/* Pool bytes the victims' tenants hold now (caked's metrics, read as an administrator). */
static unsigned long long victims_bytes(const char *sock)
{
    cake_ctx *a = harness_client(sock, "cachectl", 0, 1);
    cr_assert_not_null(a);
    uint8_t *b;
    size_t n;
    cr_assert_eq(cake_internal_rpc(a, MSG_METRICS, NULL, &b, &n), 0, "%s", cake_errstr(a));
    ProtobufCAllocator al = cake_internal_allocator(a);
    Cake__Metrics *m = cake__metrics__unpack(&al, n, b);
    cake_internal_free(a, b);
    cr_assert_not_null(m);
    unsigned long long sum = 0;
    const char *key = "caked_tenant_used_bytes{tenant=\"victim-";
    for (const char *p = strstr(m->text, key); p; p = strstr(p + 1, key)) {
        const char *v = strchr(p, '}');
        cr_assert_not_null(v);
        sum += strtoull(v + 1, NULL, 10);
    }
    cake__metrics__free_unpacked(m, &al);
    cake_destroy(a);
    return sum;
}

/* Opens sequences, prefills and decodes forever (until killed). */
static void victim(const char *sock, unsigned seed)
{
    srand(seed);
    cake_ctx *c;
    cake_create(&c);
    char name[32];
    snprintf(name, sizeof name, "victim-%u", seed % 4);
    cake_set_service(c, name);
    if (cake_connect(c, sock, 1))
        _exit(1);
    struct cake_layout lay = {.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64 + (uint32_t)(rand() % 64), pol.window = 16;
    for (;;) {
        cake_seq *s;
        uint32_t n = 300 + (uint32_t)(rand() % 3000);
        if (cake_seq_open(c, &lay, &pol, n, 64, &s))
            continue;
        for (uint32_t l = 0; l < lay.layers; l++) {
            if (cake_prefill_reserve(s, l))
                break;
            for (uint32_t g = 0; g < lay.kv_heads; g++)
                for (uint32_t t = 0; t < n; t += 7)
                    memset(cake_key(s, l, g, t), rand() & 0x3f, 64 * 2);
            memset(cake_queries(s, l), rand() & 0x3f, 8 * 16 * 64 * 2);
            cake_prefill_observe(s, l, NULL);
        }
        for (int step = 0; step < 20; step++)
            if (cake_decode_step(c, &s, 1))
                break;
        if (rand() % 3)
            cake_seq_close(s); /* else: leave it open for the kill to find */
    }
}

/* A well-behaved engine: full cycles, each must succeed. */
static int bystander(const char *sock, int cycles)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "bystander");
    if (cake_connect(c, sock, 1))
        return 1;
    struct cake_layout lay = {.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 96, pol.window = 16;
    for (int i = 0; i < cycles; i++) {
        cake_seq *s;
        int rc = cake_seq_open(c, &lay, &pol, 2000, 32, &s);
        for (uint32_t l = 0; !rc && l < lay.layers; l++) {
            rc = cake_prefill_reserve(s, l);
            if (!rc)
                rc = cake_prefill_observe(s, l, NULL);
        }
        for (int step = 0; !rc && step < 16; step++)
            rc = cake_decode_step(c, &s, 1);
        for (uint32_t l = 0; !rc && l < lay.layers; l++)
            if (cake_layer_tokens(s, l) > cake_layer_budget(s, l) + 16 + 1)
                rc = -1000;
        if (!rc)
            rc = cake_seq_close(s);
        if (rc) {
            fprintf(stderr, "bystander cycle %d: %d %s\n", i, rc, cake_errstr(c));
            return 1;
        }
    }
    cake_destroy(c);
    return 0;
}

Test(kill, random_sigkill_returns_every_page, .timeout = 180)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    unsigned long long base;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &base, &seqs), 0);
    pid_t by = fork();
    if (by == 0)
        _exit(bystander(h.sock, 40));
    srand((unsigned)time(NULL));
    int kills = 0, held = 0;
    for (int round = 0; round < 12; round++) {
        pid_t v[4];
        for (int i = 0; i < 4; i++)
            if ((v[i] = fork()) == 0)
                victim(h.sock, (unsigned)(round * 4 + i + rand()));
        usleep(50000 + (useconds_t)(rand() % 400000)); /* somewhere mid-work */
        held += victims_bytes(h.sock) > 0; /* what the kills below must give back */
        for (int i = 0; i < 4; i++) {
            kill(v[i], SIGKILL);
            waitpid(v[i], NULL, 0);
            kills++;
        }
    }
    int st;
    waitpid(by, &st, 0);
    cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the bystander was disturbed");
    /* the daemon notices each death when it reads EOF; give it a moment */
    unsigned long long used = ~0ull;
    for (int i = 0; i < 100 && used != base; i++) {
        cr_assert_eq(harness_status(&h, &used, &seqs), 0);
        if (used != base)
            usleep(50000);
    }
    cr_assert_geq(held, 6, "the victims held pages when killed in only %d rounds of 12", held);
    cr_assert_eq(used, base, "after %d kills: %llu pages in use, baseline %llu", kills, used, base);
    cr_assert_eq(victims_bytes(h.sock), 0);
    cr_assert_eq(seqs, 0);
    cr_assert_eq(harness_stop(&h), 0);
}
