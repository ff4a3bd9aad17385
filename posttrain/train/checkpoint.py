"""Resumable training checkpoints: LoRA weights, optimizer, scheduler, each process's RNG
state and the position.

A checkpoint is a folder `step_<N>` written under a temporary name and renamed when
complete, so a killed job never leaves a half-written checkpoint that looks finished.
Everything is read back with safetensors or `torch.load(weights_only=True)`. `state.pt`
keeps the main process's RNG state under its old keys (checkpoints made before the
per-process states load as they did) and every process's under `rng`, by rank.
"""
from __future__ import annotations

import ast
import json
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from posttrain.io import atomic_dir, atomic_write_json
from posttrain.config import ConfigError
from posttrain.model.adapters import sharded
from posttrain.train.dist import load_whole_state, rng_state

_STEP = re.compile(r"^step_(\d+)$")


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    if not Path(ckpt_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir()
             if (m := _STEP.match(p.name)) and (p / "state.pt").is_file()]
    return max(found)[1] if found else None


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler, extra: dict,
         keep: int = 2, adapter: str = "default", rng: Optional[list] = None,
         whole: tuple = (None, None)) -> Path:
    """Write checkpoint `step_<step>` and prune all but the `keep` newest. `rng`: every
    process's random state (train.dist.rng_state), by rank; None: this process's. `whole`:
    under FSDP, the trainable weights and optimizer state gathered whole, by parameter
    name (written as `trainable.safetensors` and the state's `optimizer`)."""
    from peft import get_peft_model_state_dict  # heavy: peft imports transformers

    rng = rng if rng is not None else [rng_state()]
    path = Path(ckpt_dir) / f"step_{step}"
    weights, optim = whole
    with atomic_dir(path) as tmp:
        if weights is None:
            weights = {k: v.detach().cpu().contiguous() for k, v in
                       get_peft_model_state_dict(model, adapter_name=adapter).items()}
            save_file(weights, str(tmp / "adapter.safetensors"))
        else:
            save_file({k: v.contiguous() for k, v in weights.items()},
                      str(tmp / "trainable.safetensors"))
        torch.save({"step": step,
                    "optimizer": optimizer.state_dict() if optim is None else optim,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    **rng[0], "rng": rng}, tmp / "state.pt")
        atomic_write_json(tmp / "extra.json", extra)
    old = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).iterdir()
                 if (m := _STEP.match(p.name)))
    for _, p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return path


def _restore_rng(state: dict, rank: int) -> None:
    """This process's own random state, or (a checkpoint from before per-process states,
    or from fewer processes) the main process's."""
    per_rank = state.get("rng") or []
    mine = per_rank[rank] if rank < len(per_rank) else state
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    random.setstate(_tuples(ast.literal_eval(mine["python_rng"])))


def load(path: Path, model, optimizer, scheduler, adapter: str = "default",
         rank: int = 0) -> tuple[int, dict]:
    """Restore a checkpoint into the live objects; returns (step, extra)."""
    from peft import set_peft_model_state_dict  # heavy: peft imports transformers

    state = torch.load(Path(path) / "state.pt", weights_only=True)
    if (Path(path) / "trainable.safetensors").is_file():   # FSDP's: whole, by name
        load_whole_state(model, optimizer, load_file(str(Path(path) / "trainable.safetensors")),
                         state["optimizer"])
    elif sharded(model):
        raise ConfigError(f"{path} was written without FSDP; resume it under the launch that "
                          "wrote it, or delete its checkpoints folder to start over")
    else:
        set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter.safetensors")),
                                  adapter_name=adapter)
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state, rank)
    return state["step"], json.loads((Path(path) / "extra.json").read_text())


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x
