/* cake.c - libcake (see include/cake/cake.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cake.pb-c.h"
#include "cake/cake.h"
#include "frame.h"
#include "internal.h"
#include "priv.h"
#include "window.h"

static void *c_alloc(cake_ctx *c, size_t n) { return c->alloc(n, c->ud); }
static void c_free(cake_ctx *c, void *p) { c->release(p, c->ud); }
static void *default_alloc(size_t n, void *ud) { (void)ud; return malloc(n); }
static void default_release(void *p, void *ud) { (void)ud; free(p); }

int cake_set_err(cake_ctx *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof c->errstr, fmt, ap);
    va_end(ap);
    return code;
}

int cake_create(cake_ctx **out)
{
    cake_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->fd = -1;
    c->server_uid = -1;
    c->alloc = default_alloc, c->release = default_release;
    frame_reader_init(&c->rd, FRAME_MAX_BODY);
    frame_reader_set_alloc(&c->rd, default_alloc, default_release, NULL);
    strcpy(c->service, "default");
    *out = c;
    return 0;
}

int cake_set_service(cake_ctx *c, const char *name)
{
    if (c->fd >= 0)
        return cake_set_err(c, CAKE_EINVAL, "cake_set_service() goes before cake_connect()");
    size_t n = strlen(name);
    if (n == 0 || n >= sizeof c->service)
        return cake_set_err(c, CAKE_EINVAL, "service name must be 1..63 characters");
    memcpy(c->service, name, n + 1);
    return 0;
}

int cake_set_allocator(cake_ctx *c, void *(*alloc)(size_t, void *), void (*release)(void *, void *),
                       void *ud)
{
    if (!alloc || !release || c->fd >= 0)
        return cake_set_err(c, CAKE_EINVAL, !alloc || !release ? "cake_set_allocator needs both "
                            "hooks" : "cake_set_allocator after cake_connect");
    c->alloc = alloc, c->release = release, c->ud = ud;
    frame_reader_free(&c->rd); /* empty: nothing read while not connected */
    frame_reader_set_alloc(&c->rd, alloc, release, ud);
    return 0;
}

int cake_set_gpus(cake_ctx *c, const char *uuids)
{
    if (c->fd >= 0)
        return cake_set_err(c, CAKE_EINVAL, "cake_set_gpus() goes before cake_connect()");
    if (!uuids)
        uuids = "";
    if (strlen(uuids) >= sizeof c->gpu_filter)
        return cake_set_err(c, CAKE_EINVAL, "GPU list too long");
    snprintf(c->gpu_filter, sizeof c->gpu_filter, "%s", uuids);
    return 0;
}

int cake_set_server_uid(cake_ctx *c, long uid)
{
    if (c->fd >= 0 || uid < -1 || uid > (long)UINT32_MAX - 1)
        return cake_set_err(c, CAKE_EINVAL, "cake_set_server_uid() takes -1 or a uid, before "
                                            "cake_connect()");
    c->server_uid = uid;
    return 0;
}

int cake_set_admin(cake_ctx *c, int admin)
{
    if (c->fd >= 0)
        return cake_set_err(c, CAKE_EINVAL, "cake_set_admin() goes before cake_connect()");
    c->want_admin = admin != 0;
    return 0;
}

int cake_set_shrink_idle(cake_ctx *c, int allow)
{
    if (c->fd >= 0)
        return cake_set_err(c, CAKE_EINVAL, "cake_set_shrink_idle() goes before cake_connect()");
    c->shrink_idle = allow != 0;
    return 0;
}

int cake_set_timeout_ms(cake_ctx *c, int ms)
{
    if (ms < 0)
        return cake_set_err(c, CAKE_EINVAL, "a negative timeout");
    c->timeout_ms = ms;
    return 0;
}

int cake_fd(const cake_ctx *c) { return c->fd; }

uint32_t cake_gpu_count(const cake_ctx *c) { return c->n_gpus; }

const char *cake_gpu_uuid_at(const cake_ctx *c, uint32_t i)
{
    return i < c->n_gpus ? c->gpus[i].uuid : NULL;
}

uint64_t cake_gpu_pool_base_at(const cake_ctx *c, uint32_t i)
{
    return i < c->n_gpus && c->gpus[i].mapped ? c->gpus[i].gpu.va : 0;
}

size_t cake_gpu_pool_bytes_at(const cake_ctx *c, uint32_t i)
{
    return i < c->n_gpus && c->gpus[i].mapped ? c->gpus[i].gpu.bytes : 0;
}

const char *cake_errstr(const cake_ctx *c) { return c->errstr; }
void *cake_pool_base(const cake_ctx *c) { return c->pool; }
size_t cake_pool_bytes(const cake_ctx *c) { return c->pool_bytes; }

static int wait_fd(cake_ctx *c, short ev)
{
    if (!c->timeout_ms)
        return 0;
    struct pollfd p = {c->fd, ev, 0};
    int n;
    do
        n = poll(&p, 1, c->timeout_ms);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        return cake_set_err(c, -ETIMEDOUT, "no reply from caked within %d ms", c->timeout_ms);
    return n < 0 ? -errno : 0;
}

/* A frame cut off midway (a timeout, a signal-free error) leaves the stream unreadable in
 * both directions: the connection is dropped, later calls return CAKE_ENOTCONN. */
static void fdg_clear(cake_ctx *c);

static int drop_conn(cake_ctx *c, int rc)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    frame_reader_free(&c->rd);
    fdg_clear(c);
    if (rc == -ETIMEDOUT)
        cake_set_err(c, rc, "no reply from caked within %d ms, midway through a frame: "
                            "connection dropped", c->timeout_ms);
    return rc;
}

static int send_all(cake_ctx *c, const uint8_t *p, size_t n)
{
    size_t n0 = n;
    while (n) {
        int rc = wait_fd(c, POLLOUT);
        if (rc)
            return n == n0 ? rc : drop_conn(c, rc);
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            rc = errno == EPIPE || errno == ECONNRESET
                     ? cake_set_err(c, CAKE_ESHUTDOWN, "connection to caked closed")
                     : -errno;
            return n == n0 ? rc : drop_conn(c, rc);
        }
        p += k, n -= (size_t)k;
    }
    return 0;
}

/* Closes the fds of every group and forgets them. */
static void fdg_clear(cake_ctx *c)
{
    for (int g = 0; g < c->n_fdg; g++)
        for (int i = 0; i < c->fdg[g].n; i++)
            close(c->fdg[g].fd[i]);
    c->n_fdg = 0;
}

/* The fds of the frame starting at stream offset `at` that carries FRAME_FLAG_FDS: the first
 * group whose read reached past `at` (groups that ended before it belonged to frames
 * already passed: closed). Copied to *out (n fds, owned by the caller); 0 when none came. */
static int fdg_take(cake_ctx *c, uint64_t at, int *out)
{
    while (c->n_fdg && c->fdg[0].end <= at) {
        for (int i = 0; i < c->fdg[0].n; i++)
            close(c->fdg[0].fd[i]);
        memmove(c->fdg, c->fdg + 1, sizeof(c->fdg[0]) * (size_t)--c->n_fdg);
    }
    if (!c->n_fdg)
        return 0;
    int n = c->fdg[0].n;
    memcpy(out, c->fdg[0].fd, sizeof(int) * (size_t)n);
    memmove(c->fdg, c->fdg + 1, sizeof(c->fdg[0]) * (size_t)--c->n_fdg);
    return n;
}

/* One read into the frame reader; fds passed alongside become a group (any beyond its room
 * are closed at once, never leaked). A failure midway through a frame drops the
 * connection. */
static int recv_more(cake_ctx *c)
{
    int mid = frame_reader_pending(&c->rd) != 0;
    for (;;) {
        int rc = wait_fd(c, POLLIN);
        if (rc)
            return mid ? drop_conn(c, rc) : rc;
        size_t room;
        uint8_t *p = frame_reader_space(&c->rd, &room);
        if (!p)
            return cake_set_err(c, -ENOMEM, "out of memory for a reply");
        struct iovec iov = {p, room};
        char cbuf[CMSG_SPACE(253 * sizeof(int))];
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                            .msg_controllen = sizeof cbuf};
        ssize_t k = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            rc = errno == ECONNRESET ? cake_set_err(c, CAKE_ESHUTDOWN, "connection to caked reset")
                                     : -errno;
            return mid ? drop_conn(c, rc) : rc;
        }
        if (k == 0)
            return drop_conn(c, cake_set_err(c, CAKE_ESHUTDOWN, "caked closed the connection"));
        frame_reader_wrote(&c->rd, (size_t)k);
        struct cake_fdgroup *g = c->n_fdg < CAKE_FD_GROUPS ? &c->fdg[c->n_fdg] : NULL;
        if (g)
            g->n = 0, g->end = frame_reader_end(&c->rd);
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                size_t nf = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < nf; i++) {
                    int got;
                    memcpy(&got, CMSG_DATA(cm) + i * sizeof(int), sizeof got);
                    if (g && g->n < CAKE_FD_GROUP_MAX)
                        g->fd[g->n++] = got;
                    else
                        close(got);
                }
            }
        if (g && g->n)
            c->n_fdg++;
        return 0;
    }
}

/* The next frame from caked (*at: its stream offset; *body valid until the next read). */
static int next_frame(cake_ctx *c, struct frame_header *h, const uint8_t **body, uint64_t *at)
{
    for (;;) {
        *at = frame_reader_pos(&c->rd);
        int rc = frame_reader_next(&c->rd, h, body);
        if (rc == 1)
            return 0;
        if (rc < 0)
            return drop_conn(c, cake_set_err(c, CAKE_EPROTO, "malformed reply header from caked"));
        if ((rc = recv_more(c)))
            return rc;
    }
}

static void *pc_alloc(void *ud, size_t n) { return c_alloc(ud, n); }
static void pc_free(void *ud, void *p) { c_free(ud, p); }

static void apply_map(cake_ctx *c, const uint8_t *b, size_t len, const int *fds, int nfd);
static void conn_release(cake_ctx *c);

/* One request/reply. On success *body (ctx-allocated, *blen bytes) is the reply body to
 * unpack. MAP frames ahead of the reply are applied on the way. Error replies become their
 * code. */
static int rpc(cake_ctx *c, uint16_t type, const ProtobufCMessage *msg, uint8_t **body,
               size_t *blen)
{
    if (c->fd < 0)
        return cake_set_err(c, CAKE_ENOTCONN, "not connected to caked");
    size_t len = msg ? protobuf_c_message_get_packed_size(msg) : 0;
    if (len > FRAME_MAX_BODY)
        return cake_set_err(c, CAKE_ETOOBIG, "request of %zu bytes exceeds the frame cap", len);
    uint8_t *buf = c_alloc(c, FRAME_HEADER_BYTES + len);
    if (!buf)
        return cake_set_err(c, -ENOMEM, "out of memory for a request");
    uint64_t rid = ++c->next_rid;
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, type, 0, (uint32_t)len, rid};
    frame_write_header(buf, &h);
    if (msg)
        protobuf_c_message_pack(msg, buf + FRAME_HEADER_BYTES);
    int rc = send_all(c, buf, FRAME_HEADER_BYTES + len);
    c_free(c, buf);
    /* caked closed the connection before our request: what it said first (an unsolicited
     * error, e.g. a refused connection's reason) is still there to read */
    int unsent = rc == CAKE_ESHUTDOWN && c->fd >= 0;
    if (rc && !unsent)
        return rc;
    for (;;) {
        const uint8_t *fb;
        uint64_t at;
        if ((rc = next_frame(c, &h, &fb, &at)))
            return unsent ? drop_conn(c, cake_set_err(c, CAKE_ESHUTDOWN,
                                                      "connection to caked closed")) : rc;
        int fds[CAKE_FD_GROUP_MAX], nfd = h.flags & FRAME_FLAG_FDS ? fdg_take(c, at, fds) : 0;
        if (h.type == (MSG_MAP | FRAME_REPLY)) { /* segments gained or lost, then the reply */
            if (h.request_id == rid && !unsent)
                apply_map(c, fb, h.body_len, fds, nfd);
            for (int i = 0; i < nfd; i++)
                close(fds[i]);
            continue;
        }
        for (int i = 0; i < nfd; i++) /* no other frame carries fds */
            close(fds[i]);
        if (h.type == MSG_ERROR) {
            ProtobufCAllocator al = {pc_alloc, pc_free, c};
            Cake__Error *e = cake__error__unpack(&al, h.body_len, fb);
            if (!e)
                return cake_set_err(c, CAKE_EPROTO, "malformed error reply from caked");
            int code = e->code < 0 ? e->code : CAKE_EPROTO;
            cake_set_err(c, code, "%s", e->message ? e->message : "");
            cake__error__free_unpacked(e, &al);
            if (h.request_id == 0) /* unsolicited: caked is dropping this connection */
                return drop_conn(c, code);
            if (h.request_id != rid || unsent)
                continue;
            return code;
        }
        if (unsent) /* a reply to an earlier request; ours never went out */
            continue;
        if (h.request_id < rid && h.request_id != 0)
            continue; /* the late reply to a request that timed out: skip it */
        if (h.request_id != rid || h.type != (type | FRAME_REPLY))
            return cake_set_err(c, CAKE_EPROTO, "reply does not match the request");
        uint8_t *b = c_alloc(c, h.body_len ? h.body_len : 1);
        if (!b)
            return cake_set_err(c, -ENOMEM, "out of memory for a reply");
        memcpy(b, fb, h.body_len);
        *body = b, *blen = h.body_len;
        return 0;
    }
}

#define RPC_UNPACK(kind, var, type, msg)                                                    \
    uint8_t *body_ = NULL;                                                                  \
    size_t blen_ = 0;                                                                       \
    int rc_ = rpc(c, type, msg, &body_, &blen_);                                      \
    if (rc_)                                                                                \
        return rc_;                                                                         \
    ProtobufCAllocator al_ = {pc_alloc, pc_free, c};                                        \
    __typeof__(cake__##kind##__unpack(NULL, 0, NULL)) var =                                 \
        cake__##kind##__unpack(&al_, blen_, body_);                                         \
    c_free(c, body_);                                                                       \
    if (!var)                                                                               \
        return cake_set_err(c, CAKE_EPROTO, "malformed reply from caked");

static int rpc_empty(cake_ctx *c, uint16_t type, const ProtobufCMessage *msg)
{
    uint8_t *b = NULL;
    size_t n = 0;
    int rc = rpc(c, type, msg, &b, &n);
    if (!rc)
        c_free(c, b);
    return rc;
}

/* ---- the pools: reserved ranges, tenant segments mapped into them ---------- */

static int any_gpu_mapped(const cake_ctx *c)
{
    for (uint32_t i = 0; i < c->n_gpus; i++)
        if (c->gpus[i].mapped)
            return 1;
    return 0;
}

static uint64_t host_seg_len(const cake_ctx *c, uint32_t i)
{
    uint64_t off = (uint64_t)i * c->seg_bytes;
    return c->pool_bytes - off < c->seg_bytes ? c->pool_bytes - off : c->seg_bytes;
}

/* Host segment i back to reserved address space (its memory was the tenant's; now none). */
static void host_seg_unmap(cake_ctx *c, uint32_t i)
{
    if (!c->seg_gen[i])
        return;
    uint8_t *at = c->pool + (uint64_t)i * c->seg_bytes;
    if (c->host_registered)
        gpupool_unregister_host(at);
    mmap(at, host_seg_len(c, i), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
         -1, 0);
    c->seg_gen[i] = 0;
}

/* Maps the memfd caked passed as host segment i, after checking what the kernel can prove:
 * a sealed shared-memory file (it can never shrink under us: no SIGBUS) at least as large as
 * the segment. Returns 0 or an error (the segment stays unmapped). */
static int host_seg_map(cake_ctx *c, uint32_t i, int fd, uint32_t gen)
{
    uint64_t len = host_seg_len(c, i);
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < len || seals < 0 ||
        !(seals & F_SEAL_SHRINK))
        return cake_set_err(c, CAKE_EPROTO, "caked passed segment %u as something other than a "
                                            "sealed memfd of its size: not mapped", i);
    host_seg_unmap(c, i);
    uint8_t *at = c->pool + (uint64_t)i * c->seg_bytes;
    if (mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        int e = errno;
        mmap(at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        return cake_set_err(c, -e, "cannot map pool segment %u: %s", i, strerror(e));
    }
    c->seg_gen[i] = gen ? gen : 1;
    const char *why = "";
    if (c->host_registered)
        gpupool_register_host(at, len, &why);
    return 0;
}

/* Does host segment i hold a page of the window of a sequence open here? (caked never takes
 * a segment back while its tenant has pages in it; a server that does is not believed.) */
static int seg_holds_desc(const cake_ctx *c, uint32_t i)
{
    for (size_t k = 0; k < c->n_seqs; k++)
        for (uint32_t j = 0; j < c->seqs[k]->win_n; j++)
            if (c->seqs[k]->win_pages[j] / (c->seg_bytes / c->page_bytes) == i)
                return 1;
    return 0;
}

/* A MAP frame: segments of this client's tenant to map (one fd each, queued in order) or to
 * drop. Entries that do not describe a segment of a pool we reserved are skipped, their fd
 * closed: addresses there then read as outside the pool (NULL), never as memory. */
static void apply_map(cake_ctx *c, const uint8_t *b, size_t len, const int *fds, int nfd)
{
    int next_fd = 0;
    ProtobufCAllocator al = {pc_alloc, pc_free, c};
    Cake__SegmentMap *m = cake__segment_map__unpack(&al, len, b);
    if (!m) {
        cake_set_err(c, CAKE_EPROTO, "malformed MAP frame from caked");
        return;
    }
    for (size_t k = 0; k < m->n_segments; k++) {
        const Cake__Segment *e = m->segments[k];
        int fd = e->revoke || next_fd >= nfd ? -1 : dup(fds[next_fd++]);
        if (!e->revoke && fd < 0) {
            cake_set_err(c, CAKE_EPROTO, "MAP frame without the segment's fd");
            continue;
        }
        if (e->pool == 0) {
            int ok = c->pool && e->index < c->n_segs &&
                     e->offset == (uint64_t)e->index * c->seg_bytes &&
                     e->bytes == host_seg_len(c, e->index);
            if (!ok)
                cake_set_err(c, CAKE_EPROTO, "MAP entry outside the host pool: skipped");
            else if (e->revoke && !seg_holds_desc(c, e->index))
                host_seg_unmap(c, e->index);
            else if (e->revoke)
                cake_set_err(c, CAKE_EPROTO, "caked revoked a segment holding an open "
                                             "sequence's descriptor: kept");
            else
                host_seg_map(c, e->index, fd, e->gen);
        } else {
            uint32_t g = e->pool - 1;
            struct cake_gpu *cg = g < c->n_gpus ? &c->gpus[g] : NULL;
            int ok = cg && cg->mapped && !cg->legacy && e->index < cg->gpu.n_segs &&
                     e->offset == (uint64_t)e->index * cg->gpu.seg_bytes &&
                     e->bytes == gpupool_seg_len(&cg->gpu, e->index);
            const char *why = "";
            if (!ok)
                ; /* a GPU this process does not map (or a bad entry) */
            else if (e->revoke)
                gpupool_seg_drop(&cg->gpu, e->index);
            else if (gpupool_seg_import(&cg->gpu, e->index, fd, &why))
                cake_set_err(c, 0, "GPU pool segment %u not mapped: %s", e->index, why);
        }
        if (fd >= 0)
            close(fd);
    }
    cake__segment_map__free_unpacked(m, &al);
}

int cake_pool_mapped(const cake_ctx *c, const void *addr, size_t len)
{
    const uint8_t *a = addr;
    if (!c->pool || !a || a < c->pool || (size_t)(a - c->pool) > c->pool_bytes ||
        len > c->pool_bytes - (size_t)(a - c->pool))
        return 0;
    uint64_t off = (uint64_t)(a - c->pool);
    uint64_t last = len ? off + len - 1 : off;
    for (uint64_t i = off / c->seg_bytes; i <= last / c->seg_bytes; i++)
        if (i >= c->n_segs || !c->seg_gen[i])
            return 0;
    return 1;
}

/* The server's uid, as the kernel recorded it when caked called listen(). */
static int check_server(cake_ctx *c, const char *path)
{
    struct ucred cr;
    socklen_t cl = sizeof cr;
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0)
        return cake_set_err(c, -errno, "cannot read the credentials of %s: %s", path,
                            strerror(errno));
    uid_t me = geteuid();
    int ok = c->server_uid >= 0 ? cr.uid == (uid_t)c->server_uid : cr.uid == 0 || cr.uid == me;
    if (!ok) {
        char want[64];
        if (c->server_uid >= 0)
            snprintf(want, sizeof want, "uid %ld", c->server_uid);
        else
            snprintf(want, sizeof want, "root or uid %u", (unsigned)me);
        return cake_set_err(c, CAKE_EPERM, "the server at %s runs as uid %u, not %s: refusing "
                            "to talk to it (cake_set_server_uid() names caked's uid)", path,
                            (unsigned)cr.uid, want);
    }
    return 0;
}

int cake_connect(cake_ctx *c, const char *path, int map_pool)
{
    char def[108];
    if (!path) {
        if (cake_default_socket(def, sizeof def))
            return cake_set_err(c, -ENAMETOOLONG, "default socket path too long");
        path = def;
    }
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path)
        return cake_set_err(c, -ENAMETOOLONG, "socket path too long: %s", path);
    strcpy(a.sun_path, path);
    if (c->fd >= 0) { /* still connected, unless caked is gone (then connect afresh) */
        struct pollfd pf = {c->fd, POLLIN, 0};
        char x;
        if (poll(&pf, 1, 0) == 0 || (!(pf.revents & (POLLHUP | POLLERR)) &&
                                     recv(c->fd, &x, 1, MSG_PEEK | MSG_DONTWAIT) != 0))
            return cake_set_err(c, CAKE_EINVAL, "already connected");
    }
    /* a new connection starts with no sequence and no segment: handles of the old one end */
    conn_release(c);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return cake_set_err(c, -errno, "socket: %s", strerror(errno));
    int rc;
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(c->fd);
        c->fd = -1;
        return cake_set_err(c, -e, "cannot connect to caked at %s: %s", path, strerror(e));
    }
    if ((rc = check_server(c, path))) {
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    Cake__Hello m = CAKE__HELLO__INIT;
    m.protocol_version = CAKE_PROTOCOL_VERSION, m.service = c->service, m.want_pool = map_pool != 0;
    m.shrink_idle = c->shrink_idle;
    m.admin = c->want_admin;
    uint8_t *b = NULL;
    size_t n = 0;
    rc = rpc(c, MSG_HELLO, &m.base, &b, &n);
    if (rc)
        goto fail;
    ProtobufCAllocator al = {pc_alloc, pc_free, c};
    Cake__HelloReply *r = cake__hello_reply__unpack(&al, n, b);
    c_free(c, b);
    if (!r) {
        rc = cake_set_err(c, CAKE_EPROTO, "malformed HELLO reply");
        goto fail;
    }
    /* sizes from the server are checked before anything is reserved by them */
    uint64_t pb = r->page_bytes, sb = r->segment_bytes, bytes = r->pool_bytes;
    if (map_pool && (pb < 4096 || (pb & (pb - 1)) || sb < pb || (sb & (sb - 1)) || !bytes ||
                     bytes % pb || bytes > (UINT64_C(1) << 46) || (bytes + sb - 1) / sb > 65536)) {
        cake__hello_reply__free_unpacked(r, &al);
        rc = cake_set_err(c, CAKE_EPROTO, "caked described an impossible pool (%llu bytes, "
                          "pages of %llu, segments of %llu)", (unsigned long long)bytes,
                          (unsigned long long)pb, (unsigned long long)sb);
        goto fail;
    }
    c->pool_bytes = bytes, c->page_bytes = pb, c->seg_bytes = sb;
    /* each GPU pool: reserved here when this process can use that GPU (and the engine did not
     * restrict it with cake_set_gpus()); otherwise cake_errstr() says why */
    c->n_gpus = 0;
    for (size_t i = 0; i < r->n_gpus && i < CAKE_MAX_GPUS; i++) {
        const Cake__GpuPool *g = r->gpus[i];
        struct cake_gpu *cg = &c->gpus[c->n_gpus++];
        snprintf(cg->uuid, sizeof cg->uuid, "%s", g->uuid ? g->uuid : "");
        cg->bytes = g->bytes;
        cg->legacy = g->ipc_handle.len > 0;
        int wanted = !c->gpu_filter[0] || strstr(c->gpu_filter, cg->uuid) != NULL;
        const char *why = "";
        if (!wanted || !map_pool) {
        } else if (cg->legacy) {
            if (g->ipc_handle.len == sizeof cg->gpu.ipc &&
                gpupool_import_legacy(&cg->gpu, g->ipc_handle.data, cg->bytes, cg->uuid, &why) == 0)
                cg->mapped = 1;
            else
                cake_set_err(c, 0, "GPU pool %s not mapped: %s", cg->uuid, why);
        } else if (gpupool_create(&cg->gpu, cg->bytes, g->segment_bytes, cg->uuid, &why) == 0 &&
                   cg->gpu.bytes == cg->bytes) {
            cg->mapped = 1; /* segments arrive in MAP frames */
        } else {
            gpupool_destroy(&cg->gpu);
            cake_set_err(c, 0, "GPU pool %s not mapped: %s", cg->uuid,
                         why[0] ? why : "its size is not a multiple of the granularity");
        }
    }
    cake__hello_reply__free_unpacked(r, &al);
    if (map_pool) {
        c->n_segs = (uint32_t)((c->pool_bytes + c->seg_bytes - 1) / c->seg_bytes);
        c->seg_gen = c_alloc(c, sizeof(uint32_t) * c->n_segs);
        void *p = c->seg_gen ? mmap(NULL, c->pool_bytes, PROT_NONE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                             : MAP_FAILED;
        if (p == MAP_FAILED) {
            rc = cake_set_err(c, c->seg_gen ? -errno : -ENOMEM, "cannot reserve the pool's "
                              "address range: %s", strerror(c->seg_gen ? errno : ENOMEM));
            goto fail;
        }
        memset(c->seg_gen, 0, sizeof(uint32_t) * c->n_segs);
        c->pool = p;
        c->host_registered = any_gpu_mapped(c); /* each segment as it is mapped */
    }
    return 0;
fail:
    fdg_clear(c);
    frame_reader_free(&c->rd);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    return rc;
}

static void seq_release(cake_ctx *c, cake_seq *s)
{
    for (size_t i = 0; i < c->n_seqs; i++)
        if (c->seqs[i] == s) {
            c->seqs[i] = c->seqs[--c->n_seqs];
            break;
        }
    cake_gpu_seq_release(s);
    if (s->win_stitched)
        munmap(s->win, s->win_bytes);
    if (s->win_pages)
        c_free(c, s->win_pages);
    c_free(c, s);
}

/* Everything a connection had: sequence handles, segments, the reserved ranges. */
static void conn_release(cake_ctx *c)
{
    while (c->n_seqs)
        seq_release(c, c->seqs[0]);
    for (uint32_t i = 0; c->pool && i < c->n_segs; i++)
        host_seg_unmap(c, i);
    for (uint32_t i = 0; i < c->n_gpus; i++)
        if (c->gpus[i].mapped)
            gpupool_destroy(&c->gpus[i].gpu);
    memset(c->gpus, 0, sizeof c->gpus);
    c->n_gpus = 0, c->host_registered = 0;
    if (c->pool)
        munmap(c->pool, c->pool_bytes);
    if (c->seg_gen)
        c_free(c, c->seg_gen);
    c->pool = NULL, c->seg_gen = NULL, c->n_segs = 0;
    fdg_clear(c);
    frame_reader_free(&c->rd);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

void cake_destroy(cake_ctx *c)
{
    if (!c)
        return;
    conn_release(c);
    c_free(c, c->seqs);
    free(c);
}

int cake_ping(cake_ctx *c)
{
    return rpc_empty(c, MSG_PING, NULL);
}

void cake_policy_default(struct cake_policy *p)
{
    *p = (struct cake_policy){.mode = CAKE_MODE_FIXED, .cache_size = 1024, .window = 32,
                              .tau1 = 1.0f, .tau2 = 1.0f, .gamma = 200.0f, .cascading = 1};
}

static int seq_open(cake_ctx *c, const struct cake_layout *lay, const struct cake_policy *pol,
                    uint32_t prompt_len, uint32_t max_new_tokens, uint64_t group, uint32_t shards,
                    uint32_t shard, cake_seq **out);
static int refresh_resliced(cake_ctx *c);

int cake_seq_open(cake_ctx *c, const struct cake_layout *lay, const struct cake_policy *pol,
                  uint32_t prompt_len, uint32_t max_new_tokens, cake_seq **out)
{
    int rc = seq_open(c, lay, pol, prompt_len, max_new_tokens, 0, 0, 0, out);
    refresh_resliced(c); /* another sequence's tables: a failure there is that one's EIO */
    return rc;
}

int cake_seq_open_shard(cake_ctx *c, const struct cake_layout *lay, const struct cake_policy *pol,
                        uint32_t prompt_len, uint32_t max_new_tokens, uint64_t group,
                        uint32_t shards, uint32_t shard, cake_seq **out)
{
    if (!group || shards < 2 || shard >= shards)
        return cake_set_err(c, CAKE_EINVAL, "a shard needs a nonzero group key, shards >= 2 "
                                            "and shard < shards");
    return seq_open(c, lay, pol, prompt_len, max_new_tokens, group, shards, shard, out);
}

static size_t seq_row_bytes(const struct shm_desc *d)
{
    return (size_t)d->head_dim * (d->dtype == CAKE_F32 ? 4 : 2);
}

/* The pool holding a sequence's K/V pages and query rings: the host pool or a GPU pool. */
static void kv_pool_of(const cake_ctx *c, const struct cake_layout *lay, uint8_t **base,
                       size_t *bytes)
{
    *base = c->pool, *bytes = c->pool_bytes;
    if (lay->placement == CAKE_PLACE_GPU)
        *base = (uint8_t *)(uintptr_t)c->gpus[lay->gpu].gpu.va, *bytes = c->gpus[lay->gpu].gpu.bytes;
}

/* The descriptor caked wrote at open describes what was asked for, and everything it locates
 * in the window (itself, the host query rings, the indicator) lies inside it. */
static int desc_sane(const cake_ctx *c, const struct shm_desc *d, const Cake__SeqOpenReply *r,
                     const struct cake_layout *lay, uint32_t prompt_len, uint64_t win_bytes)
{
    uint32_t want_place = lay->placement == CAKE_PLACE_GPU ? SHM_PLACE_GPU : SHM_PLACE_HOST;
    if (d->layers != lay->layers || d->q_heads != lay->q_heads || d->kv_heads != lay->kv_heads ||
        d->head_dim != lay->head_dim || d->dtype != (uint32_t)lay->dtype ||
        d->tokens_per_page != r->tokens_per_page || !d->tokens_per_page ||
        d->prompt_len != prompt_len || d->placement != want_place ||
        d->page_bytes != c->page_bytes || d->seq_id != r->seq_id || !d->window)
        return 0;
    size_t row = seq_row_bytes(d);
    uint64_t ind = d->prompt_len > d->window ? d->prompt_len - d->window : 0;
    uint32_t rp = want_place == SHM_PLACE_GPU
                      ? shm_ring_geom(d->q_heads, d->window, row, d->page_bytes).pages : 0;
    if (d->ring_pages != rp || (want_place == SHM_PLACE_GPU && !rp) ||
        r->desc_bytes < shm_desc_bytes(d->layers, d->max_pages, d->kv_heads, rp) ||
        2 * (uint64_t)d->kv_heads * d->tokens_per_page * row > d->page_bytes ||
        d->indicator_offset > win_bytes ||
        ind * d->kv_heads * sizeof(float) > win_bytes - d->indicator_offset)
        return 0;
    return want_place == SHM_PLACE_GPU ||
           (d->ring_layer_bytes >= (uint64_t)d->q_heads * d->window * row &&
            d->ring_layer_bytes <= win_bytes && d->ring_offset <= win_bytes &&
            d->layers <= (win_bytes - d->ring_offset) / d->ring_layer_bytes);
}

/* The window: the pages caked listed, each in a mapped segment of ours, as one range (the
 * pool's own when they are one run). Returns 0 or an error. */
static int map_window(cake_ctx *c, cake_seq *s, const Cake__SeqOpenReply *r)
{
    uint64_t pb = c->page_bytes, n = r->n_window_pages;
    if (!n || r->desc_bytes + r->scratch_bytes != n * pb || n > c->pool_bytes / pb ||
        !(s->win_pages = c_alloc(c, sizeof(uint32_t) * n)))
        return cake_set_err(c, CAKE_EPROTO, "sequence window inconsistent with its size");
    s->win_n = (uint32_t)n, s->win_bytes = n * pb;
    memcpy(s->win_pages, r->window_pages, sizeof(uint32_t) * n);
    for (uint64_t i = 0; i < n; i++)
        if ((uint64_t)r->window_pages[i] >= c->pool_bytes / pb ||
            !cake_pool_mapped(c, c->pool + (uint64_t)r->window_pages[i] * pb, pb))
            return cake_set_err(c, CAKE_EPROTO, "sequence window outside this tenant's mapped "
                                                "segments");
    if (!(s->win = window_map(c->pool, s->win_pages, s->win_n, pb, c->seg_bytes / pb,
                              &s->win_stitched)))
        return cake_set_err(c, -errno, "cannot map a sequence window: %s", strerror(errno));
    return 0;
}

_Static_assert(sizeof(struct cake_layout) == 64, "cake_layout is part of the ABI");
_Static_assert(sizeof(struct cake_policy) == 128, "cake_policy is part of the ABI");

static int zeroed(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static int seq_open(cake_ctx *c, const struct cake_layout *lay, const struct cake_policy *pol,
                    uint32_t prompt_len, uint32_t max_new_tokens, uint64_t group, uint32_t shards,
                    uint32_t shard, cake_seq **out)
{
    if (c->fd < 0)
        return cake_set_err(c, CAKE_ENOTCONN, "not connected to caked");
    if (!c->pool)
        return cake_set_err(c, CAKE_EINVAL, "connect with map_pool to open sequences");
    if (!zeroed(lay->reserved, sizeof lay->reserved) ||
        (pol && !zeroed(pol->reserved, sizeof pol->reserved)))
        return cake_set_err(c, CAKE_EINVAL, "the reserved words of cake_layout and cake_policy "
                                            "must be zero");
    if (lay->placement != CAKE_PLACE_HOST && lay->placement != CAKE_PLACE_GPU)
        return cake_set_err(c, CAKE_EINVAL, "placement must be CAKE_PLACE_HOST or CAKE_PLACE_GPU");
    if (lay->placement == CAKE_PLACE_GPU &&
        (lay->gpu >= c->n_gpus || !c->gpus[lay->gpu].mapped))
        return cake_set_err(c, CAKE_EINVAL, "that GPU pool is not mapped in this process "
                                       "(cake_gpu_pool_base_at() is 0)");
    struct cake_policy dp;
    if (!pol) {
        cake_policy_default(&dp);
        pol = &dp;
    }
    Cake__Policy p = CAKE__POLICY__INIT;
    p.mode = pol->mode, p.cache_size = pol->cache_size, p.window = pol->window;
    p.tau1 = pol->tau1, p.tau2 = pol->tau2, p.gamma = pol->gamma, p.cascading = pol->cascading != 0;
    p.decode_slack = pol->decode_slack;
    p.kind = pol->kind, p.alloc = pol->alloc, p.indicator = pol->indicator, p.pool = pol->pool;
    p.pool_kernel = pol->pool_kernel, p.decode = pol->decode, p.sinks = pol->sinks;
    p.pyramid_beta = pol->pyramid_beta, p.ada_alpha = pol->ada_alpha, p.run_width = pol->run_width;
    Cake__SeqOpen m = CAKE__SEQ_OPEN__INIT;
    m.layers = lay->layers, m.q_heads = lay->q_heads, m.kv_heads = lay->kv_heads;
    m.head_dim = lay->head_dim, m.dtype = lay->dtype, m.prompt_len = prompt_len;
    m.max_new_tokens = max_new_tokens, m.policy = &p, m.placement = lay->placement;
    m.shard_group = group, m.shards = shards, m.shard = shard;
    if (lay->placement == CAKE_PLACE_GPU)
        m.gpu_uuid = c->gpus[lay->gpu].uuid;
    RPC_UNPACK(seq_open_reply, r, MSG_SEQ_OPEN, &m.base);
    cake_seq *s = c_alloc(c, sizeof(*s));
    if (s)
        memset(s, 0, sizeof(*s)); /* the error path below reads its window fields */
    int rc = s ? 0 : cake_set_err(c, -ENOMEM, "out of memory for a sequence handle");
    if (!rc && c->n_seqs == c->cap_seqs) {
        size_t cap = c->cap_seqs ? c->cap_seqs * 2 : 16;
        cake_seq **n = c_alloc(c, sizeof(*n) * cap);
        if (!n) {
            rc = cake_set_err(c, -ENOMEM, "out of memory for the sequence table");
        } else {
            if (c->n_seqs)
                memcpy(n, c->seqs, sizeof(*n) * c->n_seqs);
            if (c->seqs)
                c_free(c, c->seqs);
            c->seqs = n, c->cap_seqs = cap;
        }
    }
    if (!rc)
        rc = map_window(c, s, r);
    struct shm_desc hdr;
    if (!rc && r->desc_bytes < sizeof hdr)
        rc = cake_set_err(c, CAKE_EPROTO, "sequence descriptor shorter than its header");
    if (!rc) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        memcpy(&hdr, s->win, sizeof hdr);
        if (hdr.magic != SHM_DESC_MAGIC || hdr.version != SHM_DESC_VERSION)
            rc = cake_set_err(c, CAKE_EVERSION, "sequence descriptor of another layout version");
        else if (!desc_sane(c, &hdr, r, lay, prompt_len, s->win_bytes))
            rc = cake_set_err(c, CAKE_EPROTO, "sequence descriptor inconsistent with the "
                                              "sequence opened or outside the pool");
    }
    if (rc) {
        Cake__SeqRef cl = CAKE__SEQ_REF__INIT;
        cl.seq_id = r->seq_id;
        if (s) {
            if (s->win_stitched)
                munmap(s->win, s->win_bytes);
            if (s->win_pages)
                c_free(c, s->win_pages);
            c_free(c, s);
        }
        cake__seq_open_reply__free_unpacked(r, &al_);
        rpc_empty(c, MSG_SEQ_CLOSE, &cl.base); /* do not leave it open in caked */
        return rc;
    }
    s->ctx = c, s->id = r->seq_id, s->tpp = hdr.tokens_per_page, s->hdr = hdr;
    s->gpu_index = lay->placement == CAKE_PLACE_GPU ? lay->gpu : 0;
    s->desc = (struct shm_desc *)s->win;
    if (hdr.placement == SHM_PLACE_GPU)
        s->ring = shm_ring_geom(hdr.q_heads, hdr.window, seq_row_bytes(&hdr), hdr.page_bytes);
    cake__seq_open_reply__free_unpacked(r, &al_);
    s->row_bytes = seq_row_bytes(&hdr);
    kv_pool_of(c, lay, &s->kv_base, &s->kv_bytes);
    s->gpu = NULL;
    s->v_offset = (size_t)hdr.kv_heads * hdr.tokens_per_page * s->row_bytes;
    { /* the log-sum-exps' area, where this caked keeps one (it fits the window) */
        uint64_t ind = hdr.prompt_len > hdr.window ? hdr.prompt_len - hdr.window : 0;
        uint64_t off = hdr.indicator_offset + ((ind * hdr.kv_heads * 4 + 63) & ~UINT64_C(63));
        uint64_t bytes = (uint64_t)hdr.layers * hdr.q_heads * hdr.window * 4;
        s->lse_off = hdr.layers <= CAKE_MAX_LAYERS && off <= s->win_bytes &&
                             bytes <= s->win_bytes - off ? off : 0;
        memset(s->lse_put, 0, sizeof s->lse_put);
        memset(s->dlse_put, 0, sizeof s->dlse_put);
    }
    c->seqs[c->n_seqs++] = s;
    *out = s;
    return 0;
}

int cake_seq_close(cake_seq *s)
{
    cake_ctx *c = s->ctx;
    Cake__SeqRef m = CAKE__SEQ_REF__INIT;
    m.seq_id = s->id;
    int rc = rpc_empty(c, MSG_SEQ_CLOSE, &m.base);
    seq_release(c, s);
    return rc;
}

int cake_seq_park(cake_seq *s, int park)
{
    Cake__Park m = CAKE__PARK__INIT;
    m.seq_id = s->id, m.restore = !park;
    int rc = rpc_empty(s->ctx, MSG_PARK, &m.base);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return rc ? rc : cake_gpu_tables_refresh(&s, 1);
}

int cake_seq_parked(const cake_seq *s)
{
    return ((const volatile struct shm_desc *)s->desc)->placement == SHM_PLACE_PARKED;
}

uint64_t cake_seq_id(const cake_seq *s) { return s->id; }
int cake_seq_on_gpu(const cake_seq *s) { return s->hdr.placement == SHM_PLACE_GPU; }
uint32_t cake_seq_tokens_per_page(const cake_seq *s) { return s->tpp; }

int cake_kept_positions(cake_seq *s, uint32_t layer, uint32_t kv_head, uint32_t *pos, size_t cap,
                        uint32_t *n_tokens)
{
    cake_ctx *c = s->ctx;
    if (!pos && cap)
        return cake_set_err(c, CAKE_EINVAL, "no buffer for %zu positions", cap);
    size_t got = 0;
    for (;;) { /* a page per round trip, until cap or the layer's end */
        Cake__PositionsRequest m = CAKE__POSITIONS_REQUEST__INIT;
        m.seq_id = s->id, m.layer = layer, m.kv_head = kv_head, m.from = (uint32_t)got;
        m.max = cap - got > UINT32_MAX ? UINT32_MAX : (uint32_t)(cap - got);
        RPC_UNPACK(positions, r, MSG_POSITIONS, &m.base);
        size_t want = r->tokens < cap ? r->tokens : cap, n = r->n_position;
        if (n > want - got || (n == 0 && got < want)) {
            cake__positions__free_unpacked(r, &al_);
            return cake_set_err(c, CAKE_EPROTO, "caked sent %zu positions from slot %zu of %zu",
                                n, got, want);
        }
        if (n)
            memcpy(pos + got, r->position, sizeof(uint32_t) * n);
        got += n;
        if (n_tokens)
            *n_tokens = r->tokens;
        cake__positions__free_unpacked(r, &al_);
        if (got >= want)
            return 0;
    }
}

int cake_seq_page_layout(const cake_seq *s, uint64_t *page_bytes, uint64_t *v_offset)
{
    if (page_bytes)
        *page_bytes = s->hdr.page_bytes;
    if (v_offset)
        *v_offset = s->v_offset;
    return 0;
}

/* With shrink_idle a call may have re-sliced any sequence of the context (a reserve, an
 * open or a decode step that waited for room): the device tables of those whose
 * descriptor's re-slice count moved are brought up to date too. */
static int refresh_resliced(cake_ctx *c)
{
    int rc = 0;
    for (size_t i = 0; c->shrink_idle && i < c->n_seqs; i++) {
        cake_seq *s = c->seqs[i];
        uint32_t n = cake_seq_reslices(s);
        if (n != s->reslices_seen) {
            s->reslices_seen = n;
            int r = cake_gpu_tables_refresh(&s, 1);
            rc = rc ? rc : r;
        }
    }
    return rc;
}

int cake_prefill_reserve(cake_seq *s, uint32_t layer)
{
    Cake__LayerRef m = CAKE__LAYER_REF__INIT;
    m.seq_id = s->id, m.layer = layer;
    int rc = rpc_empty(s->ctx, MSG_PREFILL_RESERVE, &m.base);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (!rc)
        rc = cake_gpu_tables_refresh(&s, 1);
    int r = refresh_resliced(s->ctx);
    return rc ? rc : r;
}

static int prefill(cake_seq *s, uint16_t type, const ProtobufCMessage *msg, double *pref)
{
    cake_ctx *c = s->ctx;
    RPC_UNPACK(prefill_reply, r, type, msg);
    if (pref)
        *pref = r->preference;
    cake__prefill_reply__free_unpacked(r, &al_);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return cake_gpu_tables_refresh(&s, 1);
}

int cake_prefill_observe(cake_seq *s, uint32_t layer, double *preference)
{
    Cake__LayerRef m = CAKE__LAYER_REF__INIT;
    m.seq_id = s->id, m.layer = layer;
    if (layer < s->hdr.layers && layer < CAKE_MAX_LAYERS) { /* what cake_put_lse wrote is used once */
        m.lse = s->lse_put[layer] != 0;
        s->lse_put[layer] = 0;
    }
    return prefill(s, MSG_PREFILL_OBSERVE, &m.base, preference);
}

int cake_prefill_submit(cake_seq *s, uint32_t layer, double preference)
{
    Cake__PrefillSubmit m = CAKE__PREFILL_SUBMIT__INIT;
    m.seq_id = s->id, m.layer = layer, m.preference = preference;
    return prefill(s, MSG_PREFILL_SUBMIT, &m.base, NULL);
}

int cake_decode_step(cake_ctx *c, cake_seq *const *seqs, size_t n)
{
    uint64_t stack_ids[256], *ids = n <= 256 ? stack_ids : c_alloc(c, sizeof(uint64_t) * n);
    if (!ids)
        return cake_set_err(c, -ENOMEM, "out of memory for %zu sequence ids", n);
    for (size_t i = 0; i < n; i++) {
        if (seqs[i]->ctx != c) {
            if (ids != stack_ids)
                c_free(c, ids);
            return cake_set_err(c, CAKE_EINVAL, "sequence of another context");
        }
        ids[i] = seqs[i]->id;
    }
    Cake__DecodeStep m = CAKE__DECODE_STEP__INIT;
    m.n_seq_ids = n, m.seq_ids = ids;
    /* which layers' decode log-sum-exps each sequence wrote (cake_put_decode_lse): sent where
     * any did; the bits go with this step */
    size_t any = 0;
    for (size_t i = 0; i < n && !any; i++)
        for (size_t j = 0; j < sizeof seqs[i]->dlse_put && !any; j++)
            any = seqs[i]->dlse_put[j] != 0;
    ProtobufCBinaryData stack_lse[256], *lse = !any ? NULL : n <= 256 ? stack_lse : c_alloc(c, sizeof(*lse) * n);
    if (any && !lse) {
        if (ids != stack_ids)
            c_free(c, ids);
        return cake_set_err(c, -ENOMEM, "out of memory for %zu sequences' log-sum-exp bits", n);
    }
    for (size_t i = 0; any && i < n; i++)
        lse[i] = (ProtobufCBinaryData){.len = (seqs[i]->hdr.layers + 7) / 8, .data = seqs[i]->dlse_put};
    m.n_decode_lse = any ? n : 0, m.decode_lse = lse;
    uint8_t *b = NULL;
    size_t bl = 0;
    int rc = rpc(c, MSG_DECODE_STEP, &m.base, &b, &bl);
    for (size_t i = 0; i < n; i++) /* sent (or the step failed: written for a step that did not come) */
        memset(seqs[i]->dlse_put, 0, sizeof seqs[i]->dlse_put);
    if (lse && lse != stack_lse)
        c_free(c, lse);
    if (ids != stack_ids)
        c_free(c, ids);
    if (!rc)
        c_free(c, b);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (!rc)
        rc = cake_gpu_tables_refresh(seqs, n);
    int r = refresh_resliced(c);
    return rc ? rc : r;
}

int cake_gpu_pool_mapped(const cake_ctx *c, uint32_t i, uint64_t off, size_t len)
{
    if (i >= c->n_gpus || !c->gpus[i].mapped)
        return 0;
    const struct gpupool *g = &c->gpus[i].gpu;
    if (off > g->bytes || len > g->bytes - off)
        return 0;
    if (g->legacy)
        return 1;
    if (!g->seg)
        return 0;
    uint64_t last = len ? off + len - 1 : off;
    for (uint64_t k = off / g->seg_bytes; k <= last / g->seg_bytes; k++)
        if (k >= g->n_segs || !g->seg[k])
            return 0;
    return 1;
}

/* Is [off, off + len) of the sequence's K/V pool (host or GPU) mapped in this process? */
static int kv_mapped(const cake_seq *s, uint64_t off, uint64_t len)
{
    const cake_ctx *c = s->ctx;
    if (s->hdr.placement != SHM_PLACE_GPU)
        return cake_pool_mapped(c, c->pool + off, len);
    return cake_gpu_pool_mapped(c, s->gpu_index, off, len);
}

static uint8_t *kv_addr(const cake_seq *s, uint32_t layer, uint32_t g, uint32_t t)
{
    if (layer >= s->hdr.layers || g >= s->hdr.kv_heads)
        return NULL;
    uint32_t p = t / s->tpp;
    if (p >= seq_npages(s, layer))
        return NULL;
    uint64_t off = seq_pages(s, layer)[p];
    if (off > s->kv_bytes || s->kv_bytes - off < s->hdr.page_bytes || !kv_mapped(s, off, s->hdr.page_bytes))
        return NULL;
    return s->kv_base + off + ((size_t)g * s->tpp + t % s->tpp) * s->row_bytes;
}

void *cake_key(const cake_seq *s, uint32_t layer, uint32_t g, uint32_t t)
{
    return kv_addr(s, layer, g, t);
}

void *cake_value(const cake_seq *s, uint32_t layer, uint32_t g, uint32_t t)
{
    uint8_t *k = kv_addr(s, layer, g, t);
    return k ? k + s->v_offset : NULL;
}

void *cake_queries(const cake_seq *s, uint32_t layer)
{
    if (layer >= s->hdr.layers || s->hdr.placement != SHM_PLACE_HOST)
        return NULL;
    return s->win + s->hdr.ring_offset + (uint64_t)layer * s->hdr.ring_layer_bytes;
}

uint32_t cake_decode_slot(const cake_seq *s, uint32_t layer)
{
    if (layer >= s->hdr.layers)
        return UINT32_MAX;
    uint32_t row = seq_layer(s, layer)->ring_next;
    return row < s->hdr.window ? row : UINT32_MAX;
}

void *cake_decode_query(const cake_seq *s, uint32_t layer)
{
    uint8_t *q = cake_queries(s, layer);
    uint32_t row = cake_decode_slot(s, layer);
    return q && row != UINT32_MAX ? q + (size_t)row * s->row_bytes : NULL;
}

uint8_t *cake_ring_row(const cake_seq *s, uint32_t layer, uint32_t h, uint32_t slot)
{
    if (layer >= s->hdr.layers || h >= s->hdr.q_heads || slot >= s->hdr.window)
        return NULL;
    if (s->hdr.placement == SHM_PLACE_HOST)
        return (uint8_t *)cake_queries(s, layer) + ((size_t)h * s->hdr.window + slot) * s->row_bytes;
    uint32_t pg;
    uint64_t at = shm_ring_at(&s->ring, s->hdr.window, s->row_bytes, h, slot, &pg);
    if (pg >= s->ring.pages)
        return NULL;
    uint64_t off = seq_ring_pages(s, layer)[pg];
    if (off > s->kv_bytes || s->kv_bytes - off < s->hdr.page_bytes ||
        !kv_mapped(s, off, s->hdr.page_bytes))
        return NULL;
    return s->kv_base + off + at;
}

void *cake_query_row(const cake_seq *s, uint32_t layer, uint32_t q_head, uint32_t slot)
{
    return cake_ring_row(s, layer, q_head, slot);
}

/* Rows [0, n) of each head of src to ring slots slot0.. of the layer. */
static int put_rows(cake_seq *s, uint32_t layer, const uint8_t *src, size_t head_stride,
                    uint32_t n, uint32_t slot0, void *stream)
{
    if (layer >= s->hdr.layers || !src || slot0 + (uint64_t)n > s->hdr.window)
        return cake_set_err(s->ctx, CAKE_EINVAL, "no such layer, no queries or more rows than "
                                                 "the window");
    if (s->hdr.placement == SHM_PLACE_GPU)
        return cake_gpu_put_rows(s, layer, src, head_stride, n, slot0, stream);
    (void)stream;
    uint8_t *ring = cake_queries(s, layer);
    for (uint32_t h = 0; h < s->hdr.q_heads; h++)
        memcpy(ring + ((size_t)h * s->hdr.window + slot0) * s->row_bytes, src + h * head_stride,
               (size_t)n * s->row_bytes);
    return 0;
}

int cake_put_queries(cake_seq *s, uint32_t layer, const void *q, uint32_t n, void *stream)
{
    if (!n)
        return cake_set_err(s->ctx, CAKE_EINVAL, "no queries");
    uint32_t m = n < s->hdr.window ? n : s->hdr.window; /* the last w rows of each head */
    const uint8_t *src = q ? (const uint8_t *)q + (size_t)(n - m) * s->row_bytes : NULL;
    return put_rows(s, layer, src, (size_t)n * s->row_bytes, m, 0, stream);
}

int cake_put_lse(cake_seq *s, uint32_t layer, const float *lse, uint32_t n, void *stream)
{
    if (!s->lse_off)
        return cake_set_err(s->ctx, -ENOTSUP, "this caked keeps no log-sum-exps (an older one)");
    if (layer >= s->hdr.layers || !lse || !n)
        return cake_set_err(s->ctx, CAKE_EINVAL, "no such layer, or no log-sum-exps");
    uint32_t w = s->hdr.window, m = n < w ? n : w; /* the last w rows of each head, slots 0.. */
    float *dst = (float *)(s->win + s->lse_off) + (size_t)layer * s->hdr.q_heads * w;
    int rc = 0;
    if (s->hdr.placement == SHM_PLACE_GPU) /* host or device memory, on the engine's stream */
        rc = cake_gpu_copy_2d(s, dst, w * sizeof(float), lse + (n - m), (size_t)n * sizeof(float),
                              m * sizeof(float), s->hdr.q_heads, stream);
    else
        for (uint32_t h = 0; h < s->hdr.q_heads; h++)
            memcpy(dst + (size_t)h * w, lse + (size_t)h * n + (n - m), m * sizeof(float));
    if (!rc)
        s->lse_put[layer] = 1;
    return rc;
}

int cake_put_decode_lse(cake_seq *s, uint32_t layer, const float *lse, void *stream)
{
    if (!s->lse_off)
        return cake_set_err(s->ctx, -ENOTSUP, "this caked keeps no log-sum-exps (an older one)");
    uint32_t slot = cake_decode_slot(s, layer);
    if (slot == UINT32_MAX || !lse)
        return cake_set_err(s->ctx, CAKE_EINVAL, "no such layer, or no log-sum-exps");
    uint32_t w = s->hdr.window; /* [layers][q_heads][w] by ring slot */
    float *dst = (float *)(s->win + s->lse_off) + (size_t)layer * s->hdr.q_heads * w + slot;
    int rc = 0;
    if (s->hdr.placement == SHM_PLACE_GPU) /* host or device memory, on the engine's stream */
        rc = cake_gpu_copy_2d(s, dst, w * sizeof(float), lse, sizeof(float), sizeof(float),
                              s->hdr.q_heads, stream);
    else
        for (uint32_t h = 0; h < s->hdr.q_heads; h++)
            dst[(size_t)h * w] = lse[h];
    if (!rc)
        s->dlse_put[layer / 8] |= (uint8_t)(1u << (layer % 8));
    return rc;
}

int cake_put_decode_query(cake_seq *s, uint32_t layer, const void *q, void *stream)
{
    uint32_t slot = cake_decode_slot(s, layer);
    if (slot == UINT32_MAX)
        return cake_set_err(s->ctx, CAKE_EINVAL, "no such layer or no decode token reserved");
    return put_rows(s, layer, q, s->row_bytes, 1, slot, stream);
}

float *cake_indicator(const cake_seq *s)
{
    return (float *)(s->win + s->hdr.indicator_offset); /* bounded at open (desc_sane) */
}

uint32_t cake_layer_tokens(const cake_seq *s, uint32_t layer)
{
    if (layer >= s->hdr.layers)
        return 0;
    uint32_t t = seq_layer(s, layer)->tokens;
    uint64_t cap = (uint64_t)seq_npages(s, layer) * s->tpp;
    return t < cap ? t : (uint32_t)cap;
}

uint32_t cake_layer_budget(const cake_seq *s, uint32_t layer)
{
    return layer < s->hdr.layers ? seq_layer(s, layer)->budget : 0;
}

uint32_t cake_seq_reslices(const cake_seq *s)
{
    return ((const volatile struct shm_desc *)s->desc)->reslices;
}

uint32_t cake_head_holes(const cake_seq *s, uint32_t layer, uint32_t kv_head, uint32_t *first)
{
    if (layer >= s->hdr.layers || kv_head >= s->hdr.kv_heads)
        return 0;
    const volatile struct shm_layer *ly = seq_layer(s, layer);
    const volatile uint32_t *head_kept =
        shm_head_kept(s->desc, s->hdr.layers, s->hdr.max_pages, s->hdr.kv_heads, layer);
    uint32_t kept = head_kept[kv_head], prefix = ly->prefix;
    if (!ly->holes || kept >= prefix)
        return 0;
    if (first)
        *first = kept;
    return prefix - kept;
}

const uint64_t *cake_layer_pages(const cake_seq *s, uint32_t layer, uint32_t *n)
{
    if (layer >= s->hdr.layers)
        return NULL;
    *n = seq_npages(s, layer);
    return (const uint64_t *)seq_pages(s, layer);
}

/* ---- internal (see internal.h) ---- */

int cake_internal_rpc(cake_ctx *c, uint16_t type, const ProtobufCMessage *msg, uint8_t **body,
                      size_t *len)
{
    return rpc(c, type, msg, body, len);
}

void cake_internal_free(cake_ctx *c, void *p)
{
    c_free(c, p);
}

ProtobufCAllocator cake_internal_allocator(cake_ctx *c)
{
    return (ProtobufCAllocator){pc_alloc, pc_free, c};
}
