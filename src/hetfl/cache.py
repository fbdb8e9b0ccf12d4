"""Where hetfl keeps what it computes once and reuses: the pretrained TinyLM base, generated MNIST-1D samples."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$HETFL_CACHE``, else ``~/.cache/hetfl``."""
    return Path(os.environ.get("HETFL_CACHE") or Path.home() / ".cache" / "hetfl").expanduser()
