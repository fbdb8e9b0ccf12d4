"""``hetfl report``'s figures for papers: formats, log axes, smoothing, curves that coincide, variant labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from hetfl.cli import main
from hetfl.errors import HetflError
from hetfl.results import ReportOptions, moving_average, render_report


def write_run(folder: Path, strategy: dict | None = None, *, rounds: int = 8, wiggle: float = 0.0) -> Path:
    """A run folder with a synthetic metrics.jsonl (no summary.json: the report computes one)."""
    folder.mkdir(parents=True)
    config = {"name": folder.name, "seed": 0, "data": {"dataset": "digits", "n_clients": 4},
              "strategy": strategy or {"name": "fedavg"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for r in range(rounds + 1):
        acc = 0.9 - 0.8 * math.exp(-r / 3) + (wiggle * (-1) ** r if r else 0.0)
        lines.append(json.dumps({"round": r, "sim_time_s": 10.0 * r, "wall_time_s": 0.1 * r, "accuracy": acc,
                                 "loss": 2.3 * (1 - acc), "bytes_up": 1000 * r, "bytes_down": 1000 * r}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_formats_and_log_axes(tmp_path):
    run = write_run(tmp_path / "run")
    page = render_report(run, ReportOptions(formats=("png", "pdf", "svg"), log_x=True, log_y=True)).read_text()
    for name in ("accuracy_vs_time", "accuracy_vs_round", "loss_vs_time", "bytes"):
        for ext in ("png", "pdf", "svg"):
            assert (run / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
        assert f'src="{name}.png"' in page  # the page embeds the PNGs
    assert (run / "loss_vs_time.pdf").read_bytes().startswith(b"%PDF")
    assert "log scale" in (run / "accuracy_vs_time.svg").read_text()  # the axis label says so
    render_report(run)  # PNG only: the other formats are not written again, nor removed
    assert (run / "bytes.png").is_file()


def test_bad_report_flags_are_one_line_naming_the_flag(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    for argv, flag in ((["--format", "png,jpeg"], "--format"), (["--smooth", "0"], "--smooth"),
                       (["--smooth", "three"], "--smooth")):  # fmt: skip
        code = main(["report", str(run), *argv])
        err = capsys.readouterr().err
        assert code != 0 and flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["report", str(run), "--format", "svg", "--log-x", "--smooth", "3"]) == 0
    assert (run / "accuracy_vs_round.svg").is_file()


def test_moving_average_is_trailing():
    # hand-worked: window of 3 ending at each point, fewer at the start; a nan is left out of its windows
    assert moving_average([0.0, 3.0, 6.0, 9.0, 12.0], 3) == [0.0, 1.5, 3.0, 6.0, 9.0]
    assert moving_average([1.0, math.nan, 3.0], 2) == [1.0, 1.0, 3.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]
    with pytest.raises(HetflError, match="--smooth"):
        ReportOptions(smooth=0)


def test_smoothing_draws_the_raw_curve_lighter(tmp_path, monkeypatch):
    from hetfl.results import report

    run = write_run(tmp_path / "run", rounds=30, wiggle=0.05)
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, opts: figures.append((path.name, fig)))
    render_report(run, ReportOptions(smooth=5))
    fig = dict(figures)["accuracy_vs_round.png"]
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 31]
    raw = [line for line in lines if (line.get_alpha() or 1.0) < 1.0]
    smooth = [line for line in lines if (line.get_alpha() or 1.0) == 1.0]
    assert len(raw) == 1 and len(smooth) == 1
    acc = list(raw[0].get_ydata())
    assert list(smooth[0].get_ydata()) == pytest.approx(moving_average(acc, 5))
    assert smooth[0].get_ydata()[-1] == pytest.approx(sum(acc[-5:]) / 5)


def _figures(monkeypatch) -> dict:
    """Every figure the report draws, by file name, instead of writing them."""
    from hetfl.results import report

    figures: dict = {}
    monkeypatch.setattr(report, "_save", lambda fig, path, opts: figures.__setitem__(path.name, fig))
    return figures


def test_coinciding_curves_get_their_own_line_styles_and_markers(tmp_path, monkeypatch):
    write_run(tmp_path / "fedavg", {"name": "fedavg"}, rounds=40)
    write_run(tmp_path / "fedprox", {"name": "fedprox", "params": {"mu": 1e-6}}, rounds=40)  # the same curve
    figures = _figures(monkeypatch)
    render_report(tmp_path)
    for image in ("accuracy_vs_time.png", "accuracy_vs_round.png", "loss_vs_time.png"):
        lines = [line for line in figures[image].axes[0].get_lines() if len(line.get_xdata()) == 41]
        assert len(lines) == 2 and list(lines[0].get_ydata()) == list(lines[1].get_ydata())
        assert lines[0].get_linestyle() != lines[1].get_linestyle()
        assert lines[0].get_marker() != lines[1].get_marker()
        assert all(line.get_markevery()[1] == 5 for line in lines)  # sparse: every 5th of 41 evaluations


def test_distinct_curves_keep_plain_lines(tmp_path, monkeypatch):
    write_run(tmp_path / "fedavg", {"name": "fedavg"}, rounds=40)
    write_run(tmp_path / "fedbuff", {"name": "fedbuff"}, rounds=40, wiggle=0.05)
    figures = _figures(monkeypatch)
    render_report(tmp_path)
    lines = [line for line in figures["accuracy_vs_round.png"].axes[0].get_lines() if len(line.get_xdata()) == 41]
    assert len(lines) == 2 and {line.get_linestyle() for line in lines} == {"-"}
    assert {line.get_marker() for line in lines} == {"None"}


def test_variant_labels_tell_runs_apart_in_hetfl_runs_and_the_report(tmp_path, monkeypatch, capsys):
    from hetfl.results import list_runs, record_run
    from hetfl.results.variant import variant_label

    results = tmp_path / "results"
    plain = write_run(results / "plain", {"name": "fedavg", "selection": {"name": "random", "params": {}},
                                          "aggregator": {"rule": "mean", "trim_frac": 0.1, "byzantine": 1}})
    oort = write_run(results / "oort", {"name": "fedavg", "selection": {"name": "oort", "params": {}},
                                        "aggregator": {"rule": "mean", "trim_frac": 0.1, "byzantine": 1}})
    for i, run in enumerate((plain, oort)):
        record_run(run, {"name": run.name, "algorithm": "fedavg", "started_at": f"2026-05-0{i + 1}T10:00:00"})
    assert [row["variant"] for row in list_runs(results)] == ["fedavg+oort", "fedavg"]
    assert [row["variant"] for row in list_runs(results, algorithm="fedavg")] == ["fedavg+oort", "fedavg"]
    monkeypatch.chdir(tmp_path)  # short paths in the table
    assert main(["runs", "--root", "results"]) == 0
    table = capsys.readouterr().out
    assert "fedavg+oort" in table and table.count("fedavg") == 2

    figures = _figures(monkeypatch)
    render_report(results)
    labels = figures["accuracy_vs_round.png"].axes[0].get_legend_handles_labels()[1]
    assert sorted(labels) == ["fedavg", "fedavg+oort"]

    assert variant_label({"name": "fedprox", "params": {"mu": 0.1}}) == "fedprox(mu=0.1)"
    # update compression: the codec and the keys it reads that differ from the defaults (ratio is topk's only)
    assert variant_label({"name": "fedavg", "compression": {"kind": "topk", "ratio": 0.1}}) == "fedavg+topk(ratio=0.1)"
    assert variant_label({"name": "fedavg", "compression": {"kind": "qsgd", "ratio": 0.1, "error_feedback": False}}) \
        == "fedavg+qsgd(error_feedback=False)"
    assert variant_label({"name": "fedavg", "compression": {"kind": "none", "ratio": 0.1}}) == "fedavg"
    assert variant_label({"name": "fedavg", "aggregator": {"rule": "median", "trim_frac": 0.1}}) == "fedavg[median]"
    assert variant_label({"name": "fedavg", "aggregator": {"rule": "trimmed_mean", "trim_frac": 0.2}}) == \
        "fedavg[trimmed_mean(trim_frac=0.2)]"
    assert variant_label({"name": "fedavg", "privacy": {"clip": 1.0, "noise_multiplier": 1.0}}) == "fedavg+dp(clip=1)"
    assert variant_label({"name": "fedprox", "per_algorithm": {"fedprox": {"mu": 0.01}, "fedadam": {"x": 1}}}) == \
        "fedprox(mu=0.01)"
    assert variant_label({"clients_per_round": 5}) is None


def test_clear_run_removes_every_format_of_every_figure(tmp_path):
    from hetfl.results.outdir import clear_run

    run = write_run(tmp_path / "run")
    render_report(run, ReportOptions(formats=("png", "pdf", "svg")))
    assert (run / "loss_vs_time.svg").is_file()
    (run / "notes.txt").write_text("mine")
    clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_a_seed_groups_mean_curve_gets_a_star_where_it_first_reaches_the_target(tmp_path, monkeypatch):
    from test_seeds import seed_run

    for seed, top in enumerate([0.8, 0.6]):  # target 0.5; the mean rises as 0.7 r / 6 over steps of 10 s
        seed_run(tmp_path / f"fedavg-{seed}", "fedavg", seed, top, 10.0)
    figures = _figures(monkeypatch)
    render_report(tmp_path)
    stars = [line for line in figures["accuracy_vs_time.png"].axes[0].get_lines() if line.get_marker() == "*"]
    # mean 0.7 r / 6 first reaches 0.5 at r = 5 (0.583), that is 50 s: the first point of the band's time grid
    # (200 points over 60 s, seconds on the axis) at or after it
    assert [(float(s.get_xdata()[0]), float(s.get_ydata()[0])) for s in stars] == [
        (pytest.approx(50.0, abs=60 / 199), pytest.approx(0.7 * 5 / 6))]
