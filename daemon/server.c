/* server.c - connections, dispatch and lifecycle of caked (see server.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cake.pb-c.h"
#include "cake/cake.h"
#include "frame.h"
#include "metrics.h"
#include "pool.h"
#include "seq.h"
#include "server.h"
#include "tenant.h"
#include "worker.h"

#define SERVER_MAX_CLIENTS 4096      /* accept() beyond this is refused and counted */
#define SERVER_MAX_DECODE_BATCH 65536 /* sequence ids in one DECODE_STEP */
#define UNPACK_LIMIT(len) ((size_t)(len) * 8 + 65536) /* bound on unpacker heap per body */

enum conn_state { C_HEADER, C_BODY, C_BUSY, C_CLOSED };

struct client {
    struct server *srv;
    uint64_t id;
    int fd, handle;
    struct ucred cred;
    struct tenant *tenant;
    int admin;
    int engine;            /* mapped the pool */
    enum conn_state state;
    uint8_t hdr[FRAME_HEADER_BYTES];
    size_t got;            /* body bytes received */
    uint8_t in[4096];      /* bytes read ahead of parsing */
    size_t in_off, in_len;
    int drained;           /* the last recv came back short: wait for the next poll event */
    int reading;           /* inside client_read: completions must not re-enter it */
    struct client *next_dead;
    struct frame_header h;
    uint8_t *body;
    int discard;           /* unknown type: read and drop the body, then answer */
    int close_after_flush; /* the stream is unusable after this reply */
    uint8_t *out;
    size_t out_len, out_off;
    int out_fd;            /* fd to pass with the pending reply, -1 none */
    double t0;             /* request start */
};

struct seq_slot {
    struct seq *s;
    uint32_t gen;
};

struct server {
    struct server_cfg cfg;
    struct loop *loop;
    const char *io_name;
    struct pool pool;
    struct tenants tenants;
    struct workers *workers;
    struct metrics m;
    struct seq_env env;
    int listen_fd, listen_h, sig_fd, sig_h, work_h;
    struct client **clients;
    uint32_t n_clients;
    struct seq_slot *slots;
    uint32_t n_slots, cap_slots, n_seqs;
    uint64_t next_client_id;
    struct client *dead;   /* closed during this loop iteration, freed after it */
    double t_start;
    uid_t owner_uid;
    int stopping;
};

/* A job in flight: prefill observe/submit of one sequence, or the evictions of a decode
 * step over several. */
struct work {
    struct job job;
    struct server *srv;
    uint64_t client_id;
    uint64_t request_id;
    uint16_t type;
    uint32_t layer;
    int observe;
    double pref;
    struct seq **seqs;
    uint32_t n;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char ts[32];
    time_t t = time(NULL);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s caked[%d]: ", ts, (int)getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---- sequence table ------------------------------------------------------ */

static int seq_slot_new(struct server *s, uint64_t *id)
{
    for (uint32_t i = 0; i < s->n_slots; i++)
        if (!s->slots[i].s) {
            *id = ((uint64_t)++s->slots[i].gen << 32) | (i + 1);
            return (int)i;
        }
    if (s->n_slots == s->cap_slots) {
        uint32_t cap = s->cap_slots ? s->cap_slots * 2 : 256;
        struct seq_slot *n = realloc(s->slots, sizeof(*n) * cap);
        if (!n)
            return -1;
        s->slots = n, s->cap_slots = cap;
    }
    uint32_t i = s->n_slots++;
    s->slots[i] = (struct seq_slot){NULL, 1};
    *id = ((uint64_t)1 << 32) | (i + 1);
    return (int)i;
}

static struct seq *seq_find(struct server *s, uint64_t id)
{
    uint32_t i = (uint32_t)id - 1;
    if ((uint32_t)id == 0 || i >= s->n_slots || !s->slots[i].s || s->slots[i].s->id != id)
        return NULL;
    return s->slots[i].s;
}

static void seq_remove(struct server *s, struct seq *q)
{
    s->slots[(uint32_t)q->id - 1].s = NULL;
    s->n_seqs--;
    seq_free(&s->env, q);
}

/* A sequence the client may touch: its own tenant's. */
static struct seq *seq_of(struct server *s, struct client *c, uint64_t id)
{
    struct seq *q = seq_find(s, id);
    return q && q->tenant == c->tenant ? q : NULL;
}

static struct client *client_by_id(struct server *s, uint64_t id)
{
    for (uint32_t i = 0; i < s->n_clients; i++)
        if (s->clients[i]->id == id)
            return s->clients[i];
    return NULL;
}

/* ---- replies --------------------------------------------------------------- */

static void client_close(struct server *s, struct client *c);
static void client_read(struct server *s, struct client *c);

static void watch_out(struct server *s, struct client *c, int on)
{
    loop_set(s->loop, c->handle, LOOP_IN | (on ? LOOP_OUT : 0));
}

/* Sends what is pending; returns 1 when everything is out, 0 to wait, -1 when closed. */
static int client_flush(struct server *s, struct client *c)
{
    while (c->out_off < c->out_len) {
        struct iovec iov = {c->out + c->out_off, c->out_len - c->out_off};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        char cbuf[CMSG_SPACE(sizeof(int))];
        if (c->out_fd >= 0) {
            memset(cbuf, 0, sizeof cbuf);
            mh.msg_control = cbuf, mh.msg_controllen = sizeof cbuf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cm), &c->out_fd, sizeof(int));
        }
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                watch_out(s, c, 1);
                return 0;
            }
            client_close(s, c);
            return -1;
        }
        c->out_fd = -1; /* the fd travelled with the first byte */
        c->out_off += (size_t)n;
    }
    free(c->out);
    c->out = NULL, c->out_len = c->out_off = 0;
    watch_out(s, c, 0);
    if (c->close_after_flush) {
        client_close(s, c);
        return -1;
    }
    return 1;
}

static void queue_frame(struct server *s, struct client *c, uint16_t type, uint64_t rid,
                        const ProtobufCMessage *msg, int fd)
{
    size_t blen = msg ? protobuf_c_message_get_packed_size(msg) : 0;
    uint8_t *buf = malloc(FRAME_HEADER_BYTES + blen);
    if (!buf) {
        c->close_after_flush = 1;
        return;
    }
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, type, fd >= 0 ? FRAME_FLAG_FDS : 0,
                             (uint32_t)blen, rid};
    frame_write_header(buf, &h);
    if (msg)
        protobuf_c_message_pack(msg, buf + FRAME_HEADER_BYTES);
    free(c->out);
    c->out = buf, c->out_len = FRAME_HEADER_BYTES + blen, c->out_off = 0, c->out_fd = fd;
}

static void finish_request(struct server *s, struct client *c)
{
    metrics_observe_latency(&s->m, now_s() - c->t0);
    c->state = C_HEADER;
    c->got = 0;
    free(c->body);
    c->body = NULL;
    if (client_flush(s, c) == 1 && !c->reading)
        client_read(s, c); /* frames may be waiting: the poll only reports new arrivals */
}

static void reply(struct server *s, struct client *c, uint16_t type, const ProtobufCMessage *msg,
                  int fd)
{
    queue_frame(s, c, type | FRAME_REPLY, c->h.request_id, msg, fd);
    finish_request(s, c);
}

static void reply_error(struct server *s, struct client *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void reply_error(struct server *s, struct client *c, int code, const char *fmt, ...)
{
    char text[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    s->m.errors[metrics_err_kind(code)]++;
    Cake__Error e = CAKE__ERROR__INIT;
    e.code = code, e.message = text;
    queue_frame(s, c, MSG_ERROR, c->h.request_id, &e.base, -1);
    finish_request(s, c);
}

/* ---- handlers -------------------------------------------------------------- */

#define UNPACK(kind, var)                                                                  \
    struct frame_alloc fa_;                                                                \
    ProtobufCAllocator al_;                                                                \
    frame_alloc_init(&fa_, UNPACK_LIMIT(c->h.body_len), &al_);                             \
    __typeof__(cake__##kind##__unpack(NULL, 0, NULL)) var =                                \
        cake__##kind##__unpack(&al_, c->h.body_len, c->body);                             \
    if (!var) {                                                                            \
        reply_error(s, c, CAKE_EPROTO, "malformed %s body", frame_type_name(c->h.type)); \
        return;                                                                            \
    }
#define UNPACK_FREE(kind, var) cake__##kind##__free_unpacked(var, &al_)

static void h_hello(struct server *s, struct client *c)
{
    UNPACK(hello, m);
    if (m->protocol_version != CAKE_PROTOCOL_VERSION) {
        uint32_t v = m->protocol_version;
        UNPACK_FREE(hello, m);
        c->close_after_flush = 1;
        reply_error(s, c, CAKE_EVERSION, "protocol version %u not supported (caked speaks %u)",
                    v, CAKE_PROTOCOL_VERSION);
        return;
    }
    if (c->tenant) {
        UNPACK_FREE(hello, m);
        reply_error(s, c, CAKE_ESTATE, "HELLO was already sent on this connection");
        return;
    }
    const char *name = m->service && m->service[0] ? m->service : "default";
    if (!tenant_name_ok(name)) {
        UNPACK_FREE(hello, m);
        reply_error(s, c, CAKE_EINVAL, "service name must be 1..63 chars of [A-Za-z0-9._-]");
        return;
    }
    struct tenant *t = tenant_get(&s->tenants, name, c->cred.uid, 1);
    if (!t) {
        UNPACK_FREE(hello, m);
        reply_error(s, c, CAKE_EOOM, "too many tenants");
        return;
    }
    int want_pool = m->want_pool;
    c->tenant = t;
    c->engine = want_pool; /* control clients (cachectl) do not count toward fair shares */
    if (c->engine)
        t->clients++;
    c->admin = c->cred.uid == 0 || c->cred.uid == s->owner_uid;
    UNPACK_FREE(hello, m);
    Cake__HelloReply r = CAKE__HELLO_REPLY__INIT;
    r.protocol_version = CAKE_PROTOCOL_VERSION;
    r.client_id = c->id;
    r.tenant = t->name;
    r.pool_bytes = s->pool.bytes;
    r.page_bytes = s->pool.page_bytes;
    r.daemon_version = (char *)CAKE_VERSION;
    r.admin = c->admin;
    reply(s, c, MSG_HELLO, &r.base, want_pool ? s->pool.fd : -1);
}

static void h_seq_open(struct server *s, struct client *c)
{
    UNPACK(seq_open, m);
    struct seq_open_args a = {
        .layers = m->layers, .q_heads = m->q_heads, .kv_heads = m->kv_heads,
        .head_dim = m->head_dim, .dtype = m->dtype, .prompt_len = m->prompt_len,
        .max_new = m->max_new_tokens,
    };
    policy_cfg_default(&a.cfg, m->layers ? m->layers : 1, 1024);
    int bad_mode = 0;
    if (m->policy) {
        bad_mode = m->policy->mode > POLICY_FIXED;
        a.cfg.mode = (enum policy_mode)m->policy->mode;
        a.cfg.cache_size = m->policy->cache_size, a.cfg.window = m->policy->window;
        a.cfg.tau1 = m->policy->tau1, a.cfg.tau2 = m->policy->tau2, a.cfg.gamma = m->policy->gamma;
        a.cfg.cascading = m->policy->cascading, a.cfg.decode_slack = m->policy->decode_slack;
    }
    UNPACK_FREE(seq_open, m);
    if (bad_mode) {
        reply_error(s, c, CAKE_EINVAL, "policy mode must be 0 (parity) or 1 (fixed)");
        return;
    }
    uint64_t id;
    int slot = seq_slot_new(s, &id);
    if (slot < 0) {
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    struct seq *q;
    const char *why = "out of memory";
    int rc = seq_open(&s->env, &a, c->tenant, id, c->id, &q, &why);
    if (rc) {
        if (rc == CAKE_EOOM)
            c->tenant->oom_errors++;
        reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s", why);
        return;
    }
    s->slots[slot].s = q;
    s->n_seqs++;
    Cake__SeqOpenReply r = CAKE__SEQ_OPEN_REPLY__INIT;
    r.seq_id = id, r.tokens_per_page = q->tpp;
    r.desc_offset = (uint64_t)q->desc_first * s->pool.page_bytes;
    r.desc_bytes = (uint64_t)q->desc_pages * s->pool.page_bytes;
    r.scratch_offset = (uint64_t)q->scratch_first * s->pool.page_bytes;
    r.scratch_bytes = (uint64_t)q->scratch_pages * s->pool.page_bytes;
    reply(s, c, MSG_SEQ_OPEN, &r.base, -1);
}

static void h_reserve(struct server *s, struct client *c)
{
    UNPACK(layer_ref, m);
    uint64_t id = m->seq_id;
    uint32_t layer = m->layer;
    UNPACK_FREE(layer_ref, m);
    struct seq *q = seq_of(s, c, id);
    if (!q) {
        reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    const char *why = "";
    int rc = seq_reserve(&s->env, q, layer, &why);
    if (rc) {
        if (rc == CAKE_EOOM)
            c->tenant->oom_errors++;
        reply_error(s, c, rc, "%s", why);
        return;
    }
    reply(s, c, MSG_PREFILL_RESERVE, NULL, -1);
}

static void work_run(struct job *j)
{
    struct work *w = (struct work *)j;
    if (w->type == MSG_DECODE_STEP) {
        for (uint32_t i = 0; i < w->n; i++)
            if (seq_decode_needs_evict(w->seqs[i]))
                seq_decode_evict_work(&w->srv->env, w->seqs[i]);
    } else {
        seq_prefill_work(&w->srv->env, w->seqs[0], w->layer, w->observe, w->pref);
    }
}

static void decode_reserve_and_reply(struct server *s, struct client *c, struct seq **seqs,
                                     uint32_t n, uint32_t evictions);

static void work_done(struct job *j)
{
    struct work *w = (struct work *)j;
    struct server *s = w->srv;
    struct client *c = client_by_id(s, w->client_id);
    int rc = 0, lost = 0;
    uint32_t evictions = 0, ev_layers[SEQ_MAX_LAYERS], n_ev = 0;
    double pref = 0;
    for (uint32_t i = 0; i < w->n; i++) {
        struct seq *q = w->seqs[i];
        q->busy = 0;
        if (q->work_rc && !rc)
            rc = q->work_rc;
        if (w->type == MSG_DECODE_STEP) {
            seq_trim_pages(&s->env, q);
            s->m.evictions_decode += q->n_ev;
        } else {
            seq_prefill_commit(&s->env, q);
            s->m.evictions_prefill += q->n_ev;
            memcpy(ev_layers, q->ev_layers, sizeof(uint32_t) * q->n_ev);
            n_ev = q->n_ev, pref = q->last_pref;
        }
        evictions += q->n_ev;
        s->m.tokens_evicted += q->evicted_tokens;
        q->n_ev = 0;
        if (q->orphaned) {
            seq_remove(s, q);
            lost = 1;
        }
    }
    if (c && c->state == C_BUSY) {
        if (rc) {
            reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s failed: %s",
                        frame_type_name(w->type), rc < -4095 ? cake_strerror(rc) : strerror(-rc));
        } else if (lost) {
            reply_error(s, c, CAKE_ENOSEQ, "a sequence was closed by its owner's exit meanwhile");
        } else if (w->type == MSG_DECODE_STEP) {
            decode_reserve_and_reply(s, c, w->seqs, w->n, evictions);
        } else {
            Cake__PrefillReply r = CAKE__PREFILL_REPLY__INIT;
            r.preference = pref;
            r.n_evicted_layers = n_ev, r.evicted_layers = ev_layers;
            reply(s, c, w->type, &r.base, -1);
        }
    }
    free(w->seqs);
    free(w);
}

static void start_work(struct server *s, struct client *c, uint16_t type, struct seq **seqs,
                       uint32_t n, uint32_t layer, int observe, double pref)
{
    struct work *w = calloc(1, sizeof(*w));
    if (!w) {
        free(seqs);
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    w->job.run = work_run, w->job.done = work_done, w->job.urgent = type == MSG_DECODE_STEP;
    w->srv = s, w->client_id = c->id, w->request_id = c->h.request_id, w->type = type;
    w->seqs = seqs, w->n = n, w->layer = layer, w->observe = observe, w->pref = pref;
    for (uint32_t i = 0; i < n; i++)
        seqs[i]->busy = 1;
    c->state = C_BUSY;
    workers_submit(s->workers, &w->job);
}

static void h_prefill(struct server *s, struct client *c, int observe)
{
    uint64_t id;
    uint32_t layer;
    double pref = 0;
    if (observe) {
        UNPACK(layer_ref, m);
        id = m->seq_id, layer = m->layer;
        UNPACK_FREE(layer_ref, m);
    } else {
        UNPACK(prefill_submit, m);
        id = m->seq_id, layer = m->layer, pref = m->preference;
        UNPACK_FREE(prefill_submit, m);
    }
    struct seq *q = seq_of(s, c, id);
    if (!q) {
        reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    const char *why = "";
    int rc = seq_prefill_check(q, layer, &why);
    if (rc) {
        reply_error(s, c, rc, "%s", why);
        return;
    }
    struct seq **one = malloc(sizeof(*one));
    if (!one) {
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    one[0] = q;
    start_work(s, c, observe ? MSG_PREFILL_OBSERVE : MSG_PREFILL_SUBMIT, one, 1, layer, observe, pref);
}

static void decode_reserve_and_reply(struct server *s, struct client *c, struct seq **seqs,
                                     uint32_t n, uint32_t evictions)
{
    uint64_t pages = 0;
    for (uint32_t i = 0; i < n; i++)
        pages += seq_decode_pages_needed(seqs[i]);
    uint64_t pb = s->pool.page_bytes;
    if (tenant_admit(&s->tenants, c->tenant, pages * pb, (uint64_t)pool_free_pages(&s->pool) * pb,
                     s->pool.bytes)) {
        c->tenant->oom_errors++;
        reply_error(s, c, CAKE_EOOM, "decode step needs %llu pages beyond the tenant's share",
                    (unsigned long long)pages);
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        seq_decode_reserve(&s->env, seqs[i]); /* admitted above: cannot run dry */
    Cake__DecodeReply r = CAKE__DECODE_REPLY__INIT;
    r.evictions = evictions;
    reply(s, c, MSG_DECODE_STEP, &r.base, -1);
}

static void h_decode(struct server *s, struct client *c)
{
    UNPACK(decode_step, m);
    size_t n = m->n_seq_ids;
    if (n == 0 || n > SERVER_MAX_DECODE_BATCH) {
        UNPACK_FREE(decode_step, m);
        reply_error(s, c, n ? CAKE_ETOOBIG : CAKE_EINVAL, "decode step of %zu sequences", n);
        return;
    }
    struct seq **seqs = malloc(sizeof(*seqs) * n);
    if (!seqs) {
        UNPACK_FREE(decode_step, m);
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    int need_evict = 0;
    for (size_t i = 0; i < n; i++) {
        struct seq *q = seq_of(s, c, m->seq_ids[i]);
        const char *why = "";
        int rc = q ? seq_decode_check(q, &why) : CAKE_ENOSEQ;
        if (!rc && q->orphaned)
            rc = CAKE_ENOSEQ;
        if (!rc) {
            q->busy = 1; /* marks duplicates in this batch */
            seqs[i] = q;
            need_evict |= seq_decode_needs_evict(q);
        }
        if (rc) {
            for (size_t k = 0; k < i; k++)
                seqs[k]->busy = 0;
            uint64_t id = m->seq_ids[i];
            UNPACK_FREE(decode_step, m);
            free(seqs);
            if (rc == CAKE_ESTATE && q && q->busy && !why[0])
                why = "sequence listed twice";
            reply_error(s, c, rc, "sequence %#llx: %s", (unsigned long long)id,
                        rc == CAKE_ENOSEQ ? "no such sequence" : why);
            return;
        }
    }
    UNPACK_FREE(decode_step, m);
    for (size_t i = 0; i < n; i++)
        seqs[i]->busy = 0;
    if (need_evict) {
        start_work(s, c, MSG_DECODE_STEP, seqs, (uint32_t)n, 0, 0, 0);
        return;
    }
    decode_reserve_and_reply(s, c, seqs, (uint32_t)n, 0);
    free(seqs);
}

static void h_seq_close(struct server *s, struct client *c)
{
    UNPACK(seq_ref, m);
    uint64_t id = m->seq_id;
    UNPACK_FREE(seq_ref, m);
    struct seq *q = seq_of(s, c, id);
    if (!q || q->orphaned) {
        reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    if (q->busy) {
        reply_error(s, c, CAKE_ESTATE, "sequence busy");
        return;
    }
    seq_remove(s, q);
    reply(s, c, MSG_SEQ_CLOSE, NULL, -1);
}

static void h_status(struct server *s, struct client *c)
{
    Cake__Status r = CAKE__STATUS__INIT;
    r.daemon_version = (char *)CAKE_VERSION;
    r.protocol_version = CAKE_PROTOCOL_VERSION;
    r.io_backend = (char *)s->io_name;
    r.uptime_ms = (uint64_t)((now_s() - s->t_start) * 1e3);
    r.pool_bytes = s->pool.bytes, r.page_bytes = s->pool.page_bytes;
    r.pages_total = s->pool.pages, r.pages_used = s->pool.used;
    r.tenants = s->tenants.n, r.sequences = s->n_seqs, r.clients = s->n_clients;
    r.pid = (uint32_t)getpid();
    r.socket = s->cfg.socket_path;
    reply(s, c, MSG_STATUS, &r.base, -1);
}

static void fill_tenant(struct server *s, Cake__Tenant *t, const struct tenant *x)
{
    cake__tenant__init(t);
    t->name = (char *)x->name, t->uid = x->uid, t->weight = x->weight;
    t->min_bytes = x->min_bytes;
    t->max_bytes = tenant_cap(&s->tenants, x, s->pool.bytes);
    t->used_bytes = x->used_bytes, t->sequences = x->sequences, t->clients = x->clients;
    t->oom_errors = x->oom_errors;
}

static void h_tenants(struct server *s, struct client *c)
{
    Cake__TenantList r = CAKE__TENANT_LIST__INIT;
    Cake__Tenant *ts = calloc(s->tenants.n + 1, sizeof(*ts));
    Cake__Tenant **tp = calloc(s->tenants.n + 1, sizeof(*tp));
    if (!ts || !tp) {
        free(ts), free(tp);
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < s->tenants.n; i++) {
        const struct tenant *x = &s->tenants.t[i];
        if ((!c->admin && x != c->tenant) || (!x->clients && !x->used_bytes && !x->configured))
            continue; /* other tenants, and idle ones nobody configured */
        fill_tenant(s, &ts[r.n_tenants], x);
        tp[r.n_tenants] = &ts[r.n_tenants];
        r.n_tenants++;
    }
    r.tenants = tp;
    reply(s, c, MSG_TENANTS, &r.base, -1);
    free(ts), free(tp);
}

static void fill_seq(struct server *s, Cake__SeqInfo *r, const struct seq *q)
{
    cake__seq_info__init(r);
    r->seq_id = q->id, r->tenant = (char *)q->tenant->name, r->layers = q->L;
    r->kv_heads = q->Hkv, r->head_dim = q->d, r->dtype = q->dt, r->prompt_len = q->n;
    r->prefilled_layers = q->next_observe, r->decoded_tokens = q->decoded;
    r->bytes = seq_bytes(&s->env, q), r->mode = q->cfg.mode, r->cache_size = q->cfg.cache_size;
}

static void h_sequences(struct server *s, struct client *c)
{
    Cake__SeqList r = CAKE__SEQ_LIST__INIT;
    Cake__SeqInfo *v = calloc(s->n_seqs + 1, sizeof(*v));
    Cake__SeqInfo **p = calloc(s->n_seqs + 1, sizeof(*p));
    if (!v || !p) {
        free(v), free(p);
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < s->n_slots; i++) {
        const struct seq *q = s->slots[i].s;
        if (!q || q->orphaned || (!c->admin && q->tenant != c->tenant))
            continue;
        fill_seq(s, &v[r.n_seqs], q);
        p[r.n_seqs] = &v[r.n_seqs];
        r.n_seqs++;
    }
    r.seqs = p;
    reply(s, c, MSG_SEQUENCES, &r.base, -1);
    free(v), free(p);
}

static void h_seq_info(struct server *s, struct client *c)
{
    UNPACK(seq_ref, m);
    uint64_t id = m->seq_id;
    UNPACK_FREE(seq_ref, m);
    struct seq *q = seq_find(s, id);
    if (!q || q->orphaned || (!c->admin && q->tenant != c->tenant)) {
        reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    Cake__SeqInfo r;
    fill_seq(s, &r, q);
    Cake__LayerInfo *li = calloc(q->L, sizeof(*li));
    Cake__LayerInfo **lp = calloc(q->L, sizeof(*lp));
    if (!li || !lp) {
        free(li), free(lp);
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint32_t l = 0; l < q->L; l++) {
        cake__layer_info__init(&li[l]);
        int done = l < q->next_observe;
        li[l].budget = done ? cakeseq_budget(q->cs, l) : 0;
        li[l].prefix = done ? cakeseq_prefix_len(q->cs, l) : 0;
        li[l].tokens = q->layer[l].tokens, li[l].pages = q->layer[l].n_pages;
        li[l].preference = done ? cakeseq_preference(q->cs, l) : 0;
        lp[l] = &li[l];
    }
    r.n_layer = q->L, r.layer = lp;
    reply(s, c, MSG_SEQ_INFO, &r.base, -1);
    free(li), free(lp);
}

static int render_metrics(struct server *s, struct strbuf *b)
{
    int rc = 0;
#define P(...) rc |= strbuf_printf(b, __VA_ARGS__)
    P("# HELP caked_pool_bytes Size of the host pool.\n# TYPE caked_pool_bytes gauge\n"
      "caked_pool_bytes %llu\n", (unsigned long long)s->pool.bytes);
    P("# HELP caked_pool_page_bytes Size of one pool page.\n# TYPE caked_pool_page_bytes gauge\n"
      "caked_pool_page_bytes %llu\n", (unsigned long long)s->pool.page_bytes);
    P("# HELP caked_pool_pages Pool pages by state.\n# TYPE caked_pool_pages gauge\n"
      "caked_pool_pages{state=\"used\"} %u\ncaked_pool_pages{state=\"free\"} %u\n", s->pool.used,
      pool_free_pages(&s->pool));
    P("# HELP caked_tenants Known tenants.\n# TYPE caked_tenants gauge\ncaked_tenants %u\n",
      s->tenants.n);
    P("# HELP caked_sequences Open sequences.\n# TYPE caked_sequences gauge\ncaked_sequences %u\n",
      s->n_seqs);
    P("# HELP caked_clients Connected clients.\n# TYPE caked_clients gauge\ncaked_clients %u\n",
      s->n_clients);
    P("# HELP caked_tenant_used_bytes Pool bytes held by each tenant.\n"
      "# TYPE caked_tenant_used_bytes gauge\n");
    for (uint32_t i = 0; i < s->tenants.n; i++)
        P("caked_tenant_used_bytes{tenant=\"%s\",uid=\"%u\"} %llu\n", s->tenants.t[i].name,
          s->tenants.t[i].uid, (unsigned long long)s->tenants.t[i].used_bytes);
    P("# HELP caked_tenant_oom_total Requests refused for lack of memory, per tenant.\n"
      "# TYPE caked_tenant_oom_total counter\n");
    for (uint32_t i = 0; i < s->tenants.n; i++)
        P("caked_tenant_oom_total{tenant=\"%s\",uid=\"%u\"} %llu\n", s->tenants.t[i].name,
          s->tenants.t[i].uid, (unsigned long long)s->tenants.t[i].oom_errors);
    P("# HELP caked_requests_total Requests by type.\n# TYPE caked_requests_total counter\n");
    for (unsigned t = 1; t <= MSG_TYPE_MAX; t++)
        P("caked_requests_total{type=\"%s\"} %llu\n", frame_type_name(t),
          (unsigned long long)s->m.requests[t]);
    P("# HELP caked_errors_total Error replies by kind.\n# TYPE caked_errors_total counter\n");
    for (int e = 0; e < ERR_KINDS; e++)
        P("caked_errors_total{kind=\"%s\"} %llu\n", metrics_err_name((enum metrics_err)e),
          (unsigned long long)s->m.errors[e]);
    P("# HELP caked_evictions_total Layer compactions.\n# TYPE caked_evictions_total counter\n"
      "caked_evictions_total{phase=\"prefill\"} %llu\ncaked_evictions_total{phase=\"decode\"} %llu\n",
      (unsigned long long)s->m.evictions_prefill, (unsigned long long)s->m.evictions_decode);
    P("# HELP caked_evicted_tokens_total Tokens evicted (per kv head).\n"
      "# TYPE caked_evicted_tokens_total counter\ncaked_evicted_tokens_total %llu\n",
      (unsigned long long)s->m.tokens_evicted);
    P("# HELP caked_clients_total Connections accepted.\n# TYPE caked_clients_total counter\n"
      "caked_clients_total %llu\n", (unsigned long long)s->m.clients_total);
    P("# HELP caked_clients_lost_total Clients that disconnected while holding sequences.\n"
      "# TYPE caked_clients_lost_total counter\ncaked_clients_lost_total %llu\n",
      (unsigned long long)s->m.clients_killed);
    P("# HELP caked_request_duration_seconds Request latency inside caked.\n"
      "# TYPE caked_request_duration_seconds histogram\n");
    uint64_t cum = 0;
    for (int i = 0; i < METRICS_LAT_BUCKETS; i++) {
        cum += s->m.lat_bucket[i];
        P("caked_request_duration_seconds_bucket{le=\"%g\"} %llu\n", metrics_lat_bounds_s[i],
          (unsigned long long)cum);
    }
    P("caked_request_duration_seconds_bucket{le=\"+Inf\"} %llu\n"
      "caked_request_duration_seconds_sum %.9f\ncaked_request_duration_seconds_count %llu\n",
      (unsigned long long)s->m.lat_count, s->m.lat_sum_s, (unsigned long long)s->m.lat_count);
#undef P
    return rc;
}

static void h_metrics(struct server *s, struct client *c)
{
    struct strbuf b = {0};
    if (render_metrics(s, &b) || b.len + 64 > FRAME_MAX_BODY) {
        free(b.s);
        reply_error(s, c, CAKE_EINTERNAL, "metrics do not fit a frame");
        return;
    }
    Cake__Metrics r = CAKE__METRICS__INIT;
    r.text = b.s;
    reply(s, c, MSG_METRICS, &r.base, -1);
    free(b.s);
}

static void h_set_quota(struct server *s, struct client *c)
{
    UNPACK(set_quota, m);
    if (!c->admin) {
        UNPACK_FREE(set_quota, m);
        reply_error(s, c, CAKE_EPERM, "setting quotas is reserved to root and caked's owner");
        return;
    }
    if (!m->tenant || !tenant_name_ok(m->tenant) ||
        (m->max_bytes && m->min_bytes > m->max_bytes) || m->min_bytes > s->pool.bytes) {
        UNPACK_FREE(set_quota, m);
        reply_error(s, c, CAKE_EINVAL, "bad tenant name or min > max or min > pool");
        return;
    }
    uint64_t other_min = 0;
    for (uint32_t i = 0; i < s->tenants.n; i++)
        if (strcmp(s->tenants.t[i].name, m->tenant))
            other_min += s->tenants.t[i].min_bytes;
    if (other_min + m->min_bytes > s->pool.bytes) {
        UNPACK_FREE(set_quota, m);
        reply_error(s, c, CAKE_EINVAL, "the tenants' minimums would exceed the pool");
        return;
    }
    int found = 0;
    for (uint32_t i = 0; i < s->tenants.n; i++)
        if (!strcmp(s->tenants.t[i].name, m->tenant)) {
            struct tenant *t = &s->tenants.t[i];
            t->weight = m->weight ? m->weight : t->weight;
            t->min_bytes = m->min_bytes, t->max_bytes = m->max_bytes, t->configured = 1;
            found = 1;
        }
    int rc = found ? 0 : tenant_configure(&s->tenants, m->tenant, -1, m->weight, m->min_bytes,
                                          m->max_bytes);
    logmsg("quota for tenant %s set by uid %u: weight %u min %llu max %llu", m->tenant,
           c->cred.uid, m->weight, (unsigned long long)m->min_bytes,
           (unsigned long long)m->max_bytes);
    UNPACK_FREE(set_quota, m);
    if (rc) {
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    reply(s, c, MSG_SET_QUOTA, NULL, -1);
}

static void dispatch(struct server *s, struct client *c)
{
    unsigned t = c->h.type;
    c->t0 = now_s();
    if (c->discard) {
        c->discard = 0;
        reply_error(s, c, CAKE_EPROTO, "unknown message type %u", t);
        return;
    }
    if (t & FRAME_REPLY || t == MSG_ERROR) {
        reply_error(s, c, CAKE_EPROTO, "clients send requests, not replies (type %#x)", t);
        return;
    }
    s->m.requests[t]++;
    if (t != MSG_HELLO && t != MSG_PING && !c->tenant) {
        reply_error(s, c, CAKE_ESTATE, "send HELLO first");
        return;
    }
    switch (t) {
    case MSG_HELLO: h_hello(s, c); break;
    case MSG_PING: reply(s, c, MSG_PING, NULL, -1); break;
    case MSG_SEQ_OPEN: h_seq_open(s, c); break;
    case MSG_PREFILL_RESERVE: h_reserve(s, c); break;
    case MSG_PREFILL_OBSERVE: h_prefill(s, c, 1); break;
    case MSG_PREFILL_SUBMIT: h_prefill(s, c, 0); break;
    case MSG_DECODE_STEP: h_decode(s, c); break;
    case MSG_SEQ_CLOSE: h_seq_close(s, c); break;
    case MSG_STATUS: h_status(s, c); break;
    case MSG_TENANTS: h_tenants(s, c); break;
    case MSG_SEQUENCES: h_sequences(s, c); break;
    case MSG_SEQ_INFO: h_seq_info(s, c); break;
    case MSG_METRICS: h_metrics(s, c); break;
    case MSG_SET_QUOTA: h_set_quota(s, c); break;
    default: reply_error(s, c, CAKE_EPROTO, "unknown message type %u", t); break;
    }
}

/* ---- connections ----------------------------------------------------------- */

/* Parses a complete header held in c->hdr; returns 0 to go on reading the body. */
static int take_header(struct server *s, struct client *c)
{
    int rc = frame_parse_header(c->hdr, &c->h);
    unsigned t = c->h.type & ~FRAME_REPLY;
    if (rc == CAKE_EPROTO && c->h.magic == FRAME_MAGIC && c->h.version == FRAME_VERSION &&
        !(c->h.flags & ~FRAME_FLAGS_KNOWN) && c->h.body_len <= FRAME_MAX_BODY &&
        (t == 0 || t > MSG_TYPE_MAX)) {
        c->discard = 1; /* unknown type, sane frame: skip its body, answer, go on */
        rc = 0;
    }
    if (rc) {
        c->t0 = now_s();
        c->close_after_flush = 1;
        reply_error(s, c, rc, rc == CAKE_ETOOBIG ? "frame body of %u bytes exceeds the cap"
                                                 : "malformed frame header (%u)", c->h.body_len);
        return -1;
    }
    c->state = C_BODY, c->got = 0;
    if (c->h.body_len && !c->discard && !(c->body = malloc(c->h.body_len))) {
        c->close_after_flush = 1;
        reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

/* Reads and dispatches frames until the socket is drained, a request goes to a worker,
 * or a reply waits for the socket. Reads ahead into c->in; a short read means the socket
 * was empty, and anything arriving later raises a new poll event. */
static void client_read(struct server *s, struct client *c)
{
    c->reading = 1;
    while ((c->state == C_HEADER || c->state == C_BODY) && !c->out) {
        size_t avail = c->in_len - c->in_off;
        if (c->state == C_HEADER && avail >= FRAME_HEADER_BYTES) {
            memcpy(c->hdr, c->in + c->in_off, FRAME_HEADER_BYTES);
            c->in_off += FRAME_HEADER_BYTES;
            if (take_header(s, c))
                break;
            continue;
        }
        if (c->state == C_BODY) {
            size_t need = c->h.body_len - c->got;
            if (need == 0) {
                dispatch(s, c);
                continue;
            }
            if (avail) {
                size_t k = avail < need ? avail : need;
                if (c->body)
                    memcpy(c->body + c->got, c->in + c->in_off, k);
                c->in_off += k, c->got += k;
                continue;
            }
            if (c->body && need >= sizeof c->in && !c->drained) { /* large body: straight in */
                ssize_t n = recv(c->fd, c->body + c->got, need, MSG_DONTWAIT);
                if (n > 0) {
                    c->got += (size_t)n;
                    continue;
                }
                if (n == 0 || (errno != EAGAIN && errno != EINTR))
                    client_close(s, c);
                else if (errno == EAGAIN)
                    c->drained = 1;
                continue;
            }
        }
        if (c->drained)
            break;
        if (c->in_off) { /* keep the partial frame at the front */
            memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
            c->in_len -= c->in_off, c->in_off = 0;
        }
        size_t room = sizeof c->in - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
        if (n == 0) {
            client_close(s, c);
            break;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                c->drained = 1;
            else
                client_close(s, c);
            continue;
        }
        c->in_len += (size_t)n;
        c->drained = (size_t)n < room;
    }
    c->reading = 0;
}

static void client_close(struct server *s, struct client *c)
{
    if (c->state == C_CLOSED)
        return;
    loop_del(s->loop, c->handle);
    close(c->fd);
    if (c->tenant && c->engine)
        c->tenant->clients--;
    uint32_t freed = 0;
    for (uint32_t i = 0; i < s->n_slots; i++) {
        struct seq *q = s->slots[i].s;
        if (!q || q->owner != c->id)
            continue;
        freed++;
        if (q->busy)
            q->orphaned = 1; /* its work finishes first, then it is freed */
        else
            seq_remove(s, q);
    }
    if (freed)
        s->m.clients_killed++;
    c->state = C_CLOSED;
    for (uint32_t i = 0; i < s->n_clients; i++)
        if (s->clients[i] == c) {
            s->clients[i] = s->clients[--s->n_clients];
            break;
        }
    /* callers up the stack may still look at c: free it after this loop iteration */
    c->next_dead = s->dead, s->dead = c;
}

static void free_dead(struct server *s)
{
    while (s->dead) {
        struct client *c = s->dead;
        s->dead = c->next_dead;
        free(c->body), free(c->out), free(c);
    }
}

static void on_client(void *arg, uint32_t ev)
{
    struct client *c = arg;
    struct server *s = c->srv;
    if (ev & (LOOP_IN | LOOP_ERR))
        c->drained = 0;
    if ((ev & LOOP_OUT) && c->out) {
        if (client_flush(s, c) != 1)
            return;
    }
    if (ev & (LOOP_IN | LOOP_ERR | LOOP_OUT))
        client_read(s, c);
}

static void on_accept(void *arg, uint32_t ev)
{
    struct server *s = arg;
    (void)ev;
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                logmsg("accept: %s", strerror(errno));
            return;
        }
        struct ucred cred;
        socklen_t cl = sizeof cred;
        struct client *c = NULL;
        if (s->n_clients >= SERVER_MAX_CLIENTS || s->stopping ||
            getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0 ||
            !(c = calloc(1, sizeof(*c)))) {
            close(fd);
            s->m.errors[ERR_INTERNAL]++;
            continue;
        }
        struct client **cs = realloc(s->clients, sizeof(*cs) * (s->n_clients + 1));
        if (!cs || loop_add(s->loop, fd, LOOP_IN, on_client, c, &c->handle)) {
            if (cs)
                s->clients = cs;
            free(c);
            close(fd);
            continue;
        }
        s->clients = cs;
        c->srv = s, c->id = ++s->next_client_id, c->fd = fd, c->cred = cred, c->out_fd = -1;
        c->state = C_HEADER;
        s->clients[s->n_clients++] = c;
        s->m.clients_total++;
        client_read(s, c); /* data may have arrived before the watch */
    }
}

static void on_work(void *arg, uint32_t ev)
{
    struct server *s = arg;
    (void)ev;
    workers_reap(s->workers);
}

static void on_signal(void *arg, uint32_t ev)
{
    struct server *s = arg;
    struct signalfd_siginfo si;
    (void)ev;
    while (read(s->sig_fd, &si, sizeof si) == sizeof si) {
        if (!s->stopping)
            logmsg("%s: shutting down", strsignal((int)si.ssi_signo));
        s->stopping = 1;
    }
}

/* Refuses to start over a live daemon; removes a stale socket file. */
static int claim_socket_path(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    int e = errno;
    close(fd);
    if (rc == 0)
        return -EADDRINUSE;
    if (e == ECONNREFUSED)
        unlink(path);
    return 0;
}

static int make_socket_dir(const char *path)
{
    char dir[108];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = 0;
    struct stat st;
    if (stat(dir, &st) == 0)
        return 0;
    return mkdir(dir, 0700) < 0 && errno != EEXIST ? -errno : 0;
}

static int listen_on(struct server *s)
{
    const char *path = s->cfg.socket_path;
    int rc = make_socket_dir(path);
    if (rc) {
        logmsg("cannot create the directory of %s: %s", path, strerror(-rc));
        return rc;
    }
    if ((rc = claim_socket_path(path))) {
        logmsg("another caked is listening on %s", path);
        return rc;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    mode_t old = umask(0177); /* the socket is born 0600: no window where others connect */
    rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    umask(old);
    if (rc < 0 || listen(fd, 512) < 0) {
        rc = -errno;
        logmsg("cannot listen on %s: %s", path, strerror(-rc));
        close(fd);
        return rc;
    }
    if (s->cfg.socket_group[0]) {
        struct group *g = getgrnam(s->cfg.socket_group);
        if (!g || chown(path, (uid_t)-1, g->gr_gid) < 0 || chmod(path, 0660) < 0) {
            logmsg("cannot give socket group %s access: %s", s->cfg.socket_group,
                   g ? strerror(errno) : "no such group");
            close(fd);
            unlink(path);
            return -EINVAL;
        }
    }
    s->listen_fd = fd;
    return 0;
}

static void human_bytes(uint64_t b, char *out, size_t len)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int i = 0;
    while (v >= 1024 && i < 4)
        v /= 1024, i++;
    snprintf(out, len, "%.4g %s", v, u[i]);
}

int server_create(const struct server_cfg *cfg, const struct tenant_cfg *tcfg, int n_tenants,
                  struct server **out)
{
    struct server *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    s->listen_fd = s->sig_fd = -1;
    s->owner_uid = geteuid();
    s->t_start = now_s();
    s->pool.fd = -1;
    /* block the shutdown signals before any thread exists, so every thread inherits the
     * mask and they arrive only through the signalfd */
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, SIGTERM);
    sigaddset(&ss, SIGINT);
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    signal(SIGPIPE, SIG_IGN);
    const char *why = NULL;
    int rc = pool_init(&s->pool, cfg->host_pool_bytes, cfg->page_bytes, cfg->hugepages, &why);
    if (rc) {
        logmsg("host pool: %s (%s)", why, strerror(-rc));
        goto fail;
    }
    for (int i = 0; i < n_tenants; i++)
        if ((rc = tenant_configure(&s->tenants, tcfg[i].name, tcfg[i].uid, tcfg[i].weight,
                                   tcfg[i].min_bytes, tcfg[i].max_bytes)))
            goto fail;
    s->env = (struct seq_env){&s->pool, &s->tenants, cfg->kernel_threads > 0 ? cfg->kernel_threads : 1};
    if ((rc = loop_create(cfg->io, &s->loop, &s->io_name, &why))) {
        logmsg("event loop: %s (%s)", why ? why : "failed", strerror(-rc));
        goto fail;
    }
    if (why)
        logmsg("%s; using epoll", why);
    if ((rc = workers_start(&s->workers, cfg->workers)))
        goto fail;
    if ((rc = listen_on(s)))
        goto fail;
    s->sig_fd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s->sig_fd < 0 || loop_add(s->loop, s->sig_fd, LOOP_IN, on_signal, s, &s->sig_h) ||
        loop_add(s->loop, s->listen_fd, LOOP_IN, on_accept, s, &s->listen_h) ||
        loop_add(s->loop, workers_fd(s->workers), LOOP_IN, on_work, s, &s->work_h)) {
        rc = -EIO;
        goto fail;
    }
    char pb[32], pg[32];
    human_bytes(s->pool.bytes, pb, sizeof pb);
    human_bytes(s->pool.page_bytes, pg, sizeof pg);
    logmsg("caked %s listening on %s (mode %s); host pool %s in %u pages of %s%s; %s event "
           "loop; %d workers", CAKE_VERSION, cfg->socket_path, cfg->socket_group[0] ? "0660" : "0600",
           pb, s->pool.pages, pg, s->pool.hugepages ? " (huge pages)" : "", s->io_name,
           cfg->workers > 0 ? cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN));
    *out = s;
    return 0;
fail:
    server_destroy(s);
    return rc;
}

int server_run(struct server *s)
{
    while (!s->stopping) {
        int rc = loop_wait(s->loop, 1000);
        free_dead(s);
        if (rc < 0) {
            logmsg("event loop: %s", strerror(-rc));
            return rc;
        }
    }
    /* tell every client, stop accepting, let running work finish */
    loop_del(s->loop, s->listen_h);
    close(s->listen_fd);
    s->listen_fd = -1;
    unlink(s->cfg.socket_path);
    while (s->n_clients) {
        struct client *c = s->clients[0];
        Cake__Error e = CAKE__ERROR__INIT;
        e.code = CAKE_ESHUTDOWN, e.message = (char *)"caked is shutting down";
        free(c->out);
        c->out = NULL;
        queue_frame(s, c, MSG_ERROR, 0, &e.base, -1);
        if (c->out)
            send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        client_close(s, c);
    }
    free_dead(s);
    while (workers_pending(s->workers))
        loop_wait(s->loop, 100);
    logmsg("stopped");
    return 0;
}

void server_destroy(struct server *s)
{
    if (!s)
        return;
    if (s->workers)
        workers_stop(s->workers);
    for (uint32_t i = 0; i < s->n_clients; i++) {
        close(s->clients[i]->fd);
        free(s->clients[i]->body), free(s->clients[i]->out), free(s->clients[i]);
    }
    free(s->clients);
    free_dead(s);
    for (uint32_t i = 0; i < s->n_slots; i++)
        if (s->slots[i].s)
            seq_free(&s->env, s->slots[i].s);
    free(s->slots);
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
        unlink(s->cfg.socket_path);
    }
    if (s->sig_fd >= 0)
        close(s->sig_fd);
    loop_destroy(s->loop);
    if (s->pool.base)
        pool_fini(&s->pool);
    tenants_fini(&s->tenants);
    free(s);
}
