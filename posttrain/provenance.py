"""What made a stage's outputs: the resolved config and the environment (package versions,
the posttrain git commit, Python, the device), written beside them."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import Config, to_yaml
from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.model.choices import DeviceChoices
from posttrain.model.load import resolve_device


def write_config(cfg: Config, stage: Optional[str] = None) -> Path:
    """Write the resolved config as `config.yaml` into the run directory (atomically), and a
    copy into the stage's folder, so each stage's outputs keep the config that made them."""
    text = to_yaml(cfg)
    path = cfg.run_dir / "config.yaml"
    atomic_write_text(path, text)
    if stage is not None:
        atomic_write_text(cfg.run_dir / stage / "config.yaml", text)
        atomic_write_json(cfg.run_dir / stage / "environment.json", environment(cfg))
    return path


def record_config(cfg: Config, stage: str) -> None:
    """Write the stage's config and environment (write_config) unless already there: called
    when a stage writes its first checkpoint or output, so a start that fails before making
    anything leaves nothing that would refuse the corrected command."""
    if not (cfg.run_dir / stage / "config.yaml").is_file():
        write_config(cfg, stage)


def machine() -> dict:
    """The CPU (model name, cores, whether it has AMX / AVX-512 bf16 units: timings and even
    RL outcomes move with them) and a one-line description of it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    out = {"cpu": name, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
           "avx512_bf16": "avx512_bf16" in flags}
    units = ("AMX bf16" if out["amx_bf16"] else "no AMX") + \
        (", AVX-512 bf16" if out["avx512_bf16"] else "")
    return out | {"line": f"{name} ({out['cores']} cores, {units})"}


def environment(cfg: Optional[Config] = None) -> dict:
    """What made a stage's outputs: package versions, the posttrain git commit (when run
    from a checkout; `dirty` when it has uncommitted changes), Python, the device, and (with
    `cfg`) what each device-dependent `auto` setting resolved to (`device_choices`)."""
    versions = {}
    for pkg in ("posttrain", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    here = Path(__file__).resolve().parent  # the package folder, posttrain/
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                         "--untracked-files=no"], text=True,
                                        capture_output=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    env = {"versions": versions, "git_commit": commit, "git_dirty": dirty,
           "python": platform.python_version(), "platform": platform.platform(),
           "machine": machine(), "cuda": torch.version.cuda,
           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if cfg is not None:
        env["device_choices"] = DeviceChoices(cfg, resolve_device(cfg.model)).record()
    return env
