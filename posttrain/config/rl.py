"""The `rl` section: one flat dataclass (rl.iterations, rl.max_lr, ...), its fields in the
order `--help` and the YAML show them: the PPO step, online rounds, offline passes, the
optimizer, the advantage, the KL, the held-out checks. The rules between rl and the other
sections (and rl.prompt_grad with rl.share_prompt) are Config's, in schema.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from posttrain.config.base import ConfigError, _auto_bool, _choice, _positive, check_optim


@dataclass(frozen=True)
class RLConfig:
    """The `rl` section. rl.target_range is checked by Config, beside the data.length_cue it
    goes with."""
    # ---- the PPO step
    mode: str = "offline"
    """`offline`: the reference recipe, PPO-style passes over the generated set (samples of
    the SFT policy). `online`: each iteration samples from the current policy
    (generate.samples_per_prompt per prompt, generate's sampling settings), scores the
    samples and takes PPO steps on them; the ratio is against the sampling policy, the KL
    against the frozen SFT model (the same weights with the RL adapter off)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 means run `epochs`."""
    batch_size: int = 8
    """Samples per micro-batch, rounded down to whole prompt groups (at least one group)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Advantages are whitened over one step's samples."""
    lora_dropout: float = 0.0
    """Dropout on the RL adapter's input. 0 keeps the policy deterministic, so the PPO ratio
    measures the update and not dropout noise (and the step skips the dropout work); the
    reference recipe's config sets 0.1 (lora.dropout is the SFT adapter's)."""
    share_prompt: Union[bool, str] = "auto"
    """Run each prompt once for all its samples in a training step (exact: gradients flow
    through the shared cache). false runs every sample with its own copy of the prompt.
    `auto`: true on CPU, false on CUDA (docs/speed.md's H200 table: there the two passes in
    sequence cost more than the repeated prompt saves)."""
    prompt_grad: bool = True
    """true: the gradient flows through the shared prompt's keys and values (the exact
    gradient). false: the prompt but its last token runs without gradient (no backward
    through it, none of its activations kept), so the adapter learns only from the
    completion positions (and the prompt's last): a different, cheaper gradient, not a
    rounding of this one. Needs the shared prompt pass (rl.share_prompt true, or auto on
    CPU)."""
    loss_agg: str = "token"
    """`token`: the loss is averaged over all completion tokens of the step (the reference
    recipe). `sequence`: averaged within each sample, then over samples. `summary`: summed
    over each sample's tokens, then averaged over samples, the policy and the KL term alike:
    beta then weighs the KL in nats per summary (the unit of the best-of-N budget) against
    a sample's advantage in reward units."""
    clip_eps: float = 0.3
    """PPO clip range epsilon: the ratio is clipped to [1 - eps, 1 + eps]."""
    # ---- online rounds (rl.mode=online)
    iterations: int = 16
    """online: sampling rounds."""
    prompts_per_iteration: int = 8
    """online: prompts drawn (with replacement, seeded) per round from generate.prompts (or
    data.train); each gets generate.samples_per_prompt samples."""
    ppo_epochs: int = 1
    """online: passes over each round's samples (each pass is one or more optimizer steps of
    batch_size x grad_accum samples)."""
    # ---- offline passes (rl.mode=offline)
    epochs: float = 1.0
    """offline: passes over the generated set."""
    # ---- the optimizer
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
    # ---- the advantage
    advantage: str = "per_token"
    """`per_token` (the reference recipe's; `seed` is the same, its old name): reward /
    completion tokens on every token, whitened over the step's tokens and clamped. `group`:
    reward minus the mean reward of the samples of the same prompt (one value for all of a
    sample's tokens), divided by the group's std if `group_std`. `stop`: counterfactual
    credit for the stop decision at every position (the reward had the sample stopped
    there, minus the reward it got), applied to the policy's EOS probability. `group_stop`:
    both `group` on every token and `stop` (scaled by `stop_weight`) in one loss. With
    reward.ending set, the stop credit counts only positions where stopping would end
    cleanly (stopping mid-sentence has no counterfactual: the group term punishes it)."""
    group_std: bool = False
    """With advantage=group or group_stop: divide by the group's reward std (GRPO) or not
    (Dr. GRPO)."""
    stop_weight: float = 1.0
    """With advantage=group_stop: the weight of the stop credit beside the group term."""
    baseline: str = "group"
    """With advantage=group or group_stop, what a reward is compared with: `group`, the mean
    reward of the same prompt's samples (GRPO), or `step`, the mean over the optimizer
    step's samples (all prompts). A group baseline cannot see a prompt whose samples are all
    too long or all too short, so it leaves the between-prompt part of the length spread
    alone; `step` pushes on it too (the length target is the same for every prompt)."""
    adv_clamp: float = 3.0
    """Whitened advantages are clamped to [-adv_clamp, adv_clamp]."""
    # ---- the KL penalty against the frozen SFT policy
    kl_control: str = "fixed"
    """`fixed`: beta stays `beta`. `adaptive_summary`: a proportional controller steers the
    KL per summary (k3 summed over a sample's tokens) to the best-of-N budget
    log N - (N-1)/N, the KL of best-of-N sampling. `adaptive_token`: the reference
    recipe's controller, which steers the per-token KL to that same number."""
    beta: float = 0.01
    """KL coefficient (the start value when adaptive)."""
    best_of_n: int = 3
    """N of the best-of-N KL budget log N - (N-1)/N, in nats per summary (N=3 gives 0.432):
    the report compares the RL policy's KL per summary with it."""
    kl_horizon: int = 100
    """Adaptive controller horizon in steps: larger moves beta more slowly."""
    # ---- the held-out length checks during RL
    eval_every: int = 0
    """Sample on held-out prompts every this many steps and log the length mean and std
    (0: only before and after training)."""
    eval_prompts: int = 16
    """Held-out prompts (from data.eval) sampled at each periodic evaluation."""
    eval_samples_per_prompt: int = 2
    """Samples per held-out prompt at each periodic evaluation."""
    # ---- length-conditioned prompts and checkpoints
    target_range: Optional[list] = None
    """With length-conditioned prompts (data.length_cue): [min, max] lengths; each prompt RL
    trains on asks for one drawn uniformly from this range, and the reward is centred on it."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every this many steps; 0 disables."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    def __post_init__(self):
        if self.advantage == "seed":   # the old name of per_token
            object.__setattr__(self, "advantage", "per_token")
        if self.kl_control == "adaptive":
            raise ConfigError("rl.kl_control=adaptive is now named for what it steers: "
                              "adaptive_token (the reference recipe: the per-token KL) or "
                              "adaptive_summary (the KL per summary)")
        for name, allowed in (("mode", ("offline", "online")),
                              ("loss_agg", ("token", "sequence", "summary")),
                              ("advantage", ("per_token", "group", "stop", "group_stop")),
                              ("baseline", ("group", "step")),
                              ("kl_control", ("fixed", "adaptive_token", "adaptive_summary"))):
            _choice(getattr(self, name), f"rl.{name}", allowed)
        for name in ("batch_size", "grad_accum", "clip_eps", "iterations",
                     "prompts_per_iteration", "ppo_epochs", "epochs", "adv_clamp", "best_of_n",
                     "kl_horizon", "eval_prompts", "eval_samples_per_prompt",
                     "keep_checkpoints"):
            _positive(getattr(self, name), f"rl.{name}")
        for name in ("stop_weight", "eval_every", "checkpoint_every"):
            _positive(getattr(self, name), f"rl.{name}", allow_zero=True)
        _positive(self.beta, "rl.beta", allow_zero=self.kl_control == "fixed")
        _auto_bool(self.share_prompt, "rl.share_prompt")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"rl.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"rl.clip_eps={self.clip_eps!r} must be in (0, 1)")
        check_optim(self, "rl")
