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

import statistics
import time

import torch

from posttrain import seeds
from posttrain.config import Config
from posttrain.lengths import spread
from posttrain.model.adapters import sampler
from posttrain.rl.credit import abrupt_flags, step_rewards
from posttrain.rl.plan import step_plan, steps_per_round
from posttrain.rl.trainer import Trainer
from posttrain.rollout import collect as C
from posttrain.rollout.prompts import draw_targets, train_prompt_pool
from posttrain.train import dist


def round_draws(cfg: Config, n_prompts: int, it: int) -> list[int]:
    """The pool indices round `it` samples from (seeded, with replacement)."""
    return torch.randint(n_prompts, (cfg.rl.prompts_per_iteration,),
                         generator=seeds.generator(seeds.round_prompts(cfg.seed, it))).tolist()


def sample_round(model, tokenizer, texts, prompts, cfg: Config, it: int, device, dtype,
                 rank: int = 0, world: int = 1) -> list:
    """The round's samples from the current policy: same prompts and seeds on a re-run.
    With several processes each samples every world-th batch of prompts (its own seed);
    the caller gathers them."""
    g = cfg.generate
    idx = round_draws(cfg, len(prompts), it)
    gen = seeds.generator(seeds.round_sampling(cfg.seed, it, rank), device)
    was_training = model.training
    model.eval()
    targets = draw_targets(len(idx), cfg, seeds.round_targets(cfg.seed, it))
    jobs = C.make_jobs([texts[i] for i in idx], [prompts[i] for i in idx], g.batch_size,
                       tokenizer, cfg, lambda b, s, n: targets[s:s + n], rank, world)
    with sampler(model, cfg.model, device, dtype) as policy:
        rollouts = C.collect(jobs, C.hf_draw(policy, tokenizer, g.samples_per_prompt,
                                             g.max_new_tokens, g.temperature, g.top_p),
                             lambda job: gen)
    model.train(was_training)
    return rollouts


def _round_stats(rollouts: list, it: int, seconds: float, sampled_tokens: int) -> dict:
    chars = spread([r.length_chars for r in rollouts])
    return dict(round=it + 1, round_len_mean=chars["mean"],
                round_len_std=chars["std"], sample_seconds=seconds,
                sampled_tokens=sampled_tokens,
                round_eos_rate=sum(r.ended_with_eos for r in rollouts) / len(rollouts),
                round_abrupt=statistics.fmean(abrupt_flags(rollouts)))


def _round(trainer: Trainer, cfg: Config, tokenizer, texts, prompts, it: int, total: int):
    acc, extra = trainer.acc, trainer.extra
    # 1. sample the round from the current policy
    t0 = time.perf_counter()
    rollouts = sample_round(acc.unwrap_model(trainer.model), tokenizer, texts, prompts, cfg,
                            it, acc.device, trainer.dtype, acc.process_index, acc.num_processes)
    if acc.num_processes > 1:  # every process trains on the whole round
        rollouts = sorted(dist.gather(acc, rollouts), key=lambda r: r.group)
    seconds = time.perf_counter() - t0
    # 2. score: length statistics fixed by the first round (the SFT policy's samples)
    extra.setdefault("reward_lengths", [r.length(cfg.reward.unit) for r in rollouts])
    extra["sampled_tokens"] = extra.get("sampled_tokens", 0) + sum(
        len(r.completion_ids) for r in rollouts)
    reward, credit = step_rewards(rollouts, extra["reward_lengths"], tokenizer, cfg)
    stats = _round_stats(rollouts, it, seconds, extra["sampled_tokens"])
    # 3. PPO epochs over the round's samples; the reference log-probs kept after the first
    plan = step_plan(rollouts, cfg, epochs=cfg.rl.ppo_epochs,
                     seed=seeds.round_plan(cfg.seed, it), world=acc.num_processes)
    ref_cache: dict = {}
    for k, step in enumerate(plan):
        if trainer.step >= total:
            break
        trainer.step_on(rollouts, step, reward, credit, ref_cache, **(stats if k == 0 else {}))


def run_online(cfg: Config, acc, dtype, tokenizer) -> dict:
    texts, prompts = train_prompt_pool(tokenizer, cfg)
    total = cfg.rl.iterations * steps_per_round(cfg, acc.num_processes)
    if cfg.rl.max_steps > 0:
        total = min(total, cfg.rl.max_steps)
    trainer = Trainer(cfg, total, tokenizer, acc, dtype)
    it = trainer.extra.get("iteration", 0)
    while it < cfg.rl.iterations and trainer.step < total:
        _round(trainer, cfg, tokenizer, texts, prompts, it, total)
        it += 1
        trainer.extra["iteration"] = it
        if trainer.loop.checkpoint_due(it, cfg.rl.checkpoint_every) and it < cfg.rl.iterations:
            trainer.save_checkpoint()
    return trainer.finish(rounds=it, sampled_tokens=trainer.extra.get("sampled_tokens", 0))
