from pathlib import Path

import pytest
import yaml

from posttrain.config import Config, ConfigError, describe, load_config, write_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\nsft:\n  batch_size: 8\n  max_lr: 1.0e-4\nlora:\n  rank: 4\n")
    cfg = load_config(str(f), ("sft.batch_size=2", "lora.target_modules=[q_proj]"))
    assert cfg.seed == 7                      # from the file
    assert cfg.sft.max_lr == 1e-4             # from the file
    assert cfg.sft.batch_size == 2            # the override wins over the file
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.sft.grad_accum == Config().sft.grad_accum  # default kept


@pytest.mark.parametrize("override, key", [
    ("sft.bogus=1", "sft.bogus"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("sft.batch_size=abc", "sft.batch_size"),
    ("model.load_in_4bit=maybe", "model.load_in_4bit"),
    ("sft.batching=zigzag", "sft.batching"),
    ("data.overlong=cut", "data.overlong"),
    ("sft.min_lr=1", "sft.min_lr"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, (override,))


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sft:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(f))
    g = tmp_path / "unknown.yaml"
    g.write_text("sft:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*sft\.lr"):
        load_config(str(g))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_mandatory_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.eval, data\.train must be set"):
        load_config(str(CONFIGS / "tldr-smollm2-cpu.yaml"))


def test_config_is_frozen_and_written(tmp_path):
    cfg = load_config(None, (f"out_dir={tmp_path}", "seed=3"))
    with pytest.raises(Exception):
        cfg.seed = 4
    path = write_config(cfg, "sft")
    assert yaml.safe_load(path.read_text())["seed"] == 3
    assert (tmp_path / "sft" / "config.yaml").read_text() == path.read_text()
    assert load_config(str(path)) == cfg


def test_shipped_configs_load():
    demo = load_config(str(CONFIGS / "demo.yaml"))
    seed = load_config(str(CONFIGS / "tldr-llama-3.2-1b.yaml"))
    assert demo.model.name == "embedded"
    assert seed.model.name == "NousResearch/Llama-3.2-1B" and seed.model.load_in_4bit
    assert (seed.sft.batch_size, seed.sft.grad_accum, seed.sft.max_lr, seed.sft.min_lr) == (2, 4, 3e-5, 3e-6)
    assert (seed.lora.rank, seed.lora.alpha, seed.lora.dropout, seed.seed) == (16, 32, 0.1, 42)
    real = load_config(str(CONFIGS / "tldr-smollm2-cpu.yaml"), ("data.train=a.jsonl", "data.eval=b.jsonl"))
    assert real.data.train == "a.jsonl"


def test_help_documents_every_field():
    text = describe()
    for name in ("out_dir", "model.name", "lora.rank", "data.overlong", "sft.batching",
                 "sft.checkpoint_every"):
        assert name in text
    # every field has a docstring line under it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and " = " in line and not line.startswith("   "):
            assert lines[i + 1].startswith("      "), line


def test_bundled_configs_load_by_name():
    from posttrain.config import bundled_configs, resolve_config_path

    assert {"demo", "tldr-llama-3.2-1b", "tldr-smollm2-cpu"} <= set(bundled_configs())
    assert load_config("demo").out_dir == "runs/demo"
    assert load_config("tldr-llama-3.2-1b").eval.prompts_split == "test"
    assert resolve_config_path("configs/demo.yaml").read_text() == resolve_config_path("demo").read_text()
    with pytest.raises(ConfigError, match="bundled configs: demo"):
        load_config("no-such-config")
