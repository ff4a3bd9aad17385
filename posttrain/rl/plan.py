"""Which samples each optimizer step trains on: steps -> micro-batches -> prompt groups ->
sample indices (types.StepPlan), fixed by the seed."""
from __future__ import annotations

import math

import torch

from posttrain import seeds
from posttrain.config import Config
from posttrain.types import MicroBatch, Rollout, Step, StepPlan


def step_plan(rollouts: list[Rollout], cfg: Config, epochs: float | None = None,
              seed: int | None = None, world: int = 1) -> StepPlan:
    """The plan: a micro-batch holds rl.batch_size samples, rounded down to whole prompt
    groups; a step holds rl.grad_accum micro-batches per process (`world` processes share
    it). `epochs` passes (default rl.epochs), each in its own seeded order."""
    epochs = cfg.rl.epochs if epochs is None else epochs
    seed = cfg.seed if seed is None else seed
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group, []).append(i)
    groups_list = [tuple(g) for g in groups.values()]
    per_micro = max(1, cfg.rl.batch_size // len(groups_list[0]))
    order = []
    for epoch in range(math.ceil(epochs)):
        gen = seeds.generator(seeds.plan_epoch(seed, epoch))
        order += torch.randperm(len(groups_list), generator=gen).tolist()
    order = [groups_list[i] for i in order[:int(round(epochs * len(groups_list)))]]
    per_step = cfg.rl.grad_accum * world
    # a step's groups by prompt length: less left padding in a shared prompt pass, the same
    # samples and the same gradient sum
    span = per_step * per_micro
    order = [g for s in range(0, len(order), span) for g in sorted(
        order[s:s + span], key=lambda g: len(rollouts[g[0]].prompt_ids))]
    micro = [MicroBatch(tuple(order[i:i + per_micro])) for i in range(0, len(order), per_micro)]
    return [Step(tuple(micro[i:i + per_step])) for i in range(0, len(micro), per_step)]


def steps_per_round(cfg: Config, world: int = 1) -> int:
    """Optimizer steps of one online round (all its PPO epochs)."""
    groups_per_micro = max(1, cfg.rl.batch_size // cfg.generate.samples_per_prompt)
    micro = math.ceil(cfg.rl.prompts_per_iteration / groups_per_micro)
    return math.ceil(micro / (cfg.rl.grad_accum * world)) * cfg.rl.ppo_epochs


def lengths_of(rollouts: list[Rollout], ids: list[int]) -> torch.Tensor:
    """Completion tokens (EOS included) of the samples `ids`: (len(ids),) long."""
    return torch.tensor([len(rollouts[i].completion_ids) for i in ids])
