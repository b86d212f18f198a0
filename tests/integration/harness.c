/* harness.c - see harness.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../proto/frame.h"
#include "cake.pb-c.h"
#include "cake/cake.h"
#include "harness.h"
#include "internal.h"

int harness_start(struct harness *h, const char *const *extra)
{
    memset(h, 0, sizeof(*h));
    snprintf(h->dir, sizeof h->dir, "/tmp/caked-test-XXXXXX");
    if (!mkdtemp(h->dir))
        return -1;
    /* in a directory caked creates itself (0700, or 0710 for its --socket-group) */
    snprintf(h->sock, sizeof h->sock, "%s/run/caked.sock", h->dir);
    for (int i = 0; extra && extra[i] && extra[i + 1]; i++) /* the test's own --socket wins */
        if (!strcmp(extra[i], "--socket"))
            snprintf(h->sock, sizeof h->sock, "%s", extra[i + 1]);
    snprintf(h->log, sizeof h->log, "%s/caked.log", h->dir);
    const char *io = getenv("CAKE_TEST_IO");
    const char *argv[32] = {CAKED_BIN, "--socket", h->sock, "--host-pool", "256M", "--workers", "2"};
    int n = 7;
    if (io && *io)
        argv[n++] = "--io", argv[n++] = io;
    for (int i = 0; extra && extra[i] && n < 30; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    h->pid = fork();
    if (h->pid < 0)
        return -1;
    if (h->pid == 0) {
        /* a test that dies or times out takes its caked along (no daemons left spinning) */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(h->log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0)
            dup2(fd, 2), dup2(fd, 1);
        /* CAKE_TEST_CAKED_WRAP: a command caked runs under (compute-sanitizer, valgrind) */
        const char *wrap = getenv("CAKE_TEST_CAKED_WRAP");
        if (wrap && *wrap) {
            char cmd[512];
            snprintf(cmd, sizeof cmd, "exec %s \"$@\"", wrap);
            const char *wv[40] = {"/bin/sh", "-c", cmd, "caked"};
            for (int i = 0; i <= n; i++)
                wv[4 + i] = argv[i];
            execv("/bin/sh", (char *const *)wv);
        }
        execv(CAKED_BIN, (char *const *)argv);
        _exit(127);
    }
    int tries = getenv("CAKE_TEST_CAKED_WRAP") ? 3000 : 200; /* wrapped: slow to start */
    for (int i = 0; i < tries; i++) {
        cake_ctx *c;
        cake_create(&c);
        int rc = cake_connect(c, h->sock, 0);
        cake_destroy(c);
        if (rc == 0)
            return 0;
        int st;
        if (waitpid(h->pid, &st, WNOHANG) == h->pid) {
            char buf[512] = "";
            FILE *f = fopen(h->log, "r");
            if (f) {
                size_t k = fread(buf, 1, sizeof buf - 1, f);
                buf[k] = 0;
                fclose(f);
            }
            if (io && !strcmp(io, "uring") && strstr(buf, "io_uring")) {
                printf("SKIP: io_uring is not usable here: %s\n", buf);
                exit(77);
            }
            fprintf(stderr, "caked exited at start: %s\n", buf);
            return -1;
        }
        usleep(20000);
    }
    return -1;
}

cake_ctx *harness_client(const char *sock, const char *service, int map_pool, int admin)
{
    cake_ctx *c;
    if (cake_create(&c))
        return NULL;
    cake_set_service(c, service);
    cake_set_admin(c, admin);
    if (cake_connect(c, sock, map_pool)) {
        fprintf(stderr, "%s: %s\n", service, cake_errstr(c));
        cake_destroy(c);
        return NULL;
    }
    return c;
}

const char *harness_caked_bin(void)
{
    return CAKED_BIN;
}

int harness_stop(struct harness *h)
{
    int st = 0;
    /* wrapped: SIGTERM goes to caked itself (the wrapper's child), so the wrapper sees caked
     * exit on its own and reports */
    char path[64], kids[256] = "";
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)h->pid, (int)h->pid);
    const char *wrap = getenv("CAKE_TEST_CAKED_WRAP");
    int wrapped = wrap && *wrap;
    FILE *f = wrapped ? fopen(path, "r") : NULL;
    if (f) {
        if (!fgets(kids, sizeof kids, f))
            kids[0] = 0;
        fclose(f);
    }
    int child = atoi(kids);
    kill(child > 0 ? child : h->pid, SIGTERM);
    waitpid(h->pid, &st, 0);
    if (getenv("CAKE_TEST_SHOW_LOG") && (f = fopen(h->log, "r"))) { /* caked's own words */
        char line[512];
        while (fgets(line, sizeof line, f))
            fprintf(stderr, "caked log: %s", line);
        fclose(f);
    }
    unlink(h->log);
    unlink(h->sock); /* gone already unless caked died */
    char run[200];
    snprintf(run, sizeof run, "%s/run", h->dir);
    rmdir(run);
    rmdir(h->dir);
    if (wrapped) /* the wrapper's own report (its log) is the verdict on how caked ran */
        return 0;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int harness_status(const struct harness *h, unsigned long long *pages_used, unsigned *seqs)
{
    unsigned long long g;
    return harness_status_gpu(h, pages_used, seqs, &g);
}

/* One STATUS request: what the tests read of it. 0 or -1. */
struct status_fields {
    unsigned long long pages_used, gpu_pages_used, running_us, queued_us;
    unsigned seqs, running, queued;
};

static int status_read(const struct harness *h, struct status_fields *f)
{
    cake_ctx *c;
    cake_create(&c);
    uint8_t *b;
    size_t n;
    Cake__Status *s = NULL;
    ProtobufCAllocator al = cake_internal_allocator(c);
    if (!cake_connect(c, h->sock, 0) && !cake_internal_rpc(c, MSG_STATUS, NULL, &b, &n)) {
        s = cake__status__unpack(&al, n, b);
        cake_internal_free(c, b);
    }
    if (s) {
        *f = (struct status_fields){
            .pages_used = s->pages_used, .gpu_pages_used = s->gpu_pages_used,
            .running_us = s->longest_running_us, .queued_us = s->oldest_queued_us,
            .seqs = s->sequences, .running = s->jobs_running, .queued = s->jobs_queued};
        cake__status__free_unpacked(s, &al);
    }
    cake_destroy(c);
    return s ? 0 : -1;
}

int harness_status_jobs(const struct harness *h, unsigned *running, unsigned long long *running_us,
                        unsigned *queued, unsigned long long *queued_us)
{
    struct status_fields f;
    if (status_read(h, &f))
        return -1;
    *running = f.running, *running_us = f.running_us, *queued = f.queued, *queued_us = f.queued_us;
    return 0;
}

int harness_status_gpu(const struct harness *h, unsigned long long *pages_used, unsigned *seqs,
                       unsigned long long *gpu_pages_used)
{
    struct status_fields f;
    if (status_read(h, &f))
        return -1;
    *pages_used = f.pages_used, *seqs = f.seqs, *gpu_pages_used = f.gpu_pages_used;
    return 0;
}

double harness_metric(const char *sock, const char *name)
{
    const char *ctl = getenv("CACHECTL_BIN");
    char cmd[1024], line[512];
    double v = -1;
    if (!ctl)
        return -1;
    snprintf(cmd, sizeof cmd, "%s --socket %s metrics", ctl, sock);
    FILE *f = popen(cmd, "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, name, strlen(name)) && line[strlen(name)] == ' ')
            v = atof(line + strlen(name) + 1);
    if (f)
        pclose(f);
    return v;
}
