"""Redo a stage without deleting finished work first.

A redo is built in a shadow run directory (`.redo-<stage>/`, the other stages' folders linked
in) and swapped into the run directory when done. A `swapping` file in the shadow says its
swap has begun; each step of the swap can be repeated, so the next command finishes a swap a
kill interrupted (`posttrain.pipeline` drives the redo and that recovery).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

from omegaconf import OmegaConf

from posttrain.config import Config, ConfigError
from posttrain.io import atomic_write_json, atomic_write_text, read_json
from posttrain.metrics import read_metrics
from posttrain.model.load import resolve_device
from posttrain.train.dist import DEEPSPEED
from posttrain.stages import STAGES, clear_stale, config_diff, made, set_stale, stale

REDO = "redo.json"     # in the run directory: what a `run --force` has redone so far
SWAPPING = "swapping"  # in a shadow: its swap into the run directory has begun


PATIENT = timedelta(days=30)   # how long the other processes wait for the main one's stages


class Processes:
    """Rank and barrier under `accelerate launch` / torchrun (one process: no-ops). The
    process group is made here, with `timeout_minutes` for its collectives."""

    waits = 0   # wait_for_main's count: per process, for the process group's whole life

    def __init__(self, cfg: Config):
        self.state = None
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            raise ConfigError(DEEPSPEED)   # before accelerate asks for deepspeed itself
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState  # heavy: only when several processes run

            self.state = PartialState(cpu=resolve_device(cfg.model).type == "cpu",
                                      timeout=timedelta(minutes=cfg.timeout_minutes))

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def run(self, shared: bool, fn):
        """`fn()` on every process (`shared`) or on the main one, then `after`. Should the
        main process fail in a stage it runs alone, the others are told, and stop too."""
        result = None
        try:
            if shared or self.main:
                result = fn()
        except BaseException:
            if not shared:
                self.main_failed()
            raise
        self.after(shared)
        return result

    def after(self, shared: bool) -> None:
        """Past a stage: a barrier after one every process ran (`shared`), else
        wait_for_main."""
        if shared:
            self.barrier()
        else:
            self.wait_for_main()

    def wait_for_main(self) -> None:
        """Past a stage the main process runs alone (generate, eval, plot, view): the others
        wait for its key in the process group's store, which takes no `timeout_minutes` (a
        barrier would fail after it, however long the stage rightly takes), then all meet."""
        if self.state is None:
            return
        store, key = self._store_key()
        Processes.waits += 1
        if self.main:
            store.set(key, "done")
        else:
            store.wait([key], PATIENT)
            if store.get(key) == b"failed":
                raise RuntimeError("the main process failed in a stage it ran alone (its "
                                   "error says why); this process stops too")
        self.barrier()

    def main_failed(self) -> None:
        """The main process, failing in a stage it runs alone: the others stop waiting."""
        if self.state is not None and self.main:
            store, key = self._store_key()
            store.set(key, "failed")

    def _store_key(self):
        """The process group's key-value store, and the key of the next wait: one per wait
        and per restart of the launch (torchrun keeps its store across restarts)."""
        import torch.distributed as tdist  # only when several processes run

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return (tdist.distributed_c10d._get_default_store(),
                f"posttrain/{restart}/main-done/{Processes.waits}")


def shadow_dir(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / f".redo-{stage}"


def prepare_shadow(cfg: Config, stage: str) -> None:
    """Make (or reuse, or replace) the shadow of `stage`, saying which, and link the other
    stages' folders into it. Main process only."""
    shadow, folder = shadow_dir(cfg, stage), STAGES[stage].folder
    shadow_cfg = dataclasses.replace(cfg, out_dir=str(shadow))
    if shadow.is_dir() and config_diff(shadow_cfg, stage):  # a redo of another config
        print(f"{stage}: discarding the unfinished redo in {shadow} (another config)")
        shutil.rmtree(shadow)
    if shadow.is_dir() and made(shadow_cfg, stage):
        print(f"{stage}: resuming the redo in {shadow}; {cfg.run_dir / folder} stays "
              "until it is done")
    else:
        print(f"{stage}: redoing it in {shadow}; {cfg.run_dir / folder} stays until the "
              "new outputs are written")
    shadow.mkdir(exist_ok=True)
    for other in (s.folder for s in STAGES.values()):
        link = shadow / other
        if other != folder and (cfg.run_dir / other).exists() and not link.is_symlink():
            link.symlink_to(Path("..") / other, target_is_directory=True)


def run_in_shadow(cfg: Config, stage: str, procs: Processes):
    """Run `stage` on its shadow (on every process if it is shared, else on the main one);
    if it fails having made nothing there, the shadow goes too."""
    shadow = shadow_dir(cfg, stage)
    result = None
    shadow_cfg = dataclasses.replace(cfg, out_dir=str(shadow))
    try:
        if STAGES[stage].shared or procs.main:
            result = STAGES[stage].run(shadow_cfg)
    except BaseException:
        if procs.main and not made(shadow_cfg, stage):  # nothing made: leave no trace
            shutil.rmtree(shadow, ignore_errors=True)
        raise
    return result


def _later(stage: str) -> list[str]:
    names = list(STAGES)
    return names[names.index(stage) + 1:]


def _mark_later_stale(cfg: Config, stage: str) -> list[str]:
    """Swap step 1: what later stages made from the old outputs becomes stale."""
    marks = stale(cfg)
    later = [s for s in _later(stage) if STAGES[s].marker and made(cfg, s)]
    for s in later:
        marks.setdefault(s, f"made from the {stage} outputs that were redone since")
    set_stale(cfg, marks)
    return later


def _merge_metrics(cfg: Config, stage: str, shadow: Path) -> None:
    """Swap step 2: the stage's rows in metrics.jsonl: the redo's replace the old ones."""
    if (shadow / "metrics.jsonl").is_file():
        rows = [r for r in read_metrics(cfg.run_dir) if r.get("stage") != stage]
        rows += read_metrics(shadow, stage)
        atomic_write_text(cfg.run_dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))


def _restore_config(cfg: Config, new: Path) -> None:
    """Swap step 3: the config it was made with, under the real out_dir."""
    if (new / "config.yaml").is_file():
        stored = OmegaConf.load(new / "config.yaml")
        stored.out_dir = str(cfg.run_dir)
        atomic_write_text(new / "config.yaml", OmegaConf.to_yaml(stored))
        atomic_write_text(cfg.run_dir / "config.yaml", OmegaConf.to_yaml(stored))


def _move_in(cfg: Config, stage: str, shadow: Path) -> None:
    """Swap step 4: the folder (old aside, new in, old gone), then its TensorBoard logs."""
    folder = STAGES[stage].folder
    new, dest = shadow / folder, cfg.run_dir / folder
    old = cfg.run_dir / f".{folder}.old"
    if new.is_dir():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
    if (shadow / "tensorboard" / stage).is_dir():
        shutil.rmtree(cfg.run_dir / "tensorboard" / stage, ignore_errors=True)
        (cfg.run_dir / "tensorboard").mkdir(exist_ok=True)
        os.replace(shadow / "tensorboard" / stage, cfg.run_dir / "tensorboard" / stage)


def swap_in(cfg: Config, stage: str) -> None:
    """Move a finished redo from its shadow into the run directory. A `swapping` file in the
    shadow says a swap has begun; each step can be repeated, so a recovery finishes a swap
    a kill interrupted."""
    shadow, folder = shadow_dir(cfg, stage), STAGES[stage].folder
    atomic_write_text(shadow / SWAPPING, stage + "\n")
    later = _mark_later_stale(cfg, stage)
    _merge_metrics(cfg, stage, shadow)
    _restore_config(cfg, shadow / folder)
    _move_in(cfg, stage, shadow)
    # 5. an unfinished redo of a later stage was built on the old outputs: drop it
    for s in _later(stage):
        discard(shadow_dir(cfg, s))
    # 6. this stage is current again; `run --force` counts it as redone
    clear_stale(cfg, stage)
    served(cfg, stage)
    discard(shadow)
    print(f"{stage}: the redo replaced {cfg.run_dir / folder}"
          + (f"; stale now: {', '.join(later)}" if later else ""))


def discard(folder: Path) -> None:
    """Remove a shadow: renamed first, so a kill mid-way never leaves half a shadow."""
    if folder.exists():
        trash = folder.with_name(folder.name + ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash)


def served(cfg: Config, stage: str) -> None:
    """Count `stage` as redone in the record of a `run --force`, if one is going on."""
    record = cfg.run_dir / REDO
    if record.is_file():
        rec = read_json(record)
        rec["served"] = sorted(set(rec.get("served", [])) | {stage})
        atomic_write_json(record, rec)

