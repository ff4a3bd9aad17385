"""`posttrain run`: SFT -> generate -> RL -> eval -> plot -> view in one run directory.

A stage whose outputs exist is skipped when the config that made them (the copy in its
folder) agrees with the current one on every section the stage reads; a stage cut short
resumes from its last checkpoint. If a finished or started stage was made with a different
config, the run stops and names the keys, unless `--force` is given: then that stage is
redone. A redo never deletes finished work first: it is built in a shadow run directory
(`.redo-<stage>/`, the other stages' folders linked in) and swapped in when done; the later
stages' outputs are then marked stale (`stale.json`) and redone in turn. Wall time per stage
goes to `pipeline.json`.

The stage table and the state checks live in `posttrain.stages`, the shadow and swap
machinery in `posttrain.redo`; this module drives them (and re-exports the names callers
use: `STAGES`, `config_diff`, `stale`, `stage_done`, `guard_stage`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

# every stage's module, loaded up front (a broken one fails before any stage runs);
# the stages are run through the registry (`STAGES[name].run`)
import posttrain.evaluate.run  # noqa: F401
import posttrain.rl.train  # noqa: F401
from posttrain import generate, plot, sft, view  # noqa: F401
from posttrain.config import Config, ConfigError, to_yaml
from posttrain.data import FILE_BUILDERS
from posttrain.io import atomic_write_json, read_json
from posttrain.model.choices import DeviceChoices
from posttrain.model.load import resolve_device
from posttrain.model.load import check_hub
from posttrain.redo import (REDO, SWAPPING, Processes, prepare_shadow, run_in_shadow, served,
                            shadow_dir)
from posttrain.redo import swap_in as _swap_in  # looked up here at call time: tests patch it
from posttrain.stages import (STAGES, clear_stale, config_diff, guard_stage, made, stage_done,
                              stale)


def check_out_dir(cfg: Config) -> None:
    """out_dir must be a folder this process can write, checked before any model loads."""
    d = cfg.run_dir
    if d.exists() and not d.is_dir():
        raise ConfigError(f"out_dir={d} is a file; expected a folder (a run directory)")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"out_dir={d}: cannot write there ({e.strerror or e}); choose "
                          "another out_dir") from None


def check_hub_sources(cfg: Config, stage: str) -> None:
    """The Hub ids a stage would download from must be reachable (else fail in seconds)."""
    if stage in ("plot", "view"):
        return
    check_hub("model.name", cfg.model.name)
    sources = {"data.train": cfg.data.train, "data.eval": cfg.data.eval,
               "generate.prompts": cfg.generate.prompts, "eval.prompts": cfg.eval.prompts}
    for key, source in sources.items():
        if source and source != "sample" and Path(source).suffix.lower() not in FILE_BUILDERS:
            check_hub(key, source)


def run_stage(cfg: Config, stage: str, force: bool = False):
    """One stage alone (`posttrain <stage>`): check, then run it, resume it, redo it (forced,
    stale or changed: built beside the old outputs and swapped in at the end) or report it
    finished. generate and eval run on the main process only under `accelerate launch`."""
    DeviceChoices(cfg, resolve_device(cfg.model)).check()
    procs = Processes(cfg)
    if procs.main:
        _recover(cfg)
    procs.barrier()
    guard_stage(cfg, stage, force)
    if STAGES[stage].marker is None:  # plot, view: they read finished outputs, write atomically
        return STAGES[stage].run(cfg) if procs.main else None
    result = None
    if made(cfg, stage) and (force or stage in stale(cfg) or config_diff(cfg, stage)):
        result = _redo(cfg, stage, procs)
    else:
        result = procs.run(STAGES[stage].shared, lambda: _run_in_place(cfg, stage, procs))
    if stage == "eval" and procs.main:
        print(f"eval: report in {cfg.run_dir / 'eval' / 'report.md'}")
    return result


def _run_in_place(cfg: Config, stage: str, procs: Processes):
    result = STAGES[stage].run(cfg)
    if procs.main:
        clear_stale(cfg, stage)  # a stale stage with an empty folder ran in place
    return result


def _redo(cfg: Config, stage: str, procs: Processes):
    """Redo `stage` in a shadow run directory (the other stages' folders linked in), then swap
    its folder in. A kill leaves the old outputs in place; the same command resumes the redo
    from its checkpoints."""
    if procs.main:
        prepare_shadow(cfg, stage)
    procs.barrier()
    result = procs.run(STAGES[stage].shared, lambda: run_in_shadow(cfg, stage, procs))
    if procs.main:
        _swap_in(cfg, stage)
    procs.barrier()
    return result


def _recover(cfg: Config) -> None:
    """Finish what a kill interrupted: a swap half done, or a redo finished but not swapped."""
    for trash in cfg.run_dir.glob(".redo-*.trash"):
        shutil.rmtree(trash, ignore_errors=True)
    for stage, s in STAGES.items():
        shadow, dest = shadow_dir(cfg, stage), cfg.run_dir / s.folder
        old = cfg.run_dir / f".{s.folder}.old"
        if s.marker and ((shadow / SWAPPING).is_file()
                         or (shadow / s.folder / s.marker).is_file()):
            _swap_in(cfg, stage)
        elif old.exists() and not dest.exists():
            os.replace(old, dest)


def run(cfg: Config, force: bool = False) -> dict:
    """Run every stage not yet done; returns {stage: seconds or "skipped"}. A stage whose
    outputs are stale or (with `force`) whose config changed is redone beside its old
    outputs; `force` with no change redoes every stage. A forced run records what it has
    redone in `redo.json`, so the same command after a kill goes on where it stopped."""
    DeviceChoices(cfg, resolve_device(cfg.model)).check()    # before any stage runs
    procs = Processes(cfg)
    if procs.main:
        _recover(cfg)
    procs.barrier()
    forced = _forced_stages(cfg, procs) if force else set()
    timing_file = cfg.run_dir / "pipeline.json"
    timings = read_json(timing_file) if timing_file.is_file() else {}
    for stage in STAGES:
        redo = _plan(cfg, stage, force, forced)
        if redo is None:
            continue
        timings[stage] = _run_timed(cfg, stage, redo, procs)
        if procs.main:
            atomic_write_json(timing_file, timings)
            if not redo:  # a redo's swap has done both
                clear_stale(cfg, stage)  # a stale stage with an empty folder ran in place
                served(cfg, stage)
    if procs.main:
        (cfg.run_dir / REDO).unlink(missing_ok=True)
        _print_figures(cfg, timings)
    return timings


def _plan(cfg: Config, stage: str, force: bool, forced: set) -> bool | None:
    """What `run` does with `stage`: None, nothing (it says why); else run it, redone (True)
    or not. Its outputs made with a different config stop the run unless `force`."""
    diff = config_diff(cfg, stage)
    if diff and not force and stage not in stale(cfg):  # stale: redone anyway
        raise ConfigError(
            f"{cfg.run_dir / STAGES[stage].folder} was made with a different config:\n  "
            + "\n  ".join(diff) + "\nuse another out_dir, or --force to redo "
            f"{stage} and every stage after it (old outputs stay until replaced)")
    if stage == "generate" and cfg.rl.mode == "online":
        print("run: generate not needed (rl.mode=online samples its own rounds)")
        return None
    redo = made(cfg, stage) and (stage in forced or stage in stale(cfg) or bool(diff))
    if not redo and stage_done(cfg, stage):
        print(f"run: {stage} already done, skipping")
        return None
    return redo


def _run_timed(cfg: Config, stage: str, redo: bool, procs: Processes) -> float:
    """Run (or redo) one stage of `run` on the processes it runs on; its wall time (s)."""
    print(f"run: {stage}" + (" (redo)" if redo else ""))
    t0 = time.perf_counter()
    if redo:
        _redo(cfg, stage, procs)
    else:
        procs.run(STAGES[stage].shared, lambda: STAGES[stage].run(cfg))
    return round(time.perf_counter() - t0, 1)


def _forced_stages(cfg: Config, procs: Processes) -> set:
    """The stages `run --force` redoes: from the first whose config changed (every stage
    when none did), less those this same forced run already redid before a kill."""
    names = [s for s in STAGES if STAGES[s].marker]
    changed = [s for s in names if config_diff(cfg, s)]
    wanted = set(names[names.index(changed[0]):] if changed else names)
    record = cfg.run_dir / REDO
    text = to_yaml(dataclasses.replace(cfg, out_dir="."))
    done = []
    if record.is_file():
        old = read_json(record)
        # the same config, compared by value (a field order that changed since is the same)
        if isinstance(old.get("config"), str) and \
                OmegaConf.create(old["config"]) == OmegaConf.create(text):
            done = old.get("served", [])
    if procs.main:
        atomic_write_json(record, {"config": text, "served": done})
    return wanted - set(done)


def _print_figures(cfg: Config, timings: dict) -> None:
    report_file = cfg.run_dir / "eval" / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    print("\n== posttrain run:", cfg.run_dir)
    print("stage wall time (s):", ", ".join(f"{k} {v}" for k, v in timings.items()))
    models = report.get("models", {})
    for name in sorted(models, key=["base", "sft", "rl"].index):
        m = models[name]
        c = m["length_chars"]
        kl = (f", KL {m['kl_k3_summary']:.3f}/summary ({m['kl_k3']:.4f}/token)"
              if "kl_k3_summary" in m else "")
        print(f"  {name:4} length {c['mean']:.1f} ± {c['std']:.1f} chars "
              f"(variance {c['var']:.0f}), "
              f"ROUGE-L {m['rougeL']:.1f}, EOS {m['eos_rate']:.2f}{kl}")
    for name, per in report.get("by_target", {}).items():  # length-conditioned runs
        print(f"  {name:4} asked -> got (mean ± std): " + ", ".join(
            f"{t} -> {r['mean']:.0f} ± {r['std']:.0f}" for t, r in per.items()))
    if "variance_ratio" in report and "by_target" not in report:
        lo, hi = report["variance_ratio_ci95"]
        print(f"  variance ratio SFT/RL {report['variance_ratio']:.2f} (95% {lo:.2f}-{hi:.2f}), "
              f"mean {100 * report['mean_change']:+.1f}%, ROUGE-L {report['rougeL_diff']:+.2f}")
    f = report.get("frontier", {})
    if "rl" in f:
        m, b = f["rl"], f["budget"]
        print(f"  best-of-N frontier: RL matches the SFT's best-of-{m['matches_n']:.1f} "
              f"(<= {m['matches_kl']:.2f} nats) at {m['kl_per_summary']:.2f} nats per summary;"
              f" best-of-{b['n']} budget {b['kl_per_summary']:.3f}")
    for label, path in (("report", cfg.run_dir / "eval" / "report.md"),
                        ("figures", cfg.run_dir / "plots"),
                        ("viewer", cfg.run_dir / "view" / "index.html")):
        if Path(path).exists():
            print(f"  {label}: {path}")
