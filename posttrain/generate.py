"""The generation stage: sample completions from the SFT policy and store them for RL.

Reads `<out_dir>/sft/adapter`; writes `<out_dir>/generate/`:
  dataset/      a `datasets` folder, one row per sample: group (the prompt draw it came
                from; its samples_per_prompt samples share it), prompt, prompt_ids, completion,
                completion_ids (EOS included when sampled), logprobs (the SFT policy's, per
                completion token), stop_logprobs (its log-prob of EOS at each of those
                positions), ended_with_eos, truncated, length_chars, length_tokens,
                score (z-score of -length_chars over the whole set)
  stats.json    length mean / variance / std (chars and tokens), EOS rate, the tokenizer's
                fingerprint
Each finished batch is written to `parts/` first, so a killed run resumes at its batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain import modeling, sampling
from posttrain.config import Config, record_config
from posttrain.data import DataError, fit_prompt, load_rows, round_length, with_length_cue
from posttrain.io import atomic_dir, atomic_write_json, atomic_write_text


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: a generation set is only valid for
    the tokenizer whose ids it stores."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def prompt_pool(source: str, split: str, tokenizer, cfg: Config) -> tuple[list[str], list[list[int]]]:
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
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [round_length(lo + x * (hi - lo), cfg.data) for x in u]


def cue_prompts(texts: list[str], targets: list, tokenizer, cfg: Config) -> tuple[list[str], list[list[int]]]:
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


def sample_records(model, tokenizer, texts: list[str], prompts: list[list[int]],
                   group_size: int, max_new_tokens: int, generator, temperature=1.0,
                   top_p=1.0, targets: list | None = None) -> list[dict]:
    """Sample `group_size` completions per prompt; one record (a dict of plain values) each.
    `targets`: the length each prompt asks for (length-conditioned prompts), kept in the
    record as `target`."""
    samples = sampling.sample(model, prompts, group_size, max_new_tokens,
                              tokenizer.eos_token_id, tokenizer.pad_token_id, generator,
                              temperature, top_p)
    return records_of(samples, tokenizer, texts, prompts, targets)


def records_of(samples, tokenizer, texts: list[str], prompts: list[list[int]],
               targets: list | None = None) -> list[dict]:
    """The records (plain dicts) of sampled completions, one per sample."""
    records = []
    for s in samples:
        body = s.token_ids[:-1] if s.ended_with_eos else s.token_ids
        text = tokenizer.decode(body, skip_special_tokens=True)
        records.append({
            "group": s.prompt_index, "prompt": texts[s.prompt_index], "prompt_ids": list(prompts[s.prompt_index]),
            "completion": text, "completion_ids": list(s.token_ids),
            "logprobs": list(s.logprobs), "stop_logprobs": list(s.stop_logprobs),
            "ended_with_eos": s.ended_with_eos,
            "truncated": not s.ended_with_eos, "length_chars": len(text.strip()),
            "length_tokens": len(body),
            "target": targets[s.prompt_index] if targets else None})
    return records


def length_stats(records: list[dict]) -> dict:
    chars = [r["length_chars"] for r in records]
    tokens = [r["length_tokens"] for r in records]
    return {"count": len(records),
            "length_chars": {"mean": statistics.fmean(chars), "var": statistics.pvariance(chars),
                             "std": statistics.pstdev(chars)},
            "length_tokens": {"mean": statistics.fmean(tokens),
                              "var": statistics.pvariance(tokens),
                              "std": statistics.pstdev(tokens)},
            "eos_rate": sum(r["ended_with_eos"] for r in records) / len(records)}


def run(cfg: Config) -> dict:
    """Generate the RL set; returns its stats (also written to generate/stats.json)."""
    out = cfg.run_dir / "generate"
    if (out / "stats.json").is_file() and (out / "dataset").is_dir():
        print(f"generate: already finished in {out} "
              "(--force generates again, keeping it until the new set is written)")
        return json.loads((out / "stats.json").read_text())
    g = cfg.generate
    device = modeling.resolve_device(cfg.model)
    dtype = modeling.compute_dtype(cfg.model, device)
    tokenizer = modeling.load_tokenizer(cfg.model, str(cfg.run_dir / "sft" / "adapter")
                                        if (cfg.run_dir / "sft" / "adapter").is_dir() else None)
    texts, prompts = train_prompt_pool(tokenizer, cfg)
    vllm = None
    if g.backend == "vllm":  # fail before loading anything
        from posttrain import vllm_backend
        vllm_backend.check_available(device)
    model = modeling.load_policy(cfg, device, cfg.run_dir / "sft" / "adapter").eval()
    if g.backend == "vllm":
        vllm = vllm_backend.VLLMSampler(
            modeling.resolve_model_path(cfg.model), cfg.run_dir / "sft" / "adapter",
            cfg.lora.rank, dtype, cfg.seed, cfg.data.max_prompt_tokens + g.max_new_tokens + 8)

    # 1. draw prompts with replacement (seeded); each draw gives samples_per_prompt samples
    draws = torch.randint(len(prompts), (g.num_samples // g.samples_per_prompt,),
                          generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    if g.group_by_length:  # stable: equal lengths keep their draw order
        draws = sorted(draws, key=lambda i: len(prompts[i]))
    batches = [draws[i:i + g.batch_size] for i in range(0, len(draws), g.batch_size)]
    parts = out / "parts"
    t0, new_tokens = time.perf_counter(), 0
    bar = tqdm(batches, desc="generate", unit="batch")
    # vLLM samples; our unmerged SFT policy scores its samples (the exact training forward)
    sampler = (modeling.sampler(model, cfg.model, device, dtype) if vllm is None
               else contextlib.nullcontext(model))
    with sampler as policy:
        for b, idx in enumerate(bar):
            part = parts / f"{b:06d}.jsonl"
            if part.is_file():
                continue
            # 2. sample; each batch has its own seed, so a resumed run draws the same tokens
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + b)
            targets = draw_targets(len(idx), cfg, cfg.seed * 7 + b)
            batch_texts, batch_ids = ([texts[i] for i in idx], [prompts[i] for i in idx])
            if cfg.data.length_cue:  # each draw asks for its own length
                batch_texts, batch_ids = cue_prompts(batch_texts, targets, tokenizer, cfg)
            if vllm is not None:
                with modeling.autocast(device, dtype):
                    records = vllm.records(policy, tokenizer, batch_texts, batch_ids, cfg,
                                           cfg.seed * 100_003 + b, targets)
            else:
                records = sample_records(policy, tokenizer, batch_texts, batch_ids,
                                         g.samples_per_prompt, g.max_new_tokens, gen,
                                         g.temperature, g.top_p, targets)
            for r in records:  # group ids run over the whole set: one per prompt draw
                r["group"] += b * g.batch_size
            record_config(cfg, "generate")  # with the first output, not before
            atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in records))
            new_tokens += sum(len(r["completion_ids"]) for r in records)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    bar.close()

    # 3. assemble: score = z-score of -length over the whole set, then save
    records = [json.loads(line) for p in sorted(parts.glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    stats = length_stats(records)
    mean, std = stats["length_chars"]["mean"], stats["length_chars"]["std"]
    for r in records:
        r["score"] = (mean - r["length_chars"]) / std if std > 0 else 0.0
    stats.update(tokenizer=tokenizer_fingerprint(tokenizer), model=cfg.model.name,
                 temperature=g.temperature, top_p=g.top_p,
                 samples_per_prompt=g.samples_per_prompt, distinct_prompts=len(set(draws)),
                 seconds=round(time.perf_counter() - t0, 1),
                 new_tokens_per_s=round(new_tokens / max(time.perf_counter() - t0, 1e-9), 1))
    record_config(cfg, "generate")
    _save(records, stats, out, g.push_to_hub)
    shutil.rmtree(parts, ignore_errors=True)
    lc = stats["length_chars"]
    print(f"generate: {len(records)} samples, length {lc['mean']:.1f} ± {lc['std']:.1f} chars "
          f"(variance {lc['var']:.0f}), EOS rate {stats['eos_rate']:.2f}; {out / 'dataset'}")
    return stats


def _save(records: list[dict], stats: dict, out: Path, push_to_hub: str | None) -> None:
    import datasets

    ds = datasets.Dataset.from_list(records)
    with atomic_dir(out / "dataset") as tmp:
        ds.save_to_disk(str(tmp))
    atomic_write_json(out / "stats.json", stats)
    if push_to_hub:
        ds.push_to_hub(push_to_hub)


def load_set(run_dir: Path, tokenizer) -> tuple[list[dict], dict]:
    """The generated set and its stats, checked against the policy's tokenizer."""
    import datasets

    out = Path(run_dir) / "generate"
    if not (out / "stats.json").is_file():
        raise DataError(f"{out}: no generated set; run `posttrain generate` first")
    stats = json.loads((out / "stats.json").read_text())
    if stats.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{out}: the generated set was made with another tokenizer "
                        f"({stats.get('model')!r}); its token ids do not fit this policy. "
                        "Generate it again with this model.")
    if stats.get("temperature", 1.0) != 1.0 or stats.get("top_p", 1.0) != 1.0:
        raise DataError(f"{out}: sampled with generate.temperature={stats.get('temperature')} "
                        f"and generate.top_p={stats.get('top_p')}; the stored log-probs are the "
                        "policy's at temperature 1, so offline RL needs both at 1")
    try:
        records = datasets.load_from_disk(str(out / "dataset")).to_list()
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{out / 'dataset'}: cannot read the generated set ({e})") from e
    if not records or not any(len(r["completion_ids"]) for r in records):
        raise DataError(f"{out}: no sample has any completion token; nothing to train on")
    sizes = {}
    for i, r in enumerate(records):
        if not r["completion_ids"] or len(r["logprobs"]) != len(r["completion_ids"]):
            raise DataError(f"{out}: row {i}: empty completion_ids, or logprobs of another "
                            "length; regenerate the set")
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    if len(set(sizes.values())) > 1:
        raise DataError(f"{out}: prompt groups of unequal size {sorted(set(sizes.values()))}")
    return records, stats
