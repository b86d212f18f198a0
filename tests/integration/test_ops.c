/* caked as a systemd service: readiness, reload and stopping told to the service manager
 * (sd_notify: READY=1 with the socket in STATUS, RELOADING=1 then READY=1 on SIGHUP,
 * STOPPING=1 on SIGTERM), the watchdog (WATCHDOG=1 while the workers move, withheld while a
 * job is stuck), and socket activation (the listening socket passed as fd 3 is
 * served, its path reported, and never removed: it is the socket unit's). */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cake/cake.h"
#include "harness.h"

/* The next notification on the datagram socket fd (within 10 s), or "" */
static void next_note(int fd, char *buf, size_t len)
{
    struct pollfd p = {fd, POLLIN, 0};
    buf[0] = 0;
    if (poll(&p, 1, 10000) == 1) {
        ssize_t n = recv(fd, buf, len - 1, 0);
        buf[n > 0 ? n : 0] = 0;
    }
}

/* A datagram socket at DIR/notify standing for systemd's (path: its address), bound. */
static int notify_socket(char *dir, char *path, size_t len)
{
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, len, "%s/notify", dir);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

/* caked told to notify `path`, with a watchdog of wd_usec (NULL: none) and every worker job
 * held job_ms (NULL: not held); the environment as it was after. */
static void start_notifying(struct harness *h, const char *path, const char *wd_usec,
                            const char *job_ms, const char *const *extra)
{
    setenv("NOTIFY_SOCKET", path, 1);
    if (wd_usec)
        setenv("WATCHDOG_USEC", wd_usec, 1);
    if (job_ms)
        setenv("CAKED_TEST_JOB_DELAY_MS", job_ms, 1);
    int started = harness_start(h, extra);
    unsetenv("NOTIFY_SOCKET"), unsetenv("WATCHDOG_USEC"), unsetenv("CAKED_TEST_JOB_DELAY_MS");
    cr_assert_eq(started, 0);
}

Test(ops, tells_systemd_ready_reloading_and_stopping, .timeout = 60)
{
    char dir[] = "/tmp/caked-notify-XXXXXX", path[64], conf[64];
    int fd = notify_socket(dir, path, sizeof path);
    snprintf(conf, sizeof conf, "%s/caked.conf", dir);
    FILE *f = fopen(conf, "w");
    cr_assert_not_null(f);
    fprintf(f, "tenant svc weight=2\n");
    fclose(f);
    chmod(conf, 0600);
    struct harness h;
    const char *extra[] = {"--config", conf, NULL};
    start_notifying(&h, path, NULL, NULL, extra);
    char note[512];
    next_note(fd, note, sizeof note);
    cr_assert(strstr(note, "READY=1"), "first notification: %s", note);
    cr_assert(strstr(note, "STATUS=listening on ") && strstr(note, h.sock), "%s", note);
    char pid[32];
    snprintf(pid, sizeof pid, "MAINPID=%d", (int)h.pid);
    cr_assert(strstr(note, pid), "%s (want %s)", note, pid);
    kill(h.pid, SIGHUP);
    next_note(fd, note, sizeof note);
    cr_assert(strstr(note, "RELOADING=1"), "on SIGHUP: %s", note);
    next_note(fd, note, sizeof note);
    cr_assert(strstr(note, "READY=1"), "after the reload: %s", note);
    kill(h.pid, SIGTERM);
    next_note(fd, note, sizeof note);
    cr_assert(strstr(note, "STOPPING=1"), "on SIGTERM: %s", note);
    cr_assert_eq(harness_stop(&h), 0);
    close(fd);
    unlink(path), unlink(conf), rmdir(dir);
}

/* An engine's observe in its own thread: the call blocks while its job is held. */
struct observer {
    const char *sock;
    int rc;
    double t_done;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A note that is WATCHDOG=1: 1, and *gap grows to the time since the last one (*last). */
static int ping_seen(const char *note, double *last, double *gap)
{
    if (!strstr(note, "WATCHDOG=1"))
        return 0;
    double t = now_s();
    *gap = t - *last > *gap ? t - *last : *gap;
    *last = t;
    return 1;
}

static void *observe_one(void *arg)
{
    struct observer *o = arg;
    cake_ctx *c = harness_client(o->sock, "wd-engine", 1, 0);
    struct cake_layout lay = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64;
    cake_seq *s = NULL;
    o->rc = c ? cake_seq_open(c, &lay, &pol, 256, 4, &s) : -1;
    if (!o->rc)
        o->rc = cake_prefill_reserve(s, 0);
    if (!o->rc)
        o->rc = cake_prefill_observe(s, 0, NULL); /* its job sleeps CAKED_TEST_JOB_DELAY_MS */
    o->t_done = now_s();
    if (s)
        cake_seq_close(s);
    if (c)
        cake_destroy(c);
    return NULL;
}

/* WatchdogSec=0.4 s (WATCHDOG_USEC): WATCHDOG=1 comes at least every 0.4 s while the workers
 * are idle; a job held 2 s (CAKED_TEST_JOB_DELAY_MS, as a call that never returns would be)
 * shows in STATUS as running and old, and stops the pings once it is older than 0.4 s (so
 * systemd would restart caked), with one error line in the log; they resume when it ends. */
Test(ops, pings_the_watchdog_only_while_the_workers_move, .timeout = 60)
{
    char dir[] = "/tmp/caked-wd-XXXXXX", path[64];
    int fd = notify_socket(dir, path, sizeof path);
    struct harness h;
    start_notifying(&h, path, "400000", "2000", NULL);
    char note[512];
    double t0 = now_s(), last = t0, gap = 0;
    int pings = 0;
    while (now_s() - t0 < 1.0) { /* idle: pings at half the interval */
        next_note(fd, note, sizeof note);
        pings += ping_seen(note, &last, &gap);
    }
    cr_assert_geq(pings, 2, "%d pings in 1 s of a 0.4 s watchdog", pings);
    cr_assert_lt(gap, 0.4, "idle, the longest wait for a ping was %.2f s", gap);
    struct observer o = {.sock = h.sock};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, observe_one, &o), 0);
    usleep(1000000); /* the job is held, past the interval */
    unsigned running = 0, queued = 0;
    unsigned long long ran_us = 0, waited_us = 0;
    cr_assert_eq(harness_status_jobs(&h, &running, &ran_us, &queued, &waited_us), 0);
    cr_assert(running == 1 && ran_us >= 500000 && queued == 0 && waited_us == 0,
              "STATUS while held: %u running (%llu us), %u waiting (%llu us)", running, ran_us,
              queued, waited_us);
    /* no ping from 0.4 s after the job began until it ends (the notes of the held second
     * are read now: the last one came before the hold had lasted the interval) */
    double held_from = now_s();
    int late = 0;
    while (now_s() - held_from < 0.5) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 50) == 1) {
            next_note(fd, note, sizeof note);
            late += strstr(note, "WATCHDOG=1") != NULL && now_s() - held_from > 0.05;
        }
    }
    cr_assert_eq(late, 0, "%d pings while a job was held past the interval", late);
    pthread_join(th, NULL);
    cr_assert_eq(o.rc, 0, "the held observe completes");
    next_note(fd, note, sizeof note);
    cr_assert(strstr(note, "WATCHDOG=1") && now_s() - o.t_done < 1.0,
              "pings resume when the job ends: %s", note);
    kill(h.pid, SIGTERM);
    char log[8192] = "";
    FILE *f = fopen(h.log, "r");
    if (f) {
        size_t n = fread(log, 1, sizeof log - 1, f);
        log[n] = 0;
        fclose(f);
    }
    cr_assert_not_null(strstr(log, "systemd is no longer told caked is alive"), "%s", log);
    cr_assert_not_null(strstr(log, "watchdog pings resume"), "%s", log);
    cr_assert_eq(harness_stop(&h), 0);
    close(fd);
    unlink(path), rmdir(dir);
}

/* A long queue is load, not a hang: one worker, each job held 0.2 s, ten engines observing
 * at once (from 0.6 s to ~1.8 s some job has waited past the 0.6 s watchdog, while none runs
 * longer than 0.2 s): STATUS shows jobs waiting longer than the interval, and WATCHDOG=1
 * keeps coming (counting the waits too, the pings stopped for over a second). */
Test(ops, a_long_queue_does_not_stop_the_watchdog, .timeout = 60)
{
    char dir[] = "/tmp/caked-wdq-XXXXXX", path[64];
    int fd = notify_socket(dir, path, sizeof path);
    struct harness h;
    const char *extra[] = {"--workers", "1", NULL};
    start_notifying(&h, path, "600000", "200", extra);
    enum { E = 10 };
    struct observer o[E];
    pthread_t th[E];
    for (int i = 0; i < E; i++) {
        o[i] = (struct observer){.sock = h.sock};
        cr_assert_eq(pthread_create(&th[i], NULL, observe_one, &o[i]), 0);
    }
    char note[512];
    double t0 = now_s(), last = t0, gap = 0;
    unsigned long long waited_max = 0;
    int pings = 0;
    while (now_s() - t0 < 2.5) { /* the queue drains in ~2 s */
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 50) == 1) {
            next_note(fd, note, sizeof note);
            pings += ping_seen(note, &last, &gap);
        }
        unsigned running, queued;
        unsigned long long ran_us, waited_us;
        if (!harness_status_jobs(&h, &running, &ran_us, &queued, &waited_us))
            waited_max = waited_us > waited_max ? waited_us : waited_max;
    }
    for (int i = 0; i < E; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(o[i].rc, 0, "observe %d", i);
    }
    cr_assert_gt(waited_max, 600000, "a job waited past the interval (%llu us at most)", waited_max);
    cr_assert_geq(pings, 5, "%d pings in 2.5 s", pings);
    cr_assert_lt(gap, 0.6, "the longest wait for a ping was %.2f s", gap);
    kill(h.pid, SIGTERM);
    cr_assert_eq(harness_stop(&h), 0);
    close(fd);
    unlink(path), rmdir(dir);
}

Test(ops, serves_the_socket_systemd_passes, .timeout = 60)
{
    char dir[] = "/tmp/caked-activate-XXXXXX", path[64], unused[64];
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/caked.sock", dir);
    snprintf(unused, sizeof unused, "%s/never/caked.sock", dir);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    cr_assert_eq(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(l, 16), 0);
    pid_t p = fork();
    if (p == 0) { /* as systemd does: the socket at fd 3, LISTEN_PID the service's own */
        if (dup2(l, 3) < 0)
            _exit(126);
        char pidv[32];
        snprintf(pidv, sizeof pidv, "%d", (int)getpid());
        setenv("LISTEN_FDS", "1", 1), setenv("LISTEN_PID", pidv, 1);
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 2);
        execl(harness_caked_bin(), harness_caked_bin(), "--socket", unused, "--host-pool", "64M",
              "--workers", "1", (char *)NULL);
        _exit(127);
    }
    close(l);
    cake_ctx *c = NULL;
    int rc = -1;
    for (int i = 0; i < 200 && rc; i++) {
        cake_destroy(c);
        cake_create(&c);
        if ((rc = cake_connect(c, path, 1)))
            usleep(20000);
    }
    cr_assert_eq(rc, 0, "caked did not serve the passed socket: %s", cake_errstr(c));
    cr_assert_eq(cake_ping(c), 0);
    struct cake_layout lay = {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64,
                              .dtype = CAKE_BF16};
    cake_seq *s;
    cr_assert_eq(cake_seq_open(c, &lay, NULL, 100, 0, &s), 0, "%s", cake_errstr(c));
    cr_assert_eq(cake_seq_close(s), 0);
    cake_destroy(c);
    struct stat st;
    cr_assert_neq(stat(unused, &st), 0, "--socket was ignored: the unit's socket is served");
    kill(p, SIGTERM);
    int ws;
    cr_assert_eq(waitpid(p, &ws, 0), p);
    cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "caked exited %d", ws);
    cr_assert_eq(stat(path, &st), 0, "the socket unit's socket is not caked's to remove");
    cr_assert(S_ISSOCK(st.st_mode));
    unlink(path), rmdir(dir);
}

/* What operators look for, logged once each: an engine attaching (tenant, uid, pid) and
 * leaving (sequences freed); refusals for lack of memory at warning level, at most one line a
 * second per tenant, the next one saying how many went unlogged; --log-level filters. */
static int count_lines(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    char line[1024];
    int n = 0;
    while (f && fgets(line, sizeof line, f))
        n += strstr(line, needle) != NULL;
    if (f)
        fclose(f);
    return n;
}

static void refuse_many(const char *sock)
{
    cake_ctx *c = harness_client(sock, "logger", 1, 0);
    cr_assert_not_null(c);
    struct cake_layout big = {.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                              .dtype = CAKE_BF16}; /* 8 MiB of query rings: over the 8 MiB pool */
    cake_seq *s;
    for (int i = 0; i < 20; i++)
        cr_assert_eq(cake_seq_open(c, &big, NULL, 4096, 0, &s), CAKE_EOOM);
    usleep(1100000);
    cr_assert_eq(cake_seq_open(c, &big, NULL, 4096, 0, &s), CAKE_EOOM);
    cake_destroy(c);
}

Test(ops, logs_attaches_departures_and_refusals_once_a_second, .timeout = 60)
{
    static const char *const levels[] = {NULL, "warning", "error"};
    for (int k = 0; k < 3; k++) {
        struct harness h;
        const char *extra[] = {"--host-pool", "8M", levels[k] ? "--log-level" : NULL, levels[k], NULL};
        cr_assert_eq(harness_start(&h, extra), 0);
        refuse_many(h.sock);
        for (int i = 0; i < 100 && k == 0 && !count_lines(h.log, "of tenant logger left"); i++)
            usleep(20000); /* caked notices the departure on its own schedule */
        usleep(100000);
        int attached = count_lines(h.log, "attached: tenant logger (uid");
        int left = count_lines(h.log, "of tenant logger left: 0 sequences freed");
        int oom = count_lines(h.log, "warning: tenant logger: out of memory (CAKE_EOOM)");
        int more = count_lines(h.log, "tenant logger: 19 more refusals in the second before");
        if (k == 0) {
            cr_assert_eq(attached, 1, "info: the engine's attach, once");
            cr_assert_eq(left, 1, "info: its departure, once");
        } else {
            cr_assert_eq(attached + left, 0, "%s: no info lines", levels[k]);
        }
        if (k < 2) {
            cr_assert_eq(oom, 2, "21 refusals in two bursts a second apart: two lines (%d)", oom);
            cr_assert_eq(more, 1, "and how many went unlogged");
        } else {
            cr_assert_eq(oom + more, 0, "error level: no warnings");
        }
        cr_assert_eq(harness_stop(&h), 0);
    }
}
