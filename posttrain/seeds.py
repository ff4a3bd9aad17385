"""Named random streams: every seed a stage draws from, derived from the run's `seed`.

A stream names what it seeds, so each stage asks for its stream by name and a change to
how one stream is drawn is made in one place. Some streams share a formula (`sft_epoch` and
`round_prompts` are both seed * 1000 + k; `generate_draws` and `bootstrap` are both the
seed): they seed different generators for different draws, and giving each a distinct
salt would change the demo's measured draws, so they stay as they are.
"""
from __future__ import annotations

import torch


def generator(seed: int, device=None) -> torch.Generator:
    """A torch generator on `device` (default CPU) seeded with `seed`."""
    gen = torch.Generator() if device is None else torch.Generator(device=device)
    return gen.manual_seed(seed)


# ---------------------------------------------------------------- SFT

def sft_epoch(seed: int, epoch: int) -> int:
    """The order of SFT's micro-batches in `epoch`."""
    return seed * 1000 + epoch


# ---------------------------------------------------------------- generate (offline set)

def generate_draws(seed: int) -> int:
    """Which prompts the generated set draws (with replacement)."""
    return seed


def generate_batch(seed: int, batch: int) -> int:
    """The tokens sampled in generation batch `batch` (vLLM's per-batch seed too)."""
    return seed * 100_003 + batch


def generate_targets(seed: int, batch: int) -> int:
    """The lengths batch `batch`'s prompts ask for (length-conditioned prompts)."""
    return seed * 7 + batch


# ---------------------------------------------------------------- RL

def plan_epoch(seed: int, epoch: int) -> int:
    """The order of prompt groups in pass `epoch` of a step plan seeded with `seed`."""
    return seed + epoch


def round_plan(seed: int, it: int) -> int:
    """The seed of online round `it`'s step plan (its passes add plan_epoch)."""
    return seed + 7919 * (it + 1)


def round_prompts(seed: int, it: int) -> int:
    """Which prompts online round `it` draws."""
    return seed * 1000 + it


def round_targets(seed: int, it: int) -> int:
    """The lengths online round `it`'s prompts ask for."""
    return seed * 1000 + 500 + it


def round_sampling(seed: int, it: int, rank: int) -> int:
    """The tokens process `rank` samples in online round `it`."""
    return seed * 100_003 + 50_000 + it + 7_777 * rank


def held_out(seed: int) -> int:
    """RL's held-out length checks (the same draws before and after training)."""
    return seed + 7


# ---------------------------------------------------------------- eval

def eval_batch(seed: int, batch: int) -> int:
    """The tokens of evaluation batch `batch`: the same for every model compared."""
    return seed * 100_003 + 77 + batch


def bootstrap(seed: int) -> int:
    """The resamples of the variance ratio's bootstrap interval."""
    return seed
