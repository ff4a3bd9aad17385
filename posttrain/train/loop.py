"""The training loop SFT and RL share: the optimizer and its schedule, resuming from the
last checkpoint, one optimizer step at a time with its metrics row and progress bar,
checkpoints, and the finished adapter with its summary.

A stage gives the loop its model, its optimizer section (cfg.sft or cfg.rl) and the number
of steps, then for each step runs its forward and backward passes (under `guarded`, which names the
step in a TrainingError) and `optimizer_step`, which clips, steps and counts.
"""
from __future__ import annotations

import shutil

import torch
from tqdm.auto import tqdm

from posttrain import provenance
from posttrain.config import Config
from posttrain.io import atomic_write_json
from posttrain.metrics import MetricsLogger
from posttrain.model.adapters import save_adapter
from posttrain.train import checkpoint, dist


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on trainable parameters with >= 2 dimensions only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.max_lr)


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup to max_lr, then cosine decay to min_lr."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # heavy

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps, min_lr=cfg.min_lr)


def optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip (0 = no clipping), step, advance the schedule; returns (grad norm, lr used)."""
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


class TrainLoop:
    """One stage's training: `stage` names its folder, metrics and messages; `optim` is its
    optimizer section; `adapter` the peft adapter that trains and is saved; `extra` the
    stage's own state a fresh run starts with (a resumed one gets the checkpoint's)."""

    def __init__(self, cfg: Config, stage: str, optim, model, total_steps: int, acc,
                 adapter: str = "default", extra: dict | None = None):
        self.cfg, self.stage, self.optim, self.acc = cfg, stage, optim, acc
        self.total, self.adapter = total_steps, adapter
        optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(optimizer, optim, total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.out = cfg.run_dir / stage
        self.ckpt_dir = self.out / "checkpoints"
        self.step, self.extra = 0, dict(extra or {})
        last = checkpoint.latest(self.ckpt_dir)
        if last is not None:
            self.step, self.extra = checkpoint.load(
                last, acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                adapter=adapter, rank=acc.process_index)
            print(f"{stage}: resuming from {last} (step {self.step} of {total_steps})")
        self.metrics = MetricsLogger(cfg.run_dir, stage, enabled=acc.is_main_process,
                                     resume_step=self.step if last is not None else -1)
        self.bar = None

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def start(self) -> None:
        """Into train mode, with the progress bar at the resumed step."""
        self.model.train()
        self.bar = tqdm(total=self.total, initial=self.step, desc=self.stage,
                        disable=not self.acc.is_main_process)

    def guarded(self, body):
        """`body()`, with a TrainingError naming the step and the last good checkpoint."""
        try:
            return body()
        except TrainingError as e:
            raise TrainingError(f"{e} at step {self.step + 1}; the last good checkpoint is "
                                f"{checkpoint.latest(self.ckpt_dir)}") from None

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule, count the step; (grad norm, lr)."""
        grad_norm, lr = optimizer_step(self.acc, self.model, self.optimizer, self.scheduler,
                                       self.optim.max_grad_norm)
        self.step += 1
        return grad_norm, lr

    def log(self, row: dict, **postfix) -> None:
        """The step's row to metrics.jsonl, and the progress bar on by one."""
        self.metrics.log(self.step, **row)
        self.bar.set_postfix(**postfix)
        self.bar.update(1)

    def checkpoint_due(self, count: int, every: int) -> bool:
        """Whether `count` (steps, or online rounds) calls for a checkpoint before the end."""
        return bool(every) and count % every == 0 and self.step < self.total

    def save_checkpoint(self) -> None:
        """Every process's RNG state to the main process, which writes the checkpoint."""
        rng = dist.gather(self.acc, [dist.rng_state()])
        # under FSDP every process gathers the shards of the weights and optimizer state
        whole = dist.full_trainable_state(self.unwrapped)
        optim = dist.full_optimizer_state(self.unwrapped, self.optimizer)
        if self.acc.is_main_process:
            provenance.record_config(self.cfg, self.stage)
            checkpoint.save(self.ckpt_dir, self.step, self.unwrapped, self.optimizer,
                            self.scheduler, self.extra, keep=self.optim.keep_checkpoints,
                            adapter=self.adapter, rng=rng, whole=(whole, optim))
        self.acc.wait_for_everyone()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self, tokenizer, summary: dict, after: dict) -> None:
        """Log the held-out figures after training, then (main process) the config, the
        adapter and the summary; the checkpoints go once the adapter is written."""
        self.metrics.log(self.step, **after)
        self.metrics.close()
        whole = dist.full_trainable_state(self.unwrapped)   # every process: FSDP gathers
        if self.acc.is_main_process:
            provenance.record_config(self.cfg, self.stage)
            save_adapter(self.unwrapped, tokenizer, self.out / "adapter",
                         None if self.adapter == "default" else self.adapter, whole)
            atomic_write_json(self.out / "summary.json", summary)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.acc.wait_for_everyone()  # the adapter is on disk before any process reads it
