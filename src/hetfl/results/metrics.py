"""What a run writes: ``metrics.jsonl`` (one JSON object per evaluation) and ``summary.json``.

Both are written so that a run killed at any moment leaves readable files: every metrics
line is flushed as it is appended (a killed run loses at most a half-written last line,
which :func:`read_metrics` ignores), and the summary is replaced atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from hetfl.errors import HetflError

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"


def _plain(value: Any) -> Any:
    """``json`` fallback for numpy scalars and arrays (``np.float32``, ``np.int64``, ...)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_lines(path: Path, text: str) -> list[dict]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # half-written by a run that was killed: drop it
                break
            raise HetflError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise HetflError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer; each line is flushed, so a run killed mid-way keeps what it measured.

    Parameters
    ----------
    path
        The file to write. Its folder is created if needed.
    resume_from_round
        ``None`` (default) starts a fresh log, replacing any file already there. An integer
        ``k`` resumes a run from its checkpoint at round ``k``: the existing lines with
        ``round <= k`` are kept (the file is rewritten atomically) and later ones, measured
        after the checkpoint, are dropped because the resumed run measures them again.
    """

    def __init__(self, path: Path, resume_from_round: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_round is None:
            mode = "w"
        else:
            mode = "a"
            kept = []
            if self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= resume_from_round]
            _atomic_write(self.path, "".join(json.dumps(r, default=_plain) + "\n" for r in kept))
        self._file: IO[str] | None = open(self.path, mode, encoding="utf-8")

    def append(self, record: dict) -> None:
        """Write one evaluation as a JSON line and flush it."""
        if self._file is None:
            raise ValueError(f"{self.path}: metrics log is closed")
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """Read a ``metrics.jsonl``; a truncated last line (a killed run) is ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HetflError(f"{path}: metrics file not found") from None
    return _parse_lines(path, text)


def write_summary(path: Path, summary: dict) -> None:
    """Write ``summary.json`` atomically (temporary file + rename), indented."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(summary, indent=2, default=_plain) + "\n")


def read_summary(path: Path) -> dict:
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HetflError(f"{path}: summary file not found") from None
    except json.JSONDecodeError:
        raise HetflError(f"{path}: not valid JSON") from None
    if not isinstance(summary, dict):
        raise HetflError(f"{path}: expected a JSON object")
    return summary


def _is_run(folder: Path) -> bool:
    return (folder / SUMMARY_NAME).is_file() or (folder / METRICS_NAME).is_file()


def find_runs(root: Path) -> list[Path]:
    """Run folders (holding ``summary.json`` or ``metrics.jsonl``): ``root`` itself and any folder below it, sorted.

    Hidden folders (``.venv``, ``.git``, ...) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise HetflError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    runs = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        if _is_run(Path(folder)):
            runs.append(Path(folder))
    return sorted(runs)
