"""Fair tuning: ``hetfl sweep`` runs one algorithm over a grid of settings and seeds, scored on validation.

A *setting* is one value for every grid key (``--grid training.lr=0.01,0.05``); a *trial* is one setting run
once per seed. Every trial run trains without its clients' validation samples (``data.validation_fraction``)
and is scored on them (``evaluation.split: validation``): the test split is never read while tuning.
``hetfl compare --tuned SWEEPDIR`` then runs each algorithm at its chosen setting and scores it on the test
split.

What a sweep writes, for ``--out SWEEPDIR``::

    SWEEPDIR/ALGORITHM/sweep.json        every setting, its per-seed scores, mean ± std, the chosen one, the budget
    SWEEPDIR/ALGORITHM/sweep.png         the scores over the grid (results.heatmap)
    SWEEPDIR/ALGORITHM/t<i>-seed<k>/     each run (a hetfl run folder)

The choice, exactly (:func:`choose`): the setting with the highest mean score over the seeds (the lowest for
``time_to_target``); a setting with a seed that has no score (diverged; for ``time_to_target``, never reached the
target) ranks below every setting scored on all seeds; among equal means (to 9 decimal places) the smaller standard deviation wins,
then the setting that comes first in the grid's order (the product of the ``--grid`` values in the order given,
the last key varying fastest).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hetfl.config import ExperimentConfig, apply_overrides, parse_value, validate
from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.results.outdir import SWEEP_NAME
from hetfl.results.seeds import format_spread, mean_std_ci

OBJECTIVES = ("final_accuracy", "best_accuracy", "time_to_target")
DEFAULT_VALIDATION_FRACTION = 0.2
"""The validation share of each client's training samples when the config sets none."""
TIE_DECIMALS = 9
"""Means (and standard deviations) equal to this many decimal places are equal: 0.8500000000000001, the mean of
0.8 and 0.9 in floating point, ties with 0.85."""
FIXED_KEYS = ("seed", "seeds", "strategy.name", "evaluation.split", "data.validation_fraction")
"""Keys the sweep sets itself: not grid keys (--seeds, --algorithm, --validation-fraction say them)."""
_UNHASHED = ("seed", "seeds", "code", "backend", "threads", "checkpoint_every", "data.validation_fraction",
             "evaluation.split")
"""Keys that do not change what a setting is tuned for: left out of the config's hash."""


# ---------------------------------------------------------------------------- the grid
def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid KEY=v1,v2`` options as ``{key: [values]}``, values read as ``--set`` reads them (``0.01`` a float,
    ``5`` an int, ``true`` a bool, else a string); a mistake is one line naming the option."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HetflError(f"--grid {item!r}: expected KEY=v1,v2,..., e.g. --grid training.lr=0.01,0.05")
        if key in FIXED_KEYS:
            raise HetflError(f"--grid {key}: set by the sweep itself (--seeds, --algorithm, --validation-fraction); "
                             "not a grid key")
        if key in grid:
            raise HetflError(f"--grid {key}: given twice; list all its values in one --grid {key}=v1,v2")
        values = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not v for v in values):
            raise HetflError(f"--grid {item!r}: an empty value; e.g. --grid {key}=0.01,0.05")
        parsed = [parse_value(v) for v in values]
        if len({json.dumps(v, sort_keys=True) for v in parsed}) < len(parsed):
            raise HetflError(f"--grid {key}: a value given twice")
        grid[key] = parsed
    if not grid:
        raise HetflError("hetfl sweep: no --grid given; e.g. --grid training.lr=0.01,0.05")
    return grid


def settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every setting of ``grid``: the product of its values, keys in their order, the last varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def overrides(setting: dict[str, Any]) -> list[str]:
    """A setting as ``--set`` overrides (values as JSON, which the YAML parser reads back as they were)."""
    return [f"{key}={json.dumps(value)}" for key, value in setting.items()]


def algorithm_raw(base: ExperimentConfig, algorithm: str) -> dict[str, Any]:
    """``base`` as a raw mapping for ``algorithm``: its name, its parameters (``strategy.params_for``), no
    ``per_algorithm``, no ``seeds`` and no ``code`` record (each run records its own), as ``hetfl compare`` runs it."""
    raw = base.model_dump()
    raw.pop("code", None)
    raw["strategy"].update(name=algorithm, params=base.strategy.params_for(algorithm), per_algorithm={})
    raw.update(seeds=None)
    return raw


def _drop(raw: dict[str, Any], key: str) -> None:
    node: Any = raw
    *sections, last = key.split(".")
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def config_hash(base: ExperimentConfig, algorithm: str, keys: Sequence[str]) -> str:
    """SHA-256 (16 hex digits) of what ``algorithm`` runs with from ``base``, less the grid ``keys`` and what does not
    change a run's result (seeds, backend, threads, checkpoints, the validation split): a tuned setting is applied
    only to the config it was tuned on."""
    raw = json.loads(json.dumps(algorithm_raw(base, algorithm), default=str))
    for key in (*_UNHASHED, *keys):
        _drop(raw, key)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- scores and the choice
def score(summary: dict[str, Any] | None, objective: str) -> float | None:
    """A run's score: its final or best accuracy, or its time to target (None: diverged, not reached)."""
    if not summary or summary.get("status") == "diverged":
        return None
    value = summary.get("time_to_target_s" if objective == "time_to_target" else objective)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def spread(scores: Sequence[float | None]) -> dict[str, Any]:
    """:func:`hetfl.results.seeds.mean_std_ci` of a setting's per-seed scores, with ``complete``: every seed has one."""
    return {**mean_std_ci(scores), "complete": all(s is not None for s in scores)}


def choose(trials: Sequence[dict[str, Any]], objective: str) -> int:
    """The index of the chosen trial (each with ``score``, a :func:`spread`), by the rule in the module docstring."""
    sign = -1.0 if objective == "time_to_target" else 1.0

    def rank(i: int) -> tuple:
        s = trials[i]["score"]
        if not s["complete"] or s["mean"] is None:
            return (1, 0.0, 0.0, i)
        return (0, round(-sign * s["mean"], TIE_DECIMALS), round(s["std"] or 0.0, TIE_DECIMALS), i)

    return min(range(len(trials)), key=rank)


# ---------------------------------------------------------------------------- running trials
def run_trial(cfg: ExperimentConfig, folder: str) -> dict[str, Any]:
    """One run of a trial, in this process or a worker: its summary (a diverged run's, status ``diverged``)."""
    from hetfl.engine.run import run_experiment
    from hetfl.results import SUMMARY_NAME, read_summary

    try:
        return run_experiment(cfg, folder, show_progress=False, overwrite=True)
    except DivergedError as err:
        path = Path(folder) / SUMMARY_NAME
        summary = read_summary(path) if path.is_file() else {}
        return {**summary, "status": "diverged", "error": str(err)}


def run_all(runs: list[tuple[ExperimentConfig, str]], jobs: int = 1, ray: str | None = None,
            done: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every ``(config, folder)`` run, in order of ``runs``: in this process (``jobs`` 1), in ``jobs`` worker
    processes (spawned: a fresh interpreter each), or as Ray tasks (``ray``: an address, or ``local`` for a Ray
    started here). Each run depends only on its config, so the results are the same however they are run.
    ``done(i, summary)`` is called as each finishes."""
    results: list[dict[str, Any] | None] = [None] * len(runs)
    if ray is not None:
        from hetfl.engine.backends import code_roots, import_ray, start_ray

        try:
            ray_module = import_ray()
        except ConfigError:
            raise HetflError("--ray: Ray is not installed; pip install hetfl[ray]") from None
        cfg = runs[0][0]
        roots = list(dict.fromkeys(root for c, _ in runs for root in code_roots(c.code)))
        start_ray(None if ray == "local" else ray, jobs if jobs > 1 else None, cfg.threads, cfg.backend.runtime_env,
                  roots)  # local: ``jobs`` runs at once (default: this machine's cores / threads)
        remote = ray_module.remote(num_cpus=cfg.threads)(run_trial)
        pending = {remote.remote(cfg, folder): i for i, (cfg, folder) in enumerate(runs)}
        while pending:
            ready, _ = ray_module.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            results[i] = ray_module.get(ready[0])
            if done:
                done(i, results[i])
    elif jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_trial, cfg, folder): i for i, (cfg, folder) in enumerate(runs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if done:
                    done(i, results[i])
    else:
        for i, (cfg, folder) in enumerate(runs):
            results[i] = run_trial(cfg, folder)
            if done:
                done(i, results[i])
    return [r or {} for r in results]


# ---------------------------------------------------------------------------- a sweep
def plan(base: ExperimentConfig, algorithm: str, grid: dict[str, list[Any]], seeds: Sequence[int],
         validation_fraction: float, source: str, base_dir: Path) -> list[tuple[dict[str, Any], list[ExperimentConfig]]]:
    """Every setting of ``grid`` with its validated config per seed (all checked before any runs: a bad key or value
    is one line naming the setting), trained without and scored on the validation split."""
    from hetfl.engine.run import check_architectures
    from hetfl.strategies import build_strategy

    raw = algorithm_raw(base, algorithm)
    raw["data"]["validation_fraction"] = validation_fraction
    raw["evaluation"]["split"] = "validation"
    trials = []
    for setting in settings(grid):
        configs = []
        where = ", ".join(f"{k}={v}" for k, v in setting.items())
        for seed in seeds:
            try:
                trial = apply_overrides(json.loads(json.dumps(raw, default=str)), overrides(setting))
                cfg = validate({**trial, "seed": seed}, source=f"{source} ({algorithm}, {where})", base_dir=base_dir)
            except ConfigError as err:
                raise ConfigError(f"--grid: {err}") from None
            if not configs:
                try:
                    check_architectures(build_strategy(cfg.strategy, cfg.training, cfg.model), len(cfg.model.zoo))
                except (ConfigError, ValueError) as err:
                    raise ConfigError(f"--grid ({algorithm}, {where}): {err}") from None
            configs.append(cfg)
        trials.append((setting, configs))
    return trials


def trial_folder(index: int, seed: int) -> str:
    return f"t{index}-seed{seed}"


def record(algorithm: str, config: str, digest: str, objective: str, grid: dict[str, list[Any]], seeds: Sequence[int],
           validation_fraction: float, trials: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> dict[str, Any]:
    """``sweep.json``: every setting with its runs' folders, per-seed scores and :func:`spread`, the chosen one and
    the budget (settings, and runs: settings x seeds)."""
    entries = []
    for i, (setting, summaries) in enumerate(trials):
        scores = [score(s, objective) for s in summaries]
        entries.append({
            "index": i, "setting": setting, "folders": [trial_folder(i, seed) for seed in seeds],
            "scores": dict(zip((str(s) for s in seeds), scores)), "score": spread(scores),
            "status": [s.get("status") for s in summaries],
        })
    best = choose(entries, objective)
    return {
        "algorithm": algorithm, "config": config, "config_hash": digest, "objective": objective,
        "split": "validation", "validation_fraction": validation_fraction, "grid": grid, "seeds": list(seeds),
        "budget": {"settings": len(entries), "runs": len(entries) * len(seeds)},
        "trials": entries, "best": {"index": best, "setting": entries[best]["setting"], "score": entries[best]["score"]},
    }


def run_sweep(base: ExperimentConfig, algorithm: str, grid: dict[str, list[Any]], seeds: Sequence[int], root: Path, *,
              objective: str, validation_fraction: float, source: str, base_dir: Path, jobs: int = 1,
              ray: str | None = None, overwrite: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sweep ``algorithm`` over ``grid`` x ``seeds`` into ``root/ALGORITHM`` (refused before anything runs if that
    holds anything but this algorithm's earlier sweep, which only ``overwrite`` replaces); returns ``sweep.json``."""
    from hetfl.results.heatmap import draw_sweep
    from hetfl.results.outdir import check_sweep_out, clear_run, folder_name, lock_out

    planned = plan(base, algorithm, grid, seeds, validation_fraction, source, base_dir)
    runs = [(cfg, trial_folder(i, seed)) for i, (_, configs) in enumerate(planned) for cfg, seed in zip(configs, seeds)]
    folder = folder_name(algorithm)
    stale = check_sweep_out(root, folder, [name for _, name in runs], overwrite=overwrite)
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    with lock_out(out):  # one process per algorithm's sweep; sweeps of other algorithms may share root
        check_sweep_out(root, folder, [name for _, name in runs], overwrite=overwrite)
        (out / SWEEP_NAME).unlink(missing_ok=True)  # a sweep that stops part-way leaves no stale record
        for old in stale:
            clear_run(old)

        def done(i: int, summary: dict[str, Any]) -> None:
            if progress:
                value = score(summary, objective)
                shown = "—" if value is None else _fmt(objective)(value)
                progress(f"{runs[i][1]}: {summary.get('status')}, {objective} {shown}")

        summaries = run_all([(cfg, str(out / name)) for cfg, name in runs], jobs=jobs, ray=ray, done=done)
        per_seed = iter(summaries)
        trials = [(setting, [next(per_seed) for _ in seeds]) for setting, _ in planned]
        sweep = record(algorithm, source, config_hash(base, algorithm, list(grid)), objective, grid, seeds,
                       validation_fraction, trials)
        (out / SWEEP_NAME).write_text(json.dumps(sweep, indent=2))
        draw_sweep(sweep, out / "sweep.png")
    return sweep


def read_sweep(folder: Path) -> dict[str, Any]:
    """An algorithm's ``sweep.json`` (a one-line error if it is missing or not one)."""
    path = folder / SWEEP_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HetflError(f"{folder}: no {SWEEP_NAME}; a hetfl sweep --out writes one per algorithm") from None
    except (OSError, ValueError) as err:
        raise HetflError(f"{path}: not a sweep record ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("best"), dict) or "algorithm" not in data:
        raise HetflError(f"{path}: not a sweep record (no algorithm and best setting)")
    return data


def read_sweeps(root: Path, algorithms: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The sweeps in ``root`` (``hetfl compare --tuned``): algorithm -> its sweep.json, for ``algorithms`` (in that
    order) or every algorithm swept there."""
    from hetfl.results.outdir import folder_name

    if not root.is_dir():
        raise HetflError(f"--tuned {root}: no such folder; run hetfl sweep --out {root} first")
    if algorithms is None:
        found = [read_sweep(d) for d in sorted(root.iterdir()) if (d / SWEEP_NAME).is_file()]
        if not found:
            raise HetflError(f"--tuned {root}: no algorithm swept there (no */{SWEEP_NAME})")
        return {s["algorithm"]: s for s in found}
    sweeps = {}
    for name in algorithms:
        if not (root / folder_name(name) / SWEEP_NAME).is_file():
            raise HetflError(f"--tuned {root}: {name} was not swept there; hetfl sweep --algorithm {name} --out {root}")
        sweeps[name] = read_sweep(root / folder_name(name))
    return sweeps


def _fmt(objective: str) -> Callable[[float], str]:
    from hetfl.results import format_duration

    return format_duration if objective == "time_to_target" else (lambda v: f"{v:.4f}")


def sweep_table(sweep: dict[str, Any]):
    """The printed table: one row per setting, its validation score mean ± std and per-seed scores; ``*`` marks
    the chosen one."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    fmt = _fmt(sweep["objective"])
    table = Table(title=escape(f"{sweep['algorithm']}: {sweep['objective']} on the validation split "
                               f"({sweep['budget']['settings']} settings x {len(sweep['seeds'])} seeds)"),
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), caption_justify="left",
                  caption="mean ± standard deviation over the seeds; * the chosen setting (hetfl compare --tuned "
                  "runs it); — a seed without a score (diverged, or target not reached)")
    table.add_column("")
    for key in sweep["grid"]:
        table.add_column(escape(key), justify="right")
    table.add_column("score", justify="right")
    table.add_column("per seed", justify="right")
    for t in sweep["trials"]:
        chosen = t["index"] == sweep["best"]["index"]
        cells = ["*" if chosen else "", *(escape(str(t["setting"][k])) for k in sweep["grid"])]
        cells.append(escape(format_spread(t["score"], fmt)) if t["score"]["complete"] else "—")
        cells.append(" ".join("—" if v is None else fmt(v) for v in t["scores"].values()))
        table.add_row(*cells, style="bold green" if chosen else None)
    return table


__all__ = ["DEFAULT_VALIDATION_FRACTION", "FIXED_KEYS", "OBJECTIVES", "SWEEP_NAME", "algorithm_raw", "choose",
           "config_hash", "overrides", "parse_grid", "plan", "read_sweep", "read_sweeps", "record", "run_all", "run_sweep",
           "run_trial", "score", "settings", "spread", "sweep_table", "trial_folder"]
