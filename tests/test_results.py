"""Results: metrics and summary files, the run index, reports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from hetfl.errors import HetflError
from hetfl.results import (
    INDEX_NAME,
    MetricsLog,
    find_runs,
    format_duration,
    index_path,
    list_runs,
    read_metrics,
    read_summary,
    record_run,
    render_report,
    runs_table,
    write_summary,
)

# --------------------------------------------------------------------------- synthetic runs
CURVES = {  # algorithm -> (accuracy plateau, seconds per round, time constant in rounds, updates per round)
    "fedavg": (0.95, 40.0, 10.0, 10),  # final 94.8%, reaches 90% at round 29 (1160 s)
    "fedbuff": (0.93, 10.0, 14.0, 5),  # final 91.9%, round 47 (470 s)
    "fedcompass": (0.94, 12.0, 12.0, 8),  # final 93.4%, round 37 (444 s)
}


def make_run(folder: Path, algorithm: str = "fedavg", *, name: str | None = None, rounds: int = 60,
             target: float = 0.9, status: str = "completed", started_at: str = "2026-05-01T10:00:00",
             summary: bool = True) -> Path:  # fmt: skip
    """A run folder as the engine writes it, with a smooth made-up learning curve."""
    top, step_s, tau, k = CURVES.get(algorithm, (0.9, 20.0, 15.0, 10))
    name = name or f"{algorithm}-digits"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"name": name, "seed": 0, "rounds": rounds, "data": {"dataset": "digits", "n_clients": 20},
              "strategy": {"name": algorithm}, "evaluation": {"target_accuracy": target}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    records, reached = [], None
    with MetricsLog(folder / "metrics.jsonl") as log:
        for r in range(rounds + 1):
            acc = 0.1 + (top - 0.1) * (1 - math.exp(-r / tau))
            t = r * step_s
            if reached is None and acc >= target:
                reached = (t, r)
            record = {"round": r, "sim_time_s": t, "wall_time_s": r * 0.05, "accuracy": acc, "loss": 2.3 * (1 - acc),
                      "client_acc_mean": acc - 0.03, "client_acc_p10": acc - 0.12, "client_acc_min": acc - 0.25,
                      "bytes_up": r * k * 250_000, "bytes_down": r * k * 250_000, "updates": r * k, "dropped": 0}  # fmt: skip
            log.append(record)
            records.append(record)
    if summary:
        last = records[-1]
        write_summary(folder / "summary.json", {
            "name": name, "algorithm": algorithm, "status": status, "seed": 0, "dataset": "digits", "n_clients": 20,
            "final_accuracy": last["accuracy"], "best_accuracy": max(x["accuracy"] for x in records),
            "rounds": rounds, "sim_time_s": last["sim_time_s"], "wall_time_s": last["wall_time_s"],
            "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"], "updates": last["updates"], "dropped": 0,
            "target_accuracy": target, "time_to_target_s": reached[0] if reached else None,
            "rounds_to_target": reached[1] if reached else None, "started_at": started_at,
            **fairness_fields(algorithm, last["updates"]),
        })  # fmt: skip
    return folder


def fairness_fields(algorithm: str, updates: int, n_clients: int = 20) -> dict:
    """Made-up staleness and participation summary fields: a synchronous algorithm is never stale."""
    speeds = [0.25 * 1.2**c for c in range(n_clients)]
    participation = [updates // n_clients + (c < updates % n_clients) for c in range(n_clients)]
    if algorithm == "fedavg":
        histogram = {"0": updates}
    else:
        histogram = {"0": updates // 2, "1": updates // 4, "3": updates - updates // 2 - updates // 4}
    mean = sum(int(k) * v for k, v in histogram.items()) / updates
    return {"staleness_histogram": histogram, "staleness_mean": mean, "participation": participation,
            "tasks_per_client": [p + 1 for p in participation], "client_speed": speeds, "participation_jain": 0.99,
            "participated_frac": 1.0, "idle_fast_frac": 0.8 if algorithm == "fedavg" else 0.1, "idle_frac": 0.5}  # fmt: skip


def make_comparison(folder: Path) -> Path:
    for algorithm in CURVES:
        make_run(folder / algorithm, algorithm)
    return folder


# --------------------------------------------------------------------------- metrics and summary
def test_metrics_round_trip_keeps_extra_keys(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    records = [{"round": r, "accuracy": r / 10, "staleness_mean": 1.5} for r in range(5)]
    log = MetricsLog(path)
    for record in records:
        log.append(record)
        assert read_metrics(path)[-1] == record  # flushed as it is written, before close
    log.close()
    assert read_metrics(path) == records


def test_metrics_fresh_log_replaces_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n')
    with MetricsLog(path) as log:
        log.append({"round": 0, "accuracy": 0.5})
    assert read_metrics(path) == [{"round": 0, "accuracy": 0.5}]


def test_metrics_numpy_values_are_written_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.append({"round": np.int64(3), "accuracy": np.float32(0.5), "hist": np.arange(2)})
    assert read_metrics(path) == [{"round": 3, "accuracy": 0.5, "hist": [0, 1]}]


def test_resume_keeps_rounds_up_to_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for r in range(8):
            log.append({"round": r, "accuracy": r / 10})
    with open(path, "a") as f:
        f.write('{"round": 8, "accur')  # killed while writing
    with MetricsLog(path, resume_from_round=4) as log:
        assert [r["round"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
        log.append({"round": 5, "accuracy": 0.55})
    assert [r["round"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_without_file_starts_empty(tmp_path):
    with MetricsLog(tmp_path / "metrics.jsonl", resume_from_round=3) as log:
        log.append({"round": 4})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"round": 4}]


def test_truncated_last_line_is_tolerated_but_corruption_inside_is_not(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0, "accuracy": 0.1}\n{"round": 1, "accuracy": 0.2}\n{"round": 2, "acc')
    assert [r["round"] for r in read_metrics(path)] == [0, 1]
    path.write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(HetflError, match="line 2"):
        read_metrics(path)


def test_missing_metrics_file_names_it(tmp_path):
    with pytest.raises(HetflError, match="nowhere.jsonl"):
        read_metrics(tmp_path / "nowhere.jsonl")


def test_write_summary_is_atomic_and_reads_back(tmp_path):
    path = tmp_path / "summary.json"
    summary = {"name": "x", "final_accuracy": 0.91, "time_to_target_s": None, "status": "completed"}
    path.write_text("{ stale")
    write_summary(path, summary)
    assert json.loads(path.read_text()) == summary
    assert read_summary(path) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left
    assert path.read_text().startswith('{\n  "')  # indent=2


def test_write_summary_failure_leaves_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_summary(path, {"bad": object()})
    assert read_summary(path) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_find_runs(tmp_path):
    comparison = make_comparison(tmp_path / "cmp")
    single = make_run(tmp_path / "solo")
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden" / "run").mkdir(parents=True)
    (tmp_path / ".hidden" / "run" / "metrics.jsonl").write_text("")
    assert find_runs(tmp_path) == sorted([*(comparison / a for a in CURVES), single])
    assert find_runs(single) == [single]
    assert find_runs(tmp_path / "empty") == []
    with pytest.raises(HetflError):
        find_runs(tmp_path / "missing")


# --------------------------------------------------------------------------- index
def summary_of(run: Path) -> dict:
    return read_summary(run / "summary.json")


def test_record_and_list_with_filters(tmp_path):
    results = tmp_path / "results"
    a = make_run(results / "a", "fedavg", started_at="2026-05-01T10:00:00")
    b = make_run(results / "b", "fedbuff", started_at="2026-05-02T10:00:00", status="interrupted")
    c = make_run(results / "c", "fedcompass", started_at="2026-05-03T10:00:00")
    for run in (a, b, c):
        record_run(run, summary_of(run))
    assert index_path(a) == results.resolve() / INDEX_NAME

    rows = list_runs(results)
    assert [r["algorithm"] for r in rows] == ["fedcompass", "fedbuff", "fedavg"]  # newest first
    assert rows[0]["path"] == str(c.resolve()) and rows[0]["n_clients"] == 20
    assert [r["algorithm"] for r in list_runs(results, algorithm="FedAvg")] == ["fedavg"]
    assert [r["algorithm"] for r in list_runs(results, status="interrupted")] == ["fedbuff"]
    assert {r["algorithm"] for r in list_runs(results, min_accuracy=0.925)} == {"fedavg", "fedcompass"}
    assert [r["algorithm"] for r in list_runs(results, name="COMPASS")] == ["fedcompass"]
    assert list_runs(results, dataset="cifar10") == []
    assert len(list_runs(results, limit=2)) == 2


def test_record_run_upserts_and_skips_deleted(tmp_path):
    run = make_run(tmp_path / "r", "fedavg")
    record_run(run, summary_of(run))
    record_run(run, {**summary_of(run), "status": "diverged", "final_accuracy": float("nan")})
    rows = list_runs(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == "diverged" and rows[0]["final_accuracy"] is None
    shutil.rmtree(run)
    assert list_runs(tmp_path) == []


def test_list_merges_index_files_and_follows_moved_folders(tmp_path):
    old = make_run(tmp_path / "results" / "solo", "fedavg", started_at="2026-05-01T10:00:00")
    record_run(old, summary_of(old))
    comparison = make_comparison(tmp_path / "results" / "cmp")
    for algorithm in CURVES:
        record_run(comparison / algorithm, {**summary_of(comparison / algorithm), "started_at": "2026-05-04T10:00:00"})
    assert len(list(tmp_path.rglob(INDEX_NAME))) == 2
    assert len(list_runs(tmp_path)) == 4
    assert len(list_runs(tmp_path / "results" / "cmp")) == 3

    moved = shutil.move(tmp_path / "results", tmp_path / "archive")
    rows = list_runs(Path(moved))
    assert len(rows) == 4 and all(Path(r["path"]).is_dir() for r in rows)


def test_runs_table_renders(tmp_path):
    run = make_run(tmp_path / "r", "fedavg", name="odd [name]")
    record_run(run, summary_of(run))
    console = Console(width=250, record=True)
    console.print(runs_table(list_runs(tmp_path)))
    text = console.export_text()
    assert "odd [name]" in text and "fedavg" in text and "94.8%" in text
    assert format_duration(None) == "—" and format_duration(738) == "12.3 min" and format_duration(42) == "42.0 s"


def test_list_runs_on_corrupt_index_is_one_line_error(tmp_path):
    (tmp_path / INDEX_NAME).write_text("this is not sqlite")
    with pytest.raises(HetflError, match=INDEX_NAME):
        list_runs(tmp_path)


# --------------------------------------------------------------------------- report
IMAGES = ("accuracy_vs_time.png", "accuracy_vs_round.png", "bytes.png", "staleness.png", "participation.png")


def test_report_on_single_run(tmp_path):
    run = make_run(tmp_path / "run", "fedavg")
    out = render_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    for image in IMAGES:
        assert (run / image).stat().st_size > 10_000
        assert f'src="{image}"' in page
    assert "fedavg" in page and "<details>" in page and "target_accuracy: 0.9" in page
    assert "http" not in page  # self-contained: nothing fetched


def test_report_on_comparison(tmp_path):
    comparison = make_comparison(tmp_path / "cmp")
    make_run(comparison / "crashed", "fedprox", summary=False, rounds=0)  # killed before its first line
    (comparison / "crashed" / "metrics.jsonl").write_text("")
    make_run(comparison / "running", "scaffold", summary=False, rounds=10)
    page = render_report(comparison).read_text()
    for algorithm in [*CURVES, "scaffold"]:
        assert algorithm in page
    for image in IMAGES:
        assert (comparison / image).is_file() and image in page
    assert "Skipped, no metrics recorded: crashed" in page
    assert "unfinished" in page
    assert page.count('class="num best"') >= 7  # and the least stale, least idle fast clients


def test_report_labels_repeated_algorithms_by_name(tmp_path):
    for seed in (1, 2):
        make_run(tmp_path / f"s{seed}", "fedavg", name=f"fedavg-seed{seed}")
    page = render_report(tmp_path).read_text()
    assert "fedavg-seed1" in page and "fedavg-seed2" in page


def test_report_on_empty_folder_raises(tmp_path):
    with pytest.raises(HetflError, match="no hetfl runs under"):
        render_report(tmp_path)


def test_a_checkpoint_of_another_hetfl_version_is_one_line(tmp_path, monkeypatch):
    import sys
    import types

    import torch

    from hetfl.engine.run import read_checkpoint

    old = types.ModuleType("hetfl.deploy.server")  # where deployment state lived before engine/core.py
    old.DeployState = type("DeployState", (), {"__module__": "hetfl.deploy.server"})
    monkeypatch.setitem(sys.modules, "hetfl.deploy.server", old)
    torch.save({"state": old.DeployState(), "scores": None, "wall_time_s": 0.0}, tmp_path / "checkpoint.pt")
    monkeypatch.delitem(sys.modules, "hetfl.deploy.server")
    with pytest.raises(HetflError) as err:
        read_checkpoint(tmp_path / "checkpoint.pt")
    line = str(err.value)
    assert "\n" not in line and "written by another version of hetfl" in line and "hetfl.deploy.server" in line
    assert str(tmp_path / "checkpoint.pt") in line
