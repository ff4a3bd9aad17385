"""Offline RL (the reference recipe): PPO-style passes over the generated set, whose samples
(and recorded log-probs) are the SFT policy's."""
from __future__ import annotations

from posttrain.config import Config
from posttrain.rl.credit import step_rewards
from posttrain.rl.plan import step_plan
from posttrain.rl.trainer import Trainer
from posttrain.rollout.store import load_set


def run_offline(cfg: Config, acc, dtype, tokenizer) -> dict:
    rollouts, _ = load_set(cfg.run_dir, tokenizer)
    set_lengths = [r.length(cfg.reward.unit) for r in rollouts]
    reward, credit = step_rewards(rollouts, set_lengths, tokenizer, cfg)     # (S,)
    plan = step_plan(rollouts, cfg, world=acc.num_processes)
    if cfg.rl.max_steps > 0:
        plan = plan[:cfg.rl.max_steps]
    trainer = Trainer(cfg, len(plan), tokenizer, acc, dtype)
    while trainer.step < len(plan):
        trainer.step_on(rollouts, plan[trainer.step], reward, credit)
        if trainer.checkpoint_due():
            trainer.save_checkpoint()
    return trainer.finish(samples=len(rollouts))
