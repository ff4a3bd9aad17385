"""Device-dependent `auto` settings (model/choices.py), with the device mocked; the frozen
weights' storage (model.frozen_dtype) and the merged SFT adapter."""
import json

import pytest
import torch

from posttrain import provenance
from posttrain.model.adapters import add_lora, load_policy, save_adapter, sft_only
from posttrain.model.load import autocast, bf16_supported, load_base_model, load_tokenizer
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
    with autocast(CPU, torch.bfloat16):
        logits = model(input_ids=x).logits[0, :-1]
    lp = O.gather_logprobs(logits, x[0, 1:]).float()
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


def test_matmul_storage_is_exactly_autocast_over_fp32(tiny_model_dir):
    """model.frozen_dtype=matmul stores the linear and LM-head weights in bf16 and keeps
    the embedding, norms and LoRA in fp32; under bf16 autocast its log-probs and the LoRA
    gradients equal the fp32-stored model's bit for bit."""
    if not bf16_supported(CPU):
        pytest.skip("this CPU has no bf16")
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    out = {}
    for frozen in ("fp32", "matmul"):
        cfg = ModelConfig(name=str(tiny_model_dir), precision="bf16", frozen_dtype=frozen)
        torch.manual_seed(0)
        model = add_lora(load_base_model(cfg, CPU), LoraConfig(rank=4))
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
    model = add_lora(load_base_model(cfg.model, CPU), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    save_adapter(model, load_tokenizer(cfg.model), path)
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
    """The SFT adapter merged into the base (RL's the only adapter) gives the unmerged
    policy's log-probs (with_base keeps it unmerged; fp32: to 1e-5), with the RL adapter on
    and off; an RL adapter saved from one loads into the other."""
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    cfg = tiny_cfg()
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    plain = load_policy(cfg, CPU, sft, rl="new", with_base=True).eval()
    merged = load_policy(cfg, CPU, sft, rl="new").eval()
    assert list(merged.peft_config) == ["rl"] and set(plain.peft_config) == {"sft", "rl"}
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == \
        {n for n, p in plain.named_parameters() if p.requires_grad}
    sft_alone = load_policy(cfg, CPU, sft, with_base=True).eval()
    torch.testing.assert_close(_logprobs(merged, x), _logprobs(sft_alone, x),
                               rtol=0, atol=1e-5)
    for model in (plain, merged):
        _nudge_rl(model)
    on = _logprobs(merged, x)
    assert (on - _logprobs(sft_alone, x)).abs().max() > 1e-3   # the RL adapter does act
    torch.testing.assert_close(on, _logprobs(plain, x), rtol=0, atol=1e-5)
    with sft_only(merged):
        torch.testing.assert_close(_logprobs(merged, x), _logprobs(sft_alone, x),
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(_logprobs(merged, x), on, rtol=0, atol=0)  # back on
    save_adapter(merged, load_tokenizer(cfg.model), tmp_path / "rl", "rl")
    again = load_policy(cfg, CPU, sft, rl=tmp_path / "rl", with_base=True).eval()
    torch.testing.assert_close(_logprobs(again, x), on, rtol=0, atol=1e-5)


def test_merged_sft_keeps_the_base_when_asked(tiny_cfg, tmp_path):
    """with_base keeps the SFT adapter (the base model is its adapter disabled); a
    4-bit-free policy without RL is the merged model itself."""
    cfg = tiny_cfg()
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    kept = load_policy(cfg, CPU, sft, with_base=True)
    assert list(kept.peft_config) == ["sft"]
    merged = load_policy(cfg, CPU, sft)
    assert not hasattr(merged, "peft_config")


def test_no_prompt_grad_needs_the_shared_prompt_pass():
    """rl.prompt_grad=false with the shared prompt pass off: a config error naming both keys;
    with `auto` resolved off (CUDA), DeviceChoices says so (the RL stage checks it before
    it loads the policy)."""
    from posttrain.config import ConfigError
    with pytest.raises(ConfigError, match="rl.prompt_grad=false needs the shared prompt pass"):
        load_config("demo", ("rl.prompt_grad=false", "rl.share_prompt=false"))
    cfg = load_config("demo", ("rl.prompt_grad=false",))
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


def test_skipping_peft_input_casts_gives_the_same_numbers(tiny_cfg, tmp_path):
    """RL's dropout-free LoRA layers take their bf16 input as it comes; peft's own forward
    (upcast to fp32, autocast back to bf16: the plain twin) gives the same log-probs and
    gradients, bit for bit."""
    cfg = tiny_cfg()
    sft = _random_sft_adapter(cfg, tmp_path / "sft")
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    out = {}
    for casts in (False, True):
        model = load_policy(cfg, CPU, sft, rl="new").eval()
        _nudge_rl(model)
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert layers and not any(m.cast_input_dtype_enabled for m in layers)
        for m in layers:
            m.cast_input_dtype_enabled = casts
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            from posttrain import objectives as O
            lp = O.gather_logprobs(model(input_ids=x).logits[0, :-1], x[0, 1:])
        out[casts] = lp.detach(), torch.autograd.grad(lp.sum(), params)
    assert torch.equal(out[False][0], out[True][0])
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.equal(a, b)
