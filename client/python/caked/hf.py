"""A transformers Cache whose keys and values live in caked's pool.

    import caked, caked.hf
    caked.hf.enable(model)                      # registers the "caked" attention, selects it
    with caked.Client() as client:
        cache = caked.hf.CakedCache(client, model.config, max_new_tokens=64,
                                    policy="snapkv", cache_size=128)
        out = model.generate(ids, cache=cache, max_new_tokens=64)  # transformers < 5: past_key_values=

One caked sequence per row of the batch. Prefill (the whole prompt in one forward) runs the
model's own attention over the whole prompt (exact, as CAKE's reference does, with the
batch's padding mask), then writes each row's real tokens' keys and values and its last
`window` queries into the pool, and caked scores the layer and evicts under the policy
(cascading: the pool never holds more than the budgets plus one layer). Each decode step asks
caked for the step first (it evicts what the policy says, using the queries of the steps
before; one request for the whole batch), writes the new token's K/V and query, and attends
over what each row's layer holds. Positions stay absolute (RoPE is applied before the cache
sees keys), so `get_seq_length()` counts positions seen, not tokens held.

Placement: with a CUDA model in f16/bf16 and a caked GPU pool on its GPU ("auto", the
default, or placement="gpu"), the sequences live in the GPU pool: K/V are written into the
pages by torch's indexing at prefill and by one kernel per layer at decode, the window
queries go into the rings on the device, caked scores and compacts on the GPU, and decode
attention is one launch per layer for the batch (caked.gpu.Batch) - no K/V crosses to the
host. Otherwise (placement="host") the pool is host memory and K/V are copied in and out.

Decode as one CUDA graph: GraphDecoder replays a capture of the whole forward each step
after one request to caked (transformers' own loop is host-bound). Rows prefilled one at a
time join into a batch cache (CakedCache.join).

Limits: the prompt in one forward, then one token per forward (what generate does); no beam
search or cropping. The "caked" attention falls back to SDPA for any forward not driven by a
CakedCache, so an enabled model still runs with transformers' own caches.
"""
import inspect
import math
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import InvalidArgument, StateError, torch_view, _L

_TORCH_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_TORCH_REV = {v: k for k, v in _TORCH_DTYPES.items()}
_active = threading.local()  # the cache layer whose attention runs next on this thread


def _np_of(t):
    """A contiguous CPU numpy array with the bits of t (bf16 as uint16)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _gpu_pool_of(client, device):
    """The index of the client's GPU pool on torch device `device`, or None."""
    if device.type != "cuda":
        return None
    uuid = "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
    for i in range(_L().cake_gpu_count(client._ctx)):
        if _L().cake_gpu_uuid_at(client._ctx, i).decode() == uuid and \
                _L().cake_gpu_pool_base_at(client._ctx, i):
            return i
    return None


class CakedLayer(CacheLayerMixin):
    """One decoder layer of a CakedCache (the data is in caked's pool, not here)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache, layer):
        super().__init__()
        self.cache, self.layer = cache, layer

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cache
        if not c.seqs or (self.layer >= c.prefilled and c.decoded == 0):
            _active.state = (c, self.layer, "prefill")  # written after its attention
            return key_states, value_states  # the prompt attends to every prompt token
        if key_states.shape[-2] != 1:
            raise StateError(-5009, "after the prompt, CakedCache takes one token per forward")
        k, v = c._decode(self.layer, key_states, value_states)
        _active.state = (c, self.layer, "decode")
        return k, v

    def get_mask_sizes(self, query_length):
        return self.cache.seen + query_length, 0

    def get_seq_length(self):
        return self.cache.seen

    def get_max_length(self):
        return -1

    def reset(self):
        self.cache.reset()


class CakedCache(Cache):
    """A transformers Cache backed by caked sequences (one per row) under any policy.

    client: a connected caked.Client (map_pool=True). config: the model's config.
    max_new_tokens: tokens generate may add after the prompt (each sequence's decode room).
    placement: "auto" (the GPU pool where the model's device has one and its dtype is f16 or
    bf16), "gpu" or "host". lse: on GPU sequences, run the prompt's attention through cuDNN's
    kernel, which returns each row's log-sum-exp, and hand the window rows' to caked
    (cake_put_lse: one pass over each layer's keys instead of two) where it can - a CUDA
    model, no padding mask (batch 1 or equal lengths), torch with cuDNN attention; elsewhere
    SDPA as before (`lse_layers` counts the layers that had them). Policy keywords go to
    Client.open_sequence (policy, cache_size, window, gamma, alloc, indicator, ...)."""

    def __init__(self, client, config, max_new_tokens, placement="auto", lse=True, **policy):
        cfg = config.get_text_config(decoder=True)
        if placement not in ("auto", "gpu", "host"):
            raise InvalidArgument(-5005, "placement must be 'auto', 'gpu' or 'host'")
        self.client, self.max_new, self.placement = client, max_new_tokens, placement
        self.n_layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.policy = dict(policy)
        self.seqs, self.real, self.batch, self.gpu = [], [], None, None
        self.prefilled, self.decoded, self.seen = 0, 0, 0
        self.lse, self.lse_layers = lse, 0
        self._masks = {}
        self._device = None
        self._driven, self._bound = False, 0  # set by a GraphDecoder: it asks for the steps
        self.step_s = 0.0  # seconds spent in caked's decode steps (the requests alone)
        self.preferences = []  # per layer, each row's preference P_l (caked's, or select's)
        super().__init__(layers=[CakedLayer(self, l) for l in range(self.n_layers)])

    @property
    def seq(self):
        """The first row's sequence (the only one at batch size 1), or None."""
        return self.seqs[0] if self.seqs else None

    # -- prefill, from the attention hook (which has the padding mask) -------------------
    def _open(self, key, mask):
        B, n = key.shape[0], key.shape[-2]
        dt = _TORCH_DTYPES.get(key.dtype)
        if dt is None:
            raise InvalidArgument(-5005, f"unsupported dtype {key.dtype}")
        pool = _gpu_pool_of(self.client, key.device) if dt != "f32" else None
        if self.placement == "gpu" and pool is None:
            raise InvalidArgument(-5005, "placement='gpu' needs an f16/bf16 model on a GPU "
                                         "where caked has a GPU pool")
        self.gpu = pool if self.placement != "host" else None
        self._device = key.device
        for b in range(B):  # the row's real tokens: those the last query attends to
            if mask is None:
                idx = torch.arange(n, device=key.device)
            else:
                m = mask[b, 0, -1, :n]
                idx = (m if m.dtype == torch.bool else m == 0).nonzero().squeeze(1)
            self.real.append(idx)
            kw = dict(placement="gpu", gpu=self.gpu) if self.gpu is not None else {}
            self.seqs.append(self.client.open_sequence(
                self.n_layers, self.q_heads, key.shape[1], key.shape[-1], len(idx), dtype=dt,
                max_new_tokens=self.max_new, **self.policy, **kw))

    def _prefill(self, l, query, key, value, mask, lse=None):
        if not self.seqs:
            if l != 0:
                raise StateError(-5009, "prefill must start at layer 0")
            self._open(key, mask)
        w = self.seqs[0].window
        rows = [(key[b][:, i], value[b][:, i], query[b][:, i[-w:]])
                for b, i in enumerate(self.real)]
        lses = None
        if lse is not None and self.gpu is not None:  # the rows' from the model's attention
            lses = [lse[b][:, i[-w:]] for b, i in enumerate(self.real)]
        self._prefill_rows(l, rows, key.shape[-2], lses)

    def _lse_ok(self, query, key, mask):
        """May the prompt's attention of this forward give caked its rows' log-sum-exps?"""
        return (self.lse and self.placement != "host" and mask is None and query.is_cuda and
                query.dtype in (torch.float16, torch.bfloat16) and
                query.shape[-2] == key.shape[-2])

    def _prefill_rows(self, l, rows, seen, lses=None, select=None):
        """Layer l of every row: (keys, values [kv_heads][n][d], queries [H][>= 1][d], the
        last `window` of them used) into its sequence, then caked scores and evicts; lses
        (GPU sequences): each row's window rows' log-sum-exps [H][window]. select(l, b): the
        engine's own scores for row b instead, (indicator [kv_heads][n - window], preference)
        that caked allocates and selects by (cake_prefill_submit)."""
        if l != self.prefilled:
            raise StateError(-5009, f"prefill of layer {l} out of order")
        for b, (s, (k, v, q)) in enumerate(zip(self.seqs, rows)):
            w = s.window
            s.reserve(l)
            if self.gpu is not None:
                from . import gpu as cg
                cg.write_kv(s, l, k, v)
                cg.put_queries(s, l, q[:, -w:])
                if lses is not None:
                    cg.put_lse(s, l, lses[b])
            else:
                s.write_layer(l, _np_of(k), _np_of(v))
                qn = _np_of(q[:, -w:])  # [H][<=w][d], oldest first
                s.queries(l)[:, w - qn.shape[1]:] = qn
        if self.gpu is not None:  # caked reads what torch's stream wrote
            torch.cuda.current_stream(rows[0][0].device).synchronize()
        self.lse_layers += lses is not None
        prefs = []
        for b, s in enumerate(self.seqs):
            if select is None:
                prefs.append(s.observe(l))
                continue
            ind, pref = select(l, b)
            area = s.indicator()
            if area.size:
                area[:] = ind
            s.submit(l, pref)
            prefs.append(pref)
        self.preferences.append(prefs)
        self.prefilled += 1
        if l == self.n_layers - 1:
            self.seen = seen

    @classmethod
    def replay(cls, client, config, rec, max_new_tokens, placement="auto", select=None,
               **policy):
        """A cache prefilled from a Record (record()) with no forward of the model: every
        layer's recorded keys, values and last queries go to caked, which scores and evicts
        under this cache's policy as if the prompt had just run. Exact: each policy's
        prefill attends to the whole prompt, which the record did. select(l, 0): the
        engine's own (indicator, preference) for layer l instead of caked's scoring (see
        _prefill_rows)."""
        cache = cls(client, config, max_new_tokens, placement=placement, **policy)
        if len(rec.keys) != cache.n_layers:
            raise InvalidArgument(-5005, "the record is of another model")
        w, kept = policy.get("window", 32), rec.queries[0].shape[1]
        if w > kept and rec.n > kept:
            raise InvalidArgument(-5005, f"the record kept {kept} queries; the policy's "
                                         f"window needs {w}")
        try:
            cache._open(rec.keys[0].unsqueeze(0), None)
            for l in range(cache.n_layers):
                cache._prefill_rows(l, [(rec.keys[l], rec.values[l], rec.queries[l])], rec.n,
                                    select=select)
        except BaseException:
            cache.close()  # a refusal midway (OutOfMemory) leaves nothing open in caked
            raise
        return cache

    @classmethod
    def join(cls, caches):
        """One cache of B rows from B prefilled caches (each of one prompt run alone, e.g. a
        batch too large for one forward of its prompts, or one record replayed under several
        policies): their sequences, in order, become the rows, each keeping its own policy
        and budget in caked; the parts are emptied (closing them frees nothing). One model,
        client and placement throughout (GPU rows: one window); positions seen are the
        longest row's (pass each row's positions to the decode of rows of different
        lengths)."""
        caches = list(caches)
        if not caches:
            raise InvalidArgument(-5005, "join needs at least one cache")
        a = caches[0]
        for c in caches:
            if c.prefilled != c.n_layers or c.decoded or not c.seqs:
                raise StateError(-5009, "join takes caches whose prompt ran, before decode")
            if (c.n_layers, c.q_heads, c.gpu, c.client) != (a.n_layers, a.q_heads, a.gpu,
                                                               a.client):
                raise InvalidArgument(-5005, "join takes caches of one model, client and "
                                             "placement")
        out = cls.__new__(cls)
        Cache.__init__(out, layers=[CakedLayer(out, l) for l in range(a.n_layers)])
        out.client, out.placement = a.client, a.placement
        out.max_new = max(c.max_new for c in caches)
        out.n_layers, out.q_heads = a.n_layers, a.q_heads
        out.policy = dict(a.policy) if all(c.policy == a.policy for c in caches) else {}
        out.seqs = [s for c in caches for s in c.seqs]
        out.real = [r for c in caches for r in c.real]
        out.batch, out.gpu, out._device = None, a.gpu, a._device
        out.prefilled, out.decoded = a.n_layers, 0
        out.seen = max(c.seen for c in caches)
        out.lse, out.lse_layers = a.lse, sum(c.lse_layers for c in caches)
        out._masks, out._driven, out._bound, out.step_s = {}, False, 0, 0.0
        for l in range(a.n_layers):  # the layers' own state (device, dtype) from the parts'
            out.layers[l].__dict__.update({k: v for k, v in a.layers[l].__dict__.items()
                                           if k not in ("cache", "layer")})
        for c in caches:
            if c.batch is not None:
                c.batch.close()
            c.seqs, c.real, c.batch = [], [], None
        return out

    # -- decode --------------------------------------------------------------------------
    def _begin_step(self, rows):
        """The decode step's request: caked evicts by the steps before and reserves a slot."""
        if self.prefilled != self.n_layers:
            raise StateError(-5009, "decode before the prompt was prefilled")
        if rows != len(self.seqs):
            raise InvalidArgument(-5005, "the batch changed size after the prompt")
        if self.gpu is not None:  # caked reads the rings and pages the last step wrote
            torch.cuda.current_stream(self._device).synchronize()
        t = time.perf_counter()
        self.client.decode_step(self.seqs)
        self.step_s += time.perf_counter() - t
        self.decoded += 1
        self.seen += 1

    def _decode(self, l, k, v):
        if l == 0 and not self._driven:
            self._begin_step(k.shape[0])
        if self.gpu is not None:
            if self.batch is None:
                from . import gpu as cg
                self.batch = cg.Batch(self.client, self.seqs)
            self.batch.append(l, k[:, :, 0], v[:, :, 0])
            return k, v  # attention reads the pages (the hook), not these
        held = []
        for b, s in enumerate(self.seqs):
            t = s.tokens(l)
            s.write_layer(l, _np_of(k[b]), _np_of(v[b]), start=t - 1)
            held.append(t)
        T = max(held)
        K = k.new_zeros(len(held), k.shape[1], T, k.shape[-1])
        V = torch.zeros_like(K)
        mask = torch.zeros(len(held), self.q_heads, 1, T, dtype=torch.bool, device=k.device)
        direct = K.device.type == "cpu" and K.dtype == torch.float32
        for b, (s, n) in enumerate(zip(self.seqs, held)):
            if direct and s.dtype == "f32":  # straight from the pages into the batch
                s.read_layer(l, out=(K[b].numpy(), V[b].numpy()))
            else:
                hk, hv = s.read_layer(l)
                to_t = torch_view if s.dtype == "bf16" else torch.from_numpy
                K[b, :, :n], V[b, :, :n] = to_t(hk).to(k.device), to_t(hv).to(k.device)
            hm = self._hole_mask(s, l, n)
            mask[b, :, 0, :n] = True if hm is None else hm.to(k.device)
        self._masks[l] = None if len(held) == 1 and bool(mask.all()) else mask
        return K, V

    def _decode_attention(self, l, query, key, value, scaling):
        if self.gpu is not None:
            d = query.shape[-1]
            q = query[:, :, 0]
            if scaling is not None and not math.isclose(scaling, d ** -0.5, rel_tol=1e-6):
                q = q * (scaling * math.sqrt(d))  # the kernel scales by 1/sqrt(d)
            out = self.batch.attention(l, q.to(key.dtype), max_tokens=self._bound)  # [B][H][d]
            return out.unsqueeze(1)
        g = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(g, dim=1) if g > 1 else key
        v = value.repeat_interleave(g, dim=1) if g > 1 else value
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=self._masks.get(l),
                                             scale=scaling)
        return out.transpose(1, 2).contiguous()

    def _after_decode_attention(self, l, query):
        if self.gpu is not None:  # every row's into its ring, one launch
            self.batch.put_decode_query(l, query[:, :, -1].to(_TORCH_REV[self.seqs[0].dtype]))
            return
        for b, s in enumerate(self.seqs):
            s.decode_query(l)[:] = _np_of(query[b, :, -1])

    def _hole_mask(self, s, l, n):
        """[H, n] bool (True: attend) when the layer has Ada-KV holes, else None."""
        holes = s.holes(l)
        if not any(c for _, c in holes):
            return None
        g = self.q_heads // len(holes)
        m = torch.ones(self.q_heads, n, dtype=torch.bool)
        for kvh, (first, cnt) in enumerate(holes):
            if cnt:
                m[kvh * g:(kvh + 1) * g, first:first + cnt] = False
        return m

    # -- Cache API -----------------------------------------------------------------------
    def get_seq_length(self, layer_idx=0):
        return self.seen

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx=None):
        return -1

    def layer_tokens(self, row=0):
        """Tokens each layer of a row's sequence holds now (kept + window + decoded)."""
        return [self.seqs[row].tokens(l) for l in range(self.n_layers)] if self.seqs else []

    def reset(self):
        self.close()
        self.prefilled = self.decoded = self.seen = 0
        self.preferences = []

    def close(self):
        """Frees the sequences in caked (also done when the client closes)."""
        self._driven, self._bound = False, 0
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        for s in self.seqs:
            s.close()
        self.seqs, self.real, self._masks, self.gpu = [], [], {}, None

    def reorder_cache(self, beam_idx):
        raise InvalidArgument(-5005, "CakedCache cannot reorder rows: no beam search")

    def crop(self, max_length):
        raise InvalidArgument(-5005, "CakedCache cannot crop (assisted decoding)")


class GraphDecoder:
    """Decode steps of `model` over a prefilled CakedCache on GPU sequences, each one request
    to caked (it evicts by the steps before and reserves the new token's slot) and one replay
    of a CUDA graph of the whole forward: every layer's K/V append, attention and decode query
    are captured launches that read the device page tables and ring slots libcake refreshes
    at each step, so the host's per-layer Python (transformers' own loop) leaves the step,
    as engines do with CUDA graphs. The first step runs the forward eagerly (warming up
    kernels and the allocator) and captures the graph; later steps replay it. From then on
    the decoder drives the cache's decode (close() gives it back; the cache's next eager
    forward then asks for its steps again).

        dec = caked.hf.GraphDecoder(model, cache)   # after the prompt's forward
        for _ in range(n): logits = dec.step(tok); tok = logits.argmax(-1)

    step(tokens [B], positions [B] or None) -> logits [B][vocab] of the new tokens (a view
    of the graph's output: copy it to keep it past the next step); positions default to the
    next position after everything the cache has seen (equal-length rows)."""

    def __init__(self, model, cache):
        if cache.gpu is None or not cache.seqs:
            raise InvalidArgument(-5005, "GraphDecoder needs a CakedCache on GPU sequences "
                                         "whose prompt ran")
        if cache.prefilled != cache.n_layers:
            raise StateError(-5009, "decode before the prompt was prefilled")
        self.model, self.cache = model, cache
        dev, B = cache._device, len(cache.seqs)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.cpos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = self.logits = None
        # the attention's launch is sized once: no layer grows by more than a token a step
        held = max(t for r in range(B) for t in cache.layer_tokens(r))
        self.bound = held + cache.max_new - cache.decoded

    def _forward(self):
        kw = {cache_kwarg(self.model): self.cache}
        return self.model(self.ids, position_ids=self.pos, cache_position=self.cpos,
                          use_cache=True, logits_to_keep=1, **kw).logits[:, -1]

    def step(self, tokens, positions=None):
        c = self.cache
        if not c.seqs:
            raise StateError(-5009, "the cache was closed")
        c._begin_step(tokens.numel())
        self.ids.copy_(tokens.reshape(-1, 1))
        if positions is None:
            self.pos.fill_(c.seen - 1)
        else:
            self.pos.copy_(positions.reshape(-1, 1))
        self.cpos.fill_(c.seen - 1)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        dev = c._device
        c._driven, c._bound = True, self.bound
        _active.no_mask = True  # the batch attention needs none: no mask of a moving size
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), torch.no_grad():
                out = self._forward().clone()  # this step, eagerly
            torch.cuda.current_stream(dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.no_grad():
                self.logits = self._forward()  # captured, not run
            self.graph = g
        except BaseException:
            c._driven, c._bound = False, 0
            raise
        finally:
            _active.no_mask = False
        return out

    def close(self):
        """Drops the graph; the cache's own forward asks for its steps again."""
        self.graph = self.logits = None
        self.cache._driven, self.cache._bound = False, 0


class Record:
    """One prompt run once (record()): each layer's keys and values as the model caches them
    (after RoPE), [kv_heads][n][head_dim], its last `window` queries [q_heads][w][head_dim],
    and the logits after the prompt. CakedCache.replay() prefills a cache of any policy
    from it without running the model again."""

    def __init__(self, keys, values, queries, logits):
        self.keys, self.values, self.queries, self.logits = keys, values, queries, logits
        self.n = keys[0].shape[1]


def record(model, ids, window=32):
    """Runs the prompt ids [1][n] through `model` (enabled: caked.hf.enable) once with
    transformers' own cache and returns its Record."""
    from transformers import DynamicCache

    class _Recorder(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.rec_k[layer_idx] = key_states[0].detach().clone()
            self.rec_v[layer_idx] = value_states[0].detach().clone()
            _active.state = (self, layer_idx, "record")
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    if ids.shape[0] != 1:
        raise InvalidArgument(-5005, "record() takes one prompt")
    cache = _Recorder()
    cache.rec_k, cache.rec_v, cache.rec_q, cache.window = {}, {}, {}, window
    with torch.no_grad():
        out = model(ids, use_cache=True, **{cache_kwarg(model): cache})
    L = len(cache.rec_k)
    if len(cache.rec_q) != L:
        raise StateError(-5009, "no queries were recorded: call caked.hf.enable(model) first")
    return Record([cache.rec_k[l] for l in range(L)], [cache.rec_v[l] for l in range(L)],
                  [cache.rec_q[l] for l in range(L)],
                  out.logits[0, -1].detach().clone())  # a copy: a view keeps every position's


def decode(model, cache, tokens, graph=False):
    """Feeds tokens [n] one at a time after what `cache` holds (positions go on from
    cache.get_seq_length()); returns the logits after each, [n][vocab] (teacher forcing).
    tokens [B][n] feeds a cache of B rows (e.g. CakedCache.join of one record replayed
    under B policies) one step for all rows at a time: logits [B][n][vocab]. graph: a
    CakedCache on GPU sequences, each step one CUDA graph (GraphDecoder; the eager
    forward's logits to bf16 rounding) instead of transformers' per-layer loop."""
    dev = model.device
    rows = tokens.dim() == 2
    ids = (tokens if rows else tokens[None]).to(dev)
    if graph:
        dec = GraphDecoder(model, cache)
        try:
            lg = None
            for i in range(ids.shape[1]):
                step = dec.step(ids[:, i])
                if lg is None:
                    lg = step.new_empty(ids.shape[0], ids.shape[1], step.shape[-1])
                lg[:, i] = step  # a view of the graph's output: copied before the next
        finally:
            dec.close()
        return lg if rows else lg[0]
    kw = {cache_kwarg(model): cache}
    out = []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            pos = cache.get_seq_length()
            r = model(ids[:, i:i + 1], use_cache=True,
                      cache_position=torch.tensor([pos], device=dev), **kw)
            out.append(r.logits[:, -1])
    lg = torch.stack(out, 1)
    return lg if rows else lg[0]


def _attention_with_lse(query, key, value, scaling):
    """The prompt's causal attention (query, key, value [B][heads][n][d], no padding) through
    cuDNN's kernel, which also returns each row's log-sum-exp at no extra cost: (out
    [B][n][H][d], as sdpa_attention_forward gives it, lse [B][H][n] f32), or (None, None)
    where it does not run here (SDPA runs instead, and caked scores in two passes). Not
    torch's flash kernel: on an H200 it takes twice SDPA's time (tools/bench-lse), more
    than the pass it saves caked."""
    G = query.shape[1] // key.shape[1]
    if G * key.shape[1] != query.shape[1]:
        return None, None
    k = key.repeat_interleave(G, dim=1) if G > 1 else key  # head h reads kv head h // G
    v = value.repeat_interleave(G, dim=1) if G > 1 else value
    try:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(query, k, v, None, True, 0.0, True,
                                                               False, scale=scaling)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None, None
    B, H, n = query.shape[:3]
    lse = r[1]
    if lse.numel() < B * H * n or lse.shape[:2] != (B, H):
        return None, None
    return r[0].transpose(1, 2).contiguous(), lse.reshape(B, H, -1)[..., :n].float()


def caked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    is_causal=None, **kwargs):
    """The "caked" attention: the model's own attention over the prompt (then the layer goes
    to caked), or attention over what the CakedCache holds at decode (then the query goes to
    caked). Any other forward goes to transformers' SDPA."""
    state = getattr(_active, "state", None)
    if state is None or state[1] != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    _active.state = None
    cache, l, phase = state
    if phase == "record":
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, is_causal=is_causal,
                                        **kwargs)
        cache.rec_q[l] = query[0, :, -cache.window:].detach().clone()
        return out, None
    if phase == "prefill":
        out = lse = None
        if dropout == 0.0 and cache._lse_ok(query, key, attention_mask):
            out, lse = _attention_with_lse(query, key, value, scaling)
        if out is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            dropout=dropout, scaling=scaling,
                                            is_causal=is_causal, **kwargs)
        cache._prefill(l, query, key, value, attention_mask, lse)
        return out, None
    out = cache._decode_attention(l, query, key, value, scaling)
    cache._after_decode_attention(l, query)
    return out, None


def cache_kwarg(model):
    """The name under which `model` (and generate) take a cache: "cache" in transformers
    5.x, "past_key_values" before (5.x still accepts it, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def caked_mask(*args, **kwargs):
    """SDPA's mask, but none while a GraphDecoder runs or captures its forward (its batch
    attention reads each row's tokens from the page tables; a mask would change size every
    step, which a graph cannot)."""
    if getattr(_active, "no_mask", False):
        return None
    return sdpa_mask(*args, **kwargs)


def enable(model):
    """Registers the "caked" attention and makes `model` use it (falls back to SDPA when
    its cache is not a CakedCache). Returns the model."""
    AttentionInterface.register("caked", caked_attention)
    AttentionMaskInterface.register("caked", caked_mask)
    model.set_attn_implementation("caked")
    return model
