"""A stage's "already finished" check: its outputs stay as they are, and it says so."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from posttrain.io import read_json


def finished(stage: str, out: Path, marker: str, folder: Optional[str], again: str,
             new: str) -> Optional[dict]:
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
