"""posttrain's sampler (`generate.backend: hf`): one shared prompt pass per group,
recording the policy's log-probabilities.

Each prompt is encoded once (left-padded, KV cache on); the cache is then repeated G times
so the G completions of a prompt share that pass. Rows that have produced EOS leave the
batch (their cache rows are dropped), so the loop's cost follows the live rows, not the
longest sample. The log-probability recorded for each sampled token is that of the model's
own distribution (temperature 1), which is what the RL ratio and KL need.
"""
from __future__ import annotations

import torch

from posttrain.model.forward import left_pad
from posttrain.types import Sample


def _next_token_dist(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities (n, V) after temperature and nucleus (top_p) filtering."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p          # keep the smallest set reaching top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row, drawn with probability `probs` (n, V): inverse CDF with one uniform
    per row (torch.multinomial draws an exponential per vocabulary entry: far slower)."""
    cdf = probs.cumsum(-1)                                                       # (n, V)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return pick.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, eos_id: int,
           pad_id: int, generator: torch.Generator, temperature: float = 1.0,
           top_p: float = 1.0) -> list[Sample]:
    """Sample `group_size` completions for each prompt; returns them prompt by prompt."""
    device = generator.device
    # 1. one prompt pass for the whole batch, logits at the last position only
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]                      # (B, V)
    # 2. share it across the group: repeat the cache rows G times
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        mask = mask.repeat_interleave(group_size, 0)
        logits = logits.repeat_interleave(group_size, 0)
        positions = positions.repeat_interleave(group_size, 0)
    next_pos = positions[:, -1] + 1                                    # (N,)
    live = torch.arange(logits.shape[0], device=device)               # row -> sample index
    tokens = [[] for _ in range(logits.shape[0])]
    logps = [[] for _ in range(logits.shape[0])]
    stops = [[] for _ in range(logits.shape[0])]
    # 3. decode; finished rows leave the batch
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)                # (n, V)
        probs = logp.exp() if temperature == 1.0 and top_p >= 1.0 else \
            _next_token_dist(logits.float(), temperature, top_p)
        tok = _draw(probs, generator)                                              # (n,)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        for s, k, lp, ls in zip(live.tolist(), tok.tolist(), tok_logp.tolist(),
                                logp[:, eos_id].tolist()):
            tokens[s].append(k)
            logps[s].append(lp)
            stops[s].append(ls)
        keep = tok != eos_id
        if t == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            idx = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(idx)
            live, tok, mask, next_pos = live[idx], tok[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        next_pos = next_pos + 1
    return [Sample(i // group_size, tuple(tokens[i]), tuple(logps[i]), tuple(stops[i]),
                   bool(tokens[i]) and tokens[i][-1] == eos_id) for i in range(len(tokens))]
