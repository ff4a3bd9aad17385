"""Device-dependent `auto` settings (model/choices.py), with the device mocked; the frozen
weights' storage (model.frozen_dtype) and the merged SFT adapter (fast.merged_sft)."""
import copy
import json

import pytest
import torch

from posttrain import modeling, provenance
from posttrain.config import LoraConfig, ModelConfig, load_config
from posttrain.model import load as model_load
from posttrain.model.choices import DeviceChoices

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def bf16(monkeypatch):
    """Set whether the (mocked) device supports bf16."""
    def make(supported: bool):
        monkeypatch.setattr(model_load, "bf16_supported", lambda device: supported)
    return make


def test_auto_on_a_cpu_with_bf16(bf16):
    bf16(True)
    cfg = load_config("demo")
    c = DeviceChoices(cfg, CPU)
    assert (c.precision, c.frozen_dtype, c.gqa_attention, c.share_prompt,
            c.group_by_length) == (torch.bfloat16, "matmul", True, True, True)
    assert c.record() == {"device": "cpu", "model.precision": ["auto", "bfloat16"],
                          "model.frozen_dtype": ["auto", "matmul"],
                          "model.gqa_attention": ["auto", True],
                          "rl.share_prompt": ["auto", True],
                          "generate.group_by_length": ["auto", True]}
    # the config itself still says auto
    assert (cfg.model.frozen_dtype, cfg.rl.share_prompt, cfg.generate.group_by_length) == \
        ("auto", "auto", "auto")


def test_auto_on_a_cpu_without_bf16(bf16):
    bf16(False)
    c = DeviceChoices(load_config("demo"), CPU)
    assert (c.precision, c.frozen_dtype, c.share_prompt) == (torch.float32, "fp32", True)


def test_auto_on_cuda(bf16):
    """The H200 table's choices: fp32, each sample with its own prompt, unsorted batches."""
    bf16(True)
    c = DeviceChoices(load_config("demo"), CUDA)
    assert (c.precision, c.frozen_dtype, c.gqa_attention, c.share_prompt,
            c.group_by_length) == (torch.float32, "fp32", False, False, False)


def test_explicit_values_win_over_the_device(bf16):
    bf16(True)
    cfg = load_config("demo", ("model.precision=bf16", "model.frozen_dtype=compute",
                               "rl.share_prompt=true", "generate.group_by_length=false",
                               "model.gqa_attention=true"))
    c = DeviceChoices(cfg, CUDA)
    assert (c.precision, c.frozen_dtype, c.gqa_attention, c.share_prompt,
            c.group_by_length) == (torch.bfloat16, "compute", True, True, False)
    # matmul storage under fp32 compute would change the numbers: it stays fp32
    c = DeviceChoices(load_config("demo", ("model.frozen_dtype=matmul",
                                           "model.precision=fp32")), CPU)
    assert c.frozen_dtype == "fp32"
    # a 4-bit base keeps its own storage
    c = DeviceChoices(load_config("demo", ("model.load_in_4bit=true",)), CPU)
    assert c.frozen_dtype == "fp32"


def test_bad_auto_values_are_named():
    from posttrain.config import ConfigError
    with pytest.raises(ConfigError, match="rl.share_prompt='yes please' must be true, false"):
        load_config("demo", ("rl.share_prompt=yes please",))
    with pytest.raises(ConfigError, match="generate.group_by_length=.*must be true, false"):
        load_config("demo", ("generate.group_by_length=sorted",))
    with pytest.raises(ConfigError, match="model.frozen_dtype='bf16' is not one of"):
        load_config("demo", ("model.frozen_dtype=bf16",))


def test_environment_records_the_choices(bf16, tmp_path):
    bf16(True)
    cfg = load_config("demo", (f"out_dir={tmp_path}",))
    provenance.write_config(cfg, "sft")
    env = json.loads((tmp_path / "sft" / "environment.json").read_text())
    assert env["device_choices"] == DeviceChoices(cfg, CPU).record()


# ---------------------------------------------------------------- the frozen weights

def _lora_logprobs_and_grads(model, x):
    from posttrain import objectives as O
    model.zero_grad(set_to_none=True)
    with modeling.autocast(CPU, torch.bfloat16):
        logits = model(input_ids=x).logits[0, :-1]
    lp = O.gather_logprobs(logits, x[0, 1:]).float()
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


def test_matmul_storage_is_exactly_autocast_over_fp32(tiny_model_dir):
    """model.frozen_dtype=matmul stores the linear and LM-head weights in bf16 and keeps
    the embedding, norms and LoRA in fp32; under bf16 autocast its log-probs and the LoRA
    gradients equal the fp32-stored model's bit for bit."""
    if not modeling.bf16_supported(CPU):
        pytest.skip("this CPU has no bf16")
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    out = {}
    for frozen in ("fp32", "matmul"):
        cfg = ModelConfig(name=str(tiny_model_dir), precision="bf16", frozen_dtype=frozen)
        torch.manual_seed(0)
        model = modeling.add_lora(modeling.load_base_model(cfg, CPU), LoraConfig(rank=4))
        for n, p in model.named_parameters():
            if "lora_B" in n:  # nonzero, so the A gradients are too
                p.data.normal_(0, 0.1)
        model.train()
        out[frozen] = _lora_logprobs_and_grads(model, x)
        if frozen == "matmul":
            inner = model.get_base_model()
            assert inner.lm_head.weight.dtype == torch.bfloat16
            assert inner.model.embed_tokens.weight.dtype == torch.float32
            assert inner.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == \
                torch.bfloat16
            assert inner.model.norm.weight.dtype == torch.float32
            assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == \
                {torch.float32}
    assert torch.equal(out["fp32"][0], out["matmul"][0])
    assert out["fp32"][1].keys() == out["matmul"][1].keys() and out["fp32"][1]
    for name, g in out["fp32"][1].items():
        assert torch.equal(g, out["matmul"][1][name]), name


# ---------------------------------------------------------------- the merged SFT adapter

def _random_sft_adapter(cfg, path):
    torch.manual_seed(1)
    model = modeling.add_lora(modeling.load_base_model(cfg.model, CPU), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    modeling.save_adapter(model, modeling.load_tokenizer(cfg.model), path)
    return path


def _logprobs(model, x):
    from posttrain import objectives as O
    with torch.no_grad():
        return O.gather_logprobs(model(input_ids=x).logits[0, :-1], x[0, 1:]).float()


def _nudge_rl(model, seed=2):
    """Set the RL adapter's weights, the same values by name in every policy."""
    for n, p in model.named_parameters():
        if "lora_" in n and ".rl." in n:
            g = torch.Generator().manual_seed(seed + sum(map(ord, n)))
            p.data = torch.randn(p.shape, generator=g) * 0.2


def test_merged_sft_is_the_same_policy(tiny_cfg, tmp_path):
    """fast.merged_sft: the SFT adapter merged into the base (RL's the only adapter) gives
    the unmerged policy's log-probs (fp32: to 1e-5), with the RL adapter on and off; an RL
    adapter saved from one loads into the other."""
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    cfg = tiny_cfg()
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    plain = modeling.load_policy(tiny_cfg("fast.merged_sft=false"), CPU, sft, rl="new").eval()
    merged = modeling.load_policy(cfg, CPU, sft, rl="new").eval()
    assert list(merged.peft_config) == ["rl"] and set(plain.peft_config) == {"sft", "rl"}
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == \
        {n for n, p in plain.named_parameters() if p.requires_grad}
    sft_alone = modeling.load_policy(cfg, CPU, sft, with_base=True).eval()
    torch.testing.assert_close(_logprobs(merged, x), _logprobs(sft_alone, x),
                               rtol=0, atol=1e-5)
    for model in (plain, merged):
        _nudge_rl(model)
    on = _logprobs(merged, x)
    assert (on - _logprobs(sft_alone, x)).abs().max() > 1e-3   # the RL adapter does act
    torch.testing.assert_close(on, _logprobs(plain, x), rtol=0, atol=1e-5)
    with modeling.sft_only(merged):
        torch.testing.assert_close(_logprobs(merged, x), _logprobs(sft_alone, x),
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(_logprobs(merged, x), on, rtol=0, atol=0)  # back on
    modeling.save_adapter(merged, modeling.load_tokenizer(cfg.model), tmp_path / "rl", "rl")
    again = modeling.load_policy(tiny_cfg("fast.merged_sft=false"), CPU, sft,
                                 rl=tmp_path / "rl").eval()
    torch.testing.assert_close(_logprobs(again, x), on, rtol=0, atol=1e-5)


def test_merged_sft_keeps_the_base_when_asked(tiny_cfg, tmp_path):
    """with_base keeps the SFT adapter (the base model is its adapter disabled); a
    4-bit-free policy without RL is the merged model itself."""
    cfg = tiny_cfg()
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    kept = modeling.load_policy(cfg, CPU, sft, with_base=True)
    assert list(kept.peft_config) == ["sft"]
    merged = modeling.load_policy(cfg, CPU, sft)
    assert not hasattr(merged, "peft_config")


# ---------------------------------------------------------------- fused projections

def _rl_logprobs_and_grads(model, x, dtype):
    from posttrain import objectives as O
    model.zero_grad(set_to_none=True)
    with modeling.autocast(CPU, dtype):
        logits = model(input_ids=x).logits[0, :-1]
    lp = O.gather_logprobs(logits, x[0, 1:]).float()
    lp.sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_projections_are_the_same_sum(tiny_cfg, tmp_path, precision):
    """fast.fused_projections: q/k/v and gate/up as one matmul each (plus the stacked
    LoRA pair) give the per-projection policy's log-probs and RL gradients: in float64 to
    1e-10 (the same math), fp32 to float rounding, bf16 within its rounding (the adapter's
    product is rounded once, not three times); with the RL adapter disabled it is the SFT
    policy."""
    if precision == "bf16" and not modeling.bf16_supported(CPU):
        pytest.skip("this CPU has no bf16")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    over = (f"model.precision={precision}", "rl.lora_dropout=0")
    sft = _random_sft_adapter(tiny_cfg(*over), tmp_path / "sft")
    out, models = {}, {}
    for fused in (False, True):
        cfg = tiny_cfg(*over, f"fast.fused_projections={str(fused).lower()}")
        model = modeling.load_policy(cfg, CPU, sft, rl="new").train()
        _nudge_rl(model)
        models[fused] = model
        out[fused] = _rl_logprobs_and_grads(model, x, dtype)
        if precision == "bf16":   # the same weights without autocast: the exact sum
            out[fused, "f32"] = _rl_logprobs_and_grads(copy.deepcopy(model).float(), x,
                                                       torch.float32)
        if precision == "fp32":
            out[fused, "f64"] = _rl_logprobs_and_grads(copy.deepcopy(model).double(), x,
                                                       torch.float32)
    attn = models[True].get_base_model().model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == "FusedLinear"
    assert type(models[False].get_base_model().model.layers[0].self_attn.q_proj).__name__ \
        == "Linear"
    # the frozen weights are rows of one side-by-side copy, not a second copy
    q, k = attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    if precision == "fp32":
        torch.testing.assert_close(out[True, "f64"][0], out[False, "f64"][0], rtol=0,
                                   atol=1e-10)
        for name, g in out[False, "f64"][1].items():
            torch.testing.assert_close(out[True, "f64"][1][name], g, rtol=0,
                                       atol=1e-10 * g.abs().max().item())
    assert out[True][1].keys() == out[False][1].keys() and len(out[True][1]) == \
        2 * 7 * 2    # A and B of 7 projections in 2 layers
    if precision == "fp32":
        torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
        for name, g in out[False][1].items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(out[True][1][name], g, rtol=0,
                                       atol=1e-4 * g.abs().max().item())
    else:  # bf16: each path about as far from the exact sum (its weights in fp32) as the
        # other (a wrong scale or slice would be off by O(1))
        exact = out[False, "f32"]

        def errors(got):
            rel = [((got[1][n] - g).norm() / g.norm()).item() for n, g in exact[1].items()]
            return (got[0] - exact[0]).abs().max().item(), sum(rel) / len(rel)
        (lp_fused, grad_fused), (lp_plain, grad_plain) = errors(out[True]), errors(out[False])
        assert lp_fused <= 3 * lp_plain + 1e-2, (lp_fused, lp_plain)
        assert grad_fused <= 2 * grad_plain + 1e-2, (grad_fused, grad_plain)
    # a copy (the merged sampler's) mid-group: its own members, no outputs in flight
    with modeling.autocast(CPU, dtype):
        attn.q_proj(torch.randn(1, 3, 64))
    assert set(attn.q_proj._posttrain_group.pending) == {1, 2}
    twin_model = copy.deepcopy(models[True])
    twin = twin_model.get_base_model().model.layers[0].self_attn
    group = twin.q_proj._posttrain_group
    assert group.members == [twin.q_proj, twin.k_proj, twin.v_proj] and not group.pending
    torch.testing.assert_close(_rl_logprobs_and_grads(twin_model, x, dtype)[0],
                               out[True][0], rtol=0, atol=0)
    # disabled (the frozen SFT policy) it runs peft's forward, and agrees too
    with torch.no_grad(), modeling.sft_only(models[True]), modeling.sft_only(models[False]), \
            modeling.autocast(CPU, dtype):
        torch.testing.assert_close(_logprobs(models[True], x), _logprobs(models[False], x),
                                   rtol=0, atol=1e-5)


def test_fused_projections_leave_dropout_alone(tiny_cfg, tmp_path):
    """A LoRA layer with dropout draws its own mask per projection: it is not fused."""
    cfg = tiny_cfg("rl.lora_dropout=0.1", "fast.fused_projections=true")
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    model = modeling.load_policy(cfg, CPU, sft, rl="new").train()
    from posttrain.model.fused import _fusable
    group = model.get_base_model().model.layers[0].self_attn.q_proj._posttrain_group
    assert not _fusable(group)
    x = torch.tensor([[3, 4, 5, 6, 7, 8]])
    model(input_ids=x).logits.sum().backward()   # peft's own forward, gradients flow
    assert group.x is None and not group.pending


def test_no_prompt_grad_needs_the_shared_prompt_pass():
    """rl.prompt_grad=false with the shared prompt pass off: a config error naming both keys;
    with `auto` resolved off (CUDA), the step says so before it runs anything."""
    from types import SimpleNamespace
    from posttrain.config import ConfigError
    from posttrain.rl.step import StepContext, step_passes
    with pytest.raises(ConfigError, match="rl.prompt_grad=false needs the shared prompt pass"):
        load_config("demo", ("rl.prompt_grad=false", "rl.share_prompt=false"))
    cfg = load_config("demo", ("rl.prompt_grad=false",))
    ctx = StepContext(None, SimpleNamespace(device=CUDA), cfg, 0, 1, 0.1)
    with pytest.raises(ConfigError, match="rl.share_prompt='auto' turns off on cuda"):
        step_passes(ctx, [], None, None, None)
    with pytest.raises(ConfigError, match="rl.share_prompt='auto' turns off on cuda"):
        DeviceChoices(cfg, CUDA).check()
    DeviceChoices(cfg, CPU).check()                                   # shared there
    DeviceChoices(load_config("demo", ("rl.prompt_grad=false", "rl.share_prompt=true")),
                  CUDA).check()


def test_a_run_checks_the_device_choices_before_any_stage(tmp_path, monkeypatch):
    """`posttrain run` and a single stage stop on settings that cannot run together on the
    resolved device before anything is written."""
    from posttrain import pipeline
    from posttrain.config import ConfigError
    monkeypatch.setattr(pipeline, "resolve_device", lambda model: CUDA)
    cfg = load_config("demo", ("rl.prompt_grad=false", f"out_dir={tmp_path / 'run'}"))
    for call in (lambda: pipeline.run(cfg), lambda: pipeline.run_stage(cfg, "sft")):
        with pytest.raises(ConfigError, match="rl.prompt_grad=false needs the shared prompt"):
            call()
    assert not (tmp_path / "run").exists()
