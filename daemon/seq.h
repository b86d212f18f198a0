/* seq.h - sequences in the pool: pages per layer, the shared descriptor, the scratch area
 * (query rings, indicator), and the CAKE operations on them. No structure of a sequence
 * needs contiguous pages: K/V and GPU rings are paged, the descriptor and scratch area are
 * pages mapped side by side (pool_window).
 *
 * Ownership: the event loop thread owns a sequence, its pages and its accounting; while a
 * job has it (busy) a worker runs seq_prefill_work/score/apply or seq_decode_evict_work on
 * the sequence's own pages and per-layer state, writing what it did to the job's
 * struct seq_result, and the loop touches nothing of it but `cancel` (atomic) until the job
 * completes (a decode eviction the loop launched itself, seq_decode_evict_launch, is the
 * same: nothing touches the layers until it lands); then the loop commits (seq_prefill_commit, seq_trim_pages, seq_publish) and
 * reads the result. What other requests show (SEQ_INFO) is `pub`, written at commit. */
#ifndef CAKE_SEQ_H
#define CAKE_SEQ_H

#include <stdint.h>

#include "../kernels/kern.h"
#include "gpuexec.h"
#include "../proto/frame.h"
#include "../proto/shm.h"
#include "cakeseq.h"
#include "policy.h"
#include "pool.h"
#include "tenant.h"

#define SEQ_MAX_LAYERS 512
#define SEQ_MAX_HEADS 1024
#define SEQ_MAX_HEAD_DIM 1024
#define SEQ_MAX_TOKENS (1u << 24) /* prompt + new tokens: 16M */
#define SEQ_MAX_WINDOW 4096u     /* the query ring is window rows per head and layer */
#define SEQ_MAX_GPUS FRAME_MAX_GPUS /* GPU pools (one per GPU): the wire's limit */
#define SEQ_MAX_WINDOW_PAGES 65536u /* descriptor + scratch pages (listed in the open reply) */

struct seq_layer {
    uint32_t *pages;     /* [max_pages] pool page indices */
    uint32_t n_pages;
    uint32_t tokens;
    uint32_t ring_rows;  /* valid rows in the query ring */
    float *acc;          /* H2O: accumulated attention per [kv_head][slot], acc_cap slots */
    uint32_t acc_cap;
    uint32_t *pos;       /* original position of each slot, [kv_head][pos_cap]; NULL until
                            the layer is first compacted: slot i holds position i */
    uint32_t pos_cap;
    int pos_gpu;         /* a GPU sequence's layer compacted during the prefill: its prefix
                            positions are in the sequence's pos_dev, pos is NULL */
    /* GPU sequences: the decode step whose eviction may take the layer's window rows'
     * log-sum-exps from lse_dev (the step after the one that left them) and the tokens the
     * layer must hold then (those it was left with, plus the step's one); 0: none left */
    uint32_t lse_next, lse_tokens;
    /* GPU sequences: entries of the layer's order in ord_dev that hold (a one-launch decode
     * eviction filled the prefix's holes: slot order no longer follows position order past
     * the prompt); 0: the prefix is in position order */
    uint32_t ord_n;
};

struct shard_group;

/* What the loop may show of a layer (cachectl seq ID) at any time: copied when the layer is
 * published to the descriptor (sync_layer), i.e. only after a job has committed, never read
 * from state a worker may be writing. */
struct seq_layer_pub {
    uint32_t budget, prefix, tokens, pages;
    double preference;
};

struct seq {
    uint64_t id;
    uint64_t owner;          /* client id */
    struct tenant *tenant;
    uint32_t L, H, Hkv, d, n, max_new;
    enum kern_dtype dt;
    struct policy_cfg cfg;
    uint32_t tpp, max_pages;
    int gpu;                 /* K/V pages and query rings in a GPU pool */
    uint32_t gpu_dev;        /* which one (seq_env.gpu_pools) */
    /* The window (proto/shm.h): host pool pages win_pages[win_n] mapped side by side at win:
     * the descriptor in its first desc_bytes (64-aligned), then the scratch area. */
    uint32_t *win_pages, win_n;
    uint64_t desc_bytes;
    uint8_t *win;
    int win_stitched;
    /* GPU sequences: the query rings, ring_pg[L][ring.pages] pages of the GPU pool */
    uint32_t *ring_pg;
    struct shm_ring ring;
    struct shm_desc *desc;   /* = win */
    struct seq_layer *layer;
    struct seq_layer_pub *pub; /* [L]: loop thread only (see struct seq_layer_pub) */
    struct cakeseq *cs;
    uint32_t next_reserve, next_observe;
    uint32_t decoded;        /* decode tokens reserved */
    uint64_t pages_held;     /* host pages incl. descriptor and scratch */
    uint64_t heap_bytes;     /* caked's own memory held for it (charged at open: seq_heap) */
    uint64_t gpu_pages_held; /* GPU pool pages (K/V and rings) */
    int busy;
    int orphaned;            /* owner gone while busy: free when the work is done */
    int cancel;              /* the same, for the job (atomic): skip the layers not begun */
    struct seq *next_q;      /* in the server's quarantine (server_int.h) */
    /* tensor parallel: this sequence is shard `shard` of a group (server-side state) */
    struct shard_group *group;
    uint32_t shard;
    /* a layer scored but not yet allocated (seq_prefill_score -> seq_prefill_apply; a shard
     * group's two jobs): the worker of the job that has the sequence owns them */
    float *pend_ind;
    /* the engine's log-sum-exps for the layer observed next (seq_take_lse): a private copy,
     * checked; NULL when the observe did not bring them */
    float *lse;
    float *ind_dev;          /* GPU sequences while prefilling: [L][kv_heads][S] indicators on
                                the GPU (selection happens there); NULL otherwise (H2O keeps
                                them until its first decode step) */
    uint32_t *pos_dev;       /* GPU sequences while prefilling: [L][kv_heads][S] the prefix
                                positions of the layers compacted so far (seq_layer.pos_gpu),
                                on the GPU; to the host at the prompt's end */
    float *acc_dev;          /* H2O on the GPU: [L][kv_heads][n + max_new + 1] accumulated scores */
    float *lse_dev;          /* GPU sequences decoding: [L][q_heads][w] the window rows'
                                log-sum-exps by ring slot, carried from one step's eviction to
                                the next (seq_layer.lse_next); NaN-filled when made */
    float *lse_host;         /* host sequences whose decode ranking reads every window row
                                (seq_host_carries): the same as lse_dev in caked's memory,
                                NaN-filled at open */
    uint32_t *ord_dev;       /* GPU sequences decoding: [L][kv_heads][ord_cap] each prefix's
                                slots in position order (seq_layer.ord_n of them), so a step
                                fills its holes instead of shifting every row after them */
    uint32_t ord_cap;        /* the largest budget when it was made (budgets only fall) */
    /* the engine's decode log-sum-exps (cake_put_decode_lse): bit l where it wrote layer l's
     * newest token's for the step at decoded == dlse_at (set by the loop from the step's
     * request, read by that step's eviction); dlse_used, layers whose eviction took them */
    uint8_t dlse[SEQ_MAX_LAYERS / 8];
    uint32_t dlse_at, dlse_used;
    int dec_bufs;            /* lse_dev and ord_dev were made (or could not be) */
    double t_score;          /* seconds the last seq_prefill_score took (CAKED_TRACE) */
    /* pressure (pressure.c): budgets lowered below what a layer holds, evicted by the next
     * job that has the sequence (its decode step, or a re-slice job) - set by the loop,
     * cleared by that job's worker; the pages that eviction is expected to free (loop) */
    int rs_pending;
    uint64_t rs_expect;      /* (seq_expect) */
    int rs_expect_gpu;       /* ... in its GPU pool (else the host's) */
    /* parking (GPU sequences): while parked the layers' K/V pages are host pool pages (the
     * query rings stay in the GPU pool); while a job moves them (moving: 1 to the host, 2
     * back), mv holds the other pool's pages, [L][max_pages] like the layers' own */
    int parked, moving;
    uint32_t *mv;
    /* relocation (cross-tenant pressure): mv holds, for each K/V page, the page it moves to
     * (itself where it stays); set (1) by seq_reloc_prepare, 2 once the job moved them,
     * until seq_reloc_commit */
    int reloc;
    uint32_t parks;          /* times parked */
    double t_used;           /* when a call last had it (the loop's clock: parking's order) */
    uint32_t reslices;       /* times its budgets were lowered */
    uint32_t rs_told;        /* ... when its last decode step replied */
    uint64_t rs_tokens;      /* layer tokens given up in all (sum over layers) */
};

/* What one job did to one sequence. The job owns it: the worker running the job writes it,
 * the loop reads it when the job completes (never the sequence's state for that). */
struct seq_result {
    int rc;                  /* 0, -errno or a CAKE_E* code; -ECANCELED: skipped */
    double pref;             /* prefill: the layer's preference (observed, or the engine's) */
    double ent, var;         /* prefill: the layer's entropy and variance sums (shard groups) */
    uint32_t ev_layers[SEQ_MAX_LAYERS], n_ev; /* layers compacted */
    uint32_t evicted_tokens;
    uint32_t lse_given;      /* decode: layers whose eviction took the engine's log-sum-exps */
};

struct seq_env {
    struct pool *pool;
    struct pool *gpu_pools[SEQ_MAX_GPUS]; /* page allocators over the GPU pools */
    struct gpuexec *gpus[SEQ_MAX_GPUS];   /* streams and workspaces on each GPU */
    uint32_t n_gpus;
    struct tenants *tenants;
    uint64_t heap_limit;  /* caked's own memory for all sequences (--heap-limit) */
    uint64_t *heap_used;  /* ... charged so far (the server's counter; loop thread) */
    int threads;        /* kernel threads per prefill work item (a decode step's layer
                           evictions, and GPU sequences' selections, spread over all cores) */
    int trace;          /* CAKED_TRACE=1: log each prefill layer's phase times on stderr */
    unsigned job_delay_us; /* CAKED_TEST_JOB_DELAY_MS (at most 60 s): each job sleeps first
                              (tests: a stuck call) */
    int workers_only;   /* CAKED_DECODE_ON_WORKERS=1: no decode eviction launched by the loop
                           (benchmarks: the hand-off it saves, side by side) */
    int observe_workers; /* CAKED_OBSERVE_ON_WORKERS=1: no prefill observe launched by the
                            loop (benchmarks: side by side) */
    unsigned stage_worker; /* CAKED_TEST_STAGE_ON_WORKER=N (tests only): a prefill observe
                              the loop launched sends the stage of every layer l with
                              l % N == 0 to a worker (as where its buffers must grow) */
    int ordered;        /* CAKED_COMPACT_ORDERED=1: a GPU prefill's stages keep positional
                           order (benchmarks: the rows that hole filling saves) */
    int recompute;      /* CAKED_DECODE_RECOMPUTE=1: GPU decode evictions carry no window
                           log-sum-exps, both passes every step (benchmarks: side by side) */
    int shift;          /* CAKED_DECODE_SHIFT=1: GPU decode evictions keep position order,
                           shifting every row after a hole (benchmarks: side by side) */
    unsigned layerwise; /* CAKED_TEST_LAYERWISE=N (at most 1000): a GPU sequence's every Nth
                           decode step evicts layer by layer, not in one launch (tests: the
                           way back from filled holes) */
};

struct seq_open_args {
    uint32_t layers, q_heads, kv_heads, head_dim, dtype, prompt_len, max_new;
    int gpu;                /* place K/V and queries in a GPU pool */
    uint32_t gpu_dev;       /* which (index into seq_env.gpu_pools) */
    struct policy_cfg cfg;
};

/* Validates and allocates descriptor + scratch. Returns 0 or CAKE_EINVAL / CAKE_EOOM /
 * -ENOMEM with a message in *why. */
int seq_open(const struct seq_env *e, const struct seq_open_args *a, struct tenant *t,
             uint64_t id, uint64_t owner, struct seq **out, const char **why);
/* Pages such a sequence takes at open: host pool (descriptor and scratch area) and GPU pool
 * (query rings), added to *host and *gpu (nothing for a layout seq_open refuses). */
void seq_open_pages(const struct seq_env *e, const struct seq_open_args *a, uint64_t *host,
                    uint64_t *gpu);
/* Frees every page and the sequence. */
void seq_free(const struct seq_env *e, struct seq *s);

/* Original positions (prompt index, or prompt_len + t for the t-th decoded token) of the
 * slots [from, from + n) of layer l's kv head g, into out; a hole (Ada-KV's per-head
 * budgets) reads SEQ_NO_POSITION. The loop thread, while no job has the sequence. Returns
 * the slots copied (fewer than n past the layer's tokens), or, for a GPU sequence's layer
 * compacted during its prefill (the positions on the device until the prompt's end),
 * -EAGAIN when every GPU context is in use, -EIO. */
#define SEQ_NO_POSITION UINT32_MAX
int seq_positions(const struct seq_env *e, const struct seq *s, uint32_t l, uint32_t g,
                  uint32_t from, uint32_t n, uint32_t *out);

/* Pages for prompt_len tokens of the next layer. */
int seq_reserve(const struct seq_env *e, struct seq *s, uint32_t layer, const char **why);

/* Prefill observe/submit: check (loop), work (worker), commit (loop). */
int seq_prefill_check(const struct seq *s, uint32_t layer, const char **why);
/* Observe with the engine's log-sum-exps of the layer's window rows (cake_put_lse): copies
 * them out of the window into s->lse and checks them (loop, before the job; the job uses
 * the copy, one pass over the keys); take = 0: this observe has none (s->lse freed).
 * Returns 0, CAKE_EINVAL (one not finite) or CAKE_EINTERNAL (out of memory), *why set. */
int seq_take_lse(const struct seq_env *e, struct seq *s, uint32_t layer, int take,
                 const char **why);
void seq_prefill_work(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                      double pref, struct seq_result *r);
/* The same in two halves, for shard groups: score (indicator kept in the sequence, the
 * entropy and variance sums and the shard's own preference in *r), then allocate with the
 * group's preference and evict (*r: a fresh result). */
void seq_prefill_score(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                       double pref, struct seq_result *r);
void seq_prefill_apply(const struct seq_env *e, struct seq *s, uint32_t layer, double pref,
                       struct seq_result *r);
/* After the job (loop): the layer counts as observed unless r->rc. */
void seq_prefill_commit(const struct seq_env *e, struct seq *s, const struct seq_result *r);

/* Decode: does this sequence have layers to evict before the next token? */
int seq_decode_needs_evict(const struct seq *s);
int seq_decode_check(const struct seq *s, const char **why);
void seq_decode_evict_work(const struct seq_env *e, struct seq *s, struct seq_result *r);
/* The same eviction launched by the loop itself, for a GPU sequence whose layers one launch
 * takes (CAKE's ranking and its ablations; not H2O, not while parked, moving or relocating):
 * no worker and no wait, the loop polls the flight and lands it (work.c). Returns 0 with *f
 * in flight, -EAGAIN (it would wait: no GPU context free now, the kernel's first
 * load, buffers to grow) or -ENOTSUP (the worker's way:
 * seq_decode_evict_work), nothing launched, or another -errno (the launch failed: the
 * sequence's step has that error). seq_flight_ready: 1 once the GPU is done with it (or it
 * failed), never waits; then seq_flight_land (loop; frees f) commits to the layers what
 * the kernel did and writes r as seq_decode_evict_work would. The sequence stays busy from
 * the launch to the land. */
struct seq_flight;
int seq_decode_evict_launch(const struct seq_env *e, struct seq *s, struct seq_flight **f);
int seq_flight_ready(struct seq_flight *f);
void seq_flight_land(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                     struct seq_result *r);
/* A GPU sequence's prefill observe run by the loop itself, as the decode step's eviction
 * above: no worker and no wait. seq_prefill_launch issues the layer's scoring (CAKE's
 * ranking and its ablations by mean and variance; not the prompt's last layer, not a shard,
 * not where the host selects, not while parked, moving or relocating) and returns 0 with *f
 * in flight, -EAGAIN or -ENOTSUP (the worker's way: seq_prefill_work), nothing launched, or
 * another -errno (launched and failed: the observe's error). Once seq_flight_ready,
 * seq_prefill_advance (loop) takes the statistics, sets the budgets and issues the
 * cascading stage: 1 with the stage in flight (ready, advance again); 0 when the observe is
 * done (r as seq_prefill_work writes it, f freed); -EAGAIN when the stage needs a worker (a
 * context's buffers to grow): seq_prefill_rest runs it there (frees f). The sequence stays
 * busy throughout. */
int seq_prefill_launch(const struct seq_env *e, struct seq *s, uint32_t layer,
                       struct seq_flight **f);
int seq_prefill_advance(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                        struct seq_result *r);
void seq_prefill_rest(const struct seq_env *e, struct seq *s, struct seq_flight *f,
                      struct seq_result *r);
/* After eviction: frees emptied pages (loop). */
void seq_trim_pages(const struct seq_env *e, struct seq *s);
/* Publishes every reserved layer to the descriptor and `pub` (loop, after a job). */
void seq_publish(const struct seq_env *e, struct seq *s);
/* Pages one more token in every layer needs (in the pool holding its K/V). */
uint32_t seq_decode_pages_needed(const struct seq *s);
/* Admission of one decode step of n sequences of tenant t: 0 or CAKE_EOOM with *why. */
int seq_decode_admit(const struct seq_env *e, struct tenant *t, struct seq *const *seqs,
                     uint32_t n, const char **why);
/* Reserves one token in every layer (pages must have been admitted). Returns 0 or
 * CAKE_EOOM if the pool ran dry (nothing changed then). */
int seq_decode_reserve(const struct seq_env *e, struct seq *s);

/* Pressure: re-slicing a sequence (pressure.c decides whom and how far; seq_room.c acts;
 * loop thread but seq_reslice_work). A sequence can be re-sliced when it is idle and not a shard, and
 * - prefilled: its policy keeps a budget; per layer it holds a prefix within its budget
 *   and has a floor (min_tokens minus the window, at most what it holds), and a cut lowers
 *   the layers' budgets, evicted by the decode rule;
 * - during its prompt (CAKE, fixed mode, cascading, a layer scored): a cut lowers the whole
 *   model's total (C - w) L that the cascade splits (floor: min_tokens minus the window in
 *   every layer), and the scored layers are re-selected as the cascade's next stage would. */
int seq_reslice_ok(const struct seq *s);
/* The prefix tokens it holds or may hold (returned: prefilled, the held prefixes; during
 * the prompt, the total) and its floor (*floor). */
uint64_t seq_reslice_room(const struct seq *s, uint32_t min_tokens, uint64_t *floor);
/* Layer budgets b[L] for a total of `total` (floor .. room): prefilled, each layer's floor,
 * then the rest split as the policy splits its cache - CAKE by its layers' preferences
 * (capped water-filling), other allocations in proportion to what each layer holds - never
 * above what a layer holds; during the prompt, the cascade's budgets of the scored layers
 * (UINT32_MAX for the others). */
void seq_reslice_budgets(const struct seq *s, uint32_t min_tokens, uint64_t total, uint32_t *b);
/* Pages the sequence's K/V would give back at budgets b. */
uint64_t seq_reslice_pages_freed(const struct seq *s, const uint32_t *b);
/* Lowers the budgets to b (during the prompt: the total to `total`) and publishes them;
 * the layers over them are evicted by the sequence's next job (rs_pending: a re-slice job,
 * its decode step, or its next observe). Returns the tokens given up. */
uint64_t seq_reslice_commit(const struct seq_env *e, struct seq *s, uint64_t total,
                            const uint32_t *b);
/* A re-slice job (worker): every layer over its budget + window keeps the top `budget` of
 * its prefix by the policy's decode rule (the ring's window queries; H2O: its accumulated
 * scores) and its window - what a decode step would keep at that budget. */
void seq_reslice_work(const struct seq_env *e, struct seq *s, struct seq_result *r);
int seq_layer_resliced(const struct seq *s, uint32_t l);

/* Parking a GPU sequence (prefilled, idle) in the host pool and restoring it: prepare
 * (loop: admission and the other pool's pages; 0 or CAKE_EOOM / CAKE_EINVAL with *why),
 * work (the job's worker: copies every layer's pages, then the sequence's layers name the
 * new ones and `parked` flips; r->rc), commit (loop: the pages it left go back, or on
 * failure the ones it took; published: a parked sequence shows engines no pages). */
int seq_move_prepare(const struct seq_env *e, struct seq *s, int park, const char **why);
void seq_move_work(const struct seq_env *e, struct seq *s, struct seq_result *r);
void seq_move_commit(const struct seq_env *e, struct seq *s, const struct seq_result *r);
/* Relocation: K/V pages in segments drained for another tenant (pool.h) move to the
 * tenant's other segments, inside a job that has the sequence for its engine's call (its
 * decode step or prefill layer): prepare (loop: new pages for as many of them as the
 * tenant's segments in use have room, the lowest first - the ones a compaction keeps;
 * returns how many, 0: nothing to do now), work (the job's worker, after its eviction:
 * copies the pages the layer still uses and names the new ones; r->rc), commit (loop: the
 * pages left behind go back - or on failure the new ones - and returns how many moved). */
uint32_t seq_reloc_prepare(const struct seq_env *e, struct seq *s);
void seq_reloc_work(const struct seq_env *e, struct seq *s, struct seq_result *r);
uint64_t seq_reloc_commit(const struct seq_env *e, struct seq *s); /* pages moved */

/* The pages the sequence is now expected to give back (a re-slice's eviction, a park), in
 * its GPU pool or the host's; 0 when they came or are no longer owed. Its tenant's
 * admission counts them as given (tenant_giving). */
void seq_expect(const struct seq_env *e, struct seq *s, uint64_t pages, int gpu);

/* GPU pool pages a parked sequence's restore takes (its K/V pages). */
uint64_t seq_kv_pages(const struct seq *s);

/* Bytes the sequence holds in the host pool and in the GPU pool. */
static inline uint64_t seq_bytes(const struct seq_env *e, const struct seq *s)
{
    return s->pages_held * e->pool->page_bytes;
}
static inline uint64_t seq_gpu_bytes(const struct seq_env *e, const struct seq *s)
{
    return s->gpu_pages_held * e->pool->page_bytes;
}

#endif
