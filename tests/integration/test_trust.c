/* Trust boundaries, tried as an attacker on the same host would: a user who can create
 * directories in /tmp, a process of another uid admitted by --socket-group, a process of the
 * same uid that declares another service's name, a rank whose group ended under it, and a
 * fake server. What each test shows is in its name; each failed on the tree before the
 * per-tenant segments (proto/README.md "Threat model"). Needs root to act as other uids
 * (CI runs as root); without it those tests say so and skip. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

#define NOBODY 65534

static void need_root(void)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to act as another uid");
}

static cake_ctx *engine(const char *sock, const char *name)
{
    cake_ctx *c = harness_client(sock, name, 1, 0);
    cr_assert_not_null(c);
    return c;
}

static cake_ctx *control(const char *sock, int admin)
{
    cake_ctx *c = harness_client(sock, "cachectl", 0, admin);
    cr_assert_not_null(c);
    return c;
}

/* Runs caked with a socket path and extra arguments, expecting it to refuse to start; returns
 * its exit status and what it logged. */
static int caked_refuses(const char *sock, const char *extra, char *log, size_t len)
{
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    pid_t p = fork();
    if (p == 0) {
        dup2(pfd[1], 2);
        close(pfd[0]);
        const char *argv[] = {harness_caked_bin(), "--socket", sock, "--host-pool", "16M",
                              "--workers", "1", extra, NULL};
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    size_t got = 0;
    ssize_t k;
    for (int i = 0; i < 500; i++) { /* 10 s */
        int st;
        if (waitpid(p, &st, WNOHANG) == p) {
            while (got + 1 < len && (k = read(pfd[0], log + got, len - 1 - got)) > 0)
                got += (size_t)k;
            log[got] = 0;
            close(pfd[0]);
            return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        }
        usleep(20000);
    }
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    close(pfd[0]);
    cr_assert_fail("caked started on %s where it should have refused", sock);
    return -1;
}

static void mkdir_owned(const char *d, uid_t uid, mode_t mode)
{
    cr_assert_eq(mkdir(d, 0700), 0, "%s: %s", d, strerror(errno));
    cr_assert_eq(chown(d, uid, (gid_t)-1), 0);
    cr_assert_eq(chmod(d, mode), 0);
}

/* 1. A socket directory another user made (the default /tmp/caked-$UID/ can be made by
 * anyone first), or one others may write, is refused with the reason; nothing in it is
 * touched. */
Test(trust, caked_refuses_a_socket_directory_it_does_not_own, .timeout = 60)
{
    need_root();
    char top[] = "/tmp/caked-trust-XXXXXX", d[128], sock[160], log[2048];
    cr_assert_not_null(mkdtemp(top));
    snprintf(d, sizeof d, "%s/taken", top);
    mkdir_owned(d, NOBODY, 0755);
    snprintf(sock, sizeof sock, "%s/caked.sock", d);
    cr_assert_eq(caked_refuses(sock, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "owned by uid 65534"), "%s", log);
    struct stat st;
    cr_assert_neq(lstat(sock, &st), 0, "nothing was created in the attacker's directory");
    /* ours, but writable by others (the attacker swaps the socket after bind) */
    cr_assert_eq(chown(d, 0, (gid_t)-1), 0);
    cr_assert_eq(chmod(d, 0777), 0);
    cr_assert_eq(caked_refuses(sock, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "writable by others"), "%s", log);
    cr_assert_eq(chmod(d, 0770), 0);
    cr_assert_eq(caked_refuses(sock, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "writable by others"), "%s", log);
    /* a directory above it that another user owns could move ours away */
    char up[128], d2[160], sock2[200];
    snprintf(up, sizeof up, "%s/theirs", top);
    mkdir_owned(up, NOBODY, 0755);
    snprintf(d2, sizeof d2, "%s/ours", up);
    mkdir_owned(d2, 0, 0700);
    snprintf(sock2, sizeof sock2, "%s/caked.sock", d2);
    cr_assert_eq(caked_refuses(sock2, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "above the socket"), "%s", log);
    /* a directory caked would create there: refused before anything is made in it */
    char d3[200], sock3[240];
    snprintf(d3, sizeof d3, "%s/new", up);
    snprintf(sock3, sizeof sock3, "%s/caked.sock", d3);
    cr_assert_eq(caked_refuses(sock3, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "above the socket"), "%s", log);
    cr_assert_neq(lstat(d3, &st), 0, "caked made a directory in another user's");
    rmdir(d2), rmdir(up), rmdir(d), rmdir(top);
}

/* Quotas that add up: minimums over the pool would leave no one else anything; caked
 * refuses to start and names the numbers (it started, and refused every other open). */
Test(trust, minimums_over_the_pool_are_refused_at_start, .timeout = 60)
{
    char d[] = "/tmp/caked-trust-XXXXXX", sock[128], conf[160], log[2048];
    cr_assert_not_null(mkdtemp(d));
    snprintf(sock, sizeof sock, "%s/caked.sock", d);
    snprintf(conf, sizeof conf, "--config=%s/caked.conf", d);
    FILE *f = fopen(conf + 9, "w");
    fprintf(f, "tenant a min=10M\ntenant b uid=4242 min=10M\n");
    fclose(f);
    cr_assert_eq(caked_refuses(sock, conf, log, sizeof log), 1); /* a 16M pool */
    cr_assert(strstr(log, "minimums sum to 20971520 bytes"), "%s", log);
    f = fopen(conf + 9, "w");
    fprintf(f, "tenant a min=1T\n");
    fclose(f);
    cr_assert_eq(caked_refuses(sock, conf, log, sizeof log), 1);
    cr_assert(strstr(log, "over the host pool"), "%s", log);
    unlink(conf + 9), rmdir(d);
}

/* 1. caked removes only a stale socket of its own: a regular file, a symbolic link (to a
 * file root owns) or another uid's socket at the path are refused and left as they were. */
Test(trust, caked_removes_nothing_but_its_own_stale_socket, .timeout = 60)
{
    char d[] = "/tmp/caked-trust-XXXXXX", sock[128], log[2048], target[128];
    cr_assert_not_null(mkdtemp(d));
    snprintf(sock, sizeof sock, "%s/caked.sock", d);
    snprintf(target, sizeof target, "%s/precious", d);
    FILE *f = fopen(target, "w");
    fputs("keep me", f);
    fclose(f);
    chmod(target, 0600);
    cr_assert_eq(symlink(target, sock), 0);
    cr_assert_eq(caked_refuses(sock, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "symbolic link"), "%s", log);
    struct stat st;
    cr_assert_eq(lstat(sock, &st), 0);
    cr_assert(S_ISLNK(st.st_mode), "the link is still there");
    cr_assert_eq(stat(target, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0600, "its target's mode is untouched");
    unlink(sock);
    cr_assert_eq(rename(target, sock), 0); /* a regular file at the path */
    cr_assert_eq(caked_refuses(sock, "--io=epoll", log, sizeof log), 1);
    cr_assert(strstr(log, "not a socket"), "%s", log);
    f = fopen(sock, "r");
    char buf[16] = "";
    cr_assert(f && fgets(buf, sizeof buf, f));
    fclose(f);
    cr_assert_str_eq(buf, "keep me");
    unlink(sock);
    /* a stale socket of caked's own uid is replaced (a crash left it) */
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, sock);
    cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    close(s); /* bound, never listening: stale */
    struct harness h;
    const char *extra[] = {"--socket", sock, NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    /* harness_start waits on its own path; ask ours */
    cake_ctx *c = control(sock, 0);
    cr_assert_eq(cake_ping(c), 0);
    cake_destroy(c);
    /* at exit caked removes the socket only if it is still the one it bound */
    struct stat before;
    cr_assert_eq(lstat(sock, &before), 0);
    cr_assert_eq(unlink(sock), 0);
    f = fopen(sock, "w");
    fputs("replaced", f);
    fclose(f);
    kill(h.pid, SIGTERM);
    int stt;
    waitpid(h.pid, &stt, 0);
    cr_assert_eq(lstat(sock, &st), 0, "a file that replaced the socket survives caked's exit");
    cr_assert(S_ISREG(st.st_mode));
    unlink(sock);
    unlink(h.log);
    char run[200];
    snprintf(run, sizeof run, "%s/run", h.dir);
    rmdir(run), rmdir(h.dir), rmdir(d);
}

/* 1. With --socket-group, the directory caked creates lets the group reach the socket
 * (0710, that group) and the socket is born 0660 with that group; an existing directory the
 * group cannot search is refused with the reason. */
Test(trust, socket_group_modes_are_set_at_birth_and_reachable, .timeout = 60)
{
    need_root();
    char top[] = "/tmp/caked-trust-XXXXXX", sock[128], log[2048];
    cr_assert_not_null(mkdtemp(top));
    chmod(top, 0755);
    snprintf(sock, sizeof sock, "%s/made/caked.sock", top);
    struct harness h;
    const char *extra[] = {"--socket", sock, "--socket-group", "nogroup", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    struct group *g = getgrnam("nogroup");
    cr_assert_not_null(g);
    char made[128];
    snprintf(made, sizeof made, "%s/made", top);
    struct stat st;
    cr_assert_eq(stat(made, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0710);
    cr_assert_eq(st.st_gid, g->gr_gid);
    cr_assert_eq(lstat(sock, &st), 0);
    cr_assert(S_ISSOCK(st.st_mode));
    cr_assert_eq(st.st_mode & 0777, 0660);
    cr_assert_eq(st.st_gid, g->gr_gid);
    /* a member of the group that is not root connects and works as an engine */
    pid_t p = fork();
    if (p == 0) {
        gid_t gg = g->gr_gid;
        if (setgroups(1, &gg) || setgid(gg) || setuid(NOBODY))
            _exit(10);
        cake_ctx *c;
        cake_create(&c);
        cake_set_service(c, "member");
        if (cake_connect(c, sock, 1))
            _exit(11);
        _exit(cake_ping(c) ? 12 : 0);
    }
    int stt;
    waitpid(p, &stt, 0);
    cr_assert(WIFEXITED(stt) && WEXITSTATUS(stt) == 0, "group member: %d", WEXITSTATUS(stt));
    kill(h.pid, SIGTERM);
    waitpid(h.pid, &stt, 0);
    cr_assert(WIFEXITED(stt) && WEXITSTATUS(stt) == 0);
    unlink(h.log);
    char run[200];
    snprintf(run, sizeof run, "%s/run", h.dir);
    rmdir(run), rmdir(h.dir);
    /* an existing 0700 directory: the group could not reach the socket */
    cr_assert_eq(chmod(made, 0700), 0);
    cr_assert_eq(caked_refuses(sock, "--socket-group=nogroup", log, sizeof log), 1);
    cr_assert(strstr(log, "cannot reach"), "%s", log);
    rmdir(made), rmdir(top);
}

/* A server that listens on the path engines use, as another uid: libcake reads its uid from
 * the kernel before sending anything and refuses it, unless told that uid is caked's. */
Test(trust, libcake_refuses_a_server_of_another_uid_before_hello, .timeout = 60)
{
    need_root();
    char d[] = "/tmp/caked-trust-XXXXXX", sock[128];
    cr_assert_not_null(mkdtemp(d));
    chmod(d, 0777 | S_ISVTX);
    snprintf(sock, sizeof sock, "%s/caked.sock", d);
    int ready[2], got[2];
    cr_assert_eq(pipe(ready), 0);
    cr_assert_eq(pipe(got), 0);
    pid_t p = fork();
    if (p == 0) { /* the impostor */
        if (setgid(NOBODY) || setuid(NOBODY))
            _exit(10);
        int l = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strcpy(a.sun_path, sock);
        umask(0);
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4))
            _exit(11);
        if (write(ready[1], "r", 1) != 1)
            _exit(12);
        for (int i = 0; i < 2; i++) {
            int c = accept(l, NULL, NULL);
            char buf[64];
            ssize_t n = read(c, buf, sizeof buf); /* what the client sent before hanging up */
            char r = n > 0 ? 'H' : '0';
            if (write(got[1], &r, 1) != 1)
                _exit(13);
            close(c);
        }
        _exit(0);
    }
    char r;
    cr_assert_eq(read(ready[0], &r, 1), 1);
    cake_ctx *c;
    cake_create(&c);
    cr_assert_eq(cake_connect(c, sock, 1), CAKE_EPERM);
    cr_assert(strstr(cake_errstr(c), "runs as uid 65534"), "%s", cake_errstr(c));
    cr_assert_eq(read(got[0], &r, 1), 1);
    cr_assert_eq(r, '0', "the impostor received nothing");
    cake_destroy(c);
    /* told that caked runs as 65534, libcake goes on (and the impostor sees HELLO) */
    cake_create(&c);
    cake_set_server_uid(c, NOBODY);
    cake_set_timeout_ms(c, 2000);
    cr_assert_neq(cake_connect(c, sock, 1), CAKE_EPERM);
    cr_assert_eq(read(got[0], &r, 1), 1);
    cr_assert_eq(r, 'H');
    cake_destroy(c);
    waitpid(p, NULL, 0);
    unlink(sock), rmdir(d);
}

/* Fills every K and V row of a host sequence's prompt with a pattern of its own. */
static void fill_layer(cake_seq *s, uint32_t layer, uint32_t kv, uint32_t n, size_t row, uint8_t v)
{
    for (uint32_t g = 0; g < kv; g++)
        for (uint32_t t = 0; t < n; t++) {
            memset(cake_key(s, layer, g, t), v, row);
            memset(cake_value(s, layer, g, t), v ^ 0xff, row);
        }
}

/* How many bytes of everything this process maps of the pool hold v. */
static size_t count_mapped_bytes(cake_ctx *c, uint8_t v, size_t *mapped)
{
    uint8_t *b = cake_pool_base(c);
    size_t n = 0, m = 0;
    for (size_t off = 0; off < cake_pool_bytes(c); off += 4096)
        if (cake_pool_mapped(c, b + off, 4096)) {
            m += 4096;
            for (size_t i = 0; i < 4096; i++)
                n += b[off + i] == v;
        }
    *mapped = m;
    return n;
}

/* 2. Every client used to map the whole pool: now a client maps only its tenant's segments.
 * The victim's K/V, descriptor and page table are nowhere in the attacker's memory (same uid
 * with another service name, and another uid); what the attacker does to all it maps (scans,
 * overwrites, punches holes) leaves the victim's rows byte-exact. */
static void attack(const char *sock, uid_t as_uid, const char *victim_name)
{
    cake_ctx *v = engine(sock, victim_name);
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.kind = CAKE_POLICY_FULL;
    cake_seq *s;
    const uint32_t n = 700;
    cr_assert_eq(cake_seq_open(v, &lay, &pol, n, 8, &s), 0, "%s", cake_errstr(v));
    cr_assert_eq(cake_prefill_reserve(s, 0), 0, "%s", cake_errstr(v));
    fill_layer(s, 0, 2, n, 128, 0xa7);
    uint64_t id = cake_seq_id(s);
    pid_t p = fork();
    if (p == 0) {
        if (as_uid) {
            gid_t gg = 0;
            if (setgroups(1, &gg) || setgid(0) || setuid(as_uid))
                _exit(10);
        }
        cake_ctx *a;
        cake_create(&a);
        cake_set_service(a, "attacker");
        if (cake_connect(a, sock, 1))
            _exit(11);
        /* an attacker with sequences of its own: its tenant holds segments too */
        cake_seq *mine;
        if (cake_seq_open(a, &lay, &pol, n, 8, &mine) || cake_prefill_reserve(mine, 0))
            _exit(12);
        size_t mapped = 0;
        if (count_mapped_bytes(a, 0xa7, &mapped) != 0 || count_mapped_bytes(a, 0x58, &mapped) != 0)
            _exit(13); /* not one byte of the victim's K or V */
        if (mapped == 0 || mapped >= cake_pool_bytes(a))
            _exit(14);
        uint8_t *b = cake_pool_base(a);
        for (size_t off = 0; off + sizeof(struct shm_desc) <= cake_pool_bytes(a); off += 4096) {
            const struct shm_desc *d = (const void *)(b + off);
            if (cake_pool_mapped(a, d, sizeof *d) && d->magic == SHM_DESC_MAGIC && d->seq_id == id)
                _exit(15); /* the victim's descriptor (and page table) */
        }
        /* everything it maps: overwritten, then punched out */
        for (size_t off = 0; off < cake_pool_bytes(a); off += 4096)
            if (cake_pool_mapped(a, b + off, 4096)) {
                memset(b + off, 0x11, 4096);
                madvise(b + off, 4096, MADV_REMOVE);
            }
        /* the victim's sequence by id: unknown to another tenant */
        Cake__SeqRef r = CAKE__SEQ_REF__INIT;
        r.seq_id = id;
        uint8_t *body;
        size_t bn;
        if (cake_internal_rpc(a, MSG_SEQ_CLOSE, &r.base, &body, &bn) != CAKE_ENOSEQ)
            _exit(16);
        _exit(0);
    }
    int st;
    waitpid(p, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "attacker check %d failed", WEXITSTATUS(st));
    for (uint32_t g = 0; g < 2; g++)
        for (uint32_t t = 0; t < n; t++) {
            const uint8_t *k = cake_key(s, 0, g, t), *vv = cake_value(s, 0, g, t);
            for (int i = 0; i < 128; i++) {
                cr_assert_eq(k[i], 0xa7, "victim key %u/%u changed", g, t);
                cr_assert_eq(vv[i], 0x58, "victim value %u/%u changed", g, t);
            }
        }
    cr_assert_eq(cake_prefill_observe(s, 0, NULL), 0, "%s", cake_errstr(v));
    cr_assert_eq(cake_seq_close(s), 0);
    cake_destroy(v);
}

Test(trust, another_service_of_the_same_uid_cannot_see_or_touch_kv, .timeout = 60)
{
    struct harness h;
    cr_assert_eq(harness_start(&h, NULL), 0);
    attack(h.sock, 0, "victim");
    cr_assert_eq(harness_stop(&h), 0);
}

Test(trust, another_uid_cannot_see_or_touch_kv, .timeout = 60)
{
    need_root();
    struct harness h;
    const char *extra[] = {"--socket-group", "root", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    chmod(h.dir, 0755);
    attack(h.sock, NOBODY, "victim");
    cr_assert_eq(harness_stop(&h), 0);
}

/* 3. Identities: a connection acts only on sequences it opened (another connection of the
 * same uid and service name cannot close them); configured tenants admit only their uids;
 * an engine is no administrator, and a non-administrator's METRICS and TENANTS show its own
 * tenant only. */
Test(trust, identities_are_proven_and_administration_is_a_right, .timeout = 60)
{
    need_root();
    char conf[] = "/tmp/caked-trust-conf-XXXXXX";
    int fd = mkstemp(conf);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "tenant pinned uid=4242 weight=2\ntenant rooted weight=3\n");
    fclose(f);
    struct harness h;
    const char *extra[] = {"--socket-group", "root", "--config", conf, NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    chmod(h.dir, 0755);
    cake_ctx *a = engine(h.sock, "rooted"); /* root may be "rooted" (caked's own uid) */
    struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    cake_seq *s;
    cr_assert_eq(cake_seq_open(a, &lay, NULL, 300, 8, &s), 0, "%s", cake_errstr(a));
    /* the same uid, the same service name, another connection: cannot act on it */
    cake_ctx *twin = engine(h.sock, "rooted");
    Cake__SeqRef r = CAKE__SEQ_REF__INIT;
    r.seq_id = cake_seq_id(s);
    Cake__LayerRef lr = CAKE__LAYER_REF__INIT;
    lr.seq_id = cake_seq_id(s);
    uint8_t *body;
    size_t n;
    cr_assert_eq(cake_internal_rpc(twin, MSG_SEQ_CLOSE, &r.base, &body, &n), CAKE_ENOSEQ);
    cr_assert_eq(cake_internal_rpc(twin, MSG_PREFILL_RESERVE, &lr.base, &body, &n), CAKE_ENOSEQ);
    cr_assert_eq(cake_prefill_reserve(s, 0), 0, "%s", cake_errstr(a));
    /* an engine (of caked's own uid) asking nothing is no administrator */
    Cake__SetQuota q = CAKE__SET_QUOTA__INIT;
    q.tenant = (char *)"rooted", q.max_bytes = 65536, q.has_max = 1;
    cr_assert_eq(cake_internal_rpc(a, MSG_SET_QUOTA, &q.base, &body, &n), CAKE_EPERM);
    pid_t p = fork();
    if (p == 0) {
        gid_t gg = 0;
        if (setgroups(1, &gg) || setgid(0) || setuid(NOBODY))
            _exit(10);
        cake_ctx *c;
        cake_create(&c);
        cake_set_service(c, "pinned"); /* configured for uid 4242 only */
        if (cake_connect(c, h.sock, 1) != CAKE_EPERM || !strstr(cake_errstr(c), "configured"))
            _exit(11);
        cake_destroy(c);
        cake_create(&c);
        cake_set_service(c, "own-one");
        cake_set_admin(c, 1); /* asked for, not granted */
        if (cake_connect(c, h.sock, 1))
            _exit(12);
        if (cake_internal_rpc(c, MSG_SET_QUOTA, &q.base, &body, &n) != CAKE_EPERM)
            _exit(13);
        if (cake_internal_rpc(c, MSG_METRICS, NULL, &body, &n))
            _exit(14);
        ProtobufCAllocator al = cake_internal_allocator(c);
        Cake__Metrics *m = cake__metrics__unpack(&al, n, body);
        if (!m || strstr(m->text, "tenant=\"rooted\"") || !strstr(m->text, "tenant=\"own-one\""))
            _exit(15);
        if (cake_internal_rpc(c, MSG_TENANTS, NULL, &body, &n))
            _exit(16);
        Cake__TenantList *tl = cake__tenant_list__unpack(&al, n, body);
        if (!tl || tl->n_tenants != 1 || strcmp(tl->tenants[0]->name, "own-one"))
            _exit(17);
        _exit(0);
    }
    int st;
    waitpid(p, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "non-admin check %d failed", WEXITSTATUS(st));
    /* an administrator sees every tenant and sets quotas, touching only the fields given */
    cake_ctx *adm = control(h.sock, 1);
    cr_assert_eq(cake_internal_rpc(adm, MSG_SET_QUOTA, &q.base, &body, &n), 0, "%s", cake_errstr(adm));
    cake_internal_free(adm, body);
    cr_assert_eq(cake_internal_rpc(adm, MSG_TENANTS, NULL, &body, &n), 0);
    ProtobufCAllocator al = cake_internal_allocator(adm);
    Cake__TenantList *tl = cake__tenant_list__unpack(&al, n, body);
    cake_internal_free(adm, body);
    cr_assert_not_null(tl);
    int seen = 0;
    for (size_t i = 0; i < tl->n_tenants; i++)
        if (!strcmp(tl->tenants[i]->name, "rooted")) {
            seen = 1;
            cr_assert_eq(tl->tenants[i]->weight, 3, "the weight was not given: kept");
            cr_assert_eq(tl->tenants[i]->max_bytes, 65536);
        }
    cr_assert(seen);
    cake__tenant_list__free_unpacked(tl, &al);
    cake_destroy(adm), cake_destroy(twin);
    cr_assert_eq(cake_seq_close(s), 0);
    cake_destroy(a);
    cr_assert_eq(harness_stop(&h), 0);
    unlink(conf);
}

/* 4. A rank of a shard group whose other rank died keeps its pages until its next call: it
 * may be writing them right now (between its reserve and its writes, as the header allows);
 * nothing of anyone else, its own tenant included, lands there meanwhile. */
Test(trust, pages_a_client_may_still_write_are_not_reused_before_its_next_call, .timeout = 60)
{
    struct harness h;
    const char *extra[] = {"--host-pool", "32M", NULL};
    cr_assert_eq(harness_start(&h, extra), 0);
    struct cake_layout lay = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                              .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
    struct cake_policy pol;
    cake_policy_default(&pol);
    pol.cache_size = 64, pol.window = 8;
    const uint32_t n = 2000;
    int up[2], down[2]; /* rank 0 -> test: joined; test -> rank 0: exit now */
    cr_assert_eq(pipe(up), 0);
    cr_assert_eq(pipe(down), 0);
    pid_t p = fork();
    if (p == 0) { /* rank 0: joins, then dies */
        cake_ctx *c;
        cake_create(&c);
        cake_set_service(c, "tp");
        cake_seq *s;
        if (cake_connect(c, h.sock, 1) || cake_seq_open_shard(c, &lay, &pol, n, 8, 77, 2, 0, &s))
            _exit(1);
        char x;
        if (write(up[1], "j", 1) != 1 || read(down[0], &x, 1) != 1)
            _exit(2);
        _exit(0);
    }
    char x;
    cr_assert_eq(read(up[0], &x, 1), 1);
    cake_ctx *r1 = engine(h.sock, "tp");
    cake_seq *s1;
    cr_assert_eq(cake_seq_open_shard(r1, &lay, &pol, n, 8, 77, 2, 1, &s1), 0, "%s", cake_errstr(r1));
    cr_assert_eq(cake_prefill_reserve(s1, 0), 0, "%s", cake_errstr(r1));
    uint8_t *keys[2000];
    for (uint32_t t = 0; t < n; t++)
        keys[t] = cake_key(s1, 0, 0, t);
    unsigned long long used_before, used_after;
    unsigned seqs;
    cr_assert_eq(harness_status(&h, &used_before, &seqs), 0);
    cr_assert_eq(write(down[1], "d", 1), 1); /* rank 0 exits: the group ends */
    waitpid(p, NULL, 0);
    for (int i = 0; i < 100; i++) { /* until caked has seen the death */
        cr_assert_eq(harness_status(&h, &used_after, &seqs), 0);
        if (seqs == 0)
            break;
        usleep(20000);
    }
    cr_assert_eq(seqs, 0, "the group ended");
    /* rank 1's layer (16 pages of 128 tokens) is held in quarantine, not free */
    cr_assert_geq(used_after, 16, "%llu pages in use (were %llu)", used_after, used_before);
    /* another engine of the same tenant takes what it can and marks it */
    cake_ctx *o = engine(h.sock, "tp");
    cake_seq *so[64];
    int no = 0; /* until the pool is full: any page free to reuse would be taken */
    while (no < 64 && cake_seq_open(o, &lay, &pol, n, 8, &so[no]) == 0) {
        if (cake_prefill_reserve(so[no], 0)) {
            cake_seq_close(so[no]);
            break;
        }
        fill_layer(so[no], 0, 2, n, 128, 0x3c);
        no++;
    }
    cr_assert_gt(no, 0);
    /* rank 1, not yet told, writes where its reserve said */
    for (uint32_t t = 0; t < n; t++)
        memset(keys[t], 0xee, 128);
    for (int i = 0; i < no; i++)
        for (uint32_t t = 0; t < n; t++)
            cr_assert_eq(*(uint8_t *)cake_key(so[i], 0, 1, t), 0x3c, "a reused page was written");
    for (int i = 0; i < no; i++)
        for (uint32_t t = 0; t < n; t += 97)
            cr_assert_eq(*(uint8_t *)cake_key(so[i], 0, 0, t), 0x3c,
                         "sequence %d token %u: written by the rank whose group ended", i, t);
    /* its next call learns the group ended; then its pages go back */
    cr_assert_eq(cake_prefill_observe(s1, 0, NULL), CAKE_ENOSEQ);
    for (int i = 0; i < no; i++)
        cake_seq_close(so[i]);
    cake_destroy(o), cake_destroy(r1);
    for (int i = 0; i < 100; i++) {
        cr_assert_eq(harness_status(&h, &used_after, &seqs), 0);
        if (used_after == 0)
            break;
        usleep(20000);
    }
    cr_assert_eq(used_after, 0, "every page back");
    cr_assert_eq(harness_stop(&h), 0);
}

/* ---- 5. a fake server: libcake believes only what it can check ---------------------- */

static void put_frame(int fd, uint16_t type, uint64_t rid, const ProtobufCMessage *m,
                      const int *fds, int nfd)
{
    uint8_t buf[FRAME_HEADER_BYTES + 4096];
    size_t n = m ? protobuf_c_message_get_packed_size(m) : 0;
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, type, nfd ? FRAME_FLAG_FDS : 0,
                             (uint32_t)n, rid};
    frame_write_header(buf, &h);
    if (m)
        protobuf_c_message_pack(m, buf + FRAME_HEADER_BYTES);
    struct iovec iov = {buf, FRAME_HEADER_BYTES + n};
    char cb[CMSG_SPACE(8 * sizeof(int))];
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfd) {
        memset(cb, 0, sizeof cb);
        mh.msg_control = cb, mh.msg_controllen = CMSG_SPACE(nfd * sizeof(int));
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfd * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfd * sizeof(int));
    }
    if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0)
        _exit(50);
}

static uint64_t get_frame(int fd, uint16_t *type)
{
    uint8_t hb[FRAME_HEADER_BYTES], body[65536];
    struct frame_header h;
    if (recv(fd, hb, sizeof hb, MSG_WAITALL) != (ssize_t)sizeof hb || frame_parse_header(hb, &h) ||
        h.body_len > sizeof body || (h.body_len && recv(fd, body, h.body_len, MSG_WAITALL) != (ssize_t)h.body_len))
        _exit(51);
    *type = h.type;
    return h.request_id;
}

/* Serves one client on l: HELLO with the given pool, then answers SEQ_OPEN with a MAP of
 * segment 0 carrying seg_fd (claimed to be 4 MiB) and a window of pages 0 and 1. */
static void fake_server(int l, uint64_t pool_bytes, uint64_t seg_bytes, int seg_fd)
{
    int c = accept(l, NULL, NULL);
    uint16_t t;
    uint64_t rid = get_frame(c, &t);
    Cake__HelloReply hr = CAKE__HELLO_REPLY__INIT;
    hr.protocol_version = CAKE_PROTOCOL_VERSION, hr.tenant = (char *)"x";
    hr.pool_bytes = pool_bytes, hr.page_bytes = 65536, hr.segment_bytes = seg_bytes;
    hr.daemon_version = (char *)"fake";
    put_frame(c, MSG_HELLO | FRAME_REPLY, rid, &hr.base, NULL, 0);
    for (;;) {
        rid = get_frame(c, &t);
        if (t == MSG_SEQ_CLOSE) {
            put_frame(c, MSG_SEQ_CLOSE | FRAME_REPLY, rid, NULL, NULL, 0);
            continue;
        }
        Cake__Segment sg = CAKE__SEGMENT__INIT, *sp = &sg;
        sg.pool = 0, sg.index = 0, sg.offset = 0, sg.bytes = seg_bytes, sg.gen = 1;
        Cake__SegmentMap sm = CAKE__SEGMENT_MAP__INIT;
        sm.n_segments = 1, sm.segments = &sp;
        put_frame(c, MSG_MAP | FRAME_REPLY, rid, &sm.base, &seg_fd, 1);
        Cake__SeqOpenReply r = CAKE__SEQ_OPEN_REPLY__INIT;
        uint32_t win[2] = {0, 1};
        r.seq_id = 1, r.tokens_per_page = 64, r.desc_bytes = 65536, r.scratch_bytes = 65536;
        r.n_window_pages = 2, r.window_pages = win;
        put_frame(c, MSG_SEQ_OPEN | FRAME_REPLY, rid, &r.base, NULL, 0);
    }
}

static int fake_and_open(uint64_t pool_bytes, uint64_t seg_bytes, int seg_fd, int *connect_rc,
                         char *err, size_t errlen)
{
    char d[] = "/tmp/caked-fake-XXXXXX", sock[128];
    cr_assert_not_null(mkdtemp(d));
    snprintf(sock, sizeof sock, "%s/s", d);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, sock);
    cr_assert_eq(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(l, 2), 0);
    pid_t p = fork();
    if (p == 0) {
        fake_server(l, pool_bytes, seg_bytes, seg_fd);
        _exit(0);
    }
    close(l);
    cake_ctx *c;
    cake_create(&c);
    cake_set_timeout_ms(c, 3000);
    int rc = *connect_rc = cake_connect(c, sock, 1);
    if (!rc) {
        struct cake_layout lay = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                                  .dtype = CAKE_BF16, .placement = CAKE_PLACE_HOST};
        cake_seq *s = NULL;
        rc = cake_seq_open(c, &lay, NULL, 500, 8, &s);
        /* whatever happened, no address libcake gives may fault */
        uint8_t *b = cake_pool_base(c);
        for (size_t off = 0; off < (cake_pool_bytes(c) < (64u << 20) ? cake_pool_bytes(c) : (64u << 20)); off += 4096)
            if (cake_pool_mapped(c, b + off, 4096))
                (void)*(volatile uint8_t *)(b + off);
    }
    snprintf(err, errlen, "%s", cake_errstr(c));
    cake_destroy(c);
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    unlink(sock), rmdir(d);
    return rc;
}

Test(trust, libcake_believes_only_what_it_can_check, .timeout = 60)
{
    char err[256];
    int crc;
    /* a 4 KiB memfd passed as a 64 MiB segment of a 1 TiB pool: refused, no SIGBUS */
    int small = memfd_create("small", MFD_ALLOW_SEALING);
    cr_assert_eq(ftruncate(small, 4096), 0);
    fcntl(small, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
    int rc = fake_and_open(1ull << 40, 64u << 20, small, &crc, err, sizeof err);
    cr_assert_eq(crc, 0, "%s", err);
    cr_assert_eq(rc, CAKE_EPROTO, "%d %s", rc, err);
    /* the right size, but not sealed: the server could shrink it under us later */
    int unsealed = memfd_create("unsealed", 0);
    cr_assert_eq(ftruncate(unsealed, 4u << 20), 0);
    rc = fake_and_open(64u << 20, 4u << 20, unsealed, &crc, err, sizeof err);
    cr_assert_eq(rc, CAKE_EPROTO, "%d %s", rc, err);
    /* a pipe is not memory */
    int pp[2];
    cr_assert_eq(pipe(pp), 0);
    rc = fake_and_open(64u << 20, 4u << 20, pp[0], &crc, err, sizeof err);
    cr_assert_eq(rc, CAKE_EPROTO, "%d %s", rc, err);
    /* impossible pool descriptions are refused at connect */
    rc = fake_and_open(1ull << 60, 4u << 20, small, &crc, err, sizeof err);
    cr_assert_eq(crc, CAKE_EPROTO, "%s", err);
    rc = fake_and_open(64u << 20, 3000, small, &crc, err, sizeof err);
    cr_assert_eq(crc, CAKE_EPROTO, "%s", err);
    close(small), close(unsealed), close(pp[0]), close(pp[1]);
}
