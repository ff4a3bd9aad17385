"""LoRA adapters on the frozen base: fresh ones for SFT, the SFT + RL policy (one model,
two adapters: with the RL adapter off it is the frozen SFT policy), saving and loading
them, and the merged copy the samplers run."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from posttrain.config import LoraConfig
from posttrain.io import atomic_dir, read_json
from posttrain.model.load import (ModelError, autocast, check_context, load_base_model,
                                  store_frozen)


@contextmanager
def quiet_peft():
    """peft calls that warn about what a user cannot act on, with exactly those warnings
    filtered: PeftModel (peft 0.21) reads transformers 5.2x's deprecated
    `is_gradient_checkpointing` (a FutureWarning); merge_and_unload warns that the input and
    output embeddings are no longer tied (a UserWarning: the LoRA targets the projections
    only, so the merged LM head equals the embedding anyway)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer "
                                "tied after merging", category=UserWarning)
        yield


def _peft_config(cfg: LoraConfig, dropout: float | None = None):
    from peft import LoraConfig as PeftLoraConfig  # heavy: peft imports transformers

    dropout = cfg.dropout if dropout is None else dropout
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def add_lora(model, cfg: LoraConfig, quantized: bool = False):
    """Wrap `model` with fresh, trainable LoRA adapters (peft)."""
    # heavy: peft imports transformers
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with quiet_peft():
            return get_peft_model(model, _peft_config(cfg))
    except ValueError as e:
        raise ModelError(f"lora.target_modules={list(cfg.target_modules)}: {e}") from e


def load_adapter(model, path: Path, trainable: bool = False, name: str = "default"):
    """Load a saved peft adapter onto `model`; refuses one made for another base model."""
    from peft import PeftModel  # heavy: peft imports transformers

    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no adapter_config.json; not a saved adapter")
    saved = read_json(cfg_file, "redo the stage that made it with --force").get(
        "base_model_name_or_path")
    ours = getattr(model.config, "name_or_path", None)
    if saved and ours and saved != ours and not (Path(saved).is_dir() and Path(ours).is_dir()
                                                 and Path(saved).name == Path(ours).name):
        raise ModelError(f"{path}: adapter was trained on {saved!r}, not on {ours!r}")
    from safetensors import SafetensorError

    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(path), adapter_name=name,
                                             is_trainable=trainable)
    except SafetensorError as e:
        raise ModelError(f"{path}: the adapter's weights file is damaged or incomplete ({e}); "
                         "redo the stage that made it with --force") from None


def save_adapter(model, tokenizer, path: Path, adapter: str | None = None,
                 state_dict: dict | None = None) -> None:
    """Save the LoRA weights (one named adapter, or all) and the tokenizer, atomically.
    `state_dict`: the weights to save by parameter name (FSDP's gathered shards), in place of
    the model's own."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    with atomic_dir(Path(path)) as tmp:
        if adapter is None:
            model.save_pretrained(tmp, **extra)
        else:  # peft writes a non-default adapter into a subfolder of its name
            model.save_pretrained(tmp, selected_adapters=[adapter], **extra)
            for f in (tmp / adapter).iterdir():
                f.rename(tmp / f.name)
            (tmp / adapter).rmdir()
        tokenizer.save_pretrained(tmp)


# ---------------------------------------------------------------- SFT + RL policy
SFT, RL = "sft", "rl"


def load_policy(cfg, device: torch.device, sft_dir: Path, rl: str | Path | None = None,
                with_base: bool = False):
    """The SFT model (base + frozen SFT adapter), plus an RL adapter on top when `rl` is a
    saved adapter's folder or "new" (fresh LoRA: the policy starts equal to the SFT model).
    With the RL adapter disabled (`sft_only`) the same weights are the frozen SFT policy, so
    no second model is held in memory. Unless the base is 4-bit, the SFT adapter is merged
    into the base weights (in fp32, so one adapter runs per forward: the same policy up to
    float rounding, as the tests check); `with_base` keeps it an adapter, for a caller that
    also runs the bare base model (the adapter disabled)."""
    if not (Path(sft_dir) / "adapter_config.json").is_file():
        raise ModelError(f"{sft_dir}: no SFT adapter; run `posttrain sft` first")
    merge = not cfg.model.load_in_4bit and not with_base
    base = load_base_model(cfg.model, device, store=False)
    check_context(cfg, base)
    model = load_adapter(base, sft_dir, trainable=False, name=SFT)
    if merge:  # in fp32, before the frozen weights are stored in their dtype
        with quiet_peft():
            model = store_frozen(model.merge_and_unload(), cfg.model, device)
        return model if rl is None else skip_input_casts(_with_rl(model, cfg, rl))
    store_frozen(model, cfg.model, device)
    # The SFT adapter is frozen: no dropout on it even in train mode, or pi_sft would be
    # noisy in the ratio and the KL.
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and SFT in dropout:
            dropout[SFT] = torch.nn.Identity()
    if rl is None:
        return model
    if rl == "new":
        model.add_adapter(RL, _peft_config(cfg.lora, cfg.rl.lora_dropout))
    else:
        model.load_adapter(str(rl), adapter_name=RL, is_trainable=True)
    _activate(model, (SFT, RL))
    return skip_input_casts(model)


def skip_input_casts(model):
    """LoRA layers without dropout take their input as it comes (under autocast the
    adapter's matmul casts it to bf16 either way; peft would upcast it to fp32 first, and
    autocast back: the same numbers, two copies per layer; the tests compare both)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and \
                hasattr(module, "cast_input_dtype_enabled") and \
                all(isinstance(d, torch.nn.Identity) for d in dropouts.values()):
            module.cast_input_dtype_enabled = False
    return model


def _with_rl(model, cfg, rl):
    """The merged SFT model with the RL adapter (fresh or saved) as its only adapter."""
    from peft import PeftModel, get_peft_model  # heavy: peft imports transformers

    if rl == "new":
        with quiet_peft():
            return get_peft_model(model, _peft_config(cfg.lora, cfg.rl.lora_dropout),
                                  adapter_name=RL)
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(rl), adapter_name=RL, is_trainable=True)


def _activate(model, adapters: tuple) -> None:
    """Make `adapters` active together; only the RL adapter's weights train."""
    model.base_model.set_adapter(list(adapters) if len(adapters) > 1 else adapters[0])
    for name, p in model.named_parameters():
        p.requires_grad = f".{RL}." in name


@contextmanager
def sft_only(model):
    """Run the policy with its RL adapter disabled: the frozen SFT model (with the SFT
    adapter active, or merged into the base weights)."""
    if SFT not in model.peft_config:
        with model.disable_adapter():
            yield model
        return
    _activate(model, (SFT,))
    try:
        yield model
    finally:
        _activate(model, (SFT, RL))


def sharded(model) -> bool:
    """Whether FSDP (FSDP2's fully_shard) holds the trainable weights in shards (DTensors)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # only what FSDP2 makes is one

    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


@contextmanager
def whole_weights(model):
    """Under FSDP2: every sharded module's weights gathered (every process, in the same
    order) and kept whole while the body runs forwards of its own, as many as it likes with
    no collective (sampling: each process's samples end at other lengths), then sharded
    again. Without FSDP: nothing to do."""
    if not sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule  # only FSDP2's modules are ones

    done = []
    try:
        for m in (m for m in model.modules() if isinstance(m, FSDPModule)):
            done.append(m)
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        yield model
    finally:   # fsdp.yaml reshards after forward (fsdp_reshard_after_forward: true)
        for m in done:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


@contextmanager
def sampler(model, cfg, device: torch.device, dtype: torch.dtype):
    """Yield the model to sample from, as it is now (active adapters, or all disabled).
    With `model.merged_sampling` (and no 4-bit base): a copy with the active LoRA adapters
    merged into its weights and cast to `dtype`, run without autocast (no per-call weight
    casts, no adapter matmuls). Otherwise `model` itself under autocast; under FSDP, with its
    weights gathered whole for the while (FSDP refuses a copy)."""
    if not cfg.merged_sampling or cfg.load_in_4bit or sharded(model):
        with autocast(device, dtype), whole_weights(model):
            yield model
        return
    fast = copy.deepcopy(model)
    if hasattr(fast, "merge_and_unload"):
        disabled = any(getattr(m, "disable_adapters", False) for m in fast.modules()
                       if hasattr(m, "lora_A"))
        with quiet_peft():
            fast = fast.unload() if disabled else fast.merge_and_unload()
    fast = fast.to(dtype).eval()
    try:
        yield fast
    finally:
        del fast
