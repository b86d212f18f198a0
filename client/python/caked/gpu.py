"""caked.gpu - GPU sequences as torch tensors, with no copy through the host.

The GPU pool, as this process maps it, is one tensor shaped like FlashInfer's HND paged KV
cache, [pages][2][kv_heads][tokens_per_page][head_dim] (kv_cache); each layer's page table
and token count are int32 device tensors that libcake keeps up to date after every call
that changes them (tables); K/V go into the pages by torch's own indexing kernels
(write_kv), queries into the rings on the device (put_queries, put_decode_query), and
Batch runs one layer's decode attention, K/V append and decode queries for many sequences
in one launch each, capturable in a CUDA graph. Needs torch with CUDA and libcake built with CUDA.
"""
import ctypes

import torch

from . import InvalidArgument, _check, _L

_TORCH = {"f16": (torch.float16, "<f2"), "bf16": (torch.bfloat16, "<i2")}


class _Cuda:
    """__cuda_array_interface__ over raw device memory (torch.as_tensor reads it, no copy)."""

    def __init__(self, ptr, shape, typestr):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                         "typestr": typestr, "version": 3, "strides": None}


def _raw(ptr, n, dtype, device):
    """A 1-D tensor of n elements of dtype at device address ptr (bf16 via int16)."""
    tdt, typestr = _TORCH[dtype] if dtype in _TORCH else (torch.int32, "<i4")
    t = torch.as_tensor(_Cuda(ptr, (n,), typestr), device=device)
    return t.view(tdt) if tdt != t.dtype else t


def device_of(seq):
    """The torch device of the sequence's GPU pool (matched by UUID)."""
    uuid = _L().cake_gpu_uuid_at(seq._client._ctx, seq.gpu).decode()
    for i in range(torch.cuda.device_count()):
        if ("GPU-" + str(torch.cuda.get_device_properties(i).uuid)) == uuid:
            return torch.device("cuda", i)
    raise InvalidArgument(-5005, f"no torch device is {uuid}")


def _need_gpu(seq):
    if not seq.on_gpu:
        raise InvalidArgument(-5005, "a GPU sequence is needed (placement='gpu')")
    if seq.dtype not in _TORCH:
        raise InvalidArgument(-5005, "GPU sequences hold f16 or bf16")


def kv_cache(seq):
    """The whole GPU pool as [pages][2][kv_heads][tokens_per_page][head_dim] in the
    sequence's dtype (FlashInfer's HND layout; page index i = the pool's page i): the pages
    of the sequence's layers are tables(seq)[1][layer][:n_pages]."""
    _need_gpu(seq)
    ctx = seq._client._ctx
    pb, vo = ctypes.c_uint64(), ctypes.c_uint64()
    _L().cake_seq_page_layout(seq._handle, ctypes.byref(pb), ctypes.byref(vo))
    base = _L().cake_gpu_pool_base_at(ctx, seq.gpu)
    size = _L().cake_gpu_pool_bytes_at(ctx, seq.gpu)
    es = torch.tensor([], dtype=_TORCH[seq.dtype][0]).element_size()
    H, T, D = seq.kv_heads, seq.tokens_per_page, seq.head_dim
    flat = _raw(base, size // es, seq.dtype, device_of(seq))
    return flat.as_strided((size // pb.value, 2, H, T, D),
                           (pb.value // es, vo.value // es, T * D, D, 1))


def tables(seq):
    """(tokens [layers], pages [layers][max_pages]) int32 device tensors: each layer's token
    count and its pages' indices into kv_cache(seq). Fixed addresses, refreshed by libcake."""
    _need_gpu(seq)
    tok, pg, mp = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint32()
    _check(seq._ctx(), _L().cake_device_tables(seq._handle, ctypes.byref(tok), ctypes.byref(pg),
                                               ctypes.byref(mp)))
    dev = device_of(seq)
    tokens = _raw(tok.value, seq.layers, "i32", dev)
    pages = _raw(pg.value, seq.layers * mp.value, "i32", dev).view(seq.layers, mp.value)
    return tokens, pages


def holes(seq):
    """[layers][kv_heads][2] int32 device tensor: each kv head's Ada-KV hole (first slot,
    count; 0, 0 where none), beside tables(seq) and refreshed with them."""
    _need_gpu(seq)
    h = ctypes.c_void_p()
    _check(seq._ctx(), _L().cake_device_holes(seq._handle, ctypes.byref(h)))
    return _raw(h.value, seq.layers * seq.kv_heads * 2, "i32", device_of(seq)).view(
        seq.layers, seq.kv_heads, 2)


def slot_index(seq, layer, slots):
    """(page indices, offsets in page) of slots (an int64 device tensor) of a layer."""
    _, pages = tables(seq)
    return pages[layer][slots // seq.tokens_per_page].long(), slots % seq.tokens_per_page


def write_kv(seq, layer, k, v, start=0):
    """k, v [kv_heads][n][head_dim] (device tensors in the sequence's dtype) into slots
    start .. start + n - 1 of the layer's pages, by torch's indexing kernel."""
    cache = kv_cache(seq)
    n = k.shape[1]
    slots = torch.arange(start, start + n, device=cache.device)
    p, o = slot_index(seq, layer, slots)
    cache[p, 0, :, o, :] = k.permute(1, 0, 2).to(cache.dtype)
    cache[p, 1, :, o, :] = v.permute(1, 0, 2).to(cache.dtype)


def read_layer(seq, layer):
    """(K, V) [kv_heads][tokens][head_dim] of the layer, gathered from the pages by torch
    (a reference reader of the HND description)."""
    cache = kv_cache(seq)
    tokens, _ = tables(seq)
    n = int(tokens[layer])
    p, o = slot_index(seq, layer, torch.arange(n, device=cache.device))
    return cache[p, 0, :, o, :].permute(1, 0, 2), cache[p, 1, :, o, :].permute(1, 0, 2)


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def put_queries(seq, layer, q):
    """q [q_heads][n][head_dim] (a device tensor): its last `window` rows go into the layer's
    query ring, on torch's current stream."""
    q = q.to(_TORCH[seq.dtype][0]).contiguous()
    _check(seq._ctx(), _L().cake_put_queries(seq._handle, layer, ctypes.c_void_p(q.data_ptr()),
                                             q.shape[1], _stream()))


def put_lse(seq, layer, lse):
    """lse [q_heads][n] (a float32 device tensor, or a host one): each window row's
    log-sum-exp, as the model's attention returned it; the next observe of the layer scores
    in one pass with them (cake_put_lse), on torch's current stream."""
    lse = lse.to(torch.float32).contiguous()
    if lse.dim() != 2 or lse.shape[0] != seq.q_heads:
        raise ValueError(f"lse must be [q_heads={seq.q_heads}][n], not {list(lse.shape)}")
    _check(seq._ctx(), _L().cake_put_lse(seq._handle, layer, ctypes.c_void_p(lse.data_ptr()),
                                         lse.shape[1], _stream()))


def put_decode_lse(seq, layer, lse):
    """lse [q_heads] (a float32 device tensor, or a host one): the decode token's log-sum-exp
    per query head, as the model's decode attention returned it; the next decode step's
    eviction of the layer skips its pass over the keys for them (cake_put_decode_lse), on
    torch's current stream."""
    lse = lse.to(torch.float32).contiguous().reshape(-1)
    if lse.shape[0] != seq.q_heads:
        raise ValueError(f"lse must be [q_heads={seq.q_heads}], not {list(lse.shape)}")
    _check(seq._ctx(), _L().cake_put_decode_lse(seq._handle, layer, ctypes.c_void_p(lse.data_ptr()),
                                                _stream()))


def put_decode_query(seq, layer, q):
    """The newest token's query [q_heads][head_dim] into the ring (after a decode step)."""
    q = q.to(_TORCH[seq.dtype][0]).contiguous()
    _check(seq._ctx(), _L().cake_put_decode_query(seq._handle, layer,
                                                  ctypes.c_void_p(q.data_ptr()), _stream()))


class Batch:
    """One layer's decode attention for many GPU sequences of one client, one launch per
    layer (cake_batch_*). Close it before closing any of its sequences."""

    def __init__(self, client, seqs):
        self._client, self.seqs = client, list(seqs)
        arr = (ctypes.c_void_p * len(seqs))(*[s._handle for s in seqs])
        h = ctypes.c_void_p()
        _check(client._ctx, _L().cake_batch_create(client._ctx, arr, len(seqs), ctypes.byref(h)))
        self._h = h

    def _check_rows(self, what, t, heads):
        """t must be a CUDA tensor [n][heads][head_dim] in the sequences' dtype."""
        s0 = self.seqs[0]
        want = (len(self.seqs), heads, s0.head_dim)
        if not t.is_cuda or tuple(t.shape) != want or t.dtype != _TORCH[s0.dtype][0]:
            raise InvalidArgument(-5005, f"{what} must be a CUDA {_TORCH[s0.dtype][0]} tensor "
                                         f"{list(want)}, not {t.dtype} {list(t.shape)} on "
                                         f"{t.device}")

    def attention(self, layer, q, out=None, max_tokens=0):
        """q [n][q_heads][head_dim] -> out, the same shape and dtype (softmax(q K^T/sqrt(d)) V
        over each sequence's tokens); on torch's current stream. max_tokens: a bound on
        every count (fixed: for CUDA graphs), 0 the counts now."""
        self._check_rows("q", q, self.seqs[0].q_heads)
        q = q.contiguous()
        out = torch.empty_like(q) if out is None else out
        self._check_rows("out", out, self.seqs[0].q_heads)
        if not out.is_contiguous():
            raise InvalidArgument(-5005, "out must be contiguous")
        _check(self._client._ctx, _L().cake_batch_attention(
            self._h, layer, ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            max_tokens, _stream()))
        return out

    def append(self, layer, k, v):
        """k, v [n][kv_heads][head_dim]: each sequence's newest token (after a decode step)
        into its reserved slot, one launch, on torch's current stream."""
        self._check_rows("k", k, self.seqs[0].kv_heads)
        self._check_rows("v", v, self.seqs[0].kv_heads)
        k, v = k.contiguous(), v.contiguous()
        _check(self._client._ctx, _L().cake_batch_append(
            self._h, layer, ctypes.c_void_p(k.data_ptr()), ctypes.c_void_p(v.data_ptr()),
            _stream()))

    def put_decode_query(self, layer, q):
        """q [n][q_heads][head_dim] (the sequences' dtype): each sequence's newest token's
        query into its ring slot, one launch that reads the slots on the device (capturable),
        on torch's current stream."""
        self._check_rows("q", q, self.seqs[0].q_heads)
        q = q.contiguous()
        _check(self._client._ctx, _L().cake_batch_put_decode_query(
            self._h, layer, ctypes.c_void_p(q.data_ptr()), _stream()))

    def close(self):
        if self._h:
            _L().cake_batch_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
