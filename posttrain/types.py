"""The data that passes between steps, typed and frozen: nothing adds keys along the way.

Shapes: P = prompt tokens, T = completion tokens of one sample (EOS included when it was
sampled), R x L = a padded batch, N = completion tokens of a batch (flattened), S = samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class Example:
    """One tokenized row: the prompt (P,), and the completion with EOS appended (T,)."""
    prompt_ids: tuple
    completion_ids: tuple

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class Batch(NamedTuple):
    """A training batch. R rows of L tokens; N = completion tokens predicted in the batch.

    input_ids:      (R, L) long
    attention_mask: (R, L) long, or None for a packed batch (positions carry the boundaries)
    position_ids:   (R, L) long, restarting at 0 at each example
    predict_mask:   (R, L) bool, True where the next token is a completion token
    targets:        (N,) long, the completion tokens in row-major order of predict_mask
    example_index:  (N,) long, which example of the batch each target belongs to
    """
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: torch.Tensor
    predict_mask: torch.Tensor
    targets: torch.Tensor
    example_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.numel() if self.attention_mask is None
                   else self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(*[t.to(device) if t is not None else None for t in self])


@dataclass(frozen=True)
class Sample:
    """One sampled completion of prompt `prompt_index`, as the sampler returns it.

    token_ids:      (T,) the sampled tokens, EOS included when the sample ended with it
    logprobs:       (T,) log pi(token) under the sampling model at temperature 1
    stop_logprobs:  (T,) log pi(EOS) at the same positions (what stopping there was worth)
    """
    prompt_index: int
    token_ids: tuple
    logprobs: tuple
    stop_logprobs: tuple
    ended_with_eos: bool


# the on-disk row's keys, in the order every writer uses
ROW_KEYS = ("group", "prompt", "prompt_ids", "completion", "completion_ids", "logprobs",
            "stop_logprobs", "ended_with_eos", "truncated", "length_chars", "length_tokens",
            "target")


@dataclass(frozen=True)
class Rollout:
    """One sample with what every stage reads from it: a row of the generated set, of an
    online round, of the evaluation's samples.

    group:          the prompt draw it came from; a draw's samples share it (and one prompt
                    pass); unique over a whole set or round
    prompt:         the prompt text as sampled (with its length cue, if any)
    prompt_ids:     (P,) its token ids
    completion:     (str) the decoded completion, EOS left out
    completion_ids: (T,) the sampled tokens, EOS included when sampled
    logprobs:       (T,) the sampling policy's log pi(token) (the PPO ratio's denominator)
    stop_logprobs:  (T,) its log pi(EOS) at the same positions
    ended_with_eos: it stopped by itself; truncated: it reached the token limit instead
    length_chars:   characters of the stripped completion; length_tokens: tokens, EOS out
    target:         the length its prompt asked for (length-conditioned prompts), else None
    score:          generate only: z-score of -length_chars over the whole set
    """
    group: int
    prompt: str
    prompt_ids: tuple
    completion: str
    completion_ids: tuple
    logprobs: tuple
    stop_logprobs: tuple
    ended_with_eos: bool
    truncated: bool
    length_chars: int
    length_tokens: int
    target: Optional[int] = None
    score: Optional[float] = None

    def length(self, unit: str) -> int:
        """The length in `unit` (reward.unit): `chars` or `tokens`."""
        return self.length_chars if unit == "chars" else self.length_tokens

    def regrouped(self, offset: int) -> "Rollout":
        """The same sample with its group id moved by `offset` (a batch's first draw)."""
        return dataclasses.replace(self, group=self.group + offset)

    def to_row(self) -> dict:
        """The plain row written to .jsonl parts and the generated set's dataset."""
        row = {k: getattr(self, k) for k in ROW_KEYS}
        for k in ("prompt_ids", "completion_ids", "logprobs", "stop_logprobs"):
            row[k] = list(row[k])
        if self.score is not None:
            row["score"] = self.score
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Rollout":
        """A rollout from a stored row (extra keys, e.g. an evaluation's `model`, ignored)."""
        values = {k: row[k] for k in ROW_KEYS if k in row}
        values.setdefault("stop_logprobs", ())   # sets from before stop log-probs existed
        for k in ("prompt_ids", "completion_ids", "logprobs", "stop_logprobs"):
            values[k] = tuple(values[k])
        return cls(**values, score=row.get("score"))


@dataclass(frozen=True)
class MicroBatch:
    """Prompt groups of one forward/backward pass; each group lists sample indices."""
    groups: tuple

    @property
    def samples(self) -> list[int]:
        return [i for g in self.groups for i in g]


@dataclass(frozen=True)
class Step:
    """One optimizer step: grad_accum micro-batches per process, for all processes."""
    micro: tuple

    @property
    def groups(self) -> list[tuple]:
        return [g for mb in self.micro for g in mb.groups]

    @property
    def samples(self) -> list[int]:
        return [i for mb in self.micro for i in mb.samples]


StepPlan = list  # list[Step]: the run's (or the round's) steps in order, fixed by the seed


class StopCredit(NamedTuple):
    """Per sample, at each completion position t: the reward had it stopped before token t
    (T,); whether stopping there would have ended cleanly (T,) bool; and whether the stop
    credit counts there (T,) bool: everywhere, or with reward.ending set only where
    stopping would have ended cleanly."""
    reward: list
    clean: list
    counted: list


class LogProbs(NamedTuple):
    """log pi of every completion token of a micro-batch (N,), and with a stop id asked
    for, log pi(stop) at the same positions (N,); else None."""
    tokens: torch.Tensor
    stop: Optional[torch.Tensor]
