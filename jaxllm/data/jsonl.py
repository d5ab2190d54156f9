"""JSON-lines input: one JSON object per line, blank lines skipped, and an error that names the
file and line of anything else."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path`; ValueError naming `path:line` for a
    line that is not JSON or not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
