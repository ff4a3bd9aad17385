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
from posttrain.model.forward import policy_logits, policy_logprobs
from posttrain.rl.credit import abrupt_flags, step_advantages
from posttrain.rl.plan import lengths_of
from posttrain.train import dist
from posttrain.train.loop import TrainingError
from posttrain.types import LogProbs, LossTerms, Rollout, Step, StopCredit


class StepInputs(NamedTuple):
    """One step's per-token tensors over its samples in plan order (N tokens in all)."""
    samples: list        # (S,) sample indices
    lengths: torch.Tensor   # (S,) completion tokens
    adv: torch.Tensor       # (N,) advantages
    weight: torch.Tensor    # (N,) loss weights (the KL term's)
    policy_w: torch.Tensor  # (N,) the policy term's weights
    starts: list         # each micro-batch's first token row


def step_inputs(rollouts: list[Rollout], step: Step, reward: torch.Tensor,
                credit: Optional[StopCredit], cfg: Config, eos: int) -> StepInputs:
    """1. the step's samples, their advantages and weights, and where each micro-batch's
    tokens start."""
    flat = step.samples
    lengths = lengths_of(rollouts, flat)
    group = torch.tensor([k for k, g in enumerate(step.groups) for _ in g])
    adv, weight = step_advantages(reward[flat], lengths, group, cfg)
    policy_w = weight                         # the policy term's weights (the KL's: weight)
    if cfg.rl.advantage == "best_of_n_stop":  # each sample's chance to be its group's best
        bon = O.group_best_of_n_weights(reward[flat], group, cfg.rl.best_of_n)     # (S,)
        if cfg.reward.ending is not None:     # an abrupt ending is never distilled
            bon = torch.where(reward[flat] == cfg.reward.ending, torch.zeros_like(bon), bon)
        token_seq = torch.repeat_interleave(torch.arange(len(flat)), lengths)      # (N,)
        policy_w = bon[token_seq] / len(step.groups)
    if cfg.rl.credit == "decisions":          # only where the sample could stop cleanly
        policy_w = O.decision_weights(weight, torch.cat(
            [credit.clean[i] | (torch.tensor(rollouts[i].completion_ids) == eos)
             for i in flat]))
    sizes = [int(lengths_of(rollouts, mb.samples).sum()) for mb in step.micro]
    return StepInputs(flat, lengths, adv, weight, policy_w,
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


def reference_logprobs(ctx: StepContext, rollouts, groups, ids, old,
                       stop_id: Optional[int] = None) -> LogProbs:
    """The KL reference's log-probs (N,) (and with `stop_id` its stop log-probs (N,)): the
    recorded ones (offline), a later PPO epoch's cached ones (online), or one no-grad
    forward with the RL adapter off."""
    acc, cfg, online = ctx.acc, ctx.cfg, ctx.ref_cache is not None
    forward_ref = online or ctx.reference is not None or not cfg.fast.recorded_reference
    if online and all(i in ctx.ref_cache for i in ids):   # a later PPO epoch of the round
        parts = [ctx.ref_cache[i] for i in ids]
        return LogProbs(torch.cat([p.tokens for p in parts]).to(acc.device),
                        None if stop_id is None else
                        torch.cat([p.stop for p in parts]).to(acc.device))
    if not forward_ref:
        return LogProbs(old, None if stop_id is None else
                        _on(acc.device, [x for i in ids for x in rollouts[i].stop_logprobs]))
    with (torch.no_grad(), acc.autocast(),
          contextlib.nullcontext(ctx.reference) if ctx.reference is not None
          else sft_only(acc.unwrap_model(ctx.model)) as ref_model):
        ref = policy_logprobs(ref_model, rollouts, groups, ctx.pad_id, acc.device,
                              ctx.share_prompt, stop_id, fast=cfg.fast)
    ref = LogProbs(ref.tokens.float(), None if ref.stop is None else ref.stop.float())
    if online:  # kept for the round's later PPO epochs
        sizes = lengths_of(rollouts, ids).tolist()
        stops = ref.stop.split(sizes) if ref.stop is not None else [None] * len(ids)
        for i, part, stop in zip(ids, ref.tokens.split(sizes), stops):
            ctx.ref_cache[i] = LogProbs(part, stop)
    return ref


def teacher_pass(ctx: StepContext, rollouts, groups, ids, credit: StopCredit) -> tuple:
    """rl.advantage=best_of_n_distill: the reference's log-probs of the sampled tokens (N,)
    and the teacher's next-token log-probs (N, V), the reference's with best-of-N's stop
    shift (credit.hazard): one no-grad forward with the RL adapter off, kept for the
    round's later PPO epochs (online)."""
    acc, cache = ctx.acc, ctx.ref_cache
    if cache is not None and all(i in cache for i in ids):
        return (torch.cat([cache[i][0] for i in ids]).to(acc.device),
                torch.cat([cache[i][1] for i in ids]).to(acc.device))
    with torch.no_grad(), acc.autocast(), sft_only(acc.unwrap_model(ctx.model)) as ref_model:
        logits = policy_logits(ref_model, rollouts, groups, ctx.pad_id, acc.device,
                               ctx.share_prompt, ctx.cfg.fast)
    targets = _on(acc.device, [t for i in ids for t in rollouts[i].completion_ids])
    ref = O.gather_logprobs(logits, targets)
    teacher = O.teacher_logprobs(logits, ctx.eos, torch.cat([credit.hazard[i] for i in ids])
                                 .to(acc.device))
    if cache is not None:
        sizes = lengths_of(rollouts, ids).tolist()
        for i, r, t in zip(ids, ref.split(sizes), teacher.split(sizes)):
            cache[i] = (r, t)
    return ref, teacher


def _on(device, values) -> torch.Tensor:
    return torch.tensor(values, device=device)


def loss_terms(ctx: StepContext, new, old, ref, adv, weight, policy_w, rollouts, ids, reward,
               credit: Optional[StopCredit], scale: float, n_samples: int,
               n_tokens: int) -> LossTerms:
    """3. the policy objective of one micro-batch: clipped, averaged per token or sample;
    or with the counterfactual stop credit, summed per sample. `scale` is this process's
    weight times the process count (the processes' gradients are averaged)."""
    cfg, device = ctx.cfg, ctx.acc.device
    if cfg.rl.advantage == "best_of_n_hazard":  # 3d. every stop decision toward best-of-N's
        shift = torch.cat([credit.hazard[i] for i in ids]).to(device)
        ce = O.hazard_loss(new.stop, ref.stop, shift)
        _, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, cfg.rl.clip_eps)
        return LossTerms(ce * weight, ce, ratio, clipped, weight)
    if cfg.rl.advantage == "best_of_n_stop":  # 3c. the best-of-N samples' stop decisions
        stopped = torch.cat([torch.tensor(rollouts[i].completion_ids) == ctx.eos
                             for i in ids]).to(device)
        nll = O.stop_decision_loss(new.stop, stopped)
        _, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, cfg.rl.clip_eps)
        return LossTerms(nll * policy_w, nll, ratio, clipped, weight)
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
            new.tokens, old, adv, policy_w, new.stop, old_stop, r_stop, r_final, may_stop,
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
        policy_w = inputs.policy_w[rows].to(acc.device) * scale
        if cfg.rl.advantage == "best_of_n_distill":
            # 2-3. the whole next-token distributions: KL(policy || teacher) at every token
            with acc.autocast():
                logits = policy_logits(ctx.model, rollouts, mb.groups, ctx.pad_id, acc.device,
                                       ctx.share_prompt, cfg.fast, cfg.rl.prompt_grad)
            targets = _on(acc.device, [t for i in ids for t in rollouts[i].completion_ids])
            new = LogProbs(O.gather_logprobs(logits, targets), None)
            ref_tokens, teacher = teacher_pass(ctx, rollouts, mb.groups, ids, credit)
            ref = LogProbs(ref_tokens, None)
            per_token = O.reverse_kl(logits, teacher)
            _, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, cfg.rl.clip_eps)
            terms = LossTerms(per_token * weight, per_token, ratio, clipped, weight)
        else:
            # 2. log-probs of the sampled tokens under the current policy (and the reference)
            hazard = cfg.rl.advantage == "best_of_n_hazard"
            wants_stop = credit is not None or cfg.rl.advantage == "best_of_n_stop"
            with acc.autocast():
                new = policy_logprobs(ctx.model, rollouts, mb.groups, ctx.pad_id, acc.device,
                                      ctx.share_prompt, ctx.eos if wants_stop else None,
                                      cfg.fast, cfg.rl.prompt_grad)
            ref = reference_logprobs(ctx, rollouts, mb.groups, ids, old,
                                     ctx.eos if hazard else None)
            terms = loss_terms(ctx, new, old, ref, adv, weight, policy_w, rollouts, ids,
                               reward, credit, scale, len(inputs.lengths), n_tokens)
        # 4. + beta * k3 KL to the SFT policy
        kl = O.kl_k3(new.tokens, ref.tokens)
        loss = terms.objective.sum() + ctx.beta * (kl * terms.kl_weight).sum()
        if not dist.all_finite(acc, loss):
            raise TrainingError("rl: non-finite loss")
        acc.backward(loss)
    return loss, terms, new.tokens, ref.tokens, kl


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
    inputs = step_inputs(rollouts, step, reward, credit, ctx.cfg, ctx.eos)
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
