/* cake.h - libcake, the client library of caked (the CAKE KV-cache daemon).
 *
 * An engine attaches to caked over a Unix socket, opens one sequence per request, and
 * reads and writes keys, values and queries in place in the daemon's shared pool; caked
 * decides which tokens each layer keeps (CAKE) and compacts them inside the engine's own
 * calls, so no engine ever reads a page while it moves.
 *
 * Lifecycle (as LMDB): cake_create -> cake_set_* -> cake_connect -> ... -> cake_destroy.
 * Errors: functions return 0 (or a count) on success, -errno for system errors and
 * CAKE_E* (a reserved negative range) for protocol errors; cake_strerror() names both and
 * cake_errstr(ctx) holds the daemon's last message. No errno side channel.
 * Threads: a cake_ctx and its sequences may be used by one thread at a time (calls on one
 * context must be serialized by the caller); separate contexts are independent.
 * The library never owns an event loop: calls block; cake_fd() can be polled.
 * The library never links jemalloc; cake_set_allocator() hooks its heap. */
#ifndef CAKE_CAKE_H
#define CAKE_CAKE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CAKE_API __attribute__((visibility("default")))
#else
#define CAKE_API
#endif

#define CAKE_PROTOCOL_VERSION 3 /* 2: per-tenant pool segments (MAP frames); 3: paged windows and GPU rings */
#define CAKE_VERSION "0.1.0"

/* Error codes (negative; -1..-4095 are -errno). */
#define CAKE_EPROTO (-5001)    /* malformed or unexpected frame */
#define CAKE_EVERSION (-5002)  /* protocol version mismatch */
#define CAKE_EOOM (-5003)      /* pool or tenant quota exhausted */
#define CAKE_ENOSEQ (-5004)    /* no such sequence (or not this tenant's) */
#define CAKE_EINVAL (-5005)    /* invalid argument */
#define CAKE_EPERM (-5006)     /* not allowed for this peer */
#define CAKE_ESHUTDOWN (-5007) /* daemon shut down or the connection closed */
#define CAKE_ETOOBIG (-5008)   /* request over a size limit */
#define CAKE_ESTATE (-5009)    /* request out of order (e.g. a layer not yet reserved) */
#define CAKE_EINTERNAL (-5010) /* daemon-side failure; see cake_errstr */
#define CAKE_ENOTCONN (-5011)  /* context not connected */

enum cake_dtype { CAKE_F32 = 0, CAKE_F16 = 1, CAKE_BF16 = 2 };
enum cake_mode { CAKE_MODE_PARITY = 0, CAKE_MODE_FIXED = 1 };
/* Where a sequence's keys, values and window queries live. */
enum cake_placement { CAKE_PLACE_HOST = 0, CAKE_PLACE_GPU = 1 };

typedef struct cake_ctx cake_ctx;
typedef struct cake_seq cake_seq;

/* Text for an error code (static). */
CAKE_API const char *cake_strerror(int err);

/* Creates a context. *out owned by the caller until cake_destroy(). Returns 0 or -ENOMEM. */
CAKE_API int cake_create(cake_ctx **out);
/* Closes the connection, releases every sequence handle and unmaps the pool. The
 * daemon frees everything the connection owned. NULL is a no-op. */
CAKE_API void cake_destroy(cake_ctx *ctx);

/* Before cake_connect(): the service (tenant) name to declare (1..63 printable chars;
 * default "default"). Returns 0 or CAKE_EINVAL (also after connecting). The string is
 * copied. */
CAKE_API int cake_set_service(cake_ctx *ctx, const char *name);
/* Before cake_connect(): heap hooks for the library's own allocations (reply buffers,
 * sequence handles). Returns 0 or CAKE_EINVAL (a NULL hook, or already connected). */
CAKE_API int cake_set_allocator(cake_ctx *ctx, void *(*alloc)(size_t size, void *ud),
                       void (*release)(void *ptr, void *ud), void *ud);
/* Before cake_connect(): the GPUs whose pools this process maps, as a comma-separated list of
 * UUIDs ("GPU-..."); NULL or "" (the default): every pool on a GPU this process can use
 * (e.g. a tensor-parallel rank with CUDA_VISIBLE_DEVICES set maps its own GPU's only).
 * Returns 0 or CAKE_EINVAL. */
CAKE_API int cake_set_gpus(cake_ctx *ctx, const char *uuids);
/* Before cake_connect(): reply timeout (0 = wait forever; default 0; negative: CAKE_EINVAL,
 * else 0). A call that times out
 * returns -ETIMEDOUT; caked may still carry out the request (a shard waiting at its barrier
 * completes when the other ranks arrive), and the late reply is skipped by the next call. A
 * timeout midway through a frame drops the connection (later calls: CAKE_ENOTCONN). */
CAKE_API int cake_set_timeout_ms(cake_ctx *ctx, int timeout_ms);
/* Before cake_connect(): the uid caked must run as. cake_connect() reads the listening
 * server's uid from the kernel (SO_PEERCRED) before it sends anything, and refuses any other
 * with CAKE_EPERM: a socket path some other user took over never sees HELLO. -1 (the
 * default): root or this process's own uid. Returns 0 or CAKE_EINVAL. */
CAKE_API int cake_set_server_uid(cake_ctx *ctx, long uid);
/* Before cake_connect(): ask for administration on this connection (quotas, every tenant's
 * details; granted to root, caked's own uid and --admin-group members, otherwise the
 * connection sees its own tenant only). Engines need not. Returns 0 or CAKE_EINVAL. */
CAKE_API int cake_set_admin(cake_ctx *ctx, int admin);
/* Before cake_connect(): under memory pressure (caked's --pressure reslice, the default),
 * let caked compact this context's idle sequences inside any of its calls, not only inside
 * calls on those sequences. A call that waits for room (a reserve, an open or a decode step
 * that does not fit the tenant's share) then gets it from the context's own other
 * sequences at once, by their lowered budgets (cake_layer_budget, cake_seq_reslices); without
 * it they give it back at their own next decode step, which a context that prefills before
 * it decodes never reaches while it waits. The price: with it set, the addresses of every
 * sequence of the context (cake_key, cake_layer_pages, ...) are valid only until the
 * context's next call, and every write to any of them must be complete (GPU: synchronized)
 * before the context calls caked. Default 0. Returns 0 or CAKE_EINVAL. */
CAKE_API int cake_set_shrink_idle(cake_ctx *ctx, int allow);

/* Default socket path: $CAKED_SOCKET, else $XDG_RUNTIME_DIR/caked.sock, else
 * /tmp/caked-$UID/caked.sock. Writes at most len bytes; returns 0 or -ENAMETOOLONG. */
CAKE_API int cake_default_socket(char *buf, size_t len);

/* Connects to socket_path (NULL: the default), checks the server's uid
 * (cake_set_server_uid), agrees on the protocol version and, with map_pool, reserves the
 * pools' address ranges: the segments of this client's tenant are mapped into them as caked
 * passes them (with the replies that follow), and no other tenant's memory ever is. Returns
 * 0, -errno, CAKE_EPERM, CAKE_EVERSION, CAKE_EPROTO, CAKE_EINVAL (already connected). */
CAKE_API int cake_connect(cake_ctx *ctx, const char *socket_path, int map_pool);

/* The socket (readable when a reply is waiting), for embedding in an event loop. */
CAKE_API int cake_fd(const cake_ctx *ctx);
/* The daemon's or library's last error message (owned by ctx; valid until the next call). */
CAKE_API const char *cake_errstr(const cake_ctx *ctx);
/* The host pool's address range in this process (NULL if not mapped) and its size. Only
 * the segments of this client's tenant are mapped in it (cake_pool_mapped); the rest is
 * reserved address space that faults if touched. Offsets caked gives are from this base. */
CAKE_API void *cake_pool_base(const cake_ctx *ctx);
CAKE_API size_t cake_pool_bytes(const cake_ctx *ctx);
/* 1 if [addr, addr + len) lies in host pool segments mapped in this process, else 0. */
CAKE_API int cake_pool_mapped(const cake_ctx *ctx, const void *addr, size_t len);

/* caked's GPU pools (caked --gpu-pool, one per GPU), in caked's order: how many, each one's
 * GPU UUID (NULL past the end), and its device address and size in this process (0 when
 * not mapped here: this libcake was built without CUDA, this process cannot use that GPU,
 * or cake_set_gpus() left it out - cake_errstr() says why). The host pool is registered with
 * CUDA whenever a GPU pool is mapped. */
CAKE_API uint32_t cake_gpu_count(const cake_ctx *ctx);
CAKE_API const char *cake_gpu_uuid_at(const cake_ctx *ctx, uint32_t i);
CAKE_API uint64_t cake_gpu_pool_base_at(const cake_ctx *ctx, uint32_t i);
CAKE_API size_t cake_gpu_pool_bytes_at(const cake_ctx *ctx, uint32_t i);
/* 1 if [offset, offset + len) of GPU pool i is mapped in this process (its tenant's
 * segments; a legacy-IPC pool is mapped whole), else 0. */
CAKE_API int cake_gpu_pool_mapped(const cake_ctx *ctx, uint32_t i, uint64_t offset, size_t len);

/* Round trip without work (latency probes). Returns 0, CAKE_ENOTCONN, -ETIMEDOUT,
 * CAKE_ESHUTDOWN (caked went away) or -errno. */
CAKE_API int cake_ping(cake_ctx *ctx);

/* ---- sequences ---------------------------------------------------------- */

/* The public structs keep room to grow (as io_uring_params does): their reserved words must
 * be zero, which a designated initializer, a zeroed struct or cake_policy_default() give;
 * a later libcake gives them meanings whose zero is today's behaviour. Their sizes are part
 * of the ABI (64 and 128 bytes). */
struct cake_layout {
    uint32_t layers;
    uint32_t q_heads;
    uint32_t kv_heads;
    uint32_t head_dim;
    enum cake_dtype dtype;
    /* CAKE_PLACE_GPU: K/V pages and query rings in caked's GPU pool (cake_gpu_pool_base_at()
     * must be mapped), scored and compacted there by caked's CUDA kernels. Needs f16 or
     * bf16, head_dim a multiple of 16 up to 128, (q_heads / kv_heads) * window <= 256,
     * fixed mode, and pooling at most 63 wide (every policy and component runs). Zero (the
     * default of a zeroed struct) is the host pool. */
    enum cake_placement placement;
    uint32_t gpu; /* CAKE_PLACE_GPU: which of caked's GPU pools (cake_gpu_uuid_at); 0 first */
    uint32_t reserved[9];
};

/* Eviction policies (daemon/README.md "Policies" documents each one's parameters and how
 * it differs from its original code). Every kind uses the same window w and the same total
 * (cache_size - w) * layers, so comparisons are fair. */
enum cake_policy_kind {
    CAKE_POLICY_CAKE = 0,        /* CAKE: preference-sliced layer budgets, mean + gamma * var */
    CAKE_POLICY_FULL = 1,        /* keep everything */
    CAKE_POLICY_STREAMINGLLM = 2,/* `sinks` first tokens + the most recent */
    CAKE_POLICY_H2O = 3,         /* attention accumulated over the window and every decode query */
    CAKE_POLICY_TOVA = 4,        /* the newest query's attention, one token set per layer */
    CAKE_POLICY_SNAPKV = 5,      /* the window's attention, max-pooled (7), prefill only */
    CAKE_POLICY_PYRAMIDKV = 6,   /* SnapKV's scores, budgets falling with depth (beta 20) */
    CAKE_POLICY_ADAKV = 7,       /* SnapKV's scores, per-head budgets in a layer (alpha 0.2) */
};
/* Components a kind sets; 0 means the kind's own (the paper's ablations override them). */
enum cake_alloc {
    CAKE_ALLOC_DEFAULT = 0, CAKE_ALLOC_PREFERENCE = 1, CAKE_ALLOC_UNIFORM = 2,
    CAKE_ALLOC_PYRAMID = 3, CAKE_ALLOC_NONE = 4,
};
enum cake_indicator {
    CAKE_IND_DEFAULT = 0, CAKE_IND_MEAN_VAR = 1, CAKE_IND_MEAN = 2, CAKE_IND_VAR = 3,
    CAKE_IND_LAST = 4, CAKE_IND_POSITION = 5,
};
enum cake_pool { CAKE_POOL_DEFAULT = 0, CAKE_POOL_AVG = 1, CAKE_POOL_MAX = 2, CAKE_POOL_NONE = 3 };
enum cake_decode {
    CAKE_DECODE_DEFAULT = 0,
    CAKE_DECODE_EVICT = 1,        /* every layer held at its budget + w while decoding */
    CAKE_DECODE_PREFILL_ONLY = 2, /* the prompt is compressed once; decoded tokens add up */
};

struct cake_policy {
    enum cake_mode mode; /* default fixed */
    uint32_t cache_size; /* C: average tokens per layer including the window (default 1024) */
    uint32_t window;     /* w (default 32) */
    float tau1, tau2;    /* preference exponents (default 1, 1) */
    float gamma;         /* variance weight of the indicator (default 200) */
    int cascading;       /* default 1 */
    uint32_t decode_slack; /* fixed mode: evict every slack+1 steps (default 0) */
    enum cake_policy_kind kind; /* default CAKE_POLICY_CAKE; baselines need fixed mode */
    enum cake_alloc alloc;      /* 0: the kind's */
    enum cake_indicator indicator;
    enum cake_pool pool;
    uint32_t pool_kernel;       /* odd; 0: the kind's (5 CAKE, 7 SnapKV family) */
    enum cake_decode decode;
    uint32_t sinks;             /* StreamingLLM (0: 4) */
    float pyramid_beta;         /* PyramidKV (0: 20) */
    float ada_alpha;            /* Ada-KV floor share (0: 0.2; negative: none) */
    /* The prefill keeps each kv head's tokens as runs of run_width consecutive positions
     * (odd, up to 255) around its best-scoring ones instead of its top tokens, at the same
     * budgets; decode evictions and cuts after the prompt keep the kind's rule. 0 or 1: the
     * kind's top tokens. Not with parity mode, Ada-KV, H2O or StreamingLLM (docs/eval.md:
     * why). */
    uint32_t run_width;
    uint32_t reserved[14];
};

CAKE_API void cake_policy_default(struct cake_policy *p);

/* Opens a sequence for a prompt of prompt_len tokens that may decode max_new_tokens more.
 * *out is owned by ctx (freed by cake_seq_close or cake_destroy: a handle is not to be used
 * after either, which libcake does not check). Returns 0, CAKE_ENOTCONN (not connected),
 * CAKE_EINVAL, CAKE_EOOM (the descriptor and scratch area do not fit the tenant's share),
 * CAKE_EPROTO (what caked passed for it is not in this tenant's mapped segments). */
CAKE_API int cake_seq_open(cake_ctx *ctx, const struct cake_layout *layout,
                  const struct cake_policy *policy, uint32_t prompt_len,
                  uint32_t max_new_tokens, cake_seq **out);
/* Tensor parallel: one logical sequence split by kv heads over `shards` ranks (processes,
 * usually one per GPU). Every rank opens its shard with the same nonzero `group` key (the
 * engine's choice, unique per live request within the service) and its rank `shard`, with
 * its own kv_heads / q_heads and the same everything else, each on its own cake_ctx (a
 * layer's observe blocks its connection until every rank has scored the layer). The shards share one CAKE
 * allocation: cake_prefill_observe() of layer l returns on every rank once all ranks have
 * scored layer l, with the layer's preference combined from all heads, so every rank
 * records the same budgets; each rank keeps its own heads' top tokens (no K/V crosses
 * ranks). With cake_prefill_submit() the group's preference is the mean of the ranks'.
 * Decode is per rank. The group lives and dies together: closing a shard or the death of any
 * rank frees every shard (the others' calls then fail with CAKE_ENOSEQ, a rank waiting at a
 * layer included). Returns as cake_seq_open(), or CAKE_EINVAL when the shard does not match
 * the group. */
CAKE_API int cake_seq_open_shard(cake_ctx *ctx, const struct cake_layout *layout,
                                 const struct cake_policy *policy, uint32_t prompt_len,
                                 uint32_t max_new_tokens, uint64_t group, uint32_t shards,
                                 uint32_t shard, cake_seq **out);
/* Frees the sequence in the daemon and the handle (whatever caked answers: the handle is
 * gone after this call, and using it again is undefined - unchecked, like free()). Returns 0, CAKE_ENOSEQ (caked had already ended it: its shard
 * group ended, or caked restarted), CAKE_ENOTCONN, -ETIMEDOUT or -errno. */
CAKE_API int cake_seq_close(cake_seq *seq);
CAKE_API uint64_t cake_seq_id(const cake_seq *seq);
/* 1 when the sequence lives in the GPU pool: cake_key(), cake_value() and cake_query_row()
 * then return device addresses in this process's mapping of it. */
CAKE_API int cake_seq_on_gpu(const cake_seq *seq);
CAKE_API uint32_t cake_seq_tokens_per_page(const cake_seq *seq);

/* Prefill, per layer in order 0, 1, ...:
 *   cake_prefill_reserve(seq, l)    pages for prompt_len tokens of layer l
 *   write K/V at cake_key()/cake_value() and the last w queries (cake_put_queries())
 *   cake_prefill_observe(seq, l, &P) caked scores the layer, allocates budgets and
 *                                    compacts (cascading) - or, having computed the scores
 *                                    itself, the engine writes the indicator at
 *                                    cake_indicator() and calls cake_prefill_submit(). */
/* Each returns 0, CAKE_ESTATE (a layer out of order: reserve each once, in order, then
 * observe or submit it), CAKE_EOOM (reserve: the layer's pages do not fit the tenant's share
 * or the pool, and caked could not make the room by re-slicing the tenant's sequences within
 * --pressure-wait: a reserve, an open or a decode step that does not fit may wait that long), CAKE_ENOSEQ (the sequence is gone: closed, or its shard group ended),
 * CAKE_EINTERNAL (caked's scoring failed; cake_errstr() says how), CAKE_ENOTCONN,
 * -ETIMEDOUT or -errno. *preference (observe, may be NULL): the layer's preference score. */
CAKE_API int cake_prefill_reserve(cake_seq *seq, uint32_t layer);
CAKE_API int cake_prefill_observe(cake_seq *seq, uint32_t layer, double *preference);
CAKE_API int cake_prefill_submit(cake_seq *seq, uint32_t layer, double preference);

/* One decode step for n sequences of this context: evicts layers over budget, then
 * reserves one more token in every layer of every sequence. After it returns, write the
 * new token's K/V at slot cake_layer_tokens(seq, l) - 1 and its query with
 * cake_put_decode_query(seq, l, ...). All or nothing: CAKE_EOOM leaves every sequence as it
 * was. Returns 0, CAKE_EOOM, CAKE_ESTATE (a sequence not fully prefilled, or listed twice),
 * CAKE_ETOOBIG (a sequence reached its max_new_tokens), CAKE_EINVAL (n == 0), CAKE_ENOSEQ,
 * CAKE_EINTERNAL, CAKE_ENOTCONN, -ETIMEDOUT, -ENOMEM or -errno. */
CAKE_API int cake_decode_step(cake_ctx *ctx, cake_seq *const *seqs, size_t n);

/* Parking a GPU sequence (prefilled) between uses, e.g. a conversation waiting for its
 * user: park != 0 moves its K/V pages to the host pool and gives its GPU pages back (its
 * query rings stay); park == 0 brings it back (a decode step on a parked sequence does so
 * by itself). While parked its layers show no pages (cake_layer_tokens and cake_key say
 * nothing is there: do not touch it); cake_kept_positions still answers. Under pressure
 * caked parks such sequences itself where the tenant's mode is park and the context allows it
 * (cake_set_shrink_idle). Returns 0 (also when it already is where asked), CAKE_EINVAL (a
 * host sequence, a shard), CAKE_ESTATE (busy, or its prompt not prefilled), CAKE_EOOM (no
 * room in the pool it goes to), CAKE_ENOSEQ, -EIO. */
CAKE_API int cake_seq_park(cake_seq *seq, int park);
/* 1 while the sequence is parked in the host pool (by cake_seq_park or by caked), else 0. */
CAKE_API int cake_seq_parked(const cake_seq *seq);

/* Ordering (GPU sequences): caked reads keys, values and queries inside observe, submit and
 * decode_step, on its own streams, so the engine's writes must be complete when it calls
 * them (synchronize the stream that wrote them); caked's compaction is complete when the
 * call returns.
 *
 * Addresses in the pool (valid until the next call on this sequence that may compact:
 * observe, submit, decode_step, and under memory pressure reserve, which may re-slice the
 * layers already observed; with cake_set_shrink_idle, until the context's next call). head
 * is a kv head; token a slot in the layer's storage.
 * NULL when out of range or not in a segment mapped in this process. */
CAKE_API void *cake_key(const cake_seq *seq, uint32_t layer, uint32_t kv_head, uint32_t token);
CAKE_API void *cake_value(const cake_seq *seq, uint32_t layer, uint32_t kv_head, uint32_t token);
/* Window queries. Each layer has a ring of w rows per query head (w = the policy's window),
 * in the sequence dtype: at prefill the layer's last w queries, oldest first from slot 0; at
 * decode the new token's query goes to slot cake_decode_slot(). Either placement:
 *   cake_put_queries(seq, l, q, n, stream)   q [q_heads][n][head_dim]: the last min(n, w)
 *                                            rows of each head to slots 0..
 *   cake_put_decode_query(seq, l, q, stream) q [q_heads][head_dim] to slot cake_decode_slot()
 * q may be host or device memory; for GPU sequences the copies are queued on stream (a
 * cudaStream_t, NULL: the legacy default stream) and must be complete before the next
 * observe or decode_step (the ordering below). Return 0, CAKE_EINVAL (no such layer, no
 * decode token reserved, NULL q or n == 0), CAKE_EPROTO (a ring page outside this process's
 * mapping), -ENOTSUP (a GPU sequence, libcake without CUDA) or -EIO (CUDA refused). */
CAKE_API int cake_put_queries(cake_seq *seq, uint32_t layer, const void *q, uint32_t n,
                              void *stream);
CAKE_API int cake_put_decode_query(cake_seq *seq, uint32_t layer, const void *q, void *stream);
/* The log-sum-exp of each window query row, lse [q_heads][n] f32 (the last min(n, w) of
 * each head, like cake_put_queries' rows): ln sum_j exp(q.k_j / sqrt(head_dim)) over the keys
 * the row attends to, as the engine's own attention over the prompt computes it
 * (FlashAttention's softmax_lse, torch's flex_attention with return_lse). Written before
 * cake_prefill_observe of that layer, it lets caked score the layer in one pass over its keys
 * instead of two; that observe alone uses it (a later one of the layer needs it again). lse
 * may be host memory, or device memory for GPU sequences (queued on stream and complete
 * before the observe, like the queries). caked refuses an observe whose values are not
 * finite (CAKE_EINVAL); values that are not the rows' normalizers give scores that are not
 * CAKE's. Returns 0, CAKE_EINVAL (no such layer, NULL lse or n == 0), -ENOTSUP (a caked
 * without room for them, or device memory without CUDA in libcake) or -EIO. */
CAKE_API int cake_put_lse(cake_seq *seq, uint32_t layer, const float *lse, uint32_t n,
                          void *stream);
/* The log-sum-exp of the decode token's query rows, lse [q_heads] f32: for the token
 * cake_decode_step reserved last, ln sum_j exp(q.k_j / sqrt(head_dim)) over the keys its
 * attention read (the layer's cache, its own key included), as the engine's decode attention
 * returns it (FlashInfer's return_lse, FlashAttention's softmax_lse). Written for a layer
 * before the next cake_decode_step, it lets that step's eviction of the layer skip its first
 * pass over the keys (the window's older rows carry theirs from step to step; fixed mode,
 * rankings over the whole window); that step alone uses it. Host memory, or device memory
 * for GPU sequences (queued on stream and complete before the step, like the decode query).
 * caked ignores values that are not finite; values that are not the row's normalizer give
 * scores that are not CAKE's. Returns 0, CAKE_EINVAL (no such layer, NULL lse, no decode
 * token reserved yet), -ENOTSUP (a caked without room for them, or device memory without
 * CUDA in libcake) or -EIO. */
CAKE_API int cake_put_decode_lse(cake_seq *seq, uint32_t layer, const float *lse, void *stream);
/* The ring slot of the query of the token cake_decode_step reserved last (UINT32_MAX: no
 * such layer, or no decode step yet - the ring still holds the prompt's rows, and
 * cake_put_decode_query / cake_put_decode_lse answer CAKE_EINVAL). */
CAKE_API uint32_t cake_decode_slot(const cake_seq *seq, uint32_t layer);
/* One ring row (head q_head, slot), host or device address; NULL when out of range. GPU rings
 * are paged (no two rows of different pages need be adjacent): write rows one by one here,
 * or through cake_put_queries. */
CAKE_API void *cake_query_row(const cake_seq *seq, uint32_t layer, uint32_t q_head, uint32_t slot);
/* Host sequences: a layer's whole ring, [q_heads][w][head_dim] contiguous (NULL for GPU
 * sequences, whose rings are paged), and the decode query's row of head 0 in it (head h's
 * is w * head_dim elements further). */
CAKE_API void *cake_queries(const cake_seq *seq, uint32_t layer);
CAKE_API void *cake_decode_query(const cake_seq *seq, uint32_t layer);
/* Indicator area for cake_prefill_submit: [kv_heads][prompt_len - w] f32, in the host pool
 * for either placement. */
CAKE_API float *cake_indicator(const cake_seq *seq);

/* Tokens the layer holds now (prefix kept + window + decoded), and its recorded budget. */
CAKE_API uint32_t cake_layer_tokens(const cake_seq *seq, uint32_t layer);
CAKE_API uint32_t cake_layer_budget(const cake_seq *seq, uint32_t layer);
/* Times caked lowered the sequence's budgets to make room under pressure (re-slicing: the
 * layers keep the top of what they held by the policy's own ranking; their token counts and
 * budgets above show the result). 0 if never. */
CAKE_API uint32_t cake_seq_reslices(const cake_seq *seq);
/* Per-head budgets (CAKE_POLICY_ADAKV) leave holes: kv head `kv_head` of the layer holds no
 * token in the `count` slots from *first, which attention must mask (the returned count; 0
 * when the head has none, as under every other policy; *first is then untouched). */
CAKE_API uint32_t cake_head_holes(const cake_seq *seq, uint32_t layer, uint32_t kv_head,
                                  uint32_t *first);
/* Which original positions a layer kept: pos[i] is the position of the token in slot i of
 * kv head `kv_head` (the prompt's tokens are 0 .. prompt_len - 1, the t-th decoded token
 * prompt_len + t; CAKE_NO_POSITION marks a hole, see cake_head_holes), for the first
 * min(cap, tokens) slots; *n_tokens (may be NULL) receives the layer's token count, which
 * may exceed cap (call again with room for it). caked follows every compaction, on host
 * and GPU sequences alike; this asks it (a round trip, more for over 65,536 slots). Returns
 * 0, CAKE_ENOSEQ, CAKE_EINVAL (layer or head out of range, pos NULL with cap > 0),
 * CAKE_ESTATE (the sequence is busy in another call; or, while a GPU sequence's prompt is
 * prefilled, every GPU context of caked's is busy: ask again). */
#define CAKE_NO_POSITION 0xffffffffu
CAKE_API int cake_kept_positions(cake_seq *seq, uint32_t layer, uint32_t kv_head, uint32_t *pos,
                                 size_t cap, uint32_t *n_tokens);
/* Pool offsets of the layer's pages (count via *n_pages); for engines with their own
 * paged attention kernels. Owned by the pool mapping; valid as cake_key(). */
CAKE_API const uint64_t *cake_layer_pages(const cake_seq *seq, uint32_t layer, uint32_t *n_pages);

/* The page layout, either placement: a page holds K then V of tokens_per_page tokens, each
 * [kv_heads][tokens_per_page][head_dim] in the dtype, V v_offset bytes after the page's
 * start; pages are page_bytes apart (page index i at the pool's base + i * page_bytes). With
 * v_offset = kv_heads * tokens_per_page * head_dim * element size - what caked makes - a
 * page is FlashInfer's HND page [2][kv_heads][page_size][head_dim]. Returns 0. */
CAKE_API int cake_seq_page_layout(const cake_seq *seq, uint64_t *page_bytes, uint64_t *v_offset);

/* Device page tables (GPU sequences; libcake with CUDA): int32 arrays in device memory of
 * the sequence's GPU, tokens[layers] (each layer's count) and pages[layers][max_pages] (its
 * pages' indices in the GPU pool, see cake_seq_page_layout), kept up to date by libcake
 * before every call that changes them returns (reserve, observe, submit, decode step: only
 * what changed is copied). Their addresses stay fixed for the sequence's life, so kernels
 * and CUDA graphs read them with no upload of their own. Made on the first call. Returns 0,
 * CAKE_EINVAL (a host sequence), -ENOMEM, -ENOTSUP (no CUDA). */
CAKE_API int cake_device_tables(cake_seq *seq, const int32_t **tokens, const int32_t **pages,
                                uint32_t *max_pages);
/* The holes of per-head budgets (CAKE_POLICY_ADAKV) beside those tables: device int32
 * [layers][kv_heads][2], each kv head's first hole slot and count (cake_head_holes; 0, 0
 * where none), kept up to date and at a fixed address the same way, for paged kernels that
 * mask them. Returns as cake_device_tables. */
CAKE_API int cake_device_holes(cake_seq *seq, const int32_t **holes);

/* One layer's decode attention for a batch of GPU sequences in one launch, for engines
 * without paged kernels of their own. A batch is sequences of one context and one GPU with
 * the same layout; it reads their device page tables, so one made for a set of sequences
 * serves every step (and can be captured in a CUDA graph). For sequence b, query head h:
 *   out[b][h] = softmax(q[b][h] . K^T / sqrt(head_dim)) V  over its layer's tokens
 * (call it after the new token's K/V are written); q, out: device [n][q_heads][head_dim] in
 * the sequences' dtype. max_tokens bounds every sequence's count and sizes the launch (0:
 * the counts now, read on the host - not for a graph); a sequence over it gets NaN rows.
 * Asynchronous on stream (a cudaStream_t; NULL the legacy stream). Ada-KV's holes are
 * left out (cake_device_holes). A batch must be destroyed before any of its sequences is closed (unchecked).
 * Returns 0, CAKE_EINVAL (mixed sequences or layouts, head_dim other than 32, 64, 128, 256,
 * more than 8 query heads per kv head, max_tokens over what their pages hold), -ENOMEM,
 * -ENOTSUP (no CUDA), -EIO. */
typedef struct cake_batch cake_batch;
CAKE_API int cake_batch_create(cake_ctx *ctx, cake_seq *const *seqs, size_t n, cake_batch **out);
CAKE_API int cake_batch_attention(cake_batch *batch, uint32_t layer, const void *q, void *out,
                                  uint32_t max_tokens, void *stream);
CAKE_API void cake_batch_destroy(cake_batch *batch);
/* Each sequence's newest token (after a decode step: its slot cake_layer_tokens() - 1) K
 * and V from device k, v [n][kv_heads][head_dim] (the dtype) into its pages, one launch for
 * the batch; asynchronous on stream, graph capturable. Returns 0, CAKE_EINVAL, -EIO. */
CAKE_API int cake_batch_append(cake_batch *batch, uint32_t layer, const void *k, const void *v,
                               void *stream);
/* Each sequence's new token's query (after a decode step: ring slot cake_decode_slot()) from
 * device q [n][q_heads][head_dim] (the attention's q) into the layer's ring, one launch for
 * the batch: cake_put_decode_query for all of them. The slots are read on the device from
 * the tables libcake refreshes at each decode step, so a captured launch writes each step's
 * slot. Asynchronous on stream; complete it before the next decode step. Returns 0,
 * CAKE_EINVAL (no such layer, NULL q), -EIO. */
CAKE_API int cake_batch_put_decode_query(cake_batch *batch, uint32_t layer, const void *q,
                                         void *stream);

/* Decode attention straight from the pool, for engines without a paged kernel of their
 * own (GPU sequences; libcake built with CUDA): for every layer l and query head h,
 *   out[l][h] = softmax(q[l][h] . K_l^T / sqrt(head_dim)) V_l
 * over the layer's cake_layer_tokens(seq, l) slots but Ada-KV's holes (cake_head_holes) -
 * call it after writing the new token's K/V. q: device [layers][q_heads][head_dim] in the sequence's dtype; out: device
 * [layers][q_heads][head_dim] f32; stream: a cudaStream_t (NULL: the legacy default
 * stream). Asynchronous on that stream (split-K over every layer in one launch). Returns 0,
 * CAKE_EINVAL (a host sequence, or an unsupported layout), -ENOTSUP (no CUDA), -ENOMEM,
 * -EIO. */
CAKE_API int cake_decode_attention(cake_seq *seq, const void *q, float *out, void *stream);

#ifdef __cplusplus
}
#endif
#endif
