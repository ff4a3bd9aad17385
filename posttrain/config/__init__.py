"""Typed configuration: dataclass defaults, then a YAML file, then `key=value` overrides.

Every field carries a docstring (the string literal under it); `posttrain <stage> --help`
prints them. Configs are frozen once loaded: sizes that follow from other fields are
properties, never written back.

The package: the schema (schema.py: Config; its sections in sections.py, sampling.py and
rl.py; base.py: ConfigError and the checks), loading (load.py) and the `--help`
text (help.py). Writing a stage's config and environment is posttrain.provenance's job.
"""
from posttrain.config.base import ConfigError
from posttrain.config.help import describe, field_docs
from posttrain.config.load import (BUNDLED, bundled_configs, load_config, resolve_config_path,
                                   to_yaml)
from posttrain.config.rl import RLConfig
from posttrain.config.sampling import EvalConfig, GenerateConfig
from posttrain.config.schema import DEFAULTS, Config
from posttrain.config.sections import (DataConfig, FastConfig, LoraConfig, ModelConfig,
                                       RewardConfig, SFTConfig)

__all__ = ["BUNDLED", "DEFAULTS", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "FastConfig", "GenerateConfig", "LoraConfig", "ModelConfig", "RLConfig",
           "RewardConfig", "SFTConfig", "bundled_configs", "describe", "field_docs",
           "load_config", "resolve_config_path", "to_yaml"]
