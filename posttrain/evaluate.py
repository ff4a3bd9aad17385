"""The evaluation stage: sample each policy on held-out prompts and compare them.

Reads `<out_dir>/sft/adapter` and `<out_dir>/rl/adapter` (as `eval.models` asks); writes
`<out_dir>/eval/`:
  prompts.jsonl   one row per held-out prompt: prompt, reference, subreddit, reference length
  samples.jsonl   one row per sample: model, prompt_index, completion, lengths, EOS/truncated,
                  abrupt ending, reward, ROUGE-1/2/L against the reference
  report.json     per model: length in chars and tokens (mean, var, std, p5, p50, p95), EOS and
                  truncation rates, abrupt-ending rate, ROUGE, and for `rl` the per-token KL to
                  the SFT policy on its own samples; across models the SFT/RL variance ratio
                  (95% bootstrap interval), the mean change and the ROUGE-L difference
  report.md       the same as a table
Every model samples the same prompts with the same seeds (batch b uses one seed for all), so
differences come from the policies. Finished batches go to `parts/`: a killed run resumes.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain import modeling, objectives as O, rewards
from posttrain.config import Config, ConfigError, record_config
from posttrain.data import DataError, round_length
from posttrain.generate import cue_prompts, heldout_rows, sample_records
from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.rewards import is_abrupt  # the one ending rule (the reward uses it too)


# ---------------------------------------------------------------- metrics (pure)

def length_summary(values) -> dict:
    """mean, var (population), std, p5, p50, p95 of a list of lengths."""
    x = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "var": float(x.var()), "std": float(x.std()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def rouge(predictions: list[str], references: list[str]) -> list[dict]:
    """ROUGE-1/2/L F-measures in points (0-100) of each prediction against its reference
    (rouge-score, Porter stemming, as in the summarization literature)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = []
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        out.append({k: 100.0 * s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
    return out


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple:
    """95% bootstrap interval of var(a) / var(b), each resampled with replacement."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va = a[rng.integers(0, len(a), (n, len(a)))].var(axis=1)
    vb = b[rng.integers(0, len(b), (n, len(b)))].var(axis=1)
    ratios = np.sort(va / np.maximum(vb, 1e-9))
    return float(ratios[int(0.025 * n)]), float(ratios[int(0.975 * n) - 1])


def summarize(samples: list[dict]) -> dict:
    """One model's figures from its sample rows."""
    n = len(samples)
    out = {"n": n,
           "length_chars": length_summary([s["length_chars"] for s in samples]),
           "length_tokens": length_summary([s["length_tokens"] for s in samples]),
           "eos_rate": sum(s["ended_with_eos"] for s in samples) / n,
           "truncation_rate": sum(s["truncated"] for s in samples) / n,
           "abrupt_rate": sum(s["abrupt"] for s in samples) / n,
           "reward_mean": statistics.fmean(s["reward"] for s in samples)}
    for k in ("rouge1", "rouge2", "rougeL"):
        out[k] = statistics.fmean(s[k] for s in samples)
    return out


def compare(models: dict, samples: list[dict], n_boot: int, seed: int) -> dict:
    """Cross-model figures: SFT/RL variance ratio with its interval, mean change, ROUGE-L
    difference (RL minus SFT, in points)."""
    if "sft" not in models or "rl" not in models:
        return {}
    sft, rl = models["sft"], models["rl"]
    a = [s["length_chars"] for s in samples if s["model"] == "sft"]
    b = [s["length_chars"] for s in samples if s["model"] == "rl"]
    return {"variance_ratio": sft["length_chars"]["var"] / max(rl["length_chars"]["var"], 1e-9),
            "variance_ratio_ci95": list(bootstrap_ratio(a, b, n_boot, seed)),
            "mean_change": rl["length_chars"]["mean"] / sft["length_chars"]["mean"] - 1,
            "rougeL_diff": rl["rougeL"] - sft["rougeL"]}


def by_target(samples: list[dict]) -> dict:
    """Per model and requested length: n, achieved mean, std, mean absolute error to the
    request, and ROUGE-L."""
    out: dict = {}
    for s in samples:
        out.setdefault(s["model"], {}).setdefault(str(s["target"]), []).append(s)
    table = {}
    for m, per in out.items():
        table[m] = {}
        for t, group in sorted(per.items(), key=lambda kv: float(kv[0])):
            x = np.asarray([g["length_chars"] for g in group], dtype=np.float64)
            table[m][t] = {"n": len(group), "mean": float(x.mean()), "std": float(x.std()),
                           "mae": float(np.abs(x - float(t)).mean()),
                           "rougeL": statistics.fmean(g["rougeL"] for g in group)}
    return table


def subreddit(prompt: str) -> str:
    m = re.search(r"SUBREDDIT:\s*r/(\S+)", prompt)
    return m.group(1) if m else ""


# ---------------------------------------------------------------- sampling

def _policy_context(model, name: str, has_rl: bool):
    """The context under which `model` is the named policy."""
    if name == "base":  # eval.models=[base] alone loads the bare model: no adapter to disable
        return model.disable_adapter() if hasattr(model, "disable_adapter") else \
            contextlib.nullcontext()
    if name == "sft" and has_rl:
        return modeling.sft_only(model)
    return contextlib.nullcontext()


@torch.no_grad()
def kl_to_sft(model, records: list[dict], pad_id: int, device, dtype, batch_prompts: int) -> dict:
    """Per-token KL(rl || sft) on the RL policy's own samples: both log-probs from the same
    forward path (RL adapter on, then off), so a numeric floor cancels. k3 and k1 estimates."""
    from posttrain.rl import policy_logprobs

    groups = {}
    for i, r in enumerate(records):  # a prompt asked for different lengths is another prompt
        groups.setdefault((r["group"], r.get("target")), []).append(i)
    groups = list(groups.values())
    k3, k1, n = 0.0, 0.0, 0
    for s in range(0, len(groups), batch_prompts):
        chunk = groups[s:s + batch_prompts]
        with modeling.autocast(device, dtype):
            new = policy_logprobs(model, records, chunk, pad_id, device, share_prompt=True).float()
            with modeling.sft_only(model):
                ref = policy_logprobs(model, records, chunk, pad_id, device, share_prompt=True).float()
        k3 += O.kl_k3(new, ref).sum().item()
        k1 += O.kl_k1(new, ref).sum().item()
        n += new.numel()
    return {"kl_k3": k3 / max(n, 1), "kl_k1": k1 / max(n, 1)}


def eval_targets(cfg: Config) -> list:
    """The lengths to ask for: [None] for plain prompts; eval.targets (or the middle of
    rl.target_range) for length-conditioned ones."""
    if not cfg.data.length_cue:
        return [None]
    wanted = cfg.eval.targets or [sum(cfg.rl.target_range) / 2]
    return [round_length(t, cfg.data) for t in wanted]


def _load_models(cfg: Config, device):
    sft_dir, rl_dir = cfg.run_dir / "sft" / "adapter", cfg.run_dir / "rl" / "adapter"
    wanted = set(cfg.eval.models)
    if "rl" in wanted and not (rl_dir / "adapter_config.json").is_file():
        raise ConfigError(f"eval.models includes 'rl' but {rl_dir} has no adapter; run "
                          "`posttrain rl` first or set eval.models=[base,sft]")
    if wanted == {"base"}:
        return modeling.load_base_model(cfg.model, device), False
    return modeling.load_policy(cfg, device, sft_dir, rl=rl_dir if "rl" in wanted else None), "rl" in wanted


def _reward_lengths(cfg: Config, samples: list[dict]) -> list[float]:
    """The lengths the reward takes its statistics from: the generated set offline RL
    trained on, else the SFT samples here, else all samples."""
    ds = cfg.run_dir / "generate" / "dataset"
    if cfg.rl.mode == "offline" and ds.is_dir():
        import datasets
        return datasets.load_from_disk(str(ds))["length_" + cfg.reward.unit]
    own = [s for s in samples if s["model"] == "sft"] or samples
    return [s["length_" + cfg.reward.unit] for s in own]


def run(cfg: Config) -> dict:
    """Sample, score and compare; returns the report (also written to eval/report.json)."""
    out, e = cfg.run_dir / "eval", cfg.eval
    if (out / "report.json").is_file():
        print(f"eval: already finished in {out} "
              "(--force evaluates again, keeping it until the new report is written)")
        return json.loads((out / "report.json").read_text())
    device = modeling.resolve_device(cfg.model)
    dtype = modeling.compute_dtype(cfg.model, device)
    sft_dir = cfg.run_dir / "sft" / "adapter"
    tokenizer = modeling.load_tokenizer(cfg.model, str(sft_dir) if sft_dir.is_dir() else None)
    rows, ids = heldout_rows(e.prompts or cfg.data.eval, e.prompts_split or cfg.data.eval_split,
                             tokenizer, cfg)
    end = None if e.num_prompts is None else e.skip_prompts + e.num_prompts
    rows, ids = rows[e.skip_prompts:end], ids[e.skip_prompts:end]
    if not rows:
        raise DataError(f"eval: no held-out prompt left after eval.skip_prompts="
                        f"{e.skip_prompts} (the source has fewer rows that fit)")
    texts = [r["prompt"] for r in rows]
    bs = e.batch_size or cfg.generate.batch_size
    max_new = e.max_new_tokens or cfg.generate.max_new_tokens
    model, has_rl = _load_models(cfg, device)
    model.eval()

    # 1. sample every model on the same prompts, batch b with the same seed for all (and,
    #    with length-conditioned prompts, at every requested length)
    targets = eval_targets(cfg)
    parts = out / "parts"
    batches = list(range(0, len(ids), bs))
    bar = tqdm(total=len(batches) * len(e.models) * len(targets), desc="eval", unit="batch")
    kl, all_recs = {}, []
    for name in e.models:
        recs = []
        with _policy_context(model, name, has_rl), \
                modeling.sampler(model, cfg.model, device, dtype) as policy:
            for target in targets:
                for b, s in enumerate(batches):
                    part = parts / f"{name}-{target or 'plain'}-{b:05d}.jsonl"
                    if not part.is_file():
                        want = [target] * len(texts[s:s + bs])
                        p_texts, p_ids = ((texts[s:s + bs], ids[s:s + bs]) if target is None else
                                          cue_prompts(texts[s:s + bs], want, tokenizer, cfg))
                        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + 77 + b)
                        batch = sample_records(policy, tokenizer, p_texts, p_ids,
                                               e.samples_per_prompt, max_new, gen, e.temperature,
                                               e.top_p, want)
                        for r in batch:
                            r["group"] += s
                        record_config(cfg, "eval")  # with the first output, not before
                        atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in batch))
                    recs += [json.loads(line) for line in part.read_text().splitlines()]
                    bar.update(1)
        # 2. the RL policy's KL to SFT on its own samples
        if name == "rl":
            scored = [r for r in recs if e.kl_prompts is None or r["group"] < e.kl_prompts]
            kl = kl_to_sft(model, scored, tokenizer.pad_token_id, device, dtype, bs)
            kl["kl_samples"] = len(scored)
        for r in recs:
            r["model"] = name
        all_recs += recs
    bar.close()
    report = finish(cfg, rows, all_recs, kl)
    shutil.rmtree(parts, ignore_errors=True)
    return report


def finish(cfg: Config, rows: list[dict], recs: list[dict], kl: dict) -> dict:
    """Score the samples, write samples.jsonl, prompts.jsonl, report.json and report.md."""
    out, e = cfg.run_dir / "eval", cfg.eval
    refs = [r["completion"].strip() for r in rows]
    scores = rouge([r["completion"] for r in recs], [refs[r["group"]] for r in recs])
    samples = []
    for r, sc in zip(recs, scores):
        samples.append({"model": r["model"], "prompt_index": r["group"],
                        "completion": r["completion"], "length_chars": r["length_chars"],
                        "length_tokens": r["length_tokens"], "ended_with_eos": r["ended_with_eos"],
                        "truncated": r["truncated"], "target": r.get("target"),
                        "abrupt": is_abrupt(r["completion"], r["truncated"]), **sc})
    set_lengths = _reward_lengths(cfg, samples)
    targets = [s["target"] for s in samples]
    rew = rewards.compute([s["length_" + cfg.reward.unit] for s in samples], set_lengths,
                          cfg.reward, None if None in targets else targets,
                          [s["abrupt"] for s in samples]).tolist()
    for s, w in zip(samples, rew):
        s["reward"] = w
    prompts = [{"prompt_index": i, "prompt": r["prompt"], "reference": refs[i],
                "subreddit": subreddit(r["prompt"]), "reference_length_chars": len(refs[i])}
               for i, r in enumerate(rows)]
    models = {m: summarize([s for s in samples if s["model"] == m]) for m in e.models}
    if "rl" in models:
        models["rl"].update(kl)
    report = {"models": models,
              "reference": {"n": len(refs), "length_chars": length_summary([len(r) for r in refs]),
                            "abrupt_rate": statistics.fmean(is_abrupt(r, False) for r in refs)},
              "prompts": len(rows), "samples_per_prompt": e.samples_per_prompt,
              "max_new_tokens": e.max_new_tokens or cfg.generate.max_new_tokens,
              "temperature": e.temperature, "top_p": e.top_p,
              **compare(models, samples, e.bootstrap, cfg.seed)}
    if None not in targets:  # length-conditioned: the pooled spread mixes requests
        report["by_target"] = by_target(samples)
    record_config(cfg, "eval")
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
