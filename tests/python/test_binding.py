"""The Python binding against a real caked: zero-copy views, prefill (observe and submit),
decode, typed exceptions. Needs CAKE_LIB (libcake.so) and CAKED_BIN (caked) in the
environment; the package is imported from client/python."""
import os
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client", "python"))
import caked  # noqa: E402
import caked.daemon  # noqa: E402


def bf16(x):
    """float32 -> bf16 bits (round to nearest even), as uint16."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


class Daemon(caked.daemon.Private):
    """A private caked for a test (args: more options, which win over the defaults); its log
    to `log` when given (else discarded); its exit on SIGTERM must be clean."""

    def __init__(self, *args, log=None):
        super().__init__(os.environ["CAKED_BIN"], "--host-pool", "128M", "--workers", "2",
                         *args, stderr=log or subprocess.DEVNULL)

    def __exit__(self, *exc):
        assert self.stop() == 0, "caked did not exit cleanly"


class Binding(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.d.__exit__(None, None, None)

    def test_prefill_observe_keeps_ordered_subsets_and_exact_totals(self):
        rng = np.random.default_rng()
        L, H, Hkv, D, n, C, w = 3, 8, 2, 64, 700, 96, 32
        with caked.Client(self.d.sock, service="py-observe") as c:
            s = c.open_sequence(L, H, Hkv, D, n, dtype="bf16", cache_size=C, window=w)
            original = []
            for l in range(L):
                s.reserve(l)
                k = bf16(rng.uniform(-1, 1, (Hkv, n, D)))
                k[:, rng.integers(0, n - w, 20)] = bf16(rng.uniform(2, 3, (Hkv, 20, D)))
                v = bf16(rng.uniform(-1, 1, (Hkv, n, D)))
                s.write_layer(l, k, v)
                q = s.queries(l)
                self.assertEqual(q.shape, (H, w, D))
                q[:] = bf16(rng.uniform(-1.5, 1.5, (H, w, D)))  # zero-copy into the pool
                original.append((k, v))
                pref = s.observe(l)
                self.assertGreater(pref, 0)
            self.assertEqual(sum(s.budget(l) for l in range(L)), (C - w) * L)
            for l in range(L):
                kk, vv = s.read_layer(l)
                k, v = original[l]
                self.assertEqual(kk.shape[1], s.budget(l) + w)
                self.assertTrue((kk[:, -w:] == k[:, -w:]).all(), "the window follows the kept tokens")
                for g in range(Hkv):  # kept rows: original rows, in positional order
                    rows = {k[g, j].tobytes(): j for j in range(n - w)}
                    pos = [rows[r.tobytes()] for r in kk[g, :-w]]
                    self.assertEqual(pos, sorted(pos))
                    self.assertTrue((vv[g, :-w] == v[g, pos]).all(), "V moved with K")
            s.close()
            with self.assertRaises(caked.NoSequence):
                s.reserve(0)

    def test_submit_keeps_exactly_the_engines_top_k(self):
        rng = np.random.default_rng()
        L, H, Hkv, D, n, C, w = 1, 4, 2, 32, 300, 64, 16
        with caked.Client(self.d.sock, service="py-submit") as c:
            s = c.open_sequence(L, H, Hkv, D, n, dtype="f16", cache_size=C, window=w)
            s.reserve(0)
            k = rng.uniform(-1, 1, (Hkv, n, D)).astype(np.float16)
            s.write_layer(0, k, k)
            ind = s.indicator()
            self.assertEqual(ind.shape, (Hkv, n - w))
            scores = rng.permutation(Hkv * (n - w)).reshape(Hkv, n - w).astype(np.float32)
            ind[:] = scores
            s.submit(0, 1.0)
            kk, _ = s.read_layer(0)
            keep = C - w
            for g in range(Hkv):
                want = np.sort(np.argsort(-scores[g])[:keep])
                self.assertTrue((kk[g, :keep] == k[g, want]).all())

    def test_decode_views_and_steps(self):
        L, H, Hkv, D, n, w = 2, 4, 2, 32, 40, 16
        with caked.Client(self.d.sock, service="py-decode") as c:
            s = c.open_sequence(L, H, Hkv, D, n, dtype="bf16", cache_size=64, window=w,
                                max_new_tokens=8)
            for l in range(L):
                s.reserve(l)
                s.observe(l)
            # before the first step no token has a slot: a clear error, not a view over the
            # prompt's oldest query row
            with self.assertRaises(ValueError):
                s.decode_query(0)
            with self.assertRaises(ValueError):
                s.decode_query(L)
            for step in range(8):
                c.decode_step([s])
                for l in range(L):
                    self.assertEqual(s.tokens(l), n + step + 1)
                    q = s.decode_query(l)
                    self.assertEqual(q.shape, (H, D))
                    q[:] = step  # strided view into the ring: head stride w * D
                    t = s.tokens(l) - 1
                    k = np.full((Hkv, 1, D), step, np.uint16)
                    s.write_layer(l, k, k, start=t)
                    self.assertTrue((s.read_layer(l)[0][:, t] == step).all())
            with self.assertRaises(caked.TooBig):  # max_new_tokens reached
                s.decode_step()

    def test_layer_copies_across_pages(self):
        """write_layer at any start (pieces crossing page boundaries) and read_layer, into new
        arrays or the caller's, give back exactly what was written; pages(l, a, b) are those
        of pages(l)."""
        rng = np.random.default_rng()
        Hkv, D, n = 2, 64, 900
        with caked.Client(self.d.sock, service="py-pages") as c:
            s = c.open_sequence(1, 4, Hkv, D, n, dtype="f32", cache_size=1024, window=16)
            s.reserve(0)
            tpp = s.tokens_per_page
            self.assertGreater(n, 3 * tpp, "the layer spans several pages")
            k = rng.standard_normal((Hkv, n, D)).astype(np.float32)
            v = rng.standard_normal((Hkv, n, D)).astype(np.float32)
            at = 0
            while at < n:
                t = min(n - at, int(rng.integers(1, 2 * tpp)))
                s.write_layer(0, k[:, at:at + t], v[:, at:at + t], start=at)
                at += t
            self.assertEqual(s.tokens(0), n)
            kk, vv = s.read_layer(0)
            self.assertTrue((kk == k).all() and (vv == v).all())
            K, V = np.zeros((Hkv, n + 5, D), np.float32), np.zeros((Hkv, n + 5, D), np.float32)
            k2, v2 = s.read_layer(0, out=(K, V))
            self.assertEqual(k2.shape, (Hkv, n, D))
            self.assertTrue(np.shares_memory(k2, K) and np.shares_memory(v2, V))
            self.assertTrue((K[:, :n] == k).all() and (V[:, :n] == v).all())
            self.assertTrue((K[:, n:] == 0).all() and (V[:, n:] == 0).all(), "past n: untouched")
            with self.assertRaises(caked.InvalidArgument):
                s.read_layer(0, out=(K[:, :n - 1], V))
            with self.assertRaises(caked.InvalidArgument):
                s.read_layer(0, out=(K.astype(np.float16), V))
            every, some = s.pages(0), s.pages(0, 1, 3)
            self.assertEqual(len(some), 2)
            for (pk, pv), (qk, qv) in zip(some, every[1:3]):
                self.assertTrue(np.shares_memory(pk, qk) and (pk == qk).all() and (pv == qv).all())
            self.assertTrue((every[1][0][:, :5] == k[:, tpp:tpp + 5]).all())

    def test_typed_errors(self):
        with caked.Client(self.d.sock, service="py-errors") as c:
            with self.assertRaises(caked.InvalidArgument):
                c.open_sequence(2, 5, 2, 64, 100)  # 5 heads over 2 kv heads
            with self.assertRaises(caked.OutOfMemory) as e:
                c.open_sequence(32, 32, 8, 128, 4_000_000, max_new_tokens=1)
            self.assertEqual(e.exception.code, -5003)
            s = c.open_sequence(2, 4, 2, 32, 100, cache_size=64)
            with self.assertRaises(caked.StateError):
                s.reserve(1)
        with self.assertRaises(FileNotFoundError):
            caked.Client(os.path.join(self.d.dir, "absent.sock"))

    def test_server_uid_and_admin(self):
        # caked runs as this process's uid: naming another uid as caked's refuses it unheard
        with self.assertRaises(caked.PermissionDenied) as e:
            caked.Client(self.d.sock, service="py-uid", server_uid=os.geteuid() + 1)
        self.assertIn("runs as uid", str(e.exception))
        with caked.Client(self.d.sock, service="py-uid", server_uid=os.geteuid()) as c:
            c.ping()

    def test_torch_view_if_torch_is_installed(self):
        try:
            import torch
        except ImportError:
            self.skipTest("torch is not installed")
        with caked.Client(self.d.sock, service="py-torch") as c:
            s = c.open_sequence(1, 4, 2, 32, 64, dtype="bf16", cache_size=64, window=16)
            t = caked.torch_view(s.queries(0))
            self.assertEqual(t.dtype, torch.bfloat16)
            t[:] = 1.5
            self.assertTrue((s.queries(0) == bf16(1.5)).all())


class PrivateDaemon(unittest.TestCase):
    """caked.daemon.Private: a tool's own caked ends with the tool, however the tool ends."""

    CHILD = """
import os, sys, time
sys.path.insert(0, %r)
import caked.daemon
d = caked.daemon.Private(os.environ["CAKED_BIN"], "--host-pool", "64M").start()
print(d.proc.pid, d.dir, flush=True)
if sys.argv[1] == "raise":
    sys.stdin.readline()  # the test has seen caked running
    raise RuntimeError("the tool fails")
time.sleep(60)
"""

    def gone(self, pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    def test_with_block(self):
        with caked.daemon.Private(os.environ["CAKED_BIN"], "--host-pool", "64M") as d:
            with caked.Client(d.sock) as c:
                c.ping()
            pid, where = d.proc.pid, d.dir
        self.assertEqual(d.proc.returncode, 0, "caked exits cleanly on SIGTERM")
        self.assertTrue(self.gone(pid) and not os.path.exists(where))
        self.assertIsNotNone(d.stop(), "stop() again is harmless")

    def test_ends_with_a_failing_or_stopped_tool(self):
        pkg = os.path.join(os.path.dirname(__file__), "..", "..", "client", "python")
        for how in ("raise", "sigterm"):
            child = subprocess.Popen([sys.executable, "-c", self.CHILD % pkg, how],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
            pid, where = child.stdout.readline().split()
            pid = int(pid)
            # the failing tool waits for this line before it raises: no race with its end
            self.assertFalse(self.gone(pid), "caked runs while the tool does")
            child.stdin.write("go\n")
            child.stdin.close()
            if how == "sigterm":
                child.terminate()
            self.assertNotEqual(child.wait(30), 0)
            child.stdout.close()
            self.assertTrue(self.gone(pid), f"caked outlived a tool that ended by {how}")
            self.assertFalse(os.path.exists(where), how)

    def test_refused_start_says_so(self):
        d = caked.daemon.Private(os.environ["CAKED_BIN"], "--host-pool", "nonsense")
        with self.assertRaises(RuntimeError):
            d.start()
        self.assertIsNotNone(d.proc.returncode)
        self.assertFalse(os.path.exists(d.dir))


if __name__ == "__main__":
    unittest.main(verbosity=2)
