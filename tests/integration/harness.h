/* harness.h - starts a real caked on a temporary socket for integration tests.
 *
 * CAKED_BIN (compile-time) is the daemon; CAKE_TEST_IO (environment: uring, epoll) picks
 * the event loop; CAKE_TEST_CAKED_WRAP (environment) a command to run caked under
 * (compute-sanitizer, valgrind). A test that asks for io_uring where the kernel refuses it exits 77
 * (ctest: skipped) with a message. */
#ifndef CAKE_HARNESS_H
#define CAKE_HARNESS_H

#include <sys/types.h>

struct harness {
    pid_t pid;
    char dir[128];
    char sock[160];
    char log[160];
};

/* Starts caked with extra arguments (NULL-terminated list, may be NULL); waits until it
 * answers. Returns 0 or -1. */
int harness_start(struct harness *h, const char *const *extra);
/* A connected client of the given service (map_pool: an engine; admin: asks for
 * administration), or NULL with the reason on stderr. */
struct cake_ctx;
struct cake_ctx *harness_client(const char *sock, const char *service, int map_pool, int admin);
/* The caked binary under test. */
const char *harness_caked_bin(void);
/* SIGTERM and wait; returns caked's exit status (or -1 if it died by a signal). */
int harness_stop(struct harness *h);
/* Pages in use and open sequences, from a STATUS request. */
int harness_status(const struct harness *h, unsigned long long *pages_used, unsigned *seqs);
/* The same, with GPU pool pages in use (caked --gpu-pool). */
int harness_status_gpu(const struct harness *h, unsigned long long *pages_used, unsigned *seqs,
                       unsigned long long *gpu_pages_used);
/* The workers' load from STATUS: jobs running and the longest's run, jobs waiting and the
 * oldest's wait (microseconds). */
int harness_status_jobs(const struct harness *h, unsigned *running, unsigned long long *running_us,
                        unsigned *queued, unsigned long long *queued_us);

/* A sample of caked's metrics (`cachectl --socket sock metrics`, the binary named by
 * CACHECTL_BIN) whose name, labels included, is exactly `name`; -1 where CACHECTL_BIN is
 * unset or no such line came. */
double harness_metric(const char *sock, const char *name);

#endif
