"""The SFT stage: next-token loss on completion tokens only, LoRA, resumable.

Reads the data and model named in the config; writes into `<out_dir>/sft/`:
  adapter/        the LoRA adapter and tokenizer (peft format)
  checkpoints/    resumable checkpoints (removed when the stage finishes)
  summary.json    held-out loss before/after, steps, tokens/s, wall time
and appends its metrics to `<out_dir>/metrics.jsonl`.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from posttrain import checkpoint, modeling
from posttrain.config import Config, record_config
from posttrain.data import (Example, collate, cue_rows, length_grouped_batches, load_rows,
                            tokenize_rows)
from posttrain.io import atomic_write_json
from posttrain.metrics import MetricsLogger


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def setup_accelerator(cfg: Config):
    from accelerate import Accelerator

    device = modeling.resolve_device(cfg.model)
    dtype = modeling.compute_dtype(cfg.model, device)
    acc = Accelerator(cpu=device.type == "cpu",
                      mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    return acc, dtype


def load_split_rows(cfg: Config) -> dict:
    """The train and eval rows (strings), read and checked before any model is loaded. With
    `data.length_cue` each prompt asks for its own reference summary's length."""
    rows = {name: load_rows(source, split, cfg.data) for name, source, split in (
        ("train", cfg.data.train, cfg.data.train_split),
        ("eval", cfg.data.eval, cfg.data.eval_split))}
    if cfg.data.length_cue:
        rows = {name: cue_rows(r, cfg.data) for name, r in rows.items()}
    return rows


def load_examples(cfg: Config, rows: dict, tokenizer, log=print) -> tuple[list, list]:
    """Tokenized train and eval examples, with what the length policies dropped reported."""
    out = []
    for name, limit in (("train", cfg.data.max_train_rows), ("eval", cfg.data.max_eval_rows)):
        examples, report = tokenize_rows(rows[name], tokenizer, cfg.data)
        if not examples:
            raise TrainingError(f"data.{name}: no rows left after the length limits: {report}")
        examples = examples[:limit] if limit is not None else examples
        log(f"data.{name}: {report}, using {len(examples)}")
        out.append(examples)
    return out[0], out[1]


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on trainable parameters with >= 2 dimensions only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.max_lr)


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup to max_lr, then cosine decay to min_lr."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

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


def micro_batches(examples: list[Example], cfg: Config) -> list[list[int]]:
    """The whole run's micro-batches (lists of example indices), fixed by the seed so a
    resumed run sees the same order from the same position."""
    lengths = [len(e) for e in examples]
    out = []
    for epoch in range(math.ceil(cfg.sft.epochs)):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if cfg.sft.batching == "random":
            order = torch.randperm(len(lengths), generator=g).tolist()
            bs = cfg.sft.batch_size
            out += [order[i:i + bs] for i in range(0, len(order), bs)]
        else:
            out += length_grouped_batches(lengths, cfg.sft.batch_size, g)
    per_epoch = math.ceil(len(examples) / cfg.sft.batch_size)
    return out[:max(1, int(round(cfg.sft.epochs * per_epoch)))]


def completion_loss(model, batch, reduction: str = "mean",
                    only_needed: bool = True) -> torch.Tensor:
    """Cross-entropy of the completion tokens (prompt and padding carry no loss);
    `only_needed=False` runs the LM head at every position (fast.completion_logits)."""
    logits = modeling.completion_logits(model, batch, only_needed)          # (N, V)
    return F.cross_entropy(logits.float(), batch.targets, reduction=reduction)


@torch.no_grad()
def evaluate_loss(model, examples, tokenizer, batch_size: int, accelerator) -> float:
    """Mean completion-token loss over `examples`, in fixed length order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = to_device(collate([examples[i] for i in order[s:s + batch_size]],
                                  tokenizer.pad_token_id), accelerator.device)
        with accelerator.autocast():
            total += completion_loss(model, batch, reduction="sum").item()
        count += len(batch.targets)
    model.train(was_training)
    return total / count


def to_device(batch, device):
    return type(batch)(*[t.to(device) if t is not None else None for t in batch])


def run(cfg: Config) -> dict:
    """Train the SFT adapter; returns the summary (also written to sft/summary.json)."""
    out = cfg.run_dir / "sft"
    if (out / "summary.json").is_file() and (out / "adapter").is_dir():
        import json
        print(f"sft: already finished in {out} "
              "(--force trains again, keeping it until the new adapter is written)")
        return json.loads((out / "summary.json").read_text())
    rows = load_split_rows(cfg)
    torch.manual_seed(cfg.seed)
    acc, dtype = setup_accelerator(cfg)
    tokenizer = modeling.load_tokenizer(cfg.model)
    train, held_out = load_examples(cfg, rows, tokenizer)

    # The model: frozen base + fresh LoRA. Only LoRA weights are trainable.
    base = modeling.load_base_model(cfg.model, acc.device)
    modeling.check_context(cfg, base)
    model = modeling.add_lora(base, cfg.lora, quantized=cfg.model.load_in_4bit)
    plan = micro_batches(train, cfg)
    # one optimizer step = grad_accum micro-batches on each of the processes
    per_step = cfg.sft.grad_accum * acc.num_processes
    total_steps = math.ceil(len(plan) / per_step)
    if cfg.sft.max_steps > 0:
        total_steps = min(total_steps, cfg.sft.max_steps)
    optimizer = build_optimizer(model, cfg.sft)
    scheduler = build_scheduler(optimizer, cfg.sft, total_steps)
    model, optimizer = acc.prepare(model, optimizer)

    ckpt_dir = out / "checkpoints"
    step, extra = 0, {}
    if (last := checkpoint.latest(ckpt_dir)) is not None:
        step, extra = checkpoint.load(last, acc.unwrap_model(model), optimizer, scheduler)
        print(f"sft: resuming from {last} (step {step} of {total_steps})")
    if "eval_loss_before" not in extra:
        extra["eval_loss_before"] = evaluate_loss(model, held_out, tokenizer,
                                                  cfg.sft.eval_batch_size, acc)
    metrics = MetricsLogger(cfg.run_dir, "sft", enabled=acc.is_main_process,
                            resume_step=step if last is not None else -1)
    if step == 0:
        metrics.log(0, eval_loss=extra["eval_loss_before"])
    extra.setdefault("train_seconds", 0.0)
    extra.setdefault("train_tokens", 0)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not acc.is_main_process)
    while step < total_steps:
        t0 = time.perf_counter()
        # 1. batch: this step's micro-batches, fixed by the plan
        chunk = plan[step * per_step:(step + 1) * per_step]
        step_targets = sum(len(train[i].completion_ids) for ids in chunk for i in ids)
        loss_sum, tokens = 0.0, 0
        mine = rank_share(chunk, acc.process_index, acc.num_processes)
        for k, (ids, weight) in enumerate(mine):
            batch = to_device(collate([train[i] for i in ids], tokenizer.pad_token_id,
                                      packed=cfg.sft.batching == "packed"), acc.device)
            # 2. loss on completion tokens only
            with sync_unless(acc, model, k == len(mine) - 1):
                with acc.autocast():
                    loss = completion_loss(model, batch, "sum", cfg.fast.completion_logits)
                if not all_finite(acc, loss):
                    raise TrainingError(f"sft: non-finite loss at step {step + 1}; the last "
                                        f"good checkpoint is {checkpoint.latest(ckpt_dir)}")
                # 3. backward: every completion token of the step weighs the same (the
                # processes' gradients are averaged, hence the factor)
                acc.backward(loss * (weight * acc.num_processes / step_targets))
            loss_sum += weight * loss.item()
            tokens += int(weight) * batch.num_tokens
        if acc.num_processes > 1:  # the step's loss and tokens over all processes
            loss_sum, tokens = acc.reduce(torch.tensor([loss_sum, float(tokens)],
                                                       device=acc.device), "sum").tolist()
            tokens = int(tokens)
        # 4. clip and step
        grad_norm, lr = optimizer_step(acc, model, optimizer, scheduler, cfg.sft.max_grad_norm)
        step += 1
        # 5. log and checkpoint
        dt = time.perf_counter() - t0
        extra["train_seconds"] += dt
        extra["train_tokens"] += tokens
        loss_value = loss_sum / step_targets
        metrics.log(step, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                    tokens_per_s=tokens / dt, tokens=tokens)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if cfg.sft.checkpoint_every and step % cfg.sft.checkpoint_every == 0 and step < total_steps:
            if acc.is_main_process:
                record_config(cfg, "sft")
                checkpoint.save(ckpt_dir, step, acc.unwrap_model(model), optimizer, scheduler,
                                extra, keep=cfg.sft.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()

    # Held-out loss after, the adapter, the summary.
    after = evaluate_loss(model, held_out, tokenizer, cfg.sft.eval_batch_size, acc)
    metrics.log(step, eval_loss=after)
    metrics.close()
    summary = {
        "eval_loss_before": extra["eval_loss_before"], "eval_loss_after": after,
        "steps": step, "train_examples": len(train), "eval_examples": len(held_out),
        "train_tokens": extra["train_tokens"], "train_seconds": round(extra["train_seconds"], 2),
        "tokens_per_s": round(extra["train_tokens"] / max(extra["train_seconds"], 1e-9), 1),
        "precision": str(dtype).replace("torch.", ""), "device": str(acc.device),
        "processes": acc.num_processes,
    }
    if acc.is_main_process:
        record_config(cfg, "sft")
        modeling.save_adapter(acc.unwrap_model(model), tokenizer, out / "adapter")
        atomic_write_json(out / "summary.json", summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    acc.wait_for_everyone()  # the adapter is on disk before any process reads it
    print(f"sft: held-out completion loss {summary['eval_loss_before']:.4f} -> {after:.4f}; "
          f"{summary['tokens_per_s']} tokens/s; adapter in {out / 'adapter'}")
    return summary
