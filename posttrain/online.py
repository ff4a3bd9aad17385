"""Online RL (`rl.mode: online`): sample from the current policy, score, take PPO steps on
those samples, repeat.

Each round draws `rl.prompts_per_iteration` prompts (with replacement, seeded by the round)
and samples `generate.samples_per_prompt` completions of each from the current policy (one
shared prompt pass per group, from a merged copy when `model.merged_sampling`), recording
the sampling policy's log-probs: the PPO ratio's denominator. The KL term is taken against
the frozen SFT model, which is the same weights with the RL adapter off (one no-grad
forward per micro-batch, no second model). The reward's length statistics (the mean and
std the z-score rewards need) come from the first round, whose samples are the SFT
policy's, and stay fixed. Checkpoints are written at the end of a round
(`rl.checkpoint_every` counts rounds here), so a resumed run samples the same rounds.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from posttrain import modeling
from posttrain.config import Config
from posttrain.generate import cue_prompts, draw_targets, sample_records, train_prompt_pool
from posttrain.rl import Trainer, abrupt_flags, step_plan, step_rewards


def steps_per_round(cfg: Config, world: int = 1) -> int:
    groups_per_micro = max(1, cfg.rl.batch_size // cfg.generate.samples_per_prompt)
    micro = math.ceil(cfg.rl.prompts_per_iteration / groups_per_micro)
    return math.ceil(micro / (cfg.rl.grad_accum * world)) * cfg.rl.ppo_epochs


def sample_round(model, tokenizer, texts, prompts, cfg: Config, it: int, device, dtype,
                 rank: int = 0, world: int = 1) -> list[dict]:
    """The round's samples from the current policy: same prompts and seeds on a re-run.
    With several processes each samples every world-th batch of prompts (its own seed);
    the caller gathers them."""
    g = cfg.generate
    idx = torch.randint(len(prompts), (cfg.rl.prompts_per_iteration,),
                        generator=torch.Generator().manual_seed(cfg.seed * 1000 + it)).tolist()
    gen = torch.Generator(device=device).manual_seed(
        cfg.seed * 100_003 + 50_000 + it + 7_777 * rank)
    was_training = model.training
    model.eval()
    records = []
    targets = draw_targets(len(idx), cfg, cfg.seed * 1000 + 500 + it)
    with modeling.sampler(model, cfg.model, device, dtype) as policy:
        for s in range(rank * g.batch_size, len(idx), world * g.batch_size):
            chunk, want = idx[s:s + g.batch_size], targets[s:s + g.batch_size]
            batch_texts, batch_ids = [texts[i] for i in chunk], [prompts[i] for i in chunk]
            if cfg.data.length_cue:  # each prompt asks for its own length
                batch_texts, batch_ids = cue_prompts(batch_texts, want, tokenizer, cfg)
            batch = sample_records(policy, tokenizer, batch_texts, batch_ids,
                                   g.samples_per_prompt, g.max_new_tokens, gen,
                                   g.temperature, g.top_p, want)
            for r in batch:
                r["group"] += s
            records += batch
    model.train(was_training)
    return records


def run_online(cfg: Config, acc, dtype, tokenizer) -> dict:
    texts, prompts = train_prompt_pool(tokenizer, cfg)
    total = cfg.rl.iterations * steps_per_round(cfg, acc.num_processes)
    if cfg.rl.max_steps > 0:
        total = min(total, cfg.rl.max_steps)
    trainer = Trainer(cfg, total, tokenizer, acc, dtype)
    extra = trainer.extra
    it = extra.get("iteration", 0)
    while it < cfg.rl.iterations and trainer.step < total:
        # 1. sample the round from the current policy
        t0 = time.perf_counter()
        records = sample_round(acc.unwrap_model(trainer.model), tokenizer, texts, prompts, cfg,
                               it, acc.device, dtype, acc.process_index, acc.num_processes)
        if acc.num_processes > 1:  # every process trains on the whole round
            from accelerate.utils import gather_object
            records = sorted(gather_object(records), key=lambda r: r["group"])
        seconds = time.perf_counter() - t0
        # 2. score: length statistics fixed by the first round (the SFT policy's samples)
        lengths = [r["length_" + cfg.reward.unit] for r in records]
        extra.setdefault("reward_lengths", lengths)
        extra["sampled_tokens"] = extra.get("sampled_tokens", 0) + sum(
            len(r["completion_ids"]) for r in records)
        reward_all, stop_reward = step_rewards(records, extra["reward_lengths"], tokenizer, cfg)
        chars = [r["length_chars"] for r in records]
        round_stats = dict(round=it + 1, round_len_mean=statistics.fmean(chars),
                           round_len_std=statistics.pstdev(chars), sample_seconds=seconds,
                           sampled_tokens=extra["sampled_tokens"],
                           round_eos_rate=sum(r["ended_with_eos"] for r in records) / len(records),
                           round_abrupt=statistics.fmean(abrupt_flags(records)))
        # 3. PPO epochs over the round's samples
        plan = step_plan(records, cfg, epochs=cfg.rl.ppo_epochs, seed=cfg.seed + 7919 * (it + 1),
                         world=acc.num_processes)
        for k, micro in enumerate(plan):
            if trainer.step >= total:
                break
            trainer.step_on(records, micro, reward_all, stop_reward, online=True,
                            **(round_stats if k == 0 else {}))
        it += 1
        extra["iteration"] = it
        every = cfg.rl.checkpoint_every
        if every and it % every == 0 and it < cfg.rl.iterations and trainer.step < total:
            trainer.save_checkpoint()
    return trainer.finish(rounds=it, sampled_tokens=extra.get("sampled_tokens", 0))
