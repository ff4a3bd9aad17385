"""Sampling throughput: posttrain's sampler against plain `model.generate`.

    python bench/generation.py --config configs/demo.yaml [--prompts 8 --group 8] [key=value ...]

Uses the SFT adapter of the run directory and the first `--prompts` prompts of data.train.
Prints new tokens/s for:
  generate      transformers' model.generate, num_return_sequences=G (prompt repeated G times)
  ours          posttrain.sampling.sample: one prompt pass shared by the G samples, finished
                rows leave the batch (LoRA unmerged, as in RL evaluation)
  ours-merged   the same with the SFT adapter merged into the weights (the generate stage)
"""
from __future__ import annotations

import argparse
import time

import torch

from posttrain import modeling, sampling
from posttrain.config import load_config
from posttrain.generate import prompt_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, tuple(args.overrides))
    device = modeling.resolve_device(cfg.model)
    dtype = modeling.compute_dtype(cfg.model, device)
    tok = modeling.load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter"))
    _, ids = prompt_pool(cfg.data.train, cfg.data.train_split, tok, cfg)
    ids = ids[:args.prompts]
    model = modeling.load_policy(cfg, device, cfg.run_dir / "sft" / "adapter").eval()
    max_new = cfg.generate.max_new_tokens

    def ours(m):
        gen = torch.Generator(device=device).manual_seed(0)
        s = sampling.sample(m, ids, args.group, max_new, tok.eos_token_id, tok.pad_token_id, gen)
        return sum(len(x.token_ids) for x in s)

    def hf_generate(m):
        torch.manual_seed(0)
        tok.padding_side = "left"
        batch = tok.pad({"input_ids": ids}, return_tensors="pt").to(device)
        out = m.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         max_new_tokens=max_new, num_return_sequences=args.group,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        # count tokens up to and including the first EOS of each row
        ended = (new == tok.eos_token_id).int().cumsum(-1)
        return int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())

    rows = []
    with torch.no_grad(), modeling.autocast(device, dtype):
        for name, fn, m in (("generate", hf_generate, model), ("ours", ours, model)):
            t = time.perf_counter()
            n = fn(m)
            rows.append((name, n, time.perf_counter() - t))
        merged = model.merge_and_unload()
        t = time.perf_counter()
        n = ours(merged)
        rows.append(("ours-merged", n, time.perf_counter() - t))
    print(f"{len(ids)} prompts x {args.group} samples, up to {max_new} new tokens, {dtype}, {device}")
    print(f"{'path':12} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9}")
    for name, n, dt in rows:
        print(f"{name:12} {n:>10} {dt:>8.1f} {n / dt:>9.1f}")


if __name__ == "__main__":
    main()
