"""The RL completion pass's attention, forward + backward, by kernel: a micro-benchmark.

    python bench/attention_ab.py [--repeats 5]

SmolLM2-135M's heads (9 query heads sharing 3 key/value heads of 64), a completion pass of T
queries against a cache of P prompt positions (left-padded) plus its own T, under one
boolean mask. It times SDPA with `enable_gqa` (the flash kernel on CPU, what the step runs),
SDPA's math kernel, and an eager attention that folds each key/value head's query heads into
one matmul (no repeated keys), in fp32 and bf16, and prints each one's largest difference
from SDPA's fp32 output. Nothing here is a switch of the tool yet: it measures whether one
would pay before the step's rounding is changed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import machine_line

HEADS, KV_HEADS, DIM = 9, 3, 64
SHAPES = ((16, 96, 240), (16, 48, 240), (8, 96, 400), (32, 64, 240))   # (B, T, P)


def inputs(batch: int, new: int, prompt: int) -> tuple:
    """q, k, v (fp32, with gradients) and the pass's mask: all the prompt, causal after."""
    length = prompt + new
    q = torch.randn(batch, HEADS, new, DIM, requires_grad=True)
    k = torch.randn(batch, KV_HEADS, length, DIM, requires_grad=True)
    v = torch.randn(batch, KV_HEADS, length, DIM, requires_grad=True)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pad[b, : (b * 7) % 40] = True
    causal = torch.ones(new, new, dtype=torch.bool).tril()
    allow = torch.cat([torch.ones(new, prompt, dtype=torch.bool), causal], 1)[None, None]
    return q, k, v, allow & ~pad[:, None, None]


def flash(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def math(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def folded(q, k, v, mask):
    """Each key/value head's group of query heads as one (g*T, D) x (D, L) matmul."""
    batch, _, new, _ = q.shape
    group = HEADS // KV_HEADS
    scores = (q.reshape(batch, KV_HEADS, group * new, DIM) @ k.transpose(-1, -2))
    scores = scores.mul_(DIM ** -0.5).view(batch, KV_HEADS, group, new, -1)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, -1).view(batch, KV_HEADS, group * new, -1)
    return (probs @ v).view(batch, HEADS, new, DIM)


def seconds(fn, args, repeats: int) -> float:
    """Median forward + backward time over `repeats`, after one untimed call."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn(*args).float().square().sum().backward()
        times.append(time.perf_counter() - start)
        for a in args[:3]:
            a.grad = None
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"attention forward + backward on {machine_line()}, {torch.get_num_threads()} threads; "
          f"ms, median of {args.repeats}", flush=True)
    for batch, new, prompt in SHAPES:
        fp32 = inputs(batch, new, prompt)
        bf16 = [a.detach().bfloat16().requires_grad_() for a in fp32[:3]] + [fp32[3]]
        with torch.no_grad():
            ref = flash(*fp32)
            diff = {f"{n} {d}": (f(*a).float() - ref).abs().max().item()
                    for n, f in (("flash", flash), ("math", math), ("folded", folded))
                    for d, a in (("fp32", fp32), ("bf16", bf16))}
        row = {f"{n} {d}": seconds(f, a, args.repeats) * 1e3
               for n, f in (("flash", flash), ("math", math), ("folded", folded))
               for d, a in (("fp32", fp32), ("bf16", bf16))}
        print(f"B={batch} T={new} P={prompt}: " + ", ".join(
            f"{k} {v:.1f} ({diff[k]:.1e})" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
