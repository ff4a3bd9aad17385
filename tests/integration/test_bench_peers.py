"""bench/peers.py: posttrain's and TRL's online RL on the tiny model, judged by one evaluator
(a smoke test of the mechanics: the figures themselves are measured on the real model), the
TRL reward adapter against posttrain's reward, and the exits without TRL or an SFT adapter.
TRL is the optional `bench` extra: the run that needs it is skipped where it is missing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from posttrain.model.load import load_tokenizer
from posttrain.rl.credit import step_rewards
from posttrain.rollout.collect import rollouts_of
from posttrain.types import Sample

BENCH = Path(__file__).parents[2] / "bench"
SCRIPT = BENCH / "peers.py"
sys.path.insert(0, str(BENCH))

# 2 prompts x 2 samples a round, up to 8 new tokens, one optimizer step per PPO epoch;
# reward.ending=null: the tiny random model never stops by itself, and with every sample
# penalised nothing would train
PEERS = [o for o in TINY if not o.startswith("rl.max_steps")] + [
    "rl.prompts_per_iteration=2", "generate.samples_per_prompt=2", "generate.batch_size=2",
    "generate.max_new_tokens=8", "rl.batch_size=4", "rl.grad_accum=1", "rl.eval_prompts=2",
    "eval.num_prompts=2", "eval.samples_per_prompt=2", "reward.ending=null"]


def _no_trl(args: list, cwd) -> subprocess.CompletedProcess:
    """Run bench/peers.py with `import trl` failing, as where TRL is not installed (and its
    folder first on sys.path, as Python puts it for a script)."""
    shim = ("import runpy, sys; sys.modules['trl'] = None; "
            f"sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            f"sys.argv = {[str(SCRIPT), *args]!r}; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_without_trl_it_exits_naming_the_pip_command(tmp_path):
    done = _no_trl(["--seeds", "1", f"out_dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    assert 'pip install --no-deps "trl==1.16.*"' in done.stderr, done.stderr[-2000:]


def test_without_an_sft_adapter_it_names_the_command_that_makes_it(tiny_model_dir, tmp_path):
    done = _no_trl(["--only", "posttrain", f"out_dir={tmp_path / 'run'}",
                    f"model.name={tiny_model_dir}"], tmp_path)
    assert done.returncode != 0
    assert "no SFT adapter" in done.stderr and "posttrain sft" in done.stderr, done.stderr


@pytest.mark.parametrize("unit", ["chars", "tokens"])
def test_the_trl_reward_is_posttrains_reward(tiny_cfg, unit):
    """The same completions scored by posttrain (Rollouts from its sampler's records, then
    step_rewards) and by the TRL reward function (TRL's completion_ids): the same rewards,
    the ending rule included, with the first call's length statistics kept for the next."""
    from peers_trl import PosttrainReward
    cfg = tiny_cfg("reward.name=zscore", "reward.ending=-1", f"reward.unit={unit}")
    tok = load_tokenizer(cfg.model)
    eos = tok.eos_token_id
    prompts = ["POST: my cat broke a glass.\n\nTL;DR:", "POST: the dog ate my lunch.\n\nTL;DR:"]
    first = [("cat broke a glass.", True), ("a much longer summary of it, and it ends!", True),
             ("no closing punctuation", True), ("it trails off...", True), ("", True),
             ("cut at the token limit.", False)]
    second = [("short.", True), ("a summary that goes on and on about the dog's lunch.", True),
              ("cut off", False), ("lunch gone (sadly)", True)]
    reward = PosttrainReward(cfg, tok)
    stats = None
    for batch in (first, second):
        samples = []
        for i, (text, ended) in enumerate(batch):
            ids = tuple(tok(text)["input_ids"]) + ((eos,) if ended else ())
            samples.append(Sample(i % 2, ids, (0.0,) * len(ids), (0.0,) * len(ids), ended))
        rollouts = rollouts_of(samples, tok, prompts, tok(prompts)["input_ids"])
        stats = stats or [r.length(unit) for r in rollouts]   # the first round's lengths
        ours = step_rewards(rollouts, stats, tok, cfg)[0].tolist()
        theirs = reward(prompts=[prompts[s.prompt_index] for s in samples],
                        completions=[r.completion for r in rollouts],
                        completion_ids=[list(s.token_ids) for s in samples], trainer_state=None)
        assert theirs == pytest.approx(ours, abs=1e-6)
        assert any(x == -1.0 for x in ours) and any(x != -1.0 for x in ours)


def _check_figures(report: dict) -> None:
    rec = report["per_seed"]["3"]
    for kind in ("posttrain", "trl"):
        s = rec["speed"][kind]
        assert s["rounds"] == 1 and len(s["round_seconds"]) == 1, kind
        for key in ("median_round_s", "sampling_new_tokens_per_s", "training_tokens_per_s",
                    "peak_mib"):
            assert s[key] > 0, (kind, key)
        row = rec["runs"][kind]["rounds"][0]
        assert row["samples"] == 4 and row["new_tokens"] > 0, kind
        assert 0 < row["sample_seconds"] < row["seconds"], kind
    assert rec["speed"]["speedup"] > 0 and rec["prompts_match"] is True
    # the same work: prompt + completion tokens of the round, twice (two PPO epochs)
    assert rec["runs"]["posttrain"]["rounds"][0]["train_tokens"] > 0
    assert rec["eval_prompts"] == [2, 2]
    for name in ("sft", "posttrain", "trl"):
        p = rec["eval"][name]
        assert p["n"] == 4 and p["mean"] > 0 and p["var"] >= 0, name
        assert 0 <= p["abrupt_rate"] <= 1 and p["rougeL"] >= 0, name
    for name in ("posttrain", "trl"):
        p = rec["eval"][name]
        assert p["variance_ratio"] > 0 and len(p["variance_ratio_ci95"]) == 2, name
        assert p["relative_ratio"] > 0 and len(p["relative_ratio_ci95"]) == 2, name
        assert p["kl_k3"] > 0, name   # both trained away from SFT (TRL's adapter is loaded)


@pytest.mark.slow
def test_peers_runs_both_and_judges_them_with_one_evaluator(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    run = tmp_path / "run"
    args = [f"out_dir={run}", f"model.name={tiny_model_dir}", *PEERS]
    sft = subprocess.run([sys.executable, "-m", "posttrain", "sft", "--config", "demo", *args],
                         capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert sft.returncode == 0, sft.stderr[-3000:]
    cmd = [sys.executable, str(SCRIPT), "--seeds", "3", "--rounds", "1", "--trl-bf16", "sweep",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((run / "bench" / "peers.json").read_text())
    _check_figures(report)
    assert set(report["trl_bf16_sweep"]) == {"on", "off"}
    settings = report["trl_settings"]
    assert settings["num_generations"] == 2 and settings["shuffle_dataset"] is False
    assert settings["max_steps"] == 2 and settings["num_iterations"] == 2
    assert "temperature" not in settings and "top_p" not in settings   # TRL's defaults
    assert report["machine"]["versions"]["trl"].startswith("1.16")
    assert "speed-up (TRL / posttrain)" in done.stdout and "mean over seeds 3" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier") == 5, again.stdout


def test_a_part_made_before_an_option_existed_is_reused_at_its_default():
    """A stored part's config that lacks a key added since (it ran the old code, which the
    new key's default keeps) is not a difference; the same key set away from the config's
    value is, and so is any other changed value."""
    import peers
    bare = "rl:\n  beta: 0.1\n  prompt_grad: true\nseed: 42\n"
    stored = "rl:\n  beta: 0.1\nseed: 1\n"
    assert peers._diff(stored, bare.replace("42", "1"), bare) == []
    assert peers._diff(stored, bare.replace("true", "false"), bare) == ["rl.prompt_grad"]
    assert peers._diff(stored, bare.replace("0.1", "0.2"), bare) == ["rl.beta"]


def test_an_evaluation_stored_without_the_relative_ratio_gets_it_from_its_samples(tmp_path):
    """A policy whose every length is half the SFT's (same spread in proportion) has a plain
    ratio of 4 and a relative ratio of 1, read from the evaluation's samples.jsonl; a result
    that has it already is left alone (its samples are not read again)."""
    import random

    import peers
    rng = random.Random(0)
    sft = [rng.randint(60, 300) for _ in range(60)]
    rows = [{"model": "sft", "length_chars": n} for n in sft] + \
        [{"model": "trl", "length_chars": n / 2} for n in sft]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"seed": 3, "policies": {"sft": {"var": 1.0}, "trl": {"variance_ratio": 4.0}}}
    peers.with_relative(result, tmp_path, 200)
    trl = result["policies"]["trl"]
    assert trl["relative_ratio"] == pytest.approx(1.0)
    lo, hi = trl["relative_ratio_ci95"]
    assert lo < 1 < hi
    (tmp_path / "samples.jsonl").unlink()
    peers.with_relative(result, tmp_path, 200)
    assert result["policies"]["trl"]["relative_ratio_ci95"] == [lo, hi]
