"""llama2.c checkpoints (e.g. shared/models/stories260k) as transformers Llama models.

llama2.c stores q and k projections for RoPE on interleaved pairs (x[2i], x[2i+1]);
transformers' Llama rotates halves (x[i], x[i + d/2]). Rows of wq and wk are permuted per head
as llama2.c's own export does (Meta -> HF), so the converted model computes the same function.
The tokenizer (tok512.bin: max length, then per token a float score, a length and the bytes)
is llama2.c's BPE: encode merges the best-scoring adjacent pair until none is in the vocabulary.
"""
import os
import struct

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _permute(w, heads, rows, cols):
    """Interleaved pairs -> rotate_half halves, per head (convert_llama_weights_to_hf)."""
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_model(path):
    """The .bin checkpoint at `path` as a float32 LlamaForCausalLM (eval mode)."""
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("7i", f.read(28))
        data = np.frombuffer(f.read(), dtype=np.float32)
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // heads
    kv_dim = kv_heads * hd
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        t = torch.from_numpy(data[off:off + n].copy()).view(*shape)
        off += n
        return t

    emb = take(vocab, dim)
    rms_att = take(layers, dim)
    wq, wk, wv = take(layers, dim, dim), take(layers, kv_dim, dim), take(layers, kv_dim, dim)
    wo = take(layers, dim, dim)
    rms_ffn = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    rms_final = take(dim)
    off += seq_len * hd  # freq_cis_real and freq_cis_imag (recomputed by transformers)
    wcls = emb if shared else take(vocab, dim)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared,
                      bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final,
          "lm_head.weight": wcls}
    for l in range(layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = rms_att[l]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[l]
        sd[p + "self_attn.q_proj.weight"] = _permute(wq[l], heads, dim, dim)
        sd[p + "self_attn.k_proj.weight"] = _permute(wk[l], kv_heads, kv_dim, dim)
        sd[p + "self_attn.v_proj.weight"] = wv[l]
        sd[p + "self_attn.o_proj.weight"] = wo[l]
        sd[p + "mlp.gate_proj.weight"] = w1[l]
        sd[p + "mlp.down_proj.weight"] = w2[l]
        sd[p + "mlp.up_proj.weight"] = w3[l]
    m.load_state_dict(sd, strict=False)
    if shared:
        m.tie_weights()
    return m.eval()


class Tokenizer:
    """llama2.c's tokenizer (tok*.bin): BOS 1, EOS 2, byte fallback tokens <0x00>.. at 3."""

    def __init__(self, path, vocab_size):
        self.pieces, self.scores = [], []
        with open(path, "rb") as f:
            (self.max_len,) = struct.unpack("i", f.read(4))
            for _ in range(vocab_size):
                score, n = struct.unpack("fi", f.read(8))
                self.pieces.append(f.read(n))
                self.scores.append(score)
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.bos_token_id, self.eos_token_id = 1, 2
        # merges never cross a word's leading space when no piece holds a space elsewhere:
        # then words encode alone (and are cached), which is the same and much faster
        self.by_word = all(b" " not in p[1:] for p in self.pieces)
        self.cache = {}

    def encode(self, text, bos=True):
        if not (self.by_word and text):
            return self._encode(text, bos)
        ids = [self.bos_token_id] if bos else []
        text = " " + text  # the dummy prefix
        at = 0
        while at < len(text):
            end = at + 1
            while end < len(text) and text[end] != " ":
                end += 1
            word = text[at:end]
            if word not in self.cache:
                self.cache[word] = self._merge(self._symbols(word))
            ids += self.cache[word]
            at = end
        return ids

    def _symbols(self, text):
        ids = []
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.index:
                ids.append(self.index[b])
            else:
                ids.extend(x + 3 for x in b)
        return ids

    def _encode(self, text, bos=True):
        ids = []
        if text:
            ids.append(self.index[b" "])  # the dummy prefix
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.index:
                ids.append(self.index[b])
            else:
                ids.extend(x + 3 for x in b)
        return ([self.bos_token_id] if bos else []) + self._merge(ids)

    def _merge(self, ids):
        while True:
            best, at = -1e10, -1
            for i in range(len(ids) - 1):
                j = self.index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if j is not None and self.scores[j] > best:
                    best, at = self.scores[j], i
            if at < 0:
                break
            ids[at:at + 2] = [self.index[self.pieces[ids[at]] + self.pieces[ids[at + 1]]]]
        return ids

    def decode(self, ids):
        out = b""
        prev = None
        for t in ids:
            if t in (self.bos_token_id, self.eos_token_id):
                prev = t
                continue
            p = self.pieces[t]
            if prev == self.bos_token_id and p.startswith(b" "):
                p = p[1:]
            if p.startswith(b"<0x") and p.endswith(b">") and len(p) == 6:
                p = bytes([int(p[3:5], 16)])
            out += p
            prev = t
        return out.decode("utf-8", errors="replace")


def load(folder_or_bin):
    """(model, tokenizer) for a llama2.c .bin (tok*.bin beside it)."""
    m = load_model(folder_or_bin)
    d = os.path.dirname(folder_or_bin)
    toks = sorted(f for f in os.listdir(d) if f.startswith("tok") and f.endswith(".bin"))
    if not toks:
        raise FileNotFoundError(f"no tok*.bin beside {folder_or_bin}")
    return m, Tokenizer(os.path.join(d, toks[0]), m.config.vocab_size)
