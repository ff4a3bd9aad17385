"""One sink for training metrics: `metrics.jsonl` in the run directory, plus TensorBoard
when it is installed."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from posttrain.io import atomic_write_text, read_jsonl


class MetricsLogger:
    """Append one JSON object per call to `<run_dir>/metrics.jsonl` (flushed every line)."""

    def __init__(self, run_dir: Path, stage: str, enabled: bool = True,
                 resume_step: int | None = None):
        """resume_step: this stage (re)starts after that step (-1: from scratch); its rows
        logged beyond it by an earlier run are dropped, so every step appears once."""
        self.stage = stage
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                keep = [r for r in read_metrics(run_dir) if not _beyond(r, stage, resume_step)]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            self._file = open(self.path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter  # heavy: optional
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / stage))
            except ImportError:  # tensorboard not installed: the jsonl file is the record
                self._tb = None

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
            if self._tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _beyond(row: dict, stage: str, step: int) -> bool:
    return row.get("stage") == stage and row.get("step", 0) > step


def read_metrics(run_dir: Path, stage: str | None = None) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (of `stage`); a damaged row: InputFileError
    naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = read_jsonl(path, {"stage": str, "step": int},
                      "the training log: each row holds its stage and step (fix or delete "
                      "that line; the stages' own outputs do not depend on it)")
    return [r for r in rows if stage is None or r.get("stage") == stage]
