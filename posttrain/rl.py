"""The RL stage: PPO-style updates against the frozen SFT policy, offline on the generated
set (the seed's method) or online (`rl.mode: online`, in online.py).

The behaviour log-probabilities recorded at generation are pi_sft for those tokens, so the
ratio's denominator and the KL reference need no second model and no second forward pass;
the RL adapter starts at zero, so the ratio is 1 at step 0.

Reads `<out_dir>/sft/adapter` and `<out_dir>/generate/`; writes `<out_dir>/rl/adapter`
(the RL LoRA, applied on top of the SFT adapter) and `rl/summary.json`.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from posttrain import checkpoint, modeling, objectives as O, rewards
from posttrain.config import Config, record_config
from posttrain.data import Example, collate
from posttrain.generate import load_set, prompt_pool, sample_records
from posttrain.io import atomic_write_json
from posttrain.metrics import MetricsLogger
from posttrain.rewards import is_abrupt
from posttrain.sft import (TrainingError, all_finite, build_optimizer, build_scheduler,
                           optimizer_step, rank_share, setup_accelerator, sync_unless, to_device)


def step_plan(records: list[dict], cfg: Config, epochs: float | None = None,
              seed: int | None = None, world: int = 1) -> list[list[list[list[int]]]]:
    """Optimizer steps -> micro-batches -> prompt groups -> sample indices, fixed by the
    seed. A micro-batch holds rl.batch_size samples, rounded down to whole prompt groups; a
    step holds rl.grad_accum micro-batches per process (`world` processes share it).
    `epochs` passes (default rl.epochs), each in its own seeded order."""
    epochs = cfg.rl.epochs if epochs is None else epochs
    seed = cfg.seed if seed is None else seed
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["group"], []).append(i)
    groups_list = list(groups.values())
    per_micro = max(1, cfg.rl.batch_size // len(groups_list[0]))
    order = []
    for epoch in range(math.ceil(epochs)):
        gen = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(len(groups_list), generator=gen).tolist()
    order = [groups_list[i] for i in order[:int(round(epochs * len(groups_list)))]]
    micro = [order[i:i + per_micro] for i in range(0, len(order), per_micro)]
    per_step = cfg.rl.grad_accum * world
    return [micro[i:i + per_step] for i in range(0, len(micro), per_step)]


def best_of_groups(records: list[dict], reward: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """Keep the highest-reward sample of each prompt group (best-of-G), each its own group."""
    best: dict[int, int] = {}
    for i, r in enumerate(records):
        if r["group"] not in best or reward[i] > reward[best[r["group"]]]:
            best[r["group"]] = i
    keep = sorted(best.values())
    return [records[i] for i in keep], reward[keep]


def lengths_of(records: list[dict], ids: list[int]) -> torch.Tensor:
    return torch.tensor([len(records[i]["completion_ids"]) for i in ids])


def step_advantages(reward: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor,
                    cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages (N,) and loss weights (N,) for one step's S samples.
    reward, lengths, group: (S,) reward, completion tokens and prompt-group id per sample."""
    token_seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)      # (N,)
    if cfg.rl.advantage in ("group", "group_stop"):
        if cfg.rl.baseline == "step":   # one baseline for the whole step: every prompt
            group = torch.zeros_like(group)
        adv = O.group_advantages(reward, group, cfg.rl.group_std)[token_seq]
    elif cfg.rl.advantage == "best_of_n":  # every kept sample is its group's best: A = 1
        adv = torch.ones(token_seq.shape)
    else:  # seed (stop uses it for the ratio and clip metrics only)
        adv = O.per_token_advantages(reward, token_seq, cfg.rl.adv_clamp)
    if cfg.rl.advantage == "stop":  # stop credit is summed over a sample's positions
        return adv, torch.full(token_seq.shape, 1.0 / len(lengths))
    return adv, O.token_weights(token_seq, len(lengths), cfg.rl.loss_agg == "sequence")


class HeldOut:
    """Fixed held-out prompts for watching the length spread during training."""

    def __init__(self, cfg: Config, tokenizer):
        texts, ids = prompt_pool(cfg.data.eval, cfg.data.eval_split, tokenizer, cfg)
        self.texts, self.ids = texts[:cfg.rl.eval_prompts], ids[:cfg.rl.eval_prompts]
        self.cfg, self.tokenizer = cfg, tokenizer

    @torch.no_grad()
    def lengths(self, model, device, dtype) -> dict:
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=device).manual_seed(self.cfg.seed + 7)
        records = []
        bs = self.cfg.generate.batch_size
        with modeling.sampler(model, self.cfg.model, device, dtype) as policy:
            for s in range(0, len(self.ids), bs):
                records += sample_records(
                    policy, self.tokenizer, self.texts[s:s + bs], self.ids[s:s + bs],
                    self.cfg.rl.eval_samples_per_prompt, self.cfg.generate.max_new_tokens, gen,
                    self.cfg.generate.temperature, self.cfg.generate.top_p)
        model.train(was_training)
        chars = [r["length_chars"] for r in records]
        return {"eval_len_mean": statistics.fmean(chars), "eval_len_std": statistics.pstdev(chars),
                "eval_eos_rate": sum(r["ended_with_eos"] for r in records) / len(records)}


def policy_logprobs(model, records: list[dict], groups: list[list[int]], pad_id: int, device,
                    share_prompt: bool, stop_id: int | None = None, fast=None):
    """log pi(token) (N,) of every completion token of the micro-batch's samples, in order:
    each prompt once for its group (share_prompt), or each sample with its own prompt.
    With `stop_id`, also log pi(stop_id) at the same positions. `fast` (a FastConfig; None:
    all on) switches the LM-head slicing and the fused log-prob gather."""
    only = fast is None or fast.completion_logits
    fused = fast is None or fast.fused_logprobs
    if share_prompt:
        logits = modeling.grouped_completion_logits(
            model, [records[g[0]]["prompt_ids"] for g in groups],
            [[records[i]["completion_ids"] for i in g] for g in groups], pad_id, device, only)
    else:
        batch = to_device(collate([Example(tuple(records[i]["prompt_ids"]),
                                           tuple(records[i]["completion_ids"]))
                                   for g in groups for i in g], pad_id), device)
        logits = modeling.completion_logits(model, batch, only)
    targets = torch.tensor([t for g in groups for i in g for t in records[i]["completion_ids"]],
                           device=device)
    if stop_id is not None:
        return O.target_and_stop_logprobs(logits, targets, stop_id, fused)
    return O.gather_logprobs(logits, targets, fused)


def prefix_texts(records: list[dict], tokenizer) -> list[list[str]]:
    """For each sample and each completion position t, the text the completion would have
    been had it stopped before token t."""
    return [[tokenizer.decode(r["completion_ids"][:t], skip_special_tokens=True)
             for t in range(len(r["completion_ids"]))] for r in records]


def prefix_lengths(records: list[dict], tokenizer, unit: str,
                   texts: list[list[str]] | None = None) -> list[list[int]]:
    """For each sample and each completion position t, the length of the completion had it
    stopped before token t (chars of the decoded prefix, or t tokens)."""
    if unit == "tokens":
        return [list(range(len(r["completion_ids"]))) for r in records]
    texts = prefix_texts(records, tokenizer) if texts is None else texts
    return [[len(t.strip()) for t in per] for per in texts]


class StopCredit(NamedTuple):
    """Per sample, at each completion position t: the reward had it stopped before token t
    (T_s,); whether stopping there would have ended cleanly (T_s,) bool; and whether the
    stop credit counts there (T_s,) bool: everywhere, or with reward.ending set only where
    stopping would have ended cleanly."""
    reward: list
    clean: list
    counted: list


def abrupt_flags(records: list[dict]) -> list[bool]:
    return [is_abrupt(r["completion"], r["truncated"]) for r in records]


def step_rewards(records: list[dict], set_lengths, tokenizer, cfg: Config):
    """Rewards (S,) of the samples (with reward.ending: the penalty for abrupt endings), and
    with rl.advantage=stop or group_stop the StopCredit of every position."""
    targets = [r.get("target") for r in records]
    if any(t is None for t in targets):
        targets = None   # plain prompts: the reward's own centre
    reward = rewards.compute([r["length_" + cfg.reward.unit] for r in records], set_lengths,
                             cfg.reward, targets, abrupt_flags(records))
    if cfg.rl.advantage not in ("stop", "group_stop"):
        return reward, None
    texts = prefix_texts(records, tokenizer)
    stop_reward, clean = [], []
    for k, p in enumerate(prefix_lengths(records, tokenizer, cfg.reward.unit, texts)):
        stop_reward.append(rewards.compute(p, set_lengths, cfg.reward,
                                           None if targets is None else [targets[k]] * len(p)))
        clean.append(torch.tensor([not is_abrupt(t, False) for t in texts[k]], dtype=torch.bool))
    counted = clean if cfg.reward.ending is not None else [torch.ones_like(c) for c in clean]
    return reward, StopCredit(stop_reward, clean, counted)


def train_step(model, acc, optimizer, scheduler, records: list[dict], micro, reward_all,
               stop_reward, beta: float, cfg: Config, tokenizer, online: bool,
               reference=None) -> dict:
    """One optimizer step over `micro` (micro-batches -> prompt groups -> sample indices).
    records[i]["logprobs"] are the sampling policy's (pi_old). Offline that policy is the
    SFT model, so it is also the KL reference (fast.recorded_reference); online, or with
    that switch off, the reference is the same weights with the RL adapter off (one no-grad
    forward), or `reference`, a separate model, when given (the benchmark's naive
    baseline). Returns the step's metrics."""
    t0 = time.perf_counter()
    eos = tokenizer.eos_token_id
    # 1. batch: this step's samples and their advantages
    flat = [i for mb in micro for g in mb for i in g]
    lengths = lengths_of(records, flat)
    group = torch.tensor([k for k, g in enumerate(g for mb in micro for g in mb) for _ in g])
    adv_all, weight_all = step_advantages(reward_all[flat], lengths, group, cfg)
    policy_w_all = weight_all                  # the policy term's weights (the KL's: weight_all)
    if cfg.rl.credit == "decisions":           # only where the sample could stop cleanly
        policy_w_all = O.decision_weights(weight_all, torch.cat(
            [stop_reward.clean[i] | (torch.tensor(records[i]["completion_ids"]) == eos)
             for i in flat]))
    n_tokens = int(lengths.sum())
    # tokens the forward passes process: a shared prompt counts once for its group
    prompt_tokens = sum(len(records[g[0]]["prompt_ids"]) * (1 if cfg.rl.share_prompt else len(g))
                        for mb in micro for g in mb)
    sums = dict(policy_loss=0.0, kl=0.0, kl_k1=0.0, clipped=0.0, ratio=0.0)
    total_loss, ratio_max = 0.0, 0.0  # the objective as optimized (weighting depends on mode)
    # each process takes its share of the micro-batches (weight 0: a padding repeat)
    sizes = [int(lengths_of(records, [i for g in mb for i in g]).sum()) for mb in micro]
    starts = [sum(sizes[:j]) for j in range(len(micro))]   # each micro-batch's first token row
    mine = rank_share(list(range(len(micro))), acc.process_index, acc.num_processes)
    for k, (j, share) in enumerate(mine):
        groups, offset = micro[j], starts[j]
        # one all-reduce per step: on the last backward only
        with sync_unless(acc, model, k == len(mine) - 1):
            ids = [i for g in groups for i in g]
            old = torch.tensor([lp for i in ids for lp in records[i]["logprobs"]],
                               device=acc.device)
            adv = adv_all[offset:offset + len(old)].to(acc.device)
            # the processes' gradients are averaged, hence the factor
            weight = weight_all[offset:offset + len(old)].to(acc.device) * (
                share * acc.num_processes)
            policy_w = policy_w_all[offset:offset + len(old)].to(acc.device) * (
                share * acc.num_processes)
            # 2. log-probs of the sampled tokens under the current policy (and the reference)
            with acc.autocast():
                new = policy_logprobs(model, records, groups, tokenizer.pad_token_id,
                                      acc.device, cfg.rl.share_prompt,
                                      eos if stop_reward is not None else None, cfg.fast)
            ref = old
            forward_ref = online or reference is not None or not cfg.fast.recorded_reference
            if online and all("ref_logprobs" in records[i] for i in ids):   # a later PPO epoch
                ref = torch.tensor([x for i in ids for x in records[i]["ref_logprobs"]],
                                   device=acc.device)
            elif forward_ref:
                with (torch.no_grad(), acc.autocast(),
                      contextlib.nullcontext(reference) if reference is not None
                      else modeling.sft_only(acc.unwrap_model(model)) as ref_model):
                    ref = policy_logprobs(ref_model, records, groups, tokenizer.pad_token_id,
                                          acc.device, cfg.rl.share_prompt,
                                          fast=cfg.fast).float()
                if online:  # kept for the round's later PPO epochs
                    for i, part in zip(ids, ref.split(lengths_of(records, ids).tolist())):
                        records[i]["ref_logprobs"] = part.tolist()
            kl_weight = weight
            if stop_reward is None:  # 3a. clipped policy loss, averaged per token or sample
                pl, ratio, clipped = O.clipped_policy_loss(new, old, adv, cfg.rl.clip_eps)
                objective = pl * weight
            else:                    # 3b. with the counterfactual stop credit, summed per sample
                new, lp_stop = new
                old_stop = (torch.tensor([x for i in ids for x in records[i]["stop_logprobs"]],
                                         device=acc.device)
                            if "stop_logprobs" in records[ids[0]] else None)
                r_stop = torch.cat([stop_reward.reward[i] for i in ids]).to(acc.device)
                r_final = reward_all[ids].repeat_interleave(lengths_of(records, ids)).to(acc.device)
                may_stop = torch.cat([(torch.tensor(records[i]["completion_ids"]) != eos)
                                      & stop_reward.counted[i] for i in ids]).to(acc.device)
                if cfg.rl.advantage == "group_stop":  # group term on every token + the credit
                    per_sample = torch.full_like(weight, share * acc.num_processes / len(lengths))
                    objective, pl, ratio, clipped = O.group_stop_loss(
                        new, old, adv, policy_w, lp_stop, old_stop, r_stop, r_final, may_stop,
                        per_sample, cfg.rl.stop_weight, cfg.rl.clip_eps)
                else:                                 # the stop credit alone
                    pl = O.stop_credit_loss(lp_stop, r_stop, r_final, may_stop, old_stop,
                                            cfg.rl.clip_eps)
                    objective = pl * weight
                    _, ratio, clipped = O.clipped_policy_loss(new, old, adv, cfg.rl.clip_eps)
                    kl_weight = torch.full_like(weight, share * acc.num_processes / n_tokens)
            # 4. + beta * k3 KL to the SFT policy
            kl = O.kl_k3(new, ref)
            loss = objective.sum() + beta * (kl * kl_weight).sum()
            if not all_finite(acc, loss):
                raise TrainingError("rl: non-finite loss")
            acc.backward(loss)
            if share == 0:
                continue
            total_loss += loss.item() / acc.num_processes
            for name, v in (("policy_loss", pl), ("kl", kl), ("kl_k1", O.kl_k1(new, ref)),
                            ("clipped", clipped.float()), ("ratio", ratio)):
                sums[name] += v.detach().sum().item()
            ratio_max = max(ratio_max, ratio.detach().max().item())
    if acc.num_processes > 1:  # the step's figures over all processes
        keys = sorted(sums)
        total = acc.reduce(torch.tensor([sums[k] for k in keys] + [total_loss],
                                        device=acc.device), "sum").tolist()
        sums, total_loss = dict(zip(keys, total[:-1])), total[-1]
        ratio_max = acc.reduce(torch.tensor(ratio_max, device=acc.device), "max").item()
    # 5. clip gradients and step
    grad_norm, lr = optimizer_step(acc, model, optimizer, scheduler, cfg.rl.max_grad_norm)
    m = {k: v / n_tokens for k, v in sums.items()}
    if cfg.reward.ending is not None:  # the share of the step's samples the ending rule hit
        m["penalised"] = statistics.fmean(abrupt_flags([records[i] for i in flat]))
    return dict(**({"penalised": m["penalised"]} if "penalised" in m else {}), loss=total_loss, policy_loss=m["policy_loss"], kl=m["kl"], kl_k1=m["kl_k1"],
                beta=beta, clip_frac=m["clipped"], ratio_mean=m["ratio"], ratio_max=ratio_max,
                adv_mean=adv_all.mean().item(), adv_std=adv_all.std().item(),
                reward_mean=reward_all[flat].mean().item(), lr=lr, grad_norm=float(grad_norm),
                tokens_per_s=(n_tokens + prompt_tokens) / (time.perf_counter() - t0))


class Trainer:
    """What the offline and online loops share: the policy (base + frozen SFT adapter + a
    fresh RL adapter, B = 0 so it starts equal to SFT), optimizer, schedule, checkpoints,
    metrics, the held-out length checks, and beta."""

    def __init__(self, cfg: Config, total_steps: int, tokenizer, acc, dtype):
        self.cfg, self.tokenizer, self.acc, self.dtype = cfg, tokenizer, acc, dtype
        self.out = cfg.run_dir / "rl"
        model = modeling.load_policy(cfg, acc.device, cfg.run_dir / "sft" / "adapter", rl="new")
        optimizer = build_optimizer(model, cfg.rl)
        self.scheduler = build_scheduler(optimizer, cfg.rl, total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ckpt_dir = self.out / "checkpoints"
        self.total = total_steps
        self.step, self.extra = 0, {"beta": cfg.rl.beta}
        last = checkpoint.latest(self.ckpt_dir)
        if last is not None:
            self.step, self.extra = checkpoint.load(last, acc.unwrap_model(self.model),
                                                    self.optimizer, self.scheduler,
                                                    adapter=modeling.RL)
            print(f"rl: resuming from {last} (step {self.step} of {total_steps})")
        self.metrics = MetricsLogger(cfg.run_dir, "rl", enabled=acc.is_main_process,
                                     resume_step=self.step if last is not None else -1)
        self.held_out = HeldOut(cfg, tokenizer)
        self.kl_target = O.best_of_n_kl(cfg.rl.best_of_n)
        if "eval_before" not in self.extra:
            self.extra["eval_before"] = self.held_out.lengths(self.model, acc.device, dtype)
            self.metrics.log(0, **self.extra["eval_before"])
        self.model.train()
        self.bar = tqdm(total=total_steps, initial=self.step, desc="rl",
                        disable=not acc.is_main_process)

    def step_on(self, records, micro, reward_all, stop_reward, online: bool, **logged) -> None:
        """Train one step, steer beta, log, and run the held-out check when due."""
        cfg = self.cfg
        try:
            row = train_step(self.model, self.acc, self.optimizer, self.scheduler, records,
                             micro, reward_all, stop_reward, self.extra["beta"], cfg,
                             self.tokenizer, online)
        except TrainingError as e:
            raise TrainingError(f"{e} at step {self.step + 1}; the last good checkpoint is "
                                f"{checkpoint.latest(self.ckpt_dir)}") from None
        self.step += 1
        # 6. beta: fixed, or steered toward the best-of-N KL target
        if cfg.rl.kl_control == "adaptive":
            self.extra["beta"] = O.adaptive_beta(self.extra["beta"], row["kl"], self.kl_target,
                                                 cfg.rl.kl_horizon)
        # 7. log, evaluate, checkpoint
        row.update(kl_target=self.kl_target, **logged)
        if cfg.rl.eval_every and self.step % cfg.rl.eval_every == 0 and self.step < self.total:
            row.update(self.held_out.lengths(self.model, self.acc.device, self.dtype))
        self.metrics.log(self.step, **row)
        self.bar.set_postfix(kl=f"{row['kl']:.3f}", ratio=f"{row['ratio_mean']:.3f}",
                             beta=f"{row['beta']:.3g}")
        self.bar.update(1)

    def checkpoint_due(self) -> bool:
        every = self.cfg.rl.checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.total

    def save_checkpoint(self) -> None:
        if self.acc.is_main_process:
            record_config(self.cfg, "rl")
            checkpoint.save(self.ckpt_dir, self.step, self.acc.unwrap_model(self.model),
                            self.optimizer, self.scheduler, self.extra,
                            keep=self.cfg.rl.keep_checkpoints, adapter=modeling.RL)
        self.acc.wait_for_everyone()

    def finish(self, **summary) -> dict:
        self.bar.close()
        before = self.extra["eval_before"]
        after = self.held_out.lengths(self.model, self.acc.device, self.dtype)
        self.metrics.log(self.step, **after)
        self.metrics.close()
        summary = {"steps": self.step, "beta_final": self.extra["beta"],
                   "kl_target": self.kl_target, "eval_before": before, "eval_after": after,
                   **summary}
        if self.acc.is_main_process:
            record_config(self.cfg, "rl")
            modeling.save_adapter(self.acc.unwrap_model(self.model), self.tokenizer,
                                  self.out / "adapter", modeling.RL)
            atomic_write_json(self.out / "summary.json", summary)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.acc.wait_for_everyone()  # the adapter is on disk before any process reads it
        print(f"rl: held-out length {before['eval_len_mean']:.1f} ± {before['eval_len_std']:.1f}"
              f" -> {after['eval_len_mean']:.1f} ± {after['eval_len_std']:.1f} chars; adapter in "
              f"{self.out / 'adapter'}")
        return summary


def run(cfg: Config) -> dict:
    """Train the RL adapter (offline on the generated set, or online); returns the summary."""
    out = cfg.run_dir / "rl"
    if (out / "summary.json").is_file() and (out / "adapter").is_dir():
        print(f"rl: already finished in {out} "
              "(--force trains again, keeping it until the new adapter is written)")
        return json.loads((out / "summary.json").read_text())
    torch.manual_seed(cfg.seed)
    acc, dtype = setup_accelerator(cfg)
    tokenizer = modeling.load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter"))
    if cfg.rl.mode == "online":
        from posttrain.online import run_online
        return run_online(cfg, acc, dtype, tokenizer)

    records, _ = load_set(cfg.run_dir, tokenizer)
    set_lengths = [r["length_" + cfg.reward.unit] for r in records]
    reward_all, stop_reward = step_rewards(records, set_lengths, tokenizer, cfg)     # (S,)
    if cfg.rl.advantage == "best_of_n":  # train on the best sample of each prompt group only
        records, reward_all = best_of_groups(records, reward_all)
    plan = step_plan(records, cfg, world=acc.num_processes)
    if cfg.rl.max_steps > 0:
        plan = plan[:cfg.rl.max_steps]
    trainer = Trainer(cfg, len(plan), tokenizer, acc, dtype)
    while trainer.step < len(plan):
        trainer.step_on(records, plan[trainer.step], reward_all, stop_reward, online=False)
        if trainer.checkpoint_due():
            trainer.save_checkpoint()
    return trainer.finish(samples=len(records))
