"""caked: Python binding of libcake (ctypes; nothing to compile at install).

    import caked
    with caked.Client(service="my-engine") as c:
        s = c.open_sequence(layers=32, q_heads=32, kv_heads=8, head_dim=128,
                            dtype="bf16", prompt_len=n, max_new_tokens=256)
        for l in range(32):
            s.reserve(l)
            s.write_layer(l, k, v)          # [kv_heads][n][head_dim] arrays
            s.queries(l)[:] = q_window      # zero-copy view [q_heads][w][head_dim]
            s.observe(l)
        s.decode_step()

Views returned by queries(), decode_query(), indicator() and pages() are numpy arrays over
the daemon's shared pool (no copy); bf16 data shows as uint16 in numpy and as
torch.bfloat16 through torch_view(). They stay valid until the next call on that sequence that
may compact (observe, submit, decode_step). libcake is found through $CAKE_LIB, else the
copy the wheel carries (caked/_lib), else the system's library path. Errors raise CakeError subclasses carrying libcake's code.
"""
import ctypes
import ctypes.util
import os

import numpy as np

__all__ = ["Client", "Sequence", "CakeError", "ProtocolError", "VersionMismatch",
           "OutOfMemory", "NoSequence", "InvalidArgument", "PermissionDenied", "Shutdown",
           "TooBig", "StateError", "InternalError", "NotConnected"]


class CakeError(Exception):
    """A libcake error: .code is the C code (negative), str() the daemon's message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class ProtocolError(CakeError): pass
class VersionMismatch(CakeError): pass
class OutOfMemory(CakeError): pass
class NoSequence(CakeError): pass
class InvalidArgument(CakeError): pass
class PermissionDenied(CakeError): pass
class Shutdown(CakeError): pass
class TooBig(CakeError): pass
class StateError(CakeError): pass
class InternalError(CakeError): pass
class NotConnected(CakeError): pass


_ERRORS = {-5001: ProtocolError, -5002: VersionMismatch, -5003: OutOfMemory,
           -5004: NoSequence, -5005: InvalidArgument, -5006: PermissionDenied,
           -5007: Shutdown, -5008: TooBig, -5009: StateError, -5010: InternalError,
           -5011: NotConnected}

_DTYPES = {"f32": (0, np.float32), "f16": (1, np.float16), "bf16": (2, np.uint16)}


class _Layout(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_uint32), ("q_heads", ctypes.c_uint32),
                ("kv_heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("dtype", ctypes.c_int), ("placement", ctypes.c_int), ("gpu", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 9)]


class _Policy(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("cache_size", ctypes.c_uint32),
                ("window", ctypes.c_uint32), ("tau1", ctypes.c_float), ("tau2", ctypes.c_float),
                ("gamma", ctypes.c_float), ("cascading", ctypes.c_int),
                ("decode_slack", ctypes.c_uint32), ("kind", ctypes.c_int),
                ("alloc", ctypes.c_int), ("indicator", ctypes.c_int), ("pool", ctypes.c_int),
                ("pool_kernel", ctypes.c_uint32), ("decode", ctypes.c_int),
                ("sinks", ctypes.c_uint32), ("pyramid_beta", ctypes.c_float),
                ("ada_alpha", ctypes.c_float), ("run_width", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 14)]


# names of cake.h's policy enums (0 is always "the kind's own")
NO_POSITION = 0xFFFFFFFF  # Sequence.kept_positions: a hole (CAKE_NO_POSITION)
POLICIES = ("cake", "full", "streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "adakv")
_ALLOCS = {None: 0, "preference": 1, "uniform": 2, "pyramid": 3, "none": 4}
_INDICATORS = {None: 0, "mean+var": 1, "mean": 2, "var": 3, "last": 4, "position": 5}
_POOLS = {None: 0, "avg": 1, "max": 2, "none": 3}
_DECODES = {None: 0, "evict": 1, "prefill-only": 2}


def _enum(table, value, what):
    if value not in table:
        raise InvalidArgument(-5005, f"{what} must be one of "
                              f"{sorted(k for k in table if k is not None)}")
    return table[value]


def _load():
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib", "libcake.so.0")
    path = (os.environ.get("CAKE_LIB") or (packaged if os.path.exists(packaged) else None)
            or ctypes.util.find_library("cake"))
    if not path:
        raise OSError("libcake not found: install the wheel, install libcake, or set CAKE_LIB "
                      "to libcake.so")
    lib = ctypes.CDLL(path)
    P, U32, I, U64, SZ = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t
    sig = {
        "cake_strerror": (ctypes.c_char_p, [I]),
        "cake_create": (I, [ctypes.POINTER(P)]),
        "cake_destroy": (None, [P]),
        "cake_set_service": (I, [P, ctypes.c_char_p]),
        "cake_set_timeout_ms": (I, [P, I]),
        "cake_set_server_uid": (I, [P, ctypes.c_long]),
        "cake_set_admin": (I, [P, I]),
        "cake_set_shrink_idle": (I, [P, I]),
        "cake_seq_reslices": (U32, [P]),
        "cake_seq_park": (I, [P, I]),
        "cake_seq_parked": (I, [P]),
        "cake_pool_mapped": (I, [P, P, SZ]),
        "cake_connect": (I, [P, ctypes.c_char_p, I]),
        "cake_fd": (I, [P]),
        "cake_errstr": (ctypes.c_char_p, [P]),
        "cake_pool_base": (P, [P]),
        "cake_pool_bytes": (SZ, [P]),
        "cake_ping": (I, [P]),
        "cake_policy_default": (None, [ctypes.POINTER(_Policy)]),
        "cake_seq_open": (I, [P, ctypes.POINTER(_Layout), ctypes.POINTER(_Policy), U32, U32,
                              ctypes.POINTER(P)]),
        "cake_seq_open_shard": (I, [P, ctypes.POINTER(_Layout), ctypes.POINTER(_Policy), U32,
                                    U32, U64, U32, U32, ctypes.POINTER(P)]),
        "cake_seq_close": (I, [P]),
        "cake_seq_id": (U64, [P]),
        "cake_seq_tokens_per_page": (U32, [P]),
        "cake_prefill_reserve": (I, [P, U32]),
        "cake_prefill_observe": (I, [P, U32, ctypes.POINTER(ctypes.c_double)]),
        "cake_prefill_submit": (I, [P, U32, ctypes.c_double]),
        "cake_decode_step": (I, [P, ctypes.POINTER(P), SZ]),
        "cake_key": (P, [P, U32, U32, U32]),
        "cake_value": (P, [P, U32, U32, U32]),
        "cake_queries": (P, [P, U32]),
        "cake_decode_query": (P, [P, U32]),
        "cake_indicator": (P, [P]),
        "cake_layer_tokens": (U32, [P, U32]),
        "cake_layer_budget": (U32, [P, U32]),
        "cake_head_holes": (U32, [P, U32, U32, ctypes.POINTER(U32)]),
        "cake_layer_pages": (ctypes.POINTER(U64), [P, U32, ctypes.POINTER(U32)]),
        "cake_kept_positions": (I, [P, U32, U32, ctypes.POINTER(U32), SZ, ctypes.POINTER(U32)]),
        "cake_seq_on_gpu": (I, [P]),
        "cake_seq_page_layout": (I, [P, ctypes.POINTER(U64), ctypes.POINTER(U64)]),
        "cake_put_queries": (I, [P, U32, P, U32, P]),
        "cake_put_lse": (I, [P, U32, P, U32, P]),
        "cake_put_decode_query": (I, [P, U32, P, P]),
        "cake_put_decode_lse": (I, [P, U32, P, P]),
        "cake_gpu_count": (U32, [P]),
        "cake_gpu_uuid_at": (ctypes.c_char_p, [P, U32]),
        "cake_gpu_pool_base_at": (U64, [P, U32]),
        "cake_gpu_pool_bytes_at": (SZ, [P, U32]),
        "cake_device_tables": (I, [P, ctypes.POINTER(P), ctypes.POINTER(P), ctypes.POINTER(U32)]),
        "cake_device_holes": (I, [P, ctypes.POINTER(P)]),
        "cake_batch_create": (I, [P, ctypes.POINTER(P), SZ, ctypes.POINTER(P)]),
        "cake_batch_attention": (I, [P, U32, P, P, U32, P]),
        "cake_batch_destroy": (None, [P]),
        "cake_batch_append": (I, [P, U32, P, P, P]),
        "cake_batch_put_decode_query": (I, [P, U32, P, P]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib = None


def _L():
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _check(ctx, rc):
    if rc >= 0:
        return rc
    lib = _L()
    msg = lib.cake_errstr(ctx).decode(errors="replace") if ctx else ""
    text = msg or lib.cake_strerror(rc).decode()
    if rc > -4096:
        raise OSError(-rc, text)
    raise _ERRORS.get(rc, CakeError)(rc, text)


class Client:
    """A connection to caked (one tenant: `service` under this process's uid)."""

    def __init__(self, socket=None, service="python", map_pool=True, timeout_ms=0,
                 server_uid=None, admin=False, shrink_idle=False):
        """server_uid: the uid caked must run as (default: root or this process's own; any
        other server is refused before anything is sent). admin: ask for administration
        (granted to root, caked's uid and --admin-group members). shrink_idle: under memory
        pressure caked may compact this client's idle sequences inside any of its calls
        (cake_set_shrink_idle: arrays over their pages are then valid until the next call)."""
        lib = _L()
        self._ctx = ctypes.c_void_p()
        _check(None, lib.cake_create(ctypes.byref(self._ctx)))
        try:
            _check(self._ctx, lib.cake_set_service(self._ctx, service.encode()))
            _check(self._ctx, lib.cake_set_timeout_ms(self._ctx, timeout_ms))
            if server_uid is not None:
                _check(self._ctx, lib.cake_set_server_uid(self._ctx, int(server_uid)))
            if admin:
                _check(self._ctx, lib.cake_set_admin(self._ctx, 1))
            if shrink_idle:
                _check(self._ctx, lib.cake_set_shrink_idle(self._ctx, 1))
            _check(self._ctx, lib.cake_connect(self._ctx, socket.encode() if socket else None,
                                                1 if map_pool else 0))
        except BaseException:
            lib.cake_destroy(self._ctx)
            self._ctx = None
            raise
        self._seqs = []
        self._pool_arr = None

    def close(self):
        self._pool_arr = None
        if self._ctx:
            for s in self._seqs:
                s._handle = None
            _L().cake_destroy(self._ctx)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def fileno(self):
        return _L().cake_fd(self._ctx)

    def ping(self):
        _check(self._ctx, _L().cake_ping(self._ctx))

    def _pool(self):
        lib = _L()
        base, size = lib.cake_pool_base(self._ctx), lib.cake_pool_bytes(self._ctx)
        if not base:
            raise InvalidArgument(-5005, "connected without the pool (map_pool=False)")
        return base, size

    def _pool_bytes(self):
        """The host pool as one uint8 array (no copy): pages are slices of it. Only the
        pages caked gave this client are mapped; nothing else of it may be touched."""
        if self._pool_arr is None:
            base, size = self._pool()
            self._pool_arr = np.frombuffer((ctypes.c_char * size).from_address(base), np.uint8)
        return self._pool_arr

    def open_sequence(self, layers, q_heads, kv_heads, head_dim, prompt_len, dtype="bf16",
                      max_new_tokens=0, mode="fixed", cache_size=1024, window=32, tau1=1.0,
                      tau2=1.0, gamma=200.0, cascading=True, decode_slack=0, policy="cake",
                      alloc=None, indicator=None, pool=None, pool_kernel=0, decode=None,
                      sinks=0, pyramid_beta=0.0, ada_alpha=0.0, run_width=0, shard_group=0,
                      shards=0, shard=0, placement="host", gpu=0):
        """Opens a sequence. `policy` is one of POLICIES; alloc ("preference", "uniform",
        "pyramid", "none"), indicator ("mean+var", "mean", "var", "last", "position"), pool
        ("avg", "max", "none"), decode ("evict", "prefill-only") override the kind's own
        components (the paper's ablations); None keeps them. run_width (odd): the prefill keeps
        runs of that many positions around each head's best tokens (cake_policy.run_width;
        0 or 1: its top tokens). shard_group, shards, shard: one
        shard of a tensor-parallel sequence (cake_seq_open_shard). placement="gpu" puts K/V
        and the query rings in caked's GPU pool number `gpu` (caked.gpu works on them as
        torch tensors)."""
        if dtype not in _DTYPES:
            raise InvalidArgument(-5005, f"dtype must be one of {sorted(_DTYPES)}")
        if mode not in ("fixed", "parity"):
            raise InvalidArgument(-5005, "mode must be 'fixed' or 'parity'")
        if placement not in ("host", "gpu"):
            raise InvalidArgument(-5005, "placement must be 'host' or 'gpu'")
        lay = _Layout(layers, q_heads, kv_heads, head_dim, _DTYPES[dtype][0],
                      1 if placement == "gpu" else 0, gpu)
        if policy not in POLICIES:
            raise InvalidArgument(-5005, f"policy must be one of {list(POLICIES)}")
        pol = _Policy(1 if mode == "fixed" else 0, cache_size, window, tau1, tau2, gamma,
                      1 if cascading else 0, decode_slack, POLICIES.index(policy),
                      _enum(_ALLOCS, alloc, "alloc"), _enum(_INDICATORS, indicator, "indicator"),
                      _enum(_POOLS, pool, "pool"), pool_kernel, _enum(_DECODES, decode, "decode"),
                      sinks, pyramid_beta, ada_alpha, run_width)
        h = ctypes.c_void_p()
        if shards:
            _check(self._ctx, _L().cake_seq_open_shard(
                self._ctx, ctypes.byref(lay), ctypes.byref(pol), prompt_len, max_new_tokens,
                shard_group, shards, shard, ctypes.byref(h)))
        else:
            _check(self._ctx, _L().cake_seq_open(self._ctx, ctypes.byref(lay), ctypes.byref(pol),
                                                 prompt_len, max_new_tokens, ctypes.byref(h)))
        s = Sequence(self, h, layers, q_heads, kv_heads, head_dim, dtype, prompt_len, window)
        s.gpu = gpu if placement == "gpu" else None
        self._seqs.append(s)
        return s

    def decode_step(self, seqs):
        """One decode step for several sequences of this client at once."""
        arr = (ctypes.c_void_p * len(seqs))(*[s._handle for s in seqs])
        _check(self._ctx, _L().cake_decode_step(self._ctx, arr, len(seqs)))


def _view(addr, shape, dtype, strides=None, why="no such view"):
    """A numpy array over `addr` in the shared pool (no copy); ValueError(why) where libcake
    gave none (NULL)."""
    if not addr:
        raise ValueError(why)
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if strides is None:
        buf = (ctypes.c_char * (n * dt.itemsize)).from_address(addr)
        return np.frombuffer(buf, dtype=dt).reshape(shape)
    span = sum((s - 1) * st for s, st in zip(shape, strides)) + dt.itemsize
    buf = (ctypes.c_char * span).from_address(addr)
    return np.ndarray(shape, dtype=dt, buffer=buf, strides=strides)


class Sequence:
    """One request's KV cache in caked's pool."""

    def __init__(self, client, handle, layers, q_heads, kv_heads, head_dim, dtype, prompt_len,
                 window):
        self._client, self._handle = client, handle
        self.layers, self.q_heads, self.kv_heads, self.head_dim = layers, q_heads, kv_heads, head_dim
        self.dtype, self.prompt_len, self.window = dtype, prompt_len, window
        self._np = _DTYPES[dtype][1]
        self.tokens_per_page = _L().cake_seq_tokens_per_page(handle)

    def _ctx(self):
        if not self._handle:
            raise NoSequence(-5004, "sequence closed")
        return self._client._ctx

    @property
    def id(self):
        return _L().cake_seq_id(self._handle)

    @property
    def on_gpu(self):
        return bool(_L().cake_seq_on_gpu(self._handle))

    def close(self):
        if self._handle:
            h, self._handle = self._handle, None
            self._client._seqs.remove(self)
            _check(self._client._ctx, _L().cake_seq_close(h))

    def reserve(self, layer):
        _check(self._ctx(), _L().cake_prefill_reserve(self._handle, layer))

    def observe(self, layer):
        """caked scores the layer from the window queries, allocates, compacts; returns P_l."""
        p = ctypes.c_double()
        _check(self._ctx(), _L().cake_prefill_observe(self._handle, layer, ctypes.byref(p)))
        return p.value

    def submit(self, layer, preference):
        """The engine's own scores: preference, and the indicator already in indicator()."""
        _check(self._ctx(), _L().cake_prefill_submit(self._handle, layer, preference))

    def decode_step(self):
        self._client.decode_step([self])

    def tokens(self, layer):
        return _L().cake_layer_tokens(self._handle, layer)

    def budget(self, layer):
        return _L().cake_layer_budget(self._handle, layer)

    def reslices(self):
        """Times caked lowered this sequence's budgets to make room (pressure)."""
        return _L().cake_seq_reslices(self._handle)

    def park(self, park=True):
        """A GPU sequence's K/V to the host pool (park=False: back to the GPU; a decode step
        brings a parked sequence back by itself). Views of its pages are stale after either."""
        _check(self._ctx(), _L().cake_seq_park(self._handle, 1 if park else 0))

    def parked(self):
        return bool(_L().cake_seq_parked(self._handle))

    def holes(self, layer):
        """Per kv head, (first, count) of slots holding no token (Ada-KV's per-head budgets;
        (0, 0) under every other policy): attention must mask them."""
        out = []
        for g in range(self.kv_heads):
            first = ctypes.c_uint32(0)
            cnt = _L().cake_head_holes(self._handle, layer, g, ctypes.byref(first))
            out.append((first.value if cnt else 0, cnt))
        return out

    def kept_positions(self, layer, kv_head):
        """Original positions of the tokens in the layer's slots for kv head `kv_head`, in
        slot order (numpy uint32: prompt tokens 0 .. prompt_len - 1, the t-th decoded token
        prompt_len + t, NO_POSITION for a hole). Asks caked (a round trip); while a GPU
        sequence's prompt is prefilled caked reads them from the GPU and, when every GPU
        context of its is busy, raises the CAKE_ESTATE error: ask again."""
        ctx, n = self._ctx(), ctypes.c_uint32()
        out = np.empty(max(self.tokens(layer), 1), np.uint32)
        while True:
            ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
            _check(ctx, _L().cake_kept_positions(self._handle, layer, kv_head, ptr, out.size,
                                                 ctypes.byref(n)))
            if n.value <= out.size:
                return out[:n.value].copy()
            out = np.empty(n.value, np.uint32)

    def pages(self, layer, first=0, last=None):
        """Zero-copy (K, V) views of each page: [kv_heads][tokens_per_page][head_dim]
        (pages first..last - 1 of the layer's; all by default)."""
        self._ctx()
        pool = self._client._pool_bytes()
        n = ctypes.c_uint32()
        offs = _L().cake_layer_pages(self._handle, layer, ctypes.byref(n))
        shape = (2, self.kv_heads, self.tokens_per_page, self.head_dim)  # K then V
        dt = np.dtype(self._np)
        span = 2 * self.kv_heads * self.tokens_per_page * self.head_dim * dt.itemsize
        out = []
        for i in range(first, n.value if last is None else min(last, n.value)):
            kv = pool[offs[i]:offs[i] + span].view(dt).reshape(shape)
            out.append((kv[0], kv[1]))
        return out

    def write_layer(self, layer, k, v, start=0):
        """Copies k, v ([kv_heads][t][head_dim]) into slots start.. of the layer."""
        k, v = np.asarray(k, dtype=self._np), np.asarray(v, dtype=self._np)
        tpp, t = self.tokens_per_page, k.shape[1]
        if not t:
            return
        p0 = start // tpp
        for i, (pk, pv) in enumerate(self.pages(layer, p0, (start + t - 1) // tpp + 1), p0):
            a, b = max(start, i * tpp), min(start + t, (i + 1) * tpp)
            pk[:, a - i * tpp:b - i * tpp] = k[:, a - start:b - start]
            pv[:, a - i * tpp:b - i * tpp] = v[:, a - start:b - start]

    def read_layer(self, layer, out=None):
        """Copies of the layer's held K and V: [kv_heads][tokens(layer)][head_dim] each;
        into out = (k, v), arrays of this dtype [kv_heads][>= tokens][head_dim], when given
        (their first tokens(layer) slots; returned as views of them)."""
        n, tpp = self.tokens(layer), self.tokens_per_page
        if out is None:
            k = np.empty((self.kv_heads, n, self.head_dim), self._np)
            v = np.empty_like(k)
        else:
            k, v = out
            if k.dtype != np.dtype(self._np) or v.dtype != k.dtype or k.shape[1] < n or \
                    v.shape[1] < n:
                raise InvalidArgument(-5005, f"read_layer needs {self._np.__name__} arrays "
                                             f"of at least {n} tokens")
        for i, (pk, pv) in enumerate(self.pages(layer, 0, (n + tpp - 1) // tpp)):
            a, b = i * tpp, min(n, (i + 1) * tpp)
            k[:, a:b] = pk[:, :b - a]
            v[:, a:b] = pv[:, :b - a]
        return k[:, :n], v[:, :n]

    def queries(self, layer):
        """Zero-copy view of the layer's window queries: [q_heads][window][head_dim] (host
        sequences; ValueError for a GPU sequence's paged rings or no such layer)."""
        addr = _L().cake_queries(self._handle, layer)
        return _view(addr, (self.q_heads, self.window, self.head_dim), self._np,
                     why=f"no query ring view for layer {layer} (no such layer, or a GPU "
                         "sequence: caked.gpu.put_queries)")

    def decode_query(self, layer):
        """Zero-copy view where the reserved token's query goes: [q_heads][head_dim]. ValueError
        before the first decode_step (no token reserved: the ring holds the prompt's rows), for
        no such layer, or for a GPU sequence (caked.gpu.put_decode_query)."""
        addr = _L().cake_decode_query(self._handle, layer)
        it = np.dtype(self._np).itemsize
        return _view(addr, (self.q_heads, self.head_dim), self._np,
                     strides=(self.window * self.head_dim * it, it),
                     why=f"no decode query slot in layer {layer}: no decode step has reserved "
                         "a token yet (or no such layer, or a GPU sequence)")

    def put_lse(self, layer, lse):
        """The log-sum-exp of each window query row, lse [q_heads][n] (host memory; the last
        `window` of each head): the next observe of the layer scores in one pass with them
        (cake_put_lse). GPU sequences take device tensors through caked.gpu.put_lse."""
        lse = np.ascontiguousarray(lse, dtype=np.float32)
        if lse.ndim != 2 or lse.shape[0] != self.q_heads:
            raise ValueError(f"lse must be [q_heads={self.q_heads}][n], not {list(lse.shape)}")
        _check(self._ctx(), _L().cake_put_lse(self._handle, layer,
                                              lse.ctypes.data_as(ctypes.c_void_p), lse.shape[1],
                                              None))

    def put_decode_lse(self, layer, lse):
        """The log-sum-exp of the decode token's query rows, lse [q_heads] (host memory), as the
        engine's decode attention returned it: the next decode step's eviction of the layer
        skips its pass over the keys for them (cake_put_decode_lse; GPU sequences take device
        tensors through caked.gpu.put_decode_lse)."""
        lse = np.ascontiguousarray(lse, dtype=np.float32).reshape(-1)
        if lse.shape[0] != self.q_heads:
            raise ValueError(f"lse must be [q_heads={self.q_heads}], not {list(lse.shape)}")
        _check(self._ctx(), _L().cake_put_decode_lse(self._handle, layer,
                                                     lse.ctypes.data_as(ctypes.c_void_p), None))

    def indicator(self):
        """Zero-copy view of the indicator area for submit(): [kv_heads][prompt_len - window]."""
        addr = _L().cake_indicator(self._handle)
        S = max(self.prompt_len - self.window, 0)
        return _view(addr, (self.kv_heads, S), np.float32)


def torch_view(array):
    """A torch tensor over the same memory as a view from this module (bf16 as torch.bfloat16)."""
    import torch
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if array.dtype == np.uint16 else t
