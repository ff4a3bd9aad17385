from pathlib import Path

import ast
import inspect
from dataclasses import fields, is_dataclass

import pytest
import yaml

from posttrain.config import (Config, ConfigError, RLConfig, SFTConfig, bundled_configs,
                              describe, load_config, resolve_config_path, to_yaml)
from posttrain.provenance import write_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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
    assert (seed.sft.batch_size, seed.sft.grad_accum, seed.sft.max_lr,
            seed.sft.min_lr) == (2, 4, 3e-5, 3e-6)
    assert (seed.lora.rank, seed.lora.alpha, seed.lora.dropout, seed.seed) == (16, 32, 0.1, 42)
    real = load_config(str(CONFIGS / "tldr-smollm2-cpu.yaml"),
                       ("data.train=a.jsonl", "data.eval=b.jsonl"))
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
    assert {"demo", "tldr-llama-3.2-1b", "tldr-smollm2-cpu"} <= set(bundled_configs())
    assert load_config("demo").out_dir == "runs/demo"
    assert load_config("tldr-llama-3.2-1b").eval.prompts_split == "test"
    assert (resolve_config_path("configs/demo.yaml").read_text()
            == resolve_config_path("demo").read_text())
    with pytest.raises(ConfigError, match="bundled configs: demo"):
        load_config("no-such-config")


# ---------------------------------------------------------------- the split schema

OPTIM_FIELDS = ("max_lr", "min_lr", "warmup_ratio", "weight_decay", "max_grad_norm")


def _source_docstring(cls, name: str):
    """The docstring under field `name` in the source of the most derived class of `cls`'s
    MRO that declares it (read here, without posttrain's field_docs); None if it has none."""
    for klass in cls.__mro__:
        if name not in vars(klass).get("__annotations__", {}):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and node.target.id == name:
                nxt = body[i + 1] if i + 1 < len(body) else None
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    return nxt.value.value
                return None
    raise AssertionError(f"{cls.__name__}.{name}: no class in its MRO declares it")


def _expected_help(cls=Config, prefix=""):
    """{`key = default` line: its docstring line} for every leaf field, walking the sections."""
    expected = {}
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            expected.update(_expected_help(type(value), f"{prefix}{f.name}."))
            continue
        doc = _source_docstring(cls, f.name)
        assert doc, f"{prefix}{f.name} has no docstring in the source"
        expected[f"  {prefix}{f.name} = {value!r}"] = "      " + " ".join(doc.split())
    return expected


def test_help_prints_every_field_with_its_full_docstring():
    lines = describe().splitlines()
    printed = {line: lines[i + 1] if i + 1 < len(lines) else None
               for i, line in enumerate(lines)
               if line.startswith("  ") and not line.startswith("   ") and " = " in line}
    expected = _expected_help()
    assert set(printed) == set(expected)          # every field, nothing else
    for key_line, doc_line in expected.items():
        assert printed[key_line] == doc_line, key_line
    assert len(expected) == 111  # 110 before the schema was split; + model.gqa_attention,
    # model.fp32_cached_attention, rl.prompt_grad, timeout_minutes; - rl.credit,
    # fast.completion_logits, fast.fused_logprobs (the exact fast paths lost their switches;
    # fast.merged_sft, length_chunks, sorted_micro, lora_input_casts, fused_projections and
    # rl.bond came and went)
    assert "  timeout_minutes = 30.0" in expected
    # a few in full, as written before the split
    text = describe()
    assert "  rl.iterations = 16\n      online: sampling rounds.\n" in text
    assert "  rl.epochs = 1.0\n      offline: passes over the generated set.\n" in text
    assert ("      PPO clip range epsilon: the ratio is clipped to [1 - eps, 1 + eps].\n"
            in text)


def test_help_lists_the_sections_a_stage_asks_for():
    text = describe(sections=("sft", "rl"))
    assert "[sft]" in text and "[rl]" in text and "[model]" not in text
    assert "  rl.kl_horizon = 100\n" in text and "  sft.max_lr = 0.0002\n" in text


def test_sft_and_rl_have_the_optimizer_fields_with_their_own_defaults_and_docs():
    for cls in (SFTConfig, RLConfig):
        assert set(OPTIM_FIELDS) <= {f.name for f in fields(cls)}
    sft, rl = Config().sft, Config().rl
    assert tuple(getattr(sft, n) for n in OPTIM_FIELDS) == (2e-4, 2e-5, 0.1, 0.1, 1.0)
    assert tuple(getattr(rl, n) for n in OPTIM_FIELDS) == (3e-5, 3e-6, 0.1, 0.1, 1.0)
    text = describe()
    for line in ("  sft.max_lr = 0.0002\n      Peak learning rate, reached after warmup.\n",
                 "  rl.max_lr = 3e-05\n      Peak learning rate.\n",
                 "  sft.warmup_ratio = 0.1\n      Share of the optimizer steps spent in linear "
                 "warmup from 0 to max_lr.\n",
                 "  rl.warmup_ratio = 0.1\n      Share of steps in linear warmup.\n",
                 "  sft.max_grad_norm = 1.0\n      Clip the global gradient norm to this; 0 "
                 "disables clipping.\n",
                 "  rl.max_grad_norm = 1.0\n      Gradient clipping norm; 0 disables.\n"):
        assert line in text


@pytest.mark.parametrize("overrides, message", [
    (("rl.min_lr=1", "rl.max_lr=0.5"), "rl.min_lr=1.0 is above rl.max_lr=0.5"),
    (("sft.min_lr=1", "sft.max_lr=0.5"), "sft.min_lr=1.0 is above sft.max_lr=0.5"),
    (("rl.min_lr=1",), "rl.min_lr=1.0 is above rl.max_lr=3e-05"),
    (("sft.min_lr=1",), "sft.min_lr=1.0 is above sft.max_lr=0.0002"),
    (("rl.max_lr=0",), "rl.max_lr=0.0 must be > 0"),
    (("sft.max_lr=0",), "sft.max_lr=0.0 must be > 0"),
    (("rl.min_lr=-1",), "rl.min_lr=-1.0 must be >= 0"),
    (("sft.weight_decay=-1",), "sft.weight_decay=-1.0 must be >= 0"),
    (("rl.max_grad_norm=-1",), "rl.max_grad_norm=-1.0 must be >= 0"),
    (("rl.warmup_ratio=1",), "rl.warmup_ratio=1.0 must be in [0, 1)"),
    (("sft.warmup_ratio=1",), "sft.warmup_ratio=1.0 must be in [0, 1)"),
])
def test_optim_checks_name_their_section(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides, message", [
    (("rl.mode=zz",), "rl.mode='zz' is not one of 'offline', 'online'"),
    (("rl.iterations=0",), "rl.iterations=0 must be > 0"),
    (("rl.epochs=0",), "rl.epochs=0.0 must be > 0"),
    (("rl.clip_eps=1",), "rl.clip_eps=1.0 must be in (0, 1)"),
    (("rl.advantage=best_of_n",),
     "rl.advantage='best_of_n' is not one of 'per_token', 'group', 'stop', 'group_stop'"),
    (("rl.kl_control=adaptive_summary", "rl.beta=0"), "rl.beta=0.0 must be > 0"),
    (("rl.kl_control=adaptive",), "rl.kl_control=adaptive is now named for what it steers: "
     "adaptive_token (the reference recipe: the per-token KL) or adaptive_summary (the KL "
     "per summary)"),
    (("rl.kl_control=adaptive_token", "rl.loss_agg=summary"),
     "rl.kl_control=adaptive_token steers a per-token KL; with rl.loss_agg=summary use "
     "adaptive_summary or fixed"),
    (("rl.eval_every=-1",), "rl.eval_every=-1 must be >= 0"),
    (("rl.keep_checkpoints=0",), "rl.keep_checkpoints=0 must be > 0"),
])
def test_every_rl_part_still_checks_its_fields(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_flat_rl_keys_still_load(tmp_path):
    cfg = load_config(None, ("rl.iterations=3", "rl.ppo_epochs=2"))
    assert (cfg.rl.iterations, cfg.rl.ppo_epochs) == (3, 2)
    f = tmp_path / "rl.yaml"   # one key from every part, flat under rl:
    f.write_text("rl:\n  mode: online\n  iterations: 5\n  epochs: 2.0\n  max_lr: 1.0e-5\n"
                 "  advantage: group\n  beta: 0.05\n  eval_every: 4\n  keep_checkpoints: 3\n")
    rl = load_config(str(f)).rl
    assert (rl.mode, rl.iterations, rl.epochs, rl.max_lr, rl.advantage, rl.beta,
            rl.eval_every, rl.keep_checkpoints) == ("online", 5, 2.0, 1e-5, "group", 0.05, 4, 3)
    with pytest.raises(Exception):
        rl.iterations = 4                      # frozen
    stored = yaml.safe_load(to_yaml(cfg))["rl"]
    assert list(stored) == [f.name for f in fields(RLConfig)]   # flat, in the schema's order
    assert list(stored)[:3] == ["mode", "max_steps", "batch_size"]


def test_a_stored_config_in_another_key_order_loads_equal(tmp_path):
    cfg = load_config("demo", ("rl.iterations=3",))
    f = tmp_path / "config.yaml"   # sorted keys: not the order to_yaml writes
    f.write_text(yaml.safe_dump(yaml.safe_load(to_yaml(cfg)), sort_keys=True))
    assert load_config(str(f)) == cfg


def test_a_removed_or_renamed_option_at_todays_behaviour_is_no_difference(tmp_path):
    """Outputs stored with an option removed since count as made with today's config when
    its value behaved as the code does now (rl.credit: all), and as another config else; a
    value stored under its old name (rl.advantage: seed) is today's (per_token)."""
    from posttrain.config import load_config, to_yaml
    from posttrain.stages import config_diff
    cfg = load_config(None, (f"out_dir={tmp_path}",))
    assert cfg.rl.advantage == "per_token"
    assert load_config(None, ("rl.advantage=seed",)).rl.advantage == "per_token"
    (tmp_path / "rl").mkdir()
    stored = to_yaml(cfg).replace("rl:\n", "rl:\n  credit: all\n  bond: none\n", 1)
    assert "advantage: per_token" in stored
    stored = stored.replace("advantage: per_token", "advantage: seed")
    (tmp_path / "rl" / "config.yaml").write_text(stored)
    assert config_diff(cfg, "rl") == []
    (tmp_path / "rl" / "config.yaml").write_text(stored.replace("credit: all", "credit: x"))
    assert config_diff(cfg, "rl") == [f"rl.credit: 'x' in {tmp_path / 'rl' / 'config.yaml'}, "
                                      "None now"]
