"""Every eviction policy caked offers, against an independent numpy reference written from
shared/CAKE.md section 3 (and daemon/README.md "Policies"): which tokens each layer and kv head
keeps after prefill, the budgets, and what decode steps do. K/V are f32 so the daemon's
scores and the reference's agree to rounding; kept sets are compared up to near-ties at the
selection threshold. Needs CAKE_LIB and CAKED_BIN, like test_binding.py."""
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from test_binding import Daemon, caked  # noqa: E402

L, H, HKV, D, N, C, W = 3, 4, 2, 16, 240, 64, 8
G = H // HKV
S = N - W
B = C - W  # scored tokens per layer, uniform


def softmax_rows(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def window_attention(q, k):
    """q [H][w][d], k [Hkv][n][d] -> A [H][w][n] with the window-causal mask."""
    w, n = q.shape[1], k.shape[1]
    A = np.empty((H, w, n))
    for h in range(H):
        z = q[h].astype(np.float64) @ k[h // G].astype(np.float64).T / np.sqrt(D)
        for i in range(w):
            z[i, n - w + i + 1:] = -np.inf
        A[h] = softmax_rows(z)
    return A


def pool(x, kind, k):
    r, n, out = k // 2, len(x), np.empty(len(x))
    for j in range(n):
        seg = x[max(0, j - r):min(n, j + r + 1)]
        out[j] = seg.sum() / k if kind == "avg" else seg.max() if kind == "max" else x[j]
    return out


def indicator(A, Sx, how, pooling, k, gamma=200.0):
    """[Hkv][Sx] scores: per query head statistic over the window rows, pooled, group mean."""
    out = np.zeros((HKV, Sx))
    for h in range(H):
        a = A[h, :, :Sx]
        mean, var = a.mean(axis=0), a.var(axis=0, ddof=1)
        i0 = {"mean": mean, "var": var, "mean+var": mean + gamma * var,
              "last": A[h, -1, :Sx]}[how]
        out[h // G] += pool(i0, pooling, k) / G
    return out


def assert_topk(testcase, kept, score, k, what):
    """kept (positions) is a top-k of score up to near-ties at the threshold."""
    kept = np.asarray(sorted(kept))
    testcase.assertEqual(len(kept), k, what)
    if k == 0 or k == len(score):
        return
    thr = np.sort(score)[::-1][k - 1]
    eps = 1e-5 * max(abs(thr), 1e-12) + 1e-9
    mask = np.zeros(len(score), bool)
    mask[kept] = True
    testcase.assertTrue(np.all(score[mask] >= thr - eps), f"{what}: kept a token below the cut")
    testcase.assertTrue(np.all(score[~mask] <= thr + eps), f"{what}: dropped one above the cut")
    testcase.assertTrue(np.all(np.diff(kept) > 0), what)


class Policies(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.d.__exit__(None, None, None)

    def prefill(self, c, n=N, max_new=0, **pol):
        rng = np.random.default_rng()
        s = c.open_sequence(L, H, HKV, D, n, dtype="f32", cache_size=C, window=W,
                            max_new_tokens=max_new, **pol)
        data = []
        for l in range(L):
            k = rng.standard_normal((HKV, n, D)).astype(np.float32)
            k[:, 0] *= 4  # a sink
            v = rng.standard_normal((HKV, n, D)).astype(np.float32)
            q = rng.standard_normal((H, W, D)).astype(np.float32)
            s.reserve(l)
            s.write_layer(l, k, v)
            s.queries(l)[:] = q
            s.observe(l)
            data.append((k, v, q))
        return s, data

    def positions(self, s, l, k_orig, written=None):
        """Original positions of the held slots, per kv head (-1 for holes), found by
        matching each slot's key with the keys written; caked's own account
        (Sequence.kept_positions) must agree on every slot of the first `written` (default
        all: a decode step's reserved slot holds no key yet) and mark the holes."""
        k, _ = s.read_layer(l)
        holes = s.holes(l)
        out = []
        for g in range(HKV):
            rows = {k_orig[g, j].tobytes(): j for j in range(k_orig.shape[1])}
            found = [rows.get(k[g, t].tobytes(), -1) for t in range(k.shape[1])]
            told = s.kept_positions(l, g)
            self.assertEqual(len(told), k.shape[1], "caked's positions cover the layer")
            first, count = holes[g]
            for t in range(written if written is not None else len(found)):
                if first <= t < first + count:
                    self.assertEqual(told[t], caked.NO_POSITION, f"layer {l} head {g} hole {t}")
                else:
                    self.assertEqual(told[t], found[t], f"layer {l} head {g} slot {t}")
            out.append(found)
        return out

    def check_prefill(self, s, data, how, pooling, ksz, budgets, shared=False, streaming=False):
        for l, (k, v, q) in enumerate(data):
            b = budgets[l]
            self.assertEqual(s.budget(l), b)
            self.assertEqual(s.tokens(l), b + W)
            pos = self.positions(s, l, k)
            A = window_attention(q, k)
            ind = indicator(A, S, how, pooling, ksz) if not streaming else None
            if shared:
                ind = np.repeat(ind.mean(axis=0, keepdims=True), HKV, axis=0)
            for g in range(HKV):
                self.assertEqual(pos[g][b:], list(range(S, N)), "window kept, in order")
                if streaming:
                    self.assertEqual(pos[g][:b], list(range(4)) + list(range(S - b + 4, S)))
                else:
                    assert_topk(self, pos[g][:b], ind[g], b, f"layer {l} head {g}")
        return True

    def test_observe_with_the_engines_lse(self):
        """With each window row's log-sum-exp from the engine (cake_put_lse; computed here in
        float64), caked scores in one pass: the same preferences as without (1e-4), every
        layer's kept set the top of the reference indicator at its budget, for CAKE and for
        TOVA (the newest row's alone). An lse off by one moves the preference (it is what is
        used); a NaN is refused with the reason and the layer can be observed again."""
        def lse_of(q, k):
            z = np.stack([q[h].astype(np.float64) @ k[h // G].astype(np.float64).T / np.sqrt(D)
                          for h in range(H)])
            n = k.shape[1]
            for i in range(W):
                z[:, i, n - W + i + 1:] = -np.inf
            m = z.max(axis=-1, keepdims=True)
            return (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))).astype(np.float32)

        rng = np.random.default_rng()
        with caked.Client(self.d.sock) as c:
            for pol, how in (({}, "mean+var"), ({"policy": "tova"}, "last")):
                a = c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W, **pol)
                b = c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W, **pol)
                data = []
                for l in range(L):
                    k = rng.standard_normal((HKV, N, D)).astype(np.float32)
                    k[:, 0] *= 4
                    v = rng.standard_normal((HKV, N, D)).astype(np.float32)
                    q = rng.standard_normal((H, W, D)).astype(np.float32)
                    pa, pb = [], []
                    for s, p in ((a, pa), (b, pb)):
                        s.reserve(l)
                        s.write_layer(l, k, v)
                        s.queries(l)[:] = q
                    if l == 0:
                        with self.assertRaises(ValueError):
                            b.put_lse(l, np.zeros((H + 1, W), np.float32))
                        bad = lse_of(q, k)
                        bad[1, 3] = np.nan
                        b.put_lse(l, bad)
                        with self.assertRaisesRegex(caked.InvalidArgument, "log-sum-exp"):
                            b.observe(l)
                    b.put_lse(l, lse_of(q, k))
                    P_a, P_b = a.observe(l), b.observe(l)
                    self.assertAlmostEqual(P_b, P_a, delta=1e-4 * abs(P_a) + 1e-12, msg=f"layer {l}")
                    data.append((k, v, q))
                for l, (k, _, q) in enumerate(data):
                    self.assertLessEqual(abs(a.budget(l) - b.budget(l)), 1)
                    ind = indicator(window_attention(q, k), S, how, "avg" if how != "last" else "none",
                                    5 if how != "last" else 1)
                    if how == "last":
                        ind[:] = ind.mean(axis=0)  # TOVA: one ranking for every kv head
                    for g, found in enumerate(self.positions(b, l, k)):
                        assert_topk(self, found[:len(found) - W], ind[g], len(found) - W,
                                    f"{how} layer {l} head {g}")
                a.close(), b.close()
            # an lse off by one (every row's probabilities e times too small): another preference
            s = c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W)
            k = rng.standard_normal((HKV, N, D)).astype(np.float32)
            q = rng.standard_normal((H, W, D)).astype(np.float32)
            s.reserve(0)
            s.write_layer(0, k, k)
            s.queries(0)[:] = q
            s.put_lse(0, lse_of(q, k) + 1)
            P_off = s.observe(0)
            t = c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W)
            t.reserve(0)
            t.write_layer(0, k, k)
            t.queries(0)[:] = q
            P_true = t.observe(0)
            self.assertGreater(abs(P_off - P_true), 1e-2 * abs(P_true), "the lse given is used")
            s.close(), t.close()

    def test_decode_lse_on_a_host_sequence(self):
        """cake_put_decode_lse on a host sequence: a decode step's eviction takes the engine's
        values for the newest row (the older rows' carried from the step before). Given the
        true ones (float64 over the layer's keys as held) a sequence keeps what its twin
        given none keeps, up to near-ties; given ones 20 too small (that row's attention
        e^20 times too heavy) another keeps other tokens (they are what it reads); a wrong
        shape or a layer out of range is refused."""
        rng = np.random.default_rng()
        steps = 6
        with caked.Client(self.d.sock) as c:
            seqs = [c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W,
                                    max_new_tokens=steps) for _ in range(3)]
            true_, none, wrong = seqs
            for l in range(L):
                k = rng.standard_normal((HKV, N, D)).astype(np.float32)
                v = rng.standard_normal((HKV, N, D)).astype(np.float32)
                q = rng.standard_normal((H, W, D)).astype(np.float32)
                for s in seqs:
                    s.reserve(l)
                    s.write_layer(l, k, v)
                    s.queries(l)[:] = q
                    s.observe(l)
            for step in range(steps):
                for s in seqs:
                    s.decode_step()
                for l in range(L):
                    nk = rng.standard_normal((HKV, 1, D)).astype(np.float32)
                    dq = rng.standard_normal((H, D)).astype(np.float32)
                    for s in seqs:
                        s.write_layer(l, nk, nk, start=s.tokens(l) - 1)
                        s.decode_query(l)[:] = dq
                    keys, _ = true_.read_layer(l)
                    z = np.stack([keys[h // G].astype(np.float64) @ dq[h].astype(np.float64)
                                  for h in range(H)]) / np.sqrt(D)
                    m = z.max(axis=1)
                    lse = (m + np.log(np.exp(z - m[:, None]).sum(axis=1))).astype(np.float32)
                    true_.put_decode_lse(l, lse)
                    wrong.put_decode_lse(l, lse - 20)
                with self.assertRaises(ValueError):
                    true_.put_decode_lse(0, np.zeros(H + 1, np.float32))
                with self.assertRaises(caked.InvalidArgument):
                    true_.put_decode_lse(L, np.zeros(H, np.float32))
            differ = 0
            for l in range(L):
                self.assertEqual(true_.tokens(l), none.tokens(l))
                for g in range(HKV):
                    a, b = set(true_.kept_positions(l, g)), set(none.kept_positions(l, g))
                    self.assertGreaterEqual(len(a & b), 0.98 * len(b), f"layer {l} head {g}")
                    differ += set(wrong.kept_positions(l, g)) != b
            self.assertGreater(differ, 0, "values 20 too small changed nothing: not read?")
            for s in seqs:
                s.close()

    def test_snapkv_h2o_tova_streaming_select_as_the_reference(self):
        with caked.Client(self.d.sock, service="py-policies") as c:
            for pol, how, pooling, ksz, shared, streaming in [
                    ("snapkv", "mean", "max", 7, False, False),
                    ("h2o", "mean", "none", 1, False, False),
                    ("tova", "last", "none", 1, True, False),
                    ("streamingllm", None, None, 0, False, True)]:
                with self.subTest(policy=pol):
                    s, data = self.prefill(c, policy=pol)
                    self.check_prefill(s, data, how, pooling, ksz, [B] * L, shared, streaming)
                    s.close()

    def test_cake_ablations_indicator_and_allocation(self):
        with caked.Client(self.d.sock, service="py-ablation") as c:
            for how in ("mean", "var", "mean+var"):
                with self.subTest(indicator=how):
                    s, data = self.prefill(c, policy="cake", alloc="uniform", indicator=how)
                    self.check_prefill(s, data, how, "avg", 5, [B] * L)
                    s.close()
            # the paper's pyramid allocation with CAKE's own indicator
            s, data = self.prefill(c, policy="cake", alloc="pyramid", indicator="mean+var")
            self.check_prefill(s, data, "mean+var", "avg", 5, pyramid_budgets(B, S, L, 20))
            s.close()
            # unknown names and parity with a baseline are refused with the reason
            with self.assertRaises(caked.InvalidArgument):
                c.open_sequence(L, H, HKV, D, N, policy="snapkv", mode="parity")
            with self.assertRaises(caked.InvalidArgument):
                c.open_sequence(L, H, HKV, D, N, policy="nope")
            with self.assertRaises(caked.InvalidArgument):
                c.open_sequence(L, H, HKV, D, N, policy="adakv", decode="evict")

    def test_pyramidkv_budgets_fall_with_depth(self):
        with caked.Client(self.d.sock, service="py-pyramid") as c:
            s, data = self.prefill(c, policy="pyramidkv")
            want = pyramid_budgets(B, S, L, 20)
            self.assertEqual(sum(want), B * L)
            self.assertGreater(want[0], want[-1])
            self.check_prefill(s, data, "mean", "max", 7, want)

    def test_adakv_per_head_budgets_and_holes(self):
        with caked.Client(self.d.sock, service="py-ada") as c:
            s, data = self.prefill(c, policy="adakv")
            for l, (k, v, q) in enumerate(data):
                ind = indicator(window_attention(q, k), S, "mean", "max", 7)
                want = ada_budgets(ind, B, 0.2)
                holes, pos = s.holes(l), self.positions(s, l, k)
                kmax = max(want)
                self.assertEqual(s.tokens(l), kmax + W)
                for g in range(HKV):
                    kept = want[g]
                    self.assertEqual(holes[g], (kept, kmax - kept) if kept < kmax else (0, 0))
                    assert_topk(self, pos[g][:kept], ind[g], kept, f"ada layer {l} head {g}")
                    self.assertEqual(pos[g][kmax:], list(range(S, N)))
                self.assertEqual(sum(want), HKV * B)

    def test_runs_keep_whole_windows_of_the_engines_scores(self):
        """run_width: each head keeps the top of one ranking made when its layer is scored
        (windows of width around the best free positions), through every cascading stage."""
        rng = np.random.default_rng()
        with caked.Client(self.d.sock, service="py-runs") as c:
            for width in (3, 9):
                with self.subTest(run_width=width):
                    s = c.open_sequence(L, H, HKV, D, N, dtype="f32", cache_size=C, window=W,
                                        policy="cake", run_width=width)
                    data, inds = [], []
                    for l in range(L):
                        k = rng.standard_normal((HKV, N, D)).astype(np.float32)
                        v = rng.standard_normal((HKV, N, D)).astype(np.float32)
                        ind = rng.standard_normal((HKV, S)).astype(np.float32)
                        s.reserve(l)
                        s.write_layer(l, k, v)
                        s.indicator()[:] = ind
                        s.submit(l, float(rng.uniform(0.1, 2.0)))
                        data.append(k)
                        inds.append(ind)
                    self.assertEqual(sum(s.budget(l) for l in range(L)), B * L)
                    for l in range(L):
                        b, pos = s.budget(l), self.positions(s, l, data[l])
                        for g in range(HKV):
                            rank = runs_rank(inds[l][g], width)
                            want = sorted(np.argsort(-rank, kind="stable")[:b].tolist())
                            self.assertEqual(sorted(pos[g][:b]), want, f"layer {l} head {g}")
                            self.assertEqual(pos[g][b:], list(range(S, N)))
                    s.close()
            for bad in (dict(run_width=4), dict(run_width=257), dict(policy="adakv", run_width=9),
                        dict(policy="h2o", run_width=9), dict(mode="parity", run_width=9)):
                with self.subTest(refused=bad), self.assertRaises(caked.InvalidArgument):
                    c.open_sequence(L, H, HKV, D, N, **bad)

    def test_full_keeps_everything_and_prefill_only_grows(self):
        rng = np.random.default_rng()
        with caked.Client(self.d.sock, service="py-full") as c:
            for pol in ("full", "snapkv"):
                s, data = self.prefill(c, max_new=20, policy=pol)
                held = [s.tokens(l) for l in range(L)]
                self.assertEqual(held, [N if pol == "full" else C] * L)
                for step in range(20):
                    s.decode_step()
                    for l in range(L):
                        t = s.tokens(l)
                        s.write_layer(l, rng.standard_normal((HKV, 1, D)), rng.standard_normal((HKV, 1, D)), t - 1)
                        s.decode_query(l)[:] = rng.standard_normal((H, D))
                self.assertEqual([s.tokens(l) for l in range(L)], [h + 20 for h in held])
                s.close()

    def test_decode_streaming_tova_h2o_follow_the_reference(self):
        """Each step: H2O adds the newest query's attention to every held token's score;
        over budget, every policy keeps its top B of the first N - w slots and the window."""
        rng = np.random.default_rng()
        steps = 14
        with caked.Client(self.d.sock, service="py-decode") as c:
            for pol in ("streamingllm", "tova", "h2o"):
                with self.subTest(policy=pol):
                    s, data = self.prefill(c, max_new=steps + 1, policy=pol)
                    keys = [k.copy() for k, _, _ in data]  # [Hkv][positions][d]
                    held = [self.positions(s, l, keys[l]) for l in range(L)]
                    acc = []  # H2O: per layer, per head, {position: score}
                    for l, (k, v, q) in enumerate(data):
                        ind = indicator(window_attention(q, k), S, "mean", "none", 1) * W
                        acc.append([{p: (ind[g][p] if p < S else 0.0) for p in held[l][g]}
                                    for g in range(HKV)])
                    newest_q = [None] * L
                    for step in range(steps + 1):
                        s.decode_step()
                        for l in range(L):
                            t = s.tokens(l)
                            got = self.positions(s, l, keys[l], t - 1)
                            for g in range(HKV):
                                P = held[l][g]
                                want = self.expect(pol, P, keys[l], newest_q[l], g,
                                                   acc[l][g])
                                if want is None:  # not over budget: nothing moved
                                    self.assertEqual(got[g][:t - 1], P)
                                    continue
                                kept, score = want
                                self.assertEqual(t - 1, B + W)
                                self.assertEqual(got[g][B:t - 1], P[len(P) - W:], "window")
                                if score is None:
                                    self.assertEqual(got[g][:B], kept)
                                else:
                                    assert_topk(self, [P.index(p) for p in got[g][:B]],
                                                score, B, f"{pol} step {step} l{l} g{g}")
                                held[l][g] = got[g][:t - 1]
                            if step == steps:
                                continue
                            # the new token: K/V at the reserved slot, its query in the ring
                            kn = rng.standard_normal((HKV, 1, D)).astype(np.float32)
                            qn = rng.standard_normal((H, D)).astype(np.float32)
                            keys[l] = np.concatenate([keys[l], kn], axis=1)
                            s.write_layer(l, kn, rng.standard_normal((HKV, 1, D)), t - 1)
                            s.decode_query(l)[:] = qn
                            newest_q[l] = qn
                            for g in range(HKV):
                                held[l][g] = held[l][g] + [N + step]
                                acc[l][g][N + step] = 0.0
                        for l in range(L):
                            self.assertEqual(s.budget(l), B)
                    s.close()

    @staticmethod
    def expect(pol, P, keys, qn, g, accg):
        """The reference's decode step on kv head g of a layer holding positions P (keys:
        [Hkv][position][d]): None when within budget, else (kept positions, None) for
        StreamingLLM or (None, scores of the N - w candidates) to rank."""
        n = len(P)

        def attn(h):  # the newest query of head h over the held keys of its group
            kk = keys[h // G][P].astype(np.float64)
            return softmax_rows((qn[h].astype(np.float64) @ kk.T / np.sqrt(D))[None])[0]

        if pol == "h2o" and qn is not None:
            for h in range(g * G, g * G + G):
                a = attn(h)
                for i, p in enumerate(P[:-1]):  # its own column is not counted
                    accg[p] += a[i] / G
        if qn is None or n <= B + W:
            return None
        cand = P[:n - W]
        if pol == "streamingllm":
            return cand[:4] + cand[len(cand) - (B - 4):], None
        if pol == "h2o":
            return None, np.array([accg[p] for p in cand])
        # TOVA: one token set for the layer (same P for every head), ranked by the newest
        # query's attention averaged over all heads
        return None, sum(attn(h)[:n - W] for h in range(H)) / H


def runs_rank(score, width):
    """cake_policy.run_width's ranking (daemon/policy.h), by repeated search rather than one
    sort: the best-scored position (the earlier among equals) whose whole window of width is
    free takes it, center first then outward (the earlier first at each distance); what no
    window took follows by score. Larger ranks are kept first."""
    n, h = len(score), width // 2
    rank, taken, r = np.zeros(n), np.zeros(n, bool), n
    while True:
        free = [c for c in range(n) if not taken[max(0, c - h):c + h + 1].any()]
        if not free:
            break
        c = max(free, key=lambda t: (score[t], -t))
        for t in sorted(range(max(0, c - h), min(n, c + h + 1)), key=lambda t: (abs(t - c), t)):
            taken[t], rank[t], r = True, r, r - 1
    for t in sorted(np.flatnonzero(~taken), key=lambda t: (-score[t], t)):
        rank[t], r = r, r - 1
    return rank


def pyramid_budgets(avg, Sx, layers, beta):
    if Sx < 2 * avg:
        return [min(avg, Sx)] * layers
    mn = int(np.floor(avg / beta))
    mx = 2 * avg - mn
    if mx >= Sx:
        mx, mn = Sx, 2 * avg - Sx
    step = (mx - mn) // (layers - 1)
    return [min(max(mx - l * step, 0), Sx) for l in range(layers)]


def ada_budgets(ind, Bx, alpha):
    hk, Sx = ind.shape
    flat = np.argsort(-ind.reshape(-1), kind="stable")[:hk * Bx]
    cnt = np.bincount(flat // Sx, minlength=hk)
    b = [min(int(np.floor(c * (1 - alpha) + np.floor(alpha * Bx) + 0.5)), Sx) for c in cnt]
    while sum(b) < hk * Bx:
        g = max((g for g in range(hk) if b[g] < Sx), key=lambda g: (cnt[g], -g))
        b[g] += 1
    while sum(b) > hk * Bx:
        g = min((g for g in range(hk) if b[g] > 0), key=lambda g: (cnt[g], g))
        b[g] -= 1
    return b


if __name__ == "__main__":
    unittest.main()
