"""Sampling every compared policy on the same held-out prompts with the same seeds, and
the RL policy's KL to SFT on its own samples."""
from __future__ import annotations

import contextlib
import shutil

import torch
from tqdm.auto import tqdm

from posttrain import objectives as O
from posttrain import provenance, seeds
from posttrain.io import finished
from posttrain.config import Config, ConfigError
from posttrain.data import DataError, round_length
from posttrain.evaluate.report import finish
from posttrain.model.adapters import load_policy, sampler, sft_only
from posttrain.model.forward import policy_logprobs
from posttrain.model.load import autocast, load_base_model, sampling_setup
from posttrain.rollout import collect as C
from posttrain.rollout.prompts import heldout_rows


def _policy_context(model, name: str, has_rl: bool):
    """The context under which `model` is the named policy."""
    if name == "base":  # eval.models=[base] alone loads the bare model: no adapter to disable
        return model.disable_adapter() if hasattr(model, "disable_adapter") else \
            contextlib.nullcontext()
    if name == "sft" and has_rl:
        return sft_only(model)
    return contextlib.nullcontext()


@torch.no_grad()
def kl_to_sft(model, rollouts: list, pad_id: int, device, dtype, batch_prompts: int) -> dict:
    """KL(rl || sft) on the RL policy's own samples, per token and per summary (a sample's
    tokens summed: the unit of the best-of-N budget), by the k3 and k1 estimates; both
    log-probs from the same forward path (RL adapter on, then off), so a numeric floor
    cancels. Returns the means and, per summary, each sample's figure (for its interval)."""
    groups: dict = {}
    for i, r in enumerate(rollouts):  # a prompt asked for different lengths is another prompt
        groups.setdefault((r.group, r.target), []).append(i)
    groups = list(groups.values())
    k3, k1 = [], []                   # per summary
    for s in range(0, len(groups), batch_prompts):
        chunk = groups[s:s + batch_prompts]
        with autocast(device, dtype):
            new = policy_logprobs(model, rollouts, chunk, pad_id, device,
                                  share_prompt=True).tokens.float()
            with sft_only(model):
                ref = policy_logprobs(model, rollouts, chunk, pad_id, device,
                                      share_prompt=True).tokens.float()
        sizes = [len(rollouts[i].completion_ids) for g in chunk for i in g]
        k3 += [x.sum().item() for x in O.kl_k3(new, ref).split(sizes)]
        k1 += [x.sum().item() for x in O.kl_k1(new, ref).split(sizes)]
    tokens = sum(len(r.completion_ids) for r in rollouts)
    return {"kl_k3": sum(k3) / max(tokens, 1), "kl_k1": sum(k1) / max(tokens, 1),
            "kl_k3_summary": sum(k3) / max(len(k3), 1),
            "kl_k1_summary": sum(k1) / max(len(k1), 1), "per_summary_k3": k3}


def eval_targets(cfg: Config) -> list:
    """The lengths to ask for: [None] for plain prompts; eval.targets (or the middle of
    rl.target_range) for length-conditioned ones."""
    if not cfg.data.length_cue:
        return [None]
    wanted = cfg.eval.targets or [sum(cfg.rl.target_range) / 2]
    return [round_length(t, cfg.data) for t in wanted]


def _load_models(cfg: Config, device):
    sft_dir, rl_dir = cfg.run_dir / "sft" / "adapter", cfg.run_dir / "rl" / "adapter"
    wanted = set(cfg.eval.models)
    if "rl" in wanted and not (rl_dir / "adapter_config.json").is_file():
        raise ConfigError(f"eval.models includes 'rl' but {rl_dir} has no adapter; run "
                          "`posttrain rl` first or set eval.models=[base,sft]")
    if wanted == {"base"}:
        return load_base_model(cfg.model, device), False
    return (load_policy(cfg, device, sft_dir, rl=rl_dir if "rl" in wanted else None,
                        with_base="base" in wanted), "rl" in wanted)


def held_out_prompts(cfg: Config, tokenizer) -> tuple[list[dict], list]:
    """The held-out rows judged: eval.num_prompts of them after eval.skip_prompts."""
    e = cfg.eval
    rows, ids = heldout_rows(e.prompts or cfg.data.eval, e.prompts_split or cfg.data.eval_split,
                             tokenizer, cfg)
    end = None if e.num_prompts is None else e.skip_prompts + e.num_prompts
    rows, ids = rows[e.skip_prompts:end], ids[e.skip_prompts:end]
    if not rows:
        raise DataError(f"eval: no held-out prompt left after eval.skip_prompts="
                        f"{e.skip_prompts} (the source has fewer rows that fit)")
    return rows, ids


def sample_model(cfg: Config, policy, tokenizer, name: str, texts, ids, device, bar) -> list:
    """One model's samples, at every requested length; batch b of every model shares a
    seed. Finished batches are kept in eval/parts/."""
    e, bs = cfg.eval, cfg.eval.batch_size or cfg.generate.batch_size
    draw = C.hf_draw(policy, tokenizer, e.samples_per_prompt,
                     e.max_new_tokens or cfg.generate.max_new_tokens, e.temperature, e.top_p)
    out = []
    for target in eval_targets(cfg):
        jobs = C.make_jobs(texts, ids, bs, tokenizer, cfg, lambda b, s, n: [target] * n)
        parts = C.Parts(cfg.run_dir / "eval" / "parts",
                        lambda job: f"{name}-{target or 'plain'}-{job.index:05d}.jsonl",
                        lambda: provenance.record_config(cfg, "eval"))
        out += C.collect(jobs, draw, lambda job: seeds.generator(
            seeds.eval_batch(cfg.seed, job.index), device), parts,
            lambda job, batch, fresh: bar.update(1))
    return out


def run(cfg: Config) -> dict:
    """Sample, score and compare; returns the report (also written to eval/report.json)."""
    out, e = cfg.run_dir / "eval", cfg.eval
    done = finished("eval", out, "report.json", None, "evaluates again", "report")
    if done is not None:
        return done
    device, dtype, tokenizer = sampling_setup(cfg)
    rows, ids = held_out_prompts(cfg, tokenizer)
    texts = [r["prompt"] for r in rows]
    model, has_rl = _load_models(cfg, device)
    model.eval()
    # 1. sample every model on the same prompts (and at every requested length)
    batches = len(range(0, len(ids), e.batch_size or cfg.generate.batch_size))
    bar = tqdm(total=batches * len(e.models) * len(eval_targets(cfg)), desc="eval",
               unit="batch")
    kl, recs = {}, []
    for name in e.models:
        with _policy_context(model, name, has_rl), \
                sampler(model, cfg.model, device, dtype) as policy:
            rollouts = sample_model(cfg, policy, tokenizer, name, texts, ids, device, bar)
        # 2. the RL policy's KL to SFT on its own samples
        if name == "rl":
            scored = [r for r in rollouts if e.kl_prompts is None or r.group < e.kl_prompts]
            kl = kl_to_sft(model, scored, tokenizer.pad_token_id, device, dtype,
                           e.batch_size or cfg.generate.batch_size)
            kl["kl_samples"] = len(scored)
        recs += [(name, r) for r in rollouts]
    bar.close()
    report = finish(cfg, rows, recs, kl)
    shutil.rmtree(out / "parts", ignore_errors=True)
    return report
