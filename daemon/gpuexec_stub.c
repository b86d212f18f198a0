/* gpuexec_stub.c - gpuexec.h where CUDA is absent: caked refuses GPU sequences before any
 * of this is reached; every function returns -ENOTSUP. */
#include <errno.h>
#include <stddef.h>

#include "gpuexec.h"

int gpuexec_create(struct gpuexec **out, int device, int n, const char **why)
{
    (void)out, (void)device, (void)n;
    *why = "built without CUDA";
    return -ENOTSUP;
}
void gpuexec_destroy(struct gpuexec *g) { (void)g; }
struct gpuctx *gpuexec_take(struct gpuexec *g)
{
    (void)g;
    return NULL;
}
struct gpuctx *gpuexec_try_take(struct gpuexec *g)
{
    (void)g;
    return NULL;
}
void gpuexec_put(struct gpuexec *g, struct gpuctx *c) { (void)g, (void)c; }
int gpuctx_score(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *r,
                 const float *lse, uint32_t n_scored, const struct gpu_rank *rk, float *ind,
                 double *entropy, double *variance)
{
    (void)c, (void)l, (void)r, (void)lse, (void)n_scored, (void)rk;
    (void)ind, (void)entropy, (void)variance;
    return -ENOTSUP;
}
int gpuctx_select_compact_many(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    (void)c, (void)jobs, (void)n;
    return -ENOTSUP;
}
int gpuctx_score_launch(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *r,
                        const float *lse, uint32_t n_scored, const struct gpu_rank *rk, float *ind,
                        int stats)
{
    (void)c, (void)l, (void)r, (void)lse, (void)n_scored, (void)rk, (void)ind, (void)stats;
    return -ENOTSUP;
}
int gpuctx_score_land(struct gpuctx *c, double *entropy, double *variance)
{
    (void)c, (void)entropy, (void)variance;
    return -ENOTSUP;
}
int gpuctx_select_compact_many_launch(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    (void)c, (void)jobs, (void)n;
    return -ENOTSUP;
}
int gpuctx_select_compact_many_land(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    (void)c, (void)jobs, (void)n;
    return -ENOTSUP;
}
int gpuctx_copy_d2h(struct gpuctx *c, void *dst, const void *src_dev, size_t bytes)
{
    (void)c, (void)dst, (void)src_dev, (void)bytes;
    return -ENOTSUP;
}
int gpuexec_peek(struct gpuexec *g, void *dst, const void *src_dev, size_t bytes)
{
    (void)g, (void)dst, (void)src_dev, (void)bytes;
    return -ENOTSUP;
}
int gpuctx_fetch_rows(struct gpuctx *c, const struct gpu_rows *r, uint32_t n)
{
    (void)c, (void)r, (void)n;
    return -ENOTSUP;
}
int gpuctx_copy_h2d(struct gpuctx *c, void *dst_dev, const void *src, size_t bytes,
                    const void *base, size_t seg_bytes)
{
    (void)c, (void)dst_dev, (void)src, (void)bytes, (void)base, (void)seg_bytes;
    return -ENOTSUP;
}
int gpuctx_copy_pages_d2d(struct gpuctx *c, uint8_t *base, const uint32_t *src, const uint32_t *dst,
                          uint32_t n, uint64_t page_bytes)
{
    (void)c, (void)base, (void)src, (void)dst, (void)n, (void)page_bytes;
    return -ENOTSUP;
}
int gpuctx_copy_pages(struct gpuctx *c, uint8_t *dev_base, const uint32_t *dev, uint8_t *host_base,
                      const uint32_t *host, uint32_t n, uint64_t page_bytes, int to_host)
{
    (void)c, (void)dev_base, (void)dev, (void)host_base, (void)host, (void)n, (void)page_bytes;
    (void)to_host;
    return -ENOTSUP;
}
int gpuctx_dev_alloc(struct gpuctx *c, void **p, size_t bytes)
{
    (void)c, (void)bytes;
    *p = NULL;
    return -ENOTSUP;
}
int gpuctx_dev_fill(struct gpuctx *c, void *p, int byte, size_t bytes)
{
    (void)c, (void)p, (void)byte, (void)bytes;
    return -ENOTSUP;
}
void gpuexec_dev_free(struct gpuexec *g, void *p) { (void)g, (void)p; }
void gpuexec_set_timing(struct gpuexec *g, int on) { (void)g, (void)on; }
void gpuctx_times(const struct gpuctx *c, struct gpu_times *t)
{
    (void)c;
    *t = (struct gpu_times){0};
}
int gpuctx_decode_evict(struct gpuctx *c, struct gpu_evict *ev, uint32_t n)
{
    (void)c, (void)ev, (void)n;
    return -ENOTSUP;
}
int gpuctx_decode_evict_launch(struct gpuctx *c, const struct gpu_evict *ev, uint32_t n)
{
    (void)c, (void)ev, (void)n;
    return -ENOTSUP;
}
int gpuctx_ready(struct gpuctx *c)
{
    (void)c;
    return -EIO;
}
int gpuctx_decode_evict_land(struct gpuctx *c, struct gpu_evict *ev, uint32_t n)
{
    (void)c, (void)ev, (void)n;
    return -ENOTSUP;
}
int gpuctx_h2o(struct gpuctx *c, const struct gpu_h2o *j)
{
    (void)c, (void)j;
    return -ENOTSUP;
}
int gpuctx_h2o_init(struct gpuctx *c, float *acc, uint32_t cap, const float *src, uint32_t rows,
                    uint32_t n, float scale)
{
    (void)c, (void)acc, (void)cap, (void)src, (void)rows, (void)n, (void)scale;
    return -ENOTSUP;
}
