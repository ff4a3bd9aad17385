"""The leaf of the config package: the error type and the validation helpers (the
optimizer checks the `sft` and `rl` sections share among them)."""
from __future__ import annotations


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


def check_optim(section, name: str) -> None:
    """The optimizer fields' checks (AdamW with linear warmup and cosine decay), for the
    `sft` or `rl` section, each of which declares them with its own defaults."""
    _positive(section.max_lr, f"{name}.max_lr")
    _positive(section.min_lr, f"{name}.min_lr", allow_zero=True)
    _positive(section.weight_decay, f"{name}.weight_decay", allow_zero=True)
    _positive(section.max_grad_norm, f"{name}.max_grad_norm", allow_zero=True)
    if section.min_lr > section.max_lr:
        raise ConfigError(f"{name}.min_lr={section.min_lr} is above "
                          f"{name}.max_lr={section.max_lr}")
    if not 0 <= section.warmup_ratio < 1:
        raise ConfigError(f"{name}.warmup_ratio={section.warmup_ratio!r} must be in [0, 1)")
