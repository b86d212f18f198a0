/* caked --gpu-pool end to end: two engine processes attach; libcake imports the GPU pool
 * caked exported and registers the host pool with CUDA; what one engine writes into the GPU
 * pool the other reads back; caked stops cleanly.
 * Exit 77 without a GPU. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include "../integration/harness.h"

#define OFF (1u << 20)
#define LEN (1u << 20)

static int has_gpu(void)
{
    pid_t p = fork(); /* probe in a child: a CUDA context must not cross a later fork */
    if (p == 0) {
        int n = 0;
        _exit(cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? 0 : 1);
    }
    int st;
    waitpid(p, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static int engine(const char *sock, int writer)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, writer ? "writer" : "reader");
    if (cake_connect(c, sock, 1)) {
        fprintf(stderr, "connect: %s\n", cake_errstr(c));
        return 2;
    }
    uint64_t base = cake_gpu_pool_base(c);
    if (!base || cake_gpu_pool_bytes(c) < (64u << 20) || strncmp(cake_gpu_uuid(c), "GPU-", 4)) {
        fprintf(stderr, "GPU pool not mapped: %s\n", cake_errstr(c));
        return 3;
    }
    unsigned int flags;
    if (cudaHostGetFlags(&flags, cake_pool_base(c)) != cudaSuccess) {
        fprintf(stderr, "the host pool is not registered with CUDA\n");
        return 7;
    }
    unsigned char *h = malloc(LEN);
    if (writer) {
        if (cudaMemset((void *)(uintptr_t)(base + OFF), 0x42, LEN) != cudaSuccess ||
            cudaDeviceSynchronize() != cudaSuccess) /* the ordering contract: sync, then tell */
            return 4;
    } else {
        if (cudaMemcpy(h, (void *)(uintptr_t)(base + OFF), LEN, cudaMemcpyDeviceToHost) != cudaSuccess)
            return 5;
        for (unsigned i = 0; i < LEN; i++)
            if (h[i] != 0x42) {
                fprintf(stderr, "byte %u is %#x, the writer wrote 0x42\n", i, h[i]);
                return 6;
            }
        printf("reader: the writer's bytes are in the GPU pool on %s\n", cake_gpu_uuid(c));
        fflush(stdout);
    }
    free(h);
    cake_destroy(c);
    return 0;
}

int main(void)
{
    if (!has_gpu()) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    int rc = 0;
    /* the VMM file descriptor, then the legacy CUDA IPC handle (the fallback where export is
     * refused, forced here) */
    for (int legacy = 0; legacy < 2; legacy++) {
    struct harness h;
    const char *extra[] = {"--gpu-pool", "64M", legacy ? "--gpu-ipc" : NULL, "legacy", NULL};
    if (harness_start(&h, extra)) {
        fprintf(stderr, "FAIL: caked did not start with a GPU pool\n");
        return 1;
    }
    printf("%s:\n", legacy ? "legacy CUDA IPC handle" : "CUDA VMM file descriptor");
    fflush(stdout);
    for (int writer = 1; writer >= 0; writer--) {
        pid_t p = fork();
        if (p == 0)
            _exit(engine(h.sock, writer));
        int st;
        waitpid(p, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) {
            fprintf(stderr, "FAIL: %s exited %d\n", writer ? "writer" : "reader", WEXITSTATUS(st));
            rc = 1;
        }
    }
    if (harness_stop(&h)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        rc = 1;
    }
    }
    printf("%s\n", rc ? "FAILED" : "GPU pool shared through caked");
    return rc;
}
