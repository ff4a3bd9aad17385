"""Processes and devices: the accelerator, each process's share of a step, and the
collective checks that keep the processes in step."""
from __future__ import annotations

import contextlib
import math
import random
from datetime import timedelta

import torch

from posttrain.config import Config, ConfigError
from posttrain.model.adapters import sharded
from posttrain.model.load import compute_dtype, resolve_device


DEEPSPEED = (
    "DeepSpeed is not supported: accelerate's DeepSpeed engine takes an optimizer step on "
    "every backward, so a posttrain step of grad_accum micro-batches (and the zero-weight "
    "micro-batch that evens out the processes) would be several AdamW updates; and ZeRO's "
    "sharding of the optimizer state saves next to nothing for LoRA, whose trainable weights "
    "are a few MB. Launch with `posttrain accelerate-config ddp` (or fsdp)")


def setup_accelerator(cfg: Config):
    """The accelerate Accelerator for the configured device and precision, and the dtype."""
    from accelerate import Accelerator  # heavy: loaded by the training stages only
    from accelerate.utils import InitProcessGroupKwargs

    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    # the process group's timeout (when the pipeline has not made the group already)
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.timeout_minutes))
    acc = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[timeout],
                      mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    if acc.distributed_type.value == "DEEPSPEED":
        raise ConfigError(DEEPSPEED)
    return acc, dtype


def rank_share(chunk: list, rank: int, world: int) -> list[tuple[object, float]]:
    """This process's part of one optimizer step's micro-batches: every world-th from its rank,
    each with weight 1. A rank left short (the step's count does not divide) repeats the
    step's first micro-batch with weight 0, so every rank runs as many backward passes (and
    gradient all-reduces) as the others and the result is exactly the step's gradient."""
    mine = [(m, 1.0) for m in chunk[rank::world]]
    per_rank = math.ceil(len(chunk) / world)
    return mine + [(chunk[0], 0.0)] * (per_rank - len(mine))


def all_finite(acc, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all stop together, none waits forever
    in a gradient all-reduce the others left)."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "max")
    return not bool(bad.item())


def sync_unless(acc, model, last: bool):
    """Gradient all-reduce only on a step's last backward (no_sync before it)."""
    return contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model)


def full_optimizer_state(model, optimizer) -> dict | None:
    """The optimizer's state whole, by parameter name, when FSDP shards it: every process
    must call it; None when nothing is sharded (the optimizer's own state_dict serves)."""
    if not sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_whole_state(model, optimizer, weights: dict, optim: dict) -> None:
    """Load whole trainable weights (by parameter name) and optimizer state into a sharded
    model and its optimizer: each process keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(f"a checkpoint's weights do not match the model's trainable ones: "
                         f"{sorted(set(weights) ^ trainable)[:4]}")
    options = StateDictOptions(full_state_dict=True, strict=False)   # the frozen ones stay
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def full_trainable_state(model) -> dict | None:
    """The trainable (LoRA) weights whole, when FSDP shards them (DTensors): every process
    must call it (each gathers the others' shards); None when nothing is sharded."""
    from torch.distributed.tensor import DTensor  # only what FSDP2 makes is one

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(isinstance(p, DTensor) for _, p in params):
        return None
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for n, p in params}


def gather(acc, objects: list) -> list:
    """Every process's `objects`, concatenated in rank order (one process: as they are)."""
    if acc.num_processes == 1:
        return objects
    from accelerate.utils import gather_object  # heavy: only under several processes

    return gather_object(objects)


def rng_state() -> dict:
    """This process's random state: torch (CPU and CUDA) and Python's."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": repr(random.getstate())}
