"""tools/cake-fidelity's mechanics (not which policy wins): on a small random transformers
model folder (character tokenizer) and a llama2.c checkpoint written here, with text of our
own, the full policy scores KL 0, 100% top-1, no NLL change and full greedy agreement; every
row x budget is present; two runs give the same CSV; the PNG is written. Needs CAKE_LIB,
CAKED_BIN, torch, transformers and matplotlib (tools/pydeps.sh)."""
import csv
import os
import struct
import subprocess
import sys
import tempfile
import unittest

try:
    import numpy as np
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import matplotlib  # noqa: F401
except ImportError as e:
    print(f"skipped: {e} (tools/pydeps.sh installs torch, transformers and matplotlib)")
    sys.exit(77)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TOOL = os.path.join(ROOT, "tools", "cake-fidelity")
CHARS = "abcdefghijklmnopqrstuvwxyz ,.'\n"


def hf_folder(d):
    torch.manual_seed(7)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)


def llama2c_checkpoint(d):
    """A random llama2.c model (dim 16, 2 layers, 4 heads / 2 kv heads) and a byte tokenizer."""
    rng = np.random.default_rng(3)
    dim, hidden, L, H, Hkv, vocab, seq = 16, 32, 2, 4, 2, 300, 256
    kv = Hkv * dim // H
    sizes = [vocab * dim, L * dim, L * dim * dim, L * kv * dim, L * kv * dim, L * dim * dim,
             L * dim, L * hidden * dim, L * dim * hidden, L * hidden * dim, dim,
             seq * (dim // H)]
    with open(os.path.join(d, "model.bin"), "wb") as f:
        f.write(struct.pack("7i", dim, hidden, L, H, Hkv, vocab, seq))
        for n in sizes:
            f.write((rng.standard_normal(n) * 0.3).astype(np.float32).tobytes())
    with open(os.path.join(d, "tok300.bin"), "wb") as f:
        f.write(struct.pack("i", 8))
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)] + [b" "]
        pieces += [b" " + bytes([c]) for c in range(97, 97 + 26)][:vocab - len(pieces)]
        pieces += [b"zz%d" % i for i in range(vocab - len(pieces))]
        for i, p in enumerate(pieces):
            f.write(struct.pack("fi", -float(i), len(p)) + p)


def text(d):
    rng = np.random.default_rng(5)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away"]
    os.makedirs(d)
    for i in range(3):
        with open(os.path.join(d, f"t{i}.txt"), "w") as f:
            f.write(" ".join(rng.choice(words) for _ in range(600)) + ".\n")


class Fidelity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="cake-fidelity-test-")
        cls.hf = os.path.join(cls.tmp, "hf")
        hf_folder(cls.hf)
        cls.l2c = os.path.join(cls.tmp, "l2c")
        os.makedirs(cls.l2c)
        llama2c_checkpoint(cls.l2c)
        cls.data = os.path.join(cls.tmp, "data")
        text(cls.data)

    def run_tool(self, out):
        cmd = [sys.executable, TOOL, "--model", self.hf, "--model",
               os.path.join(self.l2c, "model.bin"), "--data", self.data,
               "--policies", "full,cake,snapkv,adakv,cake/ind=var", "--budgets", "16,48",
               "--window", "8", "--prompts", "2", "--min-prompt", "100", "--max-prompt", "140",
               "--continuation", "12", "--caked", os.environ["CAKED_BIN"], "--out", out]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with open(os.path.join(out, "fidelity.csv")) as f:
            return list(csv.DictReader(f)), r.stdout

    def test_full_is_exact_every_cell_present_and_runs_repeat(self):
        rows, text_out = self.run_tool(os.path.join(self.tmp, "a"))
        models = sorted({r["model"] for r in rows})
        self.assertEqual(len(models), 2)
        for m in models:
            for pol in ("full", "cake", "snapkv", "adakv", "cake/ind=var"):
                for b in ("16", "48"):
                    got = [r for r in rows if r["model"] == m and r["policy"] == pol and
                           r["budget"] == b]
                    self.assertEqual({r["source"] for r in got}, {"all", "data", "sampled"})
                    if pol == "full":
                        for r in got:
                            self.assertEqual(float(r["kl"]), 0.0)
                            self.assertEqual(float(r["top1"]), 100.0)
                            self.assertEqual(float(r["dnll"]), 0.0)
                            self.assertEqual(float(r["greedy"]), 12.0)
        # eviction at C = 16 of ~120-token prompts changes the distribution somewhere
        self.assertTrue(any(float(r["kl"]) > 0 for r in rows if r["policy"] != "full"))
        self.assertIn("KL(full||policy)", text_out)
        self.assertGreater(os.path.getsize(os.path.join(self.tmp, "a", "fidelity.png")), 1000)
        again, _ = self.run_tool(os.path.join(self.tmp, "b"))
        self.assertEqual(rows, again, "same seed, same results")


if __name__ == "__main__":
    unittest.main()
