/* caked under bad input: malformed, truncated, oversize frames, unknown types, wrong ids,
 * over-quota requests, version mismatch, another uid, SIGTERM. Each time: a clear error to
 * that client, a counter in the metrics, and the daemon keeps serving everyone else. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <errno.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../proto/frame.h"
#include "../../proto/shm.h"
#include "cake.pb-c.h"
#include "cake/cake.h"
#include "harness.h"
#include "internal.h"

static int raw_connect(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static void send_frame(int fd, uint32_t magic, uint16_t type, uint32_t len_field,
                       const void *body, size_t body_len)
{
    uint8_t h[FRAME_HEADER_BYTES];
    struct frame_header fh = {magic, FRAME_VERSION, type, 0, len_field, 42};
    frame_write_header(h, &fh);
    cr_assert_eq(send(fd, h, sizeof h, MSG_NOSIGNAL), (ssize_t)sizeof h);
    if (body_len)
        cr_assert_eq(send(fd, body, body_len, MSG_NOSIGNAL), (ssize_t)body_len);
}

/* Reads one reply; returns its type and the error code if it is an error (else 0). */
static int read_reply(int fd, int *code, char *msg, size_t msglen)
{
    uint8_t h[FRAME_HEADER_BYTES];
    ssize_t n = recv(fd, h, sizeof h, MSG_WAITALL);
    if (n != (ssize_t)sizeof h)
        return -1;
    struct frame_header fh;
    cr_assert_eq(frame_parse_header(h, &fh), 0);
    uint8_t *b = malloc(fh.body_len + 1);
    if (fh.body_len) /* a 0-byte MSG_WAITALL recv would wait for the timeout */
        cr_assert_eq(recv(fd, b, fh.body_len, MSG_WAITALL), (ssize_t)fh.body_len);
    *code = 0;
    if (fh.type == MSG_ERROR) {
        Cake__Error *e = cake__error__unpack(NULL, fh.body_len, b);
        cr_assert_not_null(e);
        *code = e->code;
        snprintf(msg, msglen, "%s", e->message);
        cake__error__free_unpacked(e, NULL);
    }
    free(b);
    return fh.type;
}

static int is_closed(int fd)
{
    char c;
    return recv(fd, &c, 1, 0) == 0;
}

static uint64_t metric(const char *sock, const char *name)
{
    cake_ctx *c;
    cake_create(&c);
    cr_assert_eq(cake_connect(c, sock, 0), 0);
    uint8_t *b;
    size_t n;
    cr_assert_eq(cake_internal_rpc(c, MSG_METRICS, NULL, &b, &n), 0);
    ProtobufCAllocator al = cake_internal_allocator(c);
    Cake__Metrics *m = cake__metrics__unpack(&al, n, b);
    cake_internal_free(c, b);
    const char *p = strstr(m->text, name);
    cr_assert_not_null(p, "metric %s missing", name);
    uint64_t v = strtoull(p + strlen(name) + 1, NULL, 10);
    cake__metrics__free_unpacked(m, &al);
    cake_destroy(c);
    return v;
}

/* A STATUS field, asked by an administrator connection (counted in `clients`). */
static unsigned status_field(const char *sock, int tenants)
{
    cake_ctx *c = harness_client(sock, "cachectl", 0, 1);
    cr_assert_not_null(c);
    uint8_t *b;
    size_t n;
    cr_assert_eq(cake_internal_rpc(c, MSG_STATUS, NULL, &b, &n), 0);
    ProtobufCAllocator al = cake_internal_allocator(c);
    Cake__Status *st = cake__status__unpack(&al, n, b);
    cake_internal_free(c, b);
    unsigned t = tenants ? st->tenants : st->clients; /* tenants: those TENANTS lists */
    cake__status__free_unpacked(st, &al);
    cake_destroy(c);
    return t;
}

/* every tenant caked holds, listed or not (the gauge counts them all) */
static unsigned status_tenants(const char *sock) { return (unsigned)metric(sock, "\ncaked_tenants"); }
static unsigned status_clients(const char *sock) { return status_field(sock, 0); }

static cake_ctx *engine(const char *sock, const char *name)
{
    cake_ctx *c = harness_client(sock, name, 1, 0);
    cr_assert_not_null(c);
    return c;
}

/* A control connection that asks for administration (as cachectl does). */
static cake_ctx *admin(const char *sock)
{
    cake_ctx *c = harness_client(sock, "cachectl", 0, 1);
    cr_assert_not_null(c);
    return c;
}

Test(safety, malformed_frames_get_errors_and_the_daemon_keeps_serving, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *bystander = engine(h.sock, "bystander");
    int code;
    char msg[256];

    /* bad magic: error, then the stream is closed */
    int fd = raw_connect(h.sock);
    send_frame(fd, 0xdeadbeef, MSG_PING, 0, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_EPROTO, "%s", msg);
    cr_assert(is_closed(fd));
    close(fd);

    /* oversize body: refused before anything is allocated */
    fd = raw_connect(h.sock);
    send_frame(fd, FRAME_MAGIC, MSG_HELLO, 0x7fffffff, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_ETOOBIG, "%s", msg);
    cr_assert(is_closed(fd));
    close(fd);

    /* unknown type with a sane frame: error, body skipped, connection still usable */
    fd = raw_connect(h.sock);
    send_frame(fd, FRAME_MAGIC, 999, 5, "xxxxx", 5);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_EPROTO);
    cr_assert(strstr(msg, "unknown message type"), "%s", msg);
    send_frame(fd, FRAME_MAGIC, MSG_PING, 0, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_PING | FRAME_REPLY);

    /* garbage protobuf body: error, still usable */
    uint8_t junk[16];
    memset(junk, 0xff, sizeof junk);
    send_frame(fd, FRAME_MAGIC, MSG_HELLO, sizeof junk, junk, sizeof junk);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_EPROTO, "%s", msg);

    /* a request before HELLO */
    send_frame(fd, FRAME_MAGIC, MSG_STATUS, 0, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_ESTATE, "%s", msg);

    /* a reply type sent as a request */
    send_frame(fd, FRAME_MAGIC, MSG_PING | FRAME_REPLY, 0, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_EPROTO);
    close(fd);

    /* truncated frame, then the peer vanishes mid-body */
    fd = raw_connect(h.sock);
    send_frame(fd, FRAME_MAGIC, MSG_HELLO, 100, "abc", 3);
    close(fd);

    /* the bystander noticed nothing */
    cr_assert_eq(cake_ping(bystander), 0);
    cr_assert(metric(h.sock, "caked_errors_total{kind=\"protocol\"}") >= 4);
    cr_assert(metric(h.sock, "caked_errors_total{kind=\"too_big\"}") >= 1);
    cake_destroy(bystander);
    cr_assert_eq(harness_stop(&h), 0);
}

Test(safety, version_mismatch_is_refused_clearly, .timeout = 30)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    int fd = raw_connect(h.sock);
    Cake__Hello m = CAKE__HELLO__INIT;
    m.protocol_version = 99, m.service = (char *)"old-engine";
    uint8_t buf[64];
    size_t n = cake__hello__pack(&m, buf);
    send_frame(fd, FRAME_MAGIC, MSG_HELLO, (uint32_t)n, buf, n);
    int code;
    char msg[256];
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_EVERSION);
    cr_assert(strstr(msg, "99"), "%s", msg);
    close(fd);
    /* misuse of a context is an error of its own kind: a sequence before connecting, or the
     * service named after it */
    cake_ctx *c;
    cake_create(&c);
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    cake_seq *s;
    cr_assert_eq(cake_seq_open(c, &lay, NULL, 100, 8, &s), CAKE_ENOTCONN);
    cr_assert_eq(cake_connect(c, h.sock, 1), 0, "%s", cake_errstr(c));
    cr_assert_eq(cake_set_service(c, "late"), CAKE_EINVAL);
    cake_destroy(c);
    cr_assert_eq(harness_stop(&h), 0);
}

Test(safety, wrong_ids_order_and_quota, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *a = engine(h.sock, "tenant-a"), *b = engine(h.sock, "tenant-b");
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64;
    cake_seq *sa;
    cr_assert_eq(cake_seq_open(a, &lay, &pol, 1000, 16, &sa), 0, "%s", cake_errstr(a));
    /* layers out of order, decode before prefill */
    cr_assert_eq(cake_prefill_reserve(sa, 1), CAKE_ESTATE);
    cr_assert_eq(cake_prefill_observe(sa, 0, NULL), CAKE_ESTATE);
    cr_assert_eq(cake_decode_step(a, &sa, 1), CAKE_ESTATE);
    /* a bad layout is refused with its reason */
    struct cake_layout bad = {.layers = 2, .q_heads = 5, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    cake_seq *sx;
    cr_assert_eq(cake_seq_open(a, &bad, &pol, 1000, 16, &sx), CAKE_EINVAL);
    cr_assert(strstr(cake_errstr(a), "multiple"), "%s", cake_errstr(a));
    /* a hostile layout is refused before caked allocates for it */
    struct cake_layout huge = {.layers = 512, .q_heads = 1024, .kv_heads = 8, .head_dim = 1024,
                               .dtype = CAKE_F32, .placement = CAKE_PLACE_HOST}; /* one token per page */
    struct cake_policy wide = pol;
    wide.window = 4096, wide.cache_size = 1u << 24;
    cr_assert_eq(cake_seq_open(a, &huge, &wide, (1u << 24) - 1, 1, &sx), CAKE_EOOM, "%s", cake_errstr(a));
    wide.window = 1u << 30, wide.cache_size = 1u << 31;
    cr_assert_eq(cake_seq_open(a, &lay, &wide, 1000, 1, &sx), CAKE_EINVAL);
    /* GPU placement: libcake refuses it without a mapped GPU pool, caked without a GPU pool */
    struct cake_layout on_gpu = lay;
    on_gpu.placement = CAKE_PLACE_GPU;
    cr_assert_eq(cake_seq_open(a, &on_gpu, &pol, 1000, 16, &sx), CAKE_EINVAL);
    cr_assert(strstr(cake_errstr(a), "GPU pool"), "%s", cake_errstr(a));
    Cake__SeqOpen raw = CAKE__SEQ_OPEN__INIT;
    raw.layers = 2, raw.q_heads = 4, raw.kv_heads = 2, raw.head_dim = 64, raw.dtype = CAKE_BF16;
    raw.prompt_len = 100, raw.placement = 1;
    uint8_t *rb;
    size_t rn;
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    cr_assert(strstr(cake_errstr(a), "--gpu-pool"), "%s", cake_errstr(a));
    raw.placement = 9;
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    /* hostile policy, shard and GPU fields: each refused with its reason, nothing allocated */
    Cake__Policy rp = CAKE__POLICY__INIT;
    rp.mode = 1, rp.cache_size = 64, rp.window = 32, rp.tau1 = 1, rp.tau2 = 1, rp.gamma = 200;
    raw.placement = 0, raw.policy = &rp;
    struct { uint32_t kind, alloc, ind, pool, kernel, decode; float beta, alpha; const char *why; } hp[] = {
        {99, 0, 0, 0, 0, 0, 0, 0, "kind"},         {0, 77, 0, 0, 0, 0, 0, 0, "allocation"},
        {0, 0, 66, 0, 0, 0, 0, 0, "indicator"},    {0, 0, 0, 9, 0, 0, 0, 0, "pooling"},
        {0, 0, 0, 0, 4, 0, 0, 0, "pooling"},       {0, 0, 0, 0, 0, 5, 0, 0, "decode"},
        {6, 0, 0, 0, 0, 0, NAN, 0, "beta"},        {7, 0, 0, 0, 0, 0, 0, INFINITY, "alpha"},
        {7, 0, 0, 0, 0, 1, 0, 0, "per-head"},
    };
    for (size_t i = 0; i < sizeof hp / sizeof hp[0]; i++) {
        rp.kind = hp[i].kind, rp.alloc = hp[i].alloc, rp.indicator = hp[i].ind;
        rp.pool = hp[i].pool, rp.pool_kernel = hp[i].kernel, rp.decode = hp[i].decode;
        rp.pyramid_beta = hp[i].beta, rp.ada_alpha = hp[i].alpha;
        cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL, "case %zu", i);
        cr_assert(strstr(cake_errstr(a), hp[i].why), "case %zu: %s", i, cake_errstr(a));
    }
    rp = (Cake__Policy)CAKE__POLICY__INIT;
    rp.mode = 1, rp.cache_size = 64, rp.window = 32, rp.tau1 = 1, rp.tau2 = 1, rp.gamma = 200;
    raw.shards = 1000, raw.shard = 0, raw.shard_group = 5;
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    raw.shards = 2, raw.shard = 2;
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    raw.shard = 0, raw.shard_group = 0;
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    raw.shards = 0, raw.placement = 1, raw.gpu_uuid = (char *)"GPU-nope";
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_OPEN, &raw.base, &rb, &rn), CAKE_EINVAL);
    raw.placement = 0, raw.gpu_uuid = NULL;
    cr_assert_eq(cake_set_gpus(a, "GPU-x"), CAKE_EINVAL, "cake_set_gpus after connect");
    /* another tenant cannot touch it: its id does not exist for them */
    Cake__SeqRef r = CAKE__SEQ_REF__INIT;
    r.seq_id = cake_seq_id(sa);
    uint8_t *body;
    size_t n;
    cr_assert_eq(cake_internal_rpc(b, MSG_SEQ_CLOSE, &r.base, &body, &n), CAKE_ENOSEQ);
    r.seq_id = cake_seq_id(sa) ^ (1ull << 40); /* a stale generation */
    cr_assert_eq(cake_internal_rpc(a, MSG_SEQ_CLOSE, &r.base, &body, &n), CAKE_ENOSEQ);
    /* a tenant capped at 1 MiB: the next layer does not fit, with a clear error. Quotas are
     * administration: an engine's connection (even of caked's own uid) may not set them */
    Cake__SetQuota q = CAKE__SET_QUOTA__INIT;
    q.tenant = (char *)"tenant-b", q.max_bytes = 1 << 20;
    cr_assert_eq(cake_internal_rpc(a, MSG_SET_QUOTA, &q.base, &body, &n), CAKE_EPERM);
    cr_assert(strstr(cake_errstr(a), "reserved"), "%s", cake_errstr(a));
    cake_ctx *adm = admin(h.sock);
    cr_assert_eq(cake_internal_rpc(adm, MSG_SET_QUOTA, &q.base, &body, &n), 0, "%s", cake_errstr(adm));
    cake_internal_free(adm, body);
    cake_seq *sb;
    int rc = cake_seq_open(b, &lay, &pol, 20000, 16, &sb);
    if (rc == 0)
        rc = cake_prefill_reserve(sb, 0);
    cr_assert_eq(rc, CAKE_EOOM, "got %d", rc);
    cr_assert(strstr(cake_errstr(b), "share"), "%s", cake_errstr(b));
    cr_assert(metric(h.sock, "caked_errors_total{kind=\"out_of_memory\"}") >= 1);
    /* weights as the configuration takes them: 1..1000000 (0 keeps the current one) */
    q.weight = 1000001;
    cr_assert_eq(cake_internal_rpc(adm, MSG_SET_QUOTA, &q.base, &body, &n), CAKE_EINVAL);
    cr_assert(strstr(cake_errstr(adm), "weight"), "%s", cake_errstr(adm));
    /* an unknown tenant is an error, not a phantom that takes a share */
    q.weight = 2, q.tenant = (char *)"nosuch";
    cr_assert_eq(cake_internal_rpc(adm, MSG_SET_QUOTA, &q.base, &body, &n), CAKE_ENOSEQ);
    cake_destroy(adm);
    /* tenant-a is unaffected */
    cr_assert_eq(cake_prefill_reserve(sa, 0), 0, "%s", cake_errstr(a));
    cr_assert_eq(cake_seq_close(sa), 0);
    cake_destroy(a), cake_destroy(b);
    unsigned long long used;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &used, &seqs), 0);
    cr_assert_eq(used, 0);
    cr_assert_eq(harness_stop(&h), 0);
}

/* p lies inside the pool with room for `bytes` after it, or is NULL */
static int in_pool_or_null(const cake_ctx *c, const void *p, size_t bytes)
{
    const uint8_t *b = cake_pool_base(c), *q = p;
    return !p || (q >= b && (size_t)(q - b) + bytes <= cake_pool_bytes(c));
}

/* Any client of the socket can write anywhere in the pool (the socket's permissions are the
 * boundary), and a sequence's descriptor is stale once caked has ended it: libcake computes
 * every address from what it checked at open, so garbage there yields NULL or an address
 * inside the pool, never a crash; caked, which never reads the descriptor, is unaffected. */
Test(safety, a_scribbled_descriptor_cannot_send_libcake_outside_the_pool, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *c = engine(h.sock, "scribbler");
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64, pol.window = 8;
    cake_seq *s;
    const uint32_t n = 500;
    cr_assert_eq(cake_seq_open(c, &lay, &pol, n, 8, &s), 0, "%s", cake_errstr(c));
    cr_assert_eq(cake_prefill_reserve(s, 0), 0);
    /* find the descriptor the way any other client could: by its magic and id */
    uint8_t *pool = cake_pool_base(c);
    struct shm_desc *d = NULL;
    for (size_t off = 0; off + sizeof(*d) <= cake_pool_bytes(c); off += 4096) {
        struct shm_desc *x = (struct shm_desc *)(pool + off);
        if (!cake_pool_mapped(c, x, sizeof(*x)))
            continue; /* only its own tenant's segments are mapped here */
        if (x->magic == SHM_DESC_MAGIC && x->seq_id == cake_seq_id(s)) {
            d = x;
            break;
        }
    }
    cr_assert_not_null(d);
    size_t row = 64 * 2;
    srand(7);
    for (int round = 0; round < 50; round++) {
        /* garbage over the header, the layer entries and the page table */
        uint32_t *w = (uint32_t *)d;
        size_t words = (sizeof(*d) + 2 * sizeof(struct shm_layer) + 64 * 8) / 4;
        for (size_t i = 0; i < words; i++)
            w[i] = round % 3 == 0 ? 0xffffffffu : round % 3 == 1 ? (uint32_t)rand()
                                                               : (uint32_t)rand() % 4096;
        for (uint32_t l = 0; l < 3; l++) {
            uint32_t tokens = cake_layer_tokens(s, l);
            cr_assert_leq(tokens, (uint64_t)n + 64);
            for (uint32_t g = 0; g < 3; g++)
                for (uint32_t t = 0; t < n + 600; t += 37) {
                    cr_assert(in_pool_or_null(c, cake_key(s, l, g, t), row));
                    cr_assert(in_pool_or_null(c, cake_value(s, l, g, t), row));
                }
            cr_assert(in_pool_or_null(c, cake_queries(s, l), 4 * 8 * row));
            cr_assert(in_pool_or_null(c, cake_decode_query(s, l), row));
            uint32_t np = 0, first = 0;
            const uint64_t *pg = cake_layer_pages(s, l, &np);
            cr_assert(in_pool_or_null(c, pg, np * sizeof(uint64_t)));
            cake_head_holes(s, l, 0, &first);
        }
        cr_assert(in_pool_or_null(c, cake_indicator(s), 2 * (n - 8) * sizeof(float)));
    }
    /* caked answers as before; its replies rewrite the layer entries */
    cr_assert_eq(cake_prefill_observe(s, 0, NULL), 0, "%s", cake_errstr(c));
    cr_assert_neq(cake_key(s, 0, 1, cake_layer_tokens(s, 0) - 1), NULL);
    cr_assert_eq(cake_seq_close(s), 0);
    cake_destroy(c);
    unsigned long long used;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &used, &seqs), 0);
    cr_assert_eq(used, 0);
    cr_assert_eq(harness_stop(&h), 0);
}

/* A call that times out (a shard at a barrier whose other rank is late) leaves the
 * connection usable: the reply that arrives afterwards is skipped by the next call. */
Test(safety, a_reply_after_its_timeout_is_skipped, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *a, *b;
    cake_create(&a);
    cake_set_service(a, "tp");
    cake_set_timeout_ms(a, 300);
    cr_assert_eq(cake_connect(a, h.sock, 1), 0, "%s", cake_errstr(a));
    b = engine(h.sock, "tp");
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64, pol.window = 8;
    cake_seq *sa, *sb;
    cr_assert_eq(cake_seq_open_shard(a, &lay, &pol, 300, 4, 42, 2, 0, &sa), 0, "%s",
                 cake_errstr(a));
    cr_assert_eq(cake_seq_open_shard(b, &lay, &pol, 300, 4, 42, 2, 1, &sb), 0, "%s",
                 cake_errstr(b));
    cr_assert_eq(cake_prefill_reserve(sa, 0), 0);
    cr_assert_eq(cake_prefill_observe(sa, 0, NULL), -ETIMEDOUT, "rank 1 has not come yet");
    cr_assert_eq(cake_prefill_reserve(sb, 0), 0);
    cr_assert_eq(cake_prefill_observe(sb, 0, NULL), 0, "%s", cake_errstr(b));
    /* the barrier filled: a's reply is on its way; the next call skips it */
    cr_assert_eq(cake_ping(a), 0, "%s", cake_errstr(a));
    cr_assert_eq(cake_layer_budget(sa, 0), cake_layer_budget(sb, 0));
    cr_assert_eq(cake_prefill_reserve(sa, 1), 0, "%s", cake_errstr(a));
    cr_assert_eq(cake_seq_close(sa), 0);
    cake_destroy(a), cake_destroy(b);
    cr_assert_eq(harness_stop(&h), 0);
}

/* The lowest fd number free in pid: a soft limit there makes its next accept fail (EMFILE). */
static int lowest_free_fd(pid_t pid)
{
    char path[64];
    uint8_t used[1024] = {0};
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    for (struct dirent *e; d && (e = readdir(d));) {
        int n = atoi(e->d_name);
        if (e->d_name[0] != '.' && n >= 0 && n < 1024)
            used[n] = 1;
    }
    if (d)
        closedir(d);
    int n = 0;
    while (n < 1024 && used[n])
        n++;
    return n;
}

/* the soft limit only: raising it back needs no privilege */
static void set_fd_limit(pid_t pid, int n)
{
    char cmd[96];
    snprintf(cmd, sizeof cmd, "prlimit --pid %d --nofile=%d:100", (int)pid, n);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
}

/* Over the client limit (fitted under the fd limit) and out of file descriptors, a new
 * connection gets a clear error at once, never waits in the backlog; everyone else goes on. */
Test(safety, client_and_fd_limits_refuse_clearly, .timeout = 60)
{
    if (system("prlimit --version >/dev/null 2>&1"))
        cr_skip_test("no prlimit (util-linux)");
    struct harness h;
    setenv("CAKE_TEST_CAKED_WRAP", "prlimit --nofile=100:100", 1);
    int rc = harness_start(&h, NULL);
    unsetenv("CAKE_TEST_CAKED_WRAP");
    cr_assert_eq(rc, 0);
    /* the limit caked chose and logged (it depends on what caked itself holds, which is not
     * the same on every machine) */
    unsigned limit = 0;
    FILE *lf = fopen(h.log, "r");
    char line[512];
    while (lf && fgets(line, sizeof line, lf))
        if (strstr(line, "file descriptor limit"))
            sscanf(strstr(line, "at most") ? strstr(line, "at most") : "", "at most %u", &limit);
    if (lf)
        fclose(lf);
    cr_assert(limit > 0 && limit < 40, "caked logged a client limit under 40: %u", limit);
    /* the harness's probe connections are gone (caked may not have seen them close yet) */
    for (int i = 0; i < 250 && status_clients(h.sock) > 1; i++)
        usleep(20000);
    cake_ctx *c[40];
    int ok = 0, refused = 0;
    for (int i = 0; i < 40; i++) {
        cake_create(&c[i]);
        cake_set_timeout_ms(c[i], 5000);
        int r = cake_connect(c[i], h.sock, 1);
        if (r == 0) {
            ok++;
        } else {
            cr_assert_eq(r, CAKE_EOOM, "connection %d: %d %s", i, r, cake_errstr(c[i]));
            cr_assert(strstr(cake_errstr(c[i]), "client limit"), "%s", cake_errstr(c[i]));
            refused++;
        }
    }
    cr_assert_eq(ok, (int)limit, "caked said %u clients, took %d", limit, ok);
    cr_assert_eq(refused, 40 - ok);
    cr_assert_eq(cake_ping(c[0]), 0, "%s", cake_errstr(c[0]));
    for (int i = 0; i < 40; i++)
        cake_destroy(c[i]);
    /* now out of fds (the limit lowered under what caked holds): refused, not stuck */
    cake_ctx *by = engine(h.sock, "bystander");
    int free_fd = lowest_free_fd(h.pid), same = 0;
    for (int i = 0; i < 250 && same < 10; i++) { /* until the closed connections are gone */
        usleep(20000);
        int now = lowest_free_fd(h.pid);
        same = now == free_fd ? same + 1 : 0;
        free_fd = now;
    }
    set_fd_limit(h.pid, free_fd);
    cake_ctx *x;
    cake_create(&x);
    cake_set_timeout_ms(x, 5000);
    rc = cake_connect(x, h.sock, 1);
    cr_assert_eq(rc, CAKE_EOOM, "%d %s", rc, cake_errstr(x));
    cr_assert(strstr(cake_errstr(x), "file descriptors"), "%s", cake_errstr(x));
    cake_destroy(x);
    cr_assert_eq(cake_ping(by), 0, "%s", cake_errstr(by));
    set_fd_limit(h.pid, 100);
    cake_ctx *y = engine(h.sock, "after");
    cr_assert(metric(h.sock, "\ncaked_clients_refused_total") >= 5);
    cake_destroy(y), cake_destroy(by);
    cr_assert_eq(harness_stop(&h), 0);
}

Test(safety, another_uid_sees_and_touches_only_its_own, .timeout = 60)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to drop a child to another uid");
    struct harness h;
    const char *extra[] = {"--socket-group", "root", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    chmod(h.dir, 0755); /* caked made run/ 0710 for group root; the test's own dir opens up */
    cake_ctx *a = engine(h.sock, "shared-name");
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    cake_seq *sa;
    cr_assert_eq(cake_seq_open(a, &lay, NULL, 500, 8, &sa), 0, "%s", cake_errstr(a));
    uint64_t id = cake_seq_id(sa);
    pid_t p = fork();
    if (p == 0) {
        /* uid 65534 in group root (may connect through the group), not an admin */
        gid_t g = 0;
        if (setgroups(1, &g) || setgid(0) || setuid(65534))
            _exit(10);
        cake_ctx *c;
        cake_create(&c);
        cake_set_service(c, "shared-name"); /* same name, other uid: another tenant */
        if (cake_connect(c, h.sock, 1))
            _exit(11);
        Cake__SeqRef r = CAKE__SEQ_REF__INIT;
        r.seq_id = id;
        uint8_t *b;
        size_t n;
        if (cake_internal_rpc(c, MSG_SEQ_INFO, &r.base, &b, &n) != CAKE_ENOSEQ)
            _exit(12);
        if (cake_internal_rpc(c, MSG_SEQ_CLOSE, &r.base, &b, &n) != CAKE_ENOSEQ)
            _exit(13);
        if (cake_internal_rpc(c, MSG_SEQUENCES, NULL, &b, &n))
            _exit(14);
        ProtobufCAllocator al = cake_internal_allocator(c);
        Cake__SeqList *l = cake__seq_list__unpack(&al, n, b);
        if (!l || l->n_seqs != 0)
            _exit(15);
        Cake__SetQuota q = CAKE__SET_QUOTA__INIT;
        q.tenant = (char *)"shared-name", q.max_bytes = 1;
        if (cake_internal_rpc(c, MSG_SET_QUOTA, &q.base, &b, &n) != CAKE_EPERM)
            _exit(16);
        _exit(0);
    }
    int st;
    waitpid(p, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child check %d failed", WEXITSTATUS(st));
    /* a uid outside the group cannot connect at all (socket 0660 root:root) */
    p = fork();
    if (p == 0) {
        gid_t g = 65534;
        if (setgroups(1, &g) || setgid(65534) || setuid(65534))
            _exit(10);
        cake_ctx *c;
        cake_create(&c);
        _exit(cake_connect(c, h.sock, 0) == -EACCES ? 0 : 1);
    }
    waitpid(p, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "a foreign uid could connect");
    cr_assert_eq(cake_seq_close(sa), 0); /* untouched */
    cake_destroy(a);
    cr_assert_eq(harness_stop(&h), 0);
}

/* A client that sends part of a frame and hangs up at once (both in one wakeup) is noticed:
 * io_uring reports the hang-up once, with the bytes, and caked used to stop reading at the
 * short read and keep the connection, its sequences and pages forever. */
Test(safety, a_partial_frame_then_hang_up_frees_everything, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    for (int i = 0; i < 100; i++) {
        pid_t p = fork();
        if (p == 0) {
            cake_ctx *c = harness_client(h.sock, "half", 1, 0);
            struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                                      .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
            cake_seq *s;
            if (!c || cake_seq_open(c, &lay, NULL, 300, 8, &s) || cake_prefill_reserve(s, 0))
                _exit(1);
            uint8_t part[FRAME_HEADER_BYTES] = {0x43, 0x41, 0x4b, 0x45, 1, 0, 2, 0};
            if (send(cake_fd(c), part, 10 + i % 13, MSG_NOSIGNAL) < 0)
                _exit(2);
            _exit(0); /* the close follows the bytes at once */
        }
        int st;
        waitpid(p, &st, 0);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    unsigned long long used = 1;
    unsigned seqs = 1;
    for (int i = 0; i < 250 && (used || seqs); i++) {
        cr_assert_eq(harness_status(&h, &used, &seqs), 0);
        if (used || seqs)
            usleep(20000);
    }
    cr_assert_eq(seqs, 0, "%u sequences of hung-up clients kept", seqs);
    cr_assert_eq(used, 0, "%llu pages of hung-up clients kept", used);
    cr_assert_eq(harness_stop(&h), 0);
}

/* Clients that never become engines hold nothing for long: a body before HELLO is at most
 * 4 KiB (a 1 MiB one was held); a connection that sends no HELLO in time is closed (4096
 * idle ones locked every engine out); a uid other than root and caked's holds at most its
 * share of the connections; a one-shot service name leaves no tenant behind (4093 of them
 * filled the tenant table for good). */

Test(safety, clients_that_never_become_engines_hold_nothing_for_long, .timeout = 90)
{
    struct harness h;
    const char *extra[] = {"--hello-timeout", "0.5", "--max-clients-per-uid", "4",
                           "--socket-group", "root", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    chmod(h.dir, 0755);
    int code;
    char msg[256];
    /* a large body before HELLO: refused at its header, the connection closed */
    int fd = raw_connect(h.sock);
    send_frame(fd, FRAME_MAGIC, MSG_HELLO, 1u << 20, NULL, 0);
    cr_assert_eq(read_reply(fd, &code, msg, sizeof msg), MSG_ERROR);
    cr_assert_eq(code, CAKE_ETOOBIG, "%s", msg);
    cr_assert(strstr(msg, "before HELLO"), "%s", msg);
    cr_assert(is_closed(fd));
    close(fd);
    /* idle connections are closed once HELLO is overdue, with the reason */
    int idle[64];
    for (int i = 0; i < 64; i++)
        idle[i] = raw_connect(h.sock);
    usleep(1200000);
    for (int i = 0; i < 64; i++) {
        cr_assert_eq(read_reply(idle[i], &code, msg, sizeof msg), MSG_ERROR, "idle %d", i);
        cr_assert(strstr(msg, "no HELLO"), "%s", msg);
        cr_assert(is_closed(idle[i]));
        close(idle[i]);
    }
    cake_ctx *e = engine(h.sock, "after-idle");
    cr_assert_eq(cake_ping(e), 0);
    /* another uid (admitted through the group) holds at most 4 connections */
    pid_t p = fork();
    if (p == 0) {
        gid_t g = 0;
        if (setgroups(1, &g) || setgid(0) || setuid(65534))
            _exit(10);
        cake_ctx *c[5];
        for (int i = 0; i < 4; i++)
            if (!(c[i] = harness_client(h.sock, "nobody", 1, 0)))
                _exit(11);
        cake_create(&c[4]);
        if (cake_connect(c[4], h.sock, 1) != CAKE_EOOM || !strstr(cake_errstr(c[4]), "its limit"))
            _exit(12);
        _exit(0);
    }
    int st;
    waitpid(p, &st, 0);
    if (geteuid() == 0)
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "per-uid check %d", WEXITSTATUS(st));
    cake_ctx *r[8]; /* root (like caked's own uid) is not limited */
    for (int i = 0; i < 8; i++)
        r[i] = engine(h.sock, "root-many");
    for (int i = 0; i < 8; i++)
        cake_destroy(r[i]);
    /* one-shot names come and go */
    unsigned base = status_tenants(h.sock);
    for (int i = 0; i < 300; i++) {
        char name[32];
        snprintf(name, sizeof name, "once-%d", i);
        cake_ctx *c = harness_client(h.sock, name, i % 2, 0);
        cr_assert_not_null(c);
        if (i % 2) { /* an engine with a sequence: its segment goes back too */
            struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                                      .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
            cake_seq *s;
            cr_assert_eq(cake_seq_open(c, &lay, NULL, 300, 8, &s), 0, "%s", cake_errstr(c));
            cr_assert_eq(cake_prefill_reserve(s, 0), 0, "%s", cake_errstr(c));
        }
        cake_destroy(c);
    }
    unsigned after = base + 1;
    for (int i = 0; i < 100 && after > base; i++) {
        after = status_tenants(h.sock);
        if (after > base)
            usleep(20000);
    }
    cr_assert_eq(after, base, "one-shot tenants left behind: %u, was %u", after, base);
    cake_destroy(e);
    cr_assert_eq(harness_stop(&h), 0);
}

/* cachectl seq ID while a worker scores and compacts the sequence: the loop answers from
 * what the last job published (never from state a worker is writing: ThreadSanitizer caught
 * it at once), so every answer is consistent. Run under the TSan caked (tests/README.md). */
struct watch {
    const char *sock;
    uint64_t id;
    uint32_t n, tpp;
    volatile int stop;
    int answers, bad;
};

static void *watch_seq(void *arg)
{
    struct watch *w = arg;
    cake_ctx *c = harness_client(w->sock, "cachectl", 0, 1);
    if (!c)
        return NULL;
    ProtobufCAllocator al = cake_internal_allocator(c);
    Cake__SeqRef r = CAKE__SEQ_REF__INIT;
    r.seq_id = w->id;
    while (!w->stop) {
        uint8_t *b;
        size_t n;
        if (cake_internal_rpc(c, MSG_SEQ_INFO, &r.base, &b, &n))
            continue;
        Cake__SeqInfo *si = cake__seq_info__unpack(&al, n, b);
        cake_internal_free(c, b);
        for (size_t l = 0; si && l < si->n_layer; l++) {
            const Cake__LayerInfo *li = si->layer[l];
            if (li->tokens > w->n || (uint64_t)li->pages * w->tpp < li->tokens ||
                li->prefix > li->tokens)
                w->bad++;
        }
        w->answers++;
        if (si)
            cake__seq_info__free_unpacked(si, &al);
    }
    cake_destroy(c);
    return NULL;
}

Test(safety, seq_info_during_prefill_shows_only_committed_state, .timeout = 120)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *c = engine(h.sock, "watched");
    struct cake_layout lay = {.layers = 8, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 256, pol.window = 16;
    const uint32_t n = 8192;
    cake_seq *s;
    cr_assert_eq(cake_seq_open(c, &lay, &pol, n, 16, &s), 0, "%s", cake_errstr(c));
    struct watch w = {h.sock, cake_seq_id(s), n, cake_seq_tokens_per_page(s), 0, 0, 0};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, watch_seq, &w), 0);
    srand(5);
    for (uint32_t l = 0; l < lay.layers; l++) {
        cr_assert_eq(cake_prefill_reserve(s, l), 0, "%s", cake_errstr(c));
        for (uint32_t g = 0; g < 2; g++)
            for (uint32_t t = 0; t < n; t++) {
                uint16_t *k = cake_key(s, l, g, t), *v = cake_value(s, l, g, t);
                for (int i = 0; i < 64; i++)
                    k[i] = (uint16_t)(0x3c00 + rand() % 512), v[i] = (uint16_t)(0x3c00 + rand() % 512);
            }
        uint16_t *q = cake_queries(s, l);
        for (int i = 0; i < 8 * 16 * 64; i++)
            q[i] = (uint16_t)(0x3c00 + rand() % 512);
        cr_assert_eq(cake_prefill_observe(s, l, NULL), 0, "%s", cake_errstr(c));
    }
    for (int i = 0; i < 8; i++)
        cr_assert_eq(cake_decode_step(c, &s, 1), 0, "%s", cake_errstr(c));
    w.stop = 1;
    pthread_join(th, NULL);
    cr_assert_gt(w.answers, 0);
    cr_assert_eq(w.bad, 0, "%d inconsistent answers of %d", w.bad, w.answers);
    cake_destroy(c);
    cr_assert_eq(harness_stop(&h), 0);
}

/* Replies over the frame cap: 40,000 sequences' SEQUENCES and the metrics come in pages
 * (the list overflowed one reply: cachectl failed with "malformed reply header"). */
Test(safety, long_lists_come_in_pages, .timeout = 120)
{
    struct harness h;
    const char *extra[] = {"--host-pool", "512M", "--page-size", "4K", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    cake_ctx *c = engine(h.sock, "many");
    struct cake_layout lay = {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 16,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 8, pol.window = 4;
    enum { N = 40000 };
    static cake_seq *s[N];
    for (int i = 0; i < N; i++)
        cr_assert_eq(cake_seq_open(c, &lay, &pol, 8, 1, &s[i]), 0, "seq %d: %s", i, cake_errstr(c));
    cake_ctx *a = harness_client(h.sock, "cachectl", 0, 1);
    cr_assert_not_null(a);
    ProtobufCAllocator al = cake_internal_allocator(a);
    Cake__ListPage pg = CAKE__LIST_PAGE__INIT;
    size_t total = 0;
    int pages = 0, more = 1;
    while (more) {
        uint8_t *b;
        size_t n;
        cr_assert_eq(cake_internal_rpc(a, MSG_SEQUENCES, &pg.base, &b, &n), 0, "%s", cake_errstr(a));
        cr_assert_leq(n, FRAME_MAX_BODY);
        Cake__SeqList *l = cake__seq_list__unpack(&al, n, b);
        cake_internal_free(a, b);
        cr_assert_not_null(l);
        total += l->n_seqs, pages++;
        more = l->more, pg.after = l->next;
        cake__seq_list__free_unpacked(l, &al);
    }
    cr_assert_eq(total, N, "%zu sequences listed in %d pages", total, pages);
    cr_assert_gt(pages, 1);
    /* the metrics text likewise, by offset, ends where it says */
    Cake__ListPage mp = CAKE__LIST_PAGE__INIT;
    uint8_t *b;
    size_t n;
    cr_assert_eq(cake_internal_rpc(a, MSG_METRICS, &mp.base, &b, &n), 0);
    Cake__Metrics *m = cake__metrics__unpack(&al, n, b);
    cake_internal_free(a, b);
    cr_assert(m && strlen(m->text) == m->total && strstr(m->text, "caked_sequences 40000"));
    cake__metrics__free_unpacked(m, &al);
    mp.offset = 1u << 30;
    cr_assert_eq(cake_internal_rpc(a, MSG_METRICS, &mp.base, &b, &n), CAKE_EINVAL);
    cake_destroy(a), cake_destroy(c);
    cr_assert_eq(harness_stop(&h), 0);
}

/* Work whose client is gone is not done: 8 engines each ask caked to score a large layer and
 * hang up at once (together); with one worker, the layers still queued when their client left are
 * skipped (a departed tenant's work held every worker for 20 s while another waited), and
 * everything comes back. */
Test(safety, work_of_departed_clients_is_cancelled, .timeout = 120)
{
    struct harness h;
    const char *extra[] = {"--workers", "1", "--host-pool", "1G", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    int ready[2], go[2]; /* all 8 prepare, then all ask and leave at once */
    cr_assert_eq(pipe(ready), 0);
    cr_assert_eq(pipe(go), 0);
    pid_t kids[8];
    for (int i = 0; i < 8; i++) {
        pid_t p = fork();
        if (p == 0) {
            cake_ctx *c = harness_client(h.sock, "leaver", 1, 0);
            struct cake_layout lay = {.layers = 1, .q_heads = 32, .kv_heads = 2, .head_dim = 128,
                                      .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
            cake_seq *s;
            if (!c || cake_seq_open(c, &lay, NULL, 32768, 8, &s) || cake_prefill_reserve(s, 0))
                _exit(1);
            Cake__LayerRef m = CAKE__LAYER_REF__INIT;
            m.seq_id = cake_seq_id(s), m.layer = 0;
            uint8_t buf[FRAME_HEADER_BYTES + 64];
            size_t n = cake__layer_ref__get_packed_size(&m);
            struct frame_header fh = {FRAME_MAGIC, FRAME_VERSION, MSG_PREFILL_OBSERVE, 0, (uint32_t)n, 999};
            frame_write_header(buf, &fh);
            cake__layer_ref__pack(&m, buf + FRAME_HEADER_BYTES);
            char x;
            if (write(ready[1], "r", 1) != 1 || read(go[0], &x, 1) != 1)
                _exit(3);
            if (send(cake_fd(c), buf, FRAME_HEADER_BYTES + n, MSG_NOSIGNAL) < 0)
                _exit(2);
            _exit(0); /* gone before the reply */
        }
        kids[i] = p;
    }
    for (int i = 0; i < 8; i++) {
        char x;
        cr_assert_eq(read(ready[0], &x, 1), 1, "child %d did not get ready", i);
    }
    cr_assert_eq(write(go[1], "gggggggg", 8), 8);
    for (int i = 0; i < 8; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    /* the layers that ran (one or two 32K observes) must end first: seconds under TSan on
     * two busy cores, so up to 60 s (leaked pages would never come back) */
    unsigned long long used = 1;
    unsigned seqs = 1;
    for (int i = 0; i < 3000 && (used || seqs); i++) {
        cr_assert_eq(harness_status(&h, &used, &seqs), 0);
        if (used || seqs)
            usleep(20000);
    }
    cr_assert_eq(used + seqs, 0, "%llu pages, %u sequences left", used, seqs);
    uint64_t cancelled = metric(h.sock, "\ncaked_work_cancelled_total");
    /* one layer runs when the others arrive; a second may begin before caked sees its
     * client leave */
    cr_assert_geq(cancelled, 6, "only %llu of 8 layers skipped", (unsigned long long)cancelled);
    cake_ctx *b = engine(h.sock, "after");
    cr_assert_eq(cake_ping(b), 0);
    cake_destroy(b);
    cr_assert_eq(harness_stop(&h), 0);
}

/* SIGHUP reads the configuration's tenants again (it killed caked, leaving its socket);
 * a bad file changes nothing; engines keep working throughout. */
static int tenant_weight(const char *sock, const char *name)
{
    cake_ctx *c = harness_client(sock, "cachectl", 0, 1);
    cr_assert_not_null(c);
    uint8_t *b;
    size_t n;
    cr_assert_eq(cake_internal_rpc(c, MSG_TENANTS, NULL, &b, &n), 0);
    ProtobufCAllocator al = cake_internal_allocator(c);
    Cake__TenantList *tl = cake__tenant_list__unpack(&al, n, b);
    cake_internal_free(c, b);
    int w = -1;
    for (size_t i = 0; tl && i < tl->n_tenants; i++)
        if (!strcmp(tl->tenants[i]->name, name))
            w = (int)tl->tenants[i]->weight;
    cake__tenant_list__free_unpacked(tl, &al);
    cake_destroy(c);
    return w;
}

Test(safety, sighup_reloads_tenants_and_keeps_serving, .timeout = 60)
{
    char conf[] = "/tmp/caked-hup-XXXXXX";
    int fd = mkstemp(conf);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "tenant hup weight=2\ntenant gone weight=7\n");
    fclose(f);
    struct harness h;
    const char *extra[] = {"--config", conf, NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    cake_ctx *e = engine(h.sock, "hup");
    cr_assert_eq(tenant_weight(h.sock, "hup"), 2);
    cr_assert_eq(tenant_weight(h.sock, "gone"), 7);
    f = fopen(conf, "w");
    fprintf(f, "tenant hup weight=5 min=1M\n");
    fclose(f);
    kill(h.pid, SIGHUP);
    int w = 0;
    for (int i = 0; i < 100 && (w = tenant_weight(h.sock, "hup")) != 5; i++)
        usleep(20000);
    cr_assert_eq(w, 5, "SIGHUP did not apply the new weight");
    cr_assert_eq(tenant_weight(h.sock, "gone"), -1, "a tenant no longer configured, idle, is gone");
    cr_assert_eq(cake_ping(e), 0, "%s", cake_errstr(e));
    /* a broken file: logged, nothing changes */
    f = fopen(conf, "w");
    fprintf(f, "tenant hup wieght=9\n");
    fclose(f);
    kill(h.pid, SIGHUP);
    usleep(200000);
    cr_assert_eq(tenant_weight(h.sock, "hup"), 5);
    cr_assert_eq(cake_ping(e), 0, "%s", cake_errstr(e));
    cake_destroy(e);
    cr_assert_eq(harness_stop(&h), 0);
    unlink(conf);
}

/* caked killed and restarted: the same context connects again (libcake used to keep the
 * dead fd and answer "already connected" under io_uring), with none of the old handles. */
Test(safety, a_context_reconnects_after_caked_restarts, .timeout = 60)
{
    char d[] = "/tmp/caked-restart-XXXXXX", sock[128];
    cr_assert_not_null(mkdtemp(d));
    snprintf(sock, sizeof sock, "%s/caked.sock", d);
    const char *extra[] = {"--socket", sock, NULL};
    struct harness h1, h2;
    cr_assert_eq(harness_start(&h1, extra), 0);
    cake_ctx *c = harness_client(sock, "again", 1, 0);
    cr_assert_not_null(c);
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    cake_seq *s;
    cr_assert_eq(cake_seq_open(c, &lay, NULL, 300, 8, &s), 0, "%s", cake_errstr(c));
    kill(h1.pid, SIGKILL);
    waitpid(h1.pid, NULL, 0);
    cr_assert_eq(harness_start(&h2, extra), 0); /* replaces the stale socket */
    cr_assert_eq(cake_connect(c, sock, 1), 0, "%s", cake_errstr(c));
    cr_assert_eq(cake_ping(c), 0);
    cr_assert_eq(cake_seq_open(c, &lay, NULL, 300, 8, &s), 0, "%s", cake_errstr(c));
    cr_assert_eq(cake_prefill_reserve(s, 0), 0, "%s", cake_errstr(c));
    cake_destroy(c);
    cr_assert_eq(harness_stop(&h2), 0);
    unlink(h1.log);
    char run[200];
    snprintf(run, sizeof run, "%s/run", h1.dir);
    rmdir(run), rmdir(h1.dir), rmdir(d);
}

Test(safety, sigterm_gives_clients_a_clear_error, .timeout = 30)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    cake_ctx *a = engine(h.sock, "engine");
    cake_set_timeout_ms(a, 5000);
    cr_assert_eq(cake_ping(a), 0);
    kill(h.pid, SIGTERM);
    int st;
    waitpid(h.pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "caked did not exit cleanly on SIGTERM");
    int rc = cake_ping(a);
    cr_assert(rc == CAKE_ESHUTDOWN, "after shutdown: %d %s", rc, cake_errstr(a));
    cake_destroy(a);
    rmdir(h.dir);
}

/* Fragmentation: no structure of a sequence needs contiguous pages. A pool of 1024 pages is
 * filled with one-page sequences and every other one closed, leaving 512 free pages, no two
 * adjacent; a Llama-3-8B-shaped sequence (32 layers, 32 query heads, 8 kv heads, d 128: 130
 * pages of descriptor and query rings) then opens, prefills and decodes exactly as the same
 * sequence did in the empty pool (it was refused: "no contiguous run of pages for the
 * sequence scratch area"). */
static uint16_t frag_val(uint32_t a, uint32_t b, uint32_t c, uint32_t d)
{
    uint32_t x = a * 0x9e3779b1u ^ b * 0x85ebca77u ^ c * 0xc2b2ae3du ^ d * 0x27d4eb2fu;
    x ^= x >> 15, x *= 0x2c1b3c6du, x ^= x >> 12;
    return (uint16_t)(0x3800 + x % 2048); /* bf16 in [0.25, 1) and its neighbours */
}

/* Prefills and decodes a sequence of deterministic K/V and queries; returns a hash of
 * every layer's kept keys and values and token counts. */
static uint64_t frag_run(cake_ctx *c, cake_seq *s, uint32_t L, uint32_t H, uint32_t Hkv,
                         uint32_t n, uint32_t w, uint32_t steps)
{
    const uint32_t D = 128;
    static uint16_t q[32 * 128 * 128];
    for (uint32_t l = 0; l < L; l++) {
        cr_assert_eq(cake_prefill_reserve(s, l), 0, "layer %u: %s", l, cake_errstr(c));
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t t = 0; t < n; t++) {
                uint16_t *k = cake_key(s, l, g, t), *v = cake_value(s, l, g, t);
                cr_assert(k && v);
                for (uint32_t i = 0; i < D; i++)
                    k[i] = frag_val(l, g, t, i), v[i] = frag_val(l + 100, g, t, i);
            }
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t t = 0; t < n; t++)
                for (uint32_t i = 0; i < D; i++)
                    q[((size_t)h * n + t) * D + i] = frag_val(l + 200, h, t, i);
        cr_assert_eq(cake_put_queries(s, l, q, n, NULL), 0, "%s", cake_errstr(c));
        cr_assert_eq(cake_prefill_observe(s, l, NULL), 0, "layer %u: %s", l, cake_errstr(c));
    }
    for (uint32_t st = 0; st < steps; st++) {
        cr_assert_eq(cake_decode_step(c, &s, 1), 0, "%s", cake_errstr(c));
        for (uint32_t l = 0; l < L; l++) {
            uint32_t t = cake_layer_tokens(s, l) - 1;
            for (uint32_t g = 0; g < Hkv; g++) {
                uint16_t *k = cake_key(s, l, g, t), *v = cake_value(s, l, g, t);
                for (uint32_t i = 0; i < D; i++)
                    k[i] = frag_val(l + 300, g, n + st, i), v[i] = frag_val(l + 400, g, n + st, i);
            }
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t i = 0; i < D; i++)
                    q[(size_t)h * D + i] = frag_val(l + 500, h, n + st, i);
            cr_assert_eq(cake_put_decode_query(s, l, q, NULL), 0, "%s", cake_errstr(c));
        }
    }
    cr_assert_eq(cake_decode_step(c, &s, 1), 0, "%s", cake_errstr(c)); /* evicts by those */
    uint64_t hash = 1469598103934665603ull;
    for (uint32_t l = 0; l < L; l++) {
        uint32_t tokens = cake_layer_tokens(s, l);
        hash = (hash ^ tokens) * 1099511628211ull;
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t t = 0; t + 1 < tokens; t++) { /* the newest slot is not written */
                const uint8_t *k = cake_key(s, l, g, t), *v = cake_value(s, l, g, t);
                for (uint32_t i = 0; i < 2 * D; i++)
                    hash = (hash ^ k[i] ^ ((uint64_t)v[i] << 8)) * 1099511628211ull;
            }
    }
    (void)w;
    return hash;
}

Test(safety, fragmented_pool_still_opens_what_fits, .timeout = 120)
{
    struct harness h;
    const char *extra[] = {"--host-pool", "64M", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    cake_ctx *c = engine(h.sock, "frag");
    struct cake_layout big = {.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64, pol.window = 32;
    const uint32_t n = 128, steps = 4;
    cake_seq *s;
    /* the reference: the same sequence in the empty pool (its window one run of pages) */
    cr_assert_eq(cake_seq_open(c, &big, &pol, n, steps + 1, &s), 0, "%s", cake_errstr(c));
    const uint8_t *pool = cake_pool_base(c), *q0 = cake_queries(s, 0);
    cr_assert(q0 >= pool && q0 < pool + cake_pool_bytes(c));
    uint64_t want = frag_run(c, s, 32, 32, 8, n, 32, steps);
    cr_assert_eq(cake_seq_close(s), 0);
    /* every page taken by one-page sequences, then every other one given back */
    struct cake_layout tiny = {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 16,
                               .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy tp;
    cake_policy_default(&tp);
    tp.cache_size = 8, tp.window = 4;
    static cake_seq *f[1024];
    int nf = 0;
    while (nf < 1024 && cake_seq_open(c, &tiny, &tp, 8, 1, &f[nf]) == 0)
        nf++;
    cr_assert_eq(nf, 1024, "the pool holds 1024 one-page sequences (%d)", nf);
    for (int i = 0; i < nf; i += 2)
        cr_assert_eq(cake_seq_close(f[i]), 0);
    unsigned long long used;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &used, &seqs), 0);
    cr_assert_eq(used, 512);
    cr_assert_eq(cake_seq_open(c, &big, &pol, n, steps + 1, &s), 0, "%s", cake_errstr(c));
    q0 = cake_queries(s, 0);
    cr_assert(q0 < pool || q0 >= pool + cake_pool_bytes(c), "the window is pages mapped side by side");
    uint64_t got = frag_run(c, s, 32, 32, 8, n, 32, steps);
    cr_assert_eq(got, want, "the fragmented pool's sequence computed something else");
    cr_assert_eq(cake_seq_close(s), 0);
    for (int i = 1; i < nf; i += 2)
        cr_assert_eq(cake_seq_close(f[i]), 0);
    cr_assert_eq(harness_status(&h, &used, &seqs), 0);
    cr_assert_eq(used, 0);
    cake_destroy(c);
    cr_assert_eq(harness_stop(&h), 0);
}

/* caked's own memory for a sequence (indicators, selection buffers, page tables) is charged
 * at open and bounded like pages: a sequence needing more than the tenant's weighted share
 * of --heap-limit is refused with the reason (a few opens of long prompts could otherwise
 * make caked allocate gigabytes its pool never sees), and it all comes back at close. */
Test(safety, caked_s_own_memory_for_sequences_is_bounded, .timeout = 60)
{
    struct harness h;
    const char *extra[] = {"--host-pool", "64M", "--heap-limit", "8M", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    cake_ctx *a = engine(h.sock, "heap-a");
    struct cake_layout lay = {.layers = 32, .q_heads = 8, .kv_heads = 8, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 256;
    cake_seq *s1, *s2, *s3;
    /* 32 layers x 8 kv heads x 4064 scored tokens of indicators and positions, and the
     * positions of every slot caked follows (cake_kept_positions): ~16.7 MB */
    int rc = cake_seq_open(a, &lay, &pol, 4096, 8, &s1);
    cr_assert_eq(rc, CAKE_EOOM, "%s", cake_strerror(rc));
    cr_assert(strstr(cake_errstr(a), "heap-limit"), "%s", cake_errstr(a));
    cr_assert_eq(metric(h.sock, "caked_heap_bytes{state=\"used\"}"), 0);
    /* ~3 MB each: one fits the tenant's share, and with a second tenant attached (half of
     * 8 MiB each) a second one does not, while the other tenant can still open its own */
    cr_assert_eq(cake_seq_open(a, &lay, &pol, 768, 8, &s1), 0, "%s", cake_errstr(a));
    uint64_t one = metric(h.sock, "caked_heap_bytes{state=\"used\"}");
    cr_assert_gt(one, 2u << 20);
    cr_assert_lt(one, 4u << 20);
    cake_ctx *b = engine(h.sock, "heap-b");
    rc = cake_seq_open(a, &lay, &pol, 768, 8, &s2);
    cr_assert_eq(rc, CAKE_EOOM, "a second sequence over the tenant's share: %s", cake_strerror(rc));
    cr_assert_eq(cake_seq_open(b, &lay, &pol, 768, 8, &s3), 0, "%s", cake_errstr(b));
    cr_assert_eq(metric(h.sock, "caked_heap_bytes{state=\"used\"}"), 2 * one);
    cr_assert_eq(cake_seq_close(s1), 0);
    cr_assert_eq(cake_seq_close(s3), 0);
    cr_assert_eq(metric(h.sock, "caked_heap_bytes{state=\"used\"}"), 0);
    cake_destroy(a), cake_destroy(b);
    cr_assert_eq(harness_stop(&h), 0);
}
