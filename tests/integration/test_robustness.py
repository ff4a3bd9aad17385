"""Robustness: kill -9 in the middle of each stage and resume to the uninterrupted result;
two runs with the same seed agree; the run records its environment and never the Hub token;
a stage run alone refuses inputs made with another config; settings past the model's
context are refused. (Nothing loads pickles or remote code by default:
unit/test_package_safety.py.)"""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import generate, pipeline, sft
from posttrain.evaluate import run as evaluate
from posttrain.model.load import ModelError, load_tokenizer
from posttrain.rl import train as rl
from posttrain.config import load_config
from posttrain.rollout.store import load_set

# enough steps and batches to kill in the middle of each stage
ROBUST = ("data.max_train_rows=24", "sft.batch_size=2", "sft.max_steps=0", "sft.checkpoint_every=1",
          "generate.num_samples=48", "generate.batch_size=1", "rl.batch_size=4", "rl.grad_accum=1",
          "rl.max_steps=0", "rl.checkpoint_every=1", "eval.batch_size=1", "eval.num_prompts=6")
MODULES = {"sft": sft, "generate": generate, "rl": rl, "eval": evaluate}


def _cli(stage, *args):
    """The real CLI on the dataclass defaults (the reference recipe, offline), not the demo."""
    return [sys.executable, "-m", "posttrain", stage, "--config", "defaults", *args]


def _args(tiny_args, model_dir, out):
    return tiny_args(model_dir, out, *ROBUST)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_args):
    """An uninterrupted run of every stage (offline RL, so the generate stage runs)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = load_config(None, _args(tiny_args, tiny_model_dir, out))
    pipeline.run(cfg)
    return cfg


def _progress(out: Path, stage: str) -> int:
    """How far a running stage has got: its newest checkpoint step, or its finished parts."""
    if stage in ("sft", "rl"):
        steps = [int(p.name.split("_")[1]) for p in (out / stage / "checkpoints").glob("step_*")
                 if (p / "state.pt").is_file()] if (out / stage / "checkpoints").is_dir() else []
        return max(steps, default=0)
    parts = out / stage / "parts"
    return len(list(parts.glob("*.jsonl"))) if parts.is_dir() else 0


def _lora(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "generate", "rl", "eval"])
def test_kill_9_mid_stage_then_resume_gives_the_uninterrupted_result(
        stage, reference, tiny_model_dir, tiny_args, tmp_path):
    out = tmp_path / "run"
    names = list(MODULES)
    for earlier in names[:names.index(stage)]:          # the inputs, as the reference made them
        shutil.copytree(reference.run_dir / earlier, out / earlier)
    args = _args(tiny_args, tiny_model_dir, out)
    proc = subprocess.Popen(_cli(stage, *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a random point past the first checkpoint (or finished batch), well before the end
    at = random.Random(stage).randint(1, 4)
    deadline = time.time() + 300
    while _progress(out, stage) < at:
        assert proc.poll() is None and time.time() < deadline, f"{stage} ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker = pipeline.STAGES[stage].marker
    assert not (out / stage / marker).exists(), "the stage finished before the kill"

    cfg = load_config(None, args)
    MODULES[stage].run(cfg)                               # the re-run resumes
    ref = reference.run_dir
    if stage in ("sft", "rl"):
        a, b = _lora(out / stage / "adapter"), _lora(ref / stage / "adapter")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    elif stage == "generate":
        tok = load_tokenizer(cfg.model)
        mine, theirs = load_set(out, tok)[0], load_set(ref, tok)[0]
        assert [r.completion_ids for r in mine] == [r.completion_ids for r in theirs]
        torch.testing.assert_close(torch.tensor([x for r in mine for x in r.logprobs]),
                                   torch.tensor([x for r in theirs for x in r.logprobs]))
    else:
        def samples(run):
            return [(s["model"], s["prompt_index"], s["completion"]) for s in map(
                json.loads, (run / "eval" / "samples.jsonl").read_text().splitlines())]
        assert samples(out) == samples(ref)
        a, b = (json.loads((r / "eval" / "report.json").read_text()) for r in (out, ref))
        assert a["variance_ratio"] == pytest.approx(b["variance_ratio"], rel=1e-6)


def _strip_times(rows: list[dict]) -> list[dict]:
    timing = re.compile(r"(seconds|per_s|_s$|time)")
    return [{k: v for k, v in r.items() if not timing.search(k)} for r in rows]


@pytest.mark.slow
def test_same_seed_same_results_environment_recorded_token_never_written(
        reference, tiny_model_dir, tiny_args, tmp_path, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    cfg = load_config(None, _args(tiny_args, tiny_model_dir, tmp_path / "run"))
    pipeline.run(cfg)
    a, b = cfg.run_dir, reference.run_dir
    tok = load_tokenizer(cfg.model)
    assert load_set(a, tok)[0] == load_set(b, tok)[0]          # identical generation sets
    metrics = [_strip_times([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()])
               for r in (a, b)]
    assert metrics[0] == metrics[1]                            # identical metrics
    for run in (a, b):
        env = json.loads((run / "rl" / "environment.json").read_text())
        for pkg in ("torch", "transformers", "peft"):
            assert env["versions"][pkg]
        assert "git_commit" in env
    for f in a.rglob("*"):                                     # the token is nowhere
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_stage_alone_refuses_inputs_or_outputs_made_with_another_config(reference, tmp_path,
                                                                         tiny_model_dir,
                                                                         tiny_args):
    out = tmp_path / "run"
    shutil.copytree(reference.run_dir, out)
    args = _args(tiny_args, tiny_model_dir, out)
    before = (out / "rl" / "adapter" / "adapter_model.safetensors").read_bytes()
    # the RL stage's inputs (the SFT adapter) were made with another LoRA rank
    r = subprocess.run(_cli("rl", *args, "lora.rank=8"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "sft" in r.stderr and "lora.rank: 4" in r.stderr and "8 now" in r.stderr
    # its own outputs were made with another learning rate: refused, then redone with --force
    r = subprocess.run(_cli("rl", *args, "rl.max_lr=0.02"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "rl.max_lr" in r.stderr and "--force" in r.stderr
    assert (out / "rl" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    r = subprocess.run(_cli("rl", "--force", *args, "rl.max_lr=0.02"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "rl" / "adapter" / "adapter_model.safetensors").read_bytes() != before
    # the evaluation on disk was made from the old RL adapter: stale, never taken as done
    cfg = load_config(None, args + ("rl.max_lr=0.02",))
    assert "eval" in pipeline.stale(cfg) and not pipeline.stage_done(cfg, "eval")


def test_settings_past_the_models_context_are_refused(tiny_cfg):
    cfg = tiny_cfg("data.max_prompt_tokens=2000", "generate.max_new_tokens=100")
    with pytest.raises(ModelError, match=r"data.max_prompt_tokens=2000.*context of 2048"):
        sft.run(cfg)
    assert not (cfg.run_dir / "sft" / "adapter").exists()
