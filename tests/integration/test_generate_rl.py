"""generate + rl on the tiny model: stored log-probs are pi_sft, the ratio is 1 at step 0,
only the RL adapter trains, resume, and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain import generate, objectives as O, sft
from posttrain.model.adapters import add_lora, load_policy, save_adapter, sft_only
from posttrain.model.forward import completion_logits
from posttrain.model.load import load_base_model, load_tokenizer
from posttrain.rl import credit, plan
from posttrain.rl import train as rl
from posttrain.rollout.store import load_set
from posttrain.train import checkpoint
from posttrain.data import DataError, collate
from posttrain.types import Example
from conftest import RL_ARGS


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    from posttrain.config import load_config
    root = tmp_path_factory.mktemp("sftrun")
    cfg = load_config(None, (f"out_dir={root / 'run'}", f"model.name={tiny_model_dir}",
                             "model.precision=fp32", "lora.rank=4", "lora.alpha=8",
                             "data.max_train_rows=8", "data.max_eval_rows=4", "sft.max_steps=2",
                             "data.max_prompt_tokens=1024"))
    sft.run(cfg)
    return root / "run"


@pytest.fixture
def run_cfg(sft_run, tiny_cfg, tmp_path):
    def make(*overrides):
        cfg = tiny_cfg(*RL_ARGS, *overrides)
        if not (cfg.run_dir / "sft").exists():
            shutil.copytree(sft_run / "sft", cfg.run_dir / "sft")
        return cfg
    return make


def assert_resume_matches(cfg, ref_w, monkeypatch):
    """Kill `rl.run(cfg)` right after its first checkpoint, re-run it, and check the final
    RL adapter equals `ref_w` (the uninterrupted run's)."""
    real_save = checkpoint.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        rl.run(cfg)
    monkeypatch.setattr(checkpoint, "save", real_save)
    rl.run(cfg)
    w = load_file(str(cfg.run_dir / "rl" / "adapter" / "adapter_model.safetensors"))
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6)


def test_generate_stores_pi_sft_logprobs_and_scores(run_cfg):
    cfg = run_cfg()
    stats = generate.run(cfg)
    records, loaded = load_set(cfg.run_dir, load_tokenizer(cfg.model))
    assert len(records) == 24 and loaded == stats
    for key in (
        "prompt",
        "completion",
        "completion_ids",
        "logprobs",
        "stop_logprobs",
        "ended_with_eos",
        "truncated",
        "length_chars",
        "length_tokens",
        "score",
    ):
        assert key in records[0].to_row()
    assert sum(r.score for r in records) == pytest.approx(0.0, abs=1e-6)
    assert stats["length_chars"]["var"] == pytest.approx(stats["length_chars"]["std"] ** 2)
    assert all(len(r.logprobs) == len(r.completion_ids) <= 12 for r in records)
    # recompute the log-probs once with a plain forward pass of the SFT policy
    model = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter").eval()
    batch = collate([Example(tuple(r.prompt_ids), tuple(r.completion_ids)) for r in records[:6]],
                    load_tokenizer(cfg.model).pad_token_id)
    with torch.no_grad():
        lp = O.gather_logprobs(completion_logits(model, batch), batch.targets)
    stored = torch.tensor([x for r in records[:6] for x in r.logprobs])
    torch.testing.assert_close(lp, stored, rtol=1e-4, atol=1e-4)
    _, lp_stop = O.target_and_stop_logprobs(completion_logits(model, batch).detach(),
                                            batch.targets, load_tokenizer(cfg.model).eos_token_id)
    stored_stop = torch.tensor([x for r in records[:6] for x in r.stop_logprobs])
    torch.testing.assert_close(lp_stop, stored_stop, rtol=1e-4, atol=1e-4)
    # a second call finds the finished set
    assert generate.run(cfg) == stats


@pytest.mark.slow
def test_rl_ratio_is_one_at_step_zero_and_only_rl_adapter_trains(run_cfg):
    cfg = run_cfg("rl.kl_control=adaptive_token")
    generate.run(cfg)
    summary = rl.run(cfg)
    rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "rl" and "ratio_mean" in r]
    assert len(steps) == summary["steps"] == 3
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["clip_frac"] == 0.0
    assert all(r["kl"] >= 0 for r in steps)
    assert steps[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-6)       # the policy moved
    # the KL is far below the target at first, so the adaptive controller lowers beta
    assert steps[1]["beta"] < steps[0]["beta"] == cfg.rl.beta
    assert any("eval_len_std" in r for r in rows if r["stage"] == "rl")
    rl_weights = load_file(str(cfg.run_dir / "rl" / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in rl_weights.items() if "lora_B" in k)
    # the SFT adapter is untouched: the RL policy with its adapter disabled is the SFT model
    policy = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter",
                                  rl=cfg.run_dir / "rl" / "adapter").eval()
    plain = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter").eval()
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad(), sft_only(policy):
        torch.testing.assert_close(policy(input_ids=x).logits, plain(input_ids=x).logits)
    with torch.no_grad():
        assert (policy(input_ids=x).logits - plain(input_ids=x).logits).abs().max() > 1e-4


@pytest.mark.slow
def test_offline_reference_forward_matches_the_recorded_log_probs(run_cfg):
    """fast.recorded_reference=false (a reference forward each step, adapter off) trains
    like the recorded reference: KL 0 at step 0, the same first step."""
    metrics = {}
    for recorded in (True, False):
        cfg = run_cfg(f"fast.recorded_reference={str(recorded).lower()}", "rl.max_steps=1",
                      f"out_dir={run_cfg().run_dir.parent / f'ref-{recorded}'}")
        generate.run(cfg)
        rl.run(cfg)
        rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics[recorded] = next(r for r in rows if r["stage"] == "rl" and "kl" in r)
    assert metrics[False]["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("loss", "policy_loss", "grad_norm"):
        assert metrics[False][key] == pytest.approx(metrics[True][key], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_rl_resume_matches_uninterrupted(run_cfg, tmp_path, monkeypatch):
    ref = run_cfg()
    generate.run(ref)
    rl.run(ref)
    ref_w = load_file(str(ref.run_dir / "rl" / "adapter" / "adapter_model.safetensors"))

    cfg = run_cfg(f"out_dir={tmp_path / 'second'}")
    shutil.copytree(ref.run_dir / "generate", cfg.run_dir / "generate")
    assert_resume_matches(cfg, ref_w, monkeypatch)


def test_rl_bad_inputs(run_cfg, tmp_path, monkeypatch):
    cfg = run_cfg()
    with pytest.raises(DataError, match="no generated set"):
        rl.run(cfg)
    generate.run(cfg)
    stats_path = cfg.run_dir / "generate" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps(dict(stats, tokenizer="0123456789abcdef")))
    with pytest.raises(DataError, match="another tokenizer"):
        rl.run(cfg)
    stats_path.write_text(json.dumps(stats))
    # a NaN loss stops with the step and keeps the last good checkpoint
    real = O.clipped_policy_loss
    calls = {"n": 0}

    def nan_later(*a, **k):
        calls["n"] += 1
        loss, ratio, clipped = real(*a, **k)
        return (loss * float("nan") if calls["n"] > 2 else loss), ratio, clipped

    monkeypatch.setattr(O, "clipped_policy_loss", nan_later)
    with pytest.raises(sft.TrainingError, match=r"non-finite loss at step 2.*step_1"):
        rl.run(cfg)
    assert (cfg.run_dir / "rl" / "checkpoints" / "step_1" / "state.pt").is_file()
    assert not (cfg.run_dir / "rl" / "adapter").exists()


def test_frozen_sft_adapter_has_no_dropout_in_train_mode(run_cfg, tmp_path):
    """pi_sft inside the RL policy must be deterministic even while the RL adapter trains."""
    from posttrain.config import LoraConfig
    cfg = run_cfg("lora.dropout=0.5")
    tok = load_tokenizer(cfg.model)
    sft_model = add_lora(load_base_model(cfg.model, torch.device("cpu")),
                                  LoraConfig(rank=4, dropout=0.5))
    for n, p in sft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()                     # an SFT adapter that really changes outputs
    save_adapter(sft_model, tok, tmp_path / "sft-adapter")
    policy = load_policy(cfg, torch.device("cpu"), tmp_path / "sft-adapter", rl="new")
    policy.train()
    x = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=x).logits, policy(input_ids=x).logits)


def test_rl_refuses_a_set_sampled_at_another_temperature(run_cfg):
    cfg = run_cfg("generate.temperature=0.7")
    generate.run(cfg)
    with pytest.raises(DataError, match="generate.temperature=0.7"):
        rl.run(cfg)


@pytest.mark.slow
def test_group_advantages_with_sequence_aggregation(run_cfg):
    cfg = run_cfg("rl.advantage=group", "rl.group_std=true", "rl.loss_agg=sequence")
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5])
    lengths = torch.tensor([2, 1, 1, 3])
    group = torch.tensor([0, 0, 1, 1])
    adv, w = credit.step_advantages(reward, lengths, group, cfg)
    torch.testing.assert_close(
        adv, torch.tensor([1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        w, torch.tensor([1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 12, 1 / 12, 1 / 12])
    )
    generate.run(cfg)
    summary = rl.run(cfg)
    assert summary["steps"] == 3


def test_stop_credit_mode_runs_and_moves_the_policy(run_cfg):
    cfg = run_cfg("rl.advantage=stop", "generate.max_new_tokens=8")
    generate.run(cfg)
    records, _ = load_set(cfg.run_dir, load_tokenizer(cfg.model))
    prefixes = credit.prefix_lengths(records, load_tokenizer(cfg.model), "chars")
    assert all(p[0] == 0 and len(p) == len(r.completion_ids) for p, r in zip(prefixes, records))
    assert all(p == sorted(p) for p in prefixes)
    summary = rl.run(cfg)
    rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "rl" and "ratio_mean" in r]
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert steps[-1]["kl"] > 0 and summary["steps"] == 3


def test_a_set_without_completion_tokens_is_refused(run_cfg):
    import datasets
    cfg = run_cfg()
    generate.run(cfg)
    path = cfg.run_dir / "generate" / "dataset"
    rows = datasets.load_from_disk(str(path)).to_list()
    for r in rows:
        r["completion_ids"], r["logprobs"], r["stop_logprobs"] = [], [], []
    shutil.rmtree(path)
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    with pytest.raises(DataError, match="no sample has any completion token"):
        rl.run(cfg)
    rows[0]["completion_ids"], rows[0]["logprobs"] = [5], [-1.0]
    shutil.rmtree(path)
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    with pytest.raises(DataError, match="row 1: empty completion_ids"):
        rl.run(cfg)


@pytest.mark.slow
def test_online_rounds_train_resume_and_log(run_cfg, tmp_path, monkeypatch):
    args = ("rl.mode=online", "rl.iterations=3", "rl.prompts_per_iteration=2",
            "generate.samples_per_prompt=3", "rl.batch_size=3", "rl.grad_accum=1",
            "rl.ppo_epochs=2", "rl.advantage=group", "rl.loss_agg=sequence",
            "rl.checkpoint_every=1", "rl.eval_every=0")
    ref = run_cfg(*args)
    assert plan.steps_per_round(ref) == 4                  # 2 groups of 3 -> 2 micro x 2 epochs
    summary = rl.run(ref)                                    # no generated set needed
    assert not (ref.run_dir / "generate").exists()
    assert summary["steps"] == 12 and summary["rounds"] == 3
    rows = [json.loads(l) for l in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "rl" and "ratio_mean" in r]
    rounds = [r for r in steps if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["sampled_tokens"] == summary["sampled_tokens"]
    # first step of the first round: the policy is the sampler and the SFT model
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert steps[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-6)   # second PPO epoch: moved
    assert steps[-1]["kl"] > 0
    # the reward's statistics: the first round's lengths (the SFT policy's), written for eval
    stored = json.loads((ref.run_dir / "rl" / "reward_lengths.json").read_text())
    assert stored["from"] == "the first online round" and stored["unit"] == "chars"
    assert len(stored["lengths"]) == 6
    assert sum(stored["lengths"]) / 6 == pytest.approx(rounds[0]["round_len_mean"])
    ref_w = load_file(str(ref.run_dir / "rl" / "adapter" / "adapter_model.safetensors"))

    # killed after the first round's checkpoint, the re-run ends with the same adapter and
    # the same reward statistics (kept in the checkpoint)
    cfg = run_cfg(f"out_dir={tmp_path / 'second'}", *args)
    assert_resume_matches(cfg, ref_w, monkeypatch)
    assert json.loads((cfg.run_dir / "rl" / "reward_lengths.json").read_text()) == stored


def test_vllm_backend_is_a_clear_error_without_cuda_or_vllm(run_cfg):
    from posttrain.rollout.vllm import BackendError
    cfg = run_cfg("generate.backend=vllm")
    with pytest.raises(BackendError, match="generate.backend=vllm needs a CUDA device"):
        generate.run(cfg)
    assert not (cfg.run_dir / "generate" / "dataset").exists()


def test_vllm_engine_settings_are_ones_vllm_takes():
    """bf16 where the GPU has it, else fp16 (never fp32, which vLLM's attention refuses); a
    4-bit policy sampled from 4-bit weights; room for the adapter's rank."""
    from posttrain.rollout.vllm import engine_args
    args = engine_args("m", 4, 7, 600, four_bit=False, bf16=True)
    assert (args["dtype"], args["max_lora_rank"], args["seed"]) == ("bfloat16", 8, 7)
    assert "quantization" not in args
    args = engine_args("m", 16, 7, 600, four_bit=True, bf16=False)
    assert (args["dtype"], args["max_lora_rank"], args["quantization"]) == \
        ("float16", 16, "bitsandbytes")


def test_vllm_backend_records_are_scored_by_the_sft_policy(run_cfg, monkeypatch):
    """With vLLM's sampling replaced by fixed completions, the stage writes the records the
    RL stage needs, their log-probs those of the SFT policy's own forward."""
    from posttrain.rollout import vllm as vllm_backend
    cfg = run_cfg("generate.backend=vllm", "generate.num_samples=8")
    tok = load_tokenizer(cfg.model)
    eos = tok.eos_token_id

    class FakeSampler(vllm_backend.VLLMSampler):
        def __init__(self, *args, **kwargs):
            pass

        def sample(self, prompts, group, max_new_tokens, eos_id, temperature, top_p, seed):
            # vLLM's outputs: one sample stopped (the EOS left out), one cut at max_new_tokens
            from types import SimpleNamespace as NS
            outs = [NS(outputs=[NS(token_ids=[5, 6, 7], finish_reason="stop"),
                                NS(token_ids=[8] * max_new_tokens, finish_reason="length")])
                    for _ in prompts]
            return vllm_backend.rows_of(outs, eos_id)

    monkeypatch.setattr(vllm_backend, "check_available", lambda device: None)
    monkeypatch.setattr(vllm_backend, "VLLMSampler", FakeSampler)
    cfg = run_cfg("generate.backend=vllm", "generate.num_samples=8",
                  "generate.samples_per_prompt=2")
    generate.run(cfg)
    records, _ = load_set(cfg.run_dir, tok)
    assert len(records) == 8
    stopped = [r for r in records if r.ended_with_eos]
    assert stopped and all(list(r.completion_ids) == [5, 6, 7, eos] for r in stopped)
    assert all(len(r.completion_ids) == 12 for r in records if not r.ended_with_eos)
    model = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter").eval()
    batch = collate([Example(tuple(r.prompt_ids), tuple(r.completion_ids))
                     for r in records], tok.pad_token_id)
    with torch.no_grad():
        logits = completion_logits(model, batch)
    lp, lp_stop = O.target_and_stop_logprobs(logits, batch.targets, eos)
    torch.testing.assert_close(lp, torch.tensor([x for r in records for x in r.logprobs]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp_stop, torch.tensor([x for r in records
                                                      for x in r.stop_logprobs]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_online_group_stop_with_the_ending_rule_logs_the_penalised_share(run_cfg):
    cfg = run_cfg("rl.mode=online", "rl.iterations=2", "rl.prompts_per_iteration=2",
                  "generate.samples_per_prompt=3", "rl.batch_size=3", "rl.grad_accum=1",
                  "rl.advantage=group_stop", "reward.ending=-1", "rl.eval_every=0")
    summary = rl.run(cfg)
    rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "rl" and "ratio_mean" in r]
    assert summary["steps"] == 4 and steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= r["penalised"] <= 1.0 for r in steps)
    rounds = [r for r in steps if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2] and all("round_abrupt" in r for r in rounds)
    assert steps[-1]["kl"] > 0


