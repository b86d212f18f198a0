/* loop.c - io_uring and epoll backends behind one readiness interface (see loop.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "loop.h"

#define LOOP_URING_ENTRIES 256
#define LOOP_MAX_EVENTS 128

struct slot {
    int fd;
    uint32_t events;
    uint32_t gen;
    int active;
    loop_fn fn;
    void *arg;
    int next_free;
};

struct loop {
    enum loop_backend kind;
    int epfd;
    struct io_uring ring;
    struct slot *s;
    int n, cap, free_head;
};

/* user_data: slot (32 bits) | generation (31 bits) | is-removal (1 bit) */
static uint64_t ud(int slot, uint32_t gen, int removal)
{
    return (uint64_t)(uint32_t)slot | ((uint64_t)(gen & 0x7fffffffu) << 32) |
           ((uint64_t)(removal != 0) << 63);
}

/* The peer's half-close (RDHUP) is watched with input only: with nothing watched, only an
 * error or a full hang-up is reported (epoll and poll always report those). */
static uint32_t to_poll(uint32_t ev)
{
    return (ev & LOOP_IN ? POLLIN | POLLRDHUP : 0) | (ev & LOOP_OUT ? POLLOUT : 0);
}

static uint32_t from_poll(uint32_t m)
{
    return (m & POLLIN ? LOOP_IN : 0) | (m & POLLOUT ? LOOP_OUT : 0) |
           (m & (POLLERR | POLLHUP | POLLRDHUP) ? LOOP_ERR : 0) | (m & POLLHUP ? LOOP_HUP : 0);
}

static struct io_uring_sqe *get_sqe(struct loop *l)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    if (!sqe) { /* queue full: push what we have to the kernel and retry */
        io_uring_submit(&l->ring);
        sqe = io_uring_get_sqe(&l->ring);
    }
    return sqe;
}

static int arm(struct loop *l, int h)
{
    struct io_uring_sqe *sqe = get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_multishot(sqe, l->s[h].fd, to_poll(l->s[h].events));
    io_uring_sqe_set_data64(sqe, ud(h, l->s[h].gen, 0));
    return 0;
}

/* Cancels the poll armed as (h, gen). IORING_OP_POLL_REMOVE fails with -EALREADY when the
 * poll's wakeup is being processed at that moment (a client writing while caked drops it),
 * which left the poll armed, holding the closed socket open: its peer never saw EOF. An
 * ASYNC_CANCEL marks the poll cancelled even then. */
static int cancel_poll(struct loop *l, uint64_t target)
{
    struct io_uring_sqe *sqe = get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_cancel64(sqe, target, 0);
    io_uring_sqe_set_data64(sqe, target | (UINT64_C(1) << 63));
    return 0;
}

static int disarm(struct loop *l, int h)
{
    return cancel_poll(l, ud(h, l->s[h].gen, 0));
}

/* A multishot poll on an eventfd must report two separate writes. */
static int uring_probe(struct io_uring *ring)
{
    struct io_uring_probe *pr = io_uring_get_probe_ring(ring);
    if (!pr)
        return -ENOSYS;
    int ok = io_uring_opcode_supported(pr, IORING_OP_POLL_ADD) &&
             io_uring_opcode_supported(pr, IORING_OP_ASYNC_CANCEL);
    io_uring_free_probe(pr);
    if (!ok)
        return -ENOSYS;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0)
        return -errno;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_poll_multishot(sqe, efd, POLLIN);
    io_uring_sqe_set_data64(sqe, 1);
    int fired = 0, rc = 0;
    for (int round = 0; round < 2 && !rc; round++) {
        uint64_t one = 1, drain;
        if (write(efd, &one, sizeof one) != sizeof one) {
            rc = -EIO;
            break;
        }
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = 1};
        rc = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
        if (rc >= 0) {
            rc = 0;
            if (cqe->res > 0 && (cqe->flags & IORING_CQE_F_MORE))
                fired++;
            io_uring_cqe_seen(ring, cqe);
        }
        if (read(efd, &drain, sizeof drain) < 0)
            rc = rc ? rc : 0;
    }
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_cancel64(sqe, 1, 0);
    io_uring_sqe_set_data64(sqe, 2);
    io_uring_submit(ring);
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {.tv_nsec = 100000000};
    while (io_uring_wait_cqe_timeout(ring, &cqe, &ts) == 0)
        io_uring_cqe_seen(ring, cqe);
    close(efd);
    return rc ? rc : fired == 2 ? 0 : -ENOTSUP;
}

int loop_create(enum loop_backend want, struct loop **out, const char **name, const char **why)
{
    struct loop *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->epfd = -1, l->free_head = -1;
    *why = NULL;
    if (want != LOOP_EPOLL) {
        /* one thread submits and reaps: let the kernel skip cross-CPU task_work IPIs where
         * it can (5.19+), plain setup otherwise */
        int rc = io_uring_queue_init(LOOP_URING_ENTRIES, &l->ring,
                                     IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
        if (rc == -EINVAL)
            rc = io_uring_queue_init(LOOP_URING_ENTRIES, &l->ring, IORING_SETUP_COOP_TASKRUN);
        if (rc == -EINVAL)
            rc = io_uring_queue_init(LOOP_URING_ENTRIES, &l->ring, 0);
        if (rc == 0 && (rc = uring_probe(&l->ring)) != 0)
            io_uring_queue_exit(&l->ring);
        if (rc == 0) {
            l->kind = LOOP_URING;
            *name = "io_uring";
            *out = l;
            return 0;
        }
        *why = rc == -ENOTSUP || rc == -ENOSYS
                   ? "io_uring lacks multishot poll on this kernel"
                   : "io_uring is unavailable (kernel, seccomp or kernel.io_uring_disabled)";
        if (want == LOOP_URING) {
            free(l);
            return rc;
        }
    }
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (l->epfd < 0) {
        int e = errno;
        free(l);
        *why = "epoll_create1 failed";
        return -e;
    }
    l->kind = LOOP_EPOLL;
    *name = "epoll";
    *out = l;
    return 0;
}

void loop_destroy(struct loop *l)
{
    if (!l)
        return;
    if (l->kind == LOOP_URING)
        io_uring_queue_exit(&l->ring);
    if (l->epfd >= 0)
        close(l->epfd);
    free(l->s);
    free(l);
}

int loop_add(struct loop *l, int fd, uint32_t events, loop_fn fn, void *arg, int *handle)
{
    int h = l->free_head;
    if (h >= 0) {
        l->free_head = l->s[h].next_free;
    } else {
        if (l->n == l->cap) {
            int cap = l->cap ? l->cap * 2 : 64;
            struct slot *s = realloc(l->s, sizeof(*s) * cap);
            if (!s)
                return -ENOMEM;
            l->s = s, l->cap = cap;
        }
        h = l->n++;
        l->s[h].gen = 0;
    }
    struct slot *s = &l->s[h];
    s->fd = fd, s->events = events, s->fn = fn, s->arg = arg, s->active = 1;
    s->gen++;
    int rc;
    if (l->kind == LOOP_URING) {
        rc = arm(l, h);
    } else {
        struct epoll_event ev = {.events = to_poll(events), .data.u64 = ud(h, s->gen, 0)};
        rc = epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
    }
    if (rc) {
        s->active = 0;
        s->next_free = l->free_head, l->free_head = h;
        return rc;
    }
    *handle = h;
    return 0;
}

int loop_set(struct loop *l, int h, uint32_t events)
{
    struct slot *s = &l->s[h];
    if (!s->active)
        return -EINVAL;
    if (s->events == events)
        return 0;
    s->events = events;
    if (l->kind == LOOP_URING) {
        int rc = disarm(l, h);
        s->gen++; /* the old poll's last CQE (-ECANCELED) is now stale */
        return rc ? rc : arm(l, h);
    }
    struct epoll_event ev = {.events = to_poll(events), .data.u64 = ud(h, s->gen, 0)};
    return epoll_ctl(l->epfd, EPOLL_CTL_MOD, s->fd, &ev) < 0 ? -errno : 0;
}

void loop_del(struct loop *l, int h)
{
    struct slot *s = &l->s[h];
    if (!s->active)
        return;
    if (l->kind == LOOP_URING)
        disarm(l, h);
    else
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, s->fd, NULL);
    s->active = 0;
    s->gen++;
    s->next_free = l->free_head, l->free_head = h;
}

static int current(struct loop *l, uint64_t u, int *h)
{
    *h = (int)(uint32_t)u;
    uint32_t gen = (uint32_t)(u >> 32) & 0x7fffffffu;
    return *h < l->n && l->s[*h].active && (l->s[*h].gen & 0x7fffffffu) == gen;
}

int loop_wait(struct loop *l, int timeout_ms)
{
    int done = 0;
    if (l->kind == LOOP_EPOLL) {
        struct epoll_event ev[LOOP_MAX_EVENTS];
        int n = epoll_wait(l->epfd, ev, LOOP_MAX_EVENTS, timeout_ms);
        if (n < 0)
            return errno == EINTR ? 0 : -errno;
        for (int i = 0; i < n; i++) {
            int h;
            if (current(l, ev[i].data.u64, &h)) {
                l->s[h].fn(l->s[h].arg, from_poll(ev[i].events));
                done++;
            }
        }
        return done;
    }
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                   .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    int rc = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, timeout_ms < 0 ? NULL : &ts, NULL);
    if (rc < 0)
        return rc == -EINTR || rc == -ETIME ? 0 : rc;
    /* drain the batch first: callbacks may add or remove watches */
    struct { uint64_t u; int32_t res; uint32_t flags; } batch[LOOP_MAX_EVENTS];
    int nb = 0;
    unsigned head;
    io_uring_for_each_cqe(&l->ring, head, cqe) {
        if (nb == LOOP_MAX_EVENTS)
            break;
        batch[nb].u = cqe->user_data, batch[nb].res = cqe->res, batch[nb].flags = cqe->flags;
        nb++;
    }
    io_uring_cq_advance(&l->ring, (unsigned)nb);
    for (int i = 0; i < nb; i++) {
        int h;
        if (batch[i].u >> 63) { /* a cancellation's own completion */
            if (batch[i].res == -EALREADY) /* the poll is still armed: again */
                cancel_poll(l, batch[i].u & ~(UINT64_C(1) << 63));
            continue;
        }
        if (!current(l, batch[i].u, &h))
            continue; /* a stale watch */
        if (batch[i].res < 0 || !(batch[i].flags & IORING_CQE_F_MORE)) {
            /* the multishot poll ended (-ECANCELED, overflow, ...): re-arm, then report
             * what we have so nothing is missed */
            arm(l, h);
            if (batch[i].res < 0)
                continue;
        }
        l->s[h].fn(l->s[h].arg, from_poll((uint32_t)batch[i].res));
        done++;
    }
    return done;
}
