"""Experiment trackers: what a run measures, as it is written, to TensorBoard, MLflow, a CSV file or your own code.

A tracker is any object with some of three methods (all optional; :class:`Tracker` is a base class that has them
all, doing nothing):

- ``on_start(run)``: the run begins (or resumes); ``run`` is a :class:`RunInfo`: its name, folder, algorithm, seed,
  variant, the flattened config (``params``) and ``tags``;
- ``on_metrics(record)``: one evaluation, exactly the line just appended to ``metrics.jsonl`` (as
  ``json.loads`` reads it back: plain numbers, ``None``, strings); ``record["round"]`` is the step (aggregations so
  far), ``record["sim_time_s"]`` the simulated time;
- ``on_end(summary)``: the run ended, ``summary`` is ``summary.json``'s content (``summary["status"]``:
  completed, stalled, interrupted, diverged); a run that failed on an exception gets a short summary with status
  ``failed`` and the ``error`` in one line.

The hooks are called by :class:`hetfl.engine.run.Run`, the one place a run of any engine (the simulator, on either
backend, or a deployed ``hetfl server``) evaluates and writes ``metrics.jsonl``. A tracker that raises does not stop
the run: one warning line names it and the hook, and it gets no further calls.

Config (``tracking``): ``tensorboard: DIR`` (one event folder per run, ``DIR/<run folder name>``), ``mlflow: URI``
(a tracking URI, or a path: a ``.db`` file or a folder holding ``mlflow.db``, a local SQLite store), ``csv: PATH``
(one row per evaluation; a ``run`` column tells runs apart), and ``callbacks``: trackers of your own by import path
(``mypkg.mod:MyTracker``, built with the parameters given and, if its signature asks, ``out`` and ``config``). The
three writers are the built-in trackers ``tensorboard``, ``mlflow`` and ``csv``, through the same door
(:mod:`hetfl.registry`). From Python, ``run_experiment(cfg, out, trackers=[obj])`` adds tracker objects.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetfl.config import TRACKER_EXTRAS, _installed, is_uri
from hetfl.errors import ConfigError
from hetfl.results.metrics import _plain

log = logging.getLogger("hetfl.tracking")



@dataclass(frozen=True)
class RunInfo:
    """What a tracker is told when a run starts.

    Attributes
    ----------
    name : str
        The run folder's name (in ``hetfl compare``: the algorithm's folder, ``fedprox`` or ``fedprox-seed1``).
    out : Path
        The run folder.
    experiment : str
        The config's ``name``.
    algorithm : str
        The strategy's name.
    variant : str or None
        The short label of the strategy section (``fedprox(mu=0.1)``, :mod:`hetfl.results.variant`).
    seed : int
        The run's seed.
    params : dict
        The run's config, flattened to dotted keys (``strategy.params.mu``).
    tags : dict of str
        ``algorithm``, ``seed``, ``variant``, ``dataset``, ``engine`` (inprocess, ray or deploy), ``run_dir``.
    resumed_from : int or None
        The checkpoint's round when the run resumes; None for a fresh run.
    group : str or None
        In ``hetfl compare``: the comparison folder's name (its path is ``tags["comparison"]``); None for one run.
    """

    name: str
    out: Path
    experiment: str
    algorithm: str
    variant: str | None
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    resumed_from: int | None = None
    group: str | None = None


class Tracker:
    """Base class of a tracker: every hook does nothing; override those you need (or write any object with them)."""

    def on_start(self, run: RunInfo) -> None:
        """The run begins or resumes."""

    def on_metrics(self, record: dict[str, Any]) -> None:
        """One evaluation: the ``metrics.jsonl`` line just written."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """The run ended (any status, ``summary["status"]``)."""


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``record`` (nested dicts flattened to ``a/b``); ``None``, strings, lists and booleans are left
    out. What TensorBoard and MLflow plot."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Trackers:
    """The trackers of one run, each called in turn; one that raises is disabled with a warning line."""

    def __init__(self, trackers: list[tuple[str, Any]]) -> None:
        self.active = list(trackers)  # (label for messages, tracker)
        self.ended = False

    def _call(self, hook: str, arg: Any, line: str | None = None) -> None:
        """``hook(arg)`` on each tracker that has it; with ``line`` (JSON), each gets its own ``json.loads(line)``."""
        for entry in list(self.active):
            label, tracker = entry
            method = getattr(tracker, hook, None)
            if method is None:
                continue
            try:
                method(json.loads(line) if line is not None else arg)
            except Exception as err:  # a tracker never stops the run
                text = str(err).splitlines()[0][:200] if str(err) else ""
                log.warning("tracker %s raised in %s (%s%s); it is disabled for the rest of the run",
                            label, hook, type(err).__name__, f": {text}" if text else "")
                self.active.remove(entry)

    def start(self, run: RunInfo) -> None:
        self._call("on_start", run)

    def metrics(self, record: dict[str, Any]) -> None:
        """``record`` as metrics.jsonl holds it (plain JSON values), a copy to each tracker."""
        if self.active:
            self._call("on_metrics", None, json.dumps(record, default=_plain))

    def end(self, summary: dict[str, Any]) -> None:
        """Once per run, whatever calls it again (a failure after the summary was written)."""
        if not self.ended:
            self.ended = True
            self._call("on_end", None, json.dumps(summary, default=_plain))


def build_trackers(config: Any, out: Path, objects: list[Any] = ()) -> list[tuple[str, Any]]:
    """The trackers ``config.tracking`` names, each built by :func:`hetfl.registry.call` with its parameters and, if
    its signature asks, ``out`` (the run folder) and ``config``; then ``objects`` (trackers given from Python). A
    built-in whose package is missing is one line naming the extra to install."""
    from hetfl import registry

    built = []
    for key, spec, params in config.tracking.entries():
        if spec in TRACKER_EXTRAS and not _installed(TRACKER_EXTRAS[spec][0]):
            module, extra = TRACKER_EXTRAS[spec]
            raise ConfigError(f"{key}: {spec} needs the {module} package, not installed; pip install hetfl[{extra}]")
        factory = registry.resolve("tracker", spec, key=key).obj
        built.append((spec, registry.call(factory, {"out": out, "config": config}, params, key=key, spec=spec)))
    return built + [(type(obj).__name__, obj) for obj in objects]


# --------------------------------------------------------------------------- CSV
class CSVTracker(Tracker):
    """One row per evaluation in ``path``, with a first column ``run`` (the run folder's name); the columns are the
    union of the records' keys, in the order first seen. The header is written once; a record with a new key
    rewrites the file with the wider header (earlier rows get empty cells). A run that starts again removes its
    own earlier rows first (all of them, or on resume those after the checkpoint's round), as metrics.jsonl does.
    Lists and dicts are written as JSON, None as an empty cell."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.run = ""

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return [], []
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.columns = columns

    def on_start(self, run: RunInfo) -> None:
        self.run = run.name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        columns, rows = self._read()
        kept = [r for r in rows if r.get("run") != run.name
                or (run.resumed_from is not None and _round(r) <= run.resumed_from)]
        self.columns = columns or ["run"]
        if len(kept) != len(rows) or not columns:
            self._rewrite(self.columns, kept)

    def on_metrics(self, record: dict[str, Any]) -> None:
        row = {"run": self.run, **{k: _cell(v) for k, v in record.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            _, rows = self._read()
            self._rewrite(self.columns + new, [*rows, row])
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _round(row: dict[str, str]) -> float:
    try:
        return float(row.get("round") or 0)
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker(Tracker):
    """TensorBoard event files (``torch.utils.tensorboard``; ``pip install hetfl[tensorboard]``) in
    ``log_dir/<run folder name>`` (in ``hetfl compare``, ``log_dir/<comparison folder name>/<run folder name>``):
    every number of a record as a scalar at step ``round``, the run's tags and config as text at the start, and the
    summary's numbers as ``summary/<key>`` at the last round."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self.step = 0

    def on_start(self, run: RunInfo) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir / (run.group or "") / run.name))
        rows = [f"| {k} | {v} |" for k, v in {**run.tags, **run.params}.items()]
        self.writer.add_text("run", "\n".join(["| key | value |", "|---|---|", *rows]), global_step=run.resumed_from or 0)

    def on_metrics(self, record: dict[str, Any]) -> None:
        self.step = int(record.get("round", self.step))
        for key, value in scalars(record).items():
            if key != "round":
                self.writer.add_scalar(key, value, global_step=self.step)
        self.writer.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(summary.get("rounds") or self.step)
        for key, value in scalars({k: v for k, v in summary.items() if not isinstance(v, dict)}).items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=step)
        self.writer.add_text("status", str(summary.get("status")), global_step=step)
        self.writer.close()


# --------------------------------------------------------------------------- MLflow
MLFLOW_STATUS = {"completed": "FINISHED", "stalled": "FINISHED", "interrupted": "KILLED"}  # else FAILED
_MLFLOW_KEY = re.compile(r"[^\w\-. /]")


def mlflow_uri(target: str | Path) -> str:
    """A tracking URI as MLflow takes it: a URI with a scheme (``http://``, ``sqlite:///``, ``file:``, ``databricks``)
    as it is; a path ending in ``.db`` or ``.sqlite`` is that SQLite file; any other path a folder that holds
    ``mlflow.db`` (a local store that needs no server and that current MLflow supports)."""
    text = str(target)
    if is_uri(text):
        return text
    path = Path(text).expanduser().resolve()
    if path.suffix not in (".db", ".sqlite"):
        path = path / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class MLflowTracker(Tracker):
    """An MLflow run per hetfl run (``pip install hetfl[mlflow]``: mlflow-skinny and the SQLite store's packages) in
    the experiment ``experiment`` (default: the config's ``name``) at ``uri`` (:func:`mlflow_uri`), named after the
    run folder: the flattened config as params, the tags (``hetfl.algorithm``, ``hetfl.seed``, ...), every number of
    a record as a metric at step ``round``, and at the end the summary's numbers as ``summary.<key>`` metrics and
    its status (FINISHED, KILLED when interrupted, FAILED). A resumed run continues its MLflow run (found by its
    ``hetfl.run_dir`` tag). In ``hetfl compare`` each run is a child of one parent run named after the comparison
    folder (found again by its ``hetfl.comparison_of`` tag), whose status is that of its latest child.

    Records are sent in batches, at most ``flush_s`` seconds apart (and at the end): each send to a SQLite store
    commits several times, tens of milliseconds (``benchmarks/tracking.py``); ``flush_s: 0`` sends each record at
    once."""

    def __init__(self, uri: str | Path = "mlruns", experiment: str | None = None, flush_s: float = 5.0) -> None:
        from mlflow.tracking import MlflowClient  # needs mlflow-skinny

        self.uri = mlflow_uri(uri)
        self.experiment = experiment
        for name in ("mlflow", "alembic"):  # their INFO lines (creating tables) would interleave with the progress bar
            logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.step = 0
        self.flush_s, self.pending, self.sent_at = flush_s, [], time.monotonic()

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def on_start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        experiment_id = self._experiment_id(self.experiment or run.experiment)
        tags = {f"hetfl.{k}": str(v) for k, v in run.tags.items()}
        if run.group is not None:
            self.parent_id = self._parent(experiment_id, run.group, run.tags["comparison"])
            tags["mlflow.parentRunId"] = self.parent_id
        if run.resumed_from is not None:
            earlier = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`hetfl.run_dir` = '{run.tags.get('run_dir', '')}'",
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if earlier:
                self.run_id = earlier[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "hetfl.resumed_from", str(run.resumed_from))
                return
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        params = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _parent(self, experiment_id: str, name: str, where: str) -> str:
        """The comparison's parent run, made the first time (RUNNING again when a later run of it starts)."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`hetfl.comparison_of` = '{where}'",
                                        max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        return self.client.create_run(experiment_id, run_name=name, tags={"hetfl.comparison_of": where}).info.run_id

    def on_metrics(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        self.step = int(record.get("round", self.step))
        now = int(time.time() * 1000)
        self.pending += [Metric(_mlflow_key(k), v, now, self.step) for k, v in scalars(record).items() if k != "round"]
        if time.monotonic() - self.sent_at >= self.flush_s:
            self._send([])

    def _send(self, metrics: list) -> None:
        """The pending metrics and ``metrics``, in batches of MLflow's limit (1000 a call)."""
        metrics, self.pending, self.sent_at = self.pending + metrics, [], time.monotonic()
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def on_end(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        step, now = int(summary.get("rounds") or self.step), int(time.time() * 1000)
        numbers = scalars({k: v for k, v in summary.items() if not isinstance(v, dict)})
        self._send([Metric(_mlflow_key(f"summary.{k}"), v, now, step) for k, v in numbers.items() if math.isfinite(v)])
        status = str(summary.get("status"))
        self.client.set_tag(self.run_id, "hetfl.status", status)
        if summary.get("error"):
            self.client.set_tag(self.run_id, "hetfl.error", str(summary["error"])[:5000])
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, MLFLOW_STATUS.get(status, "FAILED"))


def _mlflow_key(key: str) -> str:
    """``key`` with the characters MLflow refuses in names (``:``, brackets, ...) replaced by ``_``."""
    return _MLFLOW_KEY.sub("_", key)
