"""The config sections of the two sampling stages: `generate` (the set offline RL trains on)
and `eval` (the held-out comparison)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from posttrain.config.base import ConfigError, _auto_bool, _choice, _positive


@dataclass(frozen=True)
class GenerateConfig:
    prompts: Optional[str] = None
    """Where the prompts are drawn from (any data source); null means `data.train`."""
    prompts_split: Optional[str] = None
    """Split of `prompts`; null means `data.train_split`."""
    num_samples: int = 512
    """Completions to generate in all (the reference recipe: 10,000)."""
    samples_per_prompt: int = 4
    """Completions per drawn prompt, sharing one prompt pass. 1 reproduces the reference
    recipe's draw (every sample from an independently drawn prompt)."""
    batch_size: int = 16
    """Prompts per sampling batch (each gives samples_per_prompt rows)."""
    max_new_tokens: int = 300
    """Longest completion; a sample that reaches it without EOS is marked truncated."""
    temperature: float = 1.0
    """Sampling temperature (the reference recipe: 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the reference recipe: 1, no filtering)."""
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
    group_by_length: Union[bool, str] = "auto"
    """Batch the drawn prompts in order of length (less left-padding in the prompt pass and
    the cache); false keeps the draw order (the plain way, for comparison). `auto`: true on
    CPU, false on CUDA (docs/speed.md's H200 table: unsorted batches sampled faster there)."""
    backend: str = "hf"
    """Who samples the generation stage's set: `hf` (posttrain's sampler: one prompt pass
    per group, finished rows leave the batch) or `vllm` (CUDA and the vllm package; the
    behaviour log-probs are still computed by the SFT policy's own forward). Online RL
    rounds always sample with `hf`."""

    def __post_init__(self):
        _choice(self.backend, "generate.backend", ("hf", "vllm"))
        _auto_bool(self.group_by_length, "generate.group_by_length")
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
    least 200 samples per model: a variance from fewer swings widely between draws."""
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
