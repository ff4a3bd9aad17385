"""One RL optimizer step's passes: the step's advantages, then per micro-batch the policy's
and the reference's log-probs, the clipped objective (with the stop credit when asked),
the KL term, backward; the figures summed over the processes.

The sampling policy's log-probs (Rollout.logprobs) are pi_old. Offline that policy is the
SFT model, so they are also the KL reference (fast.recorded_reference); online, or with
that switch off, the reference is the same weights with the RL adapter off (one no-grad
forward), or `reference`, a separate model, when given (the benchmark's naive baseline).
"""
from __future__ import annotations

import contextlib
import statistics
from typing import NamedTuple, Optional

import torch

from posttrain import objectives as O
from posttrain.config import Config
from posttrain.model.adapters import sft_only
from posttrain.model.choices import DeviceChoices
from posttrain.model.forward import policy_logprobs
from posttrain.rl.credit import abrupt_flags, step_advantages
from posttrain.rl.plan import lengths_of
from posttrain.train import dist
from posttrain.train.loop import TrainingError
from posttrain.types import LossTerms, Rollout, Step, StopCredit


class StepInputs(NamedTuple):
    """One step's per-token tensors over its samples in plan order (N tokens in all)."""
    samples: list        # (S,) sample indices
    lengths: torch.Tensor   # (S,) completion tokens
    adv: torch.Tensor       # (N,) advantages
    weight: torch.Tensor    # (N,) loss weights
    starts: list         # each micro-batch's first token row


def step_inputs(rollouts: list[Rollout], step: Step, reward: torch.Tensor,
                cfg: Config) -> StepInputs:
    """1. the step's samples, their advantages and weights, and where each micro-batch's
    tokens start."""
    flat = step.samples
    lengths = lengths_of(rollouts, flat)
    group = torch.tensor([k for k, g in enumerate(step.groups) for _ in g])
    adv, weight = step_advantages(reward[flat], lengths, group, cfg)
    sizes = [int(lengths_of(rollouts, mb.samples).sum()) for mb in step.micro]
    return StepInputs(flat, lengths, adv, weight,
                      [sum(sizes[:j]) for j in range(len(step.micro))])


class StepContext(NamedTuple):
    """What a step's passes run with: the prepared model and accelerator, the config, the
    tokenizer's pad and stop ids, beta, the round's reference cache (online: a dict, filled
    by the first PPO epoch; offline: None) and an optional separate reference model."""
    model: object
    acc: object
    cfg: Config
    pad_id: int
    eos: int
    beta: float
    ref_cache: Optional[dict] = None
    reference: object = None

    @property
    def share_prompt(self) -> bool:
        """rl.share_prompt, `auto` resolved for the device."""
        return DeviceChoices(self.cfg, self.acc.device).share_prompt


def reference_logprobs(ctx: StepContext, rollouts, groups, ids, old) -> torch.Tensor:
    """The KL reference's log-probs (N,): the recorded ones (offline), a later PPO epoch's
    cached ones (online), or one no-grad forward with the RL adapter off."""
    acc, cfg, online = ctx.acc, ctx.cfg, ctx.ref_cache is not None
    forward_ref = online or ctx.reference is not None or not cfg.fast.recorded_reference
    if online and all(i in ctx.ref_cache for i in ids):   # a later PPO epoch of the round
        return torch.cat([ctx.ref_cache[i] for i in ids]).to(acc.device)
    if not forward_ref:
        return old
    with (torch.no_grad(), acc.autocast(),
          contextlib.nullcontext(ctx.reference) if ctx.reference is not None
          else sft_only(acc.unwrap_model(ctx.model)) as ref_model):
        ref = policy_logprobs(ref_model, rollouts, groups, ctx.pad_id, acc.device,
                              ctx.share_prompt).tokens.float()
    if online:  # kept for the round's later PPO epochs
        for i, part in zip(ids, ref.split(lengths_of(rollouts, ids).tolist())):
            ctx.ref_cache[i] = part
    return ref


def _on(device, values) -> torch.Tensor:
    return torch.tensor(values, device=device)


def loss_terms(ctx: StepContext, new, old, adv, weight, rollouts, ids, reward,
               credit: Optional[StopCredit], scale: float, n_samples: int,
               n_tokens: int) -> LossTerms:
    """3. the policy objective of one micro-batch: clipped, averaged per token or sample;
    or with the counterfactual stop credit, summed per sample. `scale` is this process's
    weight times the process count (the processes' gradients are averaged)."""
    cfg, device = ctx.cfg, ctx.acc.device
    if credit is None:       # 3a. clipped policy loss
        pl, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, cfg.rl.clip_eps)
        return LossTerms(pl * weight, pl, ratio, clipped, weight)
    # 3b. with the stop credit: stopping at each position was worth r_stop, going on r_final
    old_stop = (_on(device, [x for i in ids for x in rollouts[i].stop_logprobs])
                if rollouts[ids[0]].stop_logprobs else None)
    r_stop = torch.cat([credit.reward[i] for i in ids]).to(device)
    r_final = reward[ids].repeat_interleave(lengths_of(rollouts, ids)).to(device)
    may_stop = torch.cat([(torch.tensor(rollouts[i].completion_ids) != ctx.eos)
                          & credit.counted[i] for i in ids]).to(device)
    if cfg.rl.advantage == "group_stop":  # group term on every token + the credit
        per_sample = torch.full_like(weight, scale / n_samples)
        objective, pl, ratio, clipped = O.group_stop_loss(
            new.tokens, old, adv, weight, new.stop, old_stop, r_stop, r_final, may_stop,
            per_sample, cfg.rl.stop_weight, cfg.rl.clip_eps)
        return LossTerms(objective, pl, ratio, clipped, weight)
    # the stop credit alone
    pl = O.stop_credit_loss(new.stop, r_stop, r_final, may_stop, old_stop, cfg.rl.clip_eps)
    _, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, cfg.rl.clip_eps)
    per = n_samples if cfg.rl.loss_agg == "summary" else n_tokens   # the KL's unit
    return LossTerms(pl * weight, pl, ratio, clipped, torch.full_like(weight, scale / per))


def micro_pass(ctx: StepContext, rollouts, mb, offset: int, share: float, inputs: StepInputs,
               reward, credit, last: bool) -> tuple:
    """Forward and backward of one micro-batch; returns (loss, terms, new, ref, kl)."""
    acc, cfg = ctx.acc, ctx.cfg
    n_tokens = int(inputs.lengths.sum())
    # one all-reduce per step: on the last backward only
    with dist.sync_unless(acc, ctx.model, last):
        ids = mb.samples
        old = _on(acc.device, [lp for i in ids for lp in rollouts[i].logprobs])
        rows = slice(offset, offset + len(old))
        scale = share * acc.num_processes
        adv = inputs.adv[rows].to(acc.device)
        weight = inputs.weight[rows].to(acc.device) * scale
        # 2. log-probs of the sampled tokens under the current policy (and the reference)
        with acc.autocast():
            new = policy_logprobs(ctx.model, rollouts, mb.groups, ctx.pad_id, acc.device,
                                  ctx.share_prompt, ctx.eos if credit is not None else None,
                                  prompt_grad=cfg.rl.prompt_grad)
        ref = reference_logprobs(ctx, rollouts, mb.groups, ids, old)
        terms = loss_terms(ctx, new, old, adv, weight, rollouts, ids, reward, credit, scale,
                           len(inputs.lengths), n_tokens)
        # 4. + beta * k3 KL to the SFT policy
        kl = O.kl_k3(new.tokens, ref)
        loss = terms.objective.sum() + ctx.beta * (kl * terms.kl_weight).sum()
        if not dist.all_finite(acc, loss):
            raise TrainingError("rl: non-finite loss")
        acc.backward(loss)
    return loss, terms, new.tokens, ref, kl


def _reduce(acc, sums: dict, total_loss: float, ratio_max: float) -> tuple:
    """The step's figures over all processes."""
    if acc.num_processes == 1:
        return sums, total_loss, ratio_max
    keys = sorted(sums)
    total = acc.reduce(torch.tensor([sums[k] for k in keys] + [total_loss],
                                    device=acc.device), "sum").tolist()
    ratio_max = acc.reduce(torch.tensor(ratio_max, device=acc.device), "max").item()
    return dict(zip(keys, total[:-1])), total[-1], ratio_max


def step_passes(ctx: StepContext, rollouts: list[Rollout], step: Step, reward: torch.Tensor,
                credit: Optional[StopCredit]) -> dict:
    """1-4 of one optimizer step over this process's share of its micro-batches; returns
    the step's figures (summed over the processes). The caller clips and steps."""
    acc = ctx.acc
    DeviceChoices(ctx.cfg, acc.device).check()
    # 1. batch: this step's samples and their advantages
    inputs = step_inputs(rollouts, step, reward, ctx.cfg)
    n_tokens = int(inputs.lengths.sum())
    sums = dict(policy_loss=0.0, kl=0.0, kl_k1=0.0, clipped=0.0, ratio=0.0)
    total_loss, ratio_max = 0.0, 0.0  # the objective as optimized (weighting depends on mode)
    # each process takes its share of the micro-batches (weight 0: a padding repeat)
    mine = dist.rank_share(list(range(len(step.micro))), acc.process_index, acc.num_processes)
    for k, (j, share) in enumerate(mine):
        loss, terms, new, ref, kl = micro_pass(ctx, rollouts, step.micro[j], inputs.starts[j],
                                               share, inputs, reward, credit,
                                               k == len(mine) - 1)
        if share == 0:
            continue
        total_loss += loss.item() / acc.num_processes
        for name, v in (("policy_loss", terms.policy_loss), ("kl", kl),
                        ("kl_k1", O.kl_k1(new, ref)), ("clipped", terms.clipped.float()),
                        ("ratio", terms.ratio)):
            sums[name] += v.detach().sum().item()
        ratio_max = max(ratio_max, terms.ratio.detach().max().item())
    sums, total_loss, ratio_max = _reduce(acc, sums, total_loss, ratio_max)
    m = {k: v / n_tokens for k, v in sums.items()}
    row = {}
    if ctx.cfg.reward.ending is not None:  # the share of the step's samples the rule hit
        row["penalised"] = statistics.fmean(abrupt_flags([rollouts[i] for i in inputs.samples]))
    row.update(loss=total_loss, policy_loss=m["policy_loss"], kl=m["kl"], kl_k1=m["kl_k1"],
               kl_summary=sums["kl"] / len(inputs.samples),
               beta=ctx.beta, clip_frac=m["clipped"], ratio_mean=m["ratio"],
               ratio_max=ratio_max, adv_mean=inputs.adv.mean().item(),
               adv_std=inputs.adv.std().item(), reward_mean=reward[inputs.samples].mean().item())
    return row


def step_tokens(rollouts: list[Rollout], step: Step, share_prompt: bool) -> int:
    """Tokens the step's forward passes process: completions, plus each prompt once for its
    group (share_prompt) or once per sample."""
    completions = int(lengths_of(rollouts, step.samples).sum())
    return completions + sum(len(rollouts[g[0]].prompt_ids) * (1 if share_prompt else len(g))
                             for g in step.groups)
