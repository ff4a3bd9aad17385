"""The evaluation's outputs: scored sample rows, prompts, report.json and report.md."""
from __future__ import annotations

import json
import statistics

from posttrain import provenance, rewards, seeds
from posttrain.config import Config
from posttrain.evaluate.metrics import (by_target, compare, length_summary, rouge, subreddit,
                                        summarize)
from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.rewards import is_abrupt  # the one ending rule (the reward uses it too)
from posttrain.rollout.store import set_lengths


def _reward_lengths(cfg: Config, samples: list[dict]) -> list[float]:
    """The lengths the reward takes its statistics from: the generated set offline RL
    trained on, else the SFT samples here, else all samples."""
    if cfg.rl.mode == "offline" and (cfg.run_dir / "generate" / "dataset").is_dir():
        return set_lengths(cfg.run_dir, cfg.reward.unit)
    own = [s for s in samples if s["model"] == "sft"] or samples
    return [s["length_" + cfg.reward.unit] for s in own]


def sample_rows(cfg: Config, recs: list[tuple], refs: list[str]) -> list[dict]:
    """One row per (model, Rollout): lengths, ending, ROUGE against the reference, reward."""
    scores = rouge([r.completion for _, r in recs], [refs[r.group] for _, r in recs])
    samples = []
    for (model, r), sc in zip(recs, scores):
        samples.append({"model": model, "prompt_index": r.group,
                        "completion": r.completion, "length_chars": r.length_chars,
                        "length_tokens": r.length_tokens, "ended_with_eos": r.ended_with_eos,
                        "truncated": r.truncated, "target": r.target,
                        "abrupt": is_abrupt(r.completion, r.truncated), **sc})
    lengths = _reward_lengths(cfg, samples)
    targets = [s["target"] for s in samples]
    rew = rewards.compute([s["length_" + cfg.reward.unit] for s in samples], lengths,
                          cfg.reward, None if None in targets else targets,
                          [s["abrupt"] for s in samples]).tolist()
    for s, w in zip(samples, rew):
        s["reward"] = w
    return samples


def build_report(cfg: Config, rows: list[dict], refs: list[str], samples: list[dict],
                 kl: dict) -> dict:
    """Per model, the reference summaries, and across models (with SFT and RL) the
    variance ratio and its interval; by requested length for length-conditioned prompts."""
    e = cfg.eval
    models = {m: summarize([s for s in samples if s["model"] == m]) for m in e.models}
    if "rl" in models:
        models["rl"].update(kl)
    report = {"models": models,
              "reference": {"n": len(refs), "length_chars": length_summary([len(r) for r in refs]),
                            "abrupt_rate": statistics.fmean(is_abrupt(r, False) for r in refs)},
              "prompts": len(rows), "samples_per_prompt": e.samples_per_prompt,
              "max_new_tokens": e.max_new_tokens or cfg.generate.max_new_tokens,
              "temperature": e.temperature, "top_p": e.top_p,
              **compare(models, samples, e.bootstrap, seeds.bootstrap(cfg.seed))}
    if None not in [s["target"] for s in samples]:  # length-conditioned: pooled spreads mix
        report["by_target"] = by_target(samples)
    return report


def finish(cfg: Config, rows: list[dict], recs: list[tuple], kl: dict) -> dict:
    """Score the samples ((model, Rollout) pairs), write samples.jsonl, prompts.jsonl,
    report.json and report.md."""
    out = cfg.run_dir / "eval"
    refs = [r["completion"].strip() for r in rows]
    samples = sample_rows(cfg, recs, refs)
    prompts = [{"prompt_index": i, "prompt": r["prompt"], "reference": refs[i],
                "subreddit": subreddit(r["prompt"]), "reference_length_chars": len(refs[i])}
               for i, r in enumerate(rows)]
    report = build_report(cfg, rows, refs, samples, kl)
    provenance.record_config(cfg, "eval")
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    atomic_write_text(out / "report.md", report_markdown(report))
    atomic_write_json(out / "report.json", report)
    print(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    head = ("| model | n | mean chars | var | std | p5 | p50 | p95 | mean tokens | EOS | truncated "
            "| abrupt | ROUGE-1 | ROUGE-2 | ROUGE-L | KL k3 | KL k1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in report["models"].items():
        c = m["length_chars"]
        kl = (f"{m['kl_k3']:.4f} | {m['kl_k1']:.4f}" if "kl_k3" in m else "- | -")
        lines.append(f"| {name} | {m['n']} | {c['mean']:.1f} | {c['var']:.0f} | {c['std']:.1f} | "
                     f"{c['p5']:.0f} | {c['p50']:.0f} | {c['p95']:.0f} | "
                     f"{m['length_tokens']['mean']:.1f} | {m['eos_rate']:.2f} | "
                     f"{m['truncation_rate']:.2f} | {m['abrupt_rate']:.2f} | {m['rouge1']:.1f} | "
                     f"{m['rouge2']:.1f} | {m['rougeL']:.1f} | {kl} |")
    ref = report["reference"]
    c = ref["length_chars"]
    lines.append(f"| reference | {ref['n']} | {c['mean']:.1f} | {c['var']:.0f} | {c['std']:.1f} | "
                 f"{c['p5']:.0f} | {c['p50']:.0f} | {c['p95']:.0f} | - | - | - | "
                 f"{ref['abrupt_rate']:.2f} | - | - | - | - | - |")
    text = "\n".join(lines) + "\n"
    if "variance_ratio" in report and "by_target" not in report:
        lo, hi = report["variance_ratio_ci95"]
        text += (f"\nVariance ratio SFT/RL: **{report['variance_ratio']:.2f}** (95% bootstrap "
                 f"{lo:.2f}-{hi:.2f}); RL mean {100 * report['mean_change']:+.1f}% vs SFT; "
                 f"ROUGE-L RL - SFT: {report['rougeL_diff']:+.2f} points.\n")
    if "by_target" in report:
        text += ("\n| model | asked (chars) | n | mean | std | mean abs. error | ROUGE-L |\n"
                 "|---|---|---|---|---|---|---|\n")
        for m, per in report["by_target"].items():
            for t, r in per.items():
                text += (f"| {m} | {t} | {r['n']} | {r['mean']:.1f} | {r['std']:.1f} | "
                         f"{r['mae']:.1f} | {r['rougeL']:.1f} |\n")
    text += (f"\n{report['prompts']} held-out prompts x {report['samples_per_prompt']} samples per "
             f"model, temperature {report['temperature']}, top_p {report['top_p']}, up to "
             f"{report['max_new_tokens']} new tokens. Abrupt: truncated, ending in an ellipsis, "
             "or without closing punctuation.\n")
    return text
