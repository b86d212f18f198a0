"""A transformers Cache whose keys and values live in caked's pool.

    import caked, caked.hf
    caked.hf.enable(model)                      # registers the "caked" attention, selects it
    with caked.Client() as client:
        cache = caked.hf.CakedCache(client, model.config, max_new_tokens=64,
                                    policy="snapkv", cache_size=128)
        out = model.generate(ids, cache=cache, max_new_tokens=64)  # transformers < 5: past_key_values=

Prefill (the whole prompt in one forward) writes each layer's keys, values and last `window`
queries into the pool; the layer's attention runs over the full prompt (exact, as CAKE's
reference does), then caked scores the layer and evicts under the sequence's policy
(cascading: the pool never holds more than the budget plus one layer). Each decode step asks
caked for the step first (it evicts what the policy says, using the queries of the steps
before), writes the new token's K/V and query, and attends over what the layer holds. Positions
stay absolute (RoPE is applied before the cache sees keys), so `get_seq_length()` counts tokens
seen, not tokens held.

Limits: batch size 1, the prompt in one forward, then one token per forward (what generate
does); host sequences (the pool is CPU memory: with a CUDA model, K/V are copied in and out).
The "caked" attention falls back to SDPA for any forward not driven by a CakedCache, so an
enabled model still runs with transformers' own caches.
"""
import inspect
import threading

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import InvalidArgument, StateError, torch_view

_TORCH_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_active = threading.local()  # the cache layer whose attention runs next on this thread


def _np_of(t):
    """A contiguous CPU numpy array with the bits of t (bf16 as uint16)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


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
        if key_states.shape[0] != 1:
            raise InvalidArgument(-5005, "CakedCache holds one sequence: batch size 1")
        q_len = key_states.shape[-2]
        if c.seq is None or (self.layer >= c.prefilled and c.decoded == 0):
            k, v = c._prefill(self.layer, key_states, value_states)
            _active.state = (c, self.layer, "prefill")
            return k, v
        if q_len != 1:
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
    """A transformers Cache backed by a caked sequence under any policy (caked.POLICIES).

    client: a connected caked.Client (map_pool=True). config: the model's config.
    max_new_tokens: tokens generate may add after the prompt (the sequence's decode room).
    Policy keywords go to Client.open_sequence (policy, cache_size, window, gamma, alloc,
    indicator, ...)."""

    def __init__(self, client, config, max_new_tokens, **policy):
        cfg = config.get_text_config(decoder=True)
        self.client, self.max_new = client, max_new_tokens
        self.n_layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.policy = dict(policy)
        self.seq, self.prefilled, self.decoded, self.seen = None, 0, 0, 0
        super().__init__(layers=[CakedLayer(self, l) for l in range(self.n_layers)])

    # -- what the layers call ------------------------------------------------------------
    def _prefill(self, l, k, v):
        n = k.shape[-2]
        if self.seq is None:
            if l != 0:
                raise StateError(-5009, "prefill must start at layer 0")
            dt = _TORCH_DTYPES.get(k.dtype)
            if dt is None:
                raise InvalidArgument(-5005, f"unsupported dtype {k.dtype}")
            self.seq = self.client.open_sequence(
                self.n_layers, self.q_heads, k.shape[1], k.shape[-1], n, dtype=dt,
                max_new_tokens=self.max_new, **self.policy)
        if l != self.prefilled:
            raise StateError(-5009, f"prefill of layer {l} out of order")
        self.seq.reserve(l)
        self.seq.write_layer(l, _np_of(k[0]), _np_of(v[0]))
        if l == self.n_layers - 1:
            self.seen = n
        return k, v  # the prompt attends to every prompt token

    def _after_prefill_attention(self, l, query):
        w = self.seq.window
        q = _np_of(query[0, :, -w:])  # [H][<=w][d], oldest first
        self.seq.queries(l)[:, w - q.shape[1]:] = q
        self.seq.observe(l)
        self.prefilled += 1

    def _decode(self, l, k, v):
        s = self.seq
        if l == 0:
            if self.prefilled != self.n_layers:
                raise StateError(-5009, "decode before the prompt was prefilled")
            s.decode_step()  # evicts by the steps before, reserves this token's slot
            self.decoded += 1
            self.seen += 1
        t = s.tokens(l)
        s.write_layer(l, _np_of(k[0]), _np_of(v[0]), start=t - 1)
        hk, hv = s.read_layer(l)
        dev = k.device
        to_t = (lambda a: torch_view(a)) if s.dtype == "bf16" else torch.from_numpy
        return to_t(hk).unsqueeze(0).to(dev), to_t(hv).unsqueeze(0).to(dev)

    def _after_decode_attention(self, l, query):
        self.seq.decode_query(l)[:] = _np_of(query[0, :, -1])

    def _hole_mask(self, l, n, device):
        """[1, H, 1, n] bool (True: attend) when the layer has Ada-KV holes, else None."""
        holes = self.seq.holes(l)
        if not any(c for _, c in holes):
            return None
        g = self.q_heads // len(holes)
        m = torch.ones(1, self.q_heads, 1, n, dtype=torch.bool, device=device)
        for kvh, (first, cnt) in enumerate(holes):
            if cnt:
                m[0, kvh * g:(kvh + 1) * g, 0, first:first + cnt] = False
        return m

    # -- Cache API -----------------------------------------------------------------------
    def get_seq_length(self, layer_idx=0):
        return self.seen

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx=None):
        return -1

    def layer_tokens(self):
        """Tokens each layer holds now (kept + window + decoded)."""
        return [self.seq.tokens(l) for l in range(self.n_layers)] if self.seq else []

    def reset(self):
        self.close()
        self.prefilled = self.decoded = self.seen = 0

    def close(self):
        """Frees the sequence in caked (also done when the client closes)."""
        if self.seq is not None:
            self.seq.close()
            self.seq = None

    def reorder_cache(self, beam_idx):
        raise InvalidArgument(-5005, "CakedCache holds one sequence: no beam search")

    def crop(self, max_length):
        raise InvalidArgument(-5005, "CakedCache cannot crop (assisted decoding)")


def caked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    is_causal=None, **kwargs):
    """The "caked" attention: exact attention over what the CakedCache returned, then the
    queries go to caked. Any other forward goes to transformers' SDPA."""
    state = getattr(_active, "state", None)
    if state is None or state[1] != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    _active.state = None
    cache, l, phase = state
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1) if g > 1 else key
    v = value.repeat_interleave(g, dim=1) if g > 1 else value
    if phase == "prefill":
        out = F.scaled_dot_product_attention(query, k, v, is_causal=query.shape[-2] > 1,
                                             scale=scaling)
        cache._after_prefill_attention(l, query)
    else:
        mask = cache._hole_mask(l, k.shape[-2], query.device)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
        cache._after_decode_attention(l, query)
    return out.transpose(1, 2).contiguous(), None


def cache_kwarg(model):
    """The name under which `model` (and generate) take a cache: "cache" in transformers
    5.x, "past_key_values" before (5.x still accepts it, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def enable(model):
    """Registers the "caked" attention and makes `model` use it (falls back to SDPA when
    its cache is not a CakedCache). Returns the model."""
    AttentionInterface.register("caked", caked_attention)
    AttentionMaskInterface.register("caked", sdpa_mask)
    model.set_attn_implementation("caked")
    return model
