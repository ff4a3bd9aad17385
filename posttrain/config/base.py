"""The leaf of the config package: the error type, the validation helpers, and OptimConfig,
the optimizer fields and checks that the `sft` and `rl` sections share."""
from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def _choice(value, name: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _auto_bool(value, name: str) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError(f"{name}={value!r} must be true, false or 'auto'")


def _positive(value, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay: the fields SFTConfig and RLConfig share,
    and their checks. A subclass re-declares each field with its own default and docstring
    (the `--help` text; a field keeps its place here), and sets `_section`, the section its
    error messages name. The fields have no default here, so a subclass that forgets one
    cannot be built."""

    _section = "optim"  # not annotated: a class attribute, not a config key
    max_lr: float
    min_lr: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float

    def _check_optim(self) -> None:
        s = self._section
        _positive(self.max_lr, f"{s}.max_lr")
        _positive(self.min_lr, f"{s}.min_lr", allow_zero=True)
        _positive(self.weight_decay, f"{s}.weight_decay", allow_zero=True)
        _positive(self.max_grad_norm, f"{s}.max_grad_norm", allow_zero=True)
        if self.min_lr > self.max_lr:
            raise ConfigError(f"{s}.min_lr={self.min_lr} is above {s}.max_lr={self.max_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{s}.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
