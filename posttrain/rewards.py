"""Length rewards, by name. Each maps the lengths of completions (chars or tokens, as
configured) to rewards, given the lengths of the whole generated set for its statistics.

    zscore         the seed's 1 - |z|, z = (len - centre) / std over the set; centre = the
                   set's mean (or `reward.target`): peaks at 1 for an average-length summary
    log_zscore     1 - |z| on log(len): symmetric in ratio, so on a right-skewed set the long
                   tail is not punished far harder than the short side
    target_length  1 - |len - target| / width: peaks at 1 at the length the user asks for
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from posttrain.config import RewardConfig


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), max(x.std(unbiased=False).item(), 1e-8)


def zscore(lengths: torch.Tensor, set_lengths: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """1 - |z|, z = (len - centre) / std (the seed's score is z of -len: the same |z|)."""
    mean, std = _mean_std(set_lengths)
    centre = mean if cfg.target is None else cfg.target
    return 1.0 - ((lengths - centre) / std).abs()


def log_zscore(lengths: torch.Tensor, set_lengths: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """1 - |z| of log(1 + len) over the set (centre: the set's mean log, or log(1 + target))."""
    mean, std = _mean_std(torch.log1p(set_lengths))
    centre = mean if cfg.target is None else math.log1p(cfg.target)
    return 1.0 - ((torch.log1p(lengths) - centre) / std).abs()


def target_length(lengths: torch.Tensor, set_lengths: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """1 - |len - target| / width; width defaults to the set's std."""
    width = cfg.width if cfg.width is not None else _mean_std(set_lengths)[1]
    return 1.0 - (lengths - cfg.target).abs() / width


REWARDS: dict[str, Callable] = {"zscore": zscore, "log_zscore": log_zscore,
                                "target_length": target_length}


def compute(lengths, set_lengths, cfg: RewardConfig) -> torch.Tensor:
    """Rewards (S,) for `lengths` (S,), with statistics from `set_lengths` (M,)."""
    return REWARDS[cfg.name](torch.as_tensor(lengths, dtype=torch.float64),
                             torch.as_tensor(set_lengths, dtype=torch.float64), cfg).float()
