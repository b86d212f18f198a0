/* gpu_hold.h - a stream held until the host lets it go (gpu_hold.cu): bench-gpu queues the
 * work it times behind it. */
#ifndef CAKE_GPU_HOLD_H
#define CAKE_GPU_HOLD_H

#ifdef __cplusplus
extern "C" {
#endif

struct gpu_hold {
    volatile int *flag; /* host-mapped: [0] let go, [1] the hold gave up (after 1 s) */
};

int gpu_hold_init(struct gpu_hold *h);
int gpu_hold(struct gpu_hold *h, void *stream); /* enqueue the hold */
void gpu_release(struct gpu_hold *h);           /* after the timed work is enqueued */
int gpu_hold_timed_out(const struct gpu_hold *h); /* after the stream finished */
void gpu_hold_free(struct gpu_hold *h);

#ifdef __cplusplus
}
#endif
#endif
