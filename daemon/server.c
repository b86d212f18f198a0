/* server.c - caked's sockets, connections and lifecycle (see server.h); what requests do is
 * in handlers.c. */
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
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cake/cake.h"
#include "frame.h"
#include "config.h"
#include "server_int.h"

double srv_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void srv_log(const char *fmt, ...)
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

int srv_seq_new(struct server *s, uint64_t *id)
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

struct seq *srv_seq_find(struct server *s, uint64_t id)
{
    uint32_t i = (uint32_t)id - 1;
    if ((uint32_t)id == 0 || i >= s->n_slots || !s->slots[i].s || s->slots[i].s->id != id)
        return NULL;
    return s->slots[i].s;
}

static void seq_remove_one(struct server *s, struct seq *q)
{
    struct tenant *t = q->tenant;
    s->slots[(uint32_t)q->id - 1].s = NULL;
    s->n_seqs--;
    seq_free(&s->env, q);
    srv_tenant_gc(s, t); /* its last sequence, its owner gone */
}

void srv_group_end(struct server *s, struct shard_group *g, const char *why)
{
    for (struct shard_group **pp = &s->groups; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    for (uint32_t i = 0; i < g->n; i++) {
        struct seq *m = g->member[i];
        if (g->waiting[i]) { /* a rank waiting at the layer barrier */
            struct client *c = srv_client_by_id(s, g->waiting[i]);
            if (c && c->state == C_BUSY)
                srv_reply_error(s, c, CAKE_ENOSEQ, "shard group ended: %s", why);
        }
        if (!m)
            continue;
        m->group = NULL;
        if (m->busy)
            m->orphaned = 1, __atomic_store_n(&m->cancel, 1, __ATOMIC_RELAXED); /* freed after */
        else if (srv_client_by_id(s, m->owner))
            srv_quarantine(s, m); /* its owner may be writing its pages right now */
        else
            seq_remove_one(s, m);
    }
    free(g);
}

void srv_tenant_gc(struct server *s, struct tenant *t)
{
    if (!t || !tenant_idle(t))
        return;
    pool_release_owner(&s->pool, t->id);
    for (uint32_t i = 0; i < s->n_gpus; i++)
        pool_release_owner(&s->gpus[i].pages, t->id);
    tenant_release(&s->tenants, t);
}

void srv_quarantine(struct server *s, struct seq *q)
{
    s->slots[(uint32_t)q->id - 1].s = NULL;
    s->n_seqs--;
    q->next_q = s->quarantine, s->quarantine = q;
}

/* Frees what was quarantined for client id (it called again, or is gone). */
void srv_release_quarantine(struct server *s, uint64_t id)
{
    for (struct seq **pp = &s->quarantine; *pp;) {
        struct seq *q = *pp;
        if (q->owner == id) {
            struct tenant *t = q->tenant;
            *pp = q->next_q;
            seq_free(&s->env, q);
            srv_tenant_gc(s, t);
        } else {
            pp = &q->next_q;
        }
    }
}

void srv_seq_remove(struct server *s, struct seq *q)
{
    if (q->group) {
        char why[96];
        snprintf(why, sizeof why, "shard %u was closed or its owner exited", q->shard);
        struct shard_group *g = q->group;
        g->member[q->shard] = NULL; /* freed below, whatever its state */
        g->waiting[q->shard] = 0;
        q->group = NULL;
        srv_group_end(s, g, why);
    }
    seq_remove_one(s, q);
}

/* A sequence the client may act on: one it opened on this connection. (Administrators and
 * other connections of its tenant may look at it, never act on it.) */
struct seq *srv_seq_of(struct server *s, struct client *c, uint64_t id)
{
    struct seq *q = srv_seq_find(s, id);
    return q && q->owner == c->id ? q : NULL;
}

struct client *srv_client_by_id(struct server *s, uint64_t id)
{
    for (uint32_t i = 0; i < s->n_clients; i++)
        if (s->clients[i]->id == id)
            return s->clients[i];
    return NULL;
}

/* ---- replies --------------------------------------------------------------- */

static void client_close(struct server *s, struct client *c);

static void watch_out(struct server *s, struct client *c, int on)
{
    loop_set(s->loop, c->handle, LOOP_IN | (on ? LOOP_OUT : 0));
}

/* Drops what is queued for c (closing fds that did not go). */
static void out_reset(struct client *c)
{
    for (uint32_t i = c->out_fds_next; i < c->n_out_fds; i++)
        for (int k = 0; k < c->out_fds[i].n; k++)
            close(c->out_fds[i].fd[k]);
    free(c->out), free(c->out_fds);
    c->out = NULL, c->out_fds = NULL;
    c->out_len = c->out_off = 0;
    c->n_out_fds = c->out_fds_next = 0;
}

/* Sends what is pending; returns 1 when everything is out, 0 to wait, -1 when closed. Each
 * group of fds goes with the first byte of its frame, alone in its sendmsg. */
static int client_flush(struct server *s, struct client *c)
{
    while (c->out_off < c->out_len) {
        size_t end = c->out_len;
        struct out_fds *f = NULL;
        if (c->out_fds_next < c->n_out_fds) {
            struct out_fds *m = &c->out_fds[c->out_fds_next];
            if (m->off == c->out_off) {
                f = m;
                if (c->out_fds_next + 1 < c->n_out_fds)
                    end = c->out_fds[c->out_fds_next + 1].off;
            } else {
                end = m->off;
            }
        }
        struct iovec iov = {c->out + c->out_off, end - c->out_off};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        char cbuf[CMSG_SPACE(SERVER_MAP_FDS * sizeof(int))];
        if (f && f->n) {
            memset(cbuf, 0, sizeof cbuf);
            mh.msg_control = cbuf, mh.msg_controllen = CMSG_SPACE(f->n * sizeof(int));
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(f->n * sizeof(int));
            memcpy(CMSG_DATA(cm), f->fd, f->n * sizeof(int));
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
        if (f) { /* the fds travelled with the first byte */
            for (int k = 0; k < f->n; k++)
                close(f->fd[k]);
            f->n = 0;
            c->out_fds_next++;
        }
        c->out_off += (size_t)n;
    }
    out_reset(c);
    watch_out(s, c, 0);
    if (c->close_after_flush) {
        client_close(s, c);
        return -1;
    }
    return 1;
}

void srv_queue_frame(struct server *s, struct client *c, uint16_t type, uint64_t rid,
                     const ProtobufCMessage *msg, const int *fds, int n)
{
    (void)s;
    size_t blen = msg ? protobuf_c_message_get_packed_size(msg) : 0;
    uint8_t *buf = realloc(c->out, c->out_len + FRAME_HEADER_BYTES + blen);
    struct out_fds *of = n ? realloc(c->out_fds, sizeof(*of) * (c->n_out_fds + 1)) : NULL;
    if (buf)
        c->out = buf;
    if (of)
        c->out_fds = of;
    if (!buf || (n && !of)) {
        for (int k = 0; k < n; k++)
            close(fds[k]);
        c->close_after_flush = 1;
        return;
    }
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, type, n ? FRAME_FLAG_FDS : 0,
                             (uint32_t)blen, rid};
    buf += c->out_len;
    frame_write_header(buf, &h);
    if (msg)
        protobuf_c_message_pack(msg, buf + FRAME_HEADER_BYTES);
    if (n) {
        struct out_fds *m = &c->out_fds[c->n_out_fds++];
        m->off = c->out_len, m->n = n;
        memcpy(m->fd, fds, n * sizeof(int));
    }
    c->out_len += FRAME_HEADER_BYTES + blen;
}

/* A MAP frame of the n entries collected in seg (fds[k] for the k-th mapped one). */
static void queue_map(struct server *s, struct client *c, Cake__Segment *seg, int n, int *fds,
                      int nfd)
{
    Cake__Segment *p[SERVER_MAP_FDS];
    for (int i = 0; i < n; i++)
        p[i] = &seg[i];
    Cake__SegmentMap m = CAKE__SEGMENT_MAP__INIT;
    m.n_segments = (size_t)n, m.segments = p;
    srv_queue_frame(s, c, MSG_MAP | FRAME_REPLY, c->h.request_id, &m.base, fds, nfd);
}

/* The pool of index k (0: host, 1 + i: GPU i). */
static struct pool *pool_k(struct server *s, uint32_t k)
{
    return k == 0 ? &s->pool : &s->gpus[k - 1].pages;
}

/* An fd of segment i of pool k to send (owned by the caller), or -errno. */
static int seg_fd(struct server *s, uint32_t k, uint32_t i)
{
    struct pool *p = pool_k(s, k);
    if (k == 0) {
        int fd = fcntl(p->seg[i].fd, F_DUPFD_CLOEXEC, 0);
        return fd < 0 ? -errno : fd;
    }
    return srv_gpu_seg_export(s, k - 1, i);
}

/* Tells an engine which segments its tenant gained (with their fds) or lost since its last
 * reply: MAP frames ahead of the reply. The pools' claim counters let a reply skip the scan
 * when no segment changed hands anywhere. */
static void srv_queue_maps(struct server *s, struct client *c)
{
    if (!c->engine || !c->tenant || c->h.type == MSG_HELLO)
        return;
    uint32_t np = 1 + s->n_gpus;
    for (uint32_t k = 0; k < np; k++) {
        struct pool *p = pool_k(s, k);
        if (!c->seg_sent[k] || c->seg_epoch[k] == p->epoch)
            continue;
        c->seg_epoch[k] = p->epoch;
        Cake__Segment seg[SERVER_MAP_FDS];
        int fds[SERVER_MAP_FDS], n = 0, nfd = 0;
        for (uint32_t i = 0; i < p->n_segs; i++) {
            const struct pool_seg *g = &p->seg[i];
            int mine = g->owner == c->tenant->id && g->gen;
            if (mine ? c->seg_sent[k][i] == g->gen : !c->seg_sent[k][i])
                continue;
            int fd = -1;
            if (mine && (fd = seg_fd(s, k, i)) < 0) {
                srv_log("segment %u of pool %u: cannot pass it to client %llu: %s", i, k,
                        (unsigned long long)c->id, strerror(-fd));
                continue; /* libcake reports addresses there as outside the pool */
            }
            cake__segment__init(&seg[n]);
            seg[n].pool = k, seg[n].index = i, seg[n].gen = mine ? g->gen : 0;
            seg[n].offset = (uint64_t)i * p->seg_bytes;
            seg[n].bytes = (uint64_t)pool_seg_pages(p, i) * p->page_bytes;
            seg[n].revoke = !mine;
            n++;
            if (mine)
                fds[nfd++] = fd;
            c->seg_sent[k][i] = mine ? g->gen : 0;
            if (n == SERVER_MAP_FDS) {
                queue_map(s, c, seg, n, fds, nfd);
                n = nfd = 0;
            }
        }
        if (n)
            queue_map(s, c, seg, n, fds, nfd);
    }
}

static void finish_request(struct server *s, struct client *c)
{
    metrics_observe_latency(&s->m, srv_now_s() - c->t0);
    c->state = C_IDLE;
    c->body = NULL;
    if (client_flush(s, c) == 1 && !c->reading)
        srv_client_read(s, c); /* frames may be waiting: the poll only reports new arrivals */
}

void srv_reply(struct server *s, struct client *c, uint16_t type, const ProtobufCMessage *msg)
{
    srv_queue_maps(s, c);
    srv_queue_frame(s, c, type | FRAME_REPLY, c->h.request_id, msg, NULL, 0);
    finish_request(s, c);
}

void srv_reply_error(struct server *s, struct client *c, int code, const char *fmt, ...)
{
    char text[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    s->m.errors[metrics_err_kind(code)]++;
    Cake__Error e = CAKE__ERROR__INIT;
    e.code = code, e.message = text;
    srv_queue_maps(s, c);
    srv_queue_frame(s, c, MSG_ERROR, c->h.request_id, &e.base, NULL, 0);
    finish_request(s, c);
}

/* ---- connections ----------------------------------------------------------- */

/* The reader refused the stream (rc): say why, then close. */
static void bad_frame(struct server *s, struct client *c, int rc)
{
    c->h = c->rd.bad;
    c->t0 = srv_now_s();
    c->close_after_flush = 1;
    if (rc == CAKE_ETOOBIG && !c->tenant)
        /* nothing large is held for a client that has not said who it is */
        srv_reply_error(s, c, CAKE_ETOOBIG, "a frame of %u bytes before HELLO (at most %u)",
                        c->h.body_len, SERVER_PREHELLO_MAX_BODY);
    else if (rc == CAKE_ETOOBIG)
        srv_reply_error(s, c, rc, "frame body of %u bytes exceeds the cap", c->h.body_len);
    else
        srv_reply_error(s, c, rc, "malformed frame header (%u)", c->h.body_len);
}

/* Reads and dispatches frames until the socket is drained, a request goes to a worker,
 * or a reply waits for the socket. A short read means the socket was empty, and anything
 * arriving later raises a new poll event. */
void srv_client_read(struct server *s, struct client *c)
{
    c->reading = 1;
    while (c->state == C_IDLE && !c->out) {
        c->rd.max_body = c->tenant ? FRAME_MAX_BODY : SERVER_PREHELLO_MAX_BODY;
        int rc = frame_reader_next(&c->rd, &c->h, &c->body);
        if (rc == 1) {
            srv_dispatch(s, c);
            continue;
        }
        if (rc < 0) {
            bad_frame(s, c, rc);
            break;
        }
        if (c->drained)
            break;
        size_t room;
        uint8_t *p = frame_reader_space(&c->rd, &room);
        if (!p) {
            c->t0 = srv_now_s();
            c->close_after_flush = 1;
            srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
            break;
        }
        ssize_t n = recv(c->fd, p, room, MSG_DONTWAIT);
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
        frame_reader_wrote(&c->rd, (size_t)n);
        /* a short read drained the socket, unless the peer has hung up: then read on to the
         * end of file (io_uring reports the hang-up once; if it came with the last bytes,
         * no later wakeup would tell us) */
        c->drained = (size_t)n < room && !c->rdhup;
    }
    c->reading = 0;
}

static void client_close(struct server *s, struct client *c)
{
    if (c->state == C_CLOSED)
        return;
    loop_del(s->loop, c->handle);
    /* the peer sees EOF now, whatever else may still hold the socket for a moment (a poll
     * being cancelled in the io_uring) */
    shutdown(c->fd, SHUT_RDWR);
    close(c->fd);
    if (c->tenant && c->engine)
        c->tenant->clients--;
    if (c->tenant)
        c->tenant->conns--;
    uint32_t freed = 0;
    for (uint32_t i = 0; i < s->n_slots; i++) {
        struct seq *q = s->slots[i].s;
        if (!q || q->owner != c->id)
            continue;
        freed++;
        if (q->busy)
            q->orphaned = 1, __atomic_store_n(&q->cancel, 1, __ATOMIC_RELAXED); /* freed after */
        else
            srv_seq_remove(s, q);
    }
    if (freed)
        s->m.clients_killed++;
    srv_release_quarantine(s, c->id);
    srv_tenant_gc(s, c->tenant); /* a one-shot name leaves nothing behind */
    c->state = C_CLOSED;
    for (uint32_t i = 0; i < s->n_clients; i++)
        if (s->clients[i] == c) {
            s->clients[i] = s->clients[--s->n_clients];
            break;
        }
    /* callers up the stack may still look at c: free it after this loop iteration */
    c->next_dead = s->dead, s->dead = c;
}

static void client_free(struct client *c)
{
    out_reset(c);
    for (uint32_t k = 0; k < SERVER_POOLS; k++)
        free(c->seg_sent[k]);
    frame_reader_free(&c->rd);
    free(c);
}

static void free_dead(struct server *s)
{
    while (s->dead) {
        struct client *c = s->dead;
        s->dead = c->next_dead;
        client_free(c);
    }
}

static void on_client(void *arg, uint32_t ev)
{
    struct client *c = arg;
    struct server *s = c->srv;
    if (c->state == C_BUSY) {
        /* Its request is at a worker or waiting at a shard barrier, which may never fill.
         * A peer gone entirely can take no reply: drop it now (sequences in work are freed
         * when their work is done, a barrier's group ends). Anything else waits for the
         * reply, unwatched meanwhile: a level-triggered poll would report it in a loop. */
        if (ev & LOOP_HUP)
            client_close(s, c);
        else if (ev & (LOOP_IN | LOOP_ERR))
            loop_set(s->loop, c->handle, 0);
        return;
    }
    if (ev & (LOOP_IN | LOOP_ERR))
        c->drained = 0;
    if (ev & LOOP_ERR)
        c->rdhup = 1;
    if ((ev & LOOP_OUT) && c->out) {
        if (client_flush(s, c) != 1)
            return;
    }
    if (ev & (LOOP_IN | LOOP_ERR | LOOP_OUT))
        srv_client_read(s, c);
    /* a peer gone entirely whose last frame started work: io_uring reported the hang-up with
     * that frame, once, so this is the moment to act on it (its work is skipped) */
    if ((ev & LOOP_HUP) && c->state == C_BUSY)
        client_close(s, c);
}

/* A connection refused at once: an unsolicited error frame (request id 0) tells the peer
 * why, then the close; logged at most once a second. */
static void refuse(struct server *s, int fd, const char *why)
{
    Cake__Error e = CAKE__ERROR__INIT;
    e.code = s->stopping ? CAKE_ESHUTDOWN : CAKE_EOOM;
    char text[160];
    snprintf(text, sizeof text, "caked refused the connection: %s", why);
    e.message = text;
    uint8_t buf[FRAME_HEADER_BYTES + 256];
    size_t n = cake__error__get_packed_size(&e);
    if (n <= sizeof buf - FRAME_HEADER_BYTES) {
        struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, MSG_ERROR, 0, (uint32_t)n, 0};
        frame_write_header(buf, &h);
        cake__error__pack(&e, buf + FRAME_HEADER_BYTES);
        if (send(fd, buf, FRAME_HEADER_BYTES + n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
            /* the peer may be gone already; the close says enough */
        }
    }
    close(fd);
    s->m.clients_refused++;
    double now = srv_now_s();
    if (now - s->t_refuse_log >= 1.0) {
        s->t_refuse_log = now;
        srv_log("refusing connections: %s (%llu so far)", why,
                (unsigned long long)s->m.clients_refused);
    }
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
            if ((errno == EMFILE || errno == ENFILE) && s->spare_fd >= 0) {
                /* out of fds: the connection would wait in the backlog forever (and a
                 * level-triggered poll would report it in a loop); free the spare to take
                 * it and close it, then hold the spare again */
                close(s->spare_fd);
                fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
                int e = errno;
                s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                errno = e;
                if (fd >= 0) {
                    refuse(s, fd, "out of file descriptors (raise LimitNOFILE / ulimit -n)");
                    continue;
                }
            }
            if (errno != EAGAIN && srv_now_s() - s->t_refuse_log >= 1.0) { /* once a second */
                s->t_refuse_log = srv_now_s();
                srv_log("accept: %s", strerror(errno));
            }
            return;
        }
        struct ucred cred;
        socklen_t cl = sizeof cred;
        struct client *c = NULL;
        if (s->n_clients >= s->max_clients || s->stopping) {
            refuse(s, fd, s->stopping ? "shutting down" : "at the client limit");
            continue;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) {
            close(fd);
            s->m.errors[ERR_INTERNAL]++;
            continue;
        }
        /* other uids (caked's own and root administer it) may not take every slot */
        uint32_t mine = 0;
        for (uint32_t i = 0; cred.uid != 0 && cred.uid != s->owner_uid && i < s->n_clients; i++)
            mine += s->clients[i]->cred.uid == cred.uid;
        if (cred.uid != 0 && cred.uid != s->owner_uid && mine >= s->max_per_uid) {
            char why[96];
            snprintf(why, sizeof why, "uid %u holds %u connections, its limit "
                     "(--max-clients-per-uid)", (unsigned)cred.uid, mine);
            refuse(s, fd, why);
            continue;
        }
        if (!(c = calloc(1, sizeof(*c)))) {
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
        c->srv = s, c->id = ++s->next_client_id, c->fd = fd, c->cred = cred;
        c->state = C_IDLE;
        frame_reader_init(&c->rd, SERVER_PREHELLO_MAX_BODY);
        c->t_accept = srv_now_s();
        s->clients[s->n_clients++] = c;
        s->m.clients_total++;
        srv_client_read(s, c); /* data may have arrived before the watch */
    }
}

static void on_work(void *arg, uint32_t ev)
{
    struct server *s = arg;
    (void)ev;
    workers_reap(s->workers);
}

/* Applies the configured tenants (weights, minimums, maximums, uids); 0, or -EINVAL with
 * the reason logged and nothing changed. Tenants configured before and absent now become
 * ordinary ones (weight 1, no minimum or maximum) and are forgotten once idle. */
static int apply_tenants(struct server *s, const struct tenant_cfg *tc, int n)
{
    uint64_t min_sum = 0;
    for (int i = 0; i < n; i++)
        min_sum += tc[i].min_bytes;
    if (min_sum > s->pool.bytes) {
        srv_log("the tenants' minimums sum to %llu bytes, over the host pool's %llu: no one "
                "else could open anything (lower min= or raise --host-pool)",
                (unsigned long long)min_sum, (unsigned long long)s->pool.bytes);
        return -EINVAL;
    }
    const uint32_t own = (uint32_t)s->owner_uid; /* a tenant naming no uid: caked's own */
#define UIDS(t) ((t)->n_uids ? (t)->uids : &own), ((t)->n_uids ? (t)->n_uids : 1)
    for (int i = 0; i < n; i++) { /* all or nothing: check every one first */
        int rc = tenant_configure_check(&s->tenants, tc[i].name, UIDS(&tc[i]));
        if (rc) {
            srv_log("tenant %s: %s", tc[i].name, rc == -EEXIST
                    ? "one of its uids is attached under that name as a tenant of its own"
                    : strerror(-rc));
            return rc;
        }
    }
    for (uint32_t k = 0; k < s->tenants.n; k++) {
        struct tenant *t = &s->tenants.t[k];
        int still = 0;
        for (int i = 0; i < n && !still; i++)
            still = !strcmp(tc[i].name, t->name);
        if (t->in_use && t->configured && !still) {
            t->configured = 0, t->weight = 1, t->min_bytes = t->max_bytes = 0;
            srv_tenant_gc(s, t);
        }
    }
    for (int i = 0; i < n; i++) { /* checked above: only memory can fail now */
        int rc = tenant_configure(&s->tenants, tc[i].name, UIDS(&tc[i]), tc[i].weight,
                                  tc[i].min_bytes, tc[i].max_bytes);
        if (rc) {
            srv_log("tenant %s: %s", tc[i].name, strerror(-rc));
            return rc;
        }
    }
#undef UIDS
    return 0;
}

/* SIGHUP: the tenants and quotas of --config again (the rest needs a restart). */
static void reload(struct server *s)
{
    if (!s->cfg.config_path[0]) {
        srv_log("SIGHUP: no --config to read again; nothing changed");
        return;
    }
    static struct config c; /* large: not on the loop's stack */
    char err[512];
    config_defaults(&c);
    if (config_load(&c, s->cfg.config_path, err, sizeof err)) {
        srv_log("SIGHUP: %s; nothing changed", err);
        return;
    }
    if (apply_tenants(s, c.tenants, c.n_tenants) == 0)
        srv_log("SIGHUP: %d tenants from %s (quotas set with cachectl on them are replaced; "
                "other options apply at restart)", c.n_tenants, s->cfg.config_path);
}

static void on_signal(void *arg, uint32_t ev)
{
    struct server *s = arg;
    struct signalfd_siginfo si;
    (void)ev;
    while (read(s->sig_fd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGHUP) {
            reload(s);
            continue;
        }
        if (!s->stopping)
            srv_log("%s: shutting down", strsignal((int)si.ssi_signo));
        s->stopping = 1;
    }
}

/* Raises the soft fd limit to the hard one (as Redis does) and fits the client limit under
 * it, keeping room for the pool, GPU pools, the loop and a reserve; holds a spare fd for
 * refusing connections when out of fds anyway. */
static void fd_limits(struct server *s)
{
    struct rlimit rl;
    s->max_clients = SERVER_MAX_CLIENTS;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur < rl.rlim_max) {
            rlim_t want = rl.rlim_max == RLIM_INFINITY ? SERVER_MAX_CLIENTS + 256 : rl.rlim_max;
            struct rlimit up = {want, rl.rlim_max};
            if (want > rl.rlim_cur && setrlimit(RLIMIT_NOFILE, &up) == 0)
                rl.rlim_cur = want;
        }
        /* besides clients: 64 for caked itself, and one memfd per host pool segment */
        rlim_t reserve = 64 + (rlim_t)s->pool.n_segs;
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < SERVER_MAX_CLIENTS + reserve) {
            s->max_clients = rl.rlim_cur > reserve + 32 ? (uint32_t)(rl.rlim_cur - reserve) : 32;
            srv_log("file descriptor limit %llu: at most %u clients (%llu kept for caked and its "
                    "%u pool segments; raise LimitNOFILE / ulimit -n for more)",
                    (unsigned long long)rl.rlim_cur, s->max_clients, (unsigned long long)reserve,
                    s->pool.n_segs);
        }
    }
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s->max_per_uid = s->cfg.max_per_uid ? s->cfg.max_per_uid : s->max_clients / 2;
    if (s->max_per_uid > s->max_clients)
        s->max_per_uid = s->max_clients;
    if (!s->cfg.hello_timeout_s)
        s->cfg.hello_timeout_s = 5.0;
}

static int listen_on(struct server *s)
{
    char why[512];
    int fd = sockpath_listen(&s->sp, s->cfg.socket_path, s->cfg.socket_group, why, sizeof why);
    if (fd < 0) {
        srv_log("%s", why);
        return fd;
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

/* pool_ops of the host pool: a replaced segment's old memfd is punched out and closed by a
 * worker (freeing 8 MiB of resident pages takes ~1 ms: the loop must not wait for it) */
struct retire_job {
    struct job job;
    int fd;
    uint64_t bytes;
};

static void retire_run(struct job *j)
{
    struct retire_job *r = (struct retire_job *)j;
    pool_retire_fd(r->fd, r->bytes);
}

static void retire_done(struct job *j)
{
    free(j);
}

static void srv_retire_seg(void *ud, int fd, uint64_t bytes)
{
    struct server *s = ud;
    struct retire_job *r = calloc(1, sizeof(*r));
    if (!r || !s->workers) {
        free(r);
        pool_retire_fd(fd, bytes);
        return;
    }
    r->job.run = retire_run, r->job.done = retire_done, r->fd = fd, r->bytes = bytes;
    workers_submit(s->workers, &r->job);
}

/* pool_ops of a GPU pool: a segment's fresh allocation (a legacy pool has its memory) */
static int srv_gpu_seg_fresh(void *ud, struct pool *p, uint32_t i, const char **why)
{
    struct srv_gpu *g = ud;
    (void)p;
    return g->gpu.legacy ? 0 : gpupool_seg_fresh(&g->gpu, i, why);
}

int srv_gpu_seg_export(struct server *s, uint32_t gpu, uint32_t i)
{
    const char *why = NULL;
    int fd = -1;
    int rc = gpupool_seg_export(&s->gpus[gpu].gpu, i, &fd, &why);
    return rc ? rc : fd;
}

/* pool_ops of the host pool: each segment registered with CUDA while mapped */
static void srv_host_seg_mapped(void *ud, struct pool *p, uint32_t i, int mapped)
{
    (void)ud;
    void *at = p->base + (uint64_t)i * p->seg_bytes;
    const char *why = NULL;
    if (mapped)
        gpupool_register_host(at, (size_t)pool_seg_pages(p, i) * p->page_bytes, &why);
    else
        gpupool_unregister_host(at);
}

int server_create(const struct server_cfg *cfg, const struct tenant_cfg *tcfg, int n_tenants,
                  struct server **out)
{
    struct server *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    s->listen_fd = s->sig_fd = s->spare_fd = -1;
    s->owner_uid = geteuid();
    s->t_start = srv_now_s();
    s->admin_gid = (gid_t)-1;
    if (cfg->admin_group[0]) {
        struct group *g = getgrnam(cfg->admin_group);
        if (!g) {
            srv_log("admin group %s: no such group", cfg->admin_group);
            free(s);
            return -EINVAL;
        }
        s->admin_gid = g->gr_gid;
    }
    /* block the shutdown signals before any thread exists, so every thread inherits the
     * mask and they arrive only through the signalfd */
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, SIGTERM);
    sigaddset(&ss, SIGINT);
    sigaddset(&ss, SIGHUP); /* reload, never the default (death with a stale socket) */
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    signal(SIGPIPE, SIG_IGN);
    const char *why = NULL;
    int rc = pool_init(&s->pool, cfg->host_pool_bytes, cfg->page_bytes, cfg->segment_bytes,
                       cfg->hugepages, &why);
    if (rc) {
        srv_log("host pool: %s (%s)", why, strerror(-rc));
        goto fail;
    }
    for (uint32_t i = 0; i < cfg->n_gpus; i++) {
        struct srv_gpu *g = &s->gpus[i];
        const struct server_gpu_cfg *gc = &cfg->gpu[i];
        /* VMM: one allocation per segment, each tenant's passed to its engines alone;
         * legacy IPC (asked for explicitly): one allocation every engine maps */
        uint64_t gran = 0, seg = 0;
        if (cfg->gpu_ipc_legacy) {
            rc = gpupool_create_legacy(&g->gpu, gc->bytes, gc->uuid, &why);
        } else if (!(rc = gpupool_granularity(gc->uuid, &gran, &why))) {
            uint64_t bytes = (gc->bytes + gran - 1) / gran * gran;
            seg = cfg->segment_bytes ? cfg->segment_bytes : pool_default_seg_bytes(bytes, cfg->page_bytes);
            rc = gpupool_create(&g->gpu, bytes, seg, gc->uuid, &why);
        }
        if (rc) {
            srv_log("GPU pool %u: %s%s", i, why, rc == -ENOTSUP && !cfg->gpu_ipc_legacy
                    ? " (--gpu-ipc legacy shares one CUDA IPC handle instead, without isolating "
                      "tenants)" : "");
            goto fail;
        }
        s->n_gpus = i + 1;
        g->bytes = g->gpu.bytes;
        snprintf(g->uuid, sizeof g->uuid, "%s", g->gpu.uuid);
        for (uint32_t j = 0; j < i; j++)
            if (!strcmp(s->gpus[j].uuid, g->uuid)) {
                srv_log("GPU pool %u: %s already has a pool", i, g->uuid);
                rc = -EINVAL;
                goto fail;
            }
        /* the same pages and layout as the host pool: GPU sequences hold their K/V here */
        int nw = cfg->workers > 0 ? cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN);
        struct pool_ops ops = {.fresh = srv_gpu_seg_fresh, .ud = g};
        if ((rc = pool_init_external(&g->pages, (void *)(uintptr_t)g->gpu.va, g->gpu.bytes,
                                     cfg->page_bytes, g->gpu.legacy ? g->gpu.bytes : seg, &ops,
                                     &why)) ||
            (rc = gpuexec_create(&g->x, g->gpu.device, nw, &why))) {
            srv_log("GPU pool %u: %s", i, why);
            goto fail;
        }
    }
    struct pool_ops hops = {.retire = srv_retire_seg, .ud = s};
    /* where a GPU exists, each host segment is registered for fast copies as it is mapped
     * (engines do the same) */
    if (s->n_gpus) {
        hops.mapped = srv_host_seg_mapped;
        s->host_registered = 1;
    }
    pool_set_ops(&s->pool, &hops);
    if ((rc = apply_tenants(s, tcfg, n_tenants)))
        goto fail;
    s->env = (struct seq_env){
        .pool = &s->pool, .tenants = &s->tenants, .n_gpus = s->n_gpus,
        .trace = getenv("CAKED_TRACE") && !strcmp(getenv("CAKED_TRACE"), "1"),
        .threads = cfg->kernel_threads > 0 ? cfg->kernel_threads : 1,
    };
    for (uint32_t i = 0; i < s->n_gpus; i++)
        s->env.gpu_pools[i] = &s->gpus[i].pages, s->env.gpus[i] = s->gpus[i].x;
    if ((rc = loop_create(cfg->io, &s->loop, &s->io_name, &why))) {
        srv_log("event loop: %s (%s)", why ? why : "failed", strerror(-rc));
        goto fail;
    }
    if (why)
        srv_log("%s; using epoll", why);
    if ((rc = workers_start(&s->workers, cfg->workers)))
        goto fail;
    fd_limits(s);
    if ((rc = listen_on(s)))
        goto fail;
    s->sig_fd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s->sig_fd < 0 || loop_add(s->loop, s->sig_fd, LOOP_IN, on_signal, s, &s->sig_h) ||
        loop_add(s->loop, s->listen_fd, LOOP_IN, on_accept, s, &s->listen_h) ||
        loop_add(s->loop, workers_fd(s->workers), LOOP_IN, on_work, s, &s->work_h)) {
        rc = -EIO;
        goto fail;
    }
    char pb[32], pg[32], gb[32];
    human_bytes(s->pool.bytes, pb, sizeof pb);
    human_bytes(s->pool.page_bytes, pg, sizeof pg);
    for (uint32_t i = 0; i < s->n_gpus; i++) {
        human_bytes(s->gpus[i].bytes, gb, sizeof gb);
        srv_log("GPU pool %u: %s on %s (shared by %s); host segments %s with CUDA", i, gb,
                s->gpus[i].uuid, s->gpus[i].gpu.legacy ? "one legacy IPC handle, every tenant"
                                                       : "file descriptors per segment and tenant",
                s->host_registered ? "registered" : "not registered");
    }
    char sb[32];
    human_bytes(s->pool.seg_bytes, sb, sizeof sb);
    srv_log("caked %s listening on %s (mode %s); host pool %s in %u pages of %s, segments of %s%s; "
           "%s event loop; %d workers", CAKE_VERSION, cfg->socket_path,
           cfg->socket_group[0] ? "0660" : "0600", pb, s->pool.pages, pg, sb,
           s->pool.hugepages ? " (huge pages)" : "", s->io_name,
           cfg->workers > 0 ? cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN));
    *out = s;
    return 0;
fail:
    server_destroy(s);
    return rc;
}

/* Closes connections that have not sent HELLO in time (each says why first): idle sockets
 * must not hold the client slots engines need. At most once a quarter second. */
static void sweep_hello(struct server *s)
{
    double now = srv_now_s();
    if (now - s->t_sweep < 0.25)
        return;
    s->t_sweep = now;
    for (uint32_t i = 0; i < s->n_clients;) {
        struct client *c = s->clients[i];
        if (c->tenant || c->state == C_BUSY || now - c->t_accept < s->cfg.hello_timeout_s) {
            i++;
            continue;
        }
        Cake__Error e = CAKE__ERROR__INIT;
        e.code = CAKE_ESTATE, e.message = (char *)"no HELLO in time: connection closed";
        out_reset(c); /* whatever it left unread goes */
        srv_queue_frame(s, c, MSG_ERROR, 0, &e.base, NULL, 0);
        if (c->out)
            send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        s->m.clients_refused++;
        client_close(s, c); /* swaps the last client into slot i */
    }
}

int server_run(struct server *s)
{
    while (!s->stopping) {
        int rc = loop_wait(s->loop, 250);
        sweep_hello(s);
        free_dead(s);
        if (rc < 0) {
            srv_log("event loop: %s", strerror(-rc));
            return rc;
        }
    }
    /* tell every client, stop accepting, let running work finish */
    loop_del(s->loop, s->listen_h);
    close(s->listen_fd);
    s->listen_fd = -1;
    sockpath_unlink(&s->sp);
    while (s->n_clients) {
        struct client *c = s->clients[0];
        Cake__Error e = CAKE__ERROR__INIT;
        e.code = CAKE_ESHUTDOWN, e.message = (char *)"caked is shutting down";
        out_reset(c);
        srv_queue_frame(s, c, MSG_ERROR, 0, &e.base, NULL, 0);
        if (c->out)
            send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        client_close(s, c);
    }
    free_dead(s);
    while (workers_pending(s->workers))
        loop_wait(s->loop, 100);
    srv_log("stopped");
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
        client_free(s->clients[i]);
    }
    free(s->clients);
    free_dead(s);
    for (uint32_t i = 0; i < s->n_slots; i++)
        if (s->slots[i].s)
            seq_free(&s->env, s->slots[i].s);
    free(s->slots);
    while (s->groups) {
        struct shard_group *g = s->groups;
        s->groups = g->next;
        free(g);
    }
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
        sockpath_unlink(&s->sp);
    }
    while (s->quarantine) {
        struct seq *q = s->quarantine;
        s->quarantine = q->next_q;
        seq_free(&s->env, q);
    }
    if (s->sig_fd >= 0)
        close(s->sig_fd);
    if (s->spare_fd >= 0)
        close(s->spare_fd);
    loop_destroy(s->loop);
    for (uint32_t i = 0; i < SERVER_MAX_GPUS; i++) {
        struct srv_gpu *g = &s->gpus[i];
        gpuexec_destroy(g->x);
        pool_fini(&g->pages);
        if (i < s->n_gpus)
            gpupool_destroy(&g->gpu);
    }
    pool_fini(&s->pool); /* unregisters its segments (srv_host_seg_mapped) */
    tenants_fini(&s->tenants);
    free(s);
}
