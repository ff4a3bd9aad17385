"""Checkpoint RNG states: each process gets back its own; a checkpoint from before the
per-process states (or from fewer processes) restores the main process's, as it always did."""
import random

import torch

from posttrain.train import checkpoint
from posttrain.train.dist import rng_state


def _state_after(seed: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    return rng_state()


def test_each_rank_restores_its_own_state_and_old_checkpoints_the_main_one():
    s0, s1 = _state_after(1), _state_after(2)
    new_format = {**s0, "rng": [s0, s1]}
    old_format = dict(s0)                      # no "rng": written before per-process states
    for state, rank, want in ((new_format, 0, s0), (new_format, 1, s1),
                              (new_format, 3, s0), (old_format, 1, s0)):
        torch.manual_seed(99)
        random.seed(99)
        checkpoint._restore_rng(state, rank)
        assert torch.equal(torch.get_rng_state(), want["torch_rng"]), (rank, sorted(state))
        assert repr(random.getstate()) == want["python_rng"]
