"""The SFT stage on the tiny model: it lowers the loss and trains only LoRA, resumes to the
uninterrupted schedule, and stops on a non-finite loss."""
import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import sft
from posttrain.model.adapters import load_adapter
from posttrain.metrics import MetricsLogger
from posttrain.data import load_rows, tokenize_rows
from conftest import _tiny


@pytest.mark.slow
def test_sft_lowers_loss_and_changes_only_lora(tiny_cfg):
    cfg = tiny_cfg("sft.epochs=3")
    summary = sft.run(cfg)
    out = cfg.run_dir / "sft"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "tokenizer.json").is_file()          # tokenizer saved with it
    assert not (out / "checkpoints").exists()                        # cleaned when done
    assert (cfg.run_dir / "config.yaml").is_file()
    rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == summary["steps"] == 18
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    # only LoRA weights are saved, and they moved away from their zero-initialised B
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    # the base model is untouched: loading the adapter on a fresh base reproduces the loss
    tok, base = _tiny(cfg)
    model = load_adapter(base, out / "adapter")
    rows = load_rows("sample", "validation", cfg.data)
    ex, _ = tokenize_rows(rows, tok, cfg.data)
    loss = sft.evaluate_loss(model, ex[:8], tok, 8, _NoAccelerator())
    assert loss == pytest.approx(summary["eval_loss_after"], rel=1e-4)


class _NoAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def autocast():
        from contextlib import nullcontext
        return nullcontext()


@pytest.mark.slow
def test_resume_continues_the_same_schedule(tiny_cfg, monkeypatch):
    reference = sft.run(tiny_cfg("sft.epochs=2", "out_dir=" + str(tiny_cfg().run_dir) + "-ref"))
    ref_weights = load_file(
        str(tiny_cfg().run_dir.parent / "run-ref/sft/adapter/adapter_model.safetensors")
    )

    cfg = tiny_cfg("sft.epochs=2")
    real_log = MetricsLogger.log

    def log_then_die(self, step, **values):
        real_log(self, step, **values)
        if step == 5 and "loss" in values:   # killed after step 5, past the step-4 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    assert (cfg.run_dir / "sft" / "checkpoints" / "step_4" / "state.pt").is_file()
    assert not (cfg.run_dir / "sft" / "adapter").exists()
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    resumed = sft.run(cfg)
    assert resumed["steps"] == reference["steps"]
    weights = load_file(str(cfg.run_dir / "sft" / "adapter" / "adapter_model.safetensors"))
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-5, atol=1e-6)
    assert resumed["eval_loss_after"] == pytest.approx(reference["eval_loss_after"], rel=1e-5)
    lrs = [
        r["lr"]
        for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    ]
    ref_lrs = [
        r["lr"]
        for r in map(
            json.loads, (cfg.run_dir.parent / "run-ref" / "metrics.jsonl").read_text().splitlines()
        )
        if "lr" in r
    ]
    assert lrs == ref_lrs   # same schedule, each step logged once (step 5 not twice)


def test_non_finite_loss_stops_with_the_step(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    real = sft.completion_loss
    calls = {"n": 0}

    def nan_on_third(model, batch, reduction="mean"):
        loss = real(model, batch, reduction)
        calls["n"] += 1
        return loss * float("nan") if model.training and calls["n"] >= 4 else loss

    monkeypatch.setattr(sft, "completion_loss", nan_on_third)
    with pytest.raises(sft.TrainingError, match="non-finite loss at step"):
        sft.run(cfg)
    assert not (cfg.run_dir / "sft" / "adapter").exists()
