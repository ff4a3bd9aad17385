"""The generated set on disk (`<out_dir>/generate/`): a `datasets` folder of rollout rows
plus stats.json, written atomically and checked when read back."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from posttrain.data import DataError
from posttrain.io import atomic_dir, atomic_write_json
from posttrain.evaluate.stats import length_summary
from posttrain.types import Rollout


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: a generation set is only valid for
    the tokenizer whose ids it stores."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def length_stats(rollouts: list[Rollout]) -> dict:
    """The set's length spread in chars and tokens, and its EOS rate."""
    return {"count": len(rollouts),
            "length_chars": length_summary([r.length_chars for r in rollouts]),
            "length_tokens": length_summary([r.length_tokens for r in rollouts]),
            "eos_rate": sum(r.ended_with_eos for r in rollouts) / len(rollouts)}


def save_set(rollouts: list[Rollout], stats: dict, out: Path, push_to_hub: str | None) -> None:
    """The dataset folder (atomically), then stats.json: the file that says it finished."""
    import datasets  # heavy: loaded when a set is written

    ds = datasets.Dataset.from_list([r.to_row() for r in rollouts])
    with atomic_dir(out / "dataset") as tmp:
        ds.save_to_disk(str(tmp))
    atomic_write_json(out / "stats.json", stats)
    if push_to_hub:
        ds.push_to_hub(push_to_hub)


def _check_stats(out: Path, stats: dict, tokenizer) -> None:
    if stats.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{out}: the generated set was made with another tokenizer "
                        f"({stats.get('model')!r}); its token ids do not fit this policy. "
                        "Generate it again with this model.")
    if stats.get("temperature", 1.0) != 1.0 or stats.get("top_p", 1.0) != 1.0:
        raise DataError(f"{out}: sampled with generate.temperature={stats.get('temperature')} "
                        f"and generate.top_p={stats.get('top_p')}; the stored log-probs are the "
                        "policy's at temperature 1, so offline RL needs both at 1")


def _check_rows(out: Path, rows: list[dict]) -> None:
    if not rows or not any(len(r["completion_ids"]) for r in rows):
        raise DataError(f"{out}: no sample has any completion token; nothing to train on")
    sizes: dict = {}
    for i, r in enumerate(rows):
        if not r["completion_ids"] or len(r["logprobs"]) != len(r["completion_ids"]):
            raise DataError(f"{out}: row {i}: empty completion_ids, or logprobs of another "
                            "length; regenerate the set")
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    if len(set(sizes.values())) > 1:
        raise DataError(f"{out}: prompt groups of unequal size {sorted(set(sizes.values()))}")


def load_set(run_dir: Path, tokenizer) -> tuple[list[Rollout], dict]:
    """The generated set and its stats, checked against the policy's tokenizer."""
    import datasets  # heavy: loaded when a set is read

    out = Path(run_dir) / "generate"
    if not (out / "stats.json").is_file():
        raise DataError(f"{out}: no generated set; run `posttrain generate` first")
    stats = json.loads((out / "stats.json").read_text())
    _check_stats(out, stats, tokenizer)
    try:
        rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{out / 'dataset'}: cannot read the generated set ({e})") from e
    _check_rows(out, rows)
    return [Rollout.from_row(r) for r in rows], stats


def set_lengths(run_dir: Path, unit: str) -> list:
    """The generated set's lengths in `unit` (the reward's statistics offline)."""
    import datasets  # heavy: loaded when a set is read

    return datasets.load_from_disk(str(Path(run_dir) / "generate" / "dataset"))["length_" + unit]
