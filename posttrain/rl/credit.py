"""What each sample and token is credited with: rewards (with the ending rule), the stop
credit of every position (the reward had the sample stopped there), and the per-token
advantages and loss weights of one step."""
from __future__ import annotations

import torch

from posttrain import objectives as O
from posttrain import rewards
from posttrain.config import Config
from posttrain.rewards import is_abrupt
from posttrain.types import Rollout, StopCredit


def prefix_texts(rollouts: list[Rollout], tokenizer) -> list[list[str]]:
    """For each sample and each completion position t, the text the completion would have
    been had it stopped before token t: decode(ids[:t]) for every t, decoded incrementally
    (each prefix's text is the last settled prefix's plus the new tail of a window that
    starts at the settled one before it: a few tokens per decode, not t)."""
    return [_prefix_texts(list(r.completion_ids), tokenizer) for r in rollouts]


def _prefix_texts(ids: list[int], tokenizer) -> list[str]:
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=True)

    texts, settled = [], ""      # settled = decode(ids[:r]); the window starts at p <= r
    p = r = 0
    for t in range(len(ids)):
        if t == r:
            texts.append(settled)
            continue
        head, window = decode(ids[p:r]), decode(ids[p:t])
        if not window.startswith(head):   # the tail rewrote the head: decode it all
            texts.append(decode(ids[:t]))
            continue
        texts.append(settled + window[len(head):])
        if not window.endswith("\ufffd"):   # a whole character: settle here
            settled, p, r = texts[-1], r, t
    return texts


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
    with rl.advantage=stop or group_stop the StopCredit of every position
    (else None)."""
    targets = [r.target for r in rollouts]
    if any(t is None for t in targets):
        targets = None   # plain prompts: the reward's own centre
    reward = rewards.compute([r.length(cfg.reward.unit) for r in rollouts], set_lengths,
                             cfg.reward, targets, abrupt_flags(rollouts))
    if cfg.rl.advantage not in ("stop", "group_stop"):
        return reward, None
    texts = prefix_texts(rollouts, tokenizer)
    stop_reward, clean = [], []
    for k, p in enumerate(prefix_lengths(rollouts, tokenizer, cfg.reward.unit, texts)):
        stop_reward.append(rewards.compute(p, set_lengths, cfg.reward,
                                           None if targets is None else [targets[k]] * len(p)))
        clean.append(torch.tensor([not is_abrupt(t, False) for t in texts[k]], dtype=torch.bool))
    counted = clean if cfg.reward.ending is not None else [torch.ones_like(c) for c in clean]
    return reward, StopCredit(stop_reward, clean, counted)


def step_advantages(reward: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor,
                    cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages (N,) and loss weights (N,) for one step's S samples.
    reward, lengths, group: (S,) reward, completion tokens and prompt-group id per sample."""
    token_seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)      # (N,)
    if cfg.rl.advantage in ("group", "group_stop"):
        if cfg.rl.baseline == "step":   # one baseline for the whole step: every prompt
            group = torch.zeros_like(group)
        adv = O.group_advantages(reward, group, cfg.rl.group_std)[token_seq]
    else:  # per_token (stop uses it for the ratio and clip metrics only)
        adv = O.per_token_advantages(reward, token_seq, cfg.rl.adv_clamp)
    if cfg.rl.advantage == "stop":  # stop credit is summed over a sample's positions
        return adv, torch.full(token_seq.shape, 1.0 / len(lengths))
    return adv, O.token_weights(token_seq, len(lengths), cfg.rl.loss_agg)
