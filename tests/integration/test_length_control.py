"""A length-conditioned run on the tiny model (SFT with cues, online RL with drawn targets,
eval per requested length, the control plot). The cue round trip and the SFT rows are in
unit/test_data.py, the drawn targets in unit/test_rollout_prompts.py."""
import json

import pytest

from posttrain import pipeline
from posttrain.config import load_config
from posttrain.data import requested_length
from conftest import CUE


@pytest.mark.slow
def test_conditioned_pipeline_on_the_tiny_model(tiny_model_dir, tmp_path, tiny_args):
    cfg = load_config(None, tiny_args(
        tiny_model_dir, tmp_path / "run", f'data.length_cue="{CUE}"', "rl.target_range=[20,60]",
        "rl.mode=online", "rl.iterations=2", "rl.prompts_per_iteration=2",
        "generate.samples_per_prompt=2", "rl.batch_size=4", "reward.name=target_length",
        "reward.width=30", "eval.targets=[20,60]", "eval.models=[sft,rl]"))
    pipeline.run(cfg)
    d = cfg.run_dir
    assert not (d / "generate").exists()                         # online: no offline set
    samples = [json.loads(l) for l in (d / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["target"] for s in samples}) == [20, 60]
    assert len(samples) == 2 * 2 * 3 * 2  # models x targets x prompts x samples
    report = json.loads((d / "eval" / "report.json").read_text())
    for m in ("sft", "rl"):
        assert set(report["by_target"][m]) == {"20", "60"}
        row = report["by_target"][m]["60"]
        got = [s["length_chars"] for s in samples if s["model"] == m and s["target"] == 60]
        assert row["mae"] == pytest.approx(sum(abs(x - 60) for x in got) / len(got))
    prompts = [json.loads(l) for l in (d / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert all(requested_length(p["prompt"], cfg.data) is None for p in prompts)  # plain posts
    png = (d / "plots" / "length_control.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    # the SFT stage trained on cued prompts: its config says so
    assert "length_cue" in (d / "sft" / "config.yaml").read_text()
