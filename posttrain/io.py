"""Atomic file and folder writes: a half-written output is never taken as done."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class InputFileError(ValueError):
    """A file a stage reads is missing or malformed; the message names it (and the line)."""


def read_jsonl(path: Path, required: tuple | dict = (), hint: str = "") -> list[dict]:
    """The JSON objects of a .jsonl file, one per non-blank line; a bad line, or one that
    lacks a `required` key (a dict: or whose value is not of the key's type), raises
    InputFileError naming the file and line (from 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: missing{'; ' + hint if hint else ''}")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not valid UTF-8 ({e.reason}){'; ' + hint if hint else ''}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: line {n} is not valid JSON ({e.msg})"
                                 f"{'; ' + hint if hint else ''}") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{path}: line {n}: expected a JSON object, got "
                                 f"{type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise InputFileError(f"{path}: line {n}: missing key(s) {missing}"
                                 f"{'; ' + hint if hint else ''}")
        for k, kind in (required.items() if isinstance(required, dict) else ()):
            if not isinstance(row[k], kind) or isinstance(row[k], bool):
                names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple)
                                                         else (kind,)))
                raise InputFileError(f"{path}: line {n}: {k!r} is {type(row[k]).__name__} "
                                     f"{json.dumps(row[k])[:60]}, expected {names}"
                                     f"{'; ' + hint if hint else ''}")
        rows.append(row)
    return rows


def read_json(path: Path, hint: str = "") -> dict:
    """A JSON object from `path`; malformed: InputFileError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: missing{'; ' + hint if hint else ''}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path}: not valid JSON ({e}){'; ' + hint if hint else ''}") \
            from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path}: expected a JSON object")
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # a swap below was interrupted: finish it
        os.replace(old, path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finished(stage: str, out: Path, marker: str, folder: str | None, again: str,
             new: str) -> dict | None:
    """The stage's result file (`marker`, e.g. summary.json) when it and the output folder
    it names (`folder`, or None) exist in `out`, after saying the stage is done; else None.
    `again` and `new` fill in what --force would do ("trains again", "adapter")."""
    out = Path(out)
    if not (out / marker).is_file() or (folder is not None and not (out / folder).is_dir()):
        return None
    result = read_json(out / marker, f"the {stage} stage's record is damaged: redo it with "
                       f"`posttrain {stage} --force` (the old {new} stays until the new one "
                       "is written)")
    print(f"{stage}: already finished in {out} "
          f"(--force {again}, keeping it until the new {new} is written)")
    return result
