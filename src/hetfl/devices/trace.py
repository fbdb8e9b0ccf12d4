"""Device traces: real devices read from a CSV or JSON file instead of drawn from distributions.

CSV: one row per device, with a header. Columns:

==============  =========  ======================================================================
column          required   meaning
==============  =========  ======================================================================
client_id       yes        non-negative integer, unique
speed           yes        relative compute speed (1.0 = the median device), positive
down_mbps       yes [*]    download bandwidth, Mbit/s
up_mbps         yes [*]    upload bandwidth, Mbit/s
latency_ms      yes        one-way latency per transfer, milliseconds
flops           no         absolute FLOP/s; overrides ``speed * median_flops``
dropout         no         probability in [0, 1) that a task is never returned
tier            no         a label for reports, e.g. ``mid/wifi``
availability    no         online intervals in seconds, ``0-3600;7200-9000`` (end may be ``inf``);
                           empty means always online
==============  =========  ======================================================================

[*] a ``bandwidth_mbps`` column may stand in for both ``down_mbps`` and ``up_mbps``. Other
columns are ignored. An empty cell of an optional column means its default.

JSON: a list of objects with the same keys; ``availability`` is a list of ``[start, end]`` pairs
(``end`` may be ``null`` for "online forever") or ``null`` / absent / ``[]`` for always online.

Devices are sorted by ``client_id`` and the first ``n_clients`` are used. Every problem in the
file is a :class:`~hetfl.errors.DataError` naming the file, the row or client, and the column.
:func:`save_trace` writes a file that :func:`load_trace` reads back to equal profiles.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hetfl.devices.profiles import BYTES_PER_MBIT, DeviceProfile
from hetfl.errors import DataError

COLUMNS = ("client_id", "speed", "flops", "down_mbps", "up_mbps", "latency_ms", "dropout", "tier", "availability")
Windows = tuple[tuple[float, float], ...]


# --------------------------------------------------------------------------- loading
def load_trace(
    path: str | Path,
    n_clients: int | None,
    median_flops: float,
    *,
    default_dropout: float = 0.0,
) -> list[DeviceProfile]:
    """Read a CSV or JSON trace; return the first ``n_clients`` devices by id (all if ``None``).

    ``default_dropout`` is the dropout of devices whose row gives none.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"trace {path}: expected a .csv or .json file")
    if not path.is_file():
        raise DataError(f"trace {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"trace {path}: cannot be read as UTF-8 text ({err})") from None

    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _json_rows(path, text)
    profiles: list[DeviceProfile] = []
    seen: dict[int, str] = {}
    for where, raw in rows:
        profile = _parse_row(_Row(path, where), raw, median_flops, default_dropout)
        if profile.client_id in seen:
            first = seen[profile.client_id]
            raise DataError(f"trace {path}: client {profile.client_id} appears twice ({first} and {where})")
        seen[profile.client_id] = where
        profiles.append(profile)

    profiles.sort(key=lambda p: p.client_id)
    if n_clients is not None:
        if len(profiles) < n_clients:
            raise DataError(f"trace {path} has {len(profiles)} clients; data.n_clients is {n_clients}")
        profiles = profiles[:n_clients]
    return profiles


def _missing_column(keys: Sequence[str]) -> str | None:
    """The first required column absent from ``keys``, described for a message; ``None`` if all are there."""
    for column in ("client_id", "speed", "down_mbps", "up_mbps", "latency_ms"):
        if column in keys:
            continue
        if column in ("down_mbps", "up_mbps"):
            if "bandwidth_mbps" not in keys:
                return f"'{column}' (or 'bandwidth_mbps' for both directions)"
        else:
            return f"'{column}'"
    return None


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:
            raise DataError(f"trace {path}: the file is empty; expected a header row")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        missing = _missing_column(reader.fieldnames)
        if missing:
            raise DataError(f"trace {path}: missing column {missing}")
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as err:
        raise DataError(f"trace {path}: line {reader.line_num}: not valid CSV ({err})") from None


def _json_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"trace {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"trace {path}: expected a JSON list of device objects")
    rows = []
    for i, entry in enumerate(data, start=1):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"trace {path}: {where}: expected an object with keys client_id, speed, ...")
        missing = _missing_column(list(entry))
        if missing:
            raise DataError(f"trace {path}: {where}: missing key {missing}")
        rows.append((where, entry))
    return rows


class _Row:
    """Where a row is, for error messages: the file, the line or entry, and (once known) the client."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where

    def fail(self, column: str, problem: str) -> NoReturn:
        raise DataError(f"trace {self.path}: {self.where}: column '{column}': {problem}")


def _cell(raw: dict[str, Any], column: str) -> Any:
    """The raw value of a column; ``None`` when absent or empty."""
    value = raw.get(column)
    if isinstance(value, str):
        value = value.strip()
    return None if value == "" else value


def _first(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _number(row: _Row, column: str, value: Any) -> float:
    if value is None:
        row.fail(column, "is empty")
    if isinstance(value, bool):
        row.fail(column, f"{value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        row.fail(column, f"{value!r} is not a number")
    if not math.isfinite(x):
        row.fail(column, f"{value!r} is not a finite number")
    return x


def _parse_row(row: _Row, raw: dict[str, Any], median_flops: float, default_dropout: float) -> DeviceProfile:
    value = _cell(raw, "client_id")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        client_id = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        client_id = int(value)
    else:
        row.fail("client_id", "is empty" if value is None else f"{value!r} is not a non-negative integer")
    row.where = f"{row.where} (client {client_id})"

    def positive(column: str, value: Any) -> float:
        x = _number(row, column, value)
        if x <= 0:
            row.fail(column, f"must be positive, got {value!r}")
        return x

    speed = positive("speed", _cell(raw, "speed"))
    bandwidth = _cell(raw, "bandwidth_mbps")
    down_mbps = positive("down_mbps", _first(_cell(raw, "down_mbps"), bandwidth))
    up_mbps = positive("up_mbps", _first(_cell(raw, "up_mbps"), bandwidth))
    latency_ms = _number(row, "latency_ms", _cell(raw, "latency_ms"))
    if latency_ms < 0:
        row.fail("latency_ms", f"must not be negative, got {latency_ms!r}")

    flops_value = _cell(raw, "flops")
    flops = speed * median_flops if flops_value is None else positive("flops", flops_value)
    dropout_value = _cell(raw, "dropout")
    dropout = default_dropout if dropout_value is None else _number(row, "dropout", dropout_value)
    if not 0 <= dropout < 1:
        row.fail("dropout", f"must be in [0, 1), got {dropout!r}")
    tier = _cell(raw, "tier")

    return DeviceProfile(
        client_id=client_id,
        speed=speed,
        flops=flops,
        down_Bps=down_mbps * BYTES_PER_MBIT,
        up_Bps=up_mbps * BYTES_PER_MBIT,
        latency_s=latency_ms / 1000,
        windows=_parse_windows(row, _cell(raw, "availability")),
        dropout=dropout,
        tier="" if tier is None else str(tier),
    )


def _parse_windows(row: _Row, value: Any) -> Windows | None:
    """Online intervals from ``"0-3600;7200-9000"`` or ``[[0, 3600], [7200, 9000]]``; ``None`` = always online."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = []
        for part in value.split(";"):
            bounds = re.split(r"(?<![eE])-", part.strip())  # "1e-05-60" splits after the exponent
            if len(bounds) != 2:
                row.fail("availability", f"{part.strip()!r} is not a start-end interval")
            pairs.append(bounds)
    elif isinstance(value, list):
        pairs = value
    else:
        row.fail("availability", f"expected intervals like [[0, 3600], [7200, 9000]], got {value!r}")

    windows: list[tuple[float, float]] = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            row.fail("availability", f"{pair!r} is not a [start, end] pair")
        start = _number(row, "availability", pair[0])
        open_ended = pair[1] is None or str(pair[1]).strip().lower() in ("inf", "infinity")
        end = math.inf if open_ended else _number(row, "availability", pair[1])
        if start < 0 or end <= start:
            row.fail("availability", f"interval {start:g}-{end:g} must have 0 <= start < end")
        if windows:
            before = f"{windows[-1][0]:g}-{windows[-1][1]:g}"
            if start < windows[-1][0]:
                row.fail("availability", f"intervals are not sorted: {start:g}-{end:g} comes after {before}")
            if start < windows[-1][1]:
                row.fail("availability", f"intervals overlap: {before} and {start:g}-{end:g}")
        windows.append((start, end))
    return tuple(windows) or None


# --------------------------------------------------------------------------- saving
def save_trace(profiles: Sequence[DeviceProfile], path: str | Path) -> None:
    """Write profiles as a CSV or JSON trace (by suffix) that :func:`load_trace` reads back exactly.

    Exact for every profile built by :func:`~hetfl.devices.build_profiles` or read from a trace
    (a hand-made bandwidth or latency that no Mbit/s or ms value converts to is written to the
    nearest one). ``flops`` is written as an absolute column, so the trace keeps each device's
    FLOP/s whatever ``median_flops`` it is later read with.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise DataError(f"trace {path}: expected a .csv or .json file")
    records = [_record(p) for p in sorted(profiles, key=lambda p: p.client_id)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        for record in records:
            windows = record["availability"]
            if windows is not None:  # JSON has no infinity: an open end is written as null
                record["availability"] = [[s, None if math.isinf(e) else e] for s, e in windows]
        path.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            windows = record["availability"]
            record["availability"] = "" if windows is None else ";".join(f"{s!r}-{e!r}" for s, e in windows)
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in record.items()})


def _record(p: DeviceProfile) -> dict[str, Any]:
    if p.windows is not None and not p.windows:
        raise DataError(f"client {p.client_id} is never online; a trace cannot express that")
    return {
        "client_id": p.client_id,
        "speed": float(p.speed),
        "flops": float(p.flops),
        "down_mbps": _writable(p.down_Bps, lambda x: x * BYTES_PER_MBIT, p.down_Bps / BYTES_PER_MBIT),
        "up_mbps": _writable(p.up_Bps, lambda x: x * BYTES_PER_MBIT, p.up_Bps / BYTES_PER_MBIT),
        "latency_ms": _writable(p.latency_s, lambda x: x / 1000, p.latency_s * 1000),
        "dropout": float(p.dropout),
        "tier": p.tier,
        "availability": None if p.windows is None else [(float(s), float(e)) for s, e in p.windows],
    }


def _writable(stored: float, read_back: Callable[[float], float], guess: float) -> float:
    """The file value that reads back to ``stored`` exactly: ``guess`` or one of its nearest floats.

    Unit conversion (Mbit/s to bytes/s, ms to s) rounds, so ``guess`` may be an ulp away.
    """
    below = above = float(guess)
    for _ in range(4):
        if read_back(below) == stored:
            return below
        if read_back(above) == stored:
            return above
        below, above = math.nextafter(below, -math.inf), math.nextafter(above, math.inf)
    return float(guess)
