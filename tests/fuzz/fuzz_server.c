/* Fuzz target for caked's request path as a whole: the frame reader, the dispatcher and every
 * handler, in a real server (its own thread, epoll loop, two workers, a 64 MiB pool), fed
 * over a real connection. Each input is a list of records [op][len lo][len hi][payload]:
 *   op % 4 == 0   the payload as raw bytes (the stream may go out of step: caked must close)
 *   op % 4 == 1   one frame: type from the payload's first two bytes, the rest its body
 *   op % 4 == 2   a request of type op / 4 % MSG_TYPE_MAX + 1 with the payload as its
 *                 protobuf body
 *   op % 4 == 3   a well-formed request built from the payload (open, reserve, observe,
 *                 submit, decode, close, info, list, quota, positions, park, status), on the
 *                 sequences this connection opened
 * after a HELLO as an engine. Each request waits for its reply (MAP frames and their fds
 * skipped). Then the connection closes and every page must come back to the pool. Built as
 * a libFuzzer binary with -DCAKE_FUZZ=ON (clang); its corpus is replayed as a test. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cake.pb-c.h"
#include "cake/cake.h"
#include "frame.h"
#include "reader.h"
#include "server.h"
#include "server_int.h"

static struct server *srv;
static int verbose; /* CAKE_FUZZ_VERBOSE=1: each request and what came back, on stderr */
static char dir[64], sock_path[128];

static void *run_server(void *arg)
{
    server_run(arg);
    return NULL;
}

static void start(void)
{
    strcpy(dir, "/tmp/caked-fuzz-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    snprintf(sock_path, sizeof sock_path, "%s/s", dir);
    struct server_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    strcpy(cfg.socket_path, sock_path);
    cfg.host_pool_bytes = 64u << 20, cfg.page_bytes = 64u << 10;
    cfg.io = LOOP_EPOLL, cfg.workers = 2, cfg.kernel_threads = 1;
    verbose = getenv("CAKE_FUZZ_VERBOSE") != NULL;
    if (server_create(&cfg, NULL, 0, &srv))
        abort();
    pthread_t t;
    if (pthread_create(&t, NULL, run_server, srv))
        abort();
}

__attribute__((destructor)) static void cleanup(void)
{
    if (sock_path[0])
        unlink(sock_path), rmdir(dir);
}

struct conn {
    int fd;
    uint64_t rid;
    struct frame_reader rd;
    uint64_t seqs[8];
    int n_seqs;
};

static int send_bytes(struct conn *c, const void *p, size_t n)
{
    while (n) {
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
        if (k <= 0)
            return -1;
        p = (const uint8_t *)p + k, n -= (size_t)k;
    }
    return 0;
}

static int send_frame(struct conn *c, uint16_t type, const void *body, size_t len)
{
    uint8_t h[FRAME_HEADER_BYTES];
    struct frame_header fh = {FRAME_MAGIC, FRAME_VERSION, type, 0, (uint32_t)len, ++c->rid};
    frame_write_header(h, &fh);
    return send_bytes(c, h, sizeof h) || (len && send_bytes(c, body, len)) ? -1 : 0;
}

static int send_msg(struct conn *c, uint16_t type, const ProtobufCMessage *m)
{
    uint8_t buf[4096];
    size_t len = m ? protobuf_c_message_get_packed_size(m) : 0;
    if (len > sizeof buf)
        return -1;
    if (m)
        protobuf_c_message_pack(m, buf);
    return send_frame(c, type, buf, len);
}

/* Reads until the reply to the last request (or an error frame for it, or an unsolicited
 * one); a SEQ_OPEN reply's id is remembered. -1: the connection is over. */
static int await(struct conn *c, uint16_t type)
{
    for (;;) {
        struct frame_header h;
        const uint8_t *body;
        int rc = frame_reader_next(&c->rd, &h, &body);
        if (rc < 0)
            abort(); /* caked sent a malformed frame */
        if (rc == 1) {
            if ((h.type & ~FRAME_REPLY) == MSG_MAP)
                continue;
            if (h.type == MSG_ERROR && h.request_id == 0)
                return -1;
            if (h.request_id != c->rid)
                continue;
            if (verbose) {
                int code = 0;
                if (h.type == MSG_ERROR) {
                    Cake__Error *e = cake__error__unpack(NULL, h.body_len, body);
                    code = e ? e->code : 1;
                    fprintf(stderr, "  %s -> %s: %s\n", frame_type_name(type), cake_strerror(code),
                            e && e->message ? e->message : "");
                    cake__error__free_unpacked(e, NULL);
                } else {
                    fprintf(stderr, "  %s -> ok\n", frame_type_name(type));
                }
            }
            if (h.type == (MSG_SEQ_OPEN | FRAME_REPLY) && type == MSG_SEQ_OPEN) {
                Cake__SeqOpenReply *r = cake__seq_open_reply__unpack(NULL, h.body_len, body);
                if (!r)
                    abort(); /* caked's own reply must unpack */
                c->seqs[c->n_seqs++ % 8] = r->seq_id;
                cake__seq_open_reply__free_unpacked(r, NULL);
            }
            return 0;
        }
        struct pollfd p = {c->fd, POLLIN, 0};
        if (poll(&p, 1, 5000) != 1)
            return -1; /* no reply: caked is stuck, or waits for a shard that never comes */
        size_t room;
        uint8_t *dst = frame_reader_space(&c->rd, &room);
        char cbuf[CMSG_SPACE(64 * sizeof(int))];
        struct iovec iov = {dst, room};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                            .msg_controllen = sizeof cbuf};
        ssize_t k = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
        if (k <= 0)
            return -1;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                    close(fd);
                }
        frame_reader_wrote(&c->rd, (size_t)k);
    }
}

static uint32_t u32(const uint8_t *p, size_t n, size_t i) { return i < n ? p[i] : 0; }

/* A well-formed request from the payload's bytes. */
static int structured(struct conn *c, const uint8_t *p, size_t n)
{
    /* the newest sequence opened here, or the one before it, ... (8 remembered) */
    int k = c->n_seqs < 8 ? c->n_seqs : 8;
    uint64_t id = k ? c->seqs[(c->n_seqs - 1 - (int)(u32(p, n, 1) % (uint32_t)k)) % 8] : u32(p, n, 1);
    uint32_t layer = u32(p, n, 2) % 5;
    switch (u32(p, n, 0) % 11) {
    case 0: {
        Cake__Policy pol = CAKE__POLICY__INIT;
        pol.mode = u32(p, n, 3) % 3, pol.cache_size = 8 + u32(p, n, 4) * 4;
        pol.window = 1 + u32(p, n, 5) % 40, pol.kind = u32(p, n, 6) % 9;
        pol.cascading = u32(p, n, 7) & 1, pol.decode = u32(p, n, 8) % 4;
        pol.tau1 = 0.5f + (float)(u32(p, n, 21) % 4) / 2, pol.tau2 = 1.0f;
        pol.gamma = u32(p, n, 22) % 4 ? 200.0f : (float)u32(p, n, 22);
        Cake__SeqOpen m = CAKE__SEQ_OPEN__INIT;
        m.layers = 1 + u32(p, n, 9) % 4, m.kv_heads = 1 + u32(p, n, 10) % 4;
        m.q_heads = m.kv_heads * (1 + u32(p, n, 11) % 4), m.head_dim = 8 * (1 + u32(p, n, 12) % 16);
        m.dtype = u32(p, n, 13) % 4, m.prompt_len = 1 + u32(p, n, 14) * 16 + u32(p, n, 15);
        m.max_new_tokens = u32(p, n, 16) % 32, m.policy = &pol;
        m.placement = u32(p, n, 17) % 8 == 7; /* GPU: refused without a GPU pool */
        if (u32(p, n, 18) % 8 == 7)
            m.shard_group = 1 + u32(p, n, 19) % 3, m.shards = 2, m.shard = u32(p, n, 20) % 3;
        return send_msg(c, MSG_SEQ_OPEN, &m.base) || await(c, MSG_SEQ_OPEN);
    }
    case 1:
    case 2: {
        Cake__LayerRef m = CAKE__LAYER_REF__INIT;
        m.seq_id = id, m.layer = layer;
        uint16_t t = u32(p, n, 0) % 10 == 1 ? MSG_PREFILL_RESERVE : MSG_PREFILL_OBSERVE;
        return send_msg(c, t, &m.base) || await(c, t);
    }
    case 3: {
        Cake__PrefillSubmit m = CAKE__PREFILL_SUBMIT__INIT;
        m.seq_id = id, m.layer = layer, m.preference = (double)u32(p, n, 3) / 7.0;
        return send_msg(c, MSG_PREFILL_SUBMIT, &m.base) || await(c, MSG_PREFILL_SUBMIT);
    }
    case 4: {
        uint64_t ids[8];
        Cake__DecodeStep m = CAKE__DECODE_STEP__INIT;
        m.n_seq_ids = (size_t)(u32(p, n, 3) % 4);
        for (size_t i = 0; i < m.n_seq_ids; i++)
            ids[i] = k ? c->seqs[(c->n_seqs - 1 - (int)(u32(p, n, 4 + i) % (uint32_t)k)) % 8] : 0;
        m.seq_ids = ids;
        return send_msg(c, MSG_DECODE_STEP, &m.base) || await(c, MSG_DECODE_STEP);
    }
    case 5: {
        Cake__SeqRef m = CAKE__SEQ_REF__INIT;
        m.seq_id = id;
        uint16_t t = u32(p, n, 3) & 1 ? MSG_SEQ_CLOSE : MSG_SEQ_INFO;
        return send_msg(c, t, &m.base) || await(c, t);
    }
    case 6: {
        Cake__ListPage m = CAKE__LIST_PAGE__INIT;
        m.after = u32(p, n, 3), m.offset = u32(p, n, 4) * 1000;
        uint16_t t = u32(p, n, 5) & 1 ? MSG_SEQUENCES : MSG_METRICS;
        return send_msg(c, t, &m.base) || await(c, t);
    }
    case 7: {
        Cake__SetQuota m = CAKE__SET_QUOTA__INIT;
        m.tenant = (char *)"fuzz", m.has_weight = 1, m.weight = u32(p, n, 3);
        m.has_gpu_min = u32(p, n, 4) & 1, m.gpu_min_bytes = (uint64_t)u32(p, n, 5) << 10;
        m.has_gpu_max = u32(p, n, 6) & 1, m.gpu_max_bytes = (uint64_t)u32(p, n, 7) << 10;
        static char *const modes[] = {"", "reslice", "park", "refuse", "default", "bogus"};
        m.pressure = modes[u32(p, n, 8) % 6];
        m.has_min_tokens = u32(p, n, 9) & 1, m.min_tokens = u32(p, n, 10);
        return send_msg(c, MSG_SET_QUOTA, &m.base) || await(c, MSG_SET_QUOTA);
    }
    case 8: {
        Cake__PositionsRequest m = CAKE__POSITIONS_REQUEST__INIT;
        m.seq_id = id, m.layer = layer, m.kv_head = u32(p, n, 3) % 5;
        m.from = u32(p, n, 4) % 3 ? u32(p, n, 5) % 64 : u32(p, n, 5);
        m.max = u32(p, n, 6) % 4 ? u32(p, n, 7) % 100 : u32(p, n, 7);
        return send_msg(c, MSG_POSITIONS, &m.base) || await(c, MSG_POSITIONS);
    }
    case 9: {
        Cake__Park m = CAKE__PARK__INIT;
        m.seq_id = id, m.restore = u32(p, n, 3) & 1;
        return send_msg(c, MSG_PARK, &m.base) || await(c, MSG_PARK);
    }
    default: {
        uint16_t t = u32(p, n, 3) % 3 == 0 ? MSG_STATUS : u32(p, n, 3) % 3 == 1 ? MSG_TENANTS : MSG_PING;
        return send_msg(c, t, NULL) || await(c, t);
    }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, start);
    struct conn c = {.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, sock_path);
    if (c.fd < 0 || connect(c.fd, (struct sockaddr *)&a, sizeof a))
        abort();
    frame_reader_init(&c.rd, FRAME_MAX_BODY);
    Cake__Hello hello = CAKE__HELLO__INIT;
    hello.protocol_version = CAKE_PROTOCOL_VERSION, hello.service = (char *)"fuzz";
    hello.want_pool = 1, hello.admin = size & 1; /* administrators may set quotas */
    int dead = send_msg(&c, MSG_HELLO, &hello.base) || await(&c, MSG_HELLO);
    for (size_t i = 0; !dead && i + 3 <= size;) {
        uint8_t op = data[i];
        size_t len = (size_t)data[i + 1] | (size_t)data[i + 2] << 8;
        i += 3;
        len = len < size - i ? len : size - i;
        const uint8_t *p = data + i;
        i += len;
        switch (op % 4) {
        case 0:
            dead = send_bytes(&c, p, len);
            if (!dead) { /* whatever caked makes of it: a reply, an error and a close, nothing */
                struct pollfd pf = {c.fd, POLLIN, 0};
                if (poll(&pf, 1, 20) == 1)
                    dead = await(&c, 0) < 0;
            }
            break;
        case 1:
            dead = send_frame(&c, (uint16_t)u32(p, len, 0) | (uint16_t)(u32(p, len, 1) << 8),
                              len > 2 ? p + 2 : NULL, len > 2 ? len - 2 : 0) ||
                   await(&c, 0);
            break;
        case 2:
            dead = send_frame(&c, (uint16_t)(op / 4 % MSG_TYPE_MAX + 1), p, len) || await(&c, 0);
            break;
        default:
            dead = structured(&c, p, len);
        }
    }
    close(c.fd);
    frame_reader_free(&c.rd);
    /* every page comes back once caked has seen the close and its work is done */
    for (int i = 0; i < 500 && __atomic_load_n(&srv->pool.used, __ATOMIC_RELAXED); i++)
        usleep(2000);
    if (__atomic_load_n(&srv->pool.used, __ATOMIC_RELAXED))
        abort(); /* a connection's pages outlived it */
    return 0;
}
