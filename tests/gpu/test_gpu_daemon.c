/* caked --gpu-pool end to end: engine processes attach; libcake maps the GPU pool segments
 * of its tenant and registers its host segments with CUDA; what one engine writes into its
 * GPU pages another process of its tenant reads back, while another tenant does not even
 * map them (legacy IPC excepted); caked stops cleanly.
 * Exit 77 without a GPU. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"
#include "../integration/harness.h"
#include "gputest.h"

#define OFF (1u << 20)
#define LEN (1u << 20)


enum role { WRITER, READER, OTHER };

/* the writer tells the page offset on up[1], then stays attached (its tenant with it: a tenant
 * no process holds is forgotten and its memory recycled) until a byte arrives on down[0] */
static int up[2], down[2];

/* WRITER (service "svc") opens a GPU sequence and writes 0x42 over its first page; READER,
 * another process of the same tenant, reads those bytes where the page table said; OTHER,
 * another tenant, must not have that memory mapped at all (VMM: segments per tenant), except
 * with --gpu-ipc legacy, which maps the whole pool in every engine. */
static int engine(const char *sock, enum role role, int legacy, uint64_t *off_io)
{
    cake_ctx *c;
    cake_create(&c);
    cake_set_service(c, role == OTHER ? "other" : "svc");
    if (cake_connect(c, sock, 1)) {
        fprintf(stderr, "connect: %s\n", cake_errstr(c));
        return 2;
    }
    uint64_t base = cake_gpu_pool_base_at(c, 0);
    if (!base || cake_gpu_pool_bytes_at(c, 0) < (64u << 20) || strncmp(cake_gpu_uuid_at(c, 0), "GPU-", 4)) {
        fprintf(stderr, "GPU pool not mapped: %s\n", cake_errstr(c));
        return 3;
    }
    if (cake_ping(c)) /* any reply brings the tenant's segments */
        return 8;
    unsigned char *h = malloc(LEN);
    if (role == WRITER) {
        struct cake_layout lay = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
                                  .dtype = CAKE_BF16, .placement = CAKE_PLACE_GPU};
        cake_seq *s;
        if (cake_seq_open(c, &lay, NULL, 4096, 8, &s) || cake_prefill_reserve(s, 0)) {
            fprintf(stderr, "open: %s\n", cake_errstr(c));
            return 9;
        }
        uint32_t np;
        const uint64_t *pg = cake_layer_pages(s, 0, &np);
        unsigned int flags;
        if (cudaHostGetFlags(&flags, (void *)pg) != cudaSuccess) {
            fprintf(stderr, "the host pool's segments are not registered with CUDA\n");
            return 7;
        }
        *off_io = pg[0];
        if (!cake_gpu_pool_mapped(c, 0, pg[0], LEN) ||
            cudaMemset((void *)(uintptr_t)(base + pg[0]), 0x42, LEN) != cudaSuccess ||
            cudaDeviceSynchronize() != cudaSuccess) /* the ordering contract: sync, then tell */
            return 4;
        char x;
        if (write(up[1], off_io, sizeof *off_io) != sizeof *off_io || read(down[0], &x, 1) != 1)
            return 12;
    } else if (role == READER) {
        if (!cake_gpu_pool_mapped(c, 0, *off_io, LEN)) {
            fprintf(stderr, "the tenant's segment is not mapped in its second process\n");
            return 10;
        }
        if (cudaMemcpy(h, (void *)(uintptr_t)(base + *off_io), LEN, cudaMemcpyDeviceToHost) != cudaSuccess)
            return 5;
        for (unsigned i = 0; i < LEN; i++)
            if (h[i] != 0x42) {
                fprintf(stderr, "byte %u is %#x, the writer wrote 0x42\n", i, h[i]);
                return 6;
            }
        printf("reader: the writer's bytes are in its tenant's GPU segment on %s\n", cake_gpu_uuid_at(c, 0));
    } else {
        int mapped = cake_gpu_pool_mapped(c, 0, *off_io, 1);
        if (mapped != legacy) {
            fprintf(stderr, "another tenant %s the writer's GPU memory\n",
                    mapped ? "maps" : "does not map (legacy IPC maps all)");
            return 11;
        }
        printf("other tenant: the writer's GPU segment is %s\n",
               mapped ? "mapped (legacy IPC: one handle for everyone)" : "not mapped here");
    }
    fflush(stdout);
    free(h);
    cake_destroy(c);
    return 0;
}

int main(void)
{
    if (!gputest_has_gpu()) {
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
    if (pipe(up) || pipe(down))
        return 1;
    uint64_t off = 0;
    pid_t writer = 0;
    for (int role = WRITER; role <= OTHER; role++) {
        pid_t p = fork();
        if (p == 0)
            _exit(engine(h.sock, (enum role)role, legacy, &off));
        int st = 0;
        if (role == WRITER) {
            writer = p;
            close(up[1]); /* a writer that dies early ends the read below */
            up[1] = -1;
            if (read(up[0], &off, sizeof off) != sizeof off)
                rc = 1;
            continue;
        }
        waitpid(p, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) {
            fprintf(stderr, "FAIL: engine %d exited %d\n", role, WEXITSTATUS(st));
            rc = 1;
        }
    }
    int wst;
    if (write(down[1], "x", 1) != 1 || waitpid(writer, &wst, 0) != writer || !WIFEXITED(wst) ||
        WEXITSTATUS(wst)) {
        fprintf(stderr, "FAIL: the writer\n");
        rc = 1;
    }
    close(up[0]), close(down[0]), close(down[1]);
    if (harness_stop(&h)) {
        fprintf(stderr, "FAIL: caked did not stop cleanly\n");
        rc = 1;
    }
    }
    printf("%s\n", rc ? "FAILED" : "GPU pool shared through caked, per tenant");
    return rc;
}
