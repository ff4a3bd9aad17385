"""The config schema: the top-level Config (here) and its sections, one frozen dataclass each
(sections.py, sampling.py, rl.py, on what base.py holds: ConfigError and the checks).
Every rule between fields of different sections (or of rl's parts) is Config's, here.
Every field carries a docstring (the string literal under it); `posttrain <stage> --help`
prints them. Sizes that follow from other fields are properties, never
written back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config.base import ConfigError
from posttrain.config.rl import RLConfig
from posttrain.config.sampling import EvalConfig, GenerateConfig
from posttrain.config.sections import (DataConfig, FastConfig, LoraConfig, ModelConfig,
                                       RewardConfig, SFTConfig)

DEFAULTS = "defaults"
"""`--config defaults`: no file, the dataclass defaults (the reference recipe)."""


@dataclass(frozen=True)
class Config:
    out_dir: str = "runs/default"
    """Run directory: every stage reads its inputs from here and writes its outputs here."""
    seed: int = 42
    """Seed for data order, dropout and sampling."""
    timeout_minutes: float = 30.0
    """Under `accelerate launch`: how long a process waits for the others at a collective
    (a gradient all-reduce, a gather) before the run fails. The stages the main process
    runs alone (generate, eval, plot, view) are waited for without this limit."""
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
        """The rules between fields, all of them in one place (and the top-level values)."""
        if not self.timeout_minutes > 0:
            raise ConfigError(f"timeout_minutes={self.timeout_minutes!r} must be > 0")
        rl = self.rl
        if not rl.prompt_grad and rl.share_prompt is False:   # `auto`: DeviceChoices.check
            raise ConfigError("rl.prompt_grad=false needs the shared prompt pass: set "
                              "rl.share_prompt=true (or auto, on CPU)")
        if rl.kl_control == "adaptive_token" and rl.loss_agg == "summary":
            raise ConfigError("rl.kl_control=adaptive_token steers a per-token KL; with "
                              "rl.loss_agg=summary use adaptive_summary or fixed")
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
