"""The SFT stage: next-token loss on completion tokens only, LoRA, resumable.

Reads the data and model named in the config; writes into `<out_dir>/sft/`:
  adapter/        the LoRA adapter and tokenizer (peft format)
  checkpoints/    resumable checkpoints (removed when the stage finishes)
  summary.json    held-out loss before/after, steps, tokens/s, wall time
and appends its metrics to `<out_dir>/metrics.jsonl`.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from posttrain import seeds
from posttrain.io import finished
from posttrain.config import Config
from posttrain.data import collate, cue_rows, length_grouped_batches, load_rows, tokenize_rows
from posttrain.model.adapters import add_lora
from posttrain.model.forward import completion_logits
from posttrain.model.load import check_context, load_base_model, load_tokenizer
from posttrain.train import dist
from posttrain.train.loop import TrainingError, TrainLoop
from posttrain.types import Example


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


def micro_batches(examples: list[Example], cfg: Config) -> list[list[int]]:
    """The whole run's micro-batches (lists of example indices), fixed by the seed so a
    resumed run sees the same order from the same position."""
    lengths = [len(e) for e in examples]
    out = []
    for epoch in range(math.ceil(cfg.sft.epochs)):
        g = seeds.generator(seeds.sft_epoch(cfg.seed, epoch))
        if cfg.sft.batching == "random":
            order = torch.randperm(len(lengths), generator=g).tolist()
            bs = cfg.sft.batch_size
            out += [order[i:i + bs] for i in range(0, len(order), bs)]
        else:
            out += length_grouped_batches(lengths, cfg.sft.batch_size, g)
    per_epoch = math.ceil(len(examples) / cfg.sft.batch_size)
    return out[:max(1, int(round(cfg.sft.epochs * per_epoch)))]


def completion_loss(model, batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the completion tokens (prompt and padding carry no loss)."""
    logits = completion_logits(model, batch)                              # (N, V)
    return F.cross_entropy(logits.float(), batch.targets, reduction=reduction)


@torch.no_grad()
def evaluate_loss(model, examples, tokenizer, batch_size: int, accelerator) -> float:
    """Mean completion-token loss over `examples`, in fixed length order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[s:s + batch_size]],
                        tokenizer.pad_token_id).to(accelerator.device)
        with accelerator.autocast():
            total += completion_loss(model, batch, reduction="sum").item()
        count += len(batch.targets)
    model.train(was_training)
    return total / count


def step_passes(loop: TrainLoop, chunk: list, train: list, tokenizer, cfg: Config) -> tuple:
    """One step's forward and backward passes over this process's share of `chunk` (the
    step's micro-batches); returns (summed loss, tokens seen) over all processes."""
    acc, model = loop.acc, loop.model
    step_targets = sum(len(train[i].completion_ids) for ids in chunk for i in ids)
    loss_sum, tokens = 0.0, 0
    mine = dist.rank_share(chunk, acc.process_index, acc.num_processes)
    for k, (ids, weight) in enumerate(mine):
        batch = collate([train[i] for i in ids], tokenizer.pad_token_id,
                        packed=cfg.sft.batching == "packed").to(acc.device)
        # 2. loss on completion tokens only
        with dist.sync_unless(acc, model, k == len(mine) - 1):
            with acc.autocast():
                loss = completion_loss(model, batch, "sum")
            if not dist.all_finite(acc, loss):
                raise TrainingError("sft: non-finite loss")
            # 3. backward: every completion token of the step weighs the same (the
            # processes' gradients are averaged, hence the factor)
            acc.backward(loss * (weight * acc.num_processes / step_targets))
        loss_sum += weight * loss.item()
        tokens += int(weight) * batch.num_tokens
    if acc.num_processes > 1:  # the step's loss and tokens over all processes
        loss_sum, tokens = acc.reduce(torch.tensor([loss_sum, float(tokens)],
                                                   device=acc.device), "sum").tolist()
        tokens = int(tokens)
    return loss_sum / step_targets, tokens


def _train(loop: TrainLoop, plan: list, train: list, tokenizer, cfg: Config) -> None:
    per_step = cfg.sft.grad_accum * loop.acc.num_processes
    while loop.step < loop.total:
        t0 = time.perf_counter()
        # 1. batch: this step's micro-batches, fixed by the plan
        chunk = plan[loop.step * per_step:(loop.step + 1) * per_step]
        loss, tokens = loop.guarded(
            lambda: step_passes(loop, chunk, train, tokenizer, cfg))   # 2-3. passes
        grad_norm, lr = loop.optimizer_step()                           # 4. clip, step
        # 5. log and checkpoint
        dt = time.perf_counter() - t0
        loop.extra["train_seconds"] += dt
        loop.extra["train_tokens"] += tokens
        loop.log(dict(loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens / dt,
                      tokens=tokens), loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if loop.checkpoint_due(loop.step, cfg.sft.checkpoint_every):
            loop.save_checkpoint()


def _summary(loop: TrainLoop, after: float, train: list, held_out: list, dtype) -> dict:
    extra = loop.extra
    return {
        "eval_loss_before": extra["eval_loss_before"], "eval_loss_after": after,
        "steps": loop.step, "train_examples": len(train), "eval_examples": len(held_out),
        "train_tokens": extra["train_tokens"], "train_seconds": round(extra["train_seconds"], 2),
        "tokens_per_s": round(extra["train_tokens"] / max(extra["train_seconds"], 1e-9), 1),
        "precision": str(dtype).replace("torch.", ""), "device": str(loop.acc.device),
        "processes": loop.acc.num_processes,
    }


def _loop(cfg: Config, acc, train: list) -> tuple[TrainLoop, list]:
    """The frozen base + a fresh LoRA (only LoRA weights train), in the shared loop."""
    base = load_base_model(cfg.model, acc.device)
    check_context(cfg, base)
    model = add_lora(base, cfg.lora, quantized=cfg.model.load_in_4bit)
    plan = micro_batches(train, cfg)
    # one optimizer step = grad_accum micro-batches on each of the processes
    total = math.ceil(len(plan) / (cfg.sft.grad_accum * acc.num_processes))
    if cfg.sft.max_steps > 0:
        total = min(total, cfg.sft.max_steps)
    return TrainLoop(cfg, "sft", cfg.sft, model, total, acc), plan


def run(cfg: Config) -> dict:
    """Train the SFT adapter; returns the summary (also written to sft/summary.json)."""
    done = finished("sft", cfg.run_dir / "sft", "summary.json", "adapter", "trains again",
                    "adapter")
    if done is not None:
        return done
    rows = load_split_rows(cfg)
    torch.manual_seed(cfg.seed)
    acc, dtype = dist.setup_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train, held_out = load_examples(cfg, rows, tokenizer)
    loop, plan = _loop(cfg, acc, train)
    bs = cfg.sft.eval_batch_size
    if "eval_loss_before" not in loop.extra:
        loop.extra["eval_loss_before"] = evaluate_loss(loop.model, held_out, tokenizer, bs, acc)
    if loop.step == 0:
        loop.metrics.log(0, eval_loss=loop.extra["eval_loss_before"])
    loop.extra.setdefault("train_seconds", 0.0)
    loop.extra.setdefault("train_tokens", 0)
    loop.start()
    _train(loop, plan, train, tokenizer, cfg)
    loop.close_bar()
    # held-out loss after, the adapter, the summary
    after = evaluate_loss(loop.model, held_out, tokenizer, bs, acc)
    summary = _summary(loop, after, train, held_out, dtype)
    loop.finish(tokenizer, summary, dict(eval_loss=after))
    print(f"sft: held-out completion loss {summary['eval_loss_before']:.4f} -> {after:.4f}; "
          f"{summary['tokens_per_s']} tokens/s; adapter in {loop.out / 'adapter'}")
    return summary
