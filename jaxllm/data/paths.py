"""Where jaxllm keeps the data it builds locally (corpus cache, TFDS datasets).

In order of precedence: an explicit path, the `JAXLLM_DATA_DIR` environment variable,
`~/.cache/jaxllm`.
"""
from __future__ import annotations

import os
import pathlib

ENV_VAR = "JAXLLM_DATA_DIR"


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the data directory, created if missing."""
    if path is None:
        path = os.environ.get(ENV_VAR) or pathlib.Path.home() / ".cache" / "jaxllm"
    out = pathlib.Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out
