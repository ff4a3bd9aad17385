"""The RL stage: PPO-style updates against the frozen SFT policy, offline on the generated
set (the reference recipe; offline.py) or online (`rl.mode: online`; online.py).

The behaviour log-probabilities recorded at generation are pi_sft for those tokens, so the
ratio's denominator and the KL reference need no second model and no second forward pass;
the RL adapter starts at zero, so the ratio is 1 at step 0.

Reads `<out_dir>/sft/adapter` and `<out_dir>/generate/`; writes `<out_dir>/rl/adapter`
(the RL LoRA, applied on top of the SFT adapter) and `rl/summary.json`. The pieces: plan.py
(which samples each step trains on), credit.py (rewards, stop credit, advantages), step.py
(one step's passes), trainer.py (the loop around them), held_out.py (length checks).
"""
from __future__ import annotations

import torch

from posttrain.config import Config
from posttrain.done import finished
from posttrain.model.load import load_tokenizer
from posttrain.rl.offline import run_offline
from posttrain.rl.online import run_online
from posttrain.train import dist


def run(cfg: Config) -> dict:
    """Train the RL adapter (offline on the generated set, or online); returns the summary."""
    done = finished("rl", cfg.run_dir / "rl", "summary.json", "adapter", "trains again",
                    "adapter")
    if done is not None:
        return done
    torch.manual_seed(cfg.seed)
    acc, dtype = dist.setup_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter"))
    if cfg.rl.mode == "online":
        return run_online(cfg, acc, dtype, tokenizer)
    return run_offline(cfg, acc, dtype, tokenizer)
