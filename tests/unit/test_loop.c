/* The event loop, both backends: readiness, modification, removal within a batch. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "loop.h"

struct probe {
    int fd;
    int hits;
    uint32_t last;
    struct loop *l;
    int *victim; /* a handle to remove when called */
};

static void cb(void *arg, uint32_t ev)
{
    struct probe *p = arg;
    p->hits++, p->last = ev;
    char buf[64];
    if (ev & LOOP_IN)
        while (read(p->fd, buf, sizeof buf) > 0) {
        }
    if (p->victim) {
        loop_del(p->l, *p->victim);
        p->victim = NULL;
    }
}

/* A loop of backend b, or NULL (with a note) where io_uring is unavailable. */
static struct loop *make_loop(enum loop_backend b)
{
    struct loop *l;
    const char *name, *why;
    int rc = loop_create(b, &l, &name, &why);
    if (b == LOOP_URING && rc)
        cr_skip_test("io_uring unavailable: %s", why ? why : "");
    cr_assert_eq(rc, 0);
    return l;
}

static void run(enum loop_backend b)
{
    struct loop *l = make_loop(b);
    if (!l)
        return;
    int a[2], c[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, a), 0);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, c), 0);
    struct probe pa = {a[0], 0, 0, l, NULL}, pc = {c[0], 0, 0, l, NULL};
    int ha, hc;
    cr_assert_eq(loop_add(l, a[0], LOOP_IN, cb, &pa, &ha), 0);
    cr_assert_eq(loop_add(l, c[0], LOOP_IN, cb, &pc, &hc), 0);
    cr_assert_eq(loop_wait(l, 50), 0); /* nothing ready */
    cr_assert_eq(write(a[1], "x", 1), 1);
    cr_assert_gt(loop_wait(l, 1000), 0);
    cr_assert_eq(pa.hits, 1);
    cr_assert(pa.last & LOOP_IN);
    cr_assert_eq(pc.hits, 0);
    /* every new arrival is reported again, several times over */
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(write(a[1], "y", 1), 1);
        cr_assert_gt(loop_wait(l, 1000), 0);
    }
    cr_assert_eq(pa.hits, 6);
    /* write interest */
    cr_assert_eq(loop_set(l, hc, LOOP_IN | LOOP_OUT), 0);
    cr_assert_gt(loop_wait(l, 1000), 0);
    cr_assert(pc.last & LOOP_OUT);
    cr_assert_eq(loop_set(l, hc, LOOP_IN), 0);
    /* both ready in one batch; the first callback removes the other: it must not run */
    pa.victim = &hc, pc.victim = &ha;
    int before_a = pa.hits, before_c = pc.hits;
    cr_assert_eq(write(a[1], "z", 1), 1);
    cr_assert_eq(write(c[1], "z", 1), 1);
    usleep(10000);
    loop_wait(l, 1000);
    cr_assert_eq((pa.hits - before_a) + (pc.hits - before_c), 1, "a removed watch fired");
    /* hang-up is reported: a fresh wakeup of the survivor's callback, with nothing to read
     * before the close (a stale LOOP_IN from the write above cannot pass for it) */
    struct probe *sv = pa.hits > before_a ? &pa : &pc;
    int peer = sv == &pa ? a[1] : c[1];
    cr_assert_eq(loop_wait(l, 50), 0, "nothing is pending before the hang-up");
    int before = sv->hits;
    sv->last = 0;
    close(peer);
    cr_assert_gt(loop_wait(l, 1000), 0, "the hang-up woke the loop");
    cr_assert_gt(sv->hits, before, "the hang-up reached the callback");
    cr_assert(sv->last & (LOOP_IN | LOOP_ERR), "a hang-up reads as LOOP_IN or LOOP_ERR (%#x)", sv->last);
    printf("%s backend ok\n", b == LOOP_URING ? "io_uring" : "epoll");
    close(a[0]), close(c[0]), close(sv == &pa ? c[1] : a[1]);
    loop_destroy(l);
}

Test(loop, epoll_backend) { run(LOOP_EPOLL); }
Test(loop, io_uring_backend) { run(LOOP_URING); }

/* A watch removed while its wakeup is pending (the peer wrote just before caked dropped the
 * connection) must not keep the socket alive once closed: the peer sees it closed at once. With
 * io_uring's deferred task work the wakeup owns the poll until the next wait, and a
 * POLL_REMOVE issued then failed with -EALREADY, leaving the poll armed and the closed socket
 * open: the peer waited forever. */
static void removal_while_pending(enum loop_backend b)
{
    struct loop *l = make_loop(b);
    if (!l)
        return;
    for (int round = 0; round < 20; round++) {
        int a[2];
        cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, a), 0);
        struct probe pa = {a[0], 0, 0, l, NULL};
        int h;
        cr_assert_eq(loop_add(l, a[0], LOOP_IN, cb, &pa, &h), 0);
        cr_assert_eq(loop_wait(l, 0), 0); /* the watch is armed, nothing ready */
        cr_assert_eq(write(a[1], "x", 1), 1); /* a wakeup, not yet reaped */
        loop_del(l, h);
        close(a[0]);
        for (int i = 0; i < 3; i++)
            loop_wait(l, 10);
        cr_assert_eq(pa.hits, 0, "a removed watch reported");
        char c;
        ssize_t n = recv(a[1], &c, 1, MSG_DONTWAIT);
        int e = n < 0 ? errno : 0;
        /* closed with unread data: ECONNRESET; EAGAIN would mean the socket still lives */
        cr_assert(n == 0 || e == ECONNRESET,
                  "round %d: the peer of a closed socket got %zd (%s), not EOF", round, n,
                  strerror(e));
        close(a[1]);
    }
    loop_destroy(l);
}

Test(loop, epoll_removal_while_pending) { removal_while_pending(LOOP_EPOLL); }
Test(loop, io_uring_removal_while_pending) { removal_while_pending(LOOP_URING); }
