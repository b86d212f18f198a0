/* gputest.h - what the GPU tests share: whether this machine has a CUDA device. */
#ifndef CAKE_GPUTEST_H
#define CAKE_GPUTEST_H

#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

/* Probed in a child: a CUDA context must not cross a later fork. */
static inline int gputest_has_gpu(void)
{
    pid_t p = fork();
    if (p == 0) {
        int n = 0;
        _exit(cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? 0 : 1);
    }
    int st;
    waitpid(p, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

#endif
