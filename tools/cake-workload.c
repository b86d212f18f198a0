/* cake-workload - several engine processes against a running caked.
 *
 *   cake-workload [--socket PATH] [--engines P] [--seqs S] [--layers L] [--heads H]
 *                 [--kv-heads K] [--head-dim D] [--prompt N] [--cache C] [--window W]
 *                 [--decode T] [--mode fixed|parity] [--hold SECS] [--seed X]
 *                 [--no-shrink-idle]
 *
 * Forks P engines (tenants engine-0 .. engine-P-1). Each opens S sequences, prefills
 * synthetic prompts with structured attention layer by layer (reserve, write K/V and the
 * window queries into the pool, observe: caked scores, allocates and compacts), holds for
 * SECS seconds (so cachectl can look; SIGUSR1 to cake-workload ends the hold early), then
 * decodes T steps of all its sequences at once and closes them. Prints one line per engine
 * (with how often caked re-sliced its sequences to make room); exit status 0 only if every
 * engine succeeded. Engines let caked shrink their idle sequences inside their calls
 * (cake_set_shrink_idle) unless --no-shrink-idle. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cake/cake.h"
#include "dtype.h"
#include "synth.h"
#include "util.h"

struct opts {
    const char *socket;
    int engines, seqs, decode, hold, no_shrink;
    struct synth_cfg sc;
    uint32_t cache;
    int mode;
};

#define CHECK(call)                                                                         \
    do {                                                                                    \
        int rc_ = (call);                                                                   \
        if (rc_ < 0) {                                                                      \
            fprintf(stderr, "engine %d: %s: %s (%s)\n", id, #call, cake_strerror(rc_),     \
                    cake_errstr(ctx));                                                      \
            return 1;                                                                       \
        }                                                                                   \
    } while (0)

static volatile sig_atomic_t hold_over;
static void end_hold(int sig)
{
    (void)sig;
    hold_over = 1;
}

static int engine(const struct opts *o, int id)
{
    cake_ctx *ctx;
    char name[32];
    snprintf(name, sizeof name, "engine-%d", id);
    if (cake_create(&ctx))
        return 1;
    CHECK(cake_set_service(ctx, name));
    CHECK(cake_set_shrink_idle(ctx, !o->no_shrink));
    CHECK(cake_connect(ctx, o->socket, 1));
    struct synth_cfg sc = o->sc;
    uint32_t L = sc.layers, H = sc.q_heads, Hkv = sc.kv_heads, d = sc.head_dim, n = sc.n, w = sc.window;
    struct cake_layout lay = {.layers = L, .q_heads = H, .kv_heads = Hkv, .head_dim = d,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.mode = (enum cake_mode)o->mode, pol.cache_size = o->cache, pol.window = w;
    size_t half = (size_t)Hkv * n * d;
    uint16_t *k = malloc(half * 2), *v = malloc(half * 2), *q = malloc((size_t)H * w * d * 2);
    cake_seq **seqs = calloc((size_t)o->seqs, sizeof(*seqs));
    if (!k || !v || !q || !seqs)
        return 1;
    double t0 = util_now_s();
    uint64_t held = 0;
    for (int s = 0; s < o->seqs; s++) {
        CHECK(cake_seq_open(ctx, &lay, &pol, n, (uint32_t)o->decode, &seqs[s]));
        sc.seed = o->sc.seed * 1000003u + (uint64_t)id * 1009u + (uint64_t)s;
        for (uint32_t l = 0; l < L; l++) {
            CHECK(cake_prefill_reserve(seqs[s], l));
            synth_layer(&sc, l, k, v, q, NULL);
            for (uint32_t g = 0; g < Hkv; g++)
                for (uint32_t t = 0; t < n; t++) {
                    memcpy(cake_key(seqs[s], l, g, t), k + ((size_t)g * n + t) * d, d * 2);
                    memcpy(cake_value(seqs[s], l, g, t), v + ((size_t)g * n + t) * d, d * 2);
                }
            memcpy(cake_queries(seqs[s], l), q, (size_t)H * w * d * 2);
            double pref;
            CHECK(cake_prefill_observe(seqs[s], l, &pref));
        }
        for (uint32_t l = 0; l < L; l++)
            held += cake_layer_tokens(seqs[s], l);
    }
    double t_prefill = util_now_s() - t0;
    for (time_t end = time(NULL) + o->hold; !hold_over && time(NULL) < end;)
        sleep(1); /* SIGUSR1 cuts it short */
    double *lat = calloc((size_t)o->decode + 1, sizeof(double));
    uint16_t row[4096];
    for (int step = 0; step < o->decode; step++) {
        double ts = util_now_s();
        CHECK(cake_decode_step(ctx, seqs, (size_t)o->seqs));
        lat[step] = util_now_s() - ts;
        for (int s = 0; s < o->seqs; s++)
            for (uint32_t l = 0; l < L; l++) {
                uint32_t slot = cake_layer_tokens(seqs[s], l) - 1;
                for (uint32_t g = 0; g < Hkv; g++) { /* the new token: plain noise */
                    for (uint32_t x = 0; x < d; x++)
                        row[x] = kern_f32_to_bf16((float)((rand() % 2001) - 1000) / 1000.0f);
                    memcpy(cake_key(seqs[s], l, g, slot), row, d * 2);
                    memcpy(cake_value(seqs[s], l, g, slot), row, d * 2);
                }
                uint8_t *qr = cake_decode_query(seqs[s], l);
                for (uint32_t h = 0; h < H; h++)
                    memcpy(qr + (size_t)h * w * d * 2, q + ((size_t)h * w + w - 1) * d, d * 2);
            }
    }
    qsort(lat, (size_t)o->decode, sizeof(double), util_cmp_double);
    uint64_t after = 0;
    uint32_t reslices = 0;
    for (int s = 0; s < o->seqs; s++) {
        reslices += cake_seq_reslices(seqs[s]);
        for (uint32_t l = 0; l < L; l++)
            after += cake_layer_tokens(seqs[s], l);
    }
    for (int s = 0; s < o->seqs; s++)
        CHECK(cake_seq_close(seqs[s]));
    printf("engine-%d: %d sequences x %u layers x %u tokens prefilled in %.2f s; held %.1f%% "
           "of the full cache after prefill; %d decode steps, p50 %.0f us, max %.0f us; "
           "%.1f%% held after decode; re-sliced %u times\n", id, o->seqs, L, n, t_prefill,
           100.0 * held / ((double)o->seqs * L * n), o->decode,
           o->decode ? lat[o->decode / 2] * 1e6 : 0.0, o->decode ? lat[o->decode - 1] * 1e6 : 0.0,
           100.0 * after / ((double)o->seqs * L * (n + o->decode)), reslices);
    fflush(stdout);
    free(lat), free(k), free(v), free(q), free(seqs);
    cake_destroy(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o = {NULL, 3, 2, 64, 0, 0, {8, 8, 2, 64, 4096, 32, 1}, 256, CAKE_MODE_FIXED};
    static const struct option lo[] = {
        {"socket", 1, 0, 's'}, {"engines", 1, 0, 'e'}, {"seqs", 1, 0, 'S'}, {"layers", 1, 0, 'L'},
        {"heads", 1, 0, 'H'}, {"kv-heads", 1, 0, 'K'}, {"head-dim", 1, 0, 'D'},
        {"prompt", 1, 0, 'n'}, {"cache", 1, 0, 'C'}, {"window", 1, 0, 'w'},
        {"decode", 1, 0, 'T'}, {"mode", 1, 0, 'm'}, {"hold", 1, 0, 'h'}, {"seed", 1, 0, 'x'},
        {"no-shrink-idle", 0, 0, 'N'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 's': o.socket = optarg; break;
        case 'e': o.engines = atoi(optarg); break;
        case 'S': o.seqs = atoi(optarg); break;
        case 'L': o.sc.layers = (uint32_t)atoi(optarg); break;
        case 'H': o.sc.q_heads = (uint32_t)atoi(optarg); break;
        case 'K': o.sc.kv_heads = (uint32_t)atoi(optarg); break;
        case 'D': o.sc.head_dim = (uint32_t)atoi(optarg); break;
        case 'n': o.sc.n = (uint32_t)atoi(optarg); break;
        case 'C': o.cache = (uint32_t)atoi(optarg); break;
        case 'w': o.sc.window = (uint32_t)atoi(optarg); break;
        case 'T': o.decode = atoi(optarg); break;
        case 'm': o.mode = strcmp(optarg, "parity") ? CAKE_MODE_FIXED : CAKE_MODE_PARITY; break;
        case 'h': o.hold = atoi(optarg); break;
        case 'x': o.sc.seed = strtoull(optarg, NULL, 0); break;
        case 'N': o.no_shrink = 1; break;
        default: fprintf(stderr, "cake-workload: see the top of tools/cake-workload.c\n"); return 2;
        }
    }
    if (o.engines < 1 || o.seqs < 1 || o.decode < 0 || o.sc.head_dim > 4096 ||
        !o.sc.kv_heads || o.sc.q_heads % o.sc.kv_heads) {
        fprintf(stderr, "cake-workload: bad sizes\n");
        return 2;
    }
    printf("cake-workload: %d engines x %d sequences, %u layers, %u/%u heads, head_dim %u, "
           "prompt %u, cache %u per layer, %d decode steps\n", o.engines, o.seqs, o.sc.layers,
           o.sc.q_heads, o.sc.kv_heads, o.sc.head_dim, o.sc.n, o.cache, o.decode);
    fflush(stdout);
    struct sigaction sa = {.sa_handler = end_hold}; /* no SA_RESTART: wait() returns */
    sigaction(SIGUSR1, &sa, NULL);
    pid_t *kids = calloc((size_t)o.engines, sizeof(*kids));
    for (int i = 0; kids && i < o.engines; i++) {
        pid_t p = fork();
        if (p == 0)
            _exit(engine(&o, i));
        if (p < 0) {
            perror("fork");
            return 1;
        }
        kids[i] = p;
    }
    int failed = 0, st, forwarded = 0;
    for (;;) {
        if (hold_over && !forwarded) { /* pass the end of the hold on to every engine */
            for (int i = 0; i < o.engines; i++)
                kill(kids[i], SIGUSR1);
            forwarded = 1;
        }
        pid_t p = wait(&st);
        if (p > 0)
            failed += !WIFEXITED(st) || WEXITSTATUS(st);
        else if (errno != EINTR)
            break;
    }
    free(kids);
    if (failed)
        fprintf(stderr, "cake-workload: %d engines failed\n", failed);
    return failed ? 1 : 0;
}
