"""The ``hetfl`` command line.

    hetfl run CONFIG.yaml --out DIR [--set key=value ...]      one experiment (--overwrite: replace a run in DIR)
    hetfl run --resume DIR [--set rounds=100]                  continue from the last checkpoint
    hetfl compare CONFIG.yaml --algorithms a,b,c --out DIR     same seed, data and devices; one table
                  [--seeds 0,1,2]                              each algorithm on each seed: mean ± std, 95% CI
    hetfl sweep CONFIG.yaml --algorithm A --grid KEY=v1,v2 --out SWEEPDIR   tune A on a validation split
    hetfl compare CONFIG.yaml --tuned SWEEPDIR --seeds 10,11,12 --out DIR   the swept algorithms at their chosen settings
    hetfl report DIR                                           PNG plots and one HTML page
                 [--format png,pdf,svg] [--log-x] [--log-y] [--smooth N]
    hetfl partition CONFIG.yaml                                per-client data statistics
    hetfl devices CONFIG.yaml                                  the simulated devices
    hetfl runs [--root results] [--algorithm A] ...            past runs, from the SQLite index
    hetfl algorithms                                           every name a config can give code by, and its origin
    hetfl config [--markdown]                                  every config key, type, default, meaning
    hetfl partition CONFIG.yaml --export DIR                   each client's data as DIR/client_<i>.npz
    hetfl tokens N --out tokens.yaml                           N client tokens for a deployment
    hetfl server CONFIG.yaml --address HOST:PORT --out DIR     a real server (gRPC), see docs/deployment.md
    hetfl client --server HOST:PORT --token-file F --data D    a real client

A user's mistake (bad config, missing file, diverging run) is one line on stderr and a non-zero
exit, never a traceback. ``--out`` never destroys data (:mod:`hetfl.results.outdir`): a folder that is
not new, empty or an earlier run of hetfl's is refused, and an earlier run is replaced only with
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hetfl.config import apply_overrides, load_config, validate
from hetfl.errors import DivergedError, HetflError
from hetfl.results import format_duration, format_mb

DEFAULT_RESULTS = "results"
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130

# Rich falls back to 80 columns when output is not a terminal (a pipe, CI); tables need more.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


def _fmt_acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_ppl(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _announce(summary: dict[str, Any], out: Path) -> None:
    """The line after a run: its score (a language model's perplexity, else accuracy), times, target, folder."""
    if summary.get("final_perplexity") is not None:  # a language model: accuracy is next-token accuracy
        score = (f"perplexity {_fmt_ppl(summary['final_perplexity'])}, next-token accuracy "
                 f"{_fmt_acc(summary['final_accuracy'])} (best {_fmt_acc(summary['best_accuracy'])})")
        target = f"perplexity target {_fmt_ppl(summary.get('target_perplexity'))}"
    else:
        score = f"accuracy {_fmt_acc(summary['final_accuracy'])} (best {_fmt_acc(summary['best_accuracy'])})"
        target = f"target {summary['target_accuracy']}"
    console.print(
        f"[bold]{summary['algorithm']}[/]: {summary['status']}, {score} after {summary['rounds']} rounds; "
        f"simulated {format_duration(summary['sim_time_s'])}, wall {format_duration(summary['wall_time_s'])}; "
        f"{target} reached at {format_duration(summary['time_to_target_s'])}. Results: {escape(str(out))}"
    )


def _one_line(message: object) -> str:
    """A message on one line: the lines of a multi-line message joined with spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _error(message: object) -> None:
    """``error: message`` on stderr, one line, printed as plain text (a path like ``data[/x]`` is not markup)."""
    err_console.print(Text.assemble(("error:", "red"), " ", _one_line(message)), highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from hetfl.engine.run import resume_experiment, run_experiment
    from hetfl.results.outdir import check_run_out

    if args.resume:
        if args.config or args.out:
            raise HetflError("hetfl run: give either CONFIG.yaml --out DIR, or --resume DIR, not both")
        if args.overwrite:
            raise HetflError("hetfl run: --overwrite replaces a run with a new one; --resume continues it, so not both")
        out = Path(args.resume)
        summary = resume_experiment(out, args.set, show_progress=not args.quiet, console=console)
    else:
        if not args.config or not args.out:
            raise HetflError("hetfl run: expected CONFIG.yaml --out DIR (or --resume DIR)")
        out = Path(args.out)
        check_run_out(out, overwrite=args.overwrite)  # before anything else: nothing is touched if it is refused
        cfg = load_config(args.config, args.set)
        summary = run_experiment(cfg, out, show_progress=not args.quiet, console=console, overwrite=args.overwrite)
    _announce(summary, out)
    return EXIT_INTERRUPTED if summary["status"] == "interrupted" else 0


def _fmt_fixed(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


# (header, summary key, formatter); two-line headers keep the table within 100-120 columns
_COMPARE_COLUMNS: list[tuple[str, str, Any]] = [
    ("final\nacc", "final_accuracy", _fmt_acc),
    ("best\nacc", "best_accuracy", _fmt_acc),
    ("time to\ntarget", "time_to_target_s", format_duration),
    ("rounds\nto tgt", "rounds_to_target", lambda v: "—" if v is None else str(v)),
    ("sim\ntime", "sim_time_s", format_duration),
    ("wall\ntime", "wall_time_s", format_duration),
    ("MB\nup", "bytes_up", format_mb),
    ("MB\ndown", "bytes_down", format_mb),
    ("mean\nstale", "staleness_mean", _fmt_fixed),
    ("fast\nidle", "idle_fast_frac", _fmt_percent),
    ("Jain\npart.", "participation_jain", _fmt_fixed),
]
# shown only when some run is personalised: the mean accuracy of clients' own models on their own test data
_PERSONAL_COLUMN = ("pers.\nacc", "personal_acc_mean", _fmt_acc)
# shown only when some run is a language model: its final perplexity (accuracy is then next-token accuracy)
_PERPLEXITY_COLUMN = ("final\nppl", "final_perplexity", _fmt_ppl)


def comparison_table(summaries: list[dict[str, Any]], title: str) -> Table:
    """One row per run. mean stale: mean staleness of aggregated updates; fast idle: share of their online
    time the fastest 10% of devices spent without a task; Jain part.: Jain's index of updates per client."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), caption_justify="left", caption=(
        "mean stale: versions between a task's dispatch and its aggregation. fast idle: share of their online "
        "time the fastest 10% of devices spent without a task. Jain part.: evenness of updates per client (1: even)."
    ))  # fmt: skip
    columns = list(_COMPARE_COLUMNS)
    if any(s.get("personal_acc_mean") is not None for s in summaries):
        columns.insert(2, _PERSONAL_COLUMN)
        table.caption += " pers. acc: mean accuracy of each client's own model on its own test split."
    if any(s.get("final_perplexity") is not None for s in summaries):
        columns.insert(0, _PERPLEXITY_COLUMN)
        table.caption += " ppl: perplexity of the language model (acc: next-token accuracy)."
    table.add_column("algorithm", justify="left", no_wrap=True)
    table.add_column("status", justify="left")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    reached = [s["time_to_target_s"] for s in summaries if s.get("time_to_target_s") is not None]
    fastest = min(reached) if reached else None
    for s in summaries:
        cells = [escape(str(s.get("algorithm"))), escape(str(s.get("status")))]
        for _, key, fmt in columns:
            text = escape(fmt(s.get(key)))
            if key == "time_to_target_s" and fastest is not None and s.get(key) == fastest:
                text = f"[bold green]{text}[/]"
            cells.append(text)
        table.add_row(*cells)
    return table


def _algorithms(text: str) -> dict[str, str]:
    """``--algorithms``: each name (built-in, an installed package's, or an import path) and its run's folder."""
    from hetfl import registry
    from hetfl.results.outdir import folder_name

    algorithms = list(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    if not algorithms:
        raise HetflError("--algorithms: none given; e.g. --algorithms fedavg,fedprox or mymodule:MyStrategy")
    for name in algorithms:
        try:
            registry.check_name("strategy", name)
        except ValueError as err:
            raise HetflError(f"--algorithms: {err}") from None
    folders = {name: folder_name(name) for name in algorithms}
    for name, folder in folders.items():
        same = [other for other, f in folders.items() if f == folder and other != name]
        if same:
            raise HetflError(f"--algorithms: {name} and {same[0]} would share the run folder {folder}; name them apart")
    return folders


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct non-negative integers."""
    from hetfl.config import check_seeds

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise HetflError("--seeds: none given; e.g. --seeds 0,1,2")
    seeds = []
    for item in items:
        try:
            seeds.append(int(item))
        except ValueError:
            raise HetflError(f"--seeds: {item!r} is not an integer; e.g. --seeds 0,1,2") from None
    try:
        return check_seeds(seeds)
    except ValueError as err:
        raise HetflError(f"--seeds: {err}") from None


def _fmt_reached(value: dict | None) -> str:
    if not value:
        return "—"
    return f"{format_duration(value.get('mean_s'))} ({value['reached']} of {value['n']})"


# (header, comparison.json key, formatter of one number) for a comparison over several seeds
_SEEDS_COLUMNS: list[tuple[str, str, Any]] = [
    ("final acc", "final_accuracy", _fmt_acc),
    ("best acc", "best_accuracy", _fmt_acc),
    ("client acc\np10", "client_acc_p10", _fmt_acc),
    ("MB\nup + down", "bytes", format_mb),
    ("wall\ntime", "wall_time_s", format_duration),
]


def seeds_table(entries: list[dict[str, Any]], title: str) -> Table:
    """One row per algorithm of a comparison over several seeds: mean ± sample standard deviation of each measure,
    the time to target as the mean over the seeds that reached it and how many did."""
    from hetfl.results.seeds import format_spread

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), caption_justify="left",
                  caption="mean ± standard deviation over the seeds (sample, n - 1). time to target: mean over the "
                  "seeds that reached it (k of n). The 95% confidence intervals are in comparison.json.")  # fmt: skip
    for header in ("algorithm", "seeds", "status"):
        table.add_column(header, justify="left", no_wrap=header == "algorithm")
    for header, _, _ in _SEEDS_COLUMNS[:2]:
        table.add_column(header, justify="right")
    table.add_column("time to\ntarget", justify="right")
    for header, _, _ in _SEEDS_COLUMNS[2:]:
        table.add_column(header, justify="right")
    for e in entries:
        cells = [escape(str(e["algorithm"])), escape(",".join(str(s) for s in e["seeds"])), escape(str(e["status"]))]
        spreads = [escape(format_spread(e.get(key), fmt)) for _, key, fmt in _SEEDS_COLUMNS]
        table.add_row(*cells, *spreads[:2], escape(_fmt_reached(e.get("time_to_target_s"))), *spreads[2:])
    return table


def _check_params_overrides(overrides: list[str], config_algorithm: str, algorithms: dict[str, str] | None) -> None:
    """``--set strategy.params.X=...`` sets the parameters of the config's ``strategy.name`` only
    (``StrategyConfig.params_for``): refuse it in one line when the comparison does not run that algorithm, instead
    of dropping it silently."""
    if algorithms is None or config_algorithm in algorithms:
        return
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "strategy.params" or key.startswith("strategy.params."):
            rest = key[len("strategy.params"):].lstrip(".")
            names = ", ".join(algorithms)
            raise HetflError(
                f"--set {key}: strategy.params are the parameters of strategy.name ({config_algorithm}), which this "
                f"comparison does not run; set strategy.per_algorithm.<algorithm>{'.' + rest if rest else ''} for "
                f"{names}, or --set strategy.name=<algorithm>"
            )


def cmd_compare(args: argparse.Namespace) -> int:
    from hetfl.engine.backends import code_roots, share_ray
    from hetfl.engine.run import check_architectures, run_experiment
    from hetfl.results import SUMMARY_NAME, read_summary, render_report
    from hetfl.results.outdir import check_comparison_out, clear_run, lock_out
    from hetfl.results.seeds import against_best, aggregate
    from hetfl.strategies import build_strategy

    from hetfl.sweep import algorithm_raw

    if args.algorithms is None and args.tuned is None:
        raise HetflError("hetfl compare: give --algorithms a,b,c, or --tuned SWEEPDIR (its swept algorithms)")
    algorithms = _algorithms(args.algorithms) if args.algorithms is not None else None
    seeds = _seeds(args.seeds) if args.seeds is not None else None  # a mistake here is said before the config's
    out = Path(args.out)
    base = load_config(args.config, args.set)
    _check_params_overrides(args.set or [], base.strategy.name, algorithms)
    tuned = _tuned(args, base, algorithms, seeds) if args.tuned is not None else {}
    if algorithms is None:
        algorithms = _algorithms(",".join(tuned))
    seeds = seeds or base.seeds or [base.seed]
    seeded = len(seeds) > 1  # several seeds: a run folder per (algorithm, seed), and means over the seeds
    folders = {(name, seed): f"{folder}-seed{seed}" if seeded else folder
               for name, folder in algorithms.items() for seed in seeds}
    replaced = check_comparison_out(out, list(folders.values()), overwrite=args.overwrite)  # all, before any run
    config_dir = Path(args.config).parent.resolve()  # where an algorithm named by import path is looked for first
    configs = {}
    for name in algorithms:  # every algorithm's parameters and optimiser are checked before the first run starts
        raw = algorithm_raw(base, name)  # each run is of one seed; the code recorded again for this algorithm's
        if name in tuned:  # its chosen setting, scored on the test split
            raw = apply_overrides(raw, [*tuned[name]["overrides"], "evaluation.split=test"])
        for seed in seeds:
            cfg = validate({**raw, "seed": seed}, source=f"{args.config} ({name})", base_dir=config_dir)
            if seed == seeds[0]:
                strategy = build_strategy(cfg.strategy, cfg.training, cfg.model)
                check_architectures(strategy, len(cfg.model.zoo))  # before any run (assignment needs the devices)
            configs[name, seed] = cfg
    with lock_out(out):  # one process per comparison folder (each run locks its own folder too)
        runs, diverged, interrupted = {}, [], False
        roots = [root for cfg in configs.values() for root in code_roots(cfg.code)]  # every run's code, for Ray workers
        share_ray(base, list(dict.fromkeys(roots)))  # backend.name ray: one Ray for every run, not one per algorithm
        for key, cfg in configs.items():
            name, seed = key
            folder = out / folders[key]
            try:
                summary = run_experiment(cfg, folder, show_progress=not args.quiet, console=console,
                                         describe=name == next(iter(algorithms)),  # one federation per seed: said once
                                         overwrite=args.overwrite, group=out)  # fmt: skip
            except KeyboardInterrupt:  # while the next federation was being built: keep what the others measured
                interrupted = True
                break
            except DivergedError as err:  # one algorithm diverging does not void the comparison
                diverged.append(f"{name}{f' (seed {seed})' if seeded else ''} diverged ({_one_line(err)})")
                if not (folder / SUMMARY_NAME).is_file():
                    continue
                summary = read_summary(folder / SUMMARY_NAME)
            runs[key] = summary
            if summary["status"] == "interrupted":
                interrupted = True
                break
        for stale in replaced:  # --overwrite: the earlier comparison's runs not made again now
            clear_run(stale)
        title = f"{base.name}: {base.data.dataset}, {base.data.n_clients} clients"
        if seeded:
            compared: list[dict[str, Any]] = []
            for name in algorithms:
                done = [key for key in configs if key[0] == name and key in runs]
                if done:
                    compared.append(aggregate(name, [runs[k] for k in done], [folders[k] for k in done]))
            against_best(compared)
            console.print(seeds_table(compared, escape(f"{title}, seeds {','.join(str(s) for s in seeds)}")))
        else:
            compared = list(runs.values())
            console.print(comparison_table(compared, escape(f"{title}, seed {seeds[0]}")))
        for entry, name in zip(compared, [n for n in algorithms if any(k[0] == n for k in runs)]):
            if name in tuned:
                entry["tuned"] = {k: v for k, v in tuned[name].items() if k != "overrides"}
                console.print(f"tuned {escape(name)}: {escape(tuned[name]['line'])}", highlight=False)
        if compared:
            (out / "comparison.json").write_text(json.dumps(compared, indent=2))
            console.print(f"Report: {escape(str(render_report(out)))}")
        elif args.overwrite:  # nothing measured: the earlier comparison's table would describe runs that are gone
            (out / "comparison.json").unlink(missing_ok=True)
    if diverged:
        _error("; ".join(diverged))
        return EXIT_DIVERGED
    return EXIT_INTERRUPTED if interrupted else 0


def _tuned(args: argparse.Namespace, base: Any, algorithms: dict[str, str] | None, seeds: list[int] | None
           ) -> dict[str, dict[str, Any]]:
    """``hetfl compare --tuned SWEEPDIR``: each algorithm's chosen setting (as overrides) and trial budget, refused
    in one line when it was tuned on another config (unless --any-config); a warning when budgets differ, or the
    seeds are the tuning's."""
    from hetfl.results.seeds import format_spread
    from hetfl.sweep import config_hash, overrides, read_sweeps

    sweeps = read_sweeps(Path(args.tuned), list(algorithms) if algorithms is not None else None)
    tuned = {}
    for name, sweep in sweeps.items():
        digest = config_hash(base, name, list(sweep.get("grid", {})))
        if digest != sweep.get("config_hash") and not args.any_config:
            raise HetflError(f"--tuned {args.tuned}: {name} was swept on another config ({sweep.get('config')}, "
                             f"hash {sweep.get('config_hash')}; this one {digest}); compare on that config, or add "
                             "--any-config to apply its setting anyway")
        setting, budget = sweep["best"]["setting"], sweep.get("budget", {})
        score = format_spread(sweep["best"].get("score"), lambda v: f"{v:.4f}")
        line = (", ".join(f"{k}={v}" for k, v in setting.items()) + f" (best of {budget.get('settings')} settings x "
                f"{len(sweep.get('seeds', []))} seeds = {budget.get('runs')} runs; validation {sweep.get('objective')} "
                f"{score})")
        tuned[name] = {"setting": setting, "budget": budget, "objective": sweep.get("objective"),
                       "validation_score": sweep["best"].get("score"), "tuning_seeds": sweep.get("seeds"),
                       "sweep": str(Path(args.tuned) / name), "overrides": overrides(setting), "line": line}
    budgets = {name: t["budget"].get("runs") for name, t in tuned.items()}
    if len(set(budgets.values())) > 1:
        _warn("tuning budgets differ (" + ", ".join(f"{n} {b} runs" for n, b in budgets.items()) + "): the ranking "
              "favours the algorithms tuned more")
    used = set(seeds or base.seeds or [base.seed])
    reused = sorted(used & {s for t in tuned.values() for s in t["tuning_seeds"] or []})
    if reused:
        _warn(f"seeds {','.join(map(str, reused))} were also tuning seeds; fresh seeds (e.g. --seeds 10,11,12) make "
              "the test scores independent of the tuning")
    return tuned


def _warn(message: str) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), " ", _one_line(message)), highlight=False, soft_wrap=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    from hetfl.sweep import DEFAULT_VALIDATION_FRACTION, OBJECTIVES, parse_grid, run_sweep, sweep_table

    grid = parse_grid(args.grid)
    if "," in args.algorithm:
        raise HetflError("--algorithm: one algorithm a sweep; sweep the others into the same --out, one call each")
    algorithm = next(iter(_algorithms(args.algorithm)))
    seeds = _seeds(args.seeds) if args.seeds is not None else None
    if args.objective not in OBJECTIVES:
        raise HetflError(f"--objective {args.objective!r}: one of {', '.join(OBJECTIVES)}")
    if args.jobs < 1:
        raise HetflError("--jobs: at least 1")
    base = load_config(args.config, args.set)
    fraction = args.validation_fraction or base.data.validation_fraction or DEFAULT_VALIDATION_FRACTION
    if not 0 < fraction < 1:
        raise HetflError(f"--validation-fraction {fraction}: a share of each client's training samples, in (0, 1)")
    seeds = seeds or base.seeds or [base.seed]
    progress = None if args.quiet else lambda line: console.print(escape(line))
    sweep = run_sweep(base, algorithm, grid, seeds, Path(args.out), objective=args.objective,
                      validation_fraction=fraction, source=args.config, base_dir=Path(args.config).parent.resolve(),
                      jobs=args.jobs, ray=args.ray, overwrite=args.overwrite, progress=progress)
    console.print(sweep_table(sweep))
    console.print(f"chosen: {escape(', '.join(f'{k}={v}' for k, v in sweep['best']['setting'].items()))}; "
                  f"results: {escape(str(Path(args.out) / sweep['algorithm']))}", highlight=False)
    return 0


def _report_options(args: argparse.Namespace):
    """``hetfl report``'s drawing flags as :class:`hetfl.results.ReportOptions`; a bad value names its flag."""
    from hetfl.results import ReportOptions

    formats = tuple(dict.fromkeys(f.strip().lower() for f in args.format.split(",") if f.strip()))
    smooth = None
    if args.smooth is not None:
        try:
            smooth = int(args.smooth)
        except ValueError:
            raise HetflError(f"--smooth: {args.smooth!r} is not a whole number of evaluations >= 1") from None
    return ReportOptions(formats=formats, log_x=args.log_x, log_y=args.log_y, smooth=smooth)


def cmd_report(args: argparse.Namespace) -> int:
    from hetfl.results import render_report

    options = _report_options(args)
    path = Path(args.dir)
    if not path.is_dir():
        raise HetflError(f"{path}: no such directory")
    console.print(f"Report: {escape(str(render_report(path, options)))}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from hetfl.data import federate, partition_stats, stats_table

    cfg = load_config(args.config, args.set)
    if args.export:
        from hetfl.deploy.export import export_partitions

        files = export_partitions(cfg, args.export)
        console.print(f"wrote {len(files) - 1} client files and test.npz to {escape(str(args.export))}", highlight=False)
        return 0
    fed = federate(cfg.data, cfg.seed)
    part = cfg.data.partition
    source = "embeddings file" if part.embeddings else f"PCA {part.embedding_dim}"
    detail = {"dirichlet": f" alpha={part.alpha}", "shards": f" k={part.classes_per_client}",
              "quantity": f" exponent={part.exponent}",
              "embedding": f" alpha={part.alpha} clusters={part.n_clusters} ({source})"}.get(part.kind, "")
    skew = cfg.data.feature_skew
    if skew.kind != "none":
        groups = f" in {skew.groups} levels" if skew.groups else ""
        unit = {"rotation": " degrees", "noise": " sigma"}.get(skew.kind, "")
        detail += f", {skew.kind} up to {skew.strength:g}{unit}{groups}"
    if fed.drift is not None:
        detail += f", drift at {fed.drift.at_s:g} s swapping " + " ".join(f"{a}<->{b}" for a, b in fed.drift.pairs)
    console.print(stats_table(partition_stats(fed), f"{cfg.data.dataset}: {cfg.data.n_clients} clients, {part.kind}{detail}"))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from hetfl.devices import build_profiles, describe_profiles

    cfg = load_config(args.config, args.set)
    profiles = build_profiles(cfg.devices, cfg.data.n_clients, np.random.default_rng([cfg.seed, 4]))
    console.print(describe_profiles(profiles))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from hetfl.results import list_runs, runs_table

    root = Path(args.root or DEFAULT_RESULTS)
    if args.root is None and not root.is_dir():  # a fresh checkout; a root the user names must exist
        console.print(f"no runs recorded yet (no {root}/ folder here)", highlight=False)
        return 0
    rows = list_runs(
        root, algorithm=args.algorithm, dataset=args.dataset, name=args.name,
        status=args.status, min_accuracy=args.min_accuracy, limit=args.limit,
    )
    if not rows:
        console.print(f"no runs recorded under {escape(str(root))}")
        return 0
    console.print(runs_table(rows))
    return 0


def _first_line(*docs: str | None) -> str:
    """The first non-empty line of the first docstring that has one; "—" when none does."""
    for doc in docs:
        for line in (doc or "").strip().splitlines():
            if line.strip():
                return line.strip()
    return "—"


def _parameter_text(cls: type) -> str:
    """``name=default`` for each parameter a user sets (``name`` alone when it has no default)."""
    from hetfl.strategies import parameters

    shown = []
    for p in parameters(cls):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        shown.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(shown) or "—"


def _registry_table(title: str, rows: list[tuple[str, str, str, str]], last: str) -> Table:
    """One table of ``hetfl algorithms``: (name, where it comes from, what it is, ``last``) per row."""
    table = Table(title=escape(title))
    table.add_column("name", no_wrap=True)
    table.add_column("from", no_wrap=True)
    table.add_column("what it is")
    table.add_column(last)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: defaults like [1, 2] are not markup
    return table


def _rows(kind: str, names: dict[str, tuple[str, str]], describe, last) -> list[tuple[str, str, str, str]]:
    """Rows of (name, origin, what it is, ``last(obj, path)``) for ``names`` (name -> (import path, origin)); a name
    that cannot be loaded is listed with the reason, so one broken package does not hide the others."""
    from hetfl import registry

    rows = []
    for name, (path, origin) in names.items():
        try:
            obj = registry.load(kind, name, key=name)
        except HetflError as err:
            rows.append((name, origin, f"cannot be loaded: {_one_line(err).removeprefix(f'{name}: ')}", path))
            continue
        rows.append((name, origin, describe(obj), last(obj, path)))
    return rows


def _entry_points(kind: str, known: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The names installed packages add to ``kind`` that are not in ``known``: name -> (import path, origin)."""
    from hetfl import registry

    return {name: entry for name, entry in registry.names(kind).items() if name not in known and entry[1] != "built-in"}


def _doc_of(obj: Any) -> str:
    """The first line of an object's docstring, else of its module's."""
    return _first_line(getattr(obj, "__doc__", None), getattr(sys.modules.get(getattr(obj, "__module__", "")), "__doc__", None))


def cmd_algorithms(args: argparse.Namespace) -> int:
    from hetfl import registry
    from hetfl.strategies import SELECTIONS, STRATEGIES

    shared = {m for m in (c.__module__ for c in STRATEGIES.values())
              if sum(c.__module__ == m for c in STRATEGIES.values()) > 1}

    def module_doc(cls: type) -> str:  # one algorithm a file: the module docstring names the paper
        if cls.__module__ in shared:  # FedAdam and FedYogi, FedStale and FedVARP: tell them apart
            text = _first_line(cls.__doc__, getattr(sys.modules.get(cls.__module__), "__doc__", None))
        else:
            text = _first_line(getattr(sys.modules.get(cls.__module__), "__doc__", None), cls.__doc__)
        return text + (" [model zoo: yes]" if getattr(cls, "model_heterogeneous", False) else "")

    def zoo(cls: type) -> str:
        return _doc_of(cls) + (" [model zoo: yes]" if getattr(cls, "model_heterogeneous", False) else "")

    def parameters(obj: Any, path: str) -> str:
        return _parameter_text(obj)

    def import_path(obj: Any, path: str) -> str:
        return path

    classes = (("strategy", "strategy.name, and its strategy.params", STRATEGIES, module_doc, zoo),
               ("selection", "strategy.selection.name, and its strategy.selection.params", SELECTIONS, _doc_of, _doc_of))
    for kind, title, builtins, doc_builtin, doc_entry in classes:
        rows = [(name, "built-in", doc_builtin(cls), _parameter_text(cls)) for name, cls in sorted(builtins.items())]
        rows += _rows(kind, _entry_points(kind, builtins), doc_entry, parameters)
        console.print(_registry_table(title, rows, "parameters (default)"))
    functions = (("model", "model.name and model.zoo[i].name, with model.params"),
                 ("dataset", "data.dataset, with data.params"),
                 ("partition", "data.partition.kind, with data.partition.params"),
                 ("client", "client (a Flower client_fn)"))
    for kind, title in functions:
        builtins = registry.KINDS[kind].builtins
        rows = _rows(kind, {name: (path, "built-in") for name, path in builtins.items()}, _doc_of, import_path)
        rows += _rows(kind, _entry_points(kind, builtins), _doc_of, import_path)
        if rows:
            console.print(_registry_table(title, rows, "import path"))
    groups = ", ".join(k.group for k in registry.KINDS.values())
    console.print(
        "Each of these keys also takes an import path, package.module:attribute, to code of your own: a class or "
        "function in a .py file beside the config, in the current folder or installed (e.g. strategy.name: "
        f"mystrategies:FedAvgM). Installed packages add names through the entry-point groups {groups}.",
        highlight=False, markup=False,
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hetfl.config import reference, reference_markdown

    if args.markdown:
        sys.stdout.write(reference_markdown())
        return 0
    table = Table(title="configuration keys (set any with --set KEY=VALUE)")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for row in reference():
        table.add_row(*(Text(cell) for cell in row))  # plain text: a description's [brackets] are not markup
    console.print(table)
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from hetfl.deploy.tokens import exported_samples, write_tokens

    if args.clients < 1:
        raise HetflError("hetfl tokens: the number of clients must be at least 1")
    if Path(args.out).exists() and not args.force:
        raise HetflError(f"--out {args.out}: exists; add --force to replace it (its clients would need new tokens)")
    samples = exported_samples(args.samples_from, args.clients) if args.samples_from else None
    if args.aggregators < 0:
        raise HetflError("--aggregators: a number of aggregators, at least 0")
    write_tokens(args.out, args.clients, samples, args.aggregators)
    registered = f", each client's sample count from {escape(args.samples_from)}" if samples else ""
    registered += f", {args.aggregators} aggregator tokens (agg-0..)" if args.aggregators else ""
    console.print(f"wrote {args.clients} tokens to {escape(args.out)} (client ids 0..{args.clients - 1}{registered}; "
                  "keep it private)", highlight=False)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from hetfl.deploy.command import serve_command

    summary = serve_command(
        args.config, address=args.address, out=args.out, overrides=args.set, tokens=args.tokens,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        min_clients=args.min_clients, fresh=args.fresh, quiet=args.quiet,
    )
    console.print(  # no simulated time here: sim_time_s is the run's wall-clock duration
        f"[bold]{escape(summary['algorithm'])}[/]: {summary['status']}, accuracy {_fmt_acc(summary['final_accuracy'])} "
        f"(best {_fmt_acc(summary['best_accuracy'])}) after {summary['rounds']} rounds in "
        f"{format_duration(summary['sim_time_s'])}; {summary['updates']} updates aggregated, {summary['failed_tasks']} "
        f"tasks lost or rejected. Results: {escape(args.out)}"
    )
    return EXIT_INTERRUPTED if summary["status"] == "interrupted" else 0


def cmd_client(args: argparse.Namespace) -> int:
    from hetfl.deploy.client import client_command

    return client_command(
        server=args.server, token=args.token, token_file=args.token_file, data=args.data, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, give_up_after_s=args.give_up_after, threads=args.threads,
        attack=args.attack, faults=args.fault, quiet=args.quiet, device=args.device,
    )


def cmd_aggregator(args: argparse.Namespace) -> int:
    from hetfl.deploy.aggregator import aggregator_command

    return aggregator_command(
        parent=args.parent, address=args.address, token=args.token, token_file=args.token_file, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, parent_cert=args.parent_cert, parent_key=args.parent_key,
        fan_in=args.fan_in, flush_s=args.flush_s, give_up_after_s=args.give_up_after, quiet=args.quiet,
    )


def _deploy_parsers(sub: Any, with_overrides: Any) -> None:
    """``hetfl tokens``, ``hetfl server``, ``hetfl client`` and ``hetfl aggregator`` (docs/deployment.md)."""
    p = sub.add_parser("tokens", help="write a token file for a deployment: one secret token per client id")
    p.add_argument("clients", type=int, help="number of clients (ids 0..N-1; data.n_clients of the config)")
    p.add_argument("--out", required=True, help="token file to write (YAML; give it to hetfl server --tokens)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--samples-from", metavar="DIR", help="register each client's sample count from the partition "
                   "hetfl partition --export wrote to DIR: a client's weight never exceeds it")
    p.add_argument("--aggregators", type=int, default=0, metavar="K",
                   help="also write K aggregator tokens (named agg-0 ..., for hetfl aggregator --token-file)")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("server", help="run a config's strategy with real clients over gRPC (wall clock)",
                       description="Run CONFIG's strategy with real clients (hetfl client) over gRPC. Results go to "
                       "--out as for hetfl run; if --out holds a checkpoint, the run resumes from it.")
    p.add_argument("config", help="experiment YAML (its data section says what the server evaluates on)")
    p.add_argument("--address", default="0.0.0.0:50051", help="HOST:PORT to listen on (default 0.0.0.0:50051)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, summary.json, checkpoint.pt, server.log; "
                   "new, empty, or a run's (resumed from its checkpoint, or replaced with --fresh)")
    p.add_argument("--tokens", help="token file (YAML or CSV) mapping tokens to client ids; default deploy.tokens")
    p.add_argument("--tls-cert", help="the server's certificate (PEM); with --tls-key, clients must use TLS")
    p.add_argument("--tls-key", help="the server certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", help="mutual TLS: clients must present a certificate signed by this CA (PEM)")
    p.add_argument("--min-clients", type=int, help="connected clients to wait for before starting (default deploy.min_clients)")
    p.add_argument("--fresh", action="store_true",
                   help="start anew even if --out holds a checkpoint (only hetfl's own files there are replaced)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    with_overrides(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("client", help="join a hetfl server and train on local data",
                       description="Join a hetfl server with a token, train on local data, send updates until the run ends.")
    p.add_argument("--server", required=True, help="HOST:PORT of the hetfl server")
    p.add_argument("--token", help="this client's token (visible to other users in the process list: prefer --token-file)")
    p.add_argument("--token-file", help="a file holding this client's token")
    p.add_argument("--data", required=True, help="local training data: an .npz with arrays x and y (hetfl partition --export)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate; enables TLS")
    p.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")
    p.add_argument("--give-up-after", type=float, default=600.0, metavar="SECONDS",
                   help="exit with an error after the server was unreachable this long (default 600)")
    p.add_argument("--threads", type=int, help="torch threads for local training (default: the config's threads)")
    p.add_argument("--device", help="where this client trains: cpu, cuda, cuda:N, mps or auto (default: the server "
                   "config's training.device)")
    p.add_argument("--attack", metavar="scaled-random:SCALE",
                   help="for robustness tests only: send the start model plus SCALE * Gaussian noise instead of training's result")
    p.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)  # tests: nan-once, bad-shape-once, die-on-task:N
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("aggregator", help="a leaf aggregator between clients and a hetfl server (hierarchical aggregation)",
                       description="Relay clients (hetfl client --server THIS:PORT) to the server at --parent and "
                       "forward their updates' weighted mean (FedAvg, FedProx). Exits when the server ends the run.")
    p.add_argument("--parent", required=True, help="HOST:PORT of the hetfl server")
    p.add_argument("--address", default="0.0.0.0:50052", help="HOST:PORT to listen on for clients (default 0.0.0.0:50052)")
    p.add_argument("--token", help="this aggregator's token (the server's token file, 'aggregators'; prefer --token-file)")
    p.add_argument("--token-file", help="a file holding this aggregator's token")
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate; TLS to the server")
    p.add_argument("--parent-cert", help="mutual TLS with the server: this aggregator's certificate (PEM)")
    p.add_argument("--parent-key", help="mutual TLS with the server: this aggregator's private key (PEM)")
    p.add_argument("--tls-cert", help="this aggregator's certificate (PEM); with --tls-key, its clients must use TLS")
    p.add_argument("--tls-key", help="this aggregator's private key (PEM)")
    p.add_argument("--fan-in", type=int, default=0, metavar="N",
                   help="forward once N updates of a model version are held (default 0: when every task relayed for it "
                   "is back, or --flush-s)")
    p.add_argument("--flush-s", type=float, default=5.0, metavar="SECONDS",
                   help="forward an update at the latest this long after it arrived (default 5)")
    p.add_argument("--give-up-after", type=float, default=600.0, metavar="SECONDS",
                   help="exit with an error after the server was unreachable this long (default 600)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    p.set_defaults(func=cmd_aggregator)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetfl", description="Federated learning across heterogeneous clients.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set strategy.name=fedprox (repeatable)")

    p = sub.add_parser("run", help="run one experiment")
    p.add_argument("config", nargs="?", help="experiment YAML")
    p.add_argument("--out", help="run directory to write: new or empty (or an earlier run, with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (only hetfl's own files there are removed)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    with_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several algorithms on the same seed, data and devices")
    p.add_argument("config")
    p.add_argument("--algorithms",
                   help="comma-separated, e.g. fedavg,fedprox,scaffold; an import path mymodule:MyStrategy runs your own "
                   "(with --tuned: a subset of the swept ones)")
    p.add_argument("--tuned", metavar="SWEEPDIR", help="run each algorithm swept into SWEEPDIR (hetfl sweep) at its chosen "
                   "setting, trained on all its training samples (the config's data.validation_fraction) and scored on "
                   "the test split; the table and comparison.json record each setting and trial budget, and a warning says when budgets differ. Refused when SWEEPDIR was swept on another config "
                   "(its hash, less the grid keys)")
    p.add_argument("--any-config", action="store_true", help="with --tuned: apply the settings even though SWEEPDIR "
                   "was swept on another config")
    p.add_argument("--out", required=True, help="comparison directory: one run folder per algorithm, comparison.json, "
                   "the report")
    p.add_argument("--seeds", metavar="0,1,2", help="run every algorithm once per seed (comma-separated, distinct "
                   "integers from 0; overrides the config's seeds) into OUT/ALGORITHM-seedK, and report mean, standard "
                   "deviation and 95%% confidence interval over them; default: the config's seeds, else its seed")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the comparison already in --out (only hetfl's own files there are removed)")
    p.add_argument("--quiet", action="store_true")
    with_overrides(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="tune one algorithm over a grid of settings, scored on a validation split",
                       description="Run ALGORITHM at every setting of the --grid product, once per seed, trained without "
                       "and scored on each client's validation split (data.validation_fraction of its training samples; "
                       "the test split is never read), into OUT/ALGORITHM: sweep.json (every setting, per-seed scores, "
                       "mean ± std, the chosen one, the budget), sweep.png (a heatmap for two keys, error bars for one, "
                       "the chosen plane for more) and a run folder per trial run. Chosen: the highest mean (lowest for "
                       "time_to_target); a setting missing a seed's score ranks last; ties: smaller std, then earlier in "
                       "the grid. Sweep each algorithm into the same OUT with the same budget, then hetfl compare --tuned OUT.")
    p.add_argument("config")
    p.add_argument("--algorithm", required=True, help="the algorithm to tune (a name, or an import path)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2",
                   help="a config key and its values (read as --set reads them), e.g. training.lr=0.01,0.05 or "
                   "strategy.params.buffer_size=5,10; repeatable: the product of all is swept")
    p.add_argument("--seeds", metavar="0,1,2", help="seeds of every setting (default: the config's seeds, else its seed)")
    p.add_argument("--out", required=True, help="sweep folder: OUT/ALGORITHM/ per algorithm swept")
    p.add_argument("--objective", default="final_accuracy", metavar="|".join(("final_accuracy", "best_accuracy",
                   "time_to_target")), help="the validation score to choose by (default final_accuracy)")
    p.add_argument("--validation-fraction", type=float, metavar="F", help="share of each client's training samples "
                   "held out for validation (default: data.validation_fraction, else 0.2)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once in N worker processes (default 1); "
                   "the results are the same as one at a time")
    p.add_argument("--ray", metavar="ADDRESS", help="run the trials as Ray tasks: local (a Ray started here, --jobs at "
                   "once) or a cluster's address (pip install hetfl[ray])")
    p.add_argument("--overwrite", action="store_true", help="replace this algorithm's earlier sweep in OUT")
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    with_overrides(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="render plots and an HTML page for a run or comparison directory")
    p.add_argument("dir")
    p.add_argument("--format", default="png", metavar="png,pdf,svg",
                   help="write every figure in these formats, side by side (comma-separated; default png; the PNG is "
                   "always written, for report.html)")
    p.add_argument("--log-x", action="store_true",
                   help="log scale on the simulated-time axis of accuracy_vs_time, loss_vs_time, perplexity_vs_time "
                   "and bytes (not the round, staleness or participation plots)")
    p.add_argument("--log-y", action="store_true",
                   help="log scale on the loss axis of loss_vs_time (perplexity_vs_time is always log; accuracy "
                   "and bytes stay linear)")
    p.add_argument("--smooth", metavar="N",
                   help="draw a trailing moving average over N evaluations over each run's raw accuracy and loss "
                   "curves (the raw curve lighter): for asynchronous runs with thousands of aggregations")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("partition", help="print per-client data statistics")
    p.add_argument("config")
    p.add_argument("--export", metavar="DIR", help="write each client's training data to DIR/client_<i>.npz (x, y) "
                   "and the test splits to DIR/test.npz, for hetfl client --data")
    with_overrides(p)
    p.set_defaults(func=cmd_partition)

    _deploy_parsers(sub, with_overrides)

    p = sub.add_parser("devices", help="print the simulated device profiles")
    p.add_argument("config")
    with_overrides(p)
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("runs", help="list past runs from the results index")
    p.add_argument("--root", help=f"results root to search (default: {DEFAULT_RESULTS})")
    p.add_argument("--algorithm")
    p.add_argument("--dataset")
    p.add_argument("--name")
    p.add_argument("--status")
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("algorithms", help="list the algorithms, client selections, models, datasets and partitions a "
                       "config can name (built in or added by installed packages), with their parameters")
    p.set_defaults(func=cmd_algorithms)

    p = sub.add_parser("config", help="list every configuration key with its type, default and meaning")
    p.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DivergedError as err:
        _error(err)
        return EXIT_DIVERGED
    except HetflError as err:
        _error(err)
        return EXIT_USER_ERROR
    except OSError as err:  # the environment: an unwritable --out, a full disk, a file that vanished
        where = err.filename if err.filename is not None else ""
        _error(f"{where}: {err.strerror or err}" if where else (err.strerror or err))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
