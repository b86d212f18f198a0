/* conn.c - connections: each one's state machine (reading requests through its frame
 * reader, dispatching, waiting for its work, replying), its output queue with the MAP frames
 * and fds ahead of a reply, accepting and refusing connections, closing them (see
 * server_int.h). Loop thread only. */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cake/cake.h"
#include "frame.h"
#include "pressure.h"
#include "server_int.h"

struct client *srv_client_by_id(struct server *s, uint64_t id)
{
    for (uint32_t i = 0; i < s->n_clients; i++)
        if (s->clients[i]->id == id)
            return s->clients[i];
    return NULL;
}

/* ---- replies --------------------------------------------------------------- */


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
            srv_client_close(s, c);
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
        srv_client_close(s, c);
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
    metrics_observe_latency(&s->m, c->h.type, clock_now_s() - c->t0);
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
    c->t0 = clock_now_s();
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
            c->t0 = clock_now_s();
            c->close_after_flush = 1;
            srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
            break;
        }
        ssize_t n = recv(c->fd, p, room, MSG_DONTWAIT);
        if (n == 0) {
            srv_client_close(s, c);
            break;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                c->drained = 1;
            else
                srv_client_close(s, c);
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

void srv_client_close(struct server *s, struct client *c)
{
    if (c->state == C_CLOSED)
        return;
    loop_del(s->loop, c->handle);
    /* the peer sees EOF now, whatever else may still hold the socket for a moment (a poll
     * being cancelled in the io_uring) */
    shutdown(c->fd, SHUT_RDWR);
    close(c->fd);
    if (c->tenant)
        tenant_attach(c->tenant, c->engine, -1);
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
    if (c->tenant) /* (before the tenant may be forgotten below); cachectl's at debug level */
        srv_logl(c->engine ? SRV_LOG_INFO : SRV_LOG_DEBUG,
                 "client %llu of tenant %s left%s: %u sequence%s freed", (unsigned long long)c->id,
                 c->tenant->name, s->stopping ? " (shutdown)" : "", freed, freed == 1 ? "" : "s");
    srv_release_quarantine(s, c->id);
    pressure_forget(s, c->id);
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

void srv_client_free(struct client *c)
{
    out_reset(c);
    for (uint32_t k = 0; k < SERVER_POOLS; k++)
        free(c->seg_sent[k]);
    frame_reader_free(&c->rd);
    free(c);
}

void srv_free_dead(struct server *s)
{
    while (s->dead) {
        struct client *c = s->dead;
        s->dead = c->next_dead;
        srv_client_free(c);
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
            srv_client_close(s, c);
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
        srv_client_close(s, c);
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
    double now = clock_now_s();
    if (now - s->t_refuse_log >= 1.0) {
        s->t_refuse_log = now;
        srv_log("refusing connections: %s (%llu so far)", why,
                (unsigned long long)s->m.clients_refused);
    }
}

void srv_on_accept(void *arg, uint32_t ev)
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
            if (errno != EAGAIN && clock_now_s() - s->t_refuse_log >= 1.0) { /* once a second */
                s->t_refuse_log = clock_now_s();
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
        c->t_accept = clock_now_s();
        s->clients[s->n_clients++] = c;
        s->m.clients_total++;
        srv_client_read(s, c); /* data may have arrived before the watch */
    }
}

/* Closes connections that have not sent HELLO in time (each says why first): idle sockets
 * must not hold the client slots engines need. At most once a quarter second. */
void srv_sweep_hello(struct server *s)
{
    double now = clock_now_s();
    if (now - s->t_sweep < 0.25)
        return;
    s->t_sweep = now;
    for (uint32_t i = 0; i < s->n_clients;) {
        struct client *c = s->clients[i];
        if (c->tenant || c->state == C_BUSY || now - c->t_accept < s->cfg.hello_timeout_s) {
            i++;
            continue;
        }
        s->m.clients_refused++;
        srv_client_goodbye(s, c, CAKE_ESTATE, "no HELLO in time: connection closed");
        /* (the last client is now in slot i) */
    }
}

void srv_client_goodbye(struct server *s, struct client *c, int code, const char *why)
{
    Cake__Error e = CAKE__ERROR__INIT;
    e.code = code, e.message = (char *)why;
    out_reset(c); /* whatever was queued for it goes */
    srv_queue_frame(s, c, MSG_ERROR, 0, &e.base, NULL, 0);
    if (c->out) /* best effort: it may not read it */
        send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
    srv_client_close(s, c);
}

void srv_oom(struct server *s, struct client *c, const char *why)
{
    struct tenant *t = c->tenant;
    tenant_oom(t);
    double now = clock_now_s();
    if (now - t->t_oom_log < 1.0)
        return; /* counted; the next line says how many went unlogged */
    uint64_t unlogged = t->oom_errors - t->oom_logged - 1;
    srv_logl(SRV_LOG_WARNING, "tenant %s: out of memory (CAKE_EOOM) for client %llu: %s",
             t->name, (unsigned long long)c->id, why);
    if (unlogged)
        srv_logl(SRV_LOG_WARNING, "tenant %s: %llu more refusals in the second before, not logged",
                 t->name, (unsigned long long)unlogged);
    t->t_oom_log = now, t->oom_logged = t->oom_errors;
}
