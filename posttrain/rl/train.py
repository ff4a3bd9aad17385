"""The RL stage, top to bottom: where the samples come from, one optimizer step, the loop.

The policy is the base model + the frozen SFT adapter + a fresh RL adapter (B = 0, so it
starts equal to the SFT policy). Samples come from one of two places, and the same loop
trains on both:

- offline (the reference recipe, `rl.mode: offline`): the generated set, sampled once from
  the SFT policy by `posttrain generate`, scored once, in `rl.epochs` seeded passes;
- online (`rl.mode: online`): rounds of `rl.prompts_per_iteration` prompts drawn with
  replacement (seeded by the round), `generate.samples_per_prompt` samples each from the
  current policy, scored, then `rl.ppo_epochs` passes over the round.

Each sample carries the sampling policy's log-probs (pi_old, the PPO ratio's denominator).
Offline that policy is the SFT model, so they are also the KL reference
(`fast.recorded_reference`); online the reference is the same weights with the RL adapter
off (one no-grad forward per micro-batch, kept for the round's later PPO epochs).

The reward's length statistics (the mean and std the z-score rewards need) come from the
generated set, or the first online round (the SFT policy's samples), and stay fixed; they
are written to `rl/reward_lengths.json`, which the evaluation scores with.

Reads `<out_dir>/sft/adapter` (and offline `<out_dir>/generate/`); writes `rl/adapter`
(the RL LoRA, applied on top of the SFT adapter), `rl/summary.json`, `rl/reward_lengths.json`.
Checkpoints: every `rl.checkpoint_every` steps offline, rounds online (so a resumed run
samples the same rounds).
"""
from __future__ import annotations

import statistics
import time
from typing import Iterator, NamedTuple, Optional

import torch

from posttrain import objectives as O
from posttrain import seeds
from posttrain.config import Config, ConfigError
from posttrain.io import atomic_write_json, finished
from posttrain.evaluate.stats import length_summary
from posttrain.model.adapters import RL, load_policy, sampler, sft_only, sharded
from posttrain.model.choices import DeviceChoices
from posttrain.model.forward import policy_logprobs
from posttrain.model.load import load_tokenizer
from posttrain.rl.credit import abrupt_flags, step_advantages, step_rewards
from posttrain.rl.held_out import HeldOut
from posttrain.rl.plan import lengths_of, step_plan, steps_per_round
from posttrain.rollout import collect as C
from posttrain.rollout.prompts import draw_targets, train_prompt_pool
from posttrain.rollout.store import load_set
from posttrain.train import dist
from posttrain.train.loop import TrainingError, TrainLoop
from posttrain.types import LogProbs, Rollout, Step, StepPlan, StopCredit


# ---------------------------------------------------------------- where the samples come from

class Round(NamedTuple):
    """Samples and how to train on them: the rollouts, their rewards (S,) and stop credit
    (None unless rl.advantage uses it), the steps' plan, the reference log-probs a later PPO
    epoch reuses (online: filled by the first; offline: None) and what the first step logs."""
    index: int
    rollouts: list
    reward: torch.Tensor
    credit: Optional[StopCredit]
    plan: StepPlan
    ref_cache: Optional[dict]
    logged: dict


def offline_round(cfg: Config, tokenizer, world: int) -> tuple[Round, list]:
    """The generated set as one round, and the lengths the reward's statistics come from."""
    rollouts, _ = load_set(cfg.run_dir, tokenizer)
    set_lengths = [r.length(cfg.reward.unit) for r in rollouts]
    reward, credit = step_rewards(rollouts, set_lengths, tokenizer, cfg)     # (S,)
    plan = step_plan(rollouts, cfg, world=world)
    if cfg.rl.max_steps > 0:
        plan = plan[:cfg.rl.max_steps]
    return Round(0, rollouts, reward, credit, plan, None, {}), set_lengths


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


def online_rounds(cfg: Config, loop: TrainLoop, tokenizer, dtype, pool) -> Iterator[Round]:
    """Rounds sampled from the current policy out of `pool` (the training prompts' texts and
    token ids), from the resumed round on."""
    acc, extra = loop.acc, loop.extra
    texts, prompts = pool
    while extra.get("iteration", 0) < cfg.rl.iterations and loop.step < loop.total:
        it, t0 = extra.get("iteration", 0), time.perf_counter()
        rollouts = sample_round(loop.unwrapped, tokenizer, texts, prompts, cfg, it, acc.device,
                                dtype, acc.process_index, acc.num_processes)
        if acc.num_processes > 1:  # every process trains on the whole round
            rollouts = sorted(dist.gather(acc, rollouts), key=lambda r: r.group)
        seconds = time.perf_counter() - t0
        # the reward's length statistics: the first round's (the SFT policy's samples)
        extra.setdefault("reward_lengths", [r.length(cfg.reward.unit) for r in rollouts])
        extra["sampled_tokens"] = extra.get("sampled_tokens", 0) + sum(
            len(r.completion_ids) for r in rollouts)
        reward, credit = step_rewards(rollouts, extra["reward_lengths"], tokenizer, cfg)
        chars = length_summary([r.length_chars for r in rollouts])
        logged = dict(round=it + 1, round_len_mean=chars["mean"], round_len_std=chars["std"],
                      sample_seconds=seconds, sampled_tokens=extra["sampled_tokens"],
                      round_eos_rate=sum(r.ended_with_eos for r in rollouts) / len(rollouts),
                      round_abrupt=statistics.fmean(abrupt_flags(rollouts)))
        plan = step_plan(rollouts, cfg, epochs=cfg.rl.ppo_epochs,
                         seed=seeds.round_plan(cfg.seed, it), world=acc.num_processes)
        yield Round(it, rollouts, reward, credit, plan, {}, logged)


def total_steps(cfg: Config, world: int, offline: Optional[Round]) -> int:
    """The run's optimizer steps: the offline plan's, or the online rounds' (capped by
    rl.max_steps)."""
    if offline is not None:
        return len(offline.plan)
    total = cfg.rl.iterations * steps_per_round(cfg, world)
    return min(total, cfg.rl.max_steps) if cfg.rl.max_steps > 0 else total


# ---------------------------------------------------------------- one step's batch and loss

class StepBatch(NamedTuple):
    """One optimizer step's samples as flat tensors on the device, built once: N = their
    completion tokens, sample by sample in plan order (packed: no padding), S = samples.
    `rows[j]` is micro-batch j's slice of the N rows."""
    samples: list             # (S,) rollout indices
    lengths: torch.Tensor     # (S,) completion tokens
    old: torch.Tensor         # (N,) pi_old log-probs of the sampled tokens
    adv: torch.Tensor         # (N,) advantages
    weight: torch.Tensor      # (N,) loss weights
    old_stop: Optional[torch.Tensor]   # (N,) pi_old log pi(EOS); stop credit only
    r_stop: Optional[torch.Tensor]     # (N,) the reward had the sample stopped there
    r_final: Optional[torch.Tensor]    # (N,) the reward the sample got
    may_stop: Optional[torch.Tensor]   # (N,) bool: the stop credit counts there
    rows: list                # per micro-batch: slice of the N rows

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def step_batch(rnd: Round, step: Step, cfg: Config, eos: int, device) -> StepBatch:
    """1. the step's samples, their advantages and loss weights, pi_old, the stop credit."""
    rollouts, flat = rnd.rollouts, step.samples
    lengths = lengths_of(rollouts, flat)
    group = torch.tensor([k for k, g in enumerate(step.groups) for _ in g])
    adv, weight = step_advantages(rnd.reward[flat], lengths, group, cfg)
    sizes = [int(lengths_of(rollouts, mb.samples).sum()) for mb in step.micro]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    rows = [slice(s, s + n) for s, n in zip(starts, sizes)]
    old = torch.tensor([lp for i in flat for lp in rollouts[i].logprobs], device=device)
    old_stop = r_stop = r_final = may_stop = None
    if rnd.credit is not None:
        if rollouts[flat[0]].stop_logprobs:
            old_stop = torch.tensor([x for i in flat for x in rollouts[i].stop_logprobs],
                                    device=device)
        r_stop = torch.cat([rnd.credit.reward[i] for i in flat]).to(device)
        r_final = rnd.reward[flat].repeat_interleave(lengths).to(device)
        may_stop = torch.cat([(torch.tensor(rollouts[i].completion_ids) != eos)
                              & rnd.credit.counted[i] for i in flat]).to(device)
    return StepBatch(flat, lengths, old, adv.to(device), weight.to(device), old_stop, r_stop,
                     r_final, may_stop, rows)


def loss(b: StepBatch, rows: slice, new: LogProbs, ref: torch.Tensor, cfg: Config,
         beta: float, scale: float) -> tuple[torch.Tensor, dict]:
    """The objective of one micro-batch (`rows` of the step), and its figures summed over its
    tokens. `scale` is this process's share times the process count (the processes'
    gradients are averaged). Every rl.advantage, in one place:

    per_token, group  PPO's clipped surrogate of each token's advantage, weighted per token
                      (rl.loss_agg); per_token is the reference recipe's.
    stop              the counterfactual stop credit alone: at each position, what stopping
                      there would have earned minus what the sample earned, on p(stop),
                      summed per sample; the surrogate is only measured.
    group_stop        both: the surrogate on every token + rl.stop_weight x the stop credit.

    Then + beta x the k3 KL to the SFT policy, in the unit of the policy term."""
    eps, old, adv = cfg.rl.clip_eps, b.old[rows], b.adv[rows]
    weight = b.weight[rows] * scale
    pg, ratio, clipped = O.clipped_policy_loss(new.tokens, old, adv, eps)       # (n,)
    kl_weight = weight
    if cfg.rl.advantage in ("per_token", "group"):
        policy_loss, objective = pg, pg * weight
    else:
        credit = O.stop_credit_loss(new.stop, b.r_stop[rows], b.r_final[rows],
                                    b.may_stop[rows], None if b.old_stop is None
                                    else b.old_stop[rows], eps)                  # (n,)
        if cfg.rl.advantage == "group_stop":
            per_sample = torch.full_like(weight, scale / len(b.samples))
            policy_loss = pg
            objective = pg * weight + cfg.rl.stop_weight * credit * per_sample
        else:  # stop; its KL in the unit rl.loss_agg names: per summary or per token
            per = len(b.samples) if cfg.rl.loss_agg == "summary" else b.n_tokens
            policy_loss, objective = credit, credit * weight
            kl_weight = torch.full_like(weight, scale / per)
    kl = O.kl_k3(new.tokens, ref)
    total = objective.sum() + beta * (kl * kl_weight).sum()
    stats = {"policy_loss": policy_loss, "kl": kl, "kl_k1": O.kl_k1(new.tokens, ref),
             "clipped": clipped.float(), "ratio": ratio}
    return total, {k: v.detach().sum().item() for k, v in stats.items()} | {
        "ratio_max": ratio.detach().max().item()}


def reference_logprobs(model, acc, cfg: Config, rnd: Round, mb, old: torch.Tensor,
                       pad_id: int, share_prompt: bool, fsdp: bool) -> torch.Tensor:
    """The KL reference's log-probs (n,): the recorded ones (offline), a later PPO epoch's
    cached ones (online), or one no-grad forward with the RL adapter off."""
    ids, online = mb.samples, rnd.ref_cache is not None
    # under FSDP every process must run as many forwards as the others: no cache there
    cache = online and not fsdp
    if cache and all(i in rnd.ref_cache for i in ids):   # a later PPO epoch of the round
        return torch.cat([rnd.ref_cache[i] for i in ids]).to(acc.device)
    if not online and cfg.fast.recorded_reference:
        return old
    with torch.no_grad(), acc.autocast(), sft_only(acc.unwrap_model(model)) as ref_model:
        ref = policy_logprobs(ref_model, rnd.rollouts, mb.groups, pad_id, acc.device,
                              share_prompt).tokens.float()
    if cache:  # kept for the round's later PPO epochs
        for i, part in zip(ids, ref.split(lengths_of(rnd.rollouts, ids).tolist())):
            rnd.ref_cache[i] = part
    return ref


# ---------------------------------------------------------------- one optimizer step

def train_step(loop: TrainLoop, rnd: Round, step: Step, tokenizer, cfg: Config,
               beta: float) -> dict:
    """One optimizer step over this process's share of the step's micro-batches: steps 1-5
    (6-7, beta and the log, follow in `run`); returns the step's metrics row (figures summed
    over the processes)."""
    acc, model, t0 = loop.acc, loop.model, time.perf_counter()
    share_prompt, fsdp = shared_prompt_pass(cfg, loop), sharded(loop.unwrapped)  # once a step
    stop_id = tokenizer.eos_token_id
    # 1. the batch: advantages, loss weights, pi_old and the stop credit, as tensors
    b = step_batch(rnd, step, cfg, stop_id, acc.device)
    sums = dict(policy_loss=0.0, kl=0.0, kl_k1=0.0, clipped=0.0, ratio=0.0)
    total_loss, ratio_max = 0.0, 0.0
    # each process takes its share of the micro-batches (weight 0: a padding repeat, so
    # every process runs as many backward passes)
    mine = dist.rank_share(list(range(len(step.micro))), acc.process_index, acc.num_processes)
    for k, (j, share) in enumerate(mine):
        mb, rows = step.micro[j], b.rows[j]
        with dist.sync_unless(acc, model, k == len(mine) - 1):   # one all-reduce per step
            # 2. log-probs of the sampled tokens (and of stopping) under the current policy
            with acc.autocast():
                new = policy_logprobs(model, rnd.rollouts, mb.groups, tokenizer.pad_token_id,
                                      acc.device, share_prompt,
                                      stop_id if rnd.credit is not None else None,
                                      prompt_grad=cfg.rl.prompt_grad)
            # 3. the KL reference's
            ref = reference_logprobs(model, acc, cfg, rnd, mb, b.old[rows],
                                     tokenizer.pad_token_id, share_prompt, fsdp)
            # 4. the objective, and backward
            mb_loss, stats = loss(b, rows, new, ref, cfg, beta, share * acc.num_processes)
            if not dist.all_finite(acc, mb_loss):
                raise TrainingError("rl: non-finite loss")
            acc.backward(mb_loss)
        if share == 0:
            continue
        total_loss += mb_loss.item() / acc.num_processes
        ratio_max = max(ratio_max, stats.pop("ratio_max"))
        for name, v in stats.items():
            sums[name] += v
    if acc.num_processes > 1:
        keys = sorted(sums)
        total = acc.reduce(torch.tensor([sums[k] for k in keys] + [total_loss],
                                        device=acc.device), "sum").tolist()
        sums, total_loss = dict(zip(keys, total[:-1])), total[-1]
        ratio_max = acc.reduce(torch.tensor(ratio_max, device=acc.device), "max").item()
    # 5. clip the gradient and step the optimizer
    grad_norm, lr = loop.optimizer_step()
    m = {k: v / b.n_tokens for k, v in sums.items()}
    row = {}
    if cfg.reward.ending is not None:  # the share of the step's samples the rule hit
        row["penalised"] = statistics.fmean(abrupt_flags([rnd.rollouts[i] for i in b.samples]))
    row.update(loss=total_loss, policy_loss=m["policy_loss"], kl=m["kl"], kl_k1=m["kl_k1"],
               kl_summary=sums["kl"] / len(b.samples), beta=beta, clip_frac=m["clipped"],
               ratio_mean=m["ratio"], ratio_max=ratio_max, adv_mean=b.adv.mean().item(),
               adv_std=b.adv.std().item(), reward_mean=rnd.reward[b.samples].mean().item(),
               lr=lr, grad_norm=grad_norm,
               tokens_per_s=step_tokens(rnd.rollouts, step, share_prompt)
               / (time.perf_counter() - t0))
    return row


def shared_prompt_pass(cfg: Config, loop: TrainLoop) -> bool:
    """rl.share_prompt resolved: `auto` for the device, and off under FSDP, where every
    process must run as many forwards as the others (the shared pass's count follows its
    samples' lengths)."""
    if not sharded(loop.unwrapped):
        return DeviceChoices(cfg, loop.acc.device).share_prompt
    if cfg.rl.share_prompt is True or not cfg.rl.prompt_grad:
        raise ConfigError("under FSDP each sample runs with its own prompt: set "
                          "rl.share_prompt=auto (or false) and rl.prompt_grad=true")
    return False


def step_tokens(rollouts: list[Rollout], step: Step, share_prompt: bool) -> int:
    """Tokens the step's forward passes process: completions, plus each prompt once for its
    group (share_prompt) or once per sample."""
    completions = int(lengths_of(rollouts, step.samples).sum())
    return completions + sum(len(rollouts[g[0]].prompt_ids) * (1 if share_prompt else len(g))
                             for g in step.groups)


# ---------------------------------------------------------------- the loop

def run(cfg: Config) -> dict:
    """Train the RL adapter (offline on the generated set, or online); returns the summary."""
    done = finished("rl", cfg.run_dir / "rl", "summary.json", "adapter", "trains again",
                    "adapter")
    if done is not None:
        return done
    torch.manual_seed(cfg.seed)
    acc, dtype = dist.setup_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter"))
    if cfg.rl.mode == "offline":   # the samples, or the prompts they will come from
        (offline, reward_lengths), pool = offline_round(cfg, tokenizer, acc.num_processes), None
    else:
        offline, reward_lengths, pool = None, None, train_prompt_pool(tokenizer, cfg)
    DeviceChoices(cfg, acc.device).check()
    model = load_policy(cfg, acc.device, cfg.run_dir / "sft" / "adapter", rl="new")
    loop = TrainLoop(cfg, "rl", cfg.rl, model, total_steps(cfg, acc.num_processes, offline),
                     acc, adapter=RL, extra={"beta": cfg.rl.beta})
    shared_prompt_pass(cfg, loop)   # a setting FSDP cannot run stops before any sampling
    held_out = HeldOut(cfg, tokenizer)
    kl_budget = O.best_of_n_kl(cfg.rl.best_of_n)  # best-of-N's KL per summary: the yardstick
    if "eval_before" not in loop.extra:
        loop.extra["eval_before"] = held_out.lengths(loop.model, acc.device, dtype)
        loop.metrics.log(0, **loop.extra["eval_before"])
    loop.start()
    rounds = [offline._replace(plan=offline.plan[loop.step:])] if offline is not None \
        else online_rounds(cfg, loop, tokenizer, dtype, pool)
    every = cfg.rl.checkpoint_every
    for rnd in rounds:
        for k, step in enumerate(rnd.plan):
            if loop.step >= loop.total:
                break
            beta = loop.extra["beta"]
            row = loop.guarded(lambda: train_step(loop, rnd, step, tokenizer, cfg, beta))
            # 6. beta: fixed, or steered toward the best-of-N budget (the reference recipe
            # holds the per-token KL against it; adaptive_summary the KL per summary)
            if cfg.rl.kl_control != "fixed":
                kl = row["kl"] if cfg.rl.kl_control == "adaptive_token" else row["kl_summary"]
                loop.extra["beta"] = O.adaptive_beta(beta, kl, kl_budget, cfg.rl.kl_horizon)
            # 7. log, the held-out check when due, checkpoint
            row.update(kl_budget=kl_budget, **(rnd.logged if k == 0 else {}))
            if cfg.rl.eval_every and loop.step % cfg.rl.eval_every == 0 \
                    and loop.step < loop.total:
                row.update(held_out.lengths(loop.model, acc.device, dtype))
            loop.log(row, kl=f"{row['kl_summary']:.2f}/summary",
                     ratio=f"{row['ratio_mean']:.3f}", beta=f"{row['beta']:.3g}")
            if offline is not None and loop.checkpoint_due(loop.step, every):
                loop.save_checkpoint()
        if offline is None:   # online: checkpoints between rounds
            loop.extra["iteration"] = rnd.index + 1
            if loop.checkpoint_due(rnd.index + 1, every) and rnd.index + 1 < cfg.rl.iterations:
                loop.save_checkpoint()
    # the held-out check after training, the reward's statistics, the adapter, the summary
    loop.close_bar()
    before, after = loop.extra["eval_before"], held_out.lengths(loop.model, acc.device, dtype)
    summary = {"steps": loop.step, "beta_final": loop.extra["beta"], "kl_budget": kl_budget,
               "eval_before": before, "eval_after": after}
    if offline is not None:
        summary["samples"] = len(offline.rollouts)
    else:
        reward_lengths = loop.extra.get("reward_lengths", [])
        summary.update(rounds=loop.extra.get("iteration", 0),
                       sampled_tokens=loop.extra.get("sampled_tokens", 0))
    if acc.is_main_process:
        atomic_write_json(loop.out / "reward_lengths.json", {
            "unit": cfg.reward.unit, "lengths": reward_lengths,
            "from": "the generated set" if offline is not None else "the first online round"})
    loop.finish(tokenizer, summary, after)
    print(f"rl: held-out length {before['eval_len_mean']:.1f} ± {before['eval_len_std']:.1f}"
          f" -> {after['eval_len_mean']:.1f} ± {after['eval_len_std']:.1f} chars; adapter in "
          f"{loop.out / 'adapter'}")
    return summary
