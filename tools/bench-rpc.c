/* bench-rpc - the control plane of caked, beside Redis as the yardstick.
 *
 *   bench-rpc [--caked PATH] [--io uring|epoll|auto] [--clients 1,8,64] [--requests N]
 *             [--no-redis]
 *
 * Starts its own caked (default: the one built beside this program) on a temporary
 * socket and measures, in one run:
 *  1. round trip (PING) p50/p99 and operations/s at 1, 8 and 64 concurrent client
 *     processes, and the same client harness sending PING to Debian's redis-server over
 *     a Unix socket (started here), with the ratio of the p50s;
 *  2. one batched decode step for 64 sequences x 32 layers (Llama-3.1-8B layout, no
 *     eviction due): p50/p99;
 *  3. a decode step that evicts on a worker (one small host sequence, so the eviction is
 *     short): p50/p99 round trip, and caked's own account of where its job's time went
 *     (caked_work_seconds through cachectl: waiting for a worker, running, back to the
 *     event loop), the hand-off between caked's loop and its workers;
 *  4. a decode client's step latency while another client prefills a 32K-token prompt
 *     (Llama-3.1-8B layout, caked scoring every layer): scoring runs on worker threads,
 *     so the decode client is not stalled for a layer's scoring time;
 *  5. what per-tenant memory costs (each tenant maps only its own pool segments): attach
 *     (connect + HELLO + reserving the pool's range), a new tenant's first sequence open,
 *     and growth: reserving and writing one 32K-token layer (Llama-3.1-8B layout, 128 MiB)
 *     in a tenant that holds no segments yet (segments never used, then segments another
 *     tenant left empty, which get fresh memory), and in a tenant that reuses its own. Uses
 *     only the public API, so the same source measures an older libcake and caked. */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cake/cake.h"
#include "util.h"

static char sock[128], dir[64];
static const char *io = "auto";

static double pct(double *v, size_t n, double p)
{
    return n ? v[(size_t)(p * (double)(n - 1))] : 0.0;
}

static pid_t start_caked(const char *bin)
{
    snprintf(dir, sizeof dir, "/tmp/bench-rpc-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(sock, sizeof sock, "%s/caked.sock", dir);
    pid_t p = fork();
    if (p == 0) {
        if (!freopen("/dev/null", "w", stderr))
            _exit(127);
        execl(bin, bin, "--socket", sock, "--host-pool", "8G", "--io", io, NULL);
        _exit(127);
    }
    for (int i = 0; i < 200; i++) {
        cake_ctx *c;
        cake_create(&c);
        int rc = cake_connect(c, sock, 0);
        cake_destroy(c);
        if (!rc)
            return p;
        usleep(20000);
    }
    return -1;
}

/* One PING to redis over a connected Unix socket (inline protocol). */
static int redis_ping(int fd)
{
    char buf[16];
    if (send(fd, "PING\r\n", 6, MSG_NOSIGNAL) != 6)
        return -1;
    size_t got = 0;
    while (got < 7) { /* "+PONG\r\n" */
        ssize_t k = recv(fd, buf + got, sizeof buf - got, 0);
        if (k <= 0)
            return -1;
        got += (size_t)k;
    }
    return 0;
}

static int redis_connect(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        return -1;
    return fd;
}

/* Each of n processes does `reps` pings (caked, or redis at redis_sock) and writes its
 * latencies to a pipe: the same client harness for both servers. */
static int rtt(int n, int reps, const char *redis_sock, double *p50, double *p99, double *ops)
{
    int fds[2];
    if (pipe(fds))
        return -1;
    double t0 = util_now_s();
    pid_t *kids = calloc((size_t)n, sizeof(pid_t));
    for (int i = 0; i < n; i++) {
        if ((kids[i] = fork()) == 0) {
            close(fds[0]);
            cake_ctx *c = NULL;
            int rfd = -1;
            if (redis_sock) {
                if ((rfd = redis_connect(redis_sock)) < 0)
                    _exit(1);
            } else {
                cake_create(&c);
                if (cake_connect(c, sock, 0))
                    _exit(1);
            }
            double *lat = malloc(sizeof(double) * (size_t)reps);
            for (int r = 0; r < 200; r++) /* warm up */
                if (redis_sock ? redis_ping(rfd) : cake_ping(c))
                    _exit(1);
            for (int r = 0; r < reps; r++) {
                double a = util_now_s();
                if (redis_sock ? redis_ping(rfd) : cake_ping(c))
                    _exit(1);
                lat[r] = util_now_s() - a;
            }
            size_t left = sizeof(double) * (size_t)reps;
            char *p = (char *)lat;
            while (left) {
                ssize_t k = write(fds[1], p, left);
                if (k <= 0)
                    _exit(1);
                p += k, left -= (size_t)k;
            }
            _exit(0);
        }
    }
    close(fds[1]);
    size_t total = (size_t)n * (size_t)reps, got = 0;
    double *all = malloc(sizeof(double) * total);
    while (got < total * sizeof(double)) {
        ssize_t k = read(fds[0], (char *)all + got, total * sizeof(double) - got);
        if (k <= 0)
            break;
        got += (size_t)k;
    }
    double wall = util_now_s() - t0;
    close(fds[0]);
    int st, bad = 0;
    for (int i = 0; i < n; i++) { /* caked is our child too: wait for these only */
        waitpid(kids[i], &st, 0);
        bad += !WIFEXITED(st) || WEXITSTATUS(st);
    }
    free(kids);
    if (bad || got != total * sizeof(double)) {
        free(all);
        return -1;
    }
    qsort(all, total, sizeof(double), util_cmp_double);
    *p50 = pct(all, total, 0.5), *p99 = pct(all, total, 0.99);
    *ops = (double)total / wall;
    free(all);
    return 0;
}

/* Starts redis-server on a Unix socket in a temporary folder; 0 or -1 (why says why). */
static char rdir[64], rsock[128];
static int redis_start(char *why, size_t wl)
{
    char cmd[512];
    snprintf(rdir, sizeof rdir, "/tmp/bench-redis-XXXXXX");
    if (!mkdtemp(rdir)) {
        snprintf(why, wl, "mkdtemp failed");
        return -1;
    }
    snprintf(rsock, sizeof rsock, "%s/redis.sock", rdir);
    snprintf(cmd, sizeof cmd, "redis-server --port 0 --unixsocket %s --save '' --appendonly no "
             "--daemonize yes --pidfile %s/redis.pid --dir %s >/dev/null 2>&1", rsock, rdir, rdir);
    if (system(cmd)) {
        snprintf(why, wl, "redis-server not available (apt-get install redis-server)");
        return -1;
    }
    for (int i = 0; i < 100 && access(rsock, F_OK); i++)
        usleep(20000);
    return access(rsock, F_OK) ? -1 : 0;
}

static void redis_stop(void)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "kill $(cat %s/redis.pid) 2>/dev/null; sleep 0.2; rm -rf %s", rdir, rdir);
    if (system(cmd)) {
    }
}

static int open_seqs(cake_ctx *c, cake_seq **s, int n, uint32_t layers, uint32_t prompt,
                     uint32_t cache, uint32_t max_new, int observe)
{
    struct cake_layout lay = {.layers = layers, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = cache;
    for (int i = 0; i < n; i++) {
        int rc = cake_seq_open(c, &lay, &pol, prompt, max_new, &s[i]);
        for (uint32_t l = 0; !rc && l < layers; l++) {
            rc = cake_prefill_reserve(s[i], l);
            if (!rc && observe)
                rc = cake_prefill_observe(s[i], l, NULL);
        }
        if (rc) {
            fprintf(stderr, "bench-rpc: sequence setup: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
            return rc;
        }
    }
    return 0;
}

static int decode_batch(int nseq, int steps, double *p50, double *p99)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "bench-decode");
    if (cake_connect(c, sock, 1))
        return -1;
    cake_seq **s = calloc((size_t)nseq, sizeof(*s));
    /* prompt 64 <= cache 1024: no eviction is due during the measured steps */
    if (open_seqs(c, s, nseq, 32, 64, 1024, (uint32_t)steps + 8, 1))
        return -1;
    double *lat = malloc(sizeof(double) * (size_t)steps);
    for (int i = 0; i < steps; i++) {
        double a = util_now_s();
        int rc = cake_decode_step(c, s, (size_t)nseq);
        lat[i] = util_now_s() - a;
        if (rc) {
            fprintf(stderr, "bench-rpc: decode step: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
            return -1;
        }
    }
    qsort(lat, (size_t)steps, sizeof(double), util_cmp_double);
    *p50 = pct(lat, (size_t)steps, 0.5), *p99 = pct(lat, (size_t)steps, 0.99);
    free(lat), free(s);
    cake_destroy(c);
    return 0;
}

/* Decode steps that evict on a worker: one small sequence (4 layers of 8/2 heads, d 64,
 * a 512-token prompt kept to 128), each step evicting one token in every layer. Round trip
 * p50/p99 and the mean of each stage of caked's decode jobs over the steps (*hand: queued,
 * run, return). */
static int decode_evicting(int steps, double *p50, double *p99, double hand[3])
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "bench-evict");
    struct cake_layout lay = {.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 128;
    cake_seq *s = NULL;
    double *lat = malloc(sizeof(double) * (size_t)steps);
    double sum0[3] = {0}, n0[3] = {0}, sum1[3] = {0}, n1[3] = {0};
    int rc = lat ? cake_connect(c, sock, 1) : CAKE_EOOM;
    if (!rc)
        rc = cake_seq_open(c, &lay, &pol, 512, (uint32_t)steps + 8, &s);
    for (uint32_t l = 0; !rc && l < lay.layers; l++)
        if (!(rc = cake_prefill_reserve(s, l)))
            rc = cake_prefill_observe(s, l, NULL);
    if (!rc)
        rc = cake_decode_step(c, &s, 1); /* the first step only reserves the new token */
    int counted = !rc && !util_work_seconds(CACHECTL_BIN, sock, "decode", sum0, n0);
    for (int i = 0; i < steps && counted && !rc; i++) {
        double a = util_now_s();
        rc = cake_decode_step(c, &s, 1);
        lat[i] = util_now_s() - a;
    }
    counted = counted && !rc && !util_work_seconds(CACHECTL_BIN, sock, "decode", sum1, n1) &&
              n1[0] - n0[0] == steps;
    if (counted) {
        for (int g = 0; g < 3; g++)
            hand[g] = (sum1[g] - sum0[g]) / steps;
        qsort(lat, (size_t)steps, sizeof(double), util_cmp_double);
        *p50 = pct(lat, (size_t)steps, 0.5), *p99 = pct(lat, (size_t)steps, 0.99);
    } else {
        fprintf(stderr, "bench-rpc: evicting decode: %s (%s), %g jobs counted for %d steps\n",
                cake_strerror(rc), cake_errstr(c), n1[0] - n0[0], steps);
    }
    free(lat);
    if (s)
        cake_seq_close(s);
    cake_destroy(c);
    return counted ? 0 : -1;
}

/* Decode-step latency of one small client, alone or while another client prefills. */
static int decode_beside_prefill(int with_prefill, double *p50, double *p99, double *mx,
                                 double *prefill_s)
{
    pid_t pf = -1;
    int ready[2];
    if (pipe(ready))
        return -1;
    if (with_prefill) {
        pf = fork();
        if (pf == 0) {
            cake_ctx *c;
            cake_create(&c);
            cake_set_service(c, "bench-prefill");
            if (cake_connect(c, sock, 1))
                _exit(1);
            cake_seq *s;
            double a = util_now_s();
            if (open_seqs(c, &s, 1, 32, 32768, 1024, 8, 1))
                _exit(1);
            double t = util_now_s() - a;
            if (write(ready[1], &t, sizeof t) != sizeof t)
                _exit(1);
            _exit(0);
        }
    }
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "bench-small");
    if (cake_connect(c, sock, 1))
        return -1;
    cake_seq *s;
    if (open_seqs(c, &s, 1, 32, 64, 1024, 1000, 1))
        return -1;
    size_t cap = 1 << 20, n = 0;
    double *lat = malloc(sizeof(double) * cap);
    double until = util_now_s() + 2.0;
    for (;;) {
        double a = util_now_s();
        if (cake_decode_step(c, &s, 1))
            return -1;
        lat[n++] = util_now_s() - a;
        if (n == cap || (!with_prefill && util_now_s() > until))
            break;
        if (with_prefill) {
            int st;
            if (waitpid(pf, &st, WNOHANG) == pf)
                break;
        }
        if (n % 900 == 0) { /* a fresh sequence before any eviction is due (cache 1024) */
            cake_seq_close(s);
            if (open_seqs(c, &s, 1, 32, 64, 1024, 1000, 1))
                return -1;
        }
    }
    *prefill_s = 0;
    if (with_prefill && read(ready[0], prefill_s, sizeof *prefill_s) != sizeof *prefill_s)
        return -1;
    close(ready[0]), close(ready[1]);
    qsort(lat, n, sizeof(double), util_cmp_double);
    *p50 = pct(lat, n, 0.5), *p99 = pct(lat, n, 0.99), *mx = lat[n - 1];
    free(lat);
    cake_destroy(c);
    return 0;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), util_cmp_double);
    return v[n / 2];
}

/* One layer of a 32K prompt: reserve it, then write all of its K and V (the page faults of
 * fresh memory are part of what a tenant pays). */
static int grow_layer(cake_ctx *c, cake_seq **s, double *reserve_s, double *write_s)
{
    struct cake_layout lay = {.layers = 1, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.kind = CAKE_POLICY_FULL;
    const uint32_t n = 32768;
    int rc = cake_seq_open(c, &lay, &pol, n, 8, s);
    double a = util_now_s();
    if (!rc)
        rc = cake_prefill_reserve(*s, 0);
    double b = util_now_s();
    for (uint32_t g = 0; !rc && g < 8; g++)
        for (uint32_t t = 0; t < n; t += cake_seq_tokens_per_page(*s)) {
            /* one page's rows of this head are contiguous: write them in one go */
            uint32_t k = n - t < cake_seq_tokens_per_page(*s) ? n - t : cake_seq_tokens_per_page(*s);
            memset(cake_key(*s, 0, g, t), 0x5a, (size_t)k * 256);
            memset(cake_value(*s, 0, g, t), 0xa5, (size_t)k * 256);
        }
    double d = util_now_s();
    if (rc)
        fprintf(stderr, "bench-rpc: growth: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
    *reserve_s = b - a, *write_s = d - b;
    return rc;
}

/* A new context of service prefix-i (not connected). */
static cake_ctx *tenant_ctx(const char *prefix, int i)
{
    cake_ctx *c;
    cake_create(&c);
    char name[32];
    snprintf(name, sizeof name, "%s-%d", prefix, i);
    cake_set_service(c, name);
    return c;
}

static int isolation_costs(void)
{
    enum { N = 40 };
    double att[N], open1[N];
    for (int i = 0; i < N; i++) {
        cake_ctx *c = tenant_ctx("attach", i);
        double a = util_now_s();
        int rc = cake_connect(c, sock, 1);
        double b = util_now_s();
        struct cake_layout lay = {.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                                  .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
        cake_seq *s;
        if (!rc)
            rc = cake_seq_open(c, &lay, NULL, 1024, 64, &s);
        double d = util_now_s();
        if (rc) {
            fprintf(stderr, "bench-rpc: attach/open: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
            return -1;
        }
        att[i] = b - a, open1[i] = d - b;
        cake_destroy(c);
    }
    printf("attach (connect, HELLO, pool mapping): median %.1f us of %d; a new tenant's first "
           "sequence open (32 layers): %.1f us\n", median(att, N) * 1e6, N, median(open1, N) * 1e6);
    /* growth: new tenants one after another, each reserving and writing 128 MiB and leaving */
    enum { G = 96 };
    double res[G], wr[G];
    for (int i = 0; i < G; i++) {
        cake_ctx *c = tenant_ctx("grow", i);
        cake_seq *s;
        if (cake_connect(c, sock, 1) || grow_layer(c, &s, &res[i], &wr[i]))
            return -1;
        cake_destroy(c);
    }
    /* the 8G pool holds 64 such layers: the first tenants take segments never used, the
     * later ones segments earlier tenants left empty */
    double r0[16], w0[16], r1[16], w1[16];
    for (int i = 0; i < 16; i++)
        r0[i] = res[i], w0[i] = wr[i], r1[i] = res[G - 16 + i], w1[i] = wr[G - 16 + i];
    printf("growth, 32K-token layer (128 MiB) in a new tenant: reserve %.2f ms + write %.1f ms "
           "(unused memory); %.2f ms + %.1f ms (memory another tenant left)\n",
           median(r0, 16) * 1e3, median(w0, 16) * 1e3, median(r1, 16) * 1e3, median(w1, 16) * 1e3);
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, "grow-again");
    if (cake_connect(c, sock, 1))
        return -1;
    double rr[16], ww[16];
    for (int i = 0; i < 16; i++) {
        cake_seq *s;
        if (grow_layer(c, &s, &rr[i], &ww[i]))
            return -1;
        cake_seq_close(s);
    }
    printf("growth, the same layer in a tenant reusing its own memory:     reserve %.2f ms + write %.1f ms\n",
           median(rr + 1, 15) * 1e3, median(ww + 1, 15) * 1e3);
    cake_destroy(c);
    return 0;
}

int main(int argc, char **argv)
{
    char bin[4096];
    snprintf(bin, sizeof bin, "%s", CAKED_BIN);
    int clients[8] = {1, 8, 64}, nc = 3, reps = 20000, use_redis = 1;
    static const struct option opts[] = {
        {"caked", 1, 0, 'c'}, {"clients", 1, 0, 'n'}, {"requests", 1, 0, 'r'},
        {"no-redis", 0, 0, 'R'}, {"io", 1, 0, 'i'}, {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'c': snprintf(bin, sizeof bin, "%s", optarg); break;
        case 'n':
            nc = 0;
            for (char *t = strtok(optarg, ","); t && nc < 8; t = strtok(NULL, ","))
                clients[nc++] = atoi(t);
            break;
        case 'r': reps = atoi(optarg); break;
        case 'R': use_redis = 0; break;
        case 'i': io = optarg; break;
        default: fprintf(stderr, "usage: bench-rpc [--caked PATH] [--io uring|epoll|auto] [--clients 1,8,64] [--requests N] [--no-redis]\n"); return 2;
        }
    }
    pid_t caked = start_caked(bin);
    if (caked < 0) {
        fprintf(stderr, "bench-rpc: cannot start %s\n", bin);
        return 1;
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    printf("bench-rpc: caked %s (--io %s) on %ld cores, PING round trips over a Unix socket\n", CAKE_VERSION, io, cores);
    printf("%8s %11s %11s %12s   %11s %11s %12s %8s\n", "clients", "caked_p50", "caked_p99",
           "caked_ops/s", "redis_p50", "redis_p99", "redis_ops/s", "p50x");
    char why[128] = "--no-redis";
    int have_redis = use_redis && !redis_start(why, sizeof why);
    for (int i = 0; i < nc; i++) {
        int per = clients[i] > 1 ? reps / clients[i] * 2 : reps;
        double p50, p99, ops, r50 = 0, r99 = 0, rops = 0;
        if (rtt(clients[i], per, NULL, &p50, &p99, &ops)) {
            fprintf(stderr, "bench-rpc: round trips failed\n");
            break;
        }
        if (have_redis && !rtt(clients[i], per, rsock, &r50, &r99, &rops))
            printf("%8d %9.1fus %9.1fus %12.0f   %9.1fus %9.1fus %12.0f %7.2fx\n", clients[i],
                   p50 * 1e6, p99 * 1e6, ops, r50 * 1e6, r99 * 1e6, rops, p50 / r50);
        else
            printf("%8d %9.1fus %9.1fus %12.0f   (redis: %s)\n", clients[i], p50 * 1e6, p99 * 1e6,
                   ops, why);
        fflush(stdout);
    }
    if (have_redis)
        redis_stop();
    double p50, p99, mx, pf;
    if (!decode_batch(64, 300, &p50, &p99))
        printf("decode step, 64 sequences x 32 layers (Llama-3.1-8B layout): p50 %.1f us, p99 %.1f us\n",
               p50 * 1e6, p99 * 1e6);
    fflush(stdout);
    double hand[3];
    if (!decode_evicting(300, &p50, &p99, hand))
        printf("decode step evicting on a worker (1 sequence, 4 small layers): p50 %.1f us, p99 %.1f us; "
               "caked's account, mean: waiting for a worker %.1f us, run %.1f us, back to the loop %.1f us\n",
               p50 * 1e6, p99 * 1e6, hand[0] * 1e6, hand[1] * 1e6, hand[2] * 1e6);
    fflush(stdout);
    if (!decode_beside_prefill(0, &p50, &p99, &mx, &pf))
        printf("decode step of 1 sequence x 32 layers, alone:                  p50 %.1f us, p99 %.1f us, max %.1f us\n",
               p50 * 1e6, p99 * 1e6, mx * 1e6);
    fflush(stdout);
    if (!decode_beside_prefill(1, &p50, &p99, &mx, &pf))
        printf("... while another client prefills 32K tokens x 32 layers:     p50 %.1f us, p99 %.1f us, max %.1f us "
               "(that prefill: %.2f s, %.1f ms of scoring per layer)\n",
               p50 * 1e6, p99 * 1e6, mx * 1e6, pf, pf / 32 * 1e3);
    fflush(stdout);
    isolation_costs();
    kill(caked, SIGTERM);
    waitpid(caked, NULL, 0);
    rmdir(dir);
    return 0;
}
