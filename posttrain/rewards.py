"""Length rewards, by name. Each maps the lengths of completions (chars or tokens, as
configured) to rewards, given the lengths of the whole generated set for its statistics.

    zscore         the reference recipe's 1 - |z|, z = (len - centre) / std over the set;
                   centre = the set's mean (or `reward.target`): peaks at 1 for an
                   average-length summary
    log_zscore     1 - |z| on log(len): symmetric in ratio, so on a right-skewed set the long
                   tail is not punished far harder than the short side
    target_length  1 - |len - target| / width: peaks at 1 at the length the user asks for

With `reward.ending` set, a completion whose ending is abrupt (`is_abrupt`: cut at the token
limit, trailing off in an ellipsis, or without closing punctuation) gets that value in place
of its length reward, so RL cannot buy a length by stopping mid-sentence.
"""
from __future__ import annotations

from typing import Callable

import torch

from posttrain.config import RewardConfig

SENTENCE_END = (".", "!", "?", '"', "'", ")", "]", "*", "\u201d", "\u2019")


def is_abrupt(text: str, truncated: bool) -> bool:
    """An ending the reference recipe called abrupt: cut at the token limit (`truncated`),
    trailing off in an ellipsis, or stopping mid-sentence (no closing punctuation). The one
    rule both the ending-aware reward and the eval report use."""
    t = text.rstrip()
    return truncated or not t or t.endswith(("...", "\u2026")) or not t.endswith(SENTENCE_END)


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), max(x.std(unbiased=False).item(), 1e-8)


def _target(cfg: RewardConfig, targets, default):
    """The centre: per-sample requested lengths (length-conditioned prompts), else
    reward.target, else `default`."""
    if targets is not None:
        return targets
    return default if cfg.target is None else torch.tensor(float(cfg.target), dtype=torch.float64)


def zscore(lengths, set_lengths, cfg: RewardConfig, targets=None) -> torch.Tensor:
    """1 - |z|, z = (len - centre) / std (the reference recipe's score is z of -len: the
    same |z|)."""
    mean, std = _mean_std(set_lengths)
    return 1.0 - ((lengths - _target(cfg, targets, mean)) / std).abs()


def log_zscore(lengths, set_lengths, cfg: RewardConfig, targets=None) -> torch.Tensor:
    """1 - |z| of log(1 + len) over the set (centre: the set's mean log, or log(1 + target))."""
    mean, std = _mean_std(torch.log1p(set_lengths))
    centre = _target(cfg, targets, None)
    centre = mean if centre is None else torch.log1p(torch.as_tensor(centre, dtype=torch.float64))
    return 1.0 - ((torch.log1p(lengths) - centre) / std).abs()


def target_length(lengths, set_lengths, cfg: RewardConfig, targets=None) -> torch.Tensor:
    """1 - |len - target| / width; width defaults to the set's std."""
    width = cfg.width if cfg.width is not None else _mean_std(set_lengths)[1]
    return 1.0 - (lengths - _target(cfg, targets, None)).abs() / width


REWARDS: dict[str, Callable] = {"zscore": zscore, "log_zscore": log_zscore,
                                "target_length": target_length}


def compute(lengths, set_lengths, cfg: RewardConfig, targets=None, abrupt=None) -> torch.Tensor:
    """Rewards (S,) for `lengths` (S,), with statistics from `set_lengths` (M,); `targets`
    (S,), when given, are the lengths each sample was asked for. `abrupt` (S,) bool, when
    given and `cfg.ending` is set: those samples get `cfg.ending` instead."""
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.float64)
    r = REWARDS[cfg.name](torch.as_tensor(lengths, dtype=torch.float64),
                          torch.as_tensor(set_lengths, dtype=torch.float64), cfg, targets).float()
    if cfg.ending is not None and abrupt is not None:
        r = torch.where(torch.as_tensor(abrupt, dtype=torch.bool), torch.tensor(cfg.ending), r)
    return r
