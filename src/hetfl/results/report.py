"""``hetfl report DIR``: plots and one HTML page for a run, a comparison, or any folder of runs.

Writes into DIR:

- ``accuracy_vs_time.png``: global test accuracy against simulated time, the target accuracy
  as a dashed line and a star where each run first reaches it;
- ``accuracy_vs_round.png``: the same against rounds (aggregations), with the 10th-percentile
  client accuracy dotted (how the worst-served clients fare);
- ``perplexity_vs_time.png`` (language-model runs only, those whose metrics have ``perplexity``):
  perplexity against simulated time, on a log axis, with each run's lowest perplexity marked and the target
  perplexity (``evaluation.target_perplexity``, by default 0.95 x the starting model's) with a star where a run
  first reaches it (for them ``accuracy`` in the other plots is next-token accuracy);
- ``loss_vs_time.png`` (runs that are not language models, when their metrics have ``loss``): test loss against
  simulated time;
- ``bytes.png``: cumulative megabytes transferred (up + down) against simulated time;
- ``staleness.png``: each run's staleness distribution (share of aggregated updates at most x versions stale);
- ``participation.png``: each run's aggregated updates per client, clients sorted by device
  speed and bars coloured by it, dispatched tasks outlined;
- ``time_breakdown.png`` (runs whose metrics have the ``time_*_s`` keys): where each evaluation interval's time
  went, stacked: waiting for the server, download, compute, upload, the clients' idle time and the server's own
  work (``server_busy_s``);
- ``report.html``: a summary table (the best value of each column highlighted), the images, and
  each run's configuration. Plain HTML and inline CSS, nothing fetched.

Runs whose ``config.yaml`` differ only in ``seed`` (``hetfl compare --seeds``, or ``hetfl run`` under several seeds)
are grouped: one row a group in the summary table (mean ± std over the seeds; final accuracy tested against the
best group's, paired over seeds: :mod:`hetfl.results.seeds`), and in ``accuracy_vs_time.png`` the group's mean
accuracy on a common time grid with a ± 1 std band; the other plots draw each seed in the group's colour.

:class:`ReportOptions` (``hetfl report --format png,pdf,svg --log-x --log-y --smooth N``): every figure also as PDF
and/or SVG beside its PNG (the page embeds the PNGs); a log time axis; a log loss axis; a trailing moving average
over N evaluations drawn over each run's raw accuracy and loss curves, the raw ones lighter.

Runs whose accuracy curves coincide (within 0.5 percentage points at every round both evaluated: FedAvg and FedProx
with a tiny mu) each get a line style and a marker of their own, markers sparse and staggered, so that both show.

The last two are drawn from ``summary.json`` (``staleness_histogram``, ``participation``,
``tasks_per_client``, ``client_speed``); a run without them (unfinished, or written by an older
hetfl) is left out of them, with a note. Each run keeps its colour in every plot and in the
table. matplotlib is imported only when a report is drawn, and through its object API (no
pyplot, no global backend change).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from hetfl.errors import HetflError
from hetfl.results.index import format_accuracy, format_duration, format_mb
from hetfl.results.metrics import CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, find_runs, read_metrics, read_summary

FIGSIZE = (7.0, 4.5)  # inches
DPI = 120
IMAGES = {
    "accuracy_vs_time.png": "Global test accuracy against simulated time. Dashed: target accuracy; "
    "star and dotted line: where a run first reaches it.",
    "accuracy_vs_round.png": "Global test accuracy against rounds (aggregations). Dotted, same colour: "
    "the 10th-percentile client accuracy.",
    "bytes.png": "Cumulative data transferred, uploads plus downloads, against simulated time.",
}
SEEDS_CAPTION = (
    "Global test accuracy against simulated time. Runs that differ only in their seed: the mean over the seeds, each "
    "seed's accuracy held at its last evaluated value (step-wise) on a common time grid that ends where the shortest "
    "of them ends; shaded: ± 1 sample standard deviation; star: where the mean first reaches the target. Lone runs: their own line, dashed: target accuracy, star "
    "and dotted line: where a run first reaches it."
)
STALENESS_IMAGE = (
    "staleness.png",
    "Staleness of the aggregated updates: server versions committed between a task's dispatch and the "
    "aggregation that used it (0: trained on the current model). One panel per run.",
)
PERPLEXITY_IMAGE = (
    "perplexity_vs_time.png",
    "Perplexity of the language model (exp of the mean next-token cross-entropy on the test windows; lower is "
    "better) against simulated time, log scale. Dot: each run's lowest perplexity; dashed: the target perplexity "
    "(by default 0.95 x the starting model's); star: where a run first reaches it.",
)
PARTICIPATION_IMAGE = (
    "participation.png",
    "Aggregated updates per client (filled, coloured by device speed) and tasks dispatched (outline), "
    "clients sorted from slowest to fastest device. One panel per run; J: Jain's index of participation.",
)
LOSS_IMAGE = (
    "loss_vs_time.png",
    "Test loss of the global model (mean cross-entropy, nats; lower is better) against simulated time.",
)
BREAKDOWN_IMAGE = (
    "time_breakdown.png",
    "Where the time went in each evaluation interval, stacked, summed over the clients: their tasks' seconds waiting "
    "for the server, downloading, computing and uploading (counted when an update arrives), their seconds without a "
    "task (idle), and the server's own work (aggregation and evaluation, server_busy_s; 0 for a free server). "
    "One panel per run.",
)
BREAKDOWN = (("time_wait_s", "wait for server", "#9e9e9e"), ("time_download_s", "download", "#4c72b0"),
             ("time_compute_s", "compute", "#55a868"), ("time_upload_s", "upload", "#dd8452"),
             ("time_idle_s", "idle", "#e5e5e5"), ("server_busy_s", "server work", "#c44e52"))
REPORT_NAME = "report.html"
FORMATS = ("png", "pdf", "svg")  # what --format may name; the page always embeds the PNGs


@dataclass(frozen=True)
class ReportOptions:
    """How ``hetfl report`` draws: the file formats of each figure, log axes, smoothing.

    ``formats``: every figure is written as ``NAME.png`` and also as each other format named (``pdf``, ``svg``),
    beside it. ``log_x``: a log time axis in the plots against simulated time (accuracy, loss, perplexity,
    bytes). ``log_y``: a log loss axis in ``loss_vs_time.png`` (``perplexity_vs_time.png`` is always log).
    ``smooth``: a trailing moving average over this many evaluations drawn over each run's raw accuracy (and
    loss) curve, the raw curve in a lighter tone; 1 or None: no smoothing.
    """

    formats: tuple[str, ...] = ("png",)
    log_x: bool = False
    log_y: bool = False
    smooth: int | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise HetflError(f"--format: {', '.join(unknown) or 'nothing'} is not one of {', '.join(FORMATS)} "
                             "(comma-separated, e.g. png,pdf)")
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, int)
                                        or self.smooth < 1):
            raise HetflError(f"--smooth: {self.smooth!r} is not a whole number of evaluations >= 1")


def moving_average(values: list[float], n: int) -> list[float]:
    """The trailing moving average over ``n`` values: point i is the mean of the finite values among
    ``values[i - n + 1 .. i]`` (fewer at the start, ``nan`` where none is finite)."""
    out = []
    for i in range(len(values)):
        window = _finite(values[max(0, i - n + 1): i + 1])
        out.append(sum(window) / len(window) if window else math.nan)
    return out


@dataclass
class _Run:
    folder: Path
    metrics: list[dict]
    summary: dict
    config: dict
    config_text: str | None
    has_summary: bool
    label: str = ""
    color: str = ""
    notes: list[str] = field(default_factory=list)
    group: "_Group | None" = None  # the seed group it belongs to, if any
    legend: str = ""  # its line's entry in a legend ("_nolegend_": its group's first run names the group)
    style: dict = field(default_factory=dict)  # its own line style and sparse markers, when its curve has a twin

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", self.config.get("seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def algorithm(self) -> str:
        return str(self.summary.get("algorithm") or self.config.get("strategy", {}).get("name") or self.folder.name)

    @property
    def variant(self) -> str:
        """The algorithm and what its strategy section changes (``fedavg+oort``; :mod:`hetfl.results.variant`)."""
        from hetfl.results.variant import variant_label

        return variant_label(self.config.get("strategy")) or self.algorithm

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.config.get("name") or self.folder.name)

    @property
    def target(self) -> float | None:
        """The accuracy target; None for a language model, whose target is :attr:`perplexity_target`."""
        if self.is_language_model:
            return None
        target = self.summary.get("target_accuracy")
        if target is None:
            target = self.config.get("evaluation", {}).get("target_accuracy")
        return float(target) if isinstance(target, (int, float)) else None

    @property
    def is_language_model(self) -> bool:
        return bool(_finite(self.series("perplexity")))

    @property
    def perplexity_target(self) -> float | None:
        """A language model's target: the summary's, else the config's, else ``LM_TARGET_FRACTION`` x the
        perplexity of its first evaluation, as the run itself sets it (:class:`hetfl.engine.run.Scoreboard`)."""
        if not self.is_language_model:
            return None
        from hetfl.engine.run import LM_TARGET_FRACTION

        for target in (self.summary.get("target_perplexity"), self.config.get("evaluation", {}).get("target_perplexity")):
            if isinstance(target, (int, float)):
                return float(target)
        return LM_TARGET_FRACTION * _finite(self.series("perplexity"))[0]

    def series(self, key: str) -> list[float]:
        """One metric over the run's evaluations; ``nan`` where a record lacks it."""
        out = []
        for record in self.metrics:
            value = record.get(key)
            out.append(float(value) if isinstance(value, (int, float)) else math.nan)
        return out

    def first_at_target(self) -> dict | None:
        """The first evaluation that reaches the target (an accuracy at or above it, or a language model's
        perplexity at or below it), if any."""
        key, target, reaches = "accuracy", self.target, lambda v, t: v >= t
        if self.is_language_model:
            key, target, reaches = "perplexity", self.perplexity_target, lambda v, t: v <= t
        if target is None:
            return None
        for record in self.metrics:
            value, time = record.get(key), record.get("sim_time_s")
            if isinstance(value, (int, float)) and isinstance(time, (int, float)) and reaches(value, target):
                return record
        return None


# --------------------------------------------------------------------------- loading
def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _summary_from_metrics(run: _Run) -> dict:
    """What summary.json would say, for a run that has not written one (still going, or killed)."""
    last = run.metrics[-1]
    accuracies = _finite(run.series("accuracy"))
    reached = run.first_at_target()
    return {
        "status": "unfinished",
        "final_accuracy": last.get("accuracy"),
        "best_accuracy": max(accuracies) if accuracies else None,
        "final_perplexity": last.get("perplexity"),
        "rounds": last.get("round"),
        "sim_time_s": last.get("sim_time_s"),
        "wall_time_s": last.get("wall_time_s"),
        "bytes_up": last.get("bytes_up"),
        "bytes_down": last.get("bytes_down"),
        "time_to_target_s": reached.get("sim_time_s") if reached else None,
        "target_accuracy": run.target,
        "target_perplexity": run.perplexity_target,
        "staleness_mean": _staleness_mean_from_metrics(run.metrics),
        "staleness_max": max(_finite(run.series("staleness_max")), default=None),
        "participation_jain": last.get("participation_jain"),
        "participated_frac": last.get("participated_frac"),
        "idle_fast_frac": last.get("idle_fast_frac"),
        "idle_frac": last.get("idle_frac"),
    }


def _staleness_mean_from_metrics(records: list[dict]) -> float | None:
    """The run's mean staleness from the per-evaluation window means, each weighted by its updates.

    A record's window holds the updates aggregated since the record before it, so its weight is
    the growth of ``updates`` between the two.
    """
    total = weight = 0.0
    before = 0
    for record in records:
        updates, mean = record.get("updates"), record.get("staleness_mean")
        if not isinstance(updates, (int, float)):
            return None
        if isinstance(mean, (int, float)) and updates > before:
            total += mean * (updates - before)
            weight += updates - before
        before = updates
    return total / weight if weight else None


def _load_run(folder: Path) -> _Run:
    config_text, config = None, {}
    if (folder / CONFIG_NAME).is_file():
        config_text = (folder / CONFIG_NAME).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError:
            loaded = None
        config = loaded if isinstance(loaded, dict) else {}
    metrics = read_metrics(folder / METRICS_NAME) if (folder / METRICS_NAME).is_file() else []
    has_summary = (folder / SUMMARY_NAME).is_file()
    summary = read_summary(folder / SUMMARY_NAME) if has_summary else {}
    run = _Run(folder, metrics, summary, config, config_text, has_summary)
    if metrics and not has_summary:
        run.summary = {**_summary_from_metrics(run), "name": run.name, "algorithm": run.algorithm}
        run.notes.append("no summary.json (still running, or stopped early): values computed from metrics.jsonl")
    elif metrics and not (_has_staleness(run) and _has_participation(run)):
        run.notes.append("summary.json has no staleness histogram or per-client participation "
                         "(written by an older hetfl): left out of those plots")
    return run


def _has_staleness(run: _Run) -> bool:
    hist = run.summary.get("staleness_histogram")
    return isinstance(hist, dict) and bool(hist)


def _has_perplexity(run: _Run) -> bool:
    return bool(_finite(run.series("perplexity")))


def _has_participation(run: _Run) -> bool:
    counts, speeds = run.summary.get("participation"), run.summary.get("client_speed")
    return isinstance(counts, list) and isinstance(speeds, list) and len(counts) == len(speeds) > 0


def _has_breakdown(run: _Run) -> bool:
    return len(_finite(run.series("time_compute_s"))) >= 2


def _relative(folder: Path, root: Path) -> str:
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        return str(folder)
    return str(rel) if str(rel) != "." else folder.resolve().name


def _assign_labels(runs: list[_Run], root: Path, where: Any = None) -> None:
    """Label runs by algorithm; by variant (``fedavg+oort``), by name, then by folder (``where(run)``, default its path
    under ``root``), when that does not tell them apart."""
    for attribute in ("algorithm", "variant", "name"):
        labels = [getattr(run, attribute) for run in runs]
        if len(set(labels)) == len(labels):
            break
    else:
        labels = [where(run) if where else _relative(run.folder, root) for run in runs]
    for run, label in zip(runs, labels):
        run.label = label


def _assign_colors(runs: list[_Run]) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10"].colors if len(runs) <= 10 else colormaps["tab20"].colors
    for i, run in enumerate(runs):
        run.color = to_hex(palette[i % len(palette)])


@dataclass(eq=False)  # each group is itself (hashable by identity)
class _Group:
    """Runs of one configuration under different seeds (their ``config.yaml`` differ only in ``seed``)."""

    runs: list[_Run]
    label: str = ""
    color: str = ""

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]  # type: ignore[misc]

    def entry(self) -> dict[str, Any]:
        """Its measures over the seeds, as ``comparison.json`` holds them (:func:`hetfl.results.seeds.aggregate`)."""
        from hetfl.results.seeds import aggregate

        summaries = [{**run.summary, "seed": run.seed} for run in self.runs]
        return aggregate(self.label, summaries, [run.folder.name for run in self.runs])


def _without_seed(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ("seed", "seeds")}, sort_keys=True, default=str)


def _group_seeds(runs: list[_Run]) -> list[_Run | _Group]:
    """The runs in order, those whose configs differ only in ``seed`` (at least two, each seed once) as one group."""
    by_config: dict[str, list[_Run]] = {}
    for run in runs:
        if run.config and run.seed is not None:
            by_config.setdefault(_without_seed(run.config), []).append(run)
    units: list[_Run | _Group] = []
    for run in runs:
        same = by_config.get(_without_seed(run.config), []) if run.config and run.seed is not None else []
        if len(same) < 2 or len({r.seed for r in same}) < len(same):
            units.append(run)
        elif run is same[0]:
            units.append(_Group(sorted(same, key=lambda r: r.seed)))
    return units


def _label_groups(units: list[_Run | _Group], root: Path) -> None:
    """Label every unit as :func:`_assign_labels` labels runs (a group by its first run, its folder without the
    ``-seedK`` ending); each run of a group is labelled ``GROUP seed K``, in the group's colour."""
    firsts = [unit.runs[0] if isinstance(unit, _Group) else unit for unit in units]
    grouped = {id(unit.runs[0]): unit for unit in units if isinstance(unit, _Group)}

    def where(run: _Run) -> str:  # a group: what its folders share, less the seed (fedavg-seed0, fedavg-seed1: fedavg)
        if id(run) not in grouped:
            return _relative(run.folder, root)
        shared = os.path.commonprefix([_relative(r.folder, root) for r in grouped[id(run)].runs])
        shared = re.sub(r"[-_. ]*(seed)?[-_ ]*\d*$", "", shared, flags=re.IGNORECASE)
        return shared or f"{_relative(run.folder, root)} and its seeds"

    _assign_labels(firsts, root, where)
    for unit, first in zip(units, firsts):
        if isinstance(unit, _Group):
            unit.label = first.label
            for run in unit.runs:
                run.group = unit
    _assign_colors(firsts)
    for unit, first in zip(units, firsts):
        if isinstance(unit, _Group):
            unit.color = first.color
            for i, run in enumerate(unit.runs):
                run.label, run.color = f"{unit.label} seed {run.seed}", unit.color
                run.legend = f"{unit.label} ({len(unit.runs)} seeds)" if i == 0 else "_nolegend_"
        else:
            unit.legend = unit.label


COINCIDE = 0.005  # accuracy curves closer than this (0.5 percentage points) at every common round coincide
LINESTYLES = ["-", "--", "-.", (0, (6, 2, 1, 2, 1, 2))]  # not ":", the 10th-percentile lines' style
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _coincide(a: _Run, b: _Run) -> bool:
    """Whether two runs' accuracy curves lie on each other: within :data:`COINCIDE` at every round both evaluated."""
    ours = {r: v for r, v in zip(a.series("round"), a.series("accuracy")) if math.isfinite(r) and math.isfinite(v)}
    theirs = {r: v for r, v in zip(b.series("round"), b.series("accuracy")) if math.isfinite(r) and math.isfinite(v)}
    common = ours.keys() & theirs.keys()
    return bool(common) and all(abs(ours[r] - theirs[r]) <= COINCIDE for r in common)


def _assign_styles(runs: list[_Run]) -> None:
    """Runs whose accuracy curve coincides with another's (FedAvg and FedProx with a tiny mu) each get a line style
    and a marker of their own, markers sparse and staggered, so that every one of them stays visible."""
    twins = [run for run in runs if run.group is None and any(
        other is not run and other.group is None and _coincide(run, other) for other in runs)]
    for k, run in enumerate(twins):
        step = max(1, len(run.metrics) // 8)
        run.style = {"linestyle": LINESTYLES[k % len(LINESTYLES)], "marker": MARKERS[k % len(MARKERS)],
                     "markersize": 5, "markevery": ((k * max(1, step // 3)) % step, step)}


# --------------------------------------------------------------------------- plots
def _time_unit(max_seconds: float) -> tuple[str, float]:
    """The unit that keeps simulated-time tick labels short: s, min or h."""
    if max_seconds <= 180:
        return "s", 1.0
    if max_seconds <= 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#d0d0d0", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _legend(fig, ax, extra_handles: list | None = None) -> None:
    handles, _ = ax.get_legend_handles_labels()
    handles += extra_handles or []
    if len(handles) <= 6:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.9)
    else:  # many runs: beside the plot, where it hides no line
        fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def _accuracy_axis(ax, values: list[float]) -> None:
    from matplotlib.ticker import PercentFormatter

    finite = _finite(values)
    if finite:
        low, high = min(finite), max(finite)
        pad = max(0.02, 0.05 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.02, high + pad) if high <= 1.0 else high + pad)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def _targets(runs: list[_Run]) -> list[float]:
    return sorted({run.target for run in runs if run.target is not None})


def _draw_targets(ax, runs: list[_Run]) -> None:
    for target in _targets(runs):
        ax.axhline(target, color="#555555", linestyle="--", linewidth=1.0, label=f"target {100 * target:g}%", zorder=1)


def _star(ax, x: float, y: float, color: str, zorder: int = 4) -> None:
    """The star that marks where a curve first reaches its target."""
    ax.plot(x, y, marker="*", markersize=13, color=color, markeredgecolor="black", markeredgewidth=0.6,
            linestyle="none", zorder=zorder)


def _points(run: _Run) -> dict:
    """Dots on the line when a run has few evaluations (a single one would not show otherwise); a run whose curve
    has a twin: its own line style and sparse markers (:func:`_assign_styles`)."""
    if run.style:
        return dict(run.style)
    return {"marker": "o", "markersize": 3.5} if len(run.metrics) <= 20 else {}


def _curve(ax, x: list[float], y: list[float], run: _Run, opts: ReportOptions, label: str) -> None:
    """A run's line; with ``--smooth N`` its moving average over N evaluations, over the raw line drawn lighter."""
    if opts.smooth and opts.smooth > 1:
        ax.plot(x, y, color=run.color, linewidth=0.9, alpha=0.3, zorder=2)
        y = moving_average(y, opts.smooth)
    ax.plot(x, y, color=run.color, label=label, linewidth=1.8, zorder=3, **_points(run))


def _save(fig, path: Path, opts: ReportOptions) -> None:
    """``path`` (a PNG), and beside it the same figure in each other format of ``opts.formats``."""
    fig.savefig(path, dpi=DPI, facecolor="white")
    for fmt in opts.formats:
        if fmt != "png":
            fig.savefig(path.with_suffix(f".{fmt}"), facecolor="white")


def _unlink(path: Path) -> None:
    """A figure of an earlier report that this one does not draw, in every format."""
    for fmt in FORMATS:
        path.with_suffix(f".{fmt}").unlink(missing_ok=True)


def _log_labels(axis, limits: tuple[float, float]) -> None:
    """Plain numbers on a log axis (0.1, 1, 10, not 10^-1); within three decades the minor ticks at 2 and 5 too."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def two_five(v: float, _: Any) -> str:
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""

    low, high = limits
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter() if low <= 0 or high / low > 1000 else FuncFormatter(two_five))


def _time_axis(ax, name: str, opts: ReportOptions) -> None:
    """The x axis of a plot against simulated time: from 0, or log-scaled with ``--log-x``."""
    if opts.log_x:
        ax.set_xscale("log")  # the evaluation at t = 0 has no place on it
        _log_labels(ax.xaxis, ax.get_xlim())
        ax.set_xlabel(f"simulated time ({name}, log scale)")
    else:
        ax.set_xlim(left=0)
        ax.set_xlabel(f"simulated time ({name})")


def _plot_accuracy_vs_time(runs: list[_Run], out: Path, unit: tuple[str, float], opts: ReportOptions) -> None:
    from matplotlib.lines import Line2D

    from hetfl.results.seeds import band

    name, scale = unit
    fig, ax = _figure()
    shown: list[float] = []
    marked = False
    for group in dict.fromkeys(run.group for run in runs if run.group is not None):  # a band for each seed group
        grid, mean, std = band([(run.series("sim_time_s"), run.series("accuracy")) for run in group.runs])
        ax.plot(grid / scale, mean, color=group.color, linewidth=1.8, zorder=3,
                label=f"{group.label}: mean of {len(group.runs)} seeds, band ± 1 std")
        ax.fill_between(grid / scale, mean - std, mean + std, color=group.color, alpha=0.2, linewidth=0, zorder=2)
        shown += [*(mean - std), *(mean + std)]
        target = group.runs[0].target
        crossed = [] if target is None else [i for i, value in enumerate(mean) if value >= target]
        if len(crossed):  # the mean curve's first crossing of the target
            _star(ax, grid[crossed[0]] / scale, mean[crossed[0]], group.color)
            marked = True
    for run in runs:
        if run.group is not None:
            continue
        t = [v / scale for v in run.series("sim_time_s")]
        accuracy = run.series("accuracy")
        _curve(ax, t, accuracy, run, opts, run.label)
        shown += accuracy
        reached = run.first_at_target() if run.target is not None else None
        if reached is not None:
            _star(ax, reached["sim_time_s"] / scale, reached["accuracy"], run.color)
            marked = True
    _draw_targets(ax, runs)
    shown += _targets(runs)
    _accuracy_axis(ax, shown)
    bottom = ax.get_ylim()[0]
    for run in runs:  # a dotted drop line from each star to the time axis
        reached = run.first_at_target() if run.group is None and run.target is not None else None
        if reached is not None:
            x = reached["sim_time_s"] / scale
            ax.vlines(x, bottom, reached["accuracy"], color=run.color, linestyle=":", linewidth=1.1, zorder=2)
    _time_axis(ax, name, opts)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against simulated time", loc="left", fontsize="medium")
    star = Line2D([], [], marker="*", markersize=11, color="#999999", markeredgecolor="black",
                  markeredgewidth=0.6, linestyle="none", label="reaches target")  # fmt: skip
    _legend(fig, ax, [star] if marked else None)
    _save(fig, out, opts)


def _plot_accuracy_vs_round(runs: list[_Run], out: Path, opts: ReportOptions) -> None:
    from matplotlib.lines import Line2D

    fig, ax = _figure()
    shown: list[float] = []
    has_p10 = False
    faint = 0.85 if len(runs) <= 4 else 0.6
    for run in runs:
        rounds = run.series("round")
        accuracy = run.series("accuracy")
        _curve(ax, rounds, accuracy, run, opts, run.legend)
        shown += accuracy
        p10 = run.series("client_acc_p10")
        if _finite(p10):
            ax.plot(rounds, p10, color=run.color, linestyle=":", linewidth=1.4, alpha=faint, zorder=2)
            shown += p10
            has_p10 = True
    _draw_targets(ax, runs)
    shown += _targets(runs)
    _accuracy_axis(ax, shown)
    ax.set_xlim(left=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round (aggregations)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against rounds", loc="left", fontsize="medium")
    dotted = Line2D([], [], color="#777777", linestyle=":", linewidth=1.4, label="client accuracy, 10th pct.")
    _legend(fig, ax, [dotted] if has_p10 else None)
    _save(fig, out, opts)


def _plot_perplexity_vs_time(runs: list[_Run], out: Path, unit: tuple[str, float], opts: ReportOptions) -> None:
    """Perplexity against simulated time for the language-model runs; a dot at each run's lowest."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    name, scale = unit
    fig, ax = _figure()
    for run in runs:
        t = [v / scale for v in run.series("sim_time_s")]
        ppl = run.series("perplexity")
        ax.plot(t, ppl, color=run.color, label=run.legend, linewidth=1.8, zorder=3, **_points(run))
        finite = [(p, x) for p, x in zip(ppl, t) if math.isfinite(p)]
        low, at = min(finite)
        ax.plot(at, low, marker="o", markersize=7, color=run.color, markeredgecolor="black", markeredgewidth=0.6,
                linestyle="none", zorder=4)  # fmt: skip
        reached = run.first_at_target()
        if reached is not None:
            _star(ax, reached["sim_time_s"] / scale, reached["perplexity"], run.color, zorder=5)
    for target in sorted({run.perplexity_target for run in runs if run.perplexity_target is not None}):
        ax.axhline(target, color="#555555", linestyle="--", linewidth=1.0, label=f"target {target:.3g}", zorder=1)
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # a range within a decade or two has few decade ticks: label the minor ones (2, 3, ... 9) too
    ax.yaxis.set_minor_formatter(NullFormatter() if high / low > 30 else FuncFormatter(lambda v, _: f"{v:g}"))
    _time_axis(ax, name, opts)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity against simulated time", loc="left", fontsize="medium")
    _legend(fig, ax)
    _save(fig, out, opts)


def _plot_loss_vs_time(runs: list[_Run], out: Path, unit: tuple[str, float], opts: ReportOptions) -> None:
    """Test loss against simulated time; a log loss axis with ``--log-y``."""
    name, scale = unit
    fig, ax = _figure()
    for run in runs:
        t = [v / scale for v in run.series("sim_time_s")]
        _curve(ax, t, run.series("loss"), run, opts, run.legend)
    if opts.log_y:
        ax.set_yscale("log")
        _log_labels(ax.yaxis, ax.get_ylim())
    _time_axis(ax, name, opts)
    ax.set_ylabel("test loss (nats" + (", log scale)" if opts.log_y else ")"))
    ax.set_title("Loss against simulated time", loc="left", fontsize="medium")
    _legend(fig, ax)
    _save(fig, out, opts)


def _plot_bytes(runs: list[_Run], out: Path, unit: tuple[str, float], opts: ReportOptions) -> None:
    name, scale = unit
    totals = {}
    for run in runs:
        totals[run.folder] = [u + d for u, d in zip(run.series("bytes_up"), run.series("bytes_down"))]
    peak = max((v for values in totals.values() for v in _finite(values)), default=0.0)
    size_unit, size_scale = ("GB", 1e9) if peak >= 10e9 else ("MB", 1e6)
    fig, ax = _figure()
    for run in runs:
        t = [v / scale for v in run.series("sim_time_s")]
        ax.plot(t, [v / size_scale for v in totals[run.folder]], color=run.color, label=run.legend, linewidth=1.8,
                **run.style)
    _time_axis(ax, name, opts)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"transferred, up + down ({size_unit})")
    ax.set_title("Cumulative communication", loc="left", fontsize="medium")
    _legend(fig, ax)
    _save(fig, out, opts)


def _panels(n: int, title: str, *, sharex: bool = True):
    """A figure of ``n`` stacked panels, styled like :func:`_figure`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0], 0.9 + 1.7 * n), dpi=DPI, layout="constrained")
    axes = fig.subplots(n, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, axis="y", color="#d0d0d0", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, x=0.01, ha="left", fontsize="medium")
    return fig, axes


def _plot_staleness(runs: list[_Run], out: Path, opts: ReportOptions) -> None:
    """One line a run: the share of its aggregated updates at most x versions stale (x on a symlog axis,
    so staleness 0 to a few thousand fits: synchronous rounds jump to 100% at 0, FedAsync spreads)."""
    from matplotlib.ticker import PercentFormatter

    fig, ax = _figure()
    top = 1
    for run in runs:
        hist = {int(k): int(v) for k, v in run.summary["staleness_histogram"].items()}
        n = sum(hist.values())
        values = sorted(hist)
        shares, running = [], 0
        for v in values:
            running += hist[v]
            shares.append(running / n)
        mean = sum(v * hist[v] for v in values) / n
        ax.step([values[0], *values], [0.0, *shares], where="post", color=run.color, lw=2,
                label=f"{run.label} (mean {mean:.2f}, max {values[-1]:,})")  # fmt: skip
        top = max(top, values[-1])
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.2, top * 1.3)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("staleness: server versions between a task's dispatch and its aggregation")
    ax.set_ylabel("share of aggregated updates at most this stale")
    ax.set_title("Staleness of aggregated updates", loc="left")
    _legend(fig, ax)
    _save(fig, out, opts)


def _plot_participation(runs: list[_Run], out: Path, opts: ReportOptions) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    speeds = [float(v) for run in runs for v in run.summary["client_speed"] if v and v > 0]
    low, high = (min(speeds), max(speeds)) if speeds else (1.0, 1.0)
    if high <= low * 1.0001:  # every device alike: a range around it, so the colour scale is defined
        low, high = low / 2, high * 2
    norm, cmap = LogNorm(low, high), colormaps["viridis"]
    fig, axes = _panels(len(runs), "Participation per client, slowest to fastest device", sharex=False)
    orders = []
    for run, ax in zip(runs, axes):
        summary = run.summary
        speed = [float(v) for v in summary["client_speed"]]
        order = sorted(range(len(speed)), key=lambda c: (speed[c], c))
        orders.append(order)
        counts = [summary["participation"][c] for c in order]
        x = range(len(order))
        ax.bar(x, counts, width=0.8, color=[cmap(norm(max(speed[c], low))) for c in order], zorder=3)
        tasks = summary.get("tasks_per_client")
        if isinstance(tasks, list) and len(tasks) == len(order):
            ax.bar(x, [tasks[c] for c in order], width=0.8, fill=False, edgecolor="#444444", linewidth=0.7, zorder=4)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        jain, share = summary.get("participation_jain"), summary.get("participated_frac")
        facts = [f"{sum(counts):,} updates"]
        if isinstance(jain, (int, float)):
            facts.append(f"J = {jain:.2f}")
        if isinstance(share, (int, float)):
            facts.append(f"{100 * share:.0f}% of clients took part")
        ax.set_title(f"{run.label}: {', '.join(facts)}", loc="left", fontsize="small", color=run.color)
        ax.set_ylabel("updates")
        if len(order) <= 40:
            ax.set_xticks(list(x), [str(c) for c in order], fontsize="x-small", rotation=90 if len(order) > 20 else 0)
        else:
            ax.set_xticks([])
    if all(order == orders[-1] for order in orders):  # the same devices (a comparison): ids once, at the bottom
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("client (ids shown when few), slowest device on the left")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.9, pad=0.01)
    bar.set_label("device speed (relative, 1 = median)")
    bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    _save(fig, out, opts)


def _plot_time_breakdown(runs: list[_Run], out: Path, opts: ReportOptions) -> None:
    """One panel a run: a stacked bar per evaluation interval, the growth of each ``BREAKDOWN`` key over it."""
    fig, axes = _panels(len(runs), "Where the time goes, per evaluation interval (seconds summed over clients)",
                        sharex=False)
    for run, ax in zip(runs, axes):
        rounds = run.series("round")
        bottom = [0.0] * (len(rounds) - 1)
        for key, label, color in BREAKDOWN:
            values = [0.0 if math.isnan(v) else v for v in run.series(key)]
            grown = [max(b - a, 0.0) for a, b in zip(values, values[1:])]
            ax.bar(range(len(grown)), grown, bottom=bottom, width=0.8, color=color, label=label, zorder=3)
            bottom = [b + g for b, g in zip(bottom, grown)]
        ticks = range(0, len(bottom), max(1, len(bottom) // 10))
        ax.set_xticks(list(ticks), [f"{rounds[i]:.0f}-{rounds[i + 1]:.0f}" for i in ticks], fontsize="x-small")
        ax.set_title(run.label, loc="left", fontsize="small", color=run.color)
        ax.set_ylabel("seconds")
    axes[-1].set_xlabel("evaluation interval (rounds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(BREAKDOWN), fontsize="x-small", frameon=False)
    _save(fig, out, opts)


# --------------------------------------------------------------------------- HTML
_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #222; max-width: 1000px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; margin-top: 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
table { border-collapse: collapse; font-size: 0.9em; width: 100%; }
th, td { padding: 0.35em 0.6em; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
th { text-align: left; background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e3f4e6; font-weight: 600; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px;
          margin-right: 0.4em; vertical-align: -0.05em; }
.status-completed { color: #1b7a2f; } .status-diverged { color: #c62828; }
.status-interrupted, .status-stalled, .status-unfinished { color: #a86b00; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
details { margin: 0.4em 0; } summary { cursor: pointer; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# (header, summary key, formatter, which value is best: "max", "min" or None)
# shown only when some run is a language model (its summary has final_perplexity)
_PERPLEXITY_COLUMN = ("final perplexity", "final_perplexity", lambda v: "—" if v is None else f"{v:.2f}", "min")
_COLUMNS: list[tuple[str, str, Any, str | None]] = [
    ("final acc", "final_accuracy", format_accuracy, "max"),
    ("best acc", "best_accuracy", format_accuracy, "max"),
    ("time to target", "time_to_target_s", format_duration, "min"),
    ("rounds", "rounds", lambda v: "—" if v is None else str(v), None),
    ("simulated time", "sim_time_s", format_duration, "min"),
    ("wall time", "wall_time_s", format_duration, "min"),
    ("MB up", "bytes_up", format_mb, "min"),
    ("MB down", "bytes_down", format_mb, "min"),
    ("mean staleness", "staleness_mean", lambda v: "—" if v is None else f"{v:.2f}", "min"),
    ("fast idle", "idle_fast_frac", lambda v: "—" if v is None else f"{100 * v:.0f}%", "min"),
    ("Jain particip.", "participation_jain", lambda v: "—" if v is None else f"{v:.2f}", "max"),
]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _columns(runs: list[_Run]) -> list[tuple[str, str, Any, str | None]]:
    """The table's columns: final perplexity first when some run is a language model."""
    if any(_number(run.summary.get("final_perplexity")) is not None for run in runs):
        return [_PERPLEXITY_COLUMN, *_COLUMNS]
    return list(_COLUMNS)


def _best_cells(runs: list[_Run]) -> dict[str, str]:
    """The best value of each ranked column, as shown, when the runs differ in it as shown."""
    best = {}
    for _, key, fmt, direction in _columns(runs):
        values = [v for v in (_number(run.summary.get(key)) for run in runs) if v is not None]
        if not direction or not values:
            continue
        shown = {fmt(run.summary.get(key)) for run in runs}
        if len(shown) > 1:
            best[key] = fmt(max(values) if direction == "max" else min(values))
    return best


def _summary_table(runs: list[_Run]) -> str:
    e = html.escape
    show_label = any(run.label != run.algorithm for run in runs)
    best = _best_cells(runs)
    columns = _columns(runs)
    head = (["run"] if show_label else []) + ["algorithm", "status"] + [c[0] for c in columns]
    lines = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for run in runs:
        swatch = f'<span class="swatch" style="background:{run.color}"></span>'
        cells = []
        if show_label:
            cells.append(f"<td>{swatch}{e(run.label)}</td>")
        cells.append(f"<td>{'' if show_label else swatch}{e(run.algorithm)}</td>")
        status = str(run.summary.get("status") or "—")
        cells.append(f'<td class="status-{e(status)}">{e(status)}</td>')
        for _, key, fmt, _ in columns:
            text = fmt(run.summary.get(key))
            cells.append(f'<td class="num{" best" if best.get(key) == text else ""}">{e(text)}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _p_value(p: float | None) -> str:
    from hetfl.results.seeds import SIGNIFICANCE

    if p is None:
        return "n/a"
    return f"{p:.3g} ({'significant' if p < SIGNIFICANCE else 'not significant'})"


def _against_best(vs: dict | None) -> str:
    """The significance cell: the paired tests of a unit's final accuracy against the best unit's."""
    if vs is None:
        return "best (highest mean)"
    if vs["n"] < 2:
        return f"n/a (fewer than 2 seeds in common with {vs['best']})"
    return (f"{100 * vs['mean_diff']:+.1f} pt over {vs['n']} seeds; paired t-test p = {_p_value(vs['ttest_p'])}; "
            f"Wilcoxon p = {_p_value(vs['wilcoxon_p'])}")


def _entries(units: list[_Run | _Group]) -> list[dict[str, Any]]:
    """Each unit's measures over its seeds (a single run: one seed), with ``vs_best``."""
    from hetfl.results.seeds import against_best, aggregate

    entries = [unit.entry() if isinstance(unit, _Group) else
               aggregate(unit.label, [{**unit.summary, "seed": unit.seed}], [unit.folder.name]) for unit in units]
    against_best(entries)
    return entries


def _accuracy_spread(value: dict) -> str:
    """``85.8% ± 4.3 pt`` (a spread of accuracies in percentage points), ``85.8%`` for one seed, ``—`` for none."""
    if value["mean"] is None or value["std"] is None:
        return format_accuracy(value["mean"])
    return f"{format_accuracy(value['mean'])} ± {100 * value['std']:.1f} pt"


def _seeds_table(units: list[_Run | _Group]) -> str:
    """One row per seed group (and per lone run): mean ± standard deviation over the seeds, and whether the
    difference of its final accuracy to the best one's is significant, paired over the seeds both have."""
    from hetfl.results.seeds import format_spread

    e = html.escape
    head = ["run", "seeds", "status", "final acc", "best acc", "client acc p10", "time to target", "MB up + down",
            "wall time", "final acc against the best"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for unit, entry in zip(units, _entries(units)):
        swatch = f'<span class="swatch" style="background:{unit.color}"></span>'
        status, reached = str(entry["status"]), entry["time_to_target_s"]
        ranked = "vs_best" in entry  # not when no unit has a final accuracy
        target = "—" if entry["target_accuracy"] is None and entry.get("target_perplexity") is None else \
            f"{format_duration(reached['mean_s'])} ({reached['reached']} of {reached['n']})"
        cells = [
            f"<td>{swatch}{e(unit.label)}</td>",
            f"<td>{e(', '.join('—' if s is None else str(s) for s in entry['seeds']))}</td>",
            f'<td class="status-{e(status.split()[0])}">{e(status)}</td>',
            f'<td class="num{" best" if ranked and entry["vs_best"] is None else ""}">'
            f"{e(_accuracy_spread(entry['final_accuracy']))}</td>",
            f'<td class="num">{e(_accuracy_spread(entry["best_accuracy"]))}</td>',
            f'<td class="num">{e(_accuracy_spread(entry["client_acc_p10"]))}</td>',
            f'<td class="num">{e(target)}</td>',
            f'<td class="num">{e(format_spread(entry["bytes"], format_mb))}</td>',
            f'<td class="num">{e(format_spread(entry["wall_time_s"], format_duration))}</td>',
            f"<td>{e(_against_best(entry['vs_best']) if ranked else '—')}</td>",
        ]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


SEEDS_NOTE = (
    "Over seeds: mean ± sample standard deviation (n - 1); accuracies in %, their spread in percentage points. Time "
    "to target: the mean over the seeds that reached it (k of n). Final acc against the best: the difference of the "
    "mean final accuracy to that of the run with the highest, and two-sided paired tests over the seeds both have "
    "(scipy.stats.ttest_rel, the paired t-test; scipy.stats.wilcoxon, the signed-rank test), significant when "
    "p < 0.05; n/a where there are fewer than 2 common seeds, or no differences to test."
)


def _common(runs: list[_Run], key: str, section: str | None = None) -> Any:
    values = set()
    for run in runs:
        value = run.summary.get(key)
        if value is None and section:
            value = run.config.get(section, {}).get(key)
        values.add(value)
    return values.pop() if len(values) == 1 else None


def _html(root: Path, runs: list[_Run], skipped: list[str], images: dict[str, str],
          units: list[_Run | _Group] | None = None) -> str:
    e = html.escape
    title = f"hetfl report: {root.resolve().name}"
    facts = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}"]
    groups = [unit for unit in units or [] if isinstance(unit, _Group)]
    if groups:
        facts[0] += f" ({len(groups)} group{'s' if len(groups) != 1 else ''} of seeds)"
    dataset = _common(runs, "dataset", "data")
    if dataset:
        facts.append(f"dataset {dataset}")
    n_clients = _common(runs, "n_clients", "data")
    if n_clients:
        facts.append(f"{n_clients} clients")
    targets = _targets(runs)
    if targets:
        facts.append("target accuracy " + ", ".join(f"{100 * t:g}%" for t in targets))
    perplexity_targets = sorted({run.perplexity_target for run in runs if run.perplexity_target is not None})
    if perplexity_targets:
        facts.append("target perplexity " + ", ".join(f"{t:.3g}" for t in perplexity_targets))
    facts.append(f"generated {datetime.now().strftime('%Y-%m-%d %H:%M')}")

    notes = []
    if skipped:
        notes.append(f"Skipped, no metrics recorded: {', '.join(skipped)}.")
    for run in runs:
        notes += [f"{run.label}: {note}." for note in run.notes]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{e(" · ".join(facts))}<br><code>{e(str(root.resolve()))}</code></p>',
        *(f'<p class="note">{e(note)}</p>' for note in notes),
        "<h2>Summary</h2>",
    ]
    if groups:
        parts += [_seeds_table(units or []), f'<p class="meta">{e(SEEDS_NOTE)}</p>',
                  "<details><summary>Each run</summary>"]
    parts += [
        _summary_table(runs),
        '<p class="meta">Highlighted: the best value of each column (highest accuracy; shortest time; '
        "fewest bytes; least staleness and fast-client idling; the most even participation). Times are "
        "simulated unless marked wall. Fast idle: share of their online time the fastest 10% of devices "
        "spent without a task. Jain particip.: Jain's fairness index of updates per client (1: even).</p>",
    ]
    if groups:
        parts.append("</details>")
    parts.append("<h2>Plots</h2>")
    for image, caption in images.items():
        parts.append(f'<figure><img src="{image}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    parts.append("<h2>Configurations</h2>")
    for run in runs:
        where = _relative(run.folder, root)
        body = f"<pre>{e(run.config_text)}</pre>" if run.config_text is not None else "<p>no config.yaml</p>"
        about = " · ".join(dict.fromkeys(x for x in (run.name, where) if x != run.label))  # without repeats
        parts.append(f"<details><summary><strong>{e(run.label)}</strong> {e(about)}</summary>{body}</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- entry point
def render_report(path: Path, options: ReportOptions | None = None) -> Path:
    """Draw the plots and write ``report.html`` for every run in or under ``path``; return the HTML path.

    ``options``: formats, log axes and smoothing (:class:`ReportOptions`; default: PNG only, linear, raw)."""
    opts = options or ReportOptions()
    root = Path(path)
    folders = find_runs(root)
    if not folders:
        raise HetflError(f"no hetfl runs under {root} (expected metrics.jsonl files)")
    runs, skipped = [], []
    for folder in folders:
        run = _load_run(folder)
        if run.metrics:
            runs.append(run)
        else:
            skipped.append(_relative(folder, root))
    if not runs:
        raise HetflError(f"no metrics recorded yet in the runs under {root} ({', '.join(skipped)})")
    units = _group_seeds(runs)
    _label_groups(units, root)
    _assign_styles(runs)

    max_time = max((v for run in runs for v in _finite(run.series("sim_time_s"))), default=0.0)
    unit = _time_unit(max_time)
    images = dict(IMAGES)
    if any(isinstance(unit, _Group) for unit in units):
        images["accuracy_vs_time.png"] = SEEDS_CAPTION
        images["accuracy_vs_round.png"] += " Runs that differ only in their seed: one line each, in one colour."
    try:
        _plot_accuracy_vs_time(runs, root / "accuracy_vs_time.png", unit, opts)
        _plot_accuracy_vs_round(runs, root / "accuracy_vs_round.png", opts)
        lm = [run for run in runs if _has_perplexity(run)]
        if lm:
            _plot_perplexity_vs_time(lm, root / PERPLEXITY_IMAGE[0], unit, opts)
            images = {PERPLEXITY_IMAGE[0]: PERPLEXITY_IMAGE[1], **images}  # first: what an LM run is judged by
        else:
            _unlink(root / PERPLEXITY_IMAGE[0])
        with_loss = [run for run in runs if _finite(run.series("loss"))] if not lm else []  # an LM's loss: its ppl
        if with_loss:
            _plot_loss_vs_time(with_loss, root / LOSS_IMAGE[0], unit, opts)
            images[LOSS_IMAGE[0]] = LOSS_IMAGE[1] + (" Log scale." if opts.log_y else "")
        else:
            _unlink(root / LOSS_IMAGE[0])
        _plot_bytes(runs, root / "bytes.png", unit, opts)
        for (image, caption), has, plot in ((STALENESS_IMAGE, _has_staleness, _plot_staleness),
                                            (PARTICIPATION_IMAGE, _has_participation, _plot_participation),
                                            (BREAKDOWN_IMAGE, _has_breakdown, _plot_time_breakdown)):  # fmt: skip
            drawn = [run for run in runs if has(run)]
            if drawn:
                plot(drawn, root / image, opts)
                images[image] = caption
            else:
                _unlink(root / image)  # from an earlier report of other runs
        out = root / REPORT_NAME
        out.write_text(_html(root, runs, skipped, images, units), encoding="utf-8")
    except OSError as err:
        raise HetflError(f"{root}: cannot write the report ({err.strerror or err})") from None
    return out
