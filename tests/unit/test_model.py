import json

import pytest
import torch

from posttrain.model.adapters import add_lora, load_adapter, save_adapter
from posttrain.model.load import (
    ModelError,
    autocast,
    bf16_supported,
    compute_dtype,
    embedded_gguf,
    embedded_model_dir,
    load_base_model,
    load_tokenizer,
    resolve_device,
)
from posttrain.model import load as model_load
from posttrain.config import LoraConfig, ModelConfig, load_config
from posttrain.data import collate, load_rows, tokenize_rows
from posttrain.sft import completion_loss


def test_qlora_on_cpu_is_a_clear_error():
    with pytest.raises(ModelError, match="load_in_4bit=true.*needs a CUDA GPU"):
        model_load._bnb_config(load_config("demo").model, torch.device("cpu"))


def test_precision_choices():
    cpu = torch.device("cpu")
    assert compute_dtype(ModelConfig(precision="fp32"), cpu) == torch.float32
    auto = compute_dtype(ModelConfig(precision="auto"), cpu)
    assert auto == (torch.bfloat16 if bf16_supported(cpu) else torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device(ModelConfig(device="cuda"))


def test_lora_wraps_only_named_modules(tiny_model_dir):
    base = load_base_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    model = add_lora(base, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    with pytest.raises(ModelError, match="nonexistent_proj"):
        add_lora(load_base_model(ModelConfig(name=str(tiny_model_dir)),
                                                   torch.device("cpu")),
                          LoraConfig(target_modules=["nonexistent_proj"]))


def test_adapter_for_another_base_model_is_refused(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, torch.device("cpu")), LoraConfig(rank=2))
    save_adapter(model, tok, tmp_path / "adapter")
    fresh = load_base_model(cfg, torch.device("cpu"))
    load_adapter(fresh, tmp_path / "adapter")          # same base: fine
    conf = tmp_path / "adapter" / "adapter_config.json"
    data = json.loads(conf.read_text())
    data["base_model_name_or_path"] = "someone/other-model"
    conf.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="trained on 'someone/other-model'"):
        load_adapter(load_base_model(cfg, torch.device("cpu")), tmp_path / "adapter")
    with pytest.raises(ModelError, match="not a saved adapter"):
        load_adapter(fresh, tmp_path)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model.name="):
        load_tokenizer(ModelConfig(name=str(tmp_path / "no-such-model")))


@pytest.mark.slow
def test_embedded_smollm2_loads_and_scores_a_tldr_prompt():
    """The embedded model converts from its GGUF (once), loads from the cache, and its loss
    on a TL;DR completion is that of a model that reads English (not of random weights)."""
    cfg = load_config(None, ("model.precision=fp32",))
    path = embedded_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, torch.device("cpu"))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    rows = load_rows("sample", "validation", cfg.data)[:4]
    ex, _ = tokenize_rows(rows, tok, cfg.data)
    with torch.no_grad():
        loss = completion_loss(model, collate(ex, tok.pad_token_id)).item()
    assert 1.0 < loss < 4.5, loss          # random weights would give ~log(49152) = 10.8


@pytest.mark.slow
def test_converting_the_embedded_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """The first run on a machine converts the GGUF (a model built from its config, randomly
    initialised): it must draw what a later run draws, so the conversion forks the RNG."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    torch.manual_seed(42)
    before = torch.get_rng_state().clone()
    path = embedded_model_dir()
    assert (path / "config.json").is_file() and str(path).startswith(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_embedded_checksum_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(model_load, "EMBEDDED_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="sha256.*does not match"):
        embedded_gguf()


def test_frozen_weights_in_the_compute_dtype(tiny_model_dir):
    """model.frozen_dtype=compute stores the frozen base in bf16 (LoRA stays fp32) and gives
    the fp32-weight model's log-probs up to bf16 rounding."""
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    from posttrain import objectives as O
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    out = {}
    for frozen in ("fp32", "compute"):
        cfg = ModelConfig(name=str(tiny_model_dir), precision="bf16", frozen_dtype=frozen)
        model = add_lora(load_base_model(cfg, torch.device("cpu")),
                                  LoraConfig(rank=4, alpha=8))
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        assert dtypes == {torch.float32 if frozen == "fp32" else torch.bfloat16}
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
            logits = model(input_ids=x).logits[0, :-1]
        out[frozen] = O.gather_logprobs(logits, x[0, 1:])
    torch.testing.assert_close(out["compute"], out["fp32"], rtol=0.05, atol=0.05)
