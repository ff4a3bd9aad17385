"""Fixed held-out prompts for watching the length spread during RL training."""
from __future__ import annotations

import torch

from posttrain import seeds
from posttrain.config import Config
from posttrain.evaluate.stats import length_summary
from posttrain.model.adapters import sampler
from posttrain.rollout import collect as C
from posttrain.rollout.prompts import prompt_pool


class HeldOut:
    """The first rl.eval_prompts prompts of data.eval, sampled with the same draws each time
    (rl.eval_samples_per_prompt each)."""

    def __init__(self, cfg: Config, tokenizer):
        texts, ids = prompt_pool(cfg.data.eval, cfg.data.eval_split, tokenizer, cfg)
        self.texts, self.ids = texts[:cfg.rl.eval_prompts], ids[:cfg.rl.eval_prompts]
        self.cfg, self.tokenizer = cfg, tokenizer

    @torch.no_grad()
    def lengths(self, model, device, dtype) -> dict:
        """Mean and std of the samples' length in chars, and their EOS rate."""
        cfg, g = self.cfg, self.cfg.generate
        was_training = model.training
        model.eval()
        gen = seeds.generator(seeds.held_out(cfg.seed), device)   # one stream for all batches
        jobs = C.make_jobs(self.texts, self.ids, g.batch_size, self.tokenizer, cfg)
        with sampler(model, cfg.model, device, dtype) as policy:
            rollouts = C.collect(jobs, C.hf_draw(policy, self.tokenizer,
                                                 cfg.rl.eval_samples_per_prompt,
                                                 g.max_new_tokens, g.temperature, g.top_p),
                                 lambda job: gen)
        model.train(was_training)
        chars = length_summary([r.length_chars for r in rollouts])
        return {"eval_len_mean": chars["mean"], "eval_len_std": chars["std"],
                "eval_eos_rate": sum(r.ended_with_eos for r in rollouts) / len(rollouts)}
