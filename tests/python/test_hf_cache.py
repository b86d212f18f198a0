"""caked.hf.CakedCache under transformers' generate on CPU: with the full policy, or a budget
above the prompt length, logits equal transformers' own cache; every policy runs generate
with its K/V in caked's pool and holds what its budgets say. A small random Llama (GQA x2)
is built in process; the real TinyStories model is used too when ../shared is beside the
clone. Needs CAKE_LIB and CAKED_BIN, torch and transformers (tools/pydeps.sh)."""
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from test_binding import Daemon, caked  # noqa: E402

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # ctest reports exit 77 as skipped (tools/test.sh installs them)
    print(f"skipped: {e} (tools/pydeps.sh installs torch and transformers)")
    sys.exit(77)

import caked.hf  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
TINY = os.path.join(SHARED, "models", "tinystories-656k")
NEW = 24


def generate(model, ids, cache=None, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              output_logits=True,
                              return_dict_in_generate=True,
                              **({caked.hf.cache_kwarg(model): cache} if cache else {}), **kw)


class HFCache(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().__enter__()
        torch.manual_seed(1234 + os.getpid())
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024)
        cls.cfg = cfg
        cls.model = caked.hf.enable(LlamaForCausalLM(cfg).eval())
        cls.ids = torch.randint(3, cfg.vocab_size, (1, 150))
        cls.ref = generate(cls.model, cls.ids)  # transformers' DynamicCache

    @classmethod
    def tearDownClass(cls):
        cls.d.__exit__(None, None, None)

    def assert_same_logits(self, out, ref, tol=1e-5):
        self.assertTrue(torch.equal(out.sequences, ref.sequences))
        for a, b in zip(out.logits, ref.logits):
            self.assertLessEqual((a - b).abs().max().item(), tol)

    def test_full_policy_equals_transformers_cache(self):
        with caked.Client(self.d.sock, service="hf-full") as c:
            cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy="full")
            out = generate(self.model, self.ids, cache)
            self.assert_same_logits(out, self.ref)
            # the K/V were in caked: every layer holds prompt + decoded tokens
            self.assertEqual(cache.layer_tokens(), [150 + NEW - 1] * 3)

    def test_half_precision_models(self):
        """bf16 and fp16 models keep their K/V in bf16 / f16 sequences, exactly."""
        with caked.Client(self.d.sock, service="hf-half") as c:
            for dt in (torch.bfloat16, torch.float16):
                m = caked.hf.enable(LlamaForCausalLM(self.cfg).to(dt).eval())
                m.load_state_dict(self.model.state_dict())
                ref = generate(m, self.ids)
                cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy="full")
                self.assertEqual(self.assert_same_logits(generate(m, self.ids, cache), ref, 0.0),
                                 None)
                self.assertEqual(cache.seq.dtype, {torch.bfloat16: "bf16", torch.float16: "f16"}[dt])
                cache.close()

    def test_budget_above_prompt_equals_transformers_cache(self):
        with caked.Client(self.d.sock, service="hf-cake") as c:
            for pol in ("cake", "snapkv", "h2o"):
                cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy=pol,
                                            cache_size=150 + NEW + 8, window=16)
                out = generate(self.model, self.ids, cache)
                self.assert_same_logits(out, self.ref)

    def test_every_policy_evicts_and_generates(self):
        C, w = 64, 16
        with caked.Client(self.d.sock, service="hf-policies") as c:
            for pol in caked.POLICIES:
                with self.subTest(policy=pol):
                    cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy=pol,
                                                cache_size=C, window=w)
                    out = generate(self.model, self.ids, cache)
                    self.assertEqual(out.sequences.shape[1], 150 + NEW)
                    held = cache.layer_tokens()
                    budgets = [cache.seq.budget(l) for l in range(3)]
                    if pol == "full":
                        self.assertEqual(held, [150 + NEW - 1] * 3)
                    elif pol in ("snapkv", "pyramidkv", "adakv"):  # prefill only
                        self.assertTrue(all(h >= b + w + NEW - 1 for h, b in zip(held, budgets)))
                    else:  # held at the budget + window (+ the slot of the last token)
                        self.assertEqual(held, [b + w + 1 for b in budgets])
                    if pol != "full":
                        self.assertLess(sum(held), 3 * (150 + NEW - 1))
                        diff = max((a - b).abs().max().item()
                                   for a, b in zip(out.logits, self.ref.logits))
                        self.assertGreater(diff, 0.0, "eviction changed nothing")
                    cache.close()

    def test_past_key_values_argument_and_errors(self):
        with caked.Client(self.d.sock, service="hf-args") as c:
            cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy="full")
            with torch.no_grad():
                out = self.model.generate(self.ids, past_key_values=cache, max_new_tokens=NEW,
                                          min_new_tokens=NEW, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True)
            self.assert_same_logits(out, self.ref)
            with self.assertRaises(caked.InvalidArgument):
                cache.crop(10)
            cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy="full")
            kw = {caked.hf.cache_kwarg(self.model): cache}
            with torch.no_grad():
                self.model(self.ids, use_cache=True, **kw)
                with self.assertRaises(caked.StateError):  # two tokens after the prompt
                    self.model(self.ids[:, :2], use_cache=True, **kw)
            cache.close()
            with self.assertRaises(caked.InvalidArgument):
                caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, placement="disk")
            # the model still works with transformers' own cache afterwards
            self.assert_same_logits(generate(self.model, self.ids), self.ref)

    def test_batch_rows_equal_batch_one(self):
        """Ragged prompts, left-padded in one batch: each row's tokens and logits are what
        that prompt gives alone (full policy: what transformers' own batched cache gives;
        CAKE and SnapKV: what the same cache gives at batch size 1)."""
        lens = (150, 97, 123)
        rows = [self.ids[:, :n] for n in lens]
        ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
        am = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, max(lens) - r.shape[1]:], am[b, max(lens) - r.shape[1]:] = r[0], 1
        with caked.Client(self.d.sock, service="hf-batch") as c:
            ref = generate(self.model, ids, attention_mask=am, pad_token_id=0)
            cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy="full")
            self.assert_same_logits(generate(self.model, ids, cache, attention_mask=am,
                                             pad_token_id=0), ref)
            self.assertEqual([len(cache.seqs), cache.layer_tokens(1)[0]],
                             [3, lens[1] + NEW - 1], "one sequence per row, padding left out")
            cache.close()
            for pol in ("cake", "snapkv"):
                cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy=pol,
                                            cache_size=48, window=8)
                out = generate(self.model, ids, cache, attention_mask=am, pad_token_id=0)
                cache.close()
                for b, r in enumerate(rows):
                    one = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy=pol,
                                              cache_size=48, window=8)
                    alone = generate(self.model, r, one)
                    one.close()
                    self.assertTrue(torch.equal(out.sequences[b, max(lens):],
                                                alone.sequences[0, r.shape[1]:]), f"{pol} row {b}")
                    for x, y in zip(out.logits, alone.logits):
                        self.assertLessEqual((x[b] - y[0]).abs().max().item(), 1e-4,
                                             f"{pol} row {b}")

    def test_join_rows_prefilled_apart(self):
        """Prompts prefilled one at a time (each its own forward and cache) and joined into one
        cache (CakedCache.join) decode as a batch, each row with its own positions, to the
        logits each row gives alone; the parts are left empty and a second join of them, or
        a join of an unprefilled cache, is refused."""
        lens, steps = (40, 33), 6
        kw = caked.hf.cache_kwarg(self.model)
        toks = torch.randint(3, self.cfg.vocab_size, (len(lens), steps))

        def prefill(c, r):
            cache = caked.hf.CakedCache(c, self.cfg, max_new_tokens=steps, policy="cake",
                                        cache_size=16, window=8)
            with torch.no_grad():
                self.model(r, use_cache=True, **{kw: cache})
            return cache

        def step(cache, tok, pos):
            with torch.no_grad():
                return self.model(tok, position_ids=pos, use_cache=True, cache_position=torch.tensor(
                    [int(pos.max())]), **{kw: cache}).logits[:, -1]

        with caked.Client(self.d.sock, service="hf-join") as c:
            parts = [prefill(c, self.ids[:, :n]) for n in lens]
            joined = caked.hf.CakedCache.join(parts)
            self.assertEqual([len(joined.seqs), [len(p.seqs) for p in parts], joined.seen],
                             [2, [0, 0], max(lens)])
            with self.assertRaises(caked.StateError):
                caked.hf.CakedCache.join(parts)
            with self.assertRaises(caked.InvalidArgument):  # a CUDA graph needs GPU sequences
                caked.hf.GraphDecoder(self.model, joined)
            got = [step(joined, toks[:, i:i + 1], torch.tensor([[n + i] for n in lens]))
                   for i in range(steps)]
            for b, n in enumerate(lens):
                alone = prefill(c, self.ids[:, :n])
                for i in range(steps):
                    want = step(alone, toks[b:b + 1, i:i + 1], torch.tensor([[n + i]]))
                    self.assertLessEqual((got[i][b] - want[0]).abs().max().item(), 1e-4,
                                         f"row {b} step {i}")
                self.assertEqual(joined.layer_tokens(b), alone.layer_tokens(0), f"row {b}")
                alone.close()
            joined.close()
            with self.assertRaises(caked.StateError):
                caked.hf.CakedCache.join([caked.hf.CakedCache(c, self.cfg, max_new_tokens=1)])

    def test_record_once_replay_for_every_policy(self):
        """A prompt recorded once (caked.hf.record) and replayed into a cache of each
        policy (CakedCache.replay, no forward of the model) keeps, layer by layer and head by
        head, the tokens a fresh prefill through the model keeps, and continues to the same
        logits; the full policy's replay continues as transformers' own cache does; a replay
        is deterministic."""
        n = self.ids.shape[1]
        rec = caked.hf.record(self.model, self.ids, window=8)
        self.assertLessEqual((rec.logits - self.ref.logits[0][0]).abs().max().item(), 1e-5)
        gold = self.ref.sequences[0, n:n + 8]  # teacher forcing: transformers' greedy tokens
        kw = caked.hf.cache_kwarg(self.model)
        with caked.Client(self.d.sock, service="hf-replay") as c:
            for pol, extra in (("full", dict(window=8)), ("cake", dict(cache_size=48, window=8)),
                               ("snapkv", dict(cache_size=48, window=8)),
                               ("pyramidkv", dict(cache_size=48, window=8))):
                fresh = caked.hf.CakedCache(c, self.cfg, max_new_tokens=NEW, policy=pol, **extra)
                with torch.no_grad():
                    self.model(self.ids, use_cache=True, **{kw: fresh})
                rep = caked.hf.CakedCache.replay(c, self.cfg, rec, NEW, policy=pol, **extra)
                for l in range(self.cfg.num_hidden_layers):
                    for g in range(self.cfg.num_key_value_heads):
                        self.assertTrue(np.array_equal(fresh.seq.kept_positions(l, g),
                                                       rep.seq.kept_positions(l, g)),
                                        f"{pol} layer {l} head {g}")
                a, b = caked.hf.decode(self.model, fresh, gold), caked.hf.decode(self.model, rep, gold)
                self.assertLessEqual((a - b).abs().max().item(), 1e-5, pol)
                if pol == "full":  # the model's own cache: logits of the same continuation
                    for i in range(len(gold)):
                        self.assertLessEqual((b[i] - self.ref.logits[i + 1][0]).abs().max().item(),
                                             1e-4, f"full replay step {i}")
                again = caked.hf.CakedCache.replay(c, self.cfg, rec, NEW, policy=pol, **extra)
                self.assertTrue(torch.equal(caked.hf.decode(self.model, again, gold), b), pol)
                for x in (fresh, rep, again):
                    x.close()
            with self.assertRaises(caked.InvalidArgument):  # window 32 from 8 recorded rows
                caked.hf.CakedCache.replay(c, self.cfg, rec, NEW, policy="cake", cache_size=48)

    def test_replay_with_the_engines_own_scores(self):
        """replay(select=...): the engine's indicator and preferences replace caked's scoring
        (cake_prefill_submit). Given CAKE's own preferences (a replay's `preferences`), the
        budgets are CAKE's; given an indicator that ranks earlier tokens higher, every head
        of every layer keeps exactly the first tokens its budget allows, then the window."""
        rec = caked.hf.record(self.model, self.ids, window=8)
        n, w = self.ids.shape[1], 8
        kw = dict(policy="cake", cache_size=48, window=w)
        with caked.Client(self.d.sock, service="hf-select") as c:
            cake = caked.hf.CakedCache.replay(c, self.cfg, rec, NEW, **kw)
            prefs = [p[0] for p in cake.preferences]
            self.assertEqual(len(prefs), self.cfg.num_hidden_layers)
            first = -np.arange(n - w, dtype=np.float32)  # earlier is better
            hkv = self.cfg.num_key_value_heads
            own = caked.hf.CakedCache.replay(
                c, self.cfg, rec, NEW, select=lambda l, b: (np.tile(first, (hkv, 1)), prefs[l]),
                **kw)
            self.assertEqual([p[0] for p in own.preferences], prefs)
            budgets = [own.seq.budget(l) for l in range(self.cfg.num_hidden_layers)]
            self.assertEqual(budgets, [cake.seq.budget(l) for l in range(len(budgets))])
            self.assertLess(min(budgets), n - w, "CAKE evicted nothing: the test would be vacuous")
            for l, b in enumerate(budgets):
                for g in range(hkv):
                    self.assertEqual(own.seq.kept_positions(l, g).tolist(),
                                     list(range(min(b, n - w))) + list(range(n - w, n)),
                                     f"layer {l} head {g}")
            cake.close(), own.close()

    @unittest.skipUnless(os.path.isdir(TINY), "needs ../shared/models beside the clone")
    def test_tinystories_full_policy_is_exact(self):
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
        caked.hf.enable(m)
        ids = torch.tensor([[1] + list(np.random.default_rng().integers(3, 2000, 300))])
        ref = generate(m, ids)
        with caked.Client(self.d.sock, service="hf-tiny") as c:
            cache = caked.hf.CakedCache(c, m.config, max_new_tokens=NEW, policy="full")
            self.assert_same_logits(generate(m, ids, cache), ref)


if __name__ == "__main__":
    unittest.main()
