"""Loading a config: the dataclass defaults, then a YAML file (a path or a bundled config's
name), then `key=value` overrides; and writing one back as YAML."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from posttrain.config.base import ConfigError
from posttrain.config.schema import Config

BUNDLED = Path(__file__).resolve().parent.parent / "configs"
"""The bundled configs: the YAML files in posttrain/configs/."""


def _describe_error(err: OmegaConfBaseException, where: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"{where}: unknown config key '{key}'"
    return f"{where}: bad value for '{key}': {msg}"


def _read_file(path: str) -> tuple[DictConfig, set]:
    """The YAML file at `path` and the keys it marks `???` (the command line must set them)."""
    p = resolve_config_path(path)
    try:
        loaded = OmegaConf.load(p)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return loaded, set(OmegaConf.missing_keys(loaded))


def _apply_overrides(cfg: DictConfig, overrides: tuple, missing: set) -> DictConfig:
    """Merge each `key=value` override into `cfg`; a key it sets leaves `missing`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]), f"override {item!r}")
        missing.discard(key)
    return cfg


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides (dotted keys)."""
    cfg = OmegaConf.structured(Config)
    missing = set()  # keys the file marks `???`: the command line must set them
    if path is not None:
        loaded, missing = _read_file(path)
        cfg = _merge(cfg, loaded, path)
    cfg = _apply_overrides(cfg, overrides, missing)
    missing = sorted(missing | set(OmegaConf.missing_keys(cfg)))
    if missing:
        raise ConfigError(f"config: {', '.join(missing)} must be set (in the YAML file or as "
                          f"{missing[0]}=... on the command line)")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_error(e, "config")) from e


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML file's path, or the name of a bundled config (`demo`, `tldr-llama-3.2-1b`, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    if "/" not in path and (BUNDLED / f"{path}.yaml").is_file():
        return BUNDLED / f"{path}.yaml"
    raise ConfigError(f"config file {path} does not exist (bundled configs: "
                      f"{', '.join(bundled_configs())})")


def _check_shapes(schema, other, where: str, prefix: str = "") -> None:
    """Name a section given a plain value, or a list field given a scalar, before OmegaConf
    reports it in its own terms."""
    if not isinstance(other, DictConfig):
        return
    for key in other.keys():
        if key not in schema:
            continue  # an unknown key: the merge names it
        want, got = schema[key], other._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(want, DictConfig):
            if not isinstance(got, DictConfig):
                raise ConfigError(f"{where}: '{name}' is a section: expected a mapping of "
                                  f"{name}.* keys, got {OmegaConf.to_container(other)[key]!r}")
            _check_shapes(want, got, where, f"{name}.")
        elif isinstance(schema._get_node(key), ListConfig):
            value = OmegaConf.to_container(other)[key]
            if value is not None and not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: '{name}' expects a list, e.g. {name}=[{value}], "
                                  f"got {value!r}")


def _merge(cfg, other, where: str):
    _check_shapes(cfg, other, where)
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_error(e, where)) from e


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
