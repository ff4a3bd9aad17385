import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import modeling, sft
from posttrain.metrics import MetricsLogger
from posttrain.data import Example, collate, load_rows, tokenize_rows


def _tiny(cfg):
    tok = modeling.load_tokenizer(cfg.model)
    model = modeling.load_base_model(cfg.model, torch.device("cpu"))
    return tok, model


def test_no_attention_across_examples(tiny_cfg):
    """Each example's loss is the same alone, in a padded batch, and packed in one row."""
    cfg = tiny_cfg()
    tok, model = _tiny(cfg)
    rows = load_rows("sample", "train", cfg.data)[:3]
    ex, _ = tokenize_rows(rows, tok, cfg.data)
    alone = [sft.completion_loss(model, collate([e], tok.pad_token_id), "sum") for e in ex]
    for packed in (False, True):
        batch = collate(ex, tok.pad_token_id, packed=packed)
        logits = modeling.completion_logits(model, batch)
        per_token = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        per_example = torch.zeros(len(ex)).index_add(0, batch.example_index, per_token)
        torch.testing.assert_close(per_example, torch.stack(alone), rtol=1e-4, atol=1e-4)


def test_logits_only_at_completion_positions(tiny_cfg):
    cfg = tiny_cfg()
    tok, model = _tiny(cfg)
    batch = collate([Example((3, 4, 5, 6), (7, 8, tok.eos_token_id))], tok.pad_token_id)
    logits = modeling.completion_logits(model, batch)
    assert logits.shape == (3, model.config.vocab_size)
    full = model(input_ids=batch.input_ids).logits[0, 3:6]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    # switched off (fast.completion_logits=false): the head runs everywhere, same rows
    torch.testing.assert_close(modeling.completion_logits(model, batch, only_needed=False),
                               full, rtol=1e-5, atol=1e-5)


def test_random_batching_covers_every_example_once_per_epoch(tiny_cfg):
    cfg = tiny_cfg("sft.batching=random", "sft.epochs=2")
    ex = [Example((1,) * n, (2,)) for n in range(1, 12)]
    plan = sft.micro_batches(ex, cfg)
    per_epoch = len(plan) // 2
    for epoch in (plan[:per_epoch], plan[per_epoch:]):
        assert sorted(i for b in epoch for i in b) == list(range(11))
    assert plan[:per_epoch] != plan[per_epoch:]


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
    model = modeling.load_adapter(base, out / "adapter")
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


def test_resume_continues_the_same_schedule(tiny_cfg, monkeypatch):
    reference = sft.run(tiny_cfg("sft.epochs=2", "out_dir=" + str(tiny_cfg().run_dir) + "-ref"))
    ref_weights = load_file(str(tiny_cfg().run_dir.parent / "run-ref/sft/adapter/adapter_model.safetensors"))

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
    lrs = [r["lr"] for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    ref_lrs = [r["lr"] for r in map(json.loads, (cfg.run_dir.parent / "run-ref" / "metrics.jsonl").read_text().splitlines())
               if "lr" in r]
    assert lrs == ref_lrs   # same schedule, each step logged once (step 5 not twice)


def test_non_finite_loss_stops_with_the_step(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    real = sft.completion_loss
    calls = {"n": 0}

    def nan_on_third(model, batch, reduction="mean", only_needed=True):
        loss = real(model, batch, reduction, only_needed)
        calls["n"] += 1
        return loss * float("nan") if model.training and calls["n"] >= 4 else loss

    monkeypatch.setattr(sft, "completion_loss", nan_on_third)
    with pytest.raises(sft.TrainingError, match="non-finite loss at step"):
        sft.run(cfg)
    assert not (cfg.run_dir / "sft" / "adapter").exists()
