#!/usr/bin/env python3
"""One layer's CAKE score + select + compact written in PyTorch, as the reference does it.

Called by bench-score so both sides run in one session on the same cores. Llama-3.1-8B
shapes, bf16 keys/values/queries; prints "seconds T" (best of --reps) or one line saying
why it cannot run (no torch)."""
import argparse
import math
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--keep", type=int, default=992)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--what", default="all",
                    help="all: score+select+compact; score: scoring only; sdpa: a decode step's "
                         "attention over --layers layers of n tokens (scaled_dot_product_attention)")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch is not installed (pip install torch)")
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device")
        return 0
    H, Hkv, d, w, n = args.heads, args.kv_heads, args.head_dim, args.window, args.n
    G, S, gamma = H // Hkv, n - w, 200.0
    if args.what == "sdpa":
        return sdpa(torch, dev, args)
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    q = (torch.rand(1, H, w, d, generator=g) * 4 - 2).to(dt).to(dev)
    k = (torch.rand(1, Hkv, n, d, generator=g) * 2 - 1).to(dt).to(dev)
    v = (torch.rand(1, Hkv, n, d, generator=g) * 2 - 1).to(dt).to(dev)

    def layer(k, v):
        # CakeprefillKVCache scoring as the reference's attention forward computes it
        kr = k[:, :, None].expand(1, Hkv, G, n, d).reshape(1, H, n, d)  # repeat_kv
        attn = torch.matmul(q, kr.transpose(2, 3)) / math.sqrt(d)
        mask = torch.full((w, w), torch.finfo(attn.dtype).min, device=dev).triu(1)
        attn[:, :, :, -w:] += mask
        attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(dt)
        a_p = attn[..., :S]
        entropy = -(a_p.float() * torch.log(a_p.float() + 1e-10)).sum()
        variance = torch.var(a_p, dim=-2).sum()
        i0 = (attn.mean(dim=-2) + gamma * attn.var(dim=-2))[..., :S]
        pooled = F.avg_pool1d(i0, kernel_size=5, padding=2, stride=1)
        ind = pooled.view(1, Hkv, G, S).mean(dim=2)
        if args.what == "score":
            return entropy, variance, ind, None
        idx = ind.topk(args.keep, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, d)
        kc = torch.cat([k[:, :, :S].gather(2, idx), k[:, :, S:]], dim=2)
        vc = torch.cat([v[:, :, :S].gather(2, idx), v[:, :, S:]], dim=2)
        return entropy, variance, kc, vc

    best = math.inf
    with torch.no_grad():
        if dev.type == "cuda":  # device time by events, median of reps after warm-up
            for _ in range(3):
                layer(k, v)
            times = []
            for _ in range(max(args.reps, 5)):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                layer(k, v)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            best = sorted(times)[len(times) // 2]
        else:
            for _ in range(args.reps):
                t0 = time.perf_counter()
                e, var_, _, _ = layer(k, v)
                float(e), float(var_)
                best = min(best, time.perf_counter() - t0)
    print(f"seconds {best:.6f}")
    return 0


def sdpa(torch, dev, args):
    """One decode step's attention over every layer, as an engine calls SDPA per layer."""
    import torch.nn.functional as F
    H, Hkv, d, n, L = args.heads, args.kv_heads, args.head_dim, args.n, args.layers
    dt = torch.bfloat16
    ks = [torch.randn(1, Hkv, n, d, device=dev, dtype=dt) for _ in range(L)]
    vs = [torch.randn(1, Hkv, n, d, device=dev, dtype=dt) for _ in range(L)]
    q = torch.randn(1, H, 1, d, device=dev, dtype=dt)

    def step():
        for k, v in zip(ks, vs):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    with torch.no_grad():
        for _ in range(3):
            step()
        times = []
        for _ in range(max(args.reps, 5)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    print(f"seconds {sorted(times)[len(times) // 2]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
