"""The forward passes a loss or a sample needs, computing logits only where they are used:
completion positions of a batch, or every completion token of prompt groups whose prompt
runs once for the group."""
from __future__ import annotations

from typing import Sequence

import torch

from posttrain import objectives as O
from posttrain.data import collate
from posttrain.types import Example, LogProbs


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded into one batch: ids (B, P) and attention mask (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def completion_logits(model, batch, only_needed: bool = True) -> torch.Tensor:
    """Logits (N, V) at the positions of `batch.predict_mask`: the LM head never runs on
    prompt or padding positions (`only_needed=False`: it runs everywhere, then the rows
    are picked; same result, more time and memory)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=batch.predict_mask if only_needed else 0, use_cache=False)
    return out.logits if only_needed else out.logits[batch.predict_mask]


def _completion_inputs(flat: list[list[int]], pad_id: int, device):
    """Each completion but its last token, right-padded: ids (N, T-1) and mask (N, T-1)."""
    N, T = len(flat), max(len(c) for c in flat) - 1
    inputs = torch.full((N, T), pad_id, dtype=torch.long)
    cmask = torch.zeros((N, T), dtype=torch.long)
    for n, c in enumerate(flat):
        inputs[n, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        cmask[n, :len(c) - 1] = 1
    return inputs.to(device), cmask.to(device)


def _interleave(first: torch.Tensor, rest: torch.Tensor, flat: list, device) -> torch.Tensor:
    """For each sample its first-token logits (from the prompt pass), then the rest in
    order: (N_tokens, V)."""
    counts = torch.tensor([len(c) for c in flat], device=device)
    starts = torch.cumsum(counts, 0) - counts                          # (N,) row of first token
    rows = torch.ones(int(counts.sum()), dtype=torch.bool, device=device)
    rows[starts] = False
    logits = first.new_empty((int(counts.sum()), first.shape[-1]))
    logits[starts] = first
    logits[rows] = rest
    return logits


def grouped_logit_parts(model, prompts: list, completions: list, pad_id: int, device,
                        only_needed: bool = True) -> tuple:
    """The logits of every completion token of prompt groups whose prompt runs once for the
    group, in two parts: (first (B, V): each prompt's last position, which predicts the
    first token of each of its G samples; rest (M, V): every later token, sample by sample,
    or None when every completion is one token). The prompts run once (left-padded, cache
    on), the cache is repeated G times, and the completions run against it. Gradients flow
    through the repeated cache into the prompt pass, so the result (and its gradient)
    equals running each prompt + completion alone, at a fraction of the prompt cost.

    prompts: B token lists; completions: B groups of G token lists each (G equal across
    groups).
    """
    G = len(completions[0])
    if any(len(g) != G for g in completions):
        raise ValueError("every prompt group must hold the same number of completions")
    # 1. the prompt pass, logits at its last position (they predict each first token)
    ids, pmask = left_pad(prompts, pad_id, device)                      # (B, P)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                logits_to_keep=1)
    flat = [list(c) for g in completions for c in g]
    if max(len(c) for c in flat) == 1:
        return out.logits[:, -1], None
    # 2. the completions against the repeated cache: token j predicts token j+1
    cache = out.cache
    cache.batch_repeat_interleave(G)
    inputs, cmask = _completion_inputs(flat, pad_id, device)
    pos = ppos[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(inputs.shape[1],
                                                                 device=device)
    rest = model(input_ids=inputs,
                 attention_mask=torch.cat([pmask.repeat_interleave(G, 0), cmask], 1),
                 position_ids=pos, cache=cache, use_cache=True,
                 logits_to_keep=cmask.bool() if only_needed else 0).logits      # (M, V)
    return out.logits[:, -1], rest if only_needed else rest[cmask.bool()]


def grouped_completion_logits(model, prompts: list, completions: list, pad_id: int,
                              device, only_needed: bool = True) -> torch.Tensor:
    """grouped_logit_parts interleaved: logits (N, V) for every completion token of every
    sample, sample by sample (group-major), token by token."""
    first, rest = grouped_logit_parts(model, prompts, completions, pad_id, device, only_needed)
    first = first.repeat_interleave(len(completions[0]), 0)            # (samples, V)
    if rest is None:
        return first
    return _interleave(first, rest, [c for g in completions for c in g], device)


def _logprobs(logits, targets, stop_id, fused) -> LogProbs:
    if stop_id is not None:
        return LogProbs(*O.target_and_stop_logprobs(logits, targets, stop_id, fused))
    return LogProbs(O.gather_logprobs(logits, targets, fused), None)


def _grouped_logprobs(model, prompts, completions, pad_id, device, stop_id, fast) -> LogProbs:
    """Log-probs (N,) of the groups' completion tokens from grouped_logit_parts: each part
    reduced to its log-probs, then the (N,) vectors put in order (no (N, V) copy)."""
    only = fast is None or fast.completion_logits
    fused = fast is None or fast.fused_logprobs
    first, rest = grouped_logit_parts(model, prompts, completions, pad_id, device, only)
    flat = [c for g in completions for c in g]
    row = torch.arange(len(prompts), device=device).repeat_interleave(len(completions[0]))
    parts = [(first[row], [c[0] for c in flat])]
    if rest is not None:
        parts.append((rest, [t for c in flat for t in c[1:]]))
    out = [_logprobs(lg, torch.tensor(tg, device=device), stop_id, fused) for lg, tg in parts]
    if len(out) == 1:
        return out[0]
    a, b = out
    tokens = _interleave(a.tokens[:, None], b.tokens[:, None], flat, device)[:, 0]
    stop = None if a.stop is None else \
        _interleave(a.stop[:, None], b.stop[:, None], flat, device)[:, 0]
    return LogProbs(tokens, stop)


def policy_logprobs(model, samples: Sequence, groups: list, pad_id: int, device,
                    share_prompt: bool, stop_id: int | None = None, fast=None) -> LogProbs:
    """log pi(token) (N,) of every completion token of the groups' samples (each with
    `prompt_ids` and `completion_ids`: Rollouts or Examples), in order: each prompt once
    for its group (share_prompt), or each sample with its own prompt. With `stop_id`, also
    log pi(stop_id) at the same positions. `fast` (a FastConfig; None: all on) switches
    the LM-head slicing and the fused log-prob gather."""
    if share_prompt:
        return _grouped_logprobs(model, [samples[g[0]].prompt_ids for g in groups],
                                 [[samples[i].completion_ids for i in g] for g in groups],
                                 pad_id, device, stop_id, fast)
    batch = collate([Example(tuple(samples[i].prompt_ids), tuple(samples[i].completion_ids))
                     for g in groups for i in g], pad_id).to(device)
    logits = completion_logits(model, batch, fast is None or fast.completion_logits)
    targets = torch.tensor([t for g in groups for i in g for t in samples[i].completion_ids],
                           device=device)
    return _logprobs(logits, targets, stop_id, fast is None or fast.fused_logprobs)
