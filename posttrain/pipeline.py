"""`posttrain run`: SFT -> generate -> RL -> eval -> plot -> view in one run directory.

A stage whose outputs exist is skipped when the config that made them (the copy in its
folder) agrees with the current one on every section the stage reads; a stage cut short
resumes from its last checkpoint. If a finished or started stage was made with a different
config, the run stops and names the keys, unless `--force` is given: then that stage is
redone. A redo never deletes finished work first: it is built in a shadow run directory
(`.redo-<stage>/`, the other stages' folders linked in) and swapped in when done; the later
stages' outputs are then marked stale (`stale.json`) and redone in turn. Wall time per stage
goes to `pipeline.json`.
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

from posttrain import evaluate, generate, plot, rl, sft, view
from posttrain.config import Config, ConfigError, to_yaml
from posttrain.data import FILE_BUILDERS
from posttrain.io import atomic_write_json, atomic_write_text, read_json
from posttrain.metrics import read_metrics
from posttrain.modeling import check_hub

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
STALE = "stale.json"   # in the run directory: stages made from outputs redone since
REDO = "redo.json"     # in the run directory: what a `run --force` has redone so far
SWAPPING = "swapping"  # in a shadow: its swap into the run directory has begun


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


def stale(cfg: Config) -> dict:
    """{stage: why} for stages whose outputs were made from an earlier stage's outputs that
    have since been redone: they are never taken as finished."""
    path = cfg.run_dir / STALE
    return read_json(path) if path.is_file() else {}


def _set_stale(cfg: Config, marks: dict) -> None:
    path = cfg.run_dir / STALE
    if marks:
        atomic_write_json(path, marks)
    else:
        path.unlink(missing_ok=True)


def _made(cfg: Config, stage: str) -> bool:
    """The stage's folder holds anything (finished or not)."""
    folder = cfg.run_dir / STAGES[stage][1]
    return folder.is_dir() and any(folder.iterdir())


def stage_done(cfg: Config, stage: str) -> bool:
    _, folder, marker, _ = STAGES[stage]
    return (marker is not None and (cfg.run_dir / folder / marker).is_file()
            and stage not in stale(cfg))


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


def _needs(cfg: Config, stage: str) -> list[str]:
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


WHAT = {"sft": "SFT adapter", "generate": "generated set", "rl": "RL adapter"}


def guard_stage(cfg: Config, stage: str, force: bool = False) -> None:
    """Before a stage run alone (nothing is written): refuse if the outputs it reads are
    missing, stale or made with a different config, or if its own were made with a different
    config and `force` is not given."""
    if STAGES[stage][2] is None:  # plot, view: they read what is on disk, whatever made it
        return
    names = list(STAGES)
    marks = stale(cfg)
    for need in _needs(cfg, stage):
        folder = cfg.run_dir / STAGES[need][1]
        if need in marks:
            raise ConfigError(f"{folder} (the {WHAT[need]}, which {stage} reads) is stale: "
                              f"{marks[need]}; run `posttrain {need}` first")
    for earlier in names[:names.index(stage)]:
        diff = config_diff(cfg, earlier) if earlier not in marks else []
        if diff:
            raise ConfigError(
                f"{cfg.run_dir / STAGES[earlier][1]} (the {earlier} stage's outputs, which "
                f"{stage} reads) was made with a different config:\n  " + "\n  ".join(diff)
                + f"\nredo {earlier} first (`posttrain {earlier} --force ...`; its outputs "
                "are replaced only once the new ones are written), or use another out_dir")
    for need in _needs(cfg, stage):
        if not stage_done(cfg, need):
            raise ConfigError(f"no {WHAT[need]} in {cfg.run_dir / STAGES[need][1]}: run "
                              f"`posttrain {need}` first (with the same out_dir and config)")
    diff = config_diff(cfg, stage) if stage not in marks else []  # stale: redone anyway
    if diff and not force:
        raise ConfigError(
            f"{cfg.run_dir / STAGES[stage][1]} was made with a different config:\n  "
            + "\n  ".join(diff) + f"\nuse another out_dir, or --force to redo {stage} (the "
            "old outputs stay until the new ones are written)")


def run_stage(cfg: Config, stage: str, force: bool = False):
    """One stage alone (`posttrain <stage>`): check, then run it, resume it, redo it (forced,
    stale or changed: built beside the old outputs and swapped in at the end) or report it
    finished. generate and eval run on the main process only under `accelerate launch`."""
    procs = _Processes(cfg)
    if procs.main:
        _recover(cfg)
    procs.barrier()
    guard_stage(cfg, stage, force)
    module = STAGES[stage][0]
    if STAGES[stage][2] is None:  # plot, view: they read finished outputs, write atomically
        return module.run(cfg) if procs.main else None
    result = None
    if _made(cfg, stage) and (force or stage in stale(cfg) or config_diff(cfg, stage)):
        result = _redo(cfg, stage, procs)
    elif stage in SHARED or procs.main:
        result = module.run(cfg)
        if procs.main:
            _clear_stale(cfg, stage)  # a stale stage with an empty folder ran in place
    procs.barrier()
    if stage == "eval" and procs.main:
        print(f"eval: report in {cfg.run_dir / 'eval' / 'report.md'}")
    return result


def _shadow(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / f".redo-{stage}"


def _redo(cfg: Config, stage: str, procs: "_Processes"):
    """Redo `stage` in a shadow run directory (the other stages' folders linked in), then swap
    its folder in. A kill leaves the old outputs in place; the same command resumes the redo
    from its checkpoints."""
    shadow, folder = _shadow(cfg, stage), STAGES[stage][1]
    if procs.main:
        shadow_cfg = dataclasses.replace(cfg, out_dir=str(shadow))
        if shadow.is_dir() and config_diff(shadow_cfg, stage):  # a redo of another config
            print(f"{stage}: discarding the unfinished redo in {shadow} (another config)")
            shutil.rmtree(shadow)
        if shadow.is_dir() and _made(shadow_cfg, stage):
            print(f"{stage}: resuming the redo in {shadow}; {cfg.run_dir / folder} stays "
                  "until it is done")
        else:
            print(f"{stage}: redoing it in {shadow}; {cfg.run_dir / folder} stays until the "
                  "new outputs are written")
        shadow.mkdir(exist_ok=True)
        for _, other, _, _ in STAGES.values():
            link = shadow / other
            if other != folder and (cfg.run_dir / other).exists() and not link.is_symlink():
                link.symlink_to(Path("..") / other, target_is_directory=True)
    procs.barrier()
    result = None
    shadow_cfg = dataclasses.replace(cfg, out_dir=str(shadow))
    try:
        if stage in SHARED or procs.main:
            result = STAGES[stage][0].run(shadow_cfg)
    except BaseException:
        if procs.main and not _made(shadow_cfg, stage):  # nothing made: leave no trace
            shutil.rmtree(shadow, ignore_errors=True)
        raise
    procs.barrier()
    if procs.main:
        _swap_in(cfg, stage)
    procs.barrier()
    return result


def _swap_in(cfg: Config, stage: str) -> None:
    """Move a finished redo from its shadow into the run directory. A `swapping` file in the
    shadow says a swap has begun; each step can be repeated, so `_recover` finishes a swap
    a kill interrupted."""
    shadow, folder = _shadow(cfg, stage), STAGES[stage][1]
    new, dest = shadow / folder, cfg.run_dir / folder
    old = cfg.run_dir / f".{folder}.old"
    atomic_write_text(shadow / SWAPPING, stage + "\n")
    # 1. first, what later stages made from the old outputs becomes stale
    names = list(STAGES)
    marks = stale(cfg)
    later = [s for s in names[names.index(stage) + 1:] if STAGES[s][2] and _made(cfg, s)]
    for s in later:
        marks.setdefault(s, f"made from the {stage} outputs that were redone since")
    _set_stale(cfg, marks)
    # 2. the stage's rows in metrics.jsonl: the redo's replace the old ones
    if (shadow / "metrics.jsonl").is_file():
        rows = [r for r in read_metrics(cfg.run_dir) if r.get("stage") != stage]
        rows += read_metrics(shadow, stage)
        atomic_write_text(cfg.run_dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
    # 3. the config it was made with, under the real out_dir
    if (new / "config.yaml").is_file():
        stored = OmegaConf.load(new / "config.yaml")
        stored.out_dir = str(cfg.run_dir)
        atomic_write_text(new / "config.yaml", OmegaConf.to_yaml(stored))
        atomic_write_text(cfg.run_dir / "config.yaml", OmegaConf.to_yaml(stored))
    # 4. the folder: old aside, new in, old gone
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
    # 5. an unfinished redo of a later stage was built on the old outputs: drop it
    for s in names[names.index(stage) + 1:]:
        _discard(_shadow(cfg, s))
    # 6. this stage is current again; `run --force` counts it as redone
    _clear_stale(cfg, stage)
    _served(cfg, stage)
    _discard(shadow)
    print(f"{stage}: the redo replaced {dest}"
          + (f"; stale now: {', '.join(later)}" if later else ""))


def _discard(folder: Path) -> None:
    """Remove a shadow: renamed first, so a kill mid-way never leaves half a shadow."""
    if folder.exists():
        trash = folder.with_name(folder.name + ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash)


def _clear_stale(cfg: Config, stage: str) -> None:
    marks = stale(cfg)
    if stage in marks:
        del marks[stage]
        _set_stale(cfg, marks)


def _recover(cfg: Config) -> None:
    """Finish what a kill interrupted: a swap half done, or a redo finished but not swapped."""
    for trash in cfg.run_dir.glob(".redo-*.trash"):
        shutil.rmtree(trash, ignore_errors=True)
    for stage, (_, folder, marker, _) in STAGES.items():
        shadow, dest = _shadow(cfg, stage), cfg.run_dir / folder
        old = cfg.run_dir / f".{folder}.old"
        if marker and ((shadow / SWAPPING).is_file() or (shadow / folder / marker).is_file()):
            _swap_in(cfg, stage)
        elif old.exists() and not dest.exists():
            os.replace(old, dest)


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
    """Run every stage not yet done; returns {stage: seconds or "skipped"}. A stage whose
    outputs are stale or (with `force`) whose config changed is redone beside its old
    outputs; `force` with no change redoes every stage. A forced run records what it has
    redone in `redo.json`, so the same command after a kill goes on where it stopped."""
    procs = _Processes(cfg)
    names = list(STAGES)
    if procs.main:
        _recover(cfg)
    procs.barrier()
    forced = _forced_stages(cfg, procs) if force else set()
    timing_file = cfg.run_dir / "pipeline.json"
    timings = read_json(timing_file) if timing_file.is_file() else {}
    for stage in names:
        diff = config_diff(cfg, stage)
        if diff and not force and stage not in stale(cfg):  # stale: redone anyway
            raise ConfigError(
                f"{cfg.run_dir / STAGES[stage][1]} was made with a different config:\n  "
                + "\n  ".join(diff) + "\nuse another out_dir, or --force to redo "
                f"{stage} and every stage after it (old outputs stay until replaced)")
        if stage == "generate" and cfg.rl.mode == "online":
            print("run: generate not needed (rl.mode=online samples its own rounds)")
            continue
        redo = _made(cfg, stage) and (stage in forced or stage in stale(cfg) or bool(diff))
        if not redo and stage_done(cfg, stage):
            print(f"run: {stage} already done, skipping")
            continue
        print(f"run: {stage}" + (" (redo)" if redo else ""))
        t0 = time.perf_counter()
        if redo:
            _redo(cfg, stage, procs)
        elif stage in SHARED or procs.main:
            STAGES[stage][0].run(cfg)
        procs.barrier()
        timings[stage] = round(time.perf_counter() - t0, 1)
        if procs.main:
            atomic_write_json(timing_file, timings)
            if not redo:  # a redo's swap has done both
                _clear_stale(cfg, stage)  # a stale stage with an empty folder ran in place
                _served(cfg, stage)
    if procs.main:
        (cfg.run_dir / REDO).unlink(missing_ok=True)
        _print_figures(cfg, timings)
    return timings


def _forced_stages(cfg: Config, procs: "_Processes") -> set:
    """The stages `run --force` redoes: from the first whose config changed (every stage
    when none did), less those this same forced run already redid before a kill."""
    names = [s for s in STAGES if STAGES[s][2]]
    changed = [s for s in names if config_diff(cfg, s)]
    wanted = set(names[names.index(changed[0]):] if changed else names)
    record = cfg.run_dir / REDO
    text = to_yaml(dataclasses.replace(cfg, out_dir="."))
    done = []
    if record.is_file():
        old = read_json(record)
        if old.get("config") == text:
            done = old.get("served", [])
    if procs.main:
        atomic_write_json(record, {"config": text, "served": done})
    return wanted - set(done)


def _served(cfg: Config, stage: str) -> None:
    record = cfg.run_dir / REDO
    if record.is_file():
        rec = read_json(record)
        rec["served"] = sorted(set(rec.get("served", [])) | {stage})
        atomic_write_json(record, rec)


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
