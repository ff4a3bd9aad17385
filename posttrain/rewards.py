"""Length rewards, by name. Each takes the lengths of a batch of completions (chars or
tokens, as configured) and the statistics of the generated set, and returns rewards.

    zscore         the seed's 1 - |z|, z = (len - centre) / std of the set; centre = the set's
                   mean (or `reward.target`): peaks at 1 for an average-length summary
    target_length  1 - |len - target| / width: peaks at 1 at the length the user asks for
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from posttrain.config import RewardConfig


@dataclass(frozen=True)
class LengthStats:
    """Mean and std of completion length over a generated set (same unit as the reward)."""
    mean: float
    std: float


def zscore(lengths: torch.Tensor, stats: LengthStats, cfg: RewardConfig) -> torch.Tensor:
    """1 - |z| with z = (len - centre) / std (the seed's score is -z of -len: same |z|)."""
    centre = stats.mean if cfg.target is None else cfg.target
    return 1.0 - ((lengths - centre) / max(stats.std, 1e-8)).abs()


def target_length(lengths: torch.Tensor, stats: LengthStats, cfg: RewardConfig) -> torch.Tensor:
    """1 - |len - target| / width; width defaults to the set's std."""
    width = cfg.width if cfg.width is not None else max(stats.std, 1e-8)
    return 1.0 - (lengths - cfg.target).abs() / width


REWARDS: dict[str, Callable] = {"zscore": zscore, "target_length": target_length}


def compute(lengths: torch.Tensor, stats: LengthStats, cfg: RewardConfig) -> torch.Tensor:
    return REWARDS[cfg.name](lengths.float(), stats, cfg)
