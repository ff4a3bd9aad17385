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


def completion_logits(model, batch) -> torch.Tensor:
    """Logits (N, V) at the positions of `batch.predict_mask`: the LM head never runs on
    prompt or padding positions (the tests check it against running it everywhere)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, logits_to_keep=batch.predict_mask,
                 use_cache=False).logits


def _completion_inputs(flat: list[list[int]], pad_id: int, device):
    """Each completion but its last token, right-padded: ids (N, T-1) and mask (N, T-1)."""
    N, T = len(flat), max(len(c) for c in flat) - 1
    inputs = torch.full((N, T), pad_id, dtype=torch.long)
    cmask = torch.zeros((N, T), dtype=torch.long)
    for n, c in enumerate(flat):
        inputs[n, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        cmask[n, :len(c) - 1] = 1
    return inputs.to(device), cmask.to(device)


CALL_COST = 64  # a completion pass's fixed cost, in padded token rows (length_chunks)


def length_chunks(lengths: list[int], call_cost: int | None = None) -> list[list[int]]:
    """Sample indices in chunks of similar length (longest first), for completion passes
    that each pad only to their own longest: the split that minimises the padded rows plus
    `call_cost` per pass (0 chunks the most, a huge cost keeps one pass)."""
    call_cost = CALL_COST if call_cost is None else call_cost
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n          # best[j]: the first j samples, chunked
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                     # one chunk holds order[i:j]; its longest: i
            cost = best[i] + call_cost + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def grouped_logit_parts(model, prompts: list, completions: list, pad_id: int, device,
                        prompt_grad: bool = True) -> tuple:
    """The logits of every completion token of prompt groups whose prompt runs once for the
    group: (first (B, V): each prompt's last position, which predicts the first token of
    each of its G samples; parts: [(sample indices, logits (M, V) of their later tokens,
    sample by sample)]). The prompts run once (left-padded, cache on); the completions run
    against the cache repeated for each sample, in passes of samples of similar length
    (length_chunks), each padded only to its own longest. The
    gradients flow through the cache into the prompt pass, so the result (and its gradient)
    equals running each prompt + completion alone, at a fraction of the prompt cost.

    `prompt_grad=False` (rl.prompt_grad): the prompt but its last token runs without
    gradient (no activations kept, no backward through it), and each sample's pass starts at
    its prompt's last token, so every completion token's logits (the first included) come
    from a pass that has them: (None, parts covering every token). The logits are the same;
    the gradient is the part that flows through the completion positions (and the prompt's
    last), none through the prompt's keys and values.

    prompts: B token lists; completions: B groups of G token lists each (G equal across
    groups). Samples are numbered group-major.
    """
    G = len(completions[0])
    if any(len(g) != G for g in completions):
        raise ValueError("every prompt group must hold the same number of completions")
    ids, pmask = left_pad(prompts, pad_id, device)                      # (B, P)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    flat = [list(c) for g in completions for c in g]
    if not prompt_grad:
        return None, _detached_prompt_parts(model, ids, pmask, ppos, flat, G, pad_id, device)
    # 1. the prompt pass, logits at its last position (they predict each first token)
    out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                logits_to_keep=1)
    later = [len(c) - 1 for c in flat]
    parts = [_completion_pass(model, out.cache, [i for i in c if later[i]], flat, G, pmask,
                              ppos, pad_id, device) for c in length_chunks(later)]
    return out.logits[:, -1], [p for p in parts if p is not None]


def _detached_prompt_parts(model, ids, pmask, ppos, flat, G, pad_id, device):
    """grouped_logit_parts with prompt_grad=False: the prompts but their last token in one
    no-grad pass (its cache), then each sample's last prompt token + completion but its last
    token against its prompt's cache rows; every part holds all of its samples' tokens."""
    cache = None
    if ids.shape[1] > 1:
        none = torch.empty(0, dtype=torch.long, device=device)      # the cache, no logits
        with torch.no_grad():
            cache = model(input_ids=ids[:, :-1], attention_mask=pmask[:, :-1],
                          position_ids=ppos[:, :-1], use_cache=True, logits_to_keep=none).cache
    lead = ids[:, -1].tolist()            # each prompt's last token (left padding)
    seqs = [[lead[i // G]] + c for i, c in enumerate(flat)]
    return [_completion_pass(model, cache, c, seqs, G, pmask[:, :-1], None, pad_id, device,
                             start=ppos[:, -1:]) for c in length_chunks([len(c) for c in flat])
            if c]


def _completion_pass(model, cache, samples, flat, G, pmask, ppos, pad_id, device, start=None):
    """2. these samples' completions against their prompts' cache rows: token j predicts
    token j+1; (samples, logits) or None when none has a later token. `start` (B, 1): the
    first input token's position (default: after the cached prompt, whose positions `ppos`
    then gives; with `start`, ppos is not read); `cache` None: no cached tokens (pmask then
    has no columns)."""
    from transformers import DynamicCache  # heavy: loaded on first use

    if not samples:
        return None
    rows = torch.tensor([i // G for i in samples], device=device)
    inputs, cmask = _completion_inputs([flat[i] for i in samples], pad_id, device)
    pos = (ppos[rows, -1:] + 1 if start is None else start[rows]) + \
        torch.arange(inputs.shape[1], device=device)
    mine = None
    if cache is not None:
        config = getattr(getattr(model, "module", model), "config", None)   # DDP wraps it
        mine = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows),
                                             layer.values.index_select(0, rows))
                                            for layer in cache.layers], config=config)
    logits = model(input_ids=inputs, attention_mask=torch.cat([pmask[rows], cmask], 1),
                   position_ids=pos, cache=mine, use_cache=mine is not None,
                   logits_to_keep=cmask.bool()).logits          # (M, V)
    return samples, logits


def _token_order(flat: list, parts: list, device, first: bool = True) -> torch.Tensor:
    """Where each row of [first tokens; the parts' rows] (`first=False`: the parts' rows
    alone, each part holding its samples' every token) goes among the samples' tokens in
    order (sample by sample, token by token): the permutation that puts them there."""
    counts = torch.tensor([len(c) for c in flat])
    starts = torch.cumsum(counts, 0) - counts
    skip = 1 if first else 0
    dest = [starts] if first else []
    for samples, _ in parts:
        dest += [torch.arange(starts[i] + skip, starts[i] + counts[i]) for i in samples]
    return torch.argsort(torch.cat(dest)).to(device)


def grouped_completion_logits(model, prompts: list, completions: list, pad_id: int,
                              device) -> torch.Tensor:
    """grouped_logit_parts in order: logits (N, V) for every completion token of every
    sample, sample by sample (group-major), token by token."""
    first, parts = grouped_logit_parts(model, prompts, completions, pad_id, device)
    flat = [c for g in completions for c in g]
    first = first.repeat_interleave(len(completions[0]), 0)            # (samples, V)
    return torch.cat([first] + [lg for _, lg in parts])[_token_order(flat, parts, device)]


def _logprobs(logits, targets, stop_id) -> LogProbs:
    if stop_id is not None:
        return LogProbs(*O.target_and_stop_logprobs(logits, targets, stop_id))
    return LogProbs(O.gather_logprobs(logits, targets), None)


def _grouped_logprobs(model, prompts, completions, pad_id, device, stop_id,
                      prompt_grad: bool = True) -> LogProbs:
    """Log-probs (N,) of the groups' completion tokens from grouped_logit_parts: each part
    reduced to its log-probs, then the (N,) vectors put in order (no (N, V) copy)."""
    first, parts = grouped_logit_parts(model, prompts, completions, pad_id, device, prompt_grad)
    flat = [c for g in completions for c in g]
    pieces = []
    if first is not None:
        row = torch.arange(len(prompts), device=device).repeat_interleave(len(completions[0]))
        pieces.append((first[row], [c[0] for c in flat]))
    skip = 0 if first is None else 1
    pieces += [(lg, [t for i in samples for t in flat[i][skip:]]) for samples, lg in parts]
    out = [_logprobs(lg, torch.tensor(tg, device=device), stop_id) for lg, tg in pieces]
    order = _token_order(flat, parts, device, first is not None)
    tokens = torch.cat([o.tokens for o in out])[order]
    stop = None if stop_id is None else torch.cat([o.stop for o in out])[order]
    return LogProbs(tokens, stop)


def policy_logprobs(model, samples: Sequence, groups: list, pad_id: int, device,
                    share_prompt: bool, stop_id: int | None = None,
                    prompt_grad: bool = True) -> LogProbs:
    """log pi(token) (N,) of every completion token of the groups' samples (each with
    `prompt_ids` and `completion_ids`: Rollouts or Examples), in order: each prompt once
    for its group (share_prompt), or each sample with its own prompt. With `stop_id`, also
    log pi(stop_id) at the same positions. `prompt_grad=False` (shared prompt only): no
    gradient through the prompt's keys and values (grouped_logit_parts)."""
    if share_prompt:
        return _grouped_logprobs(model, [samples[g[0]].prompt_ids for g in groups],
                                 [[samples[i].completion_ids for i in g] for g in groups],
                                 pad_id, device, stop_id, prompt_grad)
    if not prompt_grad:
        raise ValueError("prompt_grad=False needs the shared prompt pass (share_prompt)")
    batch = collate([Example(tuple(samples[i].prompt_ids), tuple(samples[i].completion_ids))
                     for g in groups for i in g], pad_id).to(device)
    targets = torch.tensor([t for g in groups for i in g for t in samples[i].completion_ids],
                           device=device)
    return _logprobs(completion_logits(model, batch), targets, stop_id)
