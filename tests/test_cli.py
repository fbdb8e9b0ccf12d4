"""The command line: every user mistake is one line on stderr and a non-zero exit; every command prints.

Most tests call :func:`hetfl.cli.main` in-process (fast); the few that need a real process (no
traceback on stderr, the exit code the shell sees) run ``python -m hetfl.cli``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import write_config
from hetfl.cli import main
from hetfl.config import dump_config, load_config
from hetfl.results import INDEX_NAME
from hetfl.strategies import SELECTIONS, STRATEGIES, Selection

METRIC_KEYS = {"round", "sim_time_s", "wall_time_s", "accuracy", "loss", "client_acc_mean", "client_acc_p10",
               "client_acc_min", "bytes_up", "bytes_down", "staleness_mean", "staleness_p90", "staleness_max",
               "participation_jain", "participated_frac", "idle_fast_frac", "idle_frac"}  # fmt: skip
SUMMARY_KEYS = {"algorithm", "status", "final_accuracy", "best_accuracy", "rounds", "sim_time_s", "wall_time_s",
                "bytes_up", "bytes_down", "target_accuracy", "time_to_target_s", "staleness_histogram",
                "staleness_mean", "participation", "participation_jain", "idle_fast_frac", "idle_frac"}  # fmt: skip
IMAGES = ("accuracy_vs_time.png", "accuracy_vs_round.png", "bytes.png", "staleness.png", "participation.png")

def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``hetfl argv`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """A user error: non-zero exit, exactly one non-empty stderr line holding every needle, no traceback."""
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0].strip()
    assert line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def hetfl_process(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """``hetfl argv`` as its own process (the installed entry point when there is one)."""
    exe = Path(sys.executable).with_name("hetfl")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hetfl.cli"]
    return subprocess.run([*cmd, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- bad input: one line, no traceback
def _npz_lengths_differ(tmp: Path) -> Path:
    np.savez(tmp / "uneven.npz", x=np.zeros((10, 4), dtype=np.float32), y=np.zeros(9, dtype=np.int64))
    return tmp / "uneven.npz"


def _csv_text_feature(tmp: Path) -> Path:
    rows = ["height,colour,label"] + [f"{i},{'red' if i == 7 else i * 2},{i % 2}" for i in range(20)]
    (tmp / "people.csv").write_text("\n".join(rows) + "\n")
    return tmp / "people.csv"


# (id, config changes, extra argv, needles in the error line); "{tmp}" in a needle is the test's tmp_path
BAD_CONFIGS = [
    ("unknown-top-level-key", {"bogus": 1}, [], ["bogus", "unknown"]),
    ("unknown-nested-key", {"training__lrr": 0.1}, [], ["training.lrr"]),
    ("ill-typed-rounds", {"rounds": "many"}, [], ["rounds"]),
    ("ill-typed-lr-override", {}, ["--set", "training.lr=fast"], ["training.lr"]),
    ("alpha-zero", {"data__partition__alpha": 0}, [], ["data.partition.alpha"]),
    ("alpha-negative", {"data__partition__alpha": -1}, [], ["data.partition.alpha"]),
    ("more-clients-than-samples", {"data__n_clients": 5000}, [], ["data.n_clients", "5000", "1797"]),
    ("mnist-missing-path", {"data__dataset": "mnist", "data__path": "/nonexistent/mnist"}, [],
     ["/nonexistent/mnist", "train-images-idx3-ubyte"]),
    ("set-without-equals", {}, ["--set", "rounds"], ["--set", "rounds", "key=value"]),
    ("unknown-algorithm", {}, ["--set", "strategy.name=fedbest"], ["strategy.name", "fedbest"]),
    ("unknown-strategy-param", {}, ["--set", "strategy.name=fedprox", "--set", "strategy.params.mux=1"],
     ["strategy.params.mux"]),
    ("scaffold-with-adam", {}, ["--set", "strategy.name=scaffold", "--set", "training.optimizer=adam"],
     ["training.optimizer", "scaffold"]),
    ("unknown-per-algorithm-param", {"strategy__per_algorithm": {"fedprox": {"mux": 1}}}, [],
     ["strategy.per_algorithm.fedprox.mux"]),
    ("set-into-a-value", {}, ["--set", "rounds.x=1"], ["rounds"]),
    ("zero-width-layer", {"model__hidden": [0]}, [], ["model.hidden"]),
]


@pytest.mark.parametrize(("changes", "extra", "needles"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, changes, extra, needles):
    config = write_config(tmp_path, **changes)
    code, out, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet", *extra)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_ill_typed_strategy_param_names_the_key(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet",
                       "--set", "strategy.name=fedprox", "--set", "strategy.params.mu=abc")
    assert_one_line_error(code, err, "strategy.params.mu")


def test_exponent_without_dot_is_a_number(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet",
                       "--set", "strategy.name=fedprox", "--set", "strategy.params.mu=1e-3")
    assert code == 0, err


def test_data_file_problems_name_the_file(tmp_path, capsys):
    csv = _csv_text_feature(tmp_path)
    code, _, err = cli(capsys, "run", write_config(tmp_path, data__dataset="csv", data__path=str(csv)),
                       "--out", tmp_path / "run", "--quiet")
    assert code == 2
    assert_one_line_error(code, err, "people.csv", "colour", "red")

    npz = _npz_lengths_differ(tmp_path)
    code, _, err = cli(capsys, "run", write_config(tmp_path, data__dataset="npz", data__path=str(npz)),
                       "--out", tmp_path / "run", "--quiet")
    assert code == 2
    assert_one_line_error(code, err, "uneven.npz", "(10, 4)", "(9,)")

    code, _, err = cli(capsys, "run", write_config(tmp_path, data__dataset="csv", data__path="missing.csv"),
                       "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(code, err, "missing.csv", "does not exist", "CSV file")  # relative to the config's folder
    assert str((tmp_path / "missing.csv").resolve()) in err
    assert not (tmp_path / "run").exists()


def test_data_path_required_for_files(tmp_path, capsys):
    code, _, err = cli(capsys, "run", write_config(tmp_path, data__dataset="npz"), "--out", tmp_path / "run")
    assert_one_line_error(code, err, "data.path", "npz")


def test_config_file_problems(tmp_path, capsys):
    code, _, err = cli(capsys, "run", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(code, err, "nope.yaml", "not found")

    (tmp_path / "broken.yaml").write_text("rounds: [1, 2\ndata: {dataset: digits\n")
    code, _, err = cli(capsys, "run", tmp_path / "broken.yaml", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(code, err, "broken.yaml", "YAML")

    (tmp_path / "list.yaml").write_text("- rounds\n- 3\n")
    code, _, err = cli(capsys, "run", tmp_path / "list.yaml", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "list.yaml")


def test_run_needs_config_and_out(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "run", config)
    assert_one_line_error(code, err, "--out")
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "a", "--resume", tmp_path / "b")
    assert_one_line_error(code, err, "--resume")
    code, _, err = cli(capsys, "run", "--resume", tmp_path / "b", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "--resume")


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    code, _, err = cli(capsys, "run", write_config(tmp_path), "--out", tmp_path / "taken", "--quiet")
    assert code == 2
    assert_one_line_error(code, err, "taken")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_error_text_is_not_rich_markup(tmp_path, capsys):
    """A path holding brackets is printed as it is (rich would eat '[red]' and fail on '[/x]')."""
    for weird in ("data[red]set.csv", "data[/x]set.csv"):
        config = write_config(tmp_path, data__dataset="csv", data__path=str(tmp_path / weird))
        code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet")
        assert_one_line_error(code, err, weird)


def test_diverging_run_keeps_what_it_measured(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_config(tmp_path), "--out", out, "--quiet", "--set", "training.lr=1.0e+6")
    assert code == 1
    assert_one_line_error(code, err, "training.lr")  # what to change
    summary = read_summary(out)
    assert summary["status"] == "diverged"
    metrics = read_metrics(out)
    assert metrics and metrics[0]["round"] == 0  # the initial model's evaluation is kept
    assert summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert (out / "config.yaml").is_file()


def test_errors_do_not_touch_an_earlier_run(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", config, "--out", out, "--quiet")
    assert code == 0, err
    before = snapshot(out)
    for extra in (["--set", "data.n_clients=5000"], ["--set", "strategy.name=fedbest"],
                  ["--set", "strategy.name=scaffold", "--set", "training.optimizer=adam"],
                  ["--set", "data.dataset=csv", "--set", "data.path=/nonexistent.csv"], ["--set", "rounds=0"]):
        code, _, err = cli(capsys, "run", config, "--out", out, "--quiet", *extra)
        assert_one_line_error(code, err)
        assert snapshot(out) == before, extra


def test_report_and_resume_on_folders_without_runs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "report", empty)
    assert code == 2
    assert_one_line_error(code, err, "empty")
    assert list(empty.iterdir()) == []

    code, _, err = cli(capsys, "report", tmp_path / "absent")
    assert_one_line_error(code, err, "absent")

    code, _, err = cli(capsys, "run", "--resume", empty)
    assert code == 2
    assert_one_line_error(code, err, "empty", "config.yaml")

    (empty / "config.yaml").write_text(write_config(tmp_path).read_text())
    code, _, err = cli(capsys, "run", "--resume", empty)
    assert code == 2
    assert_one_line_error(code, err, "checkpoint")


def test_compare_rejects_bad_algorithms_before_running_any(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg,fedbest", "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "fedbest")
    code, _, err = cli(capsys, "compare", config, "--algorithms", " , ", "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "--algorithms")
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg,scaffold", "--out", tmp_path / "cmp",
                       "--set", "training.optimizer=adam")
    assert code == 2
    assert_one_line_error(code, err, "training.optimizer", "scaffold")
    assert not (tmp_path / "cmp").exists()  # fedavg was not run first


def test_compare_refuses_strategy_params_for_an_algorithm_it_does_not_run(tmp_path, capsys):
    # the config's strategy is fedavg: --set strategy.params.mu would set fedavg's, and fedprox would run without it
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedprox", "--out", tmp_path / "cmp",
                       "--set", "strategy.params.mu=0.5")
    assert_one_line_error(code, err, "strategy.params.mu", "strategy.per_algorithm.<algorithm>.mu")
    assert not (tmp_path / "cmp").exists()


def test_runs_on_a_missing_root(tmp_path, capsys):
    code, _, err = cli(capsys, "runs", "--root", tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere")


# --------------------------------------------------------------------------- a real process
def test_process_bad_config_and_divergence_print_one_line(tmp_path):
    config = write_config(tmp_path, training__lrr=0.1)
    done = hetfl_process("run", config, "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.returncode, done.stderr, "training.lrr")

    config = write_config(tmp_path, filename="diverge.yaml", training__lr=1.0e6)
    done = hetfl_process("run", config, "--out", "run", cwd=tmp_path)
    assert done.returncode == 1
    assert_one_line_error(done.returncode, done.stderr, "training.lr")
    assert read_summary(tmp_path / "run")["status"] == "diverged"
    assert read_metrics(tmp_path / "run")


# --------------------------------------------------------------------------- good paths
def test_run_writes_config_metrics_and_summary(tmp_path, capsys, digits_config):
    config = tmp_path / "digits.yaml"
    config.write_text(dump_config(digits_config.model_copy(update={"name": "cli-run", "rounds": 4})))
    out = tmp_path / "results" / "first"
    code, stdout, err = cli(capsys, "run", config, "--out", out, "--quiet", "--set", "evaluation.target_accuracy=0.3",
                            "--set", "checkpoint_every=2")
    assert code == 0, err
    assert err == ""
    assert "completed" in stdout and str(out) in stdout

    resolved = load_config(out / "config.yaml")
    assert resolved.rounds == 4 and resolved.checkpoint_every == 2
    assert resolved.evaluation.target_accuracy == 0.3
    assert resolved.data.n_clients == 10 and resolved.strategy.name == "fedavg"
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["momentum"] == 0.0  # defaults written out

    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    for m in metrics:
        assert METRIC_KEYS <= m.keys()
        assert 0 <= m["client_acc_min"] <= m["client_acc_p10"] <= m["client_acc_mean"] <= 1
    times = [m["sim_time_s"] for m in metrics]
    assert times == sorted(times) and times[0] == 0 and times[-1] > 0
    assert metrics[0]["bytes_up"] == 0 and metrics[-1]["bytes_up"] > 0 and metrics[-1]["bytes_down"] > 0

    summary = read_summary(out)
    assert SUMMARY_KEYS <= summary.keys()
    last = metrics[-1]
    assert summary["status"] == "completed"
    assert summary["algorithm"] == "fedavg"
    assert summary["rounds"] == last["round"] == 4
    assert summary["final_accuracy"] == last["accuracy"]
    assert summary["best_accuracy"] == max(m["accuracy"] for m in metrics)
    assert summary["sim_time_s"] == last["sim_time_s"]
    assert summary["bytes_up"] == last["bytes_up"] and summary["bytes_down"] == last["bytes_down"]
    assert summary["wall_time_s"] >= last["wall_time_s"]
    assert summary["target_accuracy"] == 0.3
    reached = [m for m in metrics if m["accuracy"] >= 0.3]
    assert summary["time_to_target_s"] == (reached[0]["sim_time_s"] if reached else None)


def test_time_to_target_is_null_when_never_reached(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_config(tmp_path, evaluation__target_accuracy=1.0), "--out", out, "--quiet")
    assert code == 0, err
    summary = read_summary(out)
    assert summary["time_to_target_s"] is None
    assert json.loads((out / "summary.json").read_text())["time_to_target_s"] is None
    assert '"time_to_target_s": null' in (out / "summary.json").read_text()


def test_runs_lists_and_filters(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths in the table's path column
    config = write_config(tmp_path)
    names = {"fedavg": "runA1", "scaffold": "runB2"}  # short: a narrow table does not wrap them
    for folder, algorithm in (("a", "fedavg"), ("b", "scaffold")):
        code, _, err = cli(capsys, "run", config, "--out", Path("results") / folder, "--quiet",
                           "--set", f"strategy.name={algorithm}", "--set", f"name={names[algorithm]}")
        assert code == 0, err
    assert (tmp_path / "results" / INDEX_NAME).is_file()

    code, out, err = cli(capsys, "runs", "--root", tmp_path)
    assert code == 0, err
    assert "runA1" in out and "runB2" in out

    code, out, _ = cli(capsys, "runs", "--root", tmp_path, "--algorithm", "scaffold")
    assert "runB2" in out and "runA1" not in out

    code, out, _ = cli(capsys, "runs", "--root", tmp_path, "--algorithm", "fedprox")
    assert code == 0
    assert "runA1" not in out and "runB2" not in out and "no runs" in out

    code, out, _ = cli(capsys, "runs", "--root", tmp_path, "--status", "completed", "--limit", "1")
    assert ("runA1" in out) + ("runB2" in out) == 1


def test_compare_prints_one_table_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", write_config(tmp_path, name="duel"), "--algorithms", "fedavg,fedprox",
                            "--out", out, "--quiet", "--set", "strategy.per_algorithm.fedprox.mu=0.5")
    assert code == 0, err
    assert err == ""
    assert stdout.count("duel: digits, 6 clients, seed 0") == 1  # one table
    table = [line for line in stdout.splitlines() if "fedavg" in line or "fedprox" in line]
    assert any("fedavg" in line for line in table) and any("fedprox" in line for line in table)
    assert "stale" in stdout and "idle" in stdout and "Jain" in stdout  # mean staleness, fast idle %, Jain
    assert all(line.split()[-3] == "0.00" for line in table)  # synchronous rounds: never stale
    assert (out / "report.html").is_file()
    for image in IMAGES:
        assert (out / image).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "fedavg" in html and "fedprox" in html

    summaries = {s["algorithm"]: s for s in json.loads((out / "comparison.json").read_text())}
    assert set(summaries) == {"fedavg", "fedprox"}
    assert all(s["status"] == "completed" for s in summaries.values())
    # same seed, partition and devices: only the strategy differs, and the initial model scores the same
    configs = {a: yaml.safe_load((out / a / "config.yaml").read_text()) for a in summaries}
    assert configs["fedprox"]["strategy"]["params"] == {"mu": 0.5}
    assert {k: v for k, v in configs["fedavg"].items() if k != "strategy"} == \
           {k: v for k, v in configs["fedprox"].items() if k != "strategy"}  # fmt: skip
    first = {a: read_metrics(out / a)[0] for a in summaries}
    assert first["fedavg"]["accuracy"] == first["fedprox"]["accuracy"]
    assert first["fedavg"]["client_acc_min"] == first["fedprox"]["client_acc_min"]
    assert summaries["fedavg"]["final_accuracy"] != summaries["fedprox"]["final_accuracy"]


def test_compare_goes_on_when_one_algorithm_diverges(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", write_config(tmp_path), "--algorithms", "fedavg,fedprox", "--out", out,
                            "--quiet", "--set", "strategy.per_algorithm.fedprox.mu=1.0e+6")
    assert code == 1
    assert_one_line_error(code, err, "fedprox", "diverged")
    assert "fedavg" in stdout and "fedprox" in stdout and "diverged" in stdout
    assert read_summary(out / "fedavg")["status"] == "completed"
    assert read_summary(out / "fedprox")["status"] == "diverged"
    assert (out / "report.html").is_file()


def test_report_on_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_config(tmp_path), "--out", out, "--quiet")
    assert code == 0, err
    code, stdout, err = cli(capsys, "report", out)
    assert code == 0, err
    assert "report.html" in stdout
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "fedavg" in html
    for image in IMAGES:
        assert (out / image).stat().st_size > 0
        assert f'src="{image}"' in html


def test_partition_prints_one_row_per_client(tmp_path, capsys):
    code, out, err = cli(capsys, "partition", write_config(tmp_path), "--set", "data.n_clients=7")
    assert code == 0, err
    row = re.compile(r"^\s*[│|]\s*(\d+)\s*[│|]\s*(\d+)\s*[│|]\s*(\d+)\s*[│|]")  # client | train | test |
    rows = [tuple(map(int, m.groups())) for m in map(row.match, out.splitlines()) if m]
    assert [client for client, _, _ in rows] == list(range(7))
    assert "7 clients" in out and "dirichlet" in out
    assert sum(train + test for _, train, test in rows) == 1797  # every digit is dealt out once


def test_partition_reports_bad_alpha(tmp_path, capsys):
    code, _, err = cli(capsys, "partition", write_config(tmp_path), "--set", "data.partition.alpha=0")
    assert_one_line_error(code, err, "data.partition.alpha")


def test_devices_and_algorithms_print(tmp_path, capsys):
    code, out, err = cli(capsys, "devices", write_config(tmp_path))
    assert code == 0, err
    assert "6 devices" in out and "all" in out

    code, out, err = cli(capsys, "algorithms")
    assert code == 0, err
    for name in STRATEGIES:
        assert name in out
    assert {"fedavg", "fedprox", "scaffold", "fednova", "fedadam", "fedyogi"} <= set(STRATEGIES)
    assert "strategy.selection.name, and its strategy.selection.params" in out
    for name in SELECTIONS:
        assert name in out
    assert "Uniform sampling without replacement" in out  # a selection's first docstring line


def test_algorithms_lists_whatever_selection_is_registered(capsys, monkeypatch):
    class Odd(Selection):
        def __init__(self, *args, k: int, weights: list[float] = [0.5, 0.5], **kwargs) -> None:  # noqa: B006
            pass

    monkeypatch.setitem(SELECTIONS, "odd", Odd)  # no docstring, a required parameter, a default that looks like markup
    code, out, err = cli(capsys, "algorithms")
    assert code == 0, err
    assert "odd" in out and "k, weights=[0.5, 0.5]" in out and "args" not in out


def test_configuration_reference_is_complete_and_the_doc_is_current(capsys):
    from hetfl.config import reference, reference_markdown

    rows = reference()
    assert all(description for *_, description in rows), "every config key needs a description"
    assert {"data.partition.alpha", "devices.compute.median_flops", "strategy.deadline_s"} <= {r[0] for r in rows}
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate: hetfl config --markdown > docs/configuration.md"
    code, out, _ = cli(capsys, "config")
    assert code == 0 and "data.partition.alpha" in out
