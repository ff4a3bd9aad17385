"""The prompts sampling draws from: held-out rows, the training pool, and length cues."""
from __future__ import annotations

import torch

from posttrain import seeds
from posttrain.config import Config
from posttrain.data import DataError, fit_prompt, load_rows, round_length, with_length_cue


def heldout_rows(source: str, split: str, tokenizer, cfg: Config,
                 length: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """Rows of a data source whose prompt fits (the overlong policy applied), with the
    prompt's token ids. With length-conditioned prompts (data.length_cue) the ids are those
    of the prompt asking for `length` (default: the middle of rl.target_range)."""
    rows = load_rows(source, split, cfg.data)
    texts = [r["prompt"] for r in rows]
    if cfg.data.length_cue:
        length = length or sum(cfg.rl.target_range) / 2
        texts = [with_length_cue(t, length, cfg.data) for t in texts]
    ids = tokenizer(texts)["input_ids"]
    kept = [(r, fitted) for r, p in zip(rows, ids)
            if (fitted := fit_prompt(p, cfg.data)) is not None]
    if not kept:
        raise DataError(f"{source}: no prompt fits data.max_prompt_tokens="
                        f"{cfg.data.max_prompt_tokens}")
    return [k[0] for k in kept], [k[1] for k in kept]


def prompt_pool(source: str, split: str, tokenizer,
                cfg: Config) -> tuple[list[str], list[list[int]]]:
    """Prompts of a data source, tokenized, with the overlong policy applied."""
    rows, ids = heldout_rows(source, split, tokenizer, cfg)
    return [r["prompt"] for r in rows], ids


def train_prompt_pool(tokenizer, cfg: Config) -> tuple[list[str], list[list[int]]]:
    """The prompts generate and online RL draw from: generate.prompts (or data.train), at most
    the first generate.max_prompts that fit."""
    g = cfg.generate
    texts, ids = prompt_pool(g.prompts or cfg.data.train, g.prompts_split or cfg.data.train_split,
                             tokenizer, cfg)
    return texts[:g.max_prompts], ids[:g.max_prompts]


def draw_targets(n: int, cfg: Config, seed: int) -> list[int | None]:
    """The length each of n prompts asks for: generate.target, or drawn uniformly from
    rl.target_range (seeded); None for plain prompts."""
    if not cfg.data.length_cue:
        return [None] * n
    if cfg.generate.target is not None:
        return [round_length(cfg.generate.target, cfg.data)] * n
    lo, hi = cfg.rl.target_range
    u = torch.rand(n, generator=seeds.generator(seed)).tolist()
    return [round_length(lo + x * (hi - lo), cfg.data) for x in u]


def cue_prompts(texts: list[str], targets: list, tokenizer,
                cfg: Config) -> tuple[list[str], list[list[int]]]:
    """Each plain prompt rewritten to ask for its target length, and its token ids (a cue
    that pushes a prompt past data.max_prompt_tokens costs it tokens from the middle).
    Prompts with target None are returned as they are."""
    if not cfg.data.length_cue:
        return texts, tokenizer(texts)["input_ids"]
    texts = [t if L is None else with_length_cue(t, L, cfg.data) for t, L in zip(texts, targets)]
    limit, keep = cfg.data.max_prompt_tokens, cfg.data.truncate_keep_tail
    ids = [p if len(p) <= limit else p[:limit - keep] + p[-keep:]
           for p in tokenizer(texts)["input_ids"]]
    return texts, ids
