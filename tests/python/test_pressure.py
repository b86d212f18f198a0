"""Under pressure caked makes room instead of refusing (daemon/pressure.h): a request whose
pages do not fit waits while caked lowers the budgets of its tenant's running sequences
(re-slicing), checked against the numpy reference of test_policies.py:

- a prefilled sequence gives room: what each layer keeps afterwards is a subset of what it
  kept, and the top of the decode rule's indicator (the ring's window queries over the held
  keys) at the new budget; the window stays; caked's positions follow;
- a sequence in its prompt that does not fit alone completes: the cascade's total is lowered
  and every layer keeps the top of its prompt indicator at its (smaller) budget;
- another client's sequence is re-sliced by its own next decode step, never between its
  calls (the waiting request completes right after that step);
- another tenant holding more than its share gives room: its least used segments drain
  for the requester, its sequences shrink and move at their own steps, byte for byte; a
  drain is withdrawn when its request stops waiting; a tenant in refuse mode is not cut;
- pressure=refuse, the floors (--min-tokens) and the wait's end refuse as before, and change
  nothing; another tenant within its share is never touched; Ada-KV sequences (holes) are
  never cut;
- metrics and cachectl's listings count what happened.
K/V are f32 so caked's scores and the reference's agree to rounding. Needs CAKE_LIB,
CAKED_BIN and CACHECTL_BIN."""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import test_binding  # noqa: E402
from test_binding import caked  # noqa: E402
from test_policies import H, HKV, D, W, L, window_attention, indicator, assert_topk  # noqa: E402


class Daemon(test_binding.Daemon):
    """caked with a small pool of 4 KiB pages (tokens of these f32 layouts: 16 per page), its
    log kept for KEEP_LOG=1 (debug level: what each re-slice decided)."""

    def __init__(self, pool="8M", *args):
        self.logf = tempfile.TemporaryFile("w+")
        super().__init__("--host-pool", pool, "--page-size", "4K", "--log-level", "debug", *args,
                         log=self.logf)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if os.environ.get("KEEP_LOG"):  # a debugging aid
            self.logf.seek(0)
            print(self.logf.read()[-int(os.environ.get("KEEP_LOG_BYTES", 4000)):])
        self.logf.close()

    def cachectl(self, *args):
        return subprocess.run([os.environ["CACHECTL_BIN"], "--socket", self.sock, *args],
                              capture_output=True, text=True, check=True).stdout

    def metrics(self):
        text = self.cachectl("metrics")
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(caked_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out


def prefill(s, n, rng, layers=L):
    """Random f32 K/V (a sink at 0) and window queries into every layer; returns them."""
    data = []
    for l in range(layers):
        k = rng.standard_normal((HKV, n, D)).astype(np.float32)
        k[:, 0] *= 4
        v = rng.standard_normal((HKV, n, D)).astype(np.float32)
        q = rng.standard_normal((H, W, D)).astype(np.float32)
        s.reserve(l)
        s.write_layer(l, k, v)
        s.queries(l)[:] = q
        s.observe(l)
        data.append((k, v, q))
    return data


def held(s, l):
    return [list(s.kept_positions(l, g)) for g in range(HKV)]


BIG = 8192  # fill_big's prompts


def fill_big(c, rng, n=4, tokens=BIG):
    """n sequences of `tokens` tokens kept at 95% (four of 8192: ~23 of a 32 MiB pool of 4 MiB
    segments, all of it the tenant's share while it is alone); their data and kept positions.
    Their descriptors never move: caked places them together (pool.h), so eight sequences of
    4096 leave as many segments free to drain as four of 8192."""
    seqs, data, before = [], [], []
    for _ in range(n):
        a = c.open_sequence(L, H, HKV, D, tokens, dtype="f32", cache_size=tokens * 95 // 100,
                            window=W, max_new_tokens=1024)
        data.append(prefill(a, tokens, rng))
        before.append([held(a, l) for l in range(L)])
        seqs.append(a)
    return seqs, data, before


class Pressure(unittest.TestCase):
    def check_resliced(self, s, data, before, budgets_before):
        """Every layer of s: budget no higher, positions a subset of `before`, the window
        kept, the prefix the top of the decode rule's indicator at the new budget."""
        shrunk = 0
        for l, (k, v, q) in enumerate(data):
            b, b0 = s.budget(l), budgets_before[l]
            self.assertLessEqual(b, b0, f"layer {l}: a re-slice never raises a budget")
            shrunk += b < b0
            self.assertEqual(s.tokens(l), min(b, len(before[l][0]) - W) + W)
            got = held(s, l)
            kk, _ = s.read_layer(l)
            for g in range(HKV):
                P, G = before[l][g], got[g]
                self.assertTrue(set(G) <= set(P), f"layer {l} head {g}: kept a token it had not")
                self.assertEqual(G[-W:], P[-W:], f"layer {l} head {g}: the window stays")
                for t, p in enumerate(G):  # caked's positions follow its keys
                    np.testing.assert_array_equal(kk[g, t], k[g, p])
                if len(G) == len(P):
                    continue
                # the reference: the ring's W queries over the held keys (storage order)
                Kh = np.stack([k[x][P_] for x, P_ in enumerate(before[l])])
                A = window_attention(q, Kh)
                ind = indicator(A, len(P) - W, "mean+var", "avg", 5)
                assert_topk(self, [P.index(p) for p in G[:-W]], ind[g], b,
                            f"layer {l} head {g}")
        return shrunk

    def test_prefilled_sequence_makes_room_by_its_own_ranking(self):
        rng = np.random.default_rng()
        with Daemon("8M") as d, caked.Client(d.sock, service="svc", shrink_idle=True) as c:
            a = c.open_sequence(L, H, HKV, D, 4096, dtype="f32", cache_size=3000, window=W,
                                max_new_tokens=4)
            da = prefill(a, 4096, rng)
            before = [held(a, l) for l in range(L)]
            b0 = [a.budget(l) for l in range(L)]
            self.assertEqual(a.reslices(), 0)
            # a full-cache prompt of 8192 tokens does not fit beside it: a gives room
            f = c.open_sequence(L, H, HKV, D, 8192, dtype="f32", policy="full",
                                 window=W)
            prefill(f, 8192, rng)
            self.assertGreaterEqual(a.reslices(), 1)
            self.assertGreater(self.check_resliced(a, da, before, b0), 0)
            for l in range(L):
                self.assertEqual(f.tokens(l), 8192)
            # a still decodes: its next step keeps the lowered budgets
            a.decode_step()
            for l in range(L):
                self.assertLessEqual(a.tokens(l), a.budget(l) + W + 1)
            m = d.metrics()
            self.assertGreaterEqual(m["caked_reslices_total"], 1)
            self.assertGreater(m["caked_reslice_tokens_total"], 0)
            self.assertGreaterEqual(m['caked_pressure_waits_total{outcome="granted"}'], 1)
            self.assertEqual(m['caked_pressure_waits_total{outcome="refused"}'], 0)
            self.assertGreaterEqual(m['caked_evictions_total{phase="reslice"}'], 1)
            seqs = json.loads(d.cachectl("--json", "sequences"))["sequences"]
            info = [x for x in seqs if int(x["id"], 16) == a.id][0]
            self.assertLess(info["effective_cache"], 3000)
            self.assertEqual(info["cache_size"], 3000)
            self.assertEqual(info["reslices"], a.reslices())
            self.assertEqual(info["placement"], "host")
            ten = json.loads(d.cachectl("--json", "tenants"))["tenants"]
            svc = [t for t in ten if t["name"] == "svc"][0]
            self.assertEqual(svc["pressure"], "reslice")
            self.assertEqual(svc["min_tokens"], 64)
            self.assertGreaterEqual(svc["reslices"], 1)
            self.assertGreater(svc["reslice_tokens"], 0)
            self.assertGreaterEqual(svc["waits_granted"], 1)
            self.assertIn("NOW", d.cachectl("sequences"))
            with self.assertRaises(caked.InvalidArgument):  # host sequences do not park
                a.park()
            # steered live: cachectl quota --pressure / --min-tokens
            d.cachectl("quota", "svc", "--pressure", "refuse", "--min-tokens", "128")
            svc = [t for t in json.loads(d.cachectl("--json", "tenants"))["tenants"]
                   if t["name"] == "svc"][0]
            self.assertEqual((svc["pressure"], svc["min_tokens"]), ("refuse", 128))
            bad = subprocess.run([os.environ["CACHECTL_BIN"], "--socket", d.sock, "quota", "svc",
                                  "--pressure", "sometimes"], capture_output=True, text=True)
            self.assertNotEqual(bad.returncode, 0)
            self.assertIn("reslice, park, refuse or default", bad.stderr)
            d.cachectl("quota", "svc", "--pressure", "default", "--min-tokens", "0")
            svc = [t for t in json.loads(d.cachectl("--json", "tenants"))["tenants"]
                   if t["name"] == "svc"][0]
            self.assertEqual((svc["pressure"], svc["min_tokens"]), ("reslice", 64))

    def test_adakv_sequences_are_not_resliced(self):
        """Ada-KV's heads hold different counts (holes the decode rule's ranking does not
        see): under pressure the tenant's other sequences give the room, it keeps all."""
        rng = np.random.default_rng()
        with Daemon("9M") as d, caked.Client(d.sock, service="svc", shrink_idle=True) as c:
            x = c.open_sequence(L, H, HKV, D, 2048, dtype="f32", cache_size=1500, window=W,
                                max_new_tokens=4, policy="adakv")
            prefill(x, 2048, rng)
            a = c.open_sequence(L, H, HKV, D, 4096, dtype="f32", cache_size=3000, window=W,
                                max_new_tokens=4)
            prefill(a, 4096, rng)
            xb = [(x.budget(l), x.holes(l), held(x, l)) for l in range(L)]
            self.assertTrue(any(cnt for _, h, _ in xb for _, cnt in h), "Ada-KV left no holes")
            f = c.open_sequence(L, H, HKV, D, 8192, dtype="f32", policy="full", window=W)
            prefill(f, 8192, rng)
            self.assertGreaterEqual(a.reslices(), 1, "the CAKE sequence gave the room")
            self.assertEqual(x.reslices(), 0)
            self.assertEqual([(x.budget(l), x.holes(l), held(x, l)) for l in range(L)], xb)
            x.decode_step()
            for l in range(L):
                self.assertEqual(x.tokens(l), len(xb[l][2][0]) + 1)

    def test_prompt_that_does_not_fit_alone_completes(self):
        rng = np.random.default_rng()
        n, C = 8192, 4096
        with Daemon("4M") as d, caked.Client(d.sock, service="svc") as c:
            s = c.open_sequence(L, H, HKV, D, n, dtype="f32", cache_size=C, window=W)
            data = prefill(s, n, rng)  # layer 0 alone holds 8184 of 12264 tokens: no room
            self.assertGreaterEqual(s.reslices(), 1)
            total = sum(s.budget(l) for l in range(L))
            self.assertLess(total, (C - W) * L)
            for l, (k, v, q) in enumerate(data):
                b = s.budget(l)
                self.assertEqual(s.tokens(l), b + W)
                ind = indicator(window_attention(q, k), n - W, "mean+var", "avg", 5)
                for g in range(HKV):
                    pos = list(s.kept_positions(l, g))
                    self.assertEqual(pos[b:], list(range(n - W, n)))
                    assert_topk(self, pos[:b], ind[g], b, f"layer {l} head {g}")

    def test_another_clients_sequence_gives_room_at_its_own_step(self):
        rng = np.random.default_rng()
        with Daemon("8M") as d, caked.Client(d.sock, service="svc") as ca, \
                caked.Client(d.sock, service="svc") as cb:
            a = ca.open_sequence(L, H, HKV, D, 4096, dtype="f32", cache_size=3000, window=W,
                                 max_new_tokens=4)
            da = prefill(a, 4096, rng)
            before = [held(a, l) for l in range(L)]
            b0 = [a.budget(l) for l in range(L)]
            f = cb.open_sequence(L, H, HKV, D, 8192, dtype="f32", policy="full",
                                 window=W)
            done, err = threading.Event(), []

            def other():
                try:
                    prefill(f, 8192, np.random.default_rng())
                except Exception as e:  # noqa: BLE001
                    err.append(e)
                done.set()
            t = threading.Thread(target=other)
            t.start()
            # a's budgets come down while its pages stay where they are until it calls
            for _ in range(200):
                if a.reslices():
                    break
                time.sleep(0.01)
            self.assertGreaterEqual(a.reslices(), 1)
            self.assertLess(sum(a.budget(l) for l in range(L)), sum(b0))
            time.sleep(0.3)
            self.assertFalse(done.is_set(), "the request waits for a's step")
            self.assertEqual(held(a, 0), before[0], "nothing moved between a's calls")
            a.decode_step()  # a's own call: evicted to its lowered budgets
            self.assertTrue(done.wait(10))
            t.join()
            self.assertEqual(err, [])
            for l in range(L):
                self.assertLessEqual(a.tokens(l), a.budget(l) + W + 1)
                got = held(a, l)
                for g in range(HKV):
                    self.assertTrue(set(got[g][:-1]) <= set(before[l][g]))

    def test_another_tenant_beyond_its_share_gives_room_by_its_own_steps(self):
        """A tenant that filled the pool alone holds more than its share once a second one
        attaches. The second one's prompt, within its own share, waits while caked drains the
        first one's least used segments for it and lowers the first one's budgets; the first
        one's sequences move and shrink at their own decode steps (never between calls), its
        K/V arrive byte for byte in their new pages, and the waiting prompt completes in
        segments that were the first tenant's (fresh memory)."""
        rng = np.random.default_rng()
        with Daemon("32M") as d, caked.Client(d.sock, service="big") as cb:
            seqs, data, before = fill_big(cb, rng)
            with caked.Client(d.sock, service="small") as cs:  # now big's share is half
                f = cs.open_sequence(L, H, HKV, D, 12288, dtype="f32", policy="full", window=W)
                done, err, fdata = threading.Event(), [], []

                def other():
                    try:
                        fdata.extend(prefill(f, 12288, np.random.default_rng()))
                    except Exception as e:  # noqa: BLE001
                        err.append(e)
                    done.set()
                t = threading.Thread(target=other)
                t.start()
                try:
                    for _ in range(300):  # big's budgets come down; nothing moves between calls
                        if any(a.reslices() for a in seqs):
                            break
                        time.sleep(0.01)
                    self.assertTrue(any(a.reslices() for a in seqs), "big gives room")
                    self.assertFalse(done.is_set(), "the prompt waits for big's steps")
                    self.assertEqual([held(a, 0) for a in seqs], [x[0] for x in before],
                                     "nothing moved between big's calls")
                    steps, t_end = 0, time.monotonic() + 60
                    # big's engine keeps decoding (at its pace: the prompt's later layers may
                    # need more of big's segments, drained after its earlier steps)
                    while not done.is_set() and time.monotonic() < t_end and steps < 1000:
                        for a in seqs:
                            a.decode_step()
                        steps += 1
                        time.sleep(0.01)
                    self.assertTrue(done.wait(10), "the prompt completes")
                    t.join()
                    self.assertEqual(err, [])
                    for l, (k, v, _) in enumerate(fdata):  # small's layers are whole and its own
                        kk, vv = f.read_layer(l)
                        np.testing.assert_array_equal(kk, k)
                        np.testing.assert_array_equal(vv, v)
                    for a, da, bf in zip(seqs, data, before):
                        for l, (k, v, _) in enumerate(da):
                            self.assertLessEqual(a.tokens(l), a.budget(l) + W + steps)
                            kk, vv = a.read_layer(l)
                            for g, got in enumerate(held(a, l)):
                                P = [p for p in got if p < BIG]  # the prompt's (decoded: unwritten)
                                self.assertTrue(set(P) <= set(bf[l][g]), "a re-slice keeps a subset")
                                for i, p in enumerate(P):  # moved pages hold the same K/V
                                    np.testing.assert_array_equal(kk[g, i], k[g, p])
                                    np.testing.assert_array_equal(vv[g, i], v[g, p])
                    m = d.metrics()
                    self.assertGreater(m["caked_pages_drained_total"], 0)
                    self.assertGreater(m["caked_pages_relocated_total"], 0)

                    def of(name, tenant):
                        return sum(v for k, v in m.items() if k.startswith(f'{name}{{tenant="{tenant}"'))
                    self.assertGreater(of("caked_tenant_drained_pages_total", "big"), 0)
                    self.assertGreaterEqual(of("caked_tenant_reslices_total", "big"), 1)
                    self.assertEqual(of("caked_tenant_reslices_total", "small"), 0)
                    self.assertGreaterEqual(m['caked_pressure_waits_total{outcome="granted"}'], 1)
                finally:  # a failure above must not close small's client under its thread
                    t.join(30)

    def test_a_drain_is_withdrawn_when_its_request_stops_waiting(self):
        """The tenant beyond its share never steps: the other's prompt is refused when its wait
        runs out, and the drain made for it is withdrawn (no segment left draining or
        promised); the first tenant's sequences still decode, their K/V where caked says."""
        rng = np.random.default_rng()
        with Daemon("32M", "--pressure-wait", "0.5") as d, \
                caked.Client(d.sock, service="big") as cb:
            seqs, data, before = fill_big(cb, rng, 8, BIG // 2)  # eight descriptors
            with caked.Client(d.sock, service="small") as cs:
                f = cs.open_sequence(L, H, HKV, D, 12288, dtype="f32", policy="full", window=W)
                with self.assertRaises(caked.OutOfMemory) as cm:
                    prefill(f, 12288, rng)
                self.assertIn("waited", str(cm.exception))
                m = d.metrics()
                self.assertGreater(m["caked_pages_drained_total"], 0, "a drain was made")
                self.assertEqual(m["caked_pool_draining_segments"], 0, "and withdrawn")
                self.assertEqual(m["caked_pool_promised_pages"], 0)
                self.assertEqual(m["caked_pages_relocated_total"], 0, "nothing moved meanwhile")
                self.assertEqual([held(a, 0) for a in seqs], [x[0] for x in before])
            for a, da in zip(seqs, data):  # big steps on: evicted to its lowered budgets
                a.decode_step()
                for l, (k, v, _) in enumerate(da):
                    kk, _ = a.read_layer(l)
                    for g, got in enumerate(held(a, l)):
                        for i, p in enumerate(got):
                            if p < BIG // 2:
                                np.testing.assert_array_equal(kk[g, i], k[g, p])

    def test_a_tenant_in_refuse_mode_keeps_its_budgets(self):
        """pressure=refuse for the tenant beyond its share: its budgets are its own, so the
        other's prompt (which only a cut could make room for) is refused when its wait runs
        out, and nothing of the first tenant was lowered."""
        rng = np.random.default_rng()
        with Daemon("32M", "--pressure-wait", "0.5") as d, \
                caked.Client(d.sock, service="big") as cb:
            seqs, _, before = fill_big(cb, rng)
            b0 = [[a.budget(l) for l in range(L)] for a in seqs]
            d.cachectl("quota", "big", "--pressure", "refuse")
            with caked.Client(d.sock, service="small") as cs:
                f = cs.open_sequence(L, H, HKV, D, 12288, dtype="f32", policy="full", window=W)
                with self.assertRaises(caked.OutOfMemory):
                    prefill(f, 12288, rng)
            self.assertEqual([a.reslices() for a in seqs], [0] * len(seqs))
            self.assertEqual([[a.budget(l) for l in range(L)] for a in seqs], b0)
            self.assertEqual([held(a, 0) for a in seqs], [x[0] for x in before])
            self.assertEqual(d.metrics()["caked_pool_draining_segments"], 0)

    def test_an_engine_killed_while_it_waits_harms_no_one(self):
        """An engine process waiting for room is SIGKILLed: its wait and its sequences go,
        caked serves on, the sequence it waited on is untouched."""
        rng = np.random.default_rng()
        script = (
            "import os, sys, numpy as np\n"
            "sys.path.insert(0, %r)\n"
            "from test_binding import caked\n"
            "c = caked.Client(%r, service='svc')\n"
            "f = c.open_sequence(3, 4, 2, 16, 8192, dtype='f32', policy='full', window=8)\n"
            "z = np.zeros((2, 8192, 16), np.float32)\n"
            "for l in range(3):\n"
            "    print('reserving', l, flush=True)\n"
            "    f.reserve(l)\n"
            "    f.write_layer(l, z, z)\n"
            "    f.observe(l)\n"
            "print('done', flush=True)\n")
        with Daemon("8M") as d, caked.Client(d.sock, service="svc") as ca:
            a = ca.open_sequence(L, H, HKV, D, 4096, dtype="f32", cache_size=3000, window=W,
                                 max_new_tokens=4)
            prefill(a, 4096, rng)
            before = [held(a, l) for l in range(L)]
            eng = subprocess.Popen([sys.executable, "-c", script % (os.path.dirname(__file__),
                                                                      d.sock)],
                                   stdout=subprocess.DEVNULL)
            waiting = 0
            for _ in range(300):  # until caked counts its request as waiting
                waiting = d.metrics().get("caked_pressure_waiting", 0)
                if waiting:
                    break
                time.sleep(0.02)
            self.assertEqual(waiting, 1, "the engine's reserve waits for a's step")
            eng.kill()
            eng.wait(10)
            for _ in range(300):
                m = d.metrics()
                if not m["caked_pressure_waiting"] and m["caked_sequences"] == 1:
                    break
                time.sleep(0.02)
            self.assertEqual(m["caked_pressure_waiting"], 0, "the wait went with the engine")
            self.assertEqual(m["caked_sequences"], 1, "its sequence went too")
            self.assertEqual([held(a, l) for l in range(L)], before, "a is untouched by it")
            a.decode_step()  # and caked serves on: a's step evicts to its lowered budgets
            for l in range(L):
                self.assertLessEqual(a.tokens(l), a.budget(l) + W + 1)

    def test_refuse_floors_and_the_wait_change_nothing(self):
        rng = np.random.default_rng()
        for args, why in ((["--pressure", "refuse"], "refuse"),
                          (["--min-tokens", "4100"], "floors"),  # every layer at its floor
                          (["--pressure-wait", "0.5"], "wait")):
            with self.subTest(why=why), Daemon("8M", *args) as d, \
                    caked.Client(d.sock, service="svc", shrink_idle=why != "wait") as c, \
                    caked.Client(d.sock, service="svc") as c2, \
                    caked.Client(d.sock, service="other") as co:
                o = co.open_sequence(L, H, HKV, D, 1024, dtype="f32", cache_size=512, window=W)
                prefill(o, 1024, rng)
                ob = [o.budget(l) for l in range(L)]
                a = c.open_sequence(L, H, HKV, D, 4096, dtype="f32", cache_size=3000, window=W)
                prefill(a, 4096, rng)
                before = [held(a, l) for l in range(L)]
                b0 = [a.budget(l) for l in range(L)]
                f = (c2 if why == "wait" else c).open_sequence(L, H, HKV, D, 8192, dtype="f32",
                                                              policy="full", window=W)
                t0 = time.monotonic()
                with self.assertRaises(caked.OutOfMemory) as cm:
                    prefill(f, 8192, rng)
                waited = time.monotonic() - t0
                if why == "wait":  # a's client never calls: the wait runs out
                    self.assertIn("waited", str(cm.exception))
                    self.assertGreaterEqual(waited, 0.4)
                else:
                    self.assertEqual(a.reslices(), 0)
                    self.assertEqual([a.budget(l) for l in range(L)], b0)
                    self.assertLess(waited, 0.4)
                self.assertEqual([held(a, l) for l in range(L)], before, "a's tokens stay")
                self.assertEqual(o.reslices(), 0, "a tenant within its share is never cut")
                self.assertEqual([o.budget(l) for l in range(L)], ob)
                m = d.metrics()
                if why == "wait":
                    self.assertGreaterEqual(m['caked_pressure_waits_total{outcome="refused"}'], 1)
                else:
                    self.assertEqual(m["caked_reslices_total"], 0)


if __name__ == "__main__":
    unittest.main()
