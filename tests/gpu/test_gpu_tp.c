/* Tensor parallel over two GPUs through one caked with a GPU pool per GPU.
 *
 * caked runs `--gpu-pool SIZE@UUID0 --gpu-pool SIZE@UUID1`. Two rank processes, each seeing
 * only its own GPU (CUDA_VISIBLE_DEVICES), attach (each maps only its GPU's pool), open the two
 * shards of one sequence (half the kv heads each) in their GPU's pool, write K/V and window
 * queries there and prefill layer by layer; caked scores each shard on its GPU and allocates
 * once per layer for the group. Checked: both ranks end with identical per-layer budgets, and
 * with exactly the kept tokens of a single process holding all heads on one GPU; then a rank
 * is killed while the other waits at a layer: the waiting rank gets CAKE_ENOSEQ, and both
 * shards' pages are back in both pools. Exit 77 with fewer than two GPUs. */
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

enum { L = 4, H = 8, HKV = 4, G = H / HKV, D = 64, N = 700, W = 32, CACHE = 128 };
enum { ROW = D * 2, HALF = HKV / 2 };

static uint16_t Ko[L][HKV][N][D], Vo[L][HKV][N][D], Qo[L][H][W][D];

/* what a run reports: per layer the budget, per (layer, kv head) the kept positions */
struct result {
    uint32_t budget[L], tokens[L];
    int pos[L][HKV][N];
};

static void fill(void)
{
    float row[D];
    for (int l = 0; l < L; l++) {
        float sharp = 0.4f + 2.5f * (float)l / L; /* layers differ, so budgets differ */
        for (int g = 0; g < HKV; g++)
            for (int t = 0; t < N; t++) {
                float amp = t == 0 ? 4.0f : 1.0f;
                for (int x = 0; x < D; x++)
                    row[x] = amp * gauss();
                kern_from_f32(KERN_BF16, row, Ko[l][g][t], D);
                for (int x = 0; x < D; x++)
                    row[x] = gauss();
                kern_from_f32(KERN_BF16, row, Vo[l][g][t], D);
            }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < W; i++) {
                for (int x = 0; x < D; x++)
                    row[x] = sharp * gauss();
                kern_from_f32(KERN_BF16, row, Qo[l][h][i], D);
            }
    }
}

/* GPU UUIDs of devices 0 and 1, probed in a child (no CUDA context before the forks). */
static int probe(char uuid[2][48])
{
    int pfd[2];
    if (pipe(pfd))
        return 0;
    pid_t p = fork();
    if (p == 0) {
        int n = 0;
        char out[96] = {0};
        if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2)
            _exit(1);
        for (int d = 0; d < 2; d++) {
            struct cudaDeviceProp pr;
            cudaGetDeviceProperties(&pr, d);
            const unsigned char *u = (const unsigned char *)pr.uuid.bytes;
            snprintf(out + 48 * d, 48,
                     "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                     u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
                     u[12], u[13], u[14], u[15]);
        }
        _exit(write(pfd[1], out, sizeof out) == sizeof out ? 0 : 1);
    }
    close(pfd[1]);
    char in[96];
    ssize_t k = read(pfd[0], in, sizeof in);
    close(pfd[0]);
    int st;
    waitpid(p, &st, 0);
    if (k != sizeof in || !WIFEXITED(st) || WEXITSTATUS(st))
        return 0;
    memcpy(uuid[0], in, 48), memcpy(uuid[1], in + 48, 48);
    return 1;
}

/* One process: heads [g0, g0 + nh) of every layer (shard `shard` of 2, or the whole
 * sequence when shard < 0) on the GPU named uuid. crash: die at layer 0 instead. */
static int rank(const char *sock, const char *uuid, int visible, int g0, int nh, int shard,
                int crash, int out_fd)
{
    char vis[8];
    snprintf(vis, sizeof vis, "%d", visible);
    setenv("CUDA_VISIBLE_DEVICES", vis, 1);
    cake_ctx *c;
    cake_create(&c);
    cake_set_timeout_ms(c, 60000); /* a broken barrier fails the test, never hangs it */
    if (cake_connect(c, sock, 1)) {
        fprintf(stderr, "connect: %s\n", cake_errstr(c));
        return 2;
    }
    int gi = -1;
    for (uint32_t i = 0; i < cake_gpu_count(c); i++) {
        if (!strcmp(cake_gpu_uuid_at(c, i), uuid))
            gi = (int)i;
        else /* this process cannot use the other GPU, so it did not map that pool */
            CHECK(cake_gpu_pool_base_at(c, i) == 0, "mapped another GPU's pool");
    }
    CHECK(cake_gpu_count(c) == 2, "caked lists %u GPU pools", cake_gpu_count(c));
    if (gi < 0 || !cake_gpu_pool_base_at(c, (uint32_t)gi)) {
        fprintf(stderr, "own GPU pool not mapped: %s\n", cake_errstr(c));
        return 2;
    }
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = CACHE, pol.window = W;
    struct cake_layout lay = {.layers = L, .q_heads = (uint32_t)(nh * G), .kv_heads = (uint32_t)nh, .head_dim = D,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU, .gpu = (uint32_t)gi};
    cake_seq *s;
    int rc = shard >= 0 ? cake_seq_open_shard(c, &lay, &pol, N, 0, 0x7E57, 2, (uint32_t)shard, &s)
                        : cake_seq_open(c, &lay, &pol, N, 0, &s);
    if (rc) {
        fprintf(stderr, "open: %s (%s)\n", cake_strerror(rc), cake_errstr(c));
        return 2;
    }
    struct result *res = calloc(1, sizeof(*res));
    for (int l = 0; l < L && !fails; l++) {
        CHECK(cake_prefill_reserve(s, l) == 0, "reserve %d", l);
        for (int g = 0; g < nh; g++)
            for (int t = 0; t < N; t++) {
                CU(cudaMemcpy(cake_key(s, l, g, t), Ko[l][g0 + g][t], ROW, cudaMemcpyHostToDevice));
                CU(cudaMemcpy(cake_value(s, l, g, t), Vo[l][g0 + g][t], ROW, cudaMemcpyHostToDevice));
            }
        CHECK(cake_put_queries(s, l, Qo[l][g0 * G], W, NULL) == 0, "queries %d", l);
        CU(cudaDeviceSynchronize());
        if (crash && l == 0) {
            sleep(1); /* the other rank has joined and waits for this one at layer 0 */
            raise(SIGKILL);
        }
        double pref;
        rc = cake_prefill_observe(s, l, &pref);
        if (rc) {
            fprintf(stderr, "rank %d observe %d: %s (%s)\n", shard, l, cake_strerror(rc),
                    cake_errstr(c));
            free(res);
            cake_destroy(c);
            return rc == CAKE_ENOSEQ ? 3 : 1;
        }
    }
    uint16_t k[D], v[D];
    for (int l = 0; l < L; l++) {
        res->budget[l] = cake_layer_budget(s, l), res->tokens[l] = cake_layer_tokens(s, l);
        for (int g = 0; g < nh; g++)
            for (uint32_t i = 0; i < res->tokens[l] && i < N; i++) {
                CU(cudaMemcpy(k, cake_key(s, l, g, i), ROW, cudaMemcpyDeviceToHost));
                CU(cudaMemcpy(v, cake_value(s, l, g, i), ROW, cudaMemcpyDeviceToHost));
                int p = -1;
                for (int t = 0; t < N && p < 0; t++)
                    if (!memcmp(k, Ko[l][g0 + g][t], ROW))
                        p = memcmp(v, Vo[l][g0 + g][t], ROW) ? -2 : t;
                res->pos[l][g0 + g][i] = p;
            }
    }
    CHECK(write(out_fd, res, sizeof *res) == (ssize_t)sizeof *res, "report");
    free(res);
    cake_destroy(c);
    fflush(stdout);
    return fails ? 1 : 0;
}

/* A process seeing both GPUs maps both pools, or only the one cake_set_gpus() names. */
static int attach_filter(const char *sock, const char *want)
{
    cake_ctx *c;
    cake_create(&c);
    if (want)
        CHECK(cake_set_gpus(c, want) == 0, "cake_set_gpus");
    if (cake_connect(c, sock, 1)) {
        fprintf(stderr, "connect: %s\n", cake_errstr(c));
        return 2;
    }
    CHECK(cake_set_gpus(c, "") == CAKE_EINVAL, "cake_set_gpus after connect accepted");
    for (uint32_t i = 0; i < cake_gpu_count(c); i++) {
        int mapped = cake_gpu_pool_base_at(c, i) != 0;
        int expect = !want || !strcmp(cake_gpu_uuid_at(c, i), want);
        CHECK(mapped == expect, "pool %u (%s): mapped %d, expected %d", i, cake_gpu_uuid_at(c, i),
              mapped, expect);
    }
    CHECK(cake_gpu_count(c) == 2, "%u pools listed", cake_gpu_count(c));
    cake_destroy(c);
    fflush(stdout);
    return fails ? 1 : 0;
}

static int run_child(int (*fn)(const char *, const char *), const char *sock, const char *want)
{
    fflush(stdout); /* the child must not print the parent's buffered lines again */
    pid_t p = fork();
    if (p == 0)
        _exit(fn(sock, want));
    int st;
    waitpid(p, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

static pid_t spawn(const char *sock, const char *uuid, int visible, int g0, int nh, int shard,
                   int crash, int *rfd)
{
    int pfd[2];
    if (pipe(pfd))
        return -1;
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        close(pfd[0]);
        _exit(rank(sock, uuid, visible, g0, nh, shard, crash, pfd[1]));
    }
    close(pfd[1]);
    *rfd = pfd[0];
    return p;
}

static int collect(pid_t p, int fd, struct result *r)
{
    size_t got = 0;
    ssize_t k;
    while (got < sizeof *r && (k = read(fd, (char *)r + got, sizeof *r - got)) > 0)
        got += (size_t)k;
    close(fd);
    int st;
    waitpid(p, &st, 0);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    return got == sizeof *r ? code : code ? code : 1;
}

int main(void)
{
    rng = 777;
    char uuid[2][48];
    if (!probe(uuid)) {
        printf("SKIP: needs two CUDA devices\n");
        return 77;
    }
    fill();
    struct harness h;
    char g0[80], g1[80];
    snprintf(g0, sizeof g0, "256M@%s", uuid[0]);
    snprintf(g1, sizeof g1, "256M@%s", uuid[1]);
    const char *extra[] = {"--gpu-pool", g0, "--gpu-pool", g1, NULL};
    if (harness_start(&h, extra)) {
        fprintf(stderr, "FAIL: caked did not start with two GPU pools\n");
        return 1;
    }
    CHECK(run_child(attach_filter, h.sock, NULL) == 0, "both GPUs visible: both pools mapped");
    CHECK(run_child(attach_filter, h.sock, uuid[1]) == 0, "cake_set_gpus: only the named pool");
    printf("attach: a process seeing both GPUs maps both pools; cake_set_gpus(%s) maps that one\n",
           uuid[1]);
    static struct result ref, r0, r1;
    int fd, fa, fb;
    pid_t p = spawn(h.sock, uuid[0], 0, 0, HKV, -1, 0, &fd); /* all heads, one process */
    CHECK(collect(p, fd, &ref) == 0, "single-process run failed");
    pid_t a = spawn(h.sock, uuid[0], 0, 0, HALF, 0, 0, &fa);
    pid_t b = spawn(h.sock, uuid[1], 1, HALF, HALF, 1, 0, &fb);
    int ra = collect(a, fa, &r0), rb = collect(b, fb, &r1);
    CHECK(ra == 0 && rb == 0, "ranks exited %d and %d", ra, rb);
    int differ = 0;
    for (int l = 0; l < L && !fails; l++) {
        CHECK(r0.budget[l] == r1.budget[l], "layer %d: ranks record budgets %u and %u", l,
              r0.budget[l], r1.budget[l]);
        CHECK(r0.budget[l] == ref.budget[l], "layer %d: budget %u, single process %u", l,
              r0.budget[l], ref.budget[l]);
        CHECK(r0.tokens[l] == ref.tokens[l] && r1.tokens[l] == ref.tokens[l], "layer %d tokens", l);
        differ |= ref.budget[l] != ref.budget[0];
        for (int g = 0; g < HKV; g++) {
            const struct result *r = g < HALF ? &r0 : &r1;
            CHECK(!memcmp(r->pos[l][g], ref.pos[l][g], sizeof(int) * ref.tokens[l]),
                  "layer %d head %d: kept tokens differ from the single process", l, g);
            for (uint32_t i = 0; i < ref.tokens[l]; i++)
                CHECK(ref.pos[l][g][i] >= 0, "layer %d head %d slot %u not an original row", l, g, i);
        }
    }
    CHECK(differ, "budgets should differ across layers");
    printf("two ranks on %s and %s: budgets", uuid[0], uuid[1]);
    for (int l = 0; l < L; l++)
        printf(" %u", r0.budget[l]);
    printf(" on both, kept tokens equal to one process over all heads\n");

    /* a rank dies while the other waits at layer 0 */
    a = spawn(h.sock, uuid[0], 0, 0, HALF, 0, 0, &fa);
    b = spawn(h.sock, uuid[1], 1, HALF, HALF, 1, 1, &fb);
    rb = collect(b, fb, &r1), ra = collect(a, fa, &r0);
    CHECK(rb == 128 + SIGKILL, "the crashing rank exited %d", rb);
    CHECK(ra == 3, "the waiting rank exited %d (3: CAKE_ENOSEQ)", ra);
    unsigned long long used = 1, gused = 1;
    unsigned seqs = 1;
    for (int i = 0; i < 100; i++) {
        if (harness_status_gpu(&h, &used, &seqs, &gused) == 0 && !used && !gused && !seqs)
            break;
        usleep(20000);
    }
    CHECK(!used && !gused && !seqs, "after the kill: %llu host pages, %llu GPU pages, %u sequences",
          used, gused, seqs);
    printf("killing one rank freed both shards (GPU pages in use: %llu)\n", gused);
    CHECK(harness_stop(&h) == 0, "caked exit status");
    if (fails)
        return 1;
    printf("PASS\n");
    return 0;
}
