"""The generation stage: sample completions from the SFT policy and store them for RL.

Reads `<out_dir>/sft/adapter`; writes `<out_dir>/generate/`:
  dataset/      a `datasets` folder, one row per sample (a Rollout, posttrain.types): group
                (the prompt draw it came from; its samples_per_prompt samples share it),
                prompt, prompt_ids, completion, completion_ids (EOS included when sampled),
                logprobs (the SFT policy's, per completion token), stop_logprobs (its
                log-prob of EOS at each of those positions), ended_with_eos, truncated,
                length_chars, length_tokens, target, score (z-score of -length_chars over
                the whole set)
  stats.json    length mean / variance / std (chars and tokens), EOS rate, the tokenizer's
                fingerprint
Each finished batch is written to `parts/` first, so a killed run resumes at its batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time

import torch
from tqdm.auto import tqdm

from posttrain import provenance, seeds
from posttrain.io import finished
from posttrain.config import Config
from posttrain.model.adapters import load_policy, sampler
from posttrain.model.load import autocast, resolve_model_path, sampling_setup
from posttrain.model.choices import DeviceChoices
from posttrain.rollout import collect as C
from posttrain.rollout import vllm as vllm_backend
from posttrain.rollout.prompts import draw_targets, train_prompt_pool
from posttrain.rollout.store import length_stats, save_set, tokenizer_fingerprint
from posttrain.types import Rollout


def _draws(cfg: Config, prompts: list, device) -> list[int]:
    """The prompts drawn, with replacement (seeded); each gives samples_per_prompt samples."""
    g = cfg.generate
    draws = torch.randint(len(prompts), (g.num_samples // g.samples_per_prompt,),
                          generator=seeds.generator(seeds.generate_draws(cfg.seed))).tolist()
    if DeviceChoices(cfg, device).group_by_length:  # stable: equal lengths keep their order
        draws = sorted(draws, key=lambda i: len(prompts[i]))
    return draws


def _vllm_engine(cfg: Config):
    return vllm_backend.VLLMSampler(
        resolve_model_path(cfg.model), cfg.run_dir / "sft" / "adapter", cfg.lora.rank,
        cfg.seed, cfg.data.max_prompt_tokens + cfg.generate.max_new_tokens + 8,
        cfg.model.load_in_4bit)


def _vllm_draw(cfg: Config, device, dtype, policy, tokenizer, vllm):
    """vLLM samples; our unmerged SFT policy scores its samples (the exact training forward)."""
    def draw(job: C.Job, generator) -> list[Rollout]:
        with autocast(device, dtype):
            return vllm.rollouts(policy, tokenizer, job.texts, job.ids, cfg,
                                 seeds.generate_batch(cfg.seed, job.index), job.targets)
    return draw


def _sample(cfg: Config, tokenizer, texts: list, prompts: list, device, dtype) -> tuple:
    """Every batch of drawn prompts sampled (or read back from parts/); (rollouts, draws,
    new tokens sampled by this call, seconds)."""
    g, out = cfg.generate, cfg.run_dir / "generate"
    model = load_policy(cfg, device, cfg.run_dir / "sft" / "adapter").eval()
    draws = _draws(cfg, prompts, device)
    jobs = C.make_jobs([texts[i] for i in draws], [prompts[i] for i in draws], g.batch_size,
                       tokenizer, cfg, lambda b, s, n: draw_targets(
                           n, cfg, seeds.generate_targets(cfg.seed, b)))
    parts = C.Parts(out / "parts", lambda job: f"{job.index:06d}.jsonl",
                    lambda: provenance.record_config(cfg, "generate"))
    on_vllm = g.backend == "vllm"
    vllm = _vllm_engine(cfg) if on_vllm else None   # started before the clock
    t0, new_tokens = time.perf_counter(), [0]
    bar = tqdm(total=len(jobs), desc="generate", unit="batch")

    def progress(job, batch, fresh):
        if fresh:
            new_tokens[0] += sum(len(r.completion_ids) for r in batch)
            bar.set_postfix(tok_s=f"{new_tokens[0] / (time.perf_counter() - t0):.1f}")
        bar.update(1)

    with (contextlib.nullcontext(model) if on_vllm
          else sampler(model, cfg.model, device, dtype)) as policy:
        draw = (_vllm_draw(cfg, device, dtype, policy, tokenizer, vllm) if on_vllm else
                C.hf_draw(policy, tokenizer, g.samples_per_prompt, g.max_new_tokens,
                          g.temperature, g.top_p))
        rollouts = C.collect(jobs, draw, lambda job: seeds.generator(
            seeds.generate_batch(cfg.seed, job.index), device), parts, progress)
    bar.close()
    return rollouts, draws, new_tokens[0], time.perf_counter() - t0


def run(cfg: Config) -> dict:
    """Generate the RL set; returns its stats (also written to generate/stats.json)."""
    out, g = cfg.run_dir / "generate", cfg.generate
    done = finished("generate", out, "stats.json", "dataset", "generates again", "set")
    if done is not None:
        return done
    device, dtype, tokenizer = sampling_setup(cfg)
    texts, prompts = train_prompt_pool(tokenizer, cfg)
    if g.backend == "vllm":  # fail before loading anything
        vllm_backend.check_available(device)
    rollouts, draws, new_tokens, seconds = _sample(cfg, tokenizer, texts, prompts, device,
                                                   dtype)
    # score = z-score of -length over the whole set, then save
    stats = length_stats(rollouts)
    mean, std = stats["length_chars"]["mean"], stats["length_chars"]["std"]
    rollouts = [dataclasses.replace(r, score=(mean - r.length_chars) / std if std > 0 else 0.0)
                for r in rollouts]
    stats.update(tokenizer=tokenizer_fingerprint(tokenizer), model=cfg.model.name,
                 temperature=g.temperature, top_p=g.top_p,
                 samples_per_prompt=g.samples_per_prompt, distinct_prompts=len(set(draws)),
                 seconds=round(seconds, 1), new_tokens_per_s=round(new_tokens / max(seconds,
                                                                                     1e-9), 1))
    provenance.record_config(cfg, "generate")
    save_set(rollouts, stats, out, g.push_to_hub)
    shutil.rmtree(out / "parts", ignore_errors=True)
    lc = stats["length_chars"]
    print(f"generate: {len(rollouts)} samples, length {lc['mean']:.1f} ± {lc['std']:.1f} chars "
          f"(variance {lc['var']:.0f}), EOS rate {stats['eos_rate']:.2f}; {out / 'dataset'}")
    return stats
