/* seq.c - sequences in the pool (see seq.h): layout, accounting, open and free, prefill and
 * decode steps, positions; what gives room under pressure is seq_room.c. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

#include "cake/cake.h"
#include "check.h"
#include "evict.h"
#include "seq_int.h"
#include "indicator.h"

_Static_assert(TENANT_MAX <= POOL_MAX_OWNERS, "tenant ids own pool segments");

static uint64_t ring_layer_bytes(const struct seq *s)
{
    uint64_t b = (uint64_t)s->H * s->cfg.window * s->d * kern_dtype_size(s->dt);
    return (b + 63) & ~UINT64_C(63);
}

uint32_t seq_scored_len(const struct seq *s)
{
    return s->n > s->cfg.window ? s->n - s->cfg.window : 0;
}

static void *scratch_ptr(const struct seq_env *e, const struct seq *s)
{
    (void)e;
    return s->win + s->desc_bytes;
}

/* Host sequences: rings then indicator in the scratch area. GPU sequences: the indicator
 * alone there; their rings are pages of the GPU pool (gpu_ring_view). */
void *seq_ring_ptr(const struct seq_env *e, const struct seq *s, uint32_t l)
{
    return (uint8_t *)scratch_ptr(e, s) + (uint64_t)l * ring_layer_bytes(s);
}

static uint64_t host_ring_bytes(const struct seq *s)
{
    return s->gpu ? 0 : (uint64_t)s->L * ring_layer_bytes(s);
}

float *seq_indicator_ptr(const struct seq_env *e, const struct seq *s)
{
    return (float *)((uint8_t *)scratch_ptr(e, s) + host_ring_bytes(s));
}

/* Bytes of the indicator area, 64-aligned; after it (either placement) the engine's
 * log-sum-exps [L][H][w] f32 (cake_put_lse: libcake finds them there the same way). */
static uint64_t ind_area_bytes(uint64_t kv_heads, uint64_t S)
{
    return (kv_heads * S * 4 + 63) & ~UINT64_C(63);
}

static uint64_t lse_area_bytes(uint64_t layers, uint64_t q_heads, uint64_t w)
{
    return layers * q_heads * w * 4;
}

const float *seq_lse_ptr(const struct seq_env *e, const struct seq *s, uint32_t l)
{
    return (const float *)((const uint8_t *)seq_indicator_ptr(e, s) +
                           ind_area_bytes(s->Hkv, seq_scored_len(s))) +
           (size_t)l * s->H * s->cfg.window;
}

/* (any other eviction - H2O's, a step that skipped the layer, the GPU's layer-by-layer way -
 * leaves lse_next behind) */
int seq_lse_carry(const struct seq *s, uint32_t l)
{
    const struct seq_layer *ly = &s->layer[l];
    return (s->gpu ? s->lse_dev != NULL : s->lse_host != NULL) && ly->lse_next &&
           ly->lse_next == s->decoded && ly->tokens == ly->lse_tokens + 1;
}

int seq_host_carries(const struct seq_env *e, const struct policy_cfg *cfg)
{
    return !e->recompute && cfg->mode == POLICY_FIXED && !cfg->accumulate &&
           cfg->indicator != POLICY_IND_LAST && cfg->indicator != POLICY_IND_POSITION;
}

int seq_decode_lse_given(const struct seq_env *e, const struct seq *s, uint32_t l, float *out)
{
    if (!s->decoded || s->dlse_at != s->decoded || !(s->dlse[l / 8] >> (l % 8) & 1))
        return 0; /* (no decode token before the first step: nothing was given) */
    uint32_t w = s->cfg.window, newest = seq_ring_newest(s); /* the last step's token */
    const float *src = seq_lse_ptr(e, s, l); /* copied, then checked: the engine may write on */
    int ok = 1;
    for (uint32_t h = 0; h < s->H; h++)
        out[h] = src[(size_t)h * w + newest], ok &= isfinite(out[h]) != 0;
    return ok;
}

int seq_take_lse(const struct seq_env *e, struct seq *s, uint32_t layer, int take,
                 const char **why)
{
    size_t n = (size_t)s->H * s->cfg.window;
    if (!take) {
        free(s->lse);
        s->lse = NULL;
        return 0;
    }
    if (!s->lse && !(s->lse = malloc(sizeof(float) * n))) { /* charged at open (heap_bytes) */
        *why = "out of memory";
        return CAKE_EINTERNAL;
    }
    memcpy(s->lse, seq_lse_ptr(e, s, layer), sizeof(float) * n); /* the engine may write on */
    for (size_t i = 0; i < n; i++)
        if (!isfinite(s->lse[i])) {
            free(s->lse);
            s->lse = NULL;
            *why = "a window row's log-sum-exp is not finite";
            return CAKE_EINVAL;
        }
    return 0;
}

struct pool *seq_kv_pool(const struct seq_env *e, const struct seq *s)
{
    return s->gpu && !s->parked ? GPOOL(e, s) : e->pool;
}

void seq_account(const struct seq_env *e, struct seq *s, int64_t pages)
{
    CAKE_CHECK(pages >= 0 || s->pages_held >= (uint64_t)-pages);
    s->pages_held += (uint64_t)pages;
    tenant_charge(s->tenant, pages * (int64_t)e->pool->page_bytes);
}

void seq_account_gpu(const struct seq_env *e, struct seq *s, int64_t pages)
{
    CAKE_CHECK(pages >= 0 || s->gpu_pages_held >= (uint64_t)-pages);
    s->gpu_pages_held += (uint64_t)pages;
    tenant_charge_gpu(s->tenant, pages * (int64_t)e->pool->page_bytes);
}

void seq_account_kv(const struct seq_env *e, struct seq *s, int64_t pages)
{
    if (s->gpu && !s->parked)
        seq_account_gpu(e, s, pages);
    else
        seq_account(e, s, pages);
}

static int admit_kv(const struct seq_env *e, const struct seq *s, uint64_t pages)
{
    struct pool *p = seq_kv_pool(e, s);
    uint64_t pb = p->page_bytes, free_b = pool_avail(p, s->tenant->id) * pb;
    return s->gpu && !s->parked ? tenant_admit_gpu(e->tenants, s->tenant, pages * pb, free_b, p->bytes)
                  : tenant_admit(e->tenants, s->tenant, pages * pb, free_b, p->bytes);
}

/* Bytes the positions of every layer may take (seq_positions_compact): a layer holds at
 * most the prompt and its decoded tokens (per-head budgets can put most of a layer's total
 * in one head, so no tighter bound holds for every policy). */
static uint64_t seq_positions_bound(const struct seq *s)
{
    return 4ull * s->L * s->Hkv * ((uint64_t)s->n + s->max_new + 1);
}

int seq_positions_alloc(const struct seq *s, struct seq_layer *ly, uint32_t k, uint32_t win)
{
    uint32_t cap = k + win + (s->max_new - s->decoded) + 1;
    if (!(ly->pos = malloc(sizeof(uint32_t) * (size_t)s->Hkv * cap)))
        return -ENOMEM;
    ly->pos_cap = cap;
    return 0;
}

int seq_positions_compact(const struct seq *s, struct seq_layer *ly, const uint32_t *keep,
                          uint32_t k, uint32_t old, uint32_t win)
{
    if (!ly->pos) { /* first compaction: slot i held position i */
        if (seq_positions_alloc(s, ly, k, win))
            return -ENOMEM;
        uint32_t cap = ly->pos_cap;
        for (uint32_t g = 0; g < s->Hkv; g++) {
            uint32_t *p = ly->pos + (size_t)g * cap;
            for (uint32_t j = 0; j < k; j++)
                p[j] = keep[(size_t)g * k + j];
            for (uint32_t j = 0; j < win; j++)
                p[k + j] = old + j;
        }
        return 0;
    }
    CAKE_CHECK(k + win <= ly->pos_cap && old + win <= ly->pos_cap);
    uint32_t *tmp = NULL;
    for (uint32_t g = 0; g < s->Hkv; g++) {
        uint32_t *p = ly->pos + (size_t)g * ly->pos_cap;
        const uint32_t *kp = keep + (size_t)g * k;
        uint32_t j = 0;
        while (j < k && kp[j] >= j)
            j++;
        if (j == k) { /* every source at or above its slot (an ordered compaction): in
                         place, ascending, each read before its slot is written */
            for (j = 0; j < k; j++)
                if (kp[j] != j)
                    p[j] = p[kp[j]];
        } else { /* any order (the host's slots with per-head holes) */
            if (!tmp && !(tmp = malloc(sizeof(uint32_t) * ((size_t)k + 1))))
                return -ENOMEM;
            for (j = 0; j < k; j++)
                tmp[j] = p[kp[j]];
            memcpy(p, tmp, sizeof(uint32_t) * k);
        }
        memmove(p + k, p + old, sizeof(uint32_t) * win);
    }
    free(tmp);
    return 0;
}

/* seq_positions_evict's and seq_positions_fill's start: the removed slots checked before
 * memory moves, the layer's positions made where it had none (slot i held position i). */
static int positions_removing(const struct seq *s, struct seq_layer *ly, const uint32_t *ev,
                              uint32_t n_ev, uint32_t old, uint32_t win)
{
    if (n_ev > old)
        return -EIO;
    for (uint32_t g = 0; g < s->Hkv; g++) /* the kernel's answer, checked before memory moves */
        for (uint32_t i = 0; i < n_ev; i++) {
            uint32_t e = ev[(size_t)g * n_ev + i];
            if (e >= old || (i && e <= ev[(size_t)g * n_ev + i - 1]))
                return -EIO;
        }
    if (!ly->pos) { /* first compaction: slot i held position i */
        uint32_t cap = old - n_ev + win + (s->max_new - s->decoded) + 1;
        cap = cap > old + win ? cap : old + win;
        if (!(ly->pos = malloc(sizeof(uint32_t) * (size_t)s->Hkv * cap)))
            return -ENOMEM;
        ly->pos_cap = cap;
        for (uint32_t g = 0; g < s->Hkv; g++)
            for (uint32_t j = 0; j < old + win; j++)
                ly->pos[(size_t)g * cap + j] = j;
    }
    CAKE_CHECK(old + win <= ly->pos_cap);
    return 0;
}

int seq_positions_evict(const struct seq *s, struct seq_layer *ly, const uint32_t *ev,
                        uint32_t n_ev, uint32_t old, uint32_t win)
{
    int rc = positions_removing(s, ly, ev, n_ev, old, win);
    for (uint32_t g = 0; g < s->Hkv && n_ev && !rc; g++) {
        uint32_t *p = ly->pos + (size_t)g * ly->pos_cap;
        const uint32_t *e = ev + (size_t)g * n_ev;
        uint32_t at = e[0];
        for (uint32_t i = 0; i < n_ev; i++) { /* the run between two evicted slots moves down */
            uint32_t from = e[i] + 1, to = i + 1 < n_ev ? e[i + 1] : old + win;
            memmove(p + at, p + from, sizeof(uint32_t) * (to - from));
            at += to - from;
        }
    }
    return rc;
}

int seq_positions_fill(const struct seq *s, struct seq_layer *ly, const uint32_t *ev,
                       uint32_t n_ev, uint32_t old, uint32_t win)
{
    int rc = positions_removing(s, ly, ev, n_ev, old, win);
    uint32_t k = old - n_ev;
    for (uint32_t g = 0; g < s->Hkv && n_ev && !rc; g++) {
        uint32_t *p = ly->pos + (size_t)g * ly->pos_cap;
        const uint32_t *e = ev + (size_t)g * n_ev;
        uint32_t h = 0, at = 0, src = k; /* e[at..]: the removed slots from k on */
        while (at < n_ev && e[at] < k)
            at++;
        for (; h < n_ev && e[h] < k; h++) { /* hole e[h] takes the next kept slot from k */
            while (at < n_ev && e[at] == src)
                src++, at++;
            p[e[h]] = p[src++];
        }
        memmove(p + k, p + old, sizeof(uint32_t) * win);
    }
    return rc;
}

static int pos_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

void seq_positions_sort(const struct seq *s, struct seq_layer *ly, uint32_t n)
{
    for (uint32_t g = 0; ly->pos && g < s->Hkv; g++)
        qsort(ly->pos + (size_t)g * ly->pos_cap, n, sizeof(uint32_t), pos_cmp);
}

int seq_positions(const struct seq_env *e, const struct seq *s, uint32_t l, uint32_t g,
                  uint32_t from, uint32_t n, uint32_t *out)
{
    if (l >= s->L || g >= s->Hkv || from >= s->layer[l].tokens)
        return 0;
    const struct seq_layer *ly = &s->layer[l];
    if (n > ly->tokens - from)
        n = ly->tokens - from;
    int rc = ly->pos_gpu ? seq_gpu_positions(e, s, l, g, from, n, out) : 0;
    if (rc)
        return rc;
    const uint32_t *hk = l < s->next_observe ? cakeseq_head_kept(s->cs, l) : NULL;
    uint32_t prefix = l < s->next_observe ? cakeseq_prefix_len(s->cs, l) : 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = from + i;
        out[i] = hk && slot >= hk[g] && slot < prefix ? SEQ_NO_POSITION
                 : ly->pos_gpu                       ? out[i]
                 : ly->pos                           ? ly->pos[(size_t)g * ly->pos_cap + slot]
                                                     : slot;
    }
    return (int)n;
}

/* Publishes layer l's state to the shared descriptor. */
static void sync_layer(const struct seq_env *e, struct seq *s, uint32_t l)
{
    struct shm_layer *sl = &shm_layers(s->desc)[l];
    const struct seq_layer *ly = &s->layer[l];
    uint64_t *pg = shm_pages(s->desc, s->L, s->max_pages, l);
    uint32_t shown = s->parked ? 0 : ly->n_pages; /* parked: no page an engine could use */
    for (uint32_t i = 0; i < shown; i++)
        pg[i] = (uint64_t)ly->pages[i] * e->pool->page_bytes;
    sl->tokens = ly->tokens;
    sl->pages = shown;
    sl->budget = l < s->next_observe ? cakeseq_budget(s->cs, l) : 0;
    sl->prefix = l < s->next_observe ? cakeseq_prefix_len(s->cs, l) : 0;
    const uint32_t *hk = l < s->next_observe ? cakeseq_head_kept(s->cs, l) : NULL;
    uint32_t *dk = shm_head_kept(s->desc, s->L, s->max_pages, s->Hkv, l);
    for (uint32_t g = 0; g < s->Hkv; g++)
        dk[g] = hk ? hk[g] : sl->prefix;
    sl->holes = hk != NULL;
    /* the slot of the token the last decode step reserved; none (w) before the first: the
     * engine's decode query or log-sum-exp has nowhere to go yet (CAKE_EINVAL) */
    sl->ring_next = s->decoded ? seq_ring_newest(s) : s->cfg.window;
    s->pub[l] = (struct seq_layer_pub){
        .budget = sl->budget, .prefix = sl->prefix, .tokens = ly->tokens, .pages = ly->n_pages,
        .preference = l < s->next_observe ? cakeseq_preference(s->cs, l) : 0,
    };
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

void seq_publish(const struct seq_env *e, struct seq *s)
{
    s->desc->reslices = s->reslices;
    if (s->gpu) /* engines see a parked sequence as such (cake_seq_parked) */
        s->desc->placement = s->parked ? SHM_PLACE_PARKED : SHM_PLACE_GPU;
    for (uint32_t l = 0; l < s->next_reserve; l++)
        sync_layer(e, s, l);
}

struct kern_kv seq_layer_view(const struct seq_env *e, const struct seq *s, uint32_t l,
                              void **pages)
{
    const struct seq_layer *ly = &s->layer[l];
    for (uint32_t i = 0; i < ly->n_pages; i++)
        pages[i] = pool_ptr(e->pool, ly->pages[i]);
    return (struct kern_kv){
        .dtype = s->dt, .kv_heads = s->Hkv, .head_dim = s->d, .tokens_per_page = s->tpp,
        .n_tokens = ly->tokens, .pages = pages,
        .v_offset_bytes = (size_t)s->Hkv * s->tpp * s->d * kern_dtype_size(s->dt),
    };
}

/* What the GPU kernels (kernels/kern_cuda.h) support; NULL when a GPU sequence can open. */
static const char *gpu_layout_check(const struct seq_env *e, const struct seq_open_args *a,
                                    const struct policy_cfg *cfg)
{
    if (!e->n_gpus)
        return "this caked has no GPU pool (start it with --gpu-pool SIZE)";
    if (a->gpu_dev >= e->n_gpus)
        return "no GPU pool on that GPU";
    if (a->dtype != KERN_F16 && a->dtype != KERN_BF16)
        return "GPU sequences hold f16 or bf16 keys and values";
    if (a->head_dim % 16 || a->head_dim > 128)
        return "GPU sequences need head_dim a multiple of 16, at most 128";
    if ((uint64_t)a->q_heads / a->kv_heads * cfg->window > 256)
        return "GPU sequences need (q_heads / kv_heads) * window <= 256";
    if (cfg->mode != POLICY_FIXED)
        return "GPU sequences run fixed mode (parity mode reproduces the reference's "
               "double-precision arithmetic on the host)";
    /* budgets are the host's (any allocation; Ada-KV's per-head split too); the GPU ranks
     * tokens by every indicator, any pooling up to 63 wide, one token set per kv head or one
     * for all (TOVA): seq_gpu.c's gpu_rank_of */
    int keeps_all = cfg->alloc == POLICY_ALLOC_NONE;
    if (!keeps_all && cfg->pool_kernel > 63)
        return "GPU sequences pool over at most 63 tokens (pool_kernel); wider kernels run on "
               "host sequences";
    return NULL;
}

/* Where a sequence of this layout (cfg resolved, tpp tokens per page) keeps its pieces. */
struct geom {
    uint32_t max_pages;
    struct shm_ring ring;
    uint64_t desc_bytes, win_n, rp; /* descriptor; window pages (host); ring pages (GPU) */
};

static struct geom geometry(const struct seq_env *e, const struct seq_open_args *a,
                            const struct policy_cfg *cfg, uint64_t tpp)
{
    struct geom g = {0};
    uint64_t pb = e->pool->page_bytes;
    uint64_t row = (uint64_t)a->head_dim * kern_dtype_size((enum kern_dtype)a->dtype);
    g.max_pages = (uint32_t)(((uint64_t)a->prompt_len + a->max_new + tpp - 1) / tpp);
    if (a->gpu)
        g.ring = shm_ring_geom(a->q_heads, cfg->window, row, pb); /* row <= pb: a token fits a page */
    /* descriptor and scratch area share the window's pages (a small sequence takes one);
     * host sequences' rings, then the indicator, in the scratch area */
    g.desc_bytes = (shm_desc_bytes(a->layers, g.max_pages, a->kv_heads, g.ring.pages) + 63) & ~63ull;
    uint64_t ring_layer = ((uint64_t)a->q_heads * cfg->window * row + 63) & ~UINT64_C(63);
    uint64_t S = a->prompt_len > cfg->window ? a->prompt_len - cfg->window : 0;
    uint64_t scratch = (a->gpu ? 0 : (uint64_t)a->layers * ring_layer) +
                       ind_area_bytes(a->kv_heads, S) +
                       lse_area_bytes(a->layers, a->q_heads, cfg->window);
    g.win_n = (g.desc_bytes + scratch + pb - 1) / pb;
    g.rp = (uint64_t)a->layers * g.ring.pages;
    return g;
}

void seq_open_pages(const struct seq_env *e, const struct seq_open_args *a, uint64_t *host,
                    uint64_t *gpu)
{
    struct policy_cfg cfg = a->cfg;
    cfg.layers = a->layers;
    policy_cfg_resolve(&cfg);
    uint64_t row = (uint64_t)a->head_dim * kern_dtype_size((enum kern_dtype)a->dtype);
    uint64_t tpp = a->kv_heads && row ? e->pool->page_bytes / (2 * a->kv_heads * row) : 0;
    if (!tpp || !a->layers || !a->q_heads)
        return;
    struct geom g = geometry(e, a, &cfg, tpp);
    *host += g.win_n, *gpu += g.rp;
}

int seq_open(const struct seq_env *e, const struct seq_open_args *a, struct tenant *t,
             uint64_t id, uint64_t owner, struct seq **out, const char **why)
{
    if (!a->layers || a->layers > SEQ_MAX_LAYERS) {
        *why = "layers must be in 1..512";
        return CAKE_EINVAL;
    }
    if (!a->q_heads || a->q_heads > SEQ_MAX_HEADS || !a->kv_heads || a->q_heads % a->kv_heads) {
        *why = "q_heads must be a positive multiple of kv_heads (at most 1024)";
        return CAKE_EINVAL;
    }
    if (!a->head_dim || a->head_dim > SEQ_MAX_HEAD_DIM || a->dtype > CAKE_BF16) {
        *why = "head_dim must be in 1..1024 and dtype f32, f16 or bf16";
        return CAKE_EINVAL;
    }
    if (!a->prompt_len || (uint64_t)a->prompt_len + a->max_new > SEQ_MAX_TOKENS) {
        *why = "prompt_len must be >= 1 and prompt_len + max_new_tokens <= 16M";
        return CAKE_EINVAL;
    }
    struct policy_cfg cfg = a->cfg;
    cfg.layers = a->layers, cfg.model_dtype = (enum kern_dtype)a->dtype;
    if ((*why = policy_cfg_check(&cfg)))
        return CAKE_EINVAL;
    policy_cfg_resolve(&cfg);
    if (cfg.window > SEQ_MAX_WINDOW || cfg.cache_size > SEQ_MAX_TOKENS) {
        *why = "window must be at most 4096 and cache_size at most 16M";
        return CAKE_EINVAL;
    }
    if (a->gpu && (*why = gpu_layout_check(e, a, &cfg)))
        return CAKE_EINVAL;
    uint64_t row = (uint64_t)a->head_dim * kern_dtype_size((enum kern_dtype)a->dtype);
    uint64_t tpp = e->pool->page_bytes / (2 * a->kv_heads * row);
    if (!tpp) {
        *why = "one token of this layout does not fit a page: start caked with a larger --page-size";
        return CAKE_EINVAL;
    }
    struct seq *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->id = id, s->owner = owner, s->tenant = t, s->L = a->layers, s->H = a->q_heads;
    s->Hkv = a->kv_heads, s->d = a->head_dim, s->n = a->prompt_len, s->max_new = a->max_new;
    s->dt = (enum kern_dtype)a->dtype, s->cfg = cfg, s->tpp = (uint32_t)tpp;
    struct geom geo = geometry(e, a, &cfg, tpp);
    s->max_pages = geo.max_pages;
    uint64_t pb = e->pool->page_bytes;
    s->gpu = a->gpu, s->gpu_dev = a->gpu ? a->gpu_dev : 0;
    s->ring = geo.ring;
    uint64_t desc_bytes = geo.desc_bytes, win_n = geo.win_n, rp = geo.rp;
    CAKE_CHECK(geo.desc_bytes + host_ring_bytes(s) + ind_area_bytes(s->Hkv, seq_scored_len(s)) +
                   lse_area_bytes(s->L, s->H, cfg.window) <=
               win_n * pb);
    if (win_n > e->pool->pages || (s->gpu && rp > GPOOL(e, s)->pages)) {
        /* also keeps the counts below inside 32 bits */
        free(s);
        *why = "the sequence's descriptor and scratch area are larger than the pool";
        return CAKE_EOOM;
    }
    if (win_n > SEQ_MAX_WINDOW_PAGES) { /* their list travels in the SEQ_OPEN reply */
        free(s);
        *why = "the sequence's descriptor and scratch area exceed 65536 pages: start caked "
               "with a larger --page-size";
        return CAKE_EINVAL;
    }
    s->desc_bytes = desc_bytes, s->win_n = (uint32_t)win_n;
    /* admission before any allocation: a hostile layout must not make us allocate first */
    if (tenant_admit(e->tenants, t, (uint64_t)s->win_n * pb, pool_avail(e->pool, t->id) * pb,
                     e->pool->bytes) ||
        (s->gpu && tenant_admit_gpu(e->tenants, t, rp * pb,
                                    pool_avail(GPOOL(e, s), t->id) * pb, GPOOL(e, s)->bytes))) {
        free(s);
        *why = "the sequence's descriptor and scratch area exceed the tenant's share of the pool";
        return CAKE_EOOM;
    }
    /* caked's own memory for it, bounded like its pages (tenant_admit_heap) */
    uint64_t S = seq_scored_len(s);
    s->heap_bytes = cakeseq_heap_bytes(&cfg, s->Hkv, s->n) +
                    (uint64_t)s->L * (sizeof(*s->layer) + sizeof(*s->pub) + 4ull * s->max_pages) +
                    4ull * (win_n + rp + 1) + 4ull * s->Hkv * S /* pending indicator */ +
                    4ull * s->H * cfg.window /* the engine's log-sum-exps (seq_take_lse) */ +
                    (s->gpu ? 4ull * s->L * s->Hkv * S : 0) /* the GPU's indicators */ +
                    (!s->gpu && seq_host_carries(e, &cfg) ? 4ull * s->L * s->H * cfg.window : 0) +
                    (cfg.accumulate ? 4ull * s->L * s->Hkv * ((uint64_t)s->n + s->max_new + 1) : 0) +
                    seq_positions_bound(s);
    if (tenant_admit_heap(e->tenants, t, s->heap_bytes,
                          e->heap_limit - (*e->heap_used < e->heap_limit ? *e->heap_used : e->heap_limit),
                          e->heap_limit)) {
        free(s);
        *why = "caked's working memory for this sequence (indicators, selection buffers) exceeds "
               "the tenant's share of --heap-limit";
        return CAKE_EOOM;
    }
    int rc = -ENOMEM;
    s->layer = calloc(s->L, sizeof(*s->layer));
    s->pub = calloc(s->L, sizeof(*s->pub));
    s->win_pages = malloc(sizeof(uint32_t) * s->win_n);
    s->ring_pg = malloc(sizeof(uint32_t) * (rp + 1));
    if (!s->layer || !s->pub || !s->win_pages || !s->ring_pg)
        goto fail;
    if (!s->gpu && seq_host_carries(e, &cfg)) { /* the decode steps' carried log-sum-exps */
        size_t nl = (size_t)s->L * s->H * cfg.window;
        if (!(s->lse_host = malloc(sizeof(float) * nl)))
            goto fail;
        for (size_t i = 0; i < nl; i++)
            s->lse_host[i] = NAN;
    }
    for (uint32_t l = 0; l < s->L; l++)
        if (!(s->layer[l].pages = malloc(sizeof(uint32_t) * s->max_pages)))
            goto fail;
    const char *cwhy = NULL;
    if ((rc = cakeseq_create(&cfg, s->Hkv, s->n, &s->cs, &cwhy))) {
        *why = cwhy ? cwhy : "out of memory";
        rc = rc == -EINVAL ? CAKE_EINVAL : rc;
        goto fail;
    }
    /* GPU sequences: the host's selection is what is left of a layer's time, so spread it
     * over the cores (a decode step's layers do the same on the host path) */
    cakeseq_set_threads(s->cs, s->gpu ? 0 : e->threads); /* 0: all cores */
    rc = CAKE_EOOM;
    /* no contiguous run needed: the window maps scattered pages side by side (except in
     * huge-page segments with smaller pages, where it must be one run) */
    int scatter = pool_can_window(e->pool);
    if (pool_alloc_list(e->pool, s->win_n, t->id, POOL_PINNED | (scatter ? POOL_SCATTER : 0),
                        s->win_pages)) {
        *why = scatter ? "no free pages for the sequence descriptor and scratch area"
                       : "no contiguous run of pages for the sequence descriptor and scratch "
                         "area (huge-page segments with pages smaller than a huge page)";
        goto fail;
    }
    if (!(s->win = pool_window(e->pool, s->win_pages, s->win_n, &s->win_stitched))) {
        pool_free_list(e->pool, s->win_pages, s->win_n);
        *why = "cannot map the sequence's descriptor and scratch pages";
        rc = -ENOMEM;
        goto fail;
    }
    if (s->gpu &&
        pool_alloc_list(GPOOL(e, s), (uint32_t)rp, t->id, POOL_PINNED | POOL_SCATTER, s->ring_pg)) {
        pool_window_drop(e->pool, s->win, s->win_n, s->win_stitched);
        pool_free_list(e->pool, s->win_pages, s->win_n);
        *why = "no free GPU pool pages for the query rings";
        goto fail;
    }
    /* engines keep the addresses of these: their segments never drain (pool.h) */
    pool_pin(e->pool, s->win_pages, s->win_n, 1);
    if (s->gpu) {
        pool_pin(GPOOL(e, s), s->ring_pg, (uint32_t)rp, 1);
        seq_account_gpu(e, s, (int64_t)rp);
    }
    seq_account(e, s, s->win_n);
    tenant_charge_heap(t, (int64_t)s->heap_bytes);
    *e->heap_used += s->heap_bytes;
    tenant_count_seq(t, +1);
    s->desc = (struct shm_desc *)s->win;
    memset(s->desc, 0, desc_bytes);
    *s->desc = (struct shm_desc){
        .magic = SHM_DESC_MAGIC, .version = SHM_DESC_VERSION, .seq_id = id, .layers = s->L,
        .q_heads = s->H, .kv_heads = s->Hkv, .head_dim = s->d, .dtype = s->dt,
        .tokens_per_page = s->tpp, .max_pages = s->max_pages, .window = cfg.window,
        .prompt_len = s->n, .placement = s->gpu ? SHM_PLACE_GPU : SHM_PLACE_HOST,
        .ring_offset = s->gpu ? 0 : desc_bytes,
        .ring_layer_bytes = s->gpu ? 0 : ring_layer_bytes(s),
        .indicator_offset = desc_bytes + host_ring_bytes(s),
        .page_bytes = pb, .ring_pages = s->ring.pages,
    };
    for (uint32_t l = 0; l < s->L && s->gpu; l++) {
        uint64_t *rt = shm_ring_pages(s->desc, s->L, s->max_pages, s->Hkv, s->ring.pages, l);
        for (uint32_t i = 0; i < s->ring.pages; i++)
            rt[i] = (uint64_t)s->ring_pg[(size_t)l * s->ring.pages + i] * pb;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    *out = s;
    return 0;
fail:
    if (s->layer)
        for (uint32_t l = 0; l < s->L; l++)
            free(s->layer[l].pages);
    free(s->layer);
    free(s->pub);
    free(s->win_pages);
    free(s->ring_pg);
    cakeseq_destroy(s->cs);
    free(s);
    return rc;
}

static void free_layer_pages(const struct seq_env *e, struct seq *s, uint32_t l, uint32_t keep)
{
    struct seq_layer *ly = &s->layer[l];
    for (uint32_t i = keep; i < ly->n_pages; i++)
        pool_free_run(seq_kv_pool(e, s), ly->pages[i], 1);
    seq_account_kv(e, s, -(int64_t)(ly->n_pages - keep));
    ly->n_pages = keep;
}

void seq_free(const struct seq_env *e, struct seq *s)
{
    for (uint32_t l = 0; l < s->L; l++) {
        free_layer_pages(e, s, l, 0);
        free(s->layer[l].pages);
        free(s->layer[l].acc);
        free(s->layer[l].pos);
    }
    pool_window_drop(e->pool, s->win, s->win_n, s->win_stitched);
    pool_pin(e->pool, s->win_pages, s->win_n, -1);
    pool_free_list(e->pool, s->win_pages, s->win_n);
    seq_account(e, s, -(int64_t)s->win_n);
    if (s->gpu) {
        pool_pin(GPOOL(e, s), s->ring_pg, s->L * s->ring.pages, -1);
        pool_free_list(GPOOL(e, s), s->ring_pg, s->L * s->ring.pages);
        seq_account_gpu(e, s, -(int64_t)s->L * s->ring.pages);
    }
    free(s->win_pages);
    free(s->ring_pg);
    CAKE_CHECK(!s->moving && !s->reloc); /* committed (pages given back) before a free */
    seq_expect(e, s, 0, 0);
    free(s->mv);
    tenant_charge_heap(s->tenant, -(int64_t)s->heap_bytes);
    CAKE_CHECK(*e->heap_used >= s->heap_bytes);
    *e->heap_used -= s->heap_bytes;
    tenant_count_seq(s->tenant, -1);
    free(s->layer);
    free(s->pub);
    free(s->pend_ind);
    free(s->lse);
    free(s->lse_host);
    seq_exec(s)->prefill_done(e, s); /* what the executor kept for the prefill */
    if (s->gpu) { /* H2O's, which outlive the prefill */
        gpuexec_dev_free(GEXEC(e, s), s->ind_dev);
        gpuexec_dev_free(GEXEC(e, s), s->acc_dev);
        gpuexec_dev_free(GEXEC(e, s), s->lse_dev);
        gpuexec_dev_free(GEXEC(e, s), s->ord_dev);
    }
    cakeseq_destroy(s->cs);
    free(s);
}

int seq_reserve(const struct seq_env *e, struct seq *s, uint32_t layer, const char **why)
{
    if (s->busy) {
        *why = "sequence busy";
        return CAKE_ESTATE;
    }
    if (layer != s->next_reserve || layer >= s->L) {
        *why = "layers must be reserved once each, in order";
        return CAKE_ESTATE;
    }
    uint32_t need = (s->n + s->tpp - 1) / s->tpp;
    if (admit_kv(e, s, need)) {
        *why = s->gpu ? "layer pages exceed the tenant's share of the GPU pool"
                      : "layer pages exceed the tenant's share of the pool";
        return CAKE_EOOM;
    }
    struct seq_layer *ly = &s->layer[layer];
    for (uint32_t i = 0; i < need; i++) {
        int64_t p = pool_alloc(seq_kv_pool(e, s), s->tenant->id);
        if (p < 0) {
            seq_account_kv(e, s, i);
            ly->n_pages = i;
            free_layer_pages(e, s, layer, 0);
            *why = "pool exhausted";
            return CAKE_EOOM;
        }
        ly->pages[i] = (uint32_t)p;
    }
    ly->n_pages = need;
    ly->tokens = s->n;
    seq_account_kv(e, s, need);
    s->next_reserve++;
    sync_layer(e, s, layer);
    return 0;
}

int seq_prefill_check(const struct seq *s, uint32_t layer, const char **why)
{
    if (s->busy) {
        *why = "sequence busy";
        return CAKE_ESTATE;
    }
    if (layer != s->next_observe || layer >= s->next_reserve) {
        *why = "layers must be observed in order, after they are reserved";
        return CAKE_ESTATE;
    }
    return 0;
}

void seq_prefill_score(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                       double pref, struct seq_result *r)
{
    uint32_t S = seq_scored_len(s);
    double t0 = e->trace ? clock_now_s() : 0;
    *r = (struct seq_result){0};
    free(s->pend_ind);
    s->pend_ind = NULL;
    r->rc = seq_exec(s)->score(e, s, layer, observe, r);
    if (observe) /* the layer's preference from its entropy and variance (none to score: 0) */
        pref = S ? policy_preference(&s->cfg, r->ent, r->var) : 0.0;
    r->pref = pref;
    if (e->trace)
        s->t_score = clock_now_s() - t0;
}

/* A prefill layer's end, after its stage (ev[nev], compacted unless r->rc): the cascade's
 * re-selection noted, the prompt's end, CAKED_TRACE's line (t0 the budgets' start, t1 the
 * stage's, how: who ran it). */
static void prefill_end(const struct seq_env *e, struct seq *s, uint32_t layer,
                        const struct cakeseq_evict *ev, uint32_t nev, struct seq_result *r,
                        double t0, double t1, const char *how)
{
    const struct seq_exec *x = seq_exec(s);
    free(s->pend_ind);
    s->pend_ind = NULL;
    if (!r->rc && s->cfg.cascading)
        s->rs_pending = 0; /* this stage re-selected every layer at the (lowered) total */
    if (!r->rc && layer == s->L - 1 && x->prefill_order) /* slots ascend again for decode */
        r->rc = x->prefill_order(e, s);
    if (!r->rc && layer == s->L - 1) { /* then the selection buffers are done with */
        cakeseq_prefill_done(s->cs);
        x->prefill_done(e, s);
    }
    if (e->trace) {
        uint64_t moved = 0;
        for (uint32_t i = 0; i < nev; i++)
            moved += ev[i].kept;
        fprintf(stderr, "caked trace: seq %#llx layer %u %s: score %.0f us, select %.0f us, "
                "compact %.0f us (%u layers, %llu tokens per head kept)\n",
                (unsigned long long)s->id, layer, how, s->t_score * 1e6, (t1 - t0) * 1e6,
                (clock_now_s() - t1) * 1e6, nev, (unsigned long long)moved);
    }
}

void seq_prefill_apply(const struct seq_env *e, struct seq *s, uint32_t layer, double pref,
                       struct seq_result *r)
{
    struct cakeseq_evict ev[SEQ_MAX_LAYERS];
    uint32_t nev = 0;
    const struct seq_exec *x = seq_exec(s);
    r->pref = pref;
    double t0 = e->trace ? clock_now_s() : 0;
    if (!r->rc) /* budgets; the kept set too where the indicator is on the host */
        r->rc = cakeseq_prefill_layer(s->cs, layer, pref, x->selection(s), ev, &nev);
    double t1 = e->trace ? clock_now_s() : 0;
    if (!r->rc && nev) /* a cascading stage re-compacts every earlier layer whose budget shrank */
        r->rc = x->compact(e, s, ev, nev, r);
    prefill_end(e, s, layer, ev, nev, r, t0, t1, "on a worker");
}

void seq_prefill_work(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                      double pref, struct seq_result *r)
{
    seq_prefill_score(e, s, layer, observe, pref, r);
    seq_prefill_apply(e, s, layer, r->pref, r);
}

void seq_trim_pages(const struct seq_env *e, struct seq *s)
{
    for (uint32_t l = 0; l < s->next_reserve; l++) {
        uint32_t keep = (s->layer[l].tokens + s->tpp - 1) / s->tpp;
        if (keep < s->layer[l].n_pages)
            free_layer_pages(e, s, l, keep);
    }
}

void seq_prefill_commit(const struct seq_env *e, struct seq *s, const struct seq_result *r)
{
    if (!r->rc)
        s->next_observe++;
    seq_trim_pages(e, s);
    seq_publish(e, s);
}

int seq_decode_check(const struct seq *s, const char **why)
{
    if (s->busy) {
        *why = "sequence busy";
        return CAKE_ESTATE;
    }
    if (s->next_observe != s->L) {
        *why = "decode before every layer was prefilled";
        return CAKE_ESTATE;
    }
    if (s->decoded >= s->max_new) {
        *why = "sequence reached its max_new_tokens";
        return CAKE_ETOOBIG;
    }
    return 0;
}

/* A re-slice lowered the layer's budget below what it holds (applied at its next eviction,
 * whatever the decode rule and slack). */
int seq_layer_resliced(const struct seq *s, uint32_t l)
{
    return s->rs_pending && s->layer[l].tokens > (uint64_t)cakeseq_budget(s->cs, l) + s->cfg.window;
}

static int layer_over(const struct seq *s, uint32_t l)
{
    return seq_layer_resliced(s, l) ||
           (s->decoded > 0 &&
            policy_decode_should_evict(&s->cfg, cakeseq_budget(s->cs, l), s->layer[l].tokens));
}

int seq_decode_needs_evict(const struct seq *s)
{
    if (s->cfg.accumulate && (s->decoded > 0 || s->rs_pending))
        return 1; /* H2O adds every step's attention, evicting or not */
    for (uint32_t l = 0; l < s->L; l++)
        if (layer_over(s, l))
            return 1;
    return 0;
}

/* The layers a decode step evicts (non-H2O), in over[], and how many of the ring's rows are
 * valid queries. */
static uint32_t decode_over(const struct seq *s, uint32_t *over, uint32_t *valid)
{
    uint32_t w = s->cfg.window, v0 = s->n < w ? s->n : w, nover = 0;
    *valid = v0 + s->decoded < w ? v0 + s->decoded : w;
    for (uint32_t l = 0; l < s->L; l++)
        if (layer_over(s, l))
            over[nover++] = l;
    return nover;
}

/* A decode eviction's result r from each layer's count and error. */
static void decode_result(struct seq *s, const uint32_t *over, uint32_t nover,
                          const uint32_t *evicted, const int *rcs, struct seq_result *r)
{
    for (uint32_t i = 0; i < nover; i++) {
        if (rcs[i]) {
            if (!r->rc)
                r->rc = rcs[i];
            continue;
        }
        if (evicted[i] || !s->cfg.accumulate) {
            r->evicted_tokens += evicted[i];
            r->ev_layers[r->n_ev++] = over[i];
        }
    }
    if (!r->rc)
        s->rs_pending = 0; /* a re-slice's budgets are held now */
    r->lse_given = s->dlse_used;
    s->dlse_used = 0;
}

void seq_decode_evict_work(const struct seq_env *e, struct seq *s, struct seq_result *r)
{
    uint32_t over[SEQ_MAX_LAYERS], nover = 0, evicted[SEQ_MAX_LAYERS] = {0};
    int rcs[SEQ_MAX_LAYERS] = {0};
    *r = (struct seq_result){0};
    if (s->cfg.accumulate) { /* H2O: every layer adds the step's attention */
        for (uint32_t l = 0; l < s->L; l++)
            over[nover++] = l;
        if (s->gpu)
            seq_gpu_h2o(e, s, s->decoded > 0, evicted, rcs);
        else
            seq_host_h2o_step(e, s, evicted, rcs);
    } else {
        uint32_t valid;
        nover = decode_over(s, over, &valid);
        if (nover)
            seq_exec(s)->decode_evict(e, s, over, nover, valid, evicted, rcs);
    }
    decode_result(s, over, nover, evicted, rcs, r);
}

/* Work the loop launched (seq_decode_evict_launch, seq_prefill_launch): a decode step's
 * layers over[nover], or a prefill observe's layer and - once scored - its stage ev[nev]
 * (staged: launched), on the GPU as g. */
struct seq_flight {
    uint32_t over[SEQ_MAX_LAYERS], nover;
    struct gpu_flight *g;
    int staged;
    uint32_t layer, nev;
    double t_score, t_select, t_stage; /* CAKED_TRACE: when each began */
    struct cakeseq_evict *ev;          /* [s->L] */
};

static void flight_free(struct seq_flight *f)
{
    if (f)
        free(f->ev);
    free(f);
}

int seq_decode_evict_launch(const struct seq_env *e, struct seq *s, struct seq_flight **out)
{
    if (!s->gpu || s->cfg.accumulate || s->moving || s->reloc || s->parked)
        return -ENOTSUP;
    struct seq_flight *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOTSUP; /* a worker's turn */
    uint32_t valid;
    int rc = (f->nover = decode_over(s, f->over, &valid))
                 ? seq_gpu_evict_launch(e, s, f->over, f->nover, valid, &f->g) : -ENOTSUP;
    if (rc == -ENOMEM)
        rc = -ENOTSUP; /* this process's heap, or the context's staging: the worker's way */
    if (rc) {
        free(f);
        return rc;
    }
    *out = f;
    return 0;
}

int seq_flight_ready(struct seq_flight *f)
{
    return seq_gpu_flight_ready(f->g);
}

int seq_prefill_launch(const struct seq_env *e, struct seq *s, uint32_t layer,
                       struct seq_flight **out)
{
    if (!s->gpu || s->group || layer + 1 >= s->L || policy_host_selects(&s->cfg) || s->moving ||
        s->reloc || s->parked || !seq_scored_len(s))
        return -ENOTSUP; /* the prompt's last layer puts every layer in order: a worker's */
    struct seq_flight *f = calloc(1, sizeof(*f));
    if (!f || !(f->ev = malloc(sizeof(*f->ev) * s->L))) {
        flight_free(f);
        return -ENOTSUP;
    }
    f->layer = layer;
    f->t_score = e->trace ? clock_now_s() : 0;
    int rc = seq_gpu_score_launch(e, s, layer, &f->g);
    if (rc) {
        flight_free(f);
        return rc == -ENOMEM ? -ENOTSUP : rc;
    }
    free(s->pend_ind);
    s->pend_ind = NULL;
    *out = f;
    return 0;
}

int seq_prefill_advance(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                        struct seq_result *r)
{
    double now = e->trace ? clock_now_s() : 0;
    if (f->staged) {
        r->rc = seq_gpu_stage_land(e, s, f->ev, f->nev, f->g, r);
    } else {
        *r = (struct seq_result){0};
        r->rc = seq_gpu_score_land(e, s, f->layer, f->g, r);
        uint32_t S = seq_scored_len(s);
        r->pref = S ? policy_preference(&s->cfg, r->ent, r->var) : 0.0;
        s->t_score = now - f->t_score;
        f->t_select = now;
        if (!r->rc) /* budgets (the kept sets are the GPU's) */
            r->rc = cakeseq_prefill_layer(s->cs, f->layer, r->pref, NULL, f->ev, &f->nev);
        f->t_stage = e->trace ? clock_now_s() : 0;
        if (!r->rc && f->nev) {
            int rc = e->stage_worker && f->layer % e->stage_worker == 0
                         ? -EAGAIN /* (tests: as where the buffers must grow) */
                         : seq_gpu_stage_launch(e, s, f->ev, f->nev, f->g);
            if (!rc) {
                f->staged = 1;
                return 1;
            }
            if (rc == -EAGAIN || rc == -ENOMEM) {
                seq_gpu_flight_end(e, s, f->g); /* the context back: the worker takes one */
                f->g = NULL;
                return -EAGAIN;
            }
            r->rc = rc; /* launched and failed (waited for) */
        }
    }
    seq_gpu_flight_end(e, s, f->g);
    prefill_end(e, s, f->layer, f->ev, f->nev, r, f->t_select, f->t_stage, "launched by the loop");
    flight_free(f);
    return 0;
}

void seq_prefill_rest(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                      struct seq_result *r)
{
    r->rc = seq_exec(s)->compact(e, s, f->ev, f->nev, r);
    prefill_end(e, s, f->layer, f->ev, f->nev, r, f->t_select, f->t_stage,
                "scored by the loop, its stage on a worker");
    flight_free(f);
}

void seq_flight_land(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                     struct seq_result *r)
{
    uint32_t evicted[SEQ_MAX_LAYERS] = {0};
    int rcs[SEQ_MAX_LAYERS], rc = seq_gpu_evict_land(e, s, f->over, f->nover, f->g, evicted);
    for (uint32_t i = 0; i < f->nover; i++)
        rcs[i] = rc;
    *r = (struct seq_result){0};
    decode_result(s, f->over, f->nover, evicted, rcs, r);
    free(f);
}

uint32_t seq_decode_pages_needed(const struct seq *s)
{
    uint32_t need = 0;
    for (uint32_t l = 0; l < s->L; l++)
        need += s->layer[l].tokens + 1 > s->layer[l].n_pages * s->tpp;
    return need;
}

int seq_decode_admit(const struct seq_env *e, struct tenant *t, struct seq *const *seqs,
                     uint32_t n, const char **why)
{
    uint64_t host = 0, gpu[SEQ_MAX_GPUS] = {0}, pb = e->pool->page_bytes;
    for (uint32_t i = 0; i < n; i++)
        *(seqs[i]->gpu ? &gpu[seqs[i]->gpu_dev] : &host) += seq_decode_pages_needed(seqs[i]);
    if (host && tenant_admit(e->tenants, t, host * pb, pool_avail(e->pool, t->id) * pb,
                             e->pool->bytes)) {
        *why = "the decode step's pages exceed the tenant's share of the pool";
        return CAKE_EOOM;
    }
    for (uint32_t d = 0; d < e->n_gpus; d++)
        if (gpu[d] && tenant_admit_gpu(e->tenants, t, gpu[d] * pb,
                                       pool_avail(e->gpu_pools[d], t->id) * pb,
                                       e->gpu_pools[d]->bytes)) {
            *why = "the decode step's pages exceed the tenant's share of the GPU pool";
            return CAKE_EOOM;
        }
    return 0;
}

int seq_decode_reserve(const struct seq_env *e, struct seq *s)
{
    uint32_t need = seq_decode_pages_needed(s);
    struct pool *p = seq_kv_pool(e, s);
    if (need > pool_avail(p, s->tenant->id))
        return CAKE_EOOM;
    uint32_t stack[64], *got = need <= 64 ? stack : malloc(sizeof(uint32_t) * need);
    if (!got)
        return CAKE_EOOM;
    for (uint32_t i = 0; i < need; i++) { /* all pages first: nothing changes on failure */
        int64_t pg = pool_alloc(p, s->tenant->id);
        if (pg < 0) {
            for (uint32_t k = 0; k < i; k++)
                pool_free_run(p, got[k], 1);
            if (got != stack)
                free(got);
            return CAKE_EOOM;
        }
        got[i] = (uint32_t)pg;
    }
    uint32_t used = 0;
    for (uint32_t l = 0; l < s->L; l++) {
        struct seq_layer *ly = &s->layer[l];
        if (ly->tokens + 1 > ly->n_pages * s->tpp) {
            /* decoded < max_new bounds tokens, so max_pages has room */
            ly->pages[ly->n_pages++] = got[used++];
            seq_account_kv(e, s, 1);
        }
        if (ly->pos) { /* room for every decode token: seq_positions_compact */
            CAKE_CHECK(ly->tokens < ly->pos_cap);
            for (uint32_t g = 0; g < s->Hkv; g++)
                ly->pos[(size_t)g * ly->pos_cap + ly->tokens] = s->n + s->decoded;
        }
        ly->tokens++;
    }
    if (got != stack)
        free(got);
    s->decoded++;
    for (uint32_t l = 0; l < s->L; l++)
        sync_layer(e, s, l);
    return 0;
}
