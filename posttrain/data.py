"""Datasets -> prompt/completion rows -> token examples -> batches.

Batches never let a token attend to another example: `grouped` batches are right-padded
rows of one example each; `packed` batches put whole examples end to end in one row and
restart the position ids at each example, which transformers turns into a block-diagonal
causal mask.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import DataConfig
from posttrain.types import Batch, Example

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAMPLE_SPLITS = ("train", "validation")


class DataError(ValueError):
    """A dataset is missing, unreadable or malformed; the message names the file and row."""


# ---------------------------------------------------------------- rows

def sample_path(split: str) -> Path:
    """Path of a split of the bundled synthetic sample (`train` or `validation`)."""
    if split not in SAMPLE_SPLITS:
        raise DataError(f"the bundled sample has splits {SAMPLE_SPLITS}, not {split!r}")
    return Path(str(resources.files("posttrain") / "sample_data" / f"{split}.jsonl"))


def _load_dataset(source: str, split: str):
    import datasets  # heavy: loaded when a source is read

    datasets.disable_progress_bars()
    # what a bad file, folder or Hub id raises (pyarrow's errors are ValueErrors); anything
    # else is a bug and keeps its traceback
    LOAD_ERRORS = (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError)
    if source == "sample":
        source = str(sample_path(split))
    path = Path(source)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except LOAD_ERRORS as e:
            raise DataError(f"{source}: not a folder written by save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{source}: file is empty")
        if path.suffix.lower() != ".parquet":
            _check_utf8(path)
            if not path.read_bytes().strip():
                raise DataError(f"{source}: has no rows (the file holds only blank lines)")
        try:
            return datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()],
                                         data_files=str(path), split="train")
        except LOAD_ERRORS as e:
            cause = e.__cause__ or e
            raise DataError(f"{source}: could not read as {path.suffix} ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''})") from e
    if path.exists() or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: expected a .jsonl/.json/.parquet/.csv file or a save_to_disk "
                        "folder")
    try:
        return datasets.load_dataset(source, split=split)
    except LOAD_ERRORS as e:
        raise DataError(f"{source}: could not load Hub dataset split {split!r} "
                        f"({type(e).__name__}: {e})") from e


def _row_name(source: str, i: int) -> str:
    """Row i (from 0) of `source` as a message names it, from 1: its line in a .jsonl file
    (blank lines skipped by the reader are counted), else its row number."""
    path = Path(source)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with open(path, "rb") as f:
            lines = [n for n, line in enumerate(f, 1) if line.strip()]
        if i < len(lines):
            return f"line {lines[i]}"
    return f"row {i + 1}"


def _check_utf8(path: Path) -> None:
    """Text formats must be UTF-8; name the first bad line instead of failing later."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid UTF-8 ({e.reason} at byte "
                                f"{e.start}); could not read the file") from e


def load_rows(source: str, split: str, cfg: DataConfig) -> list[dict]:
    """Read `source` and return rows {"prompt", "completion"} (strings), checked."""
    ds = _load_dataset(source, split)
    named_split = source == "sample" or not Path(source).suffix
    where = f"{source}" + (f" (split {split})" if named_split else "")
    missing = [c for c in (cfg.prompt_field, cfg.completion_field) if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; it has {ds.column_names}. "
                        "Set data.prompt_field / data.completion_field to the right names.")
    if len(ds) == 0:
        raise DataError(f"{where}: has no rows")
    rows, empty = [], 0
    for i, (p, c) in enumerate(zip(ds[cfg.prompt_field], ds[cfg.completion_field])):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where}: {_row_name(source, i)}: empty or non-text "
                            f"{cfg.prompt_field!r}")
        if c is not None and not isinstance(c, str):
            raise DataError(f"{where}: {_row_name(source, i)}: {cfg.completion_field!r} is "
                            f"{type(c).__name__} {c!r}, expected text")
        if c is None or not c.strip():
            if cfg.empty_completions == "error":
                raise DataError(f"{where}: {_row_name(source, i)}: empty "
                                f"{cfg.completion_field!r} (set data.empty_completions=drop "
                                "to skip such rows)")
            empty += 1
            continue
        rows.append({"prompt": p, "completion": c})
    if empty:
        print(f"{where}: dropped {empty} row(s) with an empty {cfg.completion_field!r}")
    if not rows:
        raise DataError(f"{where}: no rows with a non-empty {cfg.completion_field!r}")
    return rows


# ---------------------------------------------------------------- length cues

def round_length(length: float, cfg: DataConfig) -> int:
    return max(cfg.length_round, int(round(length / cfg.length_round)) * cfg.length_round)


def with_length_cue(prompt: str, length: float, cfg: DataConfig) -> str:
    """The prompt asking for a summary of about `length` characters: its trailing
    `cue_marker` replaced by `length_cue` filled with the rounded length."""
    cue = cfg.length_cue.format(length=round_length(length, cfg))
    body = prompt.rstrip()
    if body.endswith(cfg.cue_marker):
        body = body[:-len(cfg.cue_marker)]
    else:
        body = body + "\n\n"
    return body + cue


def requested_length(prompt: str, cfg: DataConfig) -> Optional[int]:
    """The length a cued prompt asks for (None for a prompt without the cue)."""
    head, _, tail = cfg.length_cue.partition("{length}")
    m = re.search(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\s*$", prompt)
    return int(m.group(1)) if m else None


def cue_rows(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """SFT rows with each prompt asking for its own reference's length."""
    return [dict(r, prompt=with_length_cue(r["prompt"], len(r["completion"].strip()), cfg))
            for r in rows]


# ---------------------------------------------------------------- tokens

def fit_prompt(ids: list, cfg: DataConfig) -> Optional[list]:
    """Apply the overlong policy: the ids, a middle-truncated copy, or None (drop)."""
    if len(ids) <= cfg.max_prompt_tokens:
        return ids
    if cfg.overlong == "drop":
        return None
    head = cfg.max_prompt_tokens - cfg.truncate_keep_tail
    return ids[:head] + ids[-cfg.truncate_keep_tail:]


def tokenize_rows(rows: list[dict], tokenizer, cfg: DataConfig) -> tuple[list[Example], dict]:
    """Tokenize rows into Examples; returns them and a report of what the policies dropped."""
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    report = {"rows": len(rows), "prompt_dropped": 0, "prompt_truncated": 0,
              "completion_dropped": 0}
    examples = []
    for p, c in zip(prompts, completions):
        fitted = fit_prompt(p, cfg)
        if fitted is None:
            report["prompt_dropped"] += 1
            continue
        report["prompt_truncated"] += len(fitted) != len(p)
        c = list(c) + [tokenizer.eos_token_id]
        if len(c) > cfg.max_completion_tokens:
            report["completion_dropped"] += 1
            continue
        examples.append(Example(tuple(fitted), tuple(c)))
    report["kept"] = len(examples)
    return examples, report


# ---------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int, packed: bool = False) -> Batch:
    """Build a Batch: one right-padded row per example, or all examples in one packed row."""
    seqs = [list(e.prompt_ids) + list(e.completion_ids) for e in examples]
    if packed:
        seqs = [[t for s in seqs for t in s]]
    R, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    predict_mask = torch.zeros((R, T), dtype=torch.bool)
    example_index = []
    for r, s in enumerate(seqs):
        input_ids[r, :len(s)] = torch.tensor(s)
        attention_mask[r, :len(s)] = 1
    offset, row = 0, 0
    for i, e in enumerate(examples):
        n, P = len(e), len(e.prompt_ids)
        position_ids[row, offset:offset + n] = torch.arange(n)
        # position t predicts token t+1: the completion is predicted from P-1 .. n-2
        predict_mask[row, offset + P - 1:offset + n - 1] = True
        example_index += [i] * len(e.completion_ids)
        if packed:
            offset += n
        else:
            row += 1
    targets = input_ids[:, 1:][predict_mask[:, :-1]]
    return Batch(input_ids, None if packed else attention_mask, position_ids, predict_mask,
                 targets, torch.tensor(example_index, dtype=torch.long))


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group_batches: int = 32) -> list[list[int]]:
    """Shuffle, then sort within windows of `group_batches` batches so each batch holds
    examples of similar length (little padding), then shuffle the batch order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]
