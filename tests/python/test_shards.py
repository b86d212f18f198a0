"""Tensor-parallel shard groups on host sequences: two ranks, each holding half the kv heads of
one logical sequence, end with identical per-layer budgets and with the kept tokens of a
single-process run over all heads (prefill and decode); killing one rank frees both shards,
a rank waiting at a layer's barrier gets an error instead of hanging, and a rank that dies
while waiting there is dropped at once. Needs CAKE_LIB,
CAKED_BIN and CACHECTL_BIN."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from test_binding import Daemon, caked  # noqa: E402

L, HKV, G, D, N, C, W, STEPS = 4, 4, 2, 32, 600, 96, 16, 6
H = HKV * G


def make_data(rng):
    data = []
    for _ in range(L):
        k = rng.standard_normal((HKV, N, D)).astype(np.float32)
        k[:, 0] *= 4
        scale = rng.uniform(0.3, 3.0)  # layers differ in sharpness, so budgets differ
        q = (rng.standard_normal((H, W, D)) * scale).astype(np.float32)
        v = rng.standard_normal((HKV, N, D)).astype(np.float32)
        data.append((k, v, q))
    steps = [[(rng.standard_normal((HKV, 1, D)).astype(np.float32),
               rng.standard_normal((HKV, 1, D)).astype(np.float32),
               rng.standard_normal((H, D)).astype(np.float32)) for _ in range(L)]
             for _ in range(STEPS)]
    return data, steps


def run(seq, heads, data, steps, barrier=None):
    """Prefill and decode `seq` holding kv heads `heads` (a slice); returns per layer the
    budget and the held K rows' original positions per head after prefill and after decode."""
    g0, g1 = heads.start, heads.stop
    qs = slice(g0 * G, g1 * G)
    out = {"budget": [], "prefill": [], "decode": []}
    for l, (k, v, q) in enumerate(data):
        seq.reserve(l)
        seq.write_layer(l, k[heads], v[heads])
        seq.queries(l)[:] = q[qs]
        seq.observe(l)
    for l in range(L):
        out["budget"].append(seq.budget(l))
        out["prefill"].append(positions(seq, l, data[l][0][heads]))
    allk = [d[0][heads] for d in data]
    for st in steps:
        seq.decode_step()
        for l in range(L):
            kn, vn, qn = st[l]
            t = seq.tokens(l)
            seq.write_layer(l, kn[heads], vn[heads], t - 1)
            seq.decode_query(l)[:] = qn[qs]
            allk[l] = np.concatenate([allk[l], kn[heads]], axis=1)
    seq.decode_step()
    for l in range(L):
        out["decode"].append(positions(seq, l, allk[l], seq.tokens(l) - 1))
    return out


def positions(seq, l, korig, n=None):
    k, _ = seq.read_layer(l)
    n = k.shape[1] if n is None else n
    res = []
    for g in range(k.shape[0]):
        rows = {korig[g, j].tobytes(): j for j in range(korig.shape[1])}
        res.append([rows.get(k[g, t].tobytes(), -1) for t in range(n)])
    return res


class Shards(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.d.__exit__(None, None, None)

    def open(self, c, heads, **kw):
        return c.open_sequence(L, heads * G, heads, D, N, dtype="f32", cache_size=C, window=W,
                               max_new_tokens=STEPS + 1, **kw)

    def test_two_ranks_match_one_process_over_all_heads(self):
        data, steps = make_data(np.random.default_rng())
        with caked.Client(self.d.sock, service="tp-ref") as c:
            ref = run(self.open(c, HKV), slice(0, HKV), data, steps)
        self.assertGreater(len(set(ref["budget"])), 1, "layers should differ")
        results = [None, None]
        errors = []

        def rank(r):
            try:
                with caked.Client(self.d.sock, service="tp") as c:
                    s = self.open(c, HKV // 2, shard_group=0xC0FFEE, shards=2, shard=r)
                    results[r] = run(s, slice(r * HKV // 2, (r + 1) * HKV // 2), data, steps)
                    s.close()  # after prefill a rank may leave before the other
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(results[0]["budget"], results[1]["budget"], "same budgets on every rank")
        self.assertEqual(results[0]["budget"], ref["budget"])
        for l in range(L):
            self.assertEqual(results[0]["prefill"][l] + results[1]["prefill"][l],
                             ref["prefill"][l], f"layer {l} kept sets")
            self.assertEqual(results[0]["decode"][l] + results[1]["decode"][l],
                             ref["decode"][l], f"layer {l} after decode")

    def test_mismatched_shards_are_refused(self):
        with caked.Client(self.d.sock, service="tp-bad") as c, \
                caked.Client(self.d.sock, service="tp-bad") as c2:
            self.open(c, 2, shard_group=7, shards=2, shard=0)
            with self.assertRaises(caked.InvalidArgument) as e:  # two shards, one connection
                self.open(c, 2, shard_group=7, shards=2, shard=1)
            self.assertIn("own connection", str(e.exception))
            with self.assertRaises(caked.InvalidArgument):  # same rank twice
                self.open(c2, 2, shard_group=7, shards=2, shard=0)
            with self.assertRaises(caked.InvalidArgument):  # another group size
                self.open(c2, 2, shard_group=7, shards=3, shard=1)
            with self.assertRaises(caked.InvalidArgument) as e:  # another prompt
                c2.open_sequence(L, 4, 2, D, N + 1, dtype="f32", cache_size=C, window=W,
                                 shard_group=7, shards=2, shard=1)
            self.assertIn("same layers, prompt", str(e.exception))
            with self.assertRaises(caked.InvalidArgument):
                self.open(c2, 2, shard_group=0, shards=2, shard=1)
            self.open(c2, 2, shard_group=7, shards=2, shard=1)  # the right one joins

    def sequences(self):
        r = subprocess.run([os.environ["CACHECTL_BIN"], "--socket", self.d.sock, "--json",
                            "sequences"], capture_output=True, text=True, check=True)
        return json.loads(r.stdout)["sequences"]

    def test_killing_one_rank_frees_both_and_releases_a_waiting_rank(self):
        data, steps = make_data(np.random.default_rng())
        child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "..", "client", "python")!r})
import caked
c = caked.Client({self.d.sock!r}, service="tp-kill")
s = c.open_sequence({L}, {G * 2}, 2, {D}, {N}, dtype="f32", cache_size={C}, window={W},
                    max_new_tokens={STEPS + 1}, shard_group=99, shards=2, shard=1)
print("open", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(child.stdout.readline().strip(), "open")
            with caked.Client(self.d.sock, service="tp-kill") as c:
                s = self.open(c, 2, shard_group=99, shards=2, shard=0)
                mine = [q for q in self.sequences() if q["tenant"] == "tp-kill"]
                self.assertEqual(len(mine), 2)
                self.assertEqual(sorted((q["shards"], q["shard"], q["shard_group"]) for q in mine),
                                 [(2, 0, "0x63"), (2, 1, "0x63")])  # cachectl shows the group
                k, v, q = data[0]
                s.reserve(0)
                s.write_layer(0, k[:2], v[:2])
                s.queries(0)[:] = q[:2 * G]
                # rank 1 never observes: rank 0 waits at layer 0 until rank 1 dies
                threading.Timer(0.5, lambda: child.send_signal(signal.SIGKILL)).start()
                t0 = time.time()
                with self.assertRaises(caked.NoSequence):
                    s.observe(0)
                self.assertLess(time.time() - t0, 30)
                with self.assertRaises(caked.NoSequence):
                    s.decode_step()
                left = [q for q in self.sequences() if q["tenant"] == "tp-kill"]
                self.assertEqual(left, [], "both shards freed")
        finally:
            child.kill()
            child.wait()

    def test_a_rank_killed_while_waiting_at_a_barrier_is_dropped_at_once(self):
        """The rank waiting for its group (whose other rank never comes) dies: caked notices
        the hang-up although that connection's request is still open, ends the group and
        frees the shard, instead of holding it until a barrier that never fills."""
        child = subprocess.Popen([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "..", "client", "python")!r})
import numpy as np
import caked
c = caked.Client({self.d.sock!r}, service="tp-wait")
s = c.open_sequence({L}, {G * 2}, 2, {D}, {N}, dtype="f32", cache_size={C}, window={W},
                    max_new_tokens={STEPS + 1}, shard_group=5, shards=2, shard=0)
s.reserve(0)
s.queries(0)[:] = np.ones(s.queries(0).shape, np.float32)
print("waiting", flush=True)
s.observe(0)  # shard 1 never joins
"""], stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(child.stdout.readline().strip(), "waiting")
            time.sleep(0.3)  # at the barrier by now
            self.assertEqual(len([q for q in self.sequences() if q["tenant"] == "tp-wait"]), 1)
            child.send_signal(signal.SIGKILL)
            child.wait()
            left = None
            for _ in range(100):
                left = [q for q in self.sequences() if q["tenant"] == "tp-wait"]
                if not left:
                    break
                time.sleep(0.05)
            self.assertEqual(left, [], "the dead rank's shard is freed")
        finally:
            child.kill()
            child.wait()


if __name__ == "__main__":
    unittest.main()
