"""The evaluation's outputs: scored sample rows, prompts, report.json and report.md."""
from __future__ import annotations

import json
import statistics

from posttrain import provenance, rewards, seeds
from posttrain.config import Config
from posttrain.evaluate.frontier import best_of_n_table, frontier_match, ratio_at_kl
from posttrain.evaluate.stats import (bootstrap_mean, by_target, compare, length_summary, rouge,
                                      subreddit, summarize)
from posttrain.io import InputFileError, atomic_write_json, atomic_write_text, read_json
from posttrain.objectives import best_of_n_kl
from posttrain.rewards import is_abrupt  # the one ending rule (the reward uses it too)
from posttrain.rollout.store import set_lengths


def reward_lengths(cfg: Config, samples: list[dict]) -> tuple[list, str]:
    """The lengths the reward takes its statistics from, and where they come from: the ones
    RL trained with (rl/reward_lengths.json: the generated set, or the first online round's
    samples), else the generated set, else the SFT samples here, else all samples."""
    stored = cfg.run_dir / "rl" / "reward_lengths.json"
    if stored.is_file():
        got = read_json(stored, "redo the rl stage (`posttrain rl --force`)")
        lengths = got.get("lengths")
        if (got.get("unit") != cfg.reward.unit or not isinstance(lengths, list) or not lengths
                or not all(isinstance(x, (int, float)) for x in lengths)):
            raise InputFileError(f"{stored}: expected 'unit': {cfg.reward.unit!r} and "
                                 "'lengths': a non-empty list of numbers; redo the rl stage "
                                 "(`posttrain rl --force`)")
        return lengths, f"RL's reward ({got.get('from', 'rl/reward_lengths.json')})"
    if cfg.rl.mode == "offline" and (cfg.run_dir / "generate" / "dataset").is_dir():
        return set_lengths(cfg.run_dir, cfg.reward.unit), "the generated set"
    own = [s for s in samples if s["model"] == "sft"]
    return ([s["length_" + cfg.reward.unit] for s in own or samples],
            "the SFT samples here" if own else "all samples here")


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
    lengths, _ = reward_lengths(cfg, samples)
    targets = [s["target"] for s in samples]
    rew = rewards.compute([s["length_" + cfg.reward.unit] for s in samples], lengths,
                          cfg.reward, None if None in targets else targets,
                          [s["abrupt"] for s in samples]).tolist()
    for s, w in zip(samples, rew):
        s["reward"] = w
    return samples


def frontier_report(models: dict, samples: list[dict], kl: dict, budget_n: int) -> dict:
    """Each model's best-of-N table from its own samples (ratios against SFT's variance),
    and where RL stands against the SFT's: the N whose ratio RL matches, the KL that N
    costs, RL's KL per summary beside it, and the SFT's ratio at RL's KL."""
    sft_var = models["sft"]["length_chars"]["var"] if "sft" in models else None
    out = {"budget": {"n": budget_n, "kl_per_summary": best_of_n_kl(budget_n)},
           "tables": {m: best_of_n_table([s for s in samples if s["model"] == m], sft_var)
                      for m in models}}
    if "sft" in models and "rl" in models and kl:
        sft_table = out["tables"]["sft"]
        ratio = sft_var / max(models["rl"]["length_chars"]["var"], 1e-9)
        match = frontier_match(sft_table, ratio)
        out["rl"] = {"ratio": ratio, "kl_per_summary": kl["kl_k3_summary"],
                     "matches_n": match["n"], "matches_kl": match["kl"],
                     "beyond_frontier": match["beyond"],
                     "kl_over_match": kl["kl_k3_summary"] / max(match["kl"], 1e-9),
                     "sft_ratio_at_rl_kl": ratio_at_kl(sft_table, kl["kl_k3_summary"])}
    return out


def build_report(cfg: Config, rows: list[dict], refs: list[str], samples: list[dict],
                 kl: dict) -> dict:
    """Per model, the reference summaries, and across models (with SFT and RL) the
    variance ratio and its interval, the KL per summary with its interval, and the best-of-N
    frontier; by requested length for length-conditioned prompts."""
    e = cfg.eval
    models = {m: summarize([s for s in samples if s["model"] == m]) for m in e.models}
    kl = dict(kl)
    per_summary = kl.pop("per_summary_k3", None)
    if per_summary:
        kl["kl_k3_summary_ci95"] = list(bootstrap_mean(per_summary, e.bootstrap,
                                                       seeds.bootstrap(cfg.seed)))
    if "rl" in models:
        models["rl"].update(kl)
    report = {"models": models,
              "reference": {"n": len(refs), "length_chars": length_summary([len(r) for r in refs]),
                            "abrupt_rate": statistics.fmean(is_abrupt(r, False) for r in refs)},
              "prompts": len(rows), "samples_per_prompt": e.samples_per_prompt,
              "max_new_tokens": e.max_new_tokens or cfg.generate.max_new_tokens,
              "temperature": e.temperature, "top_p": e.top_p,
              **compare(models, samples, e.bootstrap, seeds.bootstrap(cfg.seed))}
    lengths, source = reward_lengths(cfg, samples)   # what the samples' reward column used
    report["reward_statistics"] = {"from": source, "unit": cfg.reward.unit, "n": len(lengths),
                                   **length_summary(lengths)}
    if None not in [s["target"] for s in samples]:  # length-conditioned: pooled spreads mix
        report["by_target"] = by_target(samples)
    else:
        report["frontier"] = frontier_report(models, samples, kl, cfg.rl.best_of_n)
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
            "| abrupt | ROUGE-1 | ROUGE-2 | ROUGE-L | KL k3 / token | KL k1 / token "
            "| KL k3 / summary | KL k1 / summary |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in report["models"].items():
        c = m["length_chars"]
        kl = (f"{m['kl_k3']:.4f} | {m['kl_k1']:.4f} | {m['kl_k3_summary']:.3f} | "
              f"{m['kl_k1_summary']:.3f}" if "kl_k3" in m else "- | - | - | -")
        lines.append(f"| {name} | {m['n']} | {c['mean']:.1f} | {c['var']:.0f} | {c['std']:.1f} | "
                     f"{c['p5']:.0f} | {c['p50']:.0f} | {c['p95']:.0f} | "
                     f"{m['length_tokens']['mean']:.1f} | {m['eos_rate']:.2f} | "
                     f"{m['truncation_rate']:.2f} | {m['abrupt_rate']:.2f} | {m['rouge1']:.1f} | "
                     f"{m['rouge2']:.1f} | {m['rougeL']:.1f} | {kl} |")
    ref = report["reference"]
    c = ref["length_chars"]
    lines.append(f"| reference | {ref['n']} | {c['mean']:.1f} | {c['var']:.0f} | {c['std']:.1f} | "
                 f"{c['p5']:.0f} | {c['p50']:.0f} | {c['p95']:.0f} | - | - | - | "
                 f"{ref['abrupt_rate']:.2f} | - | - | - | - | - | - | - |")
    text = "\n".join(lines) + "\n"
    if "variance_ratio" in report and "by_target" not in report:
        lo, hi = report["variance_ratio_ci95"]
        text += (f"\nVariance ratio SFT/RL: **{report['variance_ratio']:.2f}** (95% bootstrap "
                 f"{lo:.2f}-{hi:.2f}); RL mean {100 * report['mean_change']:+.1f}% vs SFT; "
                 f"ROUGE-L RL - SFT: {report['rougeL_diff']:+.2f} points.\n")
    if "reward_statistics" in report:
        r = report["reward_statistics"]
        text += (f"\nThe reward column scores lengths against {r['from']}: {r['n']} lengths, "
                 f"{r['mean']:.1f} ± {r['std']:.1f} {r['unit']}.\n")
    if "frontier" in report:
        text += frontier_markdown(report)
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


def frontier_markdown(report: dict) -> str:
    """The best-of-N tables and RL's distance to the SFT's frontier, as markdown."""
    f = report["frontier"]
    budget = f["budget"]
    text = ("\nBest-of-N from each model's own samples: per prompt the sample with the highest "
            "reward, averaged over every N-subset of its samples; KL bound log N - (N-1)/N nats "
            "per summary (of the selection from that model: for RL, on top of RL's own KL); "
            "ratio: SFT's variance over the selection's.\n\n"
            "| model | N | KL bound / summary | mean | var | SFT/BoN ratio | abrupt | ROUGE-L |\n"
            "|---|---|---|---|---|---|---|---|\n")
    for model, rows in f["tables"].items():
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            text += (f"| {model} | {r['n']} | {r['kl_bound']:.2f} | {r['mean']:.1f} | "
                     f"{r['var']:.0f} | {ratio} | {r['abrupt_rate']:.3f} | {r['rougeL']:.1f} |\n")
    rl = f.get("rl")
    if rl is not None:
        lo, hi = report["models"]["rl"]["kl_k3_summary_ci95"]
        where = (f"beyond the SFT's best-of-{rl['matches_n']:.0f}" if rl["beyond_frontier"] else
                 f"the SFT's best-of-{rl['matches_n']:.1f}, which costs at most "
                 f"{rl['matches_kl']:.2f} nats")
        at = ("" if rl["sft_ratio_at_rl_kl"] is None else
              f" At RL's KL the SFT's best-of-N cuts the spread {rl['sft_ratio_at_rl_kl']:.2f}x.")
        text += (f"\nRL against the frontier: ratio {rl['ratio']:.2f} at "
                 f"{rl['kl_per_summary']:.3f} nats per summary (k3, 95% {lo:.3f}-{hi:.3f}); it "
                 f"matches {where}: RL spends {rl['kl_over_match']:.1f}x the KL selection needs "
                 f"for its cut.{at} Budget: best-of-{budget['n']}'s "
                 f"{budget['kl_per_summary']:.3f} nats per summary.\n")
    return text
