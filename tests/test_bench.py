"""bench/throughput.py runs its cases on the tiny model and writes its table (a smoke test:
the figures themselves are measured on the real model, not asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY


def test_throughput_bench_runs_each_kind_of_case(tiny_model_dir, tmp_path):
    script = Path(__file__).parents[1] / "bench" / "throughput.py"
    out = tmp_path / "bench.json"
    cases = "sft/all-logits,generate/ours,generate/hf-generate,rl/ours,rl/naive"
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
