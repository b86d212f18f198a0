/* Two services sharing one GPU budget: caked --gpu-pool 256M with two configured tenants,
 * "small" (weight 1, gpu-max 48M) and "big" (weight 3, gpu-min 96M). One engine process per
 * service opens GPU sequences until caked refuses (CAKE_EOOM, with the reason); each ends
 * within its bounds (small at most 48 MiB and close to it; big past its minimum, at most its
 * 3/7 share beside "other"), together within the pool; an administrator's tenant list shows both with the GPU
 * bytes their sequences hold; a third service cannot take big's unmet minimum; closing gives
 * every page back. Exit 77 without a GPU. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake.pb-c.h"
#include "cake/cake.h"
#include "frame.h"
#include "internal.h"
#include "../integration/harness.h"
#include "gputest.h"

#define MB (1ull << 20)


/* An engine of `service`: GPU sequences (2 MiB of K/V each) until refused; tells how many
 * on `up`, then holds them until a byte arrives on `down`. Exit 0, or 1 with the reason. */
static int engine(const char *sock, const char *service, int up, int down, int max)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, service);
    if (cake_connect(c, sock, 1) || !cake_gpu_pool_base_at(c, 0)) {
        fprintf(stderr, "%s: connect / GPU pool: %s\n", service, cake_errstr(c));
        return 1;
    }
    struct cake_layout lay = {.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
    struct cake_policy pol;
    cake_policy_default(&pol);
    int n = 0, rc = 0;
    while (n < max) {
        cake_seq *s;
        if ((rc = cake_seq_open(c, &lay, &pol, 1024, 0, &s)))
            break;
        for (uint32_t l = 0; l < lay.layers && !rc; l++)
            rc = cake_prefill_reserve(s, l);
        if (rc) {
            cake_seq_close(s);
            break;
        }
        n++;
    }
    if (n < max && rc != CAKE_EOOM) {
        fprintf(stderr, "%s: refused with %s, not CAKE_EOOM (%s)\n", service, cake_strerror(rc),
                cake_errstr(c));
        return 1;
    }
    if (write(up, &n, sizeof n) != sizeof n)
        return 1;
    char b;
    if (read(down, &b, 1) != 1)
        return 1;
    cake_destroy(c); /* closes its sequences */
    return 0;
}

struct child {
    pid_t pid;
    int up[2], down[2], n;
};

static int spawn(struct child *k, const char *sock, const char *service, int max)
{
    if (pipe(k->up) || pipe(k->down))
        return -1;
    k->pid = fork();
    if (k->pid == 0)
        _exit(engine(sock, service, k->up[1], k->down[0], max));
    return read(k->up[0], &k->n, sizeof k->n) == sizeof k->n ? 0 : -1;
}

static int reap(struct child *k)
{
    char b = 1;
    int st;
    if (write(k->down[1], &b, 1) != 1 || waitpid(k->pid, &st, 0) != k->pid)
        return -1;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* GPU bytes held and cap of a tenant, from an administrator's TENANTS. */
static int gpu_of(const char *sock, const char *name, uint64_t *used, uint64_t *cap)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_admin(c, 1);
    int rc = cake_connect(c, sock, 0);
    uint8_t *b = NULL;
    size_t n = 0;
    if (!rc)
        rc = cake_internal_rpc(c, MSG_TENANTS, NULL, &b, &n);
    int found = -1;
    if (!rc) {
        ProtobufCAllocator al = cake_internal_allocator(c);
        Cake__TenantList *r = cake__tenant_list__unpack(&al, n, b);
        for (size_t i = 0; r && i < r->n_tenants; i++)
            if (!strcmp(r->tenants[i]->name, name))
                *used = r->tenants[i]->gpu_used_bytes, *cap = r->tenants[i]->gpu_cap_bytes,
                found = 0;
        if (r)
            cake__tenant_list__free_unpacked(r, &al);
        cake_internal_free(c, b);
    }
    cake_destroy(c);
    return found;
}

int main(void)
{
    if (!gputest_has_gpu()) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    char conf[] = "/tmp/caked-share-XXXXXX";
    int fd = mkstemp(conf);
    dprintf(fd, "tenant small weight=1 gpu-max=48M\ntenant big weight=3 gpu-min=96M\n"
                "tenant other weight=3\n");
    close(fd);
    chmod(conf, 0600);
    struct harness h;
    const char *extra[] = {"--gpu-pool", "256M", "--config", conf, NULL};
    int rc = 0;
#define FAIL(...) (fprintf(stderr, "FAIL: " __VA_ARGS__), fputc('\n', stderr), rc = 1)
    if (harness_start(&h, extra)) {
        fprintf(stderr, "FAIL: caked did not start with a GPU pool and the tenants\n");
        unlink(conf);
        return 1;
    }
    struct child small, big, other;
    uint64_t su = 0, sc = 0, bu = 0, bc = 0, ou = 0, oc = 0;
    if (spawn(&small, h.sock, "small", 1000) || spawn(&other, h.sock, "other", 4) ||
        spawn(&big, h.sock, "big", 1000))
        FAIL("an engine did not report");
    if (gpu_of(h.sock, "small", &su, &sc) || gpu_of(h.sock, "big", &bu, &bc) ||
        gpu_of(h.sock, "other", &ou, &oc))
        FAIL("the tenants are not all listed");
    printf("small: %d sequences, %llu MiB of GPU pool (cap %llu); big: %d, %llu MiB (cap %llu); "
           "other: %d, %llu MiB (cap %llu)\n", small.n, (unsigned long long)(su / MB),
           (unsigned long long)(sc / MB), big.n, (unsigned long long)(bu / MB),
           (unsigned long long)(bc / MB), other.n, (unsigned long long)(ou / MB),
           (unsigned long long)(oc / MB));
    if (sc != 48 * MB || su > 48 * MB || su < 40 * MB)
        FAIL("small holds %llu of a 48 MiB gpu-max (cap shown %llu)", (unsigned long long)su,
             (unsigned long long)sc);
    if (bu < 96 * MB || bu > 256 * MB * 3 / 7 || bc != 256 * MB * 3 / 7)
        FAIL("big holds %llu bytes (cap %llu): below its minimum or past its 3/7 share",
             (unsigned long long)bu, (unsigned long long)bc);
    if (su + bu + ou > 256 * MB)
        FAIL("the tenants hold more than the pool");
    /* other (weight 3, 4 sequences at most) opened before big filled its minimum: it got
     * what it asked without touching big's minimum */
    if (other.n != 4 || ou == 0)
        FAIL("other opened %d of 4 sequences", other.n);
    if (reap(&small) || reap(&big) || reap(&other))
        FAIL("an engine did not exit cleanly");
    unsigned long long used = 1, gused = 1;
    unsigned seqs = 1;
    for (int i = 0; i < 100; i++) {
        if (!harness_status_gpu(&h, &used, &seqs, &gused) && !used && !gused && !seqs)
            break;
        usleep(20000);
    }
    if (used || gused || seqs)
        FAIL("after the engines left: %llu host pages, %llu GPU pages, %u sequences", used, gused,
             seqs);
    if (harness_stop(&h))
        FAIL("caked did not stop cleanly");
    unlink(conf);
    printf("%s\n", rc ? "FAILED" : "two services share one GPU budget within their bounds");
    return rc;
}
