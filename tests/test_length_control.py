"""Length-conditioned prompts: the cue round trip, the SFT rows, per-prompt targets, and a
conditioned run on the tiny model (SFT with cues, online RL with drawn targets, eval per
requested length, the control plot)."""
import json

import pytest

from posttrain import pipeline
from posttrain.config import ConfigError, DataConfig, load_config
from posttrain.data import cue_rows, requested_length, round_length, with_length_cue
from posttrain.rollout.prompts import draw_targets

CUE = "TL;DR (about {length} characters):"


@pytest.mark.parametrize("length,written", [(137, 140), (80, 80), (4, 10), (205, 200)])
def test_cue_round_trip(length, written):
    cfg = DataConfig(length_cue=CUE)
    prompt = "SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: I did a thing.\n\nTL;DR:"
    cued = with_length_cue(prompt, length, cfg)
    assert cued == f"SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: I did a thing.\n\nTL;DR (about {written} characters):"
    assert requested_length(cued, cfg) == written == round_length(length, cfg)
    assert requested_length(prompt, cfg) is None
    # a prompt without the marker gets the cue appended
    assert with_length_cue("POST: hi", length, cfg).endswith(f"\n\nTL;DR (about {written} characters):")


def test_sft_rows_ask_for_their_own_reference_length():
    cfg = DataConfig(length_cue=CUE, length_round=1)
    rows = cue_rows([{"prompt": "POST: x\n\nTL;DR:", "completion": " short one. "}], cfg)
    assert requested_length(rows[0]["prompt"], cfg) == len("short one.")


def test_targets_drawn_in_range_or_fixed():
    cue = f'data.length_cue="{CUE}"'
    cfg = load_config(None, (cue, "rl.target_range=[80,200]"))
    t = draw_targets(200, cfg, seed=1)
    assert min(t) >= 80 and max(t) <= 200 and len(set(t)) > 5 and all(x % 10 == 0 for x in t)
    assert t == draw_targets(200, cfg, seed=1)
    fixed = load_config(None, (cue, "rl.target_range=[80,200]", "generate.target=123"))
    assert set(draw_targets(5, fixed, 0)) == {120}
    assert draw_targets(3, load_config(), 0) == [None, None, None]
    with pytest.raises(ConfigError, match="must contain"):
        load_config(None, ("data.length_cue=TLDR",))


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
    assert len(samples) == 2 * 2 * 3 * 2                          # models x targets x prompts x samples
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
