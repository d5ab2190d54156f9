"""Where training metrics go: `workdir/metrics.jsonl` (one JSON object per record), TensorBoard
event files under `workdir/tensorboard` (tensorboardX, no TensorFlow needed), and a one-line
progress report on stdout.

A resumed run continues the same files: records after the step it resumed from (written after
the last checkpoint by the run that stopped) are dropped first, so the history reads as one run.
Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import tensorboardX


def _step_of(line: str) -> float:
    """The step of a record; infinity for a line torn by a crash mid-write (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _drop_after(path: pathlib.Path, step: int) -> None:
    """Rewrites `path` without records of steps > `step` (atomically: temp file + rename)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Appends step records to metrics.jsonl and TensorBoard, continuing after `start_step`."""

    def __init__(self, workdir: str | os.PathLike, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if self.enabled:
            _drop_after(self.path, start_step)
            self._jsonl = open(self.path, "a", encoding="utf-8")
            self._tb = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                                  purge_step=start_step + 1)

    def write(self, step: int, record: dict) -> None:
        """One record (JSON values; only the numbers go to TensorBoard)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, record: dict) -> str:
    """'step 120/1000 | loss 4.3210 | lr 3.00e-04 | grad norm 0.812 | 12,345 tok/s | MFU 41.2% | ETA 3m12s'
    (learning rate, tokens/s and MFU when the record has them)."""
    parts = [f"step {step}/{steps}", f"loss {record['loss']:.4f}"]
    if record.get("learning_rate") is not None:
        parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"grad norm {record['grad_norm']:.3f}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("step_time_s") is not None:
        parts.append(f"ETA {_duration((steps - step) * record['step_time_s'])}")
    return " | ".join(parts)
