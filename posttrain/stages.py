"""The stage registry, and what the run directory says about each stage.

`STAGES` is the one table of stages, in pipeline order: the CLI builds its subcommands and
their help from it, the pipeline runs it. Each stage names its module by its import path and
imports it on first use (`importlib.import_module`), so that `posttrain --help`, which reads
this table, never loads torch or transformers.

Also here: how a stage's outputs stand (finished, made with another config, stale) and the
check before a stage runs alone (`guard_stage`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from omegaconf import OmegaConf

from posttrain.config import Config, ConfigError, to_yaml
from posttrain.io import atomic_write_json, read_json

# the config sections each stage's outputs depend on: its own and those of every stage before
_SFT = ("seed", "model", "lora", "data", "sft")
_GENERATE = _SFT + ("generate",)
_RL = _GENERATE + ("reward", "rl")
_EVAL = _RL + ("eval",)


@dataclass(frozen=True)
class Stage:
    name: str
    module: str               # import path of the module whose `run(cfg)` runs the stage
    folder: str               # its outputs, in the run directory
    marker: str | None        # the file that says it finished; None: plot, view (never "done")
    depends: tuple[str, ...]  # config sections its outputs depend on
    help_sections: tuple[str, ...]  # config sections its --help lists
    help: str                 # one line, for --help
    shared: bool = False      # all processes run it under `accelerate launch` (else rank 0)
    what: str | None = None   # its outputs, named in messages

    def load(self) -> ModuleType:
        """The stage's module, imported now if not yet (import by name: no import cycle, and
        `--help` stays free of torch)."""
        return importlib.import_module(self.module)

    def run(self, cfg: Config):
        return self.load().run(cfg)


STAGES = {s.name: s for s in (
    Stage("sft", "posttrain.sft", "sft", "summary.json", _SFT, ("model", "lora", "data", "sft"),
          "supervised fine-tuning of a LoRA adapter on prompt/completion rows",
          shared=True, what="SFT adapter"),
    Stage("generate", "posttrain.generate", "generate", "stats.json", _GENERATE,
          ("model", "data", "generate"),
          "sample completions from the SFT policy into a scored dataset for RL",
          what="generated set"),
    Stage("rl", "posttrain.rl.train", "rl", "summary.json", _RL,
          ("model", "lora", "data", "generate", "reward", "rl"),
          "PPO-style RL (offline on the generated set, or online rounds) against the frozen "
          "SFT policy", shared=True, what="RL adapter"),
    Stage("eval", "posttrain.evaluate.run", "eval", "report.json", _EVAL,
          ("model", "data", "generate", "reward", "eval"),
          "sample base/SFT/RL on held-out prompts; length spread, ROUGE, KL -> report"),
    Stage("plot", "posttrain.plot", "plots", None, (), (),
          "PNG figures: length distributions and training curves"),
    Stage("view", "posttrain.view", "view", None, (), (),
          "one self-contained HTML page to read SFT/RL samples side by side"),
)}
# the `run` pseudo-stage (every stage in turn): its one-line help; its --help lists every
# config section
RUN_HELP = ("the whole pipeline (sft, generate, rl, eval, plot, view) in one run directory, "
            "skipping finished stages")

# settings that change how a stage runs, never what it produces
IGNORED = {"checkpoint_every", "keep_checkpoints", "push_to_hub"}
# options removed since, each with the value that behaves as the code does now: outputs
# stored with that value were made as today's would be; any other value is a difference
REMOVED = {"rl.credit": "all", "rl.bond": "none", "rl.tilt_beta": 0.0}
RENAMED = {("rl.advantage", "seed"): "per_token"}   # (key, old value): its name now
STALE = "stale.json"   # in the run directory: stages made from outputs redone since


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k not in IGNORED:
                out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_diff(cfg: Config, stage: str) -> list[str]:
    """Keys (among those the stage depends on) whose value differs from the config stored
    with the stage's outputs; [] when none is stored or all agree; a stored config that
    cannot be read differs (one line naming it)."""
    sections = STAGES[stage].depends
    stored_file = cfg.run_dir / STAGES[stage].folder / "config.yaml"
    if not sections or not stored_file.is_file():
        return []
    # a key the stored file lacks (an option added since) counts at its default
    defaults = OmegaConf.create(to_yaml(Config()))
    try:
        stored = OmegaConf.to_container(OmegaConf.merge(defaults, OmegaConf.load(stored_file)))
    except Exception as e:  # noqa: BLE001 (yaml's and omegaconf's errors): damaged
        return [f"{stored_file} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}), so it counts as another config"]
    now = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    a = _flat({k: stored.get(k) for k in sections})
    b = _flat({k: now.get(k) for k in sections})
    a = {k: RENAMED.get((k, v), v) if isinstance(v, str) else v for k, v in a.items()
         if not (k in REMOVED and k not in b and v == REMOVED[k])}
    return [f"{k}: {a.get(k)!r} in {stored_file}, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def stale(cfg: Config) -> dict:
    """{stage: why} for stages whose outputs were made from an earlier stage's outputs that
    have since been redone: they are never taken as finished."""
    path = cfg.run_dir / STALE
    return read_json(path) if path.is_file() else {}


def set_stale(cfg: Config, marks: dict) -> None:
    path = cfg.run_dir / STALE
    if marks:
        atomic_write_json(path, marks)
    else:
        path.unlink(missing_ok=True)


def clear_stale(cfg: Config, stage: str) -> None:
    marks = stale(cfg)
    if stage in marks:
        del marks[stage]
        set_stale(cfg, marks)


def made(cfg: Config, stage: str) -> bool:
    """The stage's folder holds anything (finished or not)."""
    folder = cfg.run_dir / STAGES[stage].folder
    return folder.is_dir() and any(folder.iterdir())


def stage_done(cfg: Config, stage: str) -> bool:
    marker = STAGES[stage].marker
    return (marker is not None and (cfg.run_dir / STAGES[stage].folder / marker).is_file()
            and stage not in stale(cfg))


def needs(cfg: Config, stage: str) -> list[str]:
    """The earlier stages whose outputs `stage` reads."""
    if stage == "generate":
        return ["sft"]
    if stage == "rl":
        return ["sft"] + (["generate"] if cfg.rl.mode == "offline" else [])
    if stage == "eval":
        wanted = set(cfg.eval.models)
        # offline, the reward statistics come from the generated set when there is one
        generated = cfg.rl.mode == "offline" and (cfg.run_dir / "generate").is_dir()
        return ((["sft"] if wanted & {"sft", "rl"} else []) + (["generate"] if generated else [])
                + (["rl"] if "rl" in wanted else []))
    return []


def _check_inputs(cfg: Config, stage: str, marks: dict) -> None:
    """The outputs `stage` reads: none stale, every earlier stage made with this config, and
    each one it needs finished (checked in that order)."""
    names = list(STAGES)
    for need in needs(cfg, stage):
        folder = cfg.run_dir / STAGES[need].folder
        if need in marks:
            raise ConfigError(f"{folder} (the {STAGES[need].what}, which {stage} reads) is "
                              f"stale: {marks[need]}; run `posttrain {need}` first")
    for earlier in names[:names.index(stage)]:
        diff = config_diff(cfg, earlier) if earlier not in marks else []
        if diff:
            raise ConfigError(
                f"{cfg.run_dir / STAGES[earlier].folder} (the {earlier} stage's outputs, which "
                f"{stage} reads) was made with a different config:\n  " + "\n  ".join(diff)
                + f"\nredo {earlier} first (`posttrain {earlier} --force ...`; its outputs "
                "are replaced only once the new ones are written), or use another out_dir")
    for need in needs(cfg, stage):
        if not stage_done(cfg, need):
            raise ConfigError(f"no {STAGES[need].what} in {cfg.run_dir / STAGES[need].folder}: "
                              f"run `posttrain {need}` first (with the same out_dir and config)")


def guard_stage(cfg: Config, stage: str, force: bool = False) -> None:
    """Before a stage run alone (nothing is written): refuse if the outputs it reads are
    missing, stale or made with a different config, or if its own were made with a different
    config and `force` is not given (plot, view: if the eval's samples are stale)."""
    marks = stale(cfg)
    if STAGES[stage].marker is None:  # plot, view: they show the eval's samples and report
        if "eval" in marks:
            raise ConfigError(f"{cfg.run_dir / 'eval'} (the eval's samples, which {stage} "
                              f"shows) is stale: {marks['eval']}; run `posttrain eval` first "
                              f"(or `posttrain run`), then {stage}")
        return
    _check_inputs(cfg, stage, marks)
    diff = config_diff(cfg, stage) if stage not in marks else []  # stale: redone anyway
    if diff and not force:
        raise ConfigError(
            f"{cfg.run_dir / STAGES[stage].folder} was made with a different config:\n  "
            + "\n  ".join(diff) + f"\nuse another out_dir, or --force to redo {stage} (the "
            "old outputs stay until the new ones are written)")
