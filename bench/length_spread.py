"""Length spread of the SFT and RL policies on held-out prompts, with bootstrap intervals.

    python bench/length_spread.py --config configs/demo.yaml [--prompts 50 --samples 4] [key=value ...]

Samples every held-out prompt of data.eval (same seeds and settings for both policies) and
prints mean, variance and std of the completion length in characters, EOS rate, and the
SFT/RL variance ratio with a 95% bootstrap interval. Writes bench/results/length_spread.json
under the run directory.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from posttrain import modeling
from posttrain.config import load_config
from posttrain.evaluate.stats import bootstrap_ratio
from posttrain.rollout import collect as C
from posttrain.rollout.prompts import prompt_pool
from posttrain.io import atomic_write_json


def sample_lengths(model, tokenizer, texts, ids, cfg, samples: int) -> list:
    device = modeling.resolve_device(cfg.model)
    dtype = modeling.compute_dtype(cfg.model, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    jobs = C.make_jobs(texts, ids, cfg.generate.batch_size, tokenizer, cfg)
    with modeling.autocast(device, dtype):
        return C.collect(jobs, C.hf_draw(model, tokenizer, samples, cfg.generate.max_new_tokens,
                                         1.0, 1.0), lambda job: gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, tuple(args.overrides))
    device = modeling.resolve_device(cfg.model)
    tokenizer = modeling.load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter"))
    texts, ids = prompt_pool(cfg.data.eval, cfg.data.eval_split, tokenizer, cfg)
    texts, ids = texts[:args.prompts], ids[:args.prompts]
    policy = modeling.load_policy(cfg, device, cfg.run_dir / "sft" / "adapter",
                                  rl=cfg.run_dir / "rl" / "adapter").eval()
    result = {}
    with torch.no_grad():
        with modeling.sft_only(policy):
            sft = sample_lengths(policy, tokenizer, texts, ids, cfg, args.samples)
        rl = sample_lengths(policy, tokenizer, texts, ids, cfg, args.samples)
    for name, recs in (("sft", sft), ("rl", rl)):
        chars = [r.length_chars for r in recs]
        result[name] = {"n": len(chars), "mean": statistics.fmean(chars),
                        "var": statistics.pvariance(chars), "std": statistics.pstdev(chars),
                        "eos_rate": sum(r.ended_with_eos for r in recs) / len(recs)}
    a = [r.length_chars for r in sft]
    b = [r.length_chars for r in rl]
    result["variance_ratio"] = result["sft"]["var"] / max(result["rl"]["var"], 1e-9)
    result["variance_ratio_ci95"] = bootstrap_ratio(a, b)
    result["mean_change"] = result["rl"]["mean"] / result["sft"]["mean"] - 1
    print(f"{'model':6} {'n':>4} {'mean':>7} {'var':>8} {'std':>6} {'eos':>5}")
    for name in ("sft", "rl"):
        r = result[name]
        print(f"{name:6} {r['n']:>4} {r['mean']:>7.1f} {r['var']:>8.0f} {r['std']:>6.1f} {r['eos_rate']:>5.2f}")
    lo, hi = result["variance_ratio_ci95"]
    print(f"variance ratio SFT/RL {result['variance_ratio']:.2f} (95% bootstrap {lo:.2f}-{hi:.2f}); "
          f"mean change {100 * result['mean_change']:+.1f}%")
    atomic_write_json(cfg.run_dir / "bench" / "length_spread.json", result)


if __name__ == "__main__":
    main()
