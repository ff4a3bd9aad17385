"""bench/throughput.py runs its cases on the tiny model and writes its table (a smoke test:
the figures themselves are measured on the real model, not asserted here)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY


@pytest.mark.slow
def test_throughput_bench_runs_each_kind_of_case(tiny_model_dir, tmp_path):
    script = Path(__file__).parents[2] / "bench" / "throughput.py"
    out = tmp_path / "bench.json"
    cases = "sft/fp32,generate/ours,generate/hf-generate,rl/ours,rl/naive"
    overrides = [o for o in TINY if not o.startswith(("sft.max_steps", "rl.max_steps"))]
    cmd = [sys.executable, str(script), "--config", "demo", "--steps", "1", "--warmup", "1",
           "--cases", cases, "--out", str(out), f"out_dir={tmp_path / 'run'}",
           f"model.name={tiny_model_dir}", *overrides, "rl.grad_accum=1", "sft.batch_size=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    table = json.loads(out.read_text())
    assert set(table["cases"]) == set(cases.split(","))
    for case, r in table["cases"].items():
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0 and 0 < r["mfu"], case
    assert "RL step, ours vs naive" in done.stdout
    assert table["peak_flops"]["fp32"] > 0
    naive = table["cases"]["rl/naive"]   # the same steps as ours: the paired ratio
    assert len(naive["step_times"]) == 1 and naive["paired_vs_ours"] > 0


@pytest.mark.slow
def test_recipe_bench_runs_variants_saves_and_skips(tiny_model_dir, tmp_path):
    """bench/rl_recipes.py on the tiny model: an offline and an online variant on one seed,
    each judged against the shared SFT; a re-run takes the saved results."""
    script = Path(__file__).parents[2] / "bench" / "rl_recipes.py"
    out = tmp_path / "recipes"
    cmd = [sys.executable, str(script), "--variants", "seed-offline,group-stop-end",
           "--seeds", "3", "--out", str(out), "--eval-prompts", "3", "--eval-samples", "2",
           f"model.name={tiny_model_dir}", *TINY, "rl.iterations=2", "rl.grad_accum=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("seed-offline", "group-stop-end"):
        r = json.loads((out / "results" / f"{name}-s3.json").read_text())
        assert r["n"] == [6, 6] and r["variance_ratio"] > 0 and r["sampled_tokens"] > 0
        assert r["kl"] is not None and r["rl_seconds"] > 0
    # one SFT (and one SFT evaluation) shared by both variants
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("sft-")) == ["sft-s3"]
    assert (out / "group-stop-end-s3" / "sft").resolve() == (out / "sft-s3" / "sft").resolve()
    table = (out / "table.md").read_text()
    assert "| seed-offline | 3 |" in table and "| group-stop-end | 3 |" in table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done earlier") == 2
    bad = subprocess.run(cmd[:2] + ["--variants", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown variant" in bad.stderr


@pytest.mark.slow
def test_recipe_bench_judges_variants_against_the_frontier(tiny_model_dir, tmp_path):
    """On the tiny model, a variant with the KL per token and one with the KL summed per
    summary: each is judged with its KL per summary and stands against the SFT's best-of-N
    frontier."""
    script = Path(__file__).parents[2] / "bench" / "rl_recipes.py"
    out = tmp_path / "recipes"
    names = ["step-stop-end-b0.1", "demo-summary-kl"]
    cmd = [sys.executable, str(script), "--variants", ",".join(names), "--seeds", "3",
           "--out", str(out), "--eval-prompts", "3", "--eval-samples", "4",
           f"model.name={tiny_model_dir}", *TINY, "rl.iterations=2", "rl.grad_accum=1",
           "reward.ending=null"]   # the tiny model's 10-token samples all end abruptly
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in names:
        r = json.loads((out / "results" / f"{name}-s3.json").read_text())
        assert r["n"] == [12, 12] and r["variance_ratio"] > 0
        assert r["kl_summary"] > 0 and r["kl_summary"] > r["kl"]     # summed over tokens
        assert [n for n, _, _ in r["sft_frontier"]] == [1, 2, 3, 4]
        assert 1.0 <= r["frontier_n"] <= 4.0
        metrics = [json.loads(x) for x in (out / f"{name}-s3" / "metrics.jsonl").read_text()
                   .splitlines()]
        steps = [m for m in metrics if m.get("stage") == "rl" and "kl_summary" in m]
        n = yaml.safe_load((out / f"{name}-s3" / "rl" / "config.yaml").read_text())["rl"][
            "best_of_n"]
        assert steps and all(m["kl_budget"] == pytest.approx(math.log(n) - (n - 1) / n)
                             for m in steps)
    table = (out / "table.md").read_text()
    assert "| demo-summary-kl | 3 |" in table
    assert "The SFT's best-of-N on the bench's prompts" in table


def test_attention_bench_folded_attention_matches_sdpa(monkeypatch):
    """The folded-GQA eager attention the bench times is SDPA's attention (fp32, grads too)."""
    import importlib.util
    import torch
    path = Path(__file__).resolve().parents[2] / "bench" / "attention_ab.py"
    monkeypatch.syspath_prepend(str(path.parent))   # as for a script: its folder first
    spec = importlib.util.spec_from_file_location("attention_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    torch.manual_seed(0)
    q, k, v, mask = ab.inputs(3, 5, 20)  # every row keeps some prompt positions
    assert not mask.all() and mask.any()          # left padding and the causal part both mask
    grads = []
    for fn in (ab.flash, ab.folded):
        out = fn(q, k, v, mask)
        out.square().sum().backward()
        grads.append((out.detach(), *(t.grad.clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a wrong grouping of query heads onto key/value heads would not match
    swapped = ab.folded(q, k.flip(1), v.flip(1), mask).detach()
    assert not torch.allclose(swapped, grads[0][0], atol=1e-3)
