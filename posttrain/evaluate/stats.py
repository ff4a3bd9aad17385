"""The evaluation's figures, pure: length spread, ROUGE, the variance ratio's bootstrap
interval, per-model summaries and cross-model comparisons of the sample rows."""
from __future__ import annotations

import re
import statistics

import numpy as np



def length_summary(values) -> dict:
    """mean, var (population), std, p5, p50, p95 of a list of lengths: the one length
    spread every stage logs and the report states."""
    x = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "var": float(x.var()), "std": float(x.std()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def rouge(predictions: list[str], references: list[str]) -> list[dict]:
    """ROUGE-1/2/L F-measures in points (0-100) of each prediction against its reference
    (rouge-score, Porter stemming, as in the summarization literature)."""
    from rouge_score import rouge_scorer  # heavy (nltk): loaded when scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = []
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        out.append({k: 100.0 * s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
    return out


def relative_variance(x) -> float:
    """var / mean^2, the squared coefficient of variation: the spread a change of scale
    alone (every length times the same factor) does not move."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.var() / max(x.mean() ** 2, 1e-9))


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0,
                    relative: bool = False) -> tuple:
    """95% bootstrap interval of var(a) / var(b) (`relative`: of relative_variance(a) /
    relative_variance(b)), each resampled with replacement; the same draws either way."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def spread(x):
        draws = x[rng.integers(0, len(x), (n, len(x)))]
        v = draws.var(axis=1)
        return v / np.maximum(draws.mean(axis=1) ** 2, 1e-9) if relative else v
    va = spread(a)
    vb = spread(b)
    ratios = np.sort(va / np.maximum(vb, 1e-9))
    return float(ratios[int(0.025 * n)]), float(ratios[int(0.975 * n) - 1])


def bootstrap_mean(x: list[float], n: int = 2000, seed: int = 0) -> tuple:
    """95% bootstrap interval of the mean of x (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    means = np.sort(x[rng.integers(0, len(x), (n, len(x)))].mean(axis=1))
    return float(means[int(0.025 * n)]), float(means[int(0.975 * n) - 1])


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
