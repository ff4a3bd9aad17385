import itertools
import math
import random

import numpy as np
import pytest

from posttrain.evaluate.frontier import best_of_n_table, frontier_match, ratio_at_kl
from posttrain.objectives import best_of_n_weights
from posttrain.rewards import is_abrupt


def _rows(k: int, prompts: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for p in range(prompts):
        for _ in range(k):
            length = rng.randint(40, 260)
            abrupt = rng.random() < 0.2
            reward = -1.0 if abrupt else 1 - abs(length - 150) / 60
            # ties: some rewards repeat within a prompt
            rows.append({"prompt_index": p, "length_chars": length, "abrupt": abrupt,
                         "rougeL": rng.uniform(5, 30), "reward": round(reward, 1)})
    return rows


def _brute_force(rows: list[dict], n: int) -> dict:
    """Every n-subset of every prompt's samples, its best (the earliest of equal rewards)."""
    per: dict = {}
    for r in rows:
        per.setdefault(r["prompt_index"], []).append(r)
    picked_by_prompt = []
    for group in per.values():
        picked = []
        for subset in itertools.combinations(range(len(group)), n):
            best = max(subset, key=lambda j: (group[j]["reward"], -j))
            picked.append(group[best])
        picked_by_prompt.append(picked)
    # prompts weigh the same: average within a prompt, then over prompts
    def avg(f):
        return float(np.mean([np.mean([f(x) for x in picked]) for picked in picked_by_prompt]))
    mean = avg(lambda x: x["length_chars"])
    return {"mean": mean, "var": avg(lambda x: x["length_chars"] ** 2) - mean ** 2,
            "abrupt_rate": avg(lambda x: float(x["abrupt"])), "rougeL": avg(lambda x: x["rougeL"])}


@pytest.mark.parametrize("k", [3, 5, 8])
def test_the_closed_form_equals_enumerating_every_subset(k):
    rows = _rows(k, prompts=6, seed=k)
    table = best_of_n_table(rows, sft_var=1000.0)
    assert [r["n"] for r in table] == list(range(1, k + 1))
    for row in table:
        expected = _brute_force(rows, row["n"])
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (row["n"], key)
        assert row["ratio"] == pytest.approx(1000.0 / expected["var"])
    # best-of-1 is the model itself
    x = np.array([r["length_chars"] for r in rows], dtype=float)
    assert table[0]["mean"] == pytest.approx(x.mean())
    assert table[0]["var"] == pytest.approx(x.var())


def test_the_weights_and_the_kl_bound():
    for k in range(1, 9):
        for n in range(1, k + 1):
            w = best_of_n_weights(k, n)
            assert w.sum().item() == pytest.approx(1.0)
            assert bool((w[:n - 1] == 0).all())           # too low a rank is never the best of n
    assert best_of_n_weights(5, 5)[-1].item() == 1.0         # all of them: the top one
    table = best_of_n_table(_rows(8, 2, 0))
    assert [round(r["kl_bound"], 3) for r in table] == [
        round(math.log(n) - (n - 1) / n, 3) for n in range(1, 9)]
    assert table[2]["kl_bound"] == pytest.approx(0.432, abs=1e-3)
    with pytest.raises(ValueError):
        best_of_n_weights(3, 4)


def test_selection_skips_an_abrupt_sample_that_is_closest_to_the_mean():
    # the abrupt sample sits right at the reward's centre, but the ending rule scores it -1
    texts = ["A clean summary that ends well.", "Cut off in the mid", "Another full one!"]
    lengths = [120, 150, 190]
    rows = []
    for j, (t, n) in enumerate(zip(texts, lengths)):
        abrupt = is_abrupt(t, False)
        reward = -1.0 if abrupt else 1 - abs(n - 150) / 50
        rows.append({"prompt_index": 0, "length_chars": n, "abrupt": abrupt, "rougeL": 10.0,
                     "reward": reward})
    assert [r["abrupt"] for r in rows] == [False, True, False]
    top = best_of_n_table(rows)[-1]                   # best of all 3
    assert top["mean"] == 120 and top["abrupt_rate"] == 0.0
    # best of 2: subsets {0,1} -> 0, {0,2} -> 0 (0.4 vs 0.2), {1,2} -> 2
    two = best_of_n_table(rows)[1]
    assert two["mean"] == pytest.approx((120 + 120 + 190) / 3)
    assert two["abrupt_rate"] == 0.0


def test_where_a_ratio_stands_on_the_frontier():
    frontier = [{"n": 1, "kl_bound": 0.0, "ratio": 1.0},
                {"n": 2, "kl_bound": 0.19, "ratio": 2.0},
                {"n": 3, "kl_bound": 0.43, "ratio": 8.0}]
    m = frontier_match(frontier, 4.0)                 # halfway in log ratio between 2 and 8
    assert m["n"] == pytest.approx(2.5) and m["kl"] == pytest.approx(0.31)
    assert not m["beyond"]
    assert frontier_match(frontier, 10.0) == {"n": 3.0, "kl": 0.43, "beyond": True}
    assert frontier_match(frontier, 0.8)["n"] == 1.0
    assert ratio_at_kl(frontier, 0.31) == pytest.approx(4.0)
    assert ratio_at_kl(frontier, 5.0) is None
