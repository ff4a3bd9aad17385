"""The one seeded sampling loop every stage uses: prompts in batches (jobs), each batch
sampled with its generator, its samples' groups moved to the batch's first prompt, and
finished batches optionally kept on disk (parts) so a killed run resumes at its batch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from posttrain.config import Config
from posttrain.io import atomic_write_text
from posttrain.rollout import hf
from posttrain.rollout.prompts import cue_prompts
from posttrain.types import Rollout


@dataclass(frozen=True)
class Job:
    """One sampling batch: its number, the position of its first prompt (its samples'
    groups start there), its prompts (texts, token ids) and the lengths they ask for."""
    index: int
    start: int
    texts: list
    ids: list
    targets: list


def make_jobs(texts: list, ids: list, batch_size: int, tokenizer, cfg: Config,
              targets_of: Optional[Callable] = None, rank: int = 0,
              world: int = 1) -> list[Job]:
    """Batches of `batch_size` prompts; with `world` processes, this rank's share (every
    world-th batch from its rank). `targets_of(index, start, n)` gives a batch's requested
    lengths; with data.length_cue its prompts are rewritten to ask for them."""
    out = []
    for start in range(rank * batch_size, len(ids), world * batch_size):
        b, n = start // batch_size, len(ids[start:start + batch_size])
        j_texts, j_ids = texts[start:start + batch_size], ids[start:start + batch_size]
        want = [None] * n if targets_of is None else targets_of(b, start, n)
        if cfg.data.length_cue and targets_of is not None:  # each prompt asks for its length
            j_texts, j_ids = cue_prompts(j_texts, want, tokenizer, cfg)
        out.append(Job(b, start, j_texts, j_ids, want))
    return out


def rollouts_of(samples, tokenizer, texts: list[str], prompts: list,
                targets: list | None = None) -> list[Rollout]:
    """The Rollouts of sampled completions (hf.Sample), one per sample."""
    out = []
    for s in samples:
        body = s.token_ids[:-1] if s.ended_with_eos else s.token_ids
        text = tokenizer.decode(body, skip_special_tokens=True)
        out.append(Rollout(
            group=s.prompt_index, prompt=texts[s.prompt_index],
            prompt_ids=tuple(prompts[s.prompt_index]), completion=text,
            completion_ids=tuple(s.token_ids), logprobs=tuple(s.logprobs),
            stop_logprobs=tuple(s.stop_logprobs), ended_with_eos=s.ended_with_eos,
            truncated=not s.ended_with_eos, length_chars=len(text.strip()),
            length_tokens=len(body), target=targets[s.prompt_index] if targets else None))
    return out


def sample_rollouts(model, tokenizer, texts: list[str], prompts: list, group_size: int,
                    max_new_tokens: int, generator, temperature=1.0, top_p=1.0,
                    targets: list | None = None) -> list[Rollout]:
    """Sample `group_size` completions per prompt with posttrain's sampler. `targets`: the
    length each prompt asks for (length-conditioned prompts), kept as `target`."""
    samples = hf.sample(model, prompts, group_size, max_new_tokens, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, generator, temperature, top_p)
    return rollouts_of(samples, tokenizer, texts, prompts, targets)


def hf_draw(policy, tokenizer, group_size: int, max_new_tokens: int, temperature: float,
            top_p: float) -> Callable:
    """A job's samples from `policy` with posttrain's sampler: draw(job, generator)."""
    def draw(job: Job, generator) -> list[Rollout]:
        return sample_rollouts(policy, tokenizer, job.texts, job.ids, group_size,
                               max_new_tokens, generator, temperature, top_p, job.targets)
    return draw


class Parts:
    """Finished batches as .jsonl files in `folder`, one per job (named by `name(job)`);
    `before_write()` runs before each write (a stage records its config with its first
    output)."""

    def __init__(self, folder: Path, name: Callable, before_write: Callable = lambda: None):
        self.folder, self.name, self.before_write = Path(folder), name, before_write

    def load(self, job: Job) -> Optional[list[Rollout]]:
        path = self.folder / self.name(job)
        if not path.is_file():
            return None
        return [Rollout.from_row(json.loads(line)) for line in path.read_text().splitlines()]

    def save(self, job: Job, rollouts: list[Rollout]) -> None:
        self.before_write()
        atomic_write_text(self.folder / self.name(job),
                          "".join(json.dumps(r.to_row()) + "\n" for r in rollouts))


def collect(jobs: list[Job], draw: Callable, generator_for: Callable,
            parts: Optional[Parts] = None, on_batch: Optional[Callable] = None) -> list[Rollout]:
    """Sample every job in order: draw(job, generator_for(job)), its groups moved to the
    job's first prompt, kept in `parts` when given (a job already there is read back, not
    sampled). `on_batch(job, rollouts, fresh)` follows each job. A shared generator
    (generator_for returning one object) gives the draws of one sequential pass."""
    out = []
    for job in jobs:
        batch = parts.load(job) if parts is not None else None
        fresh = batch is None
        if fresh:
            batch = [r.regrouped(job.start) for r in draw(job, generator_for(job))]
            if parts is not None:
                parts.save(job, batch)
        out += batch
        if on_batch is not None:
            on_batch(job, batch, fresh)
    return out
