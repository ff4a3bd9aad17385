"""The best-of-N frontier: what sampling N summaries and keeping the one with the highest
reward would give, for every N up to the samples drawn per prompt, from a model's own
evaluation samples; the yardstick of every RL result.

Best-of-N of a policy costs at most log N - (N-1)/N nats of KL per summary (the KL of
best-of-N sampling), so the SFT model's best-of-N table is the variance ratio each KL
budget buys by selection alone. The table is unbiased: per prompt it is the average over
every N-subset of the prompt's K samples, computed in closed form (the sample ranked i-th
of K by reward is a random N-subset's best with probability C(i, N-1) / C(K, N)), and the
prompts weigh the same. Ties in the reward go to the earlier sample.
"""
from __future__ import annotations

import math

import numpy as np

from posttrain.objectives import best_of_n_kl, best_of_n_weights

COLUMNS = ("length_chars", "abrupt", "rougeL")


def _by_prompt(samples: list[dict]) -> list[list[dict]]:
    per: dict = {}
    for s in samples:
        per.setdefault((s["prompt_index"], s.get("target")), []).append(s)
    return list(per.values())


def best_of_n_table(samples: list[dict], sft_var: float | None = None,
                    max_n: int | None = None) -> list[dict]:
    """One row per N = 1..K (K: the fewest samples any prompt has, or `max_n`): the mean and
    variance of the selected summaries' lengths, their abrupt rate and ROUGE-L, the KL bound
    log N - (N-1)/N, and with `sft_var` the ratio sft_var / variance. `samples` are one
    model's rows (prompt_index, reward, length_chars, abrupt, rougeL), in sample order."""
    prompts = _by_prompt(samples)
    k = min(len(p) for p in prompts)
    k = k if max_n is None else min(k, max_n)
    rows = []
    for n in range(1, k + 1):
        moments = {c: 0.0 for c in COLUMNS}
        square = 0.0
        for group in prompts:
            group = group[:k]
            # ascending by reward; among equal rewards the earlier sample ranks higher
            order = sorted(range(len(group)), key=lambda j: (group[j]["reward"], -j))
            w = best_of_n_weights(len(group), n).numpy()
            x = np.array([float(group[j]["length_chars"]) for j in order])
            square += float(w @ x ** 2)
            for c in COLUMNS:
                moments[c] += float(w @ np.array([float(group[j][c]) for j in order]))
        mean = {c: v / len(prompts) for c, v in moments.items()}
        var = square / len(prompts) - mean["length_chars"] ** 2
        row = {"n": n, "kl_bound": best_of_n_kl(n), "mean": mean["length_chars"],
               "var": var, "abrupt_rate": mean["abrupt"], "rougeL": mean["rougeL"]}
        if sft_var is not None:
            row["ratio"] = sft_var / max(var, 1e-9)
        rows.append(row)
    return rows


def frontier_match(frontier: list[dict], ratio: float) -> dict:
    """Where a variance ratio stands on a best-of-N frontier (rows with n, kl_bound and
    ratio, ratio rising with n): the N whose ratio it matches, interpolated linearly in
    log ratio between neighbouring N, and that N's KL bound interpolated the same way.
    `beyond` when it passes the largest N (n, kl_bound: that N's)."""
    if ratio >= frontier[-1]["ratio"]:
        last = frontier[-1]
        return {"n": float(last["n"]), "kl": last["kl_bound"], "beyond": True}
    for lo, hi in zip(frontier, frontier[1:]):
        if lo["ratio"] <= ratio < hi["ratio"]:
            t = (math.log(max(ratio, 1e-9)) - math.log(lo["ratio"])) / \
                (math.log(hi["ratio"]) - math.log(lo["ratio"]))
            return {"n": lo["n"] + t, "kl": lo["kl_bound"] + t * (hi["kl_bound"] - lo["kl_bound"]),
                    "beyond": False}
    return {"n": 1.0, "kl": 0.0, "beyond": False}   # at or below the model itself


def ratio_at_kl(frontier: list[dict], kl: float) -> float | None:
    """The frontier's variance ratio at a KL per summary, interpolated linearly in KL
    (in log ratio) between neighbouring N; None past the largest N's bound."""
    for lo, hi in zip(frontier, frontier[1:]):
        if lo["kl_bound"] <= kl <= hi["kl_bound"]:
            t = (kl - lo["kl_bound"]) / (hi["kl_bound"] - lo["kl_bound"])
            return math.exp(math.log(lo["ratio"]) + t * (math.log(hi["ratio"]) -
                                                         math.log(lo["ratio"])))
    return None
