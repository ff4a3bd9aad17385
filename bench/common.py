"""What the benches share: the machine they ran on (posttrain.provenance.environment: the
CPU and its bf16 units, package versions, the git commit) and peak memory. A bench script
imports it as `common` (its own folder is first on sys.path when run as a script)."""
from __future__ import annotations

import resource
from importlib import metadata

import torch

from posttrain.provenance import environment


def machine(*packages: str) -> dict:
    """posttrain.provenance.environment(), plus the versions of `packages` (e.g. "trl")."""
    env = environment()
    for pkg in packages:
        try:
            env["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env["versions"][pkg] = None
    return env


def machine_line() -> str:
    """The CPU in one line: model name, cores, AMX / AVX-512 bf16 (every table states it)."""
    return environment()["machine"]["line"]


def peak_memory_mib(device: torch.device | str = "cpu") -> float:
    """This process's peak memory: max allocated on CUDA, else the resident set (ru_maxrss)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
