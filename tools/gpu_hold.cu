// gpu_hold.cu - holds a stream until the host lets it go, for bench-gpu's "queued" timings:
// the work to time is enqueued behind the hold and the start event, so the GPU runs it back
// to back as it would behind an engine's own work, and the host's cost of launching it stays
// out of the events (the blocking kernel of NVIDIA's nvbench; written here, not taken).
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu_hold.h"

// Spins until flag[0] is nonzero or timeout_ns of the GPU's global timer pass (the host not
// letting go: a synchronizing call in the timed work); sets flag[1] on a timeout.
__global__ void hold_kernel(volatile int *flag, uint64_t timeout_ns)
{
    uint64_t t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    while (!flag[0]) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 > timeout_ns) {
            flag[1] = 1;
            break;
        }
        __nanosleep(500);
    }
}

extern "C" int gpu_hold_init(struct gpu_hold *h)
{
    h->flag = NULL;
    if (cudaHostAlloc((void **)&h->flag, 2 * sizeof(int), cudaHostAllocMapped) != cudaSuccess)
        return -1;
    h->flag[0] = h->flag[1] = 0;
    return 0;
}

extern "C" int gpu_hold(struct gpu_hold *h, void *stream)
{
    int *dev;
    h->flag[0] = h->flag[1] = 0;
    if (cudaHostGetDevicePointer((void **)&dev, (void *)h->flag, 0) != cudaSuccess)
        return -1;
    hold_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(dev, 1000000000ull); /* 1 s */
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

extern "C" void gpu_release(struct gpu_hold *h)
{
    __atomic_store_n(&h->flag[0], 1, __ATOMIC_SEQ_CST);
}

extern "C" int gpu_hold_timed_out(const struct gpu_hold *h)
{
    return __atomic_load_n(&h->flag[1], __ATOMIC_SEQ_CST) != 0;
}

extern "C" void gpu_hold_free(struct gpu_hold *h)
{
    if (h->flag)
        cudaFreeHost((void *)h->flag);
    h->flag = NULL;
}
