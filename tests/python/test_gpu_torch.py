"""GPU sequences from torch with no copy through the host (caked.gpu): three sequences of
different prompt lengths get K/V written into caked's GPU pool pages by torch's indexing
(write_kv) and their window queries into the rings on the device; caked scores and compacts
on the GPU; reading the pool through FlashInfer's HND description (kv_cache, tables) with
plain torch gives, slot for slot, the original rows at the positions caked reports
(kept_positions), after prefill and after decode steps; Batch's one launch per layer equals
a float32 torch reference (GQA) over that cache; a CUDA graph captured once replays the
same after further decode steps (the device tables change under it); the same again under
Ada-KV, whose heads keep different counts (holes, masked by the batch's attention and shown
by caked.gpu.holes); with the rows' log-sum-exps from torch the scoring is one pass and keeps
what two passes keep. Exit 77 without
torch's CUDA or a GPU. Needs CAKE_LIB and CAKED_BIN."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

try:
    import torch
except ImportError:
    torch = None
if torch is None or not torch.cuda.is_available():
    print("SKIP: torch with CUDA is not available")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client", "python"))
import caked  # noqa: E402
import caked.gpu as cg  # noqa: E402

L, H, HKV, D, C, W, NEW = 3, 8, 2, 64, 128, 32, 6
LENS = (700, 300, 129)


def reference(q, k, v, holes=None):
    """softmax(q k^T / sqrt(d)) v in float32: q [H][D], k, v [HKV][T][D] -> [H][D]; holes
    [(first, count)] per kv head: slots left out."""
    k = k.float().repeat_interleave(H // HKV, dim=0)
    v = v.float().repeat_interleave(H // HKV, dim=0)
    s = torch.einsum("hd,htd->ht", q.float(), k) / D ** 0.5
    for g, (first, cnt) in enumerate(holes or []):
        s[g * (H // HKV):(g + 1) * (H // HKV), first:first + cnt] = -float("inf")
    return torch.einsum("ht,htd->hd", torch.softmax(s, dim=-1), v)


class GpuTorch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="caked-gpu-")
        cls.sock = os.path.join(cls.dir, "caked.sock")
        cls.log = open(os.path.join(cls.dir, "log"), "w+")
        cls.proc = subprocess.Popen([os.environ["CAKED_BIN"], "--socket", cls.sock,
                                     "--host-pool", "256M", "--gpu-pool", "1G"], stderr=cls.log)
        for _ in range(500):
            if os.path.exists(cls.sock):
                break
            time.sleep(0.02)
        cls.c = caked.Client(cls.sock, service="gpu-torch")

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.proc.terminate()
        assert cls.proc.wait(20) == 0
        cls.log.close()
        shutil.rmtree(cls.dir)

    def check_cache(self, s, keys, vals, what):
        """Every held slot, read through the HND description, is the original row at the
        position caked reports (holes: none, exactly where cake_head_holes says); returns
        how many slots are holes."""
        n_holes = 0
        for l in range(L):
            k, v = cg.read_layer(s, l)
            self.assertEqual(k.shape[1], s.tokens(l))
            holes = s.holes(l)
            self.assertEqual(cg.holes(s)[l].tolist(), [list(h) for h in holes], f"{what} l{l}")
            for g in range(HKV):
                pos = torch.from_numpy(s.kept_positions(l, g).astype("int64")).cuda()
                hole = pos == caked.NO_POSITION
                first, cnt = holes[g]
                self.assertEqual(hole.nonzero().flatten().tolist(), list(range(first, first + cnt)),
                                 f"{what} holes l{l} g{g}")
                n_holes += cnt
                pos, real = pos[~hole], (~hole).nonzero().flatten()
                self.assertTrue(torch.equal(k[g][real], keys[l][g, pos]), f"{what} K l{l} g{g}")
                self.assertTrue(torch.equal(v[g][real], vals[l][g, pos]), f"{what} V l{l} g{g}")
        return n_holes

    def test_prefill_decode_and_batched_attention(self):
        self.run_batched("cake")

    def test_adakv_holes_on_the_gpu(self):
        """Ada-KV on GPU sequences: the host splits each layer among its heads by the GPU's
        indicator, the GPU compacts; attention leaves the holes out."""
        self.run_batched("adakv")

    def run_batched(self, policy):
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(int(time.time()))
        seqs, keys, vals = [], [], []
        for n in LENS:
            s = self.c.open_sequence(L, H, HKV, D, n, dtype="bf16", cache_size=C, window=W,
                                     max_new_tokens=NEW, placement="gpu", policy=policy)
            self.assertTrue(s.on_gpu)
            dev = cg.device_of(s)
            ks, vs = [], []
            for l in range(L):
                k = torch.randn(HKV, n + NEW, D, device=dev, generator=gen).bfloat16()
                v = torch.randn(HKV, n + NEW, D, device=dev, generator=gen).bfloat16()
                q = torch.randn(H, n, D, device=dev, generator=gen).bfloat16()
                s.reserve(l)
                cg.write_kv(s, l, k[:, :n], v[:, :n])
                cg.put_queries(s, l, q)
                torch.cuda.synchronize()
                s.observe(l)
                ks.append(k), vs.append(v)
            self.assertLessEqual(s.tokens(0), n)
            seqs.append(s), keys.append(ks), vals.append(vs)
        n_holes = 0
        for i, s in enumerate(seqs):
            n_holes += self.check_cache(s, keys[i], vals[i], f"prefill of sequence {i}")
            tokens, pages = cg.tables(s)
            self.assertEqual(tokens.tolist(), [s.tokens(l) for l in range(L)])
        batch = cg.Batch(self.c, seqs)
        q_static = torch.zeros(len(seqs), H, D, device=dev, dtype=torch.bfloat16)
        outs = [torch.empty_like(q_static) for _ in range(L)]
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):  # warm up, then capture at a fixed bound
            for l in range(L):
                batch.attention(l, q_static, outs[l], max_tokens=max(LENS) + NEW)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for l in range(L):
                batch.attention(l, q_static, outs[l], max_tokens=max(LENS) + NEW)
        worst = 0.0
        for step in range(NEW - 1):
            self.c.decode_step(seqs)
            for i, s in enumerate(seqs):
                for l in range(L):
                    t = s.tokens(l)
                    cg.write_kv(s, l, keys[i][l][:, LENS[i] + step:LENS[i] + step + 1],
                                vals[i][l][:, LENS[i] + step:LENS[i] + step + 1], start=t - 1)
                    cg.put_decode_query(s, l, torch.randn(H, D, device=dev, generator=gen))
            torch.cuda.synchronize()
            for i, s in enumerate(seqs):
                self.check_cache(s, keys[i], vals[i], f"decode step {step} of sequence {i}")
            q_static.copy_(torch.randn(len(seqs), H, D, device=dev, generator=gen))
            torch.cuda.synchronize()
            graph.replay()
            torch.cuda.synchronize()
            for l in range(L):
                direct = batch.attention(l, q_static)
                torch.cuda.synchronize()
                self.assertTrue(torch.equal(direct, outs[l]), f"graph replay, layer {l}")
                for i, s in enumerate(seqs):
                    k, v = cg.read_layer(s, l)
                    ref = reference(q_static[i], k, v, s.holes(l))
                    worst = max(worst, (direct[i].float() - ref).abs().max().item())
        self.assertLess(worst, 2e-2, "batched attention against float32 torch")
        for bad in (q_static[:1], q_static.float(), q_static.cpu(), q_static[:, :, :D // 2]):
            with self.assertRaises(caked.InvalidArgument):  # refused before any launch
                batch.attention(0, bad)
            with self.assertRaises(caked.InvalidArgument):
                batch.put_decode_query(0, bad)
        with self.assertRaises(caked.InvalidArgument):
            batch.append(0, q_static, q_static)  # q_heads rows where kv_heads are wanted
        if policy == "adakv":  # the long prompts' heads split their layers unevenly
            self.assertGreater(n_holes, 0, "Ada-KV left no holes")
        print(f"{policy}: batched decode attention within {worst:.3g} of torch over {len(seqs)} "
              f"sequences ({n_holes} hole slots); graph replays equal; tensors of another "
              f"shape, dtype or device refused")
        batch.close()
        for s in seqs:
            s.close()

    def test_lse_area_wider_than_a_segment(self):
        """Log-sum-exps from device memory into a window whose area for them (64 layers x
        64 heads x 256 rows, 4 MiB) is wider than a host segment (4 MiB): every layer's copy
        is taken, the one over a segment's end included (each segment is registered with
        CUDA apart, and one copy across two registrations is refused)."""
        s = self.c.open_sequence(64, 64, 64, 64, 1000, dtype="bf16", cache_size=512, window=256,
                                 placement="gpu")
        lse = torch.rand(64, 256, device=cg.device_of(s)) + 5
        for l in range(64):
            cg.put_lse(s, l, lse)
        torch.cuda.synchronize()
        s.close()

    def test_prefill_with_the_engines_lse(self):
        """The window rows' log-sum-exps as a device tensor (cg.put_lse, computed here with
        torch.logsumexp as a model's attention would return them): caked scores each layer
        in one pass over its keys on the GPU, with the preferences (1e-3) and kept tokens
        (up to near-ties) of the two-pass scoring; a NaN among them is refused."""
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(int(time.time()))
        n = 900
        a, b = (self.c.open_sequence(L, H, HKV, D, n, dtype="bf16", cache_size=C, window=W,
                                     placement="gpu") for _ in range(2))
        dev = cg.device_of(a)
        for l in range(L):
            k = torch.randn(HKV, n, D, device=dev, generator=gen).bfloat16()
            v = torch.randn(HKV, n, D, device=dev, generator=gen).bfloat16()
            q = torch.randn(H, n, D, device=dev, generator=gen).bfloat16()
            z = torch.einsum("hwd,htd->hwt", q[:, -W:].double(),
                             k.double().repeat_interleave(H // HKV, dim=0)) / D ** 0.5
            z = z.masked_fill(torch.arange(n, device=dev)[None, None, :] >
                              (n - W + torch.arange(W, device=dev))[None, :, None], float("-inf"))
            lse = torch.logsumexp(z, dim=-1).float()  # [H][W]
            for s in (a, b):
                s.reserve(l)
                cg.write_kv(s, l, k, v)
                cg.put_queries(s, l, q)
            if l == 0:
                bad = lse.clone()
                bad[2, 5] = float("nan")
                cg.put_lse(b, l, bad)
                torch.cuda.synchronize()
                with self.assertRaisesRegex(caked.InvalidArgument, "log-sum-exp"):
                    b.observe(l)
            cg.put_lse(b, l, lse)
            torch.cuda.synchronize()
            pa, pb = a.observe(l), b.observe(l)
            self.assertLessEqual(abs(pa - pb), 1e-3 * abs(pa), f"layer {l}: {pa} vs {pb}")
        for l in range(L):
            self.assertLessEqual(abs(a.budget(l) - b.budget(l)), 1)
            for g in range(HKV):
                ka, kb = set(a.kept_positions(l, g)), set(b.kept_positions(l, g))
                self.assertLessEqual(len(ka ^ kb), 2 + len(ka) // 50,
                                     f"layer {l} head {g}: kept sets differ beyond near-ties")
        a.close(), b.close()


class GpuHFCache(unittest.TestCase):
    """caked.hf.CakedCache on GPU sequences under generate (a small random fp16 Llama on the
    GPU): the full policy gives transformers' own greedy tokens; ragged prompts in one batch
    give each row what it gives alone; nothing of the cache is on the host."""

    @classmethod
    def setUpClass(cls):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise unittest.SkipTest("transformers is not installed")
        import caked.hf
        cls.hf = caked.hf
        GpuTorch.setUpClass.__func__(cls)
        torch.manual_seed(7)
        cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=2048)
        cls.cfg = cfg
        cls.model = caked.hf.enable(LlamaForCausalLM(cfg).to("cuda", torch.float16).eval())

    @classmethod
    def tearDownClass(cls):
        GpuTorch.tearDownClass.__func__(cls)

    def same_up_to_ties(self, got, got_logits, want, want_logits, row, what, tie=0.05):
        """got's tokens equal want's, or first differ where want's top two logits were within
        `tie` (fp16 arithmetic of a different batch shape may break a near tie either way)."""
        for step in range(want.shape[-1]):
            if got[step] != want[step]:
                top = want_logits[step][0].float().topk(2).values
                self.assertLess((top[0] - top[1]).item(), tie, f"{what}: step {step} is no tie")
                return
            self.assertLess((got_logits[step][row] - want_logits[step][0]).abs().max().item(),
                            0.1, f"{what}: step {step} logits")

    def generate(self, ids, cache=None, **kw):
        with torch.no_grad():
            return self.model.generate(ids, max_new_tokens=16, min_new_tokens=16,
                                       do_sample=False, output_logits=True,
                                       return_dict_in_generate=True,
                                       **({self.hf.cache_kwarg(self.model): cache} if cache else {}),
                                       **kw)

    def test_full_policy_and_batches_on_the_gpu(self):
        lens = (700, 333, 512)
        rows = [torch.randint(3, 320, (1, n), device="cuda") for n in lens]
        ids = torch.zeros(len(lens), max(lens), dtype=torch.long, device="cuda")
        am = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, max(lens) - r.shape[1]:], am[b, max(lens) - r.shape[1]:] = r[0], 1
        ref = self.generate(rows[0])
        cache = self.hf.CakedCache(self.c, self.cfg, max_new_tokens=16, policy="full")
        out = self.generate(rows[0], cache)
        self.assertIsNotNone(cache.gpu, "auto placement chose the GPU pool")
        self.assertTrue(cache.seq.on_gpu)
        worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
        self.same_up_to_ties(out.sequences[0, lens[0]:], out.logits, ref.sequences[0, lens[0]:],
                             ref.logits, 0, "full policy against transformers' cache")
        cache.close()
        cache = self.hf.CakedCache(self.c, self.cfg, max_new_tokens=16, policy="cake",
                                   cache_size=128, window=16)
        out = self.generate(ids, cache, attention_mask=am, pad_token_id=0)
        self.assertEqual(len(cache.seqs), 3)
        for s in cache.seqs:  # CAKE's layers split (128 - 16) * 3 by preference: each layer
            # within its own budget, the window and the tokens generated (as gpu_smollm checks)
            self.assertLessEqual(sum(s.budget(l) for l in range(3)), (128 - 16) * 3)
            for l in range(3):
                self.assertLessEqual(s.tokens(l), s.budget(l) + 16 + 16, f"layer {l}")
        cache.close()
        for b, r in enumerate(rows):
            one = self.hf.CakedCache(self.c, self.cfg, max_new_tokens=16, policy="cake",
                                     cache_size=128, window=16)
            alone = self.generate(r, one)
            one.close()
            self.same_up_to_ties(out.sequences[b, max(lens):], out.logits,
                                 alone.sequences[0, lens[b]:], alone.logits, b, f"row {b}")
        print(f"CakedCache on GPU sequences: full policy = transformers' tokens (logits within "
              f"{worst:.3g}), 3 ragged rows = each alone under CAKE (up to near ties)")

    def test_cake_prefill_with_the_models_lse(self):
        """CakedCache hands caked each layer's window rows' log-sum-exps from torch's flash
        attention over the prompt (batch 1, no padding): every layer scored in one pass, the
        same tokens kept (up to near ties) and generated (up to ties) as with two passes."""
        ids = torch.randint(3, 320, (1, 900), device="cuda")
        got = {}
        for lse in (True, False):
            cache = self.hf.CakedCache(self.c, self.cfg, max_new_tokens=16, policy="cake",
                                       cache_size=128, window=16, lse=lse)
            out = self.generate(ids, cache)
            kept = [[set(cache.seq.kept_positions(l, g)) for g in range(2)] for l in range(3)]
            got[lse] = (out, kept, cache.lse_layers)
            cache.close()
        self.assertEqual(got[True][2], 3, "every layer had the model's log-sum-exps")
        self.assertEqual(got[False][2], 0)
        for l in range(3):
            for g in range(2):
                a, b = got[True][1][l][g], got[False][1][l][g]
                self.assertLessEqual(len(a ^ b), 2 + len(a) // 20, f"layer {l} head {g}")
        self.same_up_to_ties(got[True][0].sequences[0, 900:], got[True][0].logits,
                             got[False][0].sequences[0, 900:], got[False][0].logits, 0,
                             "one-pass against two-pass scoring")

    def test_graph_decode_equals_eager(self):
        """Rows prefilled one at a time and joined (CakedCache.join), then decoded through a
        CUDA graph of the whole forward (GraphDecoder: one request to caked and one replay a
        step): the same greedy tokens and logits as the eager decode of the same rows, and
        under CAKE the same tokens kept by every layer afterwards (the captured launches
        wrote each step's queries where caked's eviction reads them)."""
        lens, steps = (600, 450), 12
        kw = self.hf.cache_kwarg(self.model)
        rows = [torch.randint(3, 320, (1, n), device="cuda") for n in lens]
        pos0 = torch.tensor(lens, device="cuda")
        for pol in (dict(policy="cake", cache_size=128, window=16), dict(policy="full")):
            runs = {}
            for graph in (True, False):
                parts, first = [], []
                for r in rows:
                    cache = self.hf.CakedCache(self.c, self.cfg, max_new_tokens=steps, **pol)
                    with torch.no_grad():
                        first.append(self.model(r, use_cache=True, **{kw: cache}).logits[0, -1])
                    parts.append(cache)
                cache = self.hf.CakedCache.join(parts)
                tok = torch.stack(first).argmax(-1)
                dec = self.hf.GraphDecoder(self.model, cache) if graph else None
                toks, logits = [], []
                for i in range(steps):
                    if graph:
                        lg = dec.step(tok, pos0 + i).clone()
                    else:
                        with torch.no_grad():
                            lg = self.model(tok[:, None], position_ids=(pos0 + i)[:, None],
                                            cache_position=torch.tensor([max(lens) + i],
                                                                        device="cuda"),
                                            use_cache=True, **{kw: cache}).logits[:, -1]
                    tok = lg.argmax(-1)
                    toks.append(tok)
                    logits.append(lg)
                if graph:
                    self.assertIsNotNone(dec.graph, "the steps after the first replayed a graph")
                kept = [[[sorted(s.kept_positions(l, g)) for g in range(2)] for l in range(3)]
                        for s in cache.seqs]
                runs[graph] = (torch.stack(toks), torch.stack(logits), kept)
                if dec:
                    dec.close()
                cache.close()
            (ta, la, ka), (tb, lb, kb) = runs[True], runs[False]
            self.assertTrue(torch.equal(ta, tb), f"{pol['policy']}: greedy tokens")
            self.assertLess((la - lb).abs().max().item(), 0.05, f"{pol['policy']}: logits")
            self.assertEqual(ka, kb, f"{pol['policy']}: kept tokens after the steps")
        print(f"GraphDecoder: 2 rows joined, {steps} steps, CAKE and full: the eager decode's "
              f"tokens, logits and kept tokens")


if __name__ == "__main__":
    unittest.main()
