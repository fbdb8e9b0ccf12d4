"""An index of past runs, in SQLite files beside them, so ``hetfl runs`` can list and filter them.

Each run is recorded in ``hetfl-runs.sqlite`` in the folder that holds the run folder
(``results/`` for ``results/my-run``; the comparison folder for the runs of a
``hetfl compare``). :func:`list_runs` finds every such file under a root and merges them.
A row is keyed by the run folder's absolute path, so re-running into the same folder
replaces its row. A results folder that was moved or copied still lists: a stored path
that no longer exists is looked up again beside the index file.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from rich.table import Table
from rich.text import Text

from hetfl.errors import HetflError
from hetfl.results.variant import run_variant

INDEX_NAME = "hetfl-runs.sqlite"

# column name -> SQLite type, in table order; ``path`` is the key
COLUMNS: dict[str, str] = {
    "path": "TEXT PRIMARY KEY",
    "name": "TEXT",
    "algorithm": "TEXT",
    "status": "TEXT",
    "dataset": "TEXT",
    "n_clients": "INTEGER",
    "seed": "INTEGER",
    "final_accuracy": "REAL",
    "best_accuracy": "REAL",
    "rounds": "INTEGER",
    "sim_time_s": "REAL",
    "wall_time_s": "REAL",
    "bytes_up": "INTEGER",
    "bytes_down": "INTEGER",
    "time_to_target_s": "REAL",
    "started_at": "TEXT",
}
_SCHEMA = "CREATE TABLE IF NOT EXISTS runs ({})".format(", ".join(f"{c} {t}" for c, t in COLUMNS.items()))
_TIMEOUT_S = 30.0  # how long a writer waits for another to finish before giving up


def index_path(run_dir: Path) -> Path:
    """The index file a run is recorded in: ``hetfl-runs.sqlite`` in the run folder's parent."""
    return Path(run_dir).resolve().parent / INDEX_NAME


@contextlib.contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    """One connection, committed on success, always closed; SQLite errors become one-line HetflErrors."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=_TIMEOUT_S)) as conn:
            with conn:
                yield conn
    except sqlite3.DatabaseError as err:
        raise HetflError(f"{db}: run index unusable ({err})") from None


def record_run(run_dir: Path, summary: dict) -> None:
    """Insert or replace the row of ``run_dir`` from its ``summary`` (a summary.json mapping)."""
    run_dir = Path(run_dir).resolve()
    row = {column: summary.get(column) for column in COLUMNS}
    row["path"] = str(run_dir)
    for column in ("final_accuracy", "best_accuracy", "sim_time_s", "wall_time_s", "time_to_target_s"):
        if isinstance(row[column], float) and not math.isfinite(row[column]):
            row[column] = None
    db = index_path(run_dir)
    names = ", ".join(COLUMNS)
    marks = ", ".join(f":{c}" for c in COLUMNS)
    with _connect(db) as conn:
        conn.execute(_SCHEMA)
        conn.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})", row)


def forget_run(run_dir: Path) -> None:
    """Delete the row of ``run_dir`` from its index file, if both exist (a run about to be replaced)."""
    run_dir = Path(run_dir).resolve()
    db = index_path(run_dir)
    if not db.is_file():
        return
    with _connect(db) as conn:
        conn.execute(_SCHEMA)
        conn.execute("DELETE FROM runs WHERE path = ?", (str(run_dir),))


def _index_files(root: Path) -> list[Path]:
    files = []
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        if INDEX_NAME in filenames:
            files.append(Path(folder) / INDEX_NAME)
    return sorted(files)


def _started_key(row: dict) -> float:
    try:
        return datetime.fromisoformat(row["started_at"]).timestamp()
    except (TypeError, ValueError):
        return float("-inf")


def list_runs(
    root: Path,
    *,
    algorithm: str | None = None,
    dataset: str | None = None,
    name: str | None = None,
    status: str | None = None,
    min_accuracy: float | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Runs recorded in every index file under ``root``, newest first.

    ``algorithm``, ``dataset`` and ``status`` match exactly (ignoring case); ``name`` matches
    any run whose name contains it; ``min_accuracy`` keeps runs whose final accuracy is at
    least that. Rows whose run folder no longer exists are skipped. Each row also has ``variant``, the short label of
    its strategy section (``fedavg+oort``, :func:`hetfl.results.variant.variant_label`), None without a config.yaml.
    """
    root = Path(root)
    if not root.is_dir():
        raise HetflError(f"{root}: no such folder")
    where, params = [], []
    for column, value in (("algorithm", algorithm), ("dataset", dataset), ("status", status)):
        if value is not None:
            where.append(f"lower({column}) = lower(?)")
            params.append(value)
    if name is not None:
        where.append("instr(lower(name), lower(?)) > 0")
        params.append(name)
    if min_accuracy is not None:
        where.append("final_accuracy >= ?")
        params.append(min_accuracy)
    query = f"SELECT {', '.join(COLUMNS)} FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")

    found: dict[str, dict] = {}
    for db in _index_files(root):
        with _connect(db) as conn:
            conn.row_factory = sqlite3.Row
            conn.execute(_SCHEMA)  # an index created by a newer or older writer still answers
            rows = [dict(r) for r in conn.execute(query, params)]
        for row in rows:
            run_dir = Path(row["path"])
            if not run_dir.is_dir():
                run_dir = db.parent / run_dir.name  # the results folder was moved or copied
                if not run_dir.is_dir():
                    continue
            row["path"] = str(run_dir)
            row["variant"] = run_variant(run_dir)  # from its config.yaml: an index written before labels still has it
            known = found.get(row["path"])
            if known is None or _started_key(row) > _started_key(known):
                found[row["path"]] = row
    runs = sorted(found.values(), key=_started_key, reverse=True)
    return runs if limit is None else runs[: max(limit, 0)]


# --------------------------------------------------------------------------- formatting
def format_duration(seconds: float | None) -> str:
    """A duration for people: ``"42.0 s"``, ``"12.3 min"``, ``"2.50 h"``, ``"3.1 d"``; ``"—"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} d"


def format_accuracy(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}%"


def format_mb(n_bytes: float | None) -> str:
    """Bytes as megabytes (10^6 bytes)."""
    if n_bytes is None:
        return "—"
    mb = n_bytes / 1e6
    return f"{mb:,.1f}" if mb >= 1 or mb == 0 else f"{mb:.2f}"


def format_started(started_at: str | None) -> str:
    try:
        return datetime.fromisoformat(started_at).strftime("%Y-%m-%d %H:%M")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return started_at or "—"


def _display_path(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


_STATUS_STYLE = {"completed": "green", "interrupted": "yellow", "diverged": "red", "stalled": "magenta"}


def runs_table(rows: Iterable[dict[str, Any]]) -> Table:
    """A rich table of :func:`list_runs` rows, for the terminal."""
    table = Table(show_header=True, header_style="bold", show_lines=False)
    for title, justify in (
        ("started", "left"), ("name", "left"), ("algorithm", "left"), ("dataset", "left"),
        ("clients", "right"), ("status", "left"), ("final acc", "right"), ("best acc", "right"),
        ("time to target", "right"), ("sim time", "right"), ("wall time", "right"),
        ("MB up/down", "right"), ("path", "left"),
    ):  # fmt: skip
        table.add_column(title, justify=justify, no_wrap=title in ("started", "algorithm", "path"))
    for row in rows:
        status = row.get("status") or "—"
        cells = [
            format_started(row.get("started_at")),
            row.get("name") or "—",
            row.get("variant") or row.get("algorithm") or "—",  # fedavg+oort, not fedavg
            row.get("dataset") or "—",
            "—" if row.get("n_clients") is None else str(row["n_clients"]),
            Text(status, style=_STATUS_STYLE.get(status, "")),
            format_accuracy(row.get("final_accuracy")),
            format_accuracy(row.get("best_accuracy")),
            format_duration(row.get("time_to_target_s")),
            format_duration(row.get("sim_time_s")),
            format_duration(row.get("wall_time_s")),
            f"{format_mb(row.get('bytes_up'))} / {format_mb(row.get('bytes_down'))}",
            _display_path(row.get("path") or ""),
        ]
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in cells))  # names are not markup
    return table
