"""`posttrain run`: SFT -> generate -> RL -> eval -> plot -> view in one run directory.

A stage whose outputs exist is skipped when the config that made them (the copy in its
folder) agrees with the current one on every section the stage reads; a stage cut short
resumes from its last checkpoint. If a finished or started stage was made with a different
config, the run stops and names the keys, unless `--force` is given: then that stage and
every stage after it start again. Wall time per stage goes to `pipeline.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from posttrain import evaluate, generate, plot, rl, sft, view
from posttrain.config import Config, ConfigError, to_yaml
from posttrain.io import atomic_write_json

# stage -> (module, folder, the file that says it finished, config sections its outputs
# depend on: its own and those of every stage before it)
STAGES = {
    "sft": (sft, "sft", "summary.json", ("seed", "model", "lora", "data", "sft")),
    "generate": (generate, "generate", "stats.json", ("seed", "model", "lora", "data", "sft",
                                                       "generate")),
    "rl": (rl, "rl", "summary.json", ("seed", "model", "lora", "data", "sft", "generate",
                                        "reward", "rl")),
    "eval": (evaluate, "eval", "report.json", ("seed", "model", "lora", "data", "sft",
                                                 "generate", "reward", "rl", "eval")),
    "plot": (plot, "plots", None, ()),
    "view": (view, "view", None, ()),
}
# stages all processes run together under `accelerate launch`; the others run on the main
# process while the rest wait
SHARED = {"sft", "rl"}
# settings that change how a stage runs, never what it produces
IGNORED = {"checkpoint_every", "keep_checkpoints", "push_to_hub"}


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
    with the stage's outputs; [] when none is stored or all agree."""
    _, folder, _, sections = STAGES[stage]
    stored_file = cfg.run_dir / folder / "config.yaml"
    if not sections or not stored_file.is_file():
        return []
    # a key the stored file lacks (an option added since) counts at its default
    defaults = OmegaConf.create(to_yaml(Config()))
    stored = OmegaConf.to_container(OmegaConf.merge(defaults, OmegaConf.load(stored_file)))
    now = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    a = _flat({k: stored.get(k) for k in sections})
    b = _flat({k: now.get(k) for k in sections})
    return [f"{k}: {a.get(k)!r} in {stored_file}, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def guard_stage(cfg: Config, stage: str, force: bool = False) -> None:
    """Before a stage run alone: refuse if the outputs it reads (earlier stages) or its own
    were made with a different config. `force` redoes the stage itself (its folder is
    removed); inputs made with another config are always refused."""
    if stage not in STAGES:
        return
    names = list(STAGES)
    for earlier in names[:names.index(stage)]:
        diff = config_diff(cfg, earlier)
        if diff:
            raise ConfigError(
                f"{cfg.run_dir / STAGES[earlier][1]} (the {earlier} stage's outputs, which "
                f"{stage} reads) was made with a different config:\n  " + "\n  ".join(diff)
                + f"\nredo {earlier} first (`posttrain {earlier} --force ...`), or use "
                "another out_dir")
    diff = config_diff(cfg, stage)
    if diff and not force:
        raise ConfigError(
            f"{cfg.run_dir / STAGES[stage][1]} was made with a different config:\n  "
            + "\n  ".join(diff) + f"\nuse another out_dir, or --force to redo {stage}")
    if diff:
        print(f"{stage}: config changed ({len(diff)} key(s)); redoing it")
        _reset(cfg, [stage])


def stage_done(cfg: Config, stage: str) -> bool:
    _, folder, marker, _ = STAGES[stage]
    return marker is not None and (cfg.run_dir / folder / marker).is_file()


def _reset(cfg: Config, stages: list[str]) -> None:
    for s in stages:
        shutil.rmtree(cfg.run_dir / STAGES[s][1], ignore_errors=True)


class _Processes:
    """Rank and barrier under `accelerate launch` / torchrun (one process: no-ops)."""

    def __init__(self, cfg: Config):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            from posttrain.modeling import resolve_device
            self.state = PartialState(cpu=resolve_device(cfg.model).type == "cpu")

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def run(cfg: Config, force: bool = False) -> dict:
    """Run every stage not yet done; returns {stage: seconds or "skipped"}."""
    procs = _Processes(cfg)
    names = list(STAGES)
    timing_file = cfg.run_dir / "pipeline.json"
    timings = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    for i, stage in enumerate(names):
        diff = config_diff(cfg, stage)
        if diff:
            if not force:
                raise ConfigError(
                    f"{cfg.run_dir / STAGES[stage][1]} was made with a different config:\n  "
                    + "\n  ".join(diff) + "\nuse another out_dir, or --force to redo "
                    f"{stage} and every stage after it")
            print(f"run: config changed for {stage} ({len(diff)} key(s)); redoing it and "
                  "every stage after it")
            if procs.main:
                _reset(cfg, names[i:])
            procs.barrier()
            for s in names[i:]:
                timings.pop(s, None)
        if stage == "generate" and cfg.rl.mode == "online":
            print("run: generate not needed (rl.mode=online samples its own rounds)")
            continue
        if stage_done(cfg, stage):
            print(f"run: {stage} already done, skipping")
            continue
        print(f"run: {stage}")
        t0 = time.perf_counter()
        if stage in SHARED or procs.main:
            STAGES[stage][0].run(cfg)
        procs.barrier()
        timings[stage] = round(time.perf_counter() - t0, 1)
        if procs.main:
            atomic_write_json(timing_file, timings)
    if procs.main:
        _print_figures(cfg, timings)
    return timings


def _print_figures(cfg: Config, timings: dict) -> None:
    report_file = cfg.run_dir / "eval" / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    print("\n== posttrain run:", cfg.run_dir)
    print("stage wall time (s):", ", ".join(f"{k} {v}" for k, v in timings.items()))
    models = report.get("models", {})
    for name in sorted(models, key=["base", "sft", "rl"].index):
        m = models[name]
        c = m["length_chars"]
        kl = f", KL {m['kl_k3']:.4f}/token" if "kl_k3" in m else ""
        print(f"  {name:4} length {c['mean']:.1f} ± {c['std']:.1f} chars (variance {c['var']:.0f}), "
              f"ROUGE-L {m['rougeL']:.1f}, EOS {m['eos_rate']:.2f}{kl}")
    for name, per in report.get("by_target", {}).items():  # length-conditioned runs
        print(f"  {name:4} asked -> got (mean ± std): " + ", ".join(
            f"{t} -> {r['mean']:.0f} ± {r['std']:.0f}" for t, r in per.items()))
    if "variance_ratio" in report and "by_target" not in report:
        lo, hi = report["variance_ratio_ci95"]
        print(f"  variance ratio SFT/RL {report['variance_ratio']:.2f} (95% {lo:.2f}-{hi:.2f}), "
              f"mean {100 * report['mean_change']:+.1f}%, ROUGE-L {report['rougeL_diff']:+.2f}")
    for label, path in (("report", cfg.run_dir / "eval" / "report.md"),
                        ("figures", cfg.run_dir / "plots"),
                        ("viewer", cfg.run_dir / "view" / "index.html")):
        if Path(path).exists():
            print(f"  {label}: {path}")
