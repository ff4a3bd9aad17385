"""What each sample and token is credited with: rewards (with the ending rule), the stop
credit of every position (the reward had the sample stopped there), and the per-token
advantages and loss weights of one step."""
from __future__ import annotations

from typing import Optional

import torch

from posttrain import objectives as O
from posttrain import rewards
from posttrain.config import Config
from posttrain.rewards import is_abrupt
from posttrain.types import Rollout, StopCredit


def prefix_texts(rollouts: list[Rollout], tokenizer) -> list[list[str]]:
    """For each sample and each completion position t, the text the completion would have
    been had it stopped before token t."""
    return [[tokenizer.decode(r.completion_ids[:t], skip_special_tokens=True)
             for t in range(len(r.completion_ids))] for r in rollouts]


def prefix_lengths(rollouts: list[Rollout], tokenizer, unit: str,
                   texts: list[list[str]] | None = None) -> list[list[int]]:
    """For each sample and each completion position t, the length of the completion had it
    stopped before token t (chars of the decoded prefix, or t tokens)."""
    if unit == "tokens":
        return [list(range(len(r.completion_ids))) for r in rollouts]
    texts = prefix_texts(rollouts, tokenizer) if texts is None else texts
    return [[len(t.strip()) for t in per] for per in texts]


def abrupt_flags(rollouts: list[Rollout]) -> list[bool]:
    return [is_abrupt(r.completion, r.truncated) for r in rollouts]


def step_rewards(rollouts: list[Rollout], set_lengths, tokenizer, cfg: Config):
    """Rewards (S,) of the samples (with reward.ending: the penalty for abrupt endings), and
    with rl.advantage=stop, group_stop or best_of_n_hazard/_distill the StopCredit of every position
    (else None)."""
    targets = [r.target for r in rollouts]
    if any(t is None for t in targets):
        targets = None   # plain prompts: the reward's own centre
    reward = rewards.compute([r.length(cfg.reward.unit) for r in rollouts], set_lengths,
                             cfg.reward, targets, abrupt_flags(rollouts))
    if cfg.rl.advantage not in ("stop", "group_stop", "best_of_n_hazard", "best_of_n_distill"):
        return reward, None
    texts = prefix_texts(rollouts, tokenizer)
    stop_reward, clean, lengths = [], [], []
    for k, p in enumerate(prefix_lengths(rollouts, tokenizer, cfg.reward.unit, texts)):
        stop_reward.append(rewards.compute(p, set_lengths, cfg.reward,
                                           None if targets is None else [targets[k]] * len(p)))
        clean.append(torch.tensor([not is_abrupt(t, False) for t in texts[k]], dtype=torch.bool))
        lengths.append(torch.tensor(p, dtype=torch.float32))
    counted = clean if cfg.reward.ending is not None else [torch.ones_like(c) for c in clean]
    return reward, StopCredit(stop_reward, clean, counted, lengths)


def hazard_credit(credit: StopCredit, ref_lengths, ref_rewards, cfg: Config) -> StopCredit:
    """The credit with, at every position, the log-odds best-of-N sampling of the SFT policy
    (N = rl.best_of_n) adds to stopping there (`objectives.best_of_n_hazard`; with
    rl.tilt_beta, the SFT policy tilted by exp(r / tilt_beta): `objectives.reward_hazard`):
    from the SFT samples' lengths and rewards; with reward.ending set, stopping mid-sentence
    is worth the penalty (rl.advantage=best_of_n_distill: there the teacher keeps the SFT
    policy's odds; pushing every mid-sentence p(EOS) down taught the policy to stop less
    everywhere, and its summaries ran on to the token limit)."""
    ref_r = torch.as_tensor(ref_rewards, dtype=torch.float32)
    ref_l = torch.as_tensor(ref_lengths, dtype=torch.float32)
    hazard = []
    for r, c, n in zip(credit.reward, credit.clean, credit.length):
        if cfg.reward.ending is not None:
            r = torch.where(c, r, torch.tensor(float(cfg.reward.ending)))
        shift = (O.reward_hazard(r, n, ref_r, ref_l, cfg.rl.tilt_beta) if cfg.rl.tilt_beta
                 else O.best_of_n_hazard(r, n, ref_r, ref_l, cfg.rl.best_of_n))
        if cfg.rl.advantage == "best_of_n_distill":   # mid-sentence: the SFT policy's odds
            shift = torch.where(c, shift, torch.zeros_like(shift))
        hazard.append(shift)
    return credit._replace(hazard=hazard)


def bond_shaped(reward: torch.Tensor, credit: Optional[StopCredit], reference: torch.Tensor,
                groups: list[int], cfg: Config) -> tuple[torch.Tensor, Optional[StopCredit]]:
    """With rl.bond, every reward (the samples' and the stop credit's) mapped to BOND's
    (N - 1) log F(r): F of `reference` (the SFT policy's rewards) with rl.bond=set, of the
    sample's own prompt group with rl.bond=group. `groups` (S,) are the samples' group ids."""
    if cfg.rl.bond == "none":
        return reward, credit
    n = cfg.rl.best_of_n
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)

    def ref_of(i: int) -> torch.Tensor:
        return reference if cfg.rl.bond == "set" else reward[members[groups[i]]]
    if cfg.rl.bond == "set":      # one F for every sample
        shaped = O.bond_reward(reward, reference, n)
    else:
        shaped = torch.stack([O.bond_reward(reward[i:i + 1], ref_of(i), n)[0]
                              for i in range(len(reward))])
    if credit is not None:
        credit = credit._replace(reward=[O.bond_reward(r, ref_of(i), n)
                                         for i, r in enumerate(credit.reward)])
    return shaped, credit


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
    elif cfg.rl.advantage in ("best_of_n_stop", "best_of_n_hazard", "best_of_n_distill"):
        adv = torch.zeros(token_seq.shape)
    else:  # seed (stop uses it for the ratio and clip metrics only)
        adv = O.per_token_advantages(reward, token_seq, cfg.rl.adv_clamp)
    if cfg.rl.advantage == "stop":  # stop credit is summed over a sample's positions
        return adv, torch.full(token_seq.shape, 1.0 / len(lengths))
    return adv, O.token_weights(token_seq, len(lengths), cfg.rl.loss_agg)
