/* The GPU pool across processes, as caked and an engine use it: the owner reserves the
 * pool's range, gives each segment memory and passes the segments' file descriptors over a
 * Unix socket; the other process reserves a range of the same size, maps each segment at its
 * offset, writes, and the owner reads the same bytes. Then the owner gives one segment fresh
 * memory (a new owner's), writes it, and the other process, still mapping the old one, must
 * not see those bytes. Also a memfd host pool registered with CUDA in both processes. Prints
 * attach cost (import + map) and host<->GPU bandwidth from the registered memfd. Exit 77
 * without a GPU. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <cuda_runtime.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gpupool.h"

#define POOL (64ull << 20)
#define SEG (4ull << 20)
#define NSEG ((int)(POOL / SEG))
#define HOST (256ull << 20)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void send_fds(int s, const int *fds, int n)
{
    char c = 'x', cbuf[CMSG_SPACE(32 * sizeof(int))];
    struct iovec iov = {&c, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                       .msg_controllen = CMSG_SPACE(n * sizeof(int))};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS, cm->cmsg_len = CMSG_LEN(n * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, n * sizeof(int));
    if (sendmsg(s, &m, 0) != 1)
        exit(2);
}

static void recv_fds(int s, int *fds, int n)
{
    char c, cbuf[CMSG_SPACE(32 * sizeof(int))];
    struct iovec iov = {&c, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    if (recvmsg(s, &m, 0) != 1)
        exit(3);
    memcpy(fds, CMSG_DATA(CMSG_FIRSTHDR(&m)), n * sizeof(int));
}

int main(void)
{
    /* fork before any CUDA call: a CUDA context does not survive fork (nor does it need to:
     * caked and engines are separate processes) */
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
        return 1;
    int memfd = memfd_create("test-host-pool", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, HOST))
        return 1;
    pid_t pid = fork();
    if (pid == 0) { /* the engine: import, write a pattern, copy through the host pool */
        close(sv[0]);
        int fds[NSEG + 1];
        recv_fds(sv[1], fds, NSEG + 1);
        int hfd = fds[NSEG];
        struct gpupool p;
        const char *why = "";
        double tc = now();
        if (cudaFree(0) != cudaSuccess) /* the process's CUDA context, made once at attach */
            _exit(4);
        double ctx = now() - tc, t0 = now();
        if (gpupool_create(&p, POOL, SEG, NULL, &why)) {
            fprintf(stderr, "reserve: %s\n", why);
            _exit(4);
        }
        for (int i = 0; i < NSEG; i++) {
            if (gpupool_seg_import(&p, (uint32_t)i, fds[i], &why)) {
                fprintf(stderr, "import: %s\n", why);
                _exit(4);
            }
            close(fds[i]);
        }
        double attach = now() - t0;
        if (cudaMemset((void *)(uintptr_t)p.va, 0x5a, POOL) != cudaSuccess || cudaDeviceSynchronize())
            _exit(5);
        void *host = mmap(NULL, HOST, PROT_READ | PROT_WRITE, MAP_SHARED, hfd, 0);
        if (host == MAP_FAILED || gpupool_register_host(host, HOST, &why)) {
            fprintf(stderr, "register: %s\n", why);
            _exit(6);
        }
        void *dev;
        cudaMalloc(&dev, HOST);
        memset(host, 0x33, HOST);
        double h2d = 1e30, d2h = 1e30;
        for (int r = 0; r < 5; r++) {
            double a = now();
            cudaMemcpy(dev, host, HOST, cudaMemcpyHostToDevice);
            double b = now();
            cudaMemcpy(host, dev, HOST, cudaMemcpyDeviceToHost);
            double c = now();
            h2d = b - a < h2d ? b - a : h2d, d2h = c - b < d2h ? c - b : d2h;
        }
        printf("engine: CUDA context %.1f ms, then import + map of a %llu MiB GPU pool in %d "
               "segments %.3f ms; registered memfd: host->GPU %.1f GB/s, GPU->host %.1f GB/s\n",
               ctx * 1e3, (unsigned long long)(POOL >> 20), NSEG, attach * 1e3, HOST / h2d / 1e9,
               HOST / d2h / 1e9);
        fflush(stdout);
        char ok = 'k';
        if (write(sv[1], &ok, 1) != 1)
            _exit(7);
        /* the owner gave segment 3 fresh memory and wrote 0x77 there: our old mapping of
         * segment 3 must still read our own 0x5a */
        if (read(sv[1], &ok, 1) != 1)
            _exit(8);
        unsigned char probe[256];
        cudaMemcpy(probe, (void *)(uintptr_t)(p.va + 3 * SEG + 4096), sizeof probe,
                   cudaMemcpyDeviceToHost);
        for (size_t i = 0; i < sizeof probe; i++)
            if (probe[i] != 0x5a) {
                fprintf(stderr, "FAIL: a recycled segment's new memory is visible to the old "
                                "owner (byte %#x)\n", probe[i]);
                _exit(9);
            }
        gpupool_unregister_host(host);
        gpupool_destroy(&p);
        _exit(0);
    }
    close(sv[1]);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || !n) { /* no driver, or no GPU */
        printf("SKIP: no CUDA device\n");
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return 77;
    }
    struct gpupool p;
    const char *why = "";
    int fds[NSEG + 1];
    if (gpupool_create(&p, POOL, SEG, NULL, &why)) {
        fprintf(stderr, "create: %s\n", why);
        return 1;
    }
    for (int i = 0; i < NSEG; i++)
        if (gpupool_seg_fresh(&p, (uint32_t)i, &why) || gpupool_seg_export(&p, (uint32_t)i, &fds[i], &why)) {
            fprintf(stderr, "segment %d: %s\n", i, why);
            return 1;
        }
    fds[NSEG] = memfd;
    void *host = mmap(NULL, HOST, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (host == MAP_FAILED || gpupool_register_host(host, HOST, &why)) {
        fprintf(stderr, "register in the owner: %s\n", why);
        return 1;
    }
    cudaMemset((void *)(uintptr_t)p.va, 0, POOL);
    cudaDeviceSynchronize();
    send_fds(sv[0], fds, NSEG + 1);
    for (int i = 0; i < NSEG; i++)
        close(fds[i]);
    char ok;
    int st, failures = 0;
    if (read(sv[0], &ok, 1) != 1)
        failures++;
    unsigned char *back = malloc(POOL);
    cudaMemcpy(back, (void *)(uintptr_t)p.va, POOL, cudaMemcpyDeviceToHost);
    /* segment 3 to a new owner: fresh memory, written; the other process must not see it */
    if (gpupool_seg_fresh(&p, 3, &why) ||
        cudaMemset((void *)(uintptr_t)(p.va + 3 * SEG), 0x77, SEG) != cudaSuccess ||
        cudaDeviceSynchronize() != cudaSuccess) {
        fprintf(stderr, "FAIL: fresh segment: %s\n", why);
        failures++;
    }
    if (write(sv[0], &ok, 1) != 1)
        failures++;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        fprintf(stderr, "FAIL: the importing process failed (%d)\n", WEXITSTATUS(st));
        failures++;
    }
    for (size_t i = 0; i < POOL && !failures; i++)
        if (back[i] != 0x5a) {
            fprintf(stderr, "FAIL: byte %zu is %#x, the other process wrote 0x5a\n", i, back[i]);
            failures++;
        }
    if (!failures && ((unsigned char *)host)[12345] != 0x33) {
        fprintf(stderr, "FAIL: host pool not shared\n");
        failures++;
    }
    /* host segments are registered one by one (caked and libcake do): does one copy over two
     * registrations work? (caked splits its copies at segment boundaries either way) */
    uint8_t *two = mmap(NULL, 2 * SEG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    void *dtwo = NULL;
    if (two != MAP_FAILED && gpupool_register_host(two, SEG, &why) == 0 &&
        gpupool_register_host(two + SEG, SEG, &why) == 0 && cudaMalloc(&dtwo, 2 * SEG) == cudaSuccess) {
        cudaError_t e1 = cudaMemcpy(dtwo, two, 2 * SEG, cudaMemcpyHostToDevice);
        cudaGetLastError();
        cudaError_t e2 = cudaMemcpy(dtwo, two, SEG, cudaMemcpyHostToDevice);
        cudaError_t e3 = cudaMemcpy((uint8_t *)dtwo + SEG, two + SEG, SEG, cudaMemcpyHostToDevice);
        printf("one copy over two host registrations: %s; a copy per registration: %s\n",
               e1 == cudaSuccess ? "works" : cudaGetErrorString(e1),
               e2 == cudaSuccess && e3 == cudaSuccess ? "works" : "FAILS");
        if (e2 != cudaSuccess || e3 != cudaSuccess)
            failures++;
        gpupool_unregister_host(two), gpupool_unregister_host(two + SEG);
        cudaFree(dtwo);
    }
    printf("owner: GPU %s, pool %llu MiB in %d segments (granularity %llu KiB): %s\n", p.uuid,
           (unsigned long long)(p.bytes >> 20), NSEG, (unsigned long long)(p.granularity >> 10),
           failures ? "FAILED" : "the other process's writes are visible");
    free(back);
    gpupool_unregister_host(host);
    gpupool_destroy(&p);
    return failures ? 1 : 0;
}
