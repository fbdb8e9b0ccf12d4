"""Experiment trackers (hetfl.results.tracking): what TensorBoard, MLflow and a CSV file store, read back with the real
libraries, equals metrics.jsonl; a user's tracker by import path or as an object gets exactly metrics.jsonl's records,
in order, and on_end whatever the run's status; a tracker that raises is disabled, never the run."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, write_config
from hetfl.cli import EXIT_USER_ERROR, main
from hetfl.config import validate
from hetfl.engine import run as engine_run
from hetfl.engine.run import run_experiment
from hetfl.errors import ConfigError
from hetfl.results.tracking import CSVTracker, RunInfo, Tracker, Trackers, build_trackers, mlflow_uri, scalars
from test_deploy_support import deployment, env  # noqa: F401 - fixtures
from test_deploy_support import write_config as write_deploy_config

RECORDER = '''
import json

class Recorder:
    """Every hook call, one JSON line in ``path``."""

    def __init__(self, path, out):
        self.path, self.out = path, str(out)

    def _write(self, entry):
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\\n")

    def on_start(self, run):
        self._write({"hook": "on_start", "name": run.name, "tags": run.tags, "out": self.out,
                     "lr": run.params["training.lr"], "resumed_from": run.resumed_from})

    def on_metrics(self, record):
        self._write({"hook": "on_metrics", "record": record})

    def on_end(self, summary):
        self._write({"hook": "on_end", "summary": summary})


class Broken:
    def on_metrics(self, record):
        if record["round"] >= 1:
            raise RuntimeError("disk full")
'''


def metrics_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Memory(Tracker):
    """A tracker given from Python: keeps what it is told."""

    def __init__(self):
        self.started: list[RunInfo] = []
        self.records: list[dict] = []
        self.ended: list[dict] = []

    def on_start(self, run):
        self.started.append(run)

    def on_metrics(self, record):
        self.records.append(record)

    def on_end(self, summary):
        self.ended.append(summary)


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=mlflow_uri(path)).search_experiments()
    return path


def mlflow_runs(db: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(db))
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_reaches_tensorboard_mlflow_csv_and_a_users_tracker(tmp_path, mlflow_db):
    (tmp_path / "mytrackers.py").write_text(RECORDER)
    config = write_config(tmp_path, name="tracked", tracking={
        "tensorboard": "tb", "mlflow": str(mlflow_db), "csv": "metrics.csv",
        "callbacks": [{"name": "mytrackers:Recorder", "params": {"path": str(tmp_path / "calls.jsonl")}}],
    })
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    records = metrics_of(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]

    # the user's tracker, by import path beside the config: exactly metrics.jsonl, in order, between start and end
    seen = calls(tmp_path / "calls.jsonl")
    assert [c["hook"] for c in seen] == ["on_start"] + ["on_metrics"] * 4 + ["on_end"]
    assert seen[0]["name"] == "run" and seen[0]["out"] == str(tmp_path / "run") and seen[0]["lr"] == TINY["training"]["lr"]
    assert seen[0]["tags"]["algorithm"] == "fedavg" and seen[0]["tags"]["seed"] == "0" and seen[0]["resumed_from"] is None
    assert [c["record"] for c in seen[1:-1]] == records
    assert seen[-1]["summary"] == summary and summary["status"] == "completed"

    # CSV: one row per record, with the run's name first
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["run"] * 4
    for row, record in zip(rows, records):
        assert float(row["accuracy"]) == record["accuracy"] and int(row["round"]) == record["round"]
        assert float(row["sim_time_s"]) == record["sim_time_s"]
        assert row["staleness_mean"] == ("" if record["staleness_mean"] is None else str(record["staleness_mean"]))

    # TensorBoard: the event file under tb/<run folder>, every number at step = round (float32)
    tb = tensorboard_scalars(tmp_path / "tb" / "run")
    for key in ("accuracy", "loss", "sim_time_s", "bytes_up", "updates"):
        assert [s for s, _ in tb[key]] == [r["round"] for r in records]
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert tb["summary/final_accuracy"] == [(3, pytest.approx(summary["final_accuracy"], rel=1e-6))]

    # MLflow: one finished run in the experiment named as the config, params, tags, every metric's history
    client, runs = mlflow_runs(mlflow_db, "tracked")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["hetfl.algorithm"] == "fedavg" and run.data.tags["hetfl.status"] == "completed"
    assert run.data.params["training.lr"] == str(TINY["training"]["lr"]) and run.data.params["rounds"] == "3"
    for key in ("accuracy", "loss", "sim_time_s", "train_flops"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["round"], r[key]) for r in records]
    assert run.data.metrics["summary.best_accuracy"] == summary["best_accuracy"]


def test_compare_gives_each_algorithm_its_tracker_run(tmp_path, mlflow_db):
    config = write_config(tmp_path, name="compared", rounds=2, tracking={"tensorboard": "tb", "mlflow": str(mlflow_db),
                                                                         "csv": "all.csv"})
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--algorithms", "fedavg,fedprox", "--out", str(out), "--quiet"]) == 0
    client, runs = mlflow_runs(mlflow_db, "compared")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"cmp", "fedavg", "fedprox"}  # the comparison's parent run and one child per algorithm
    parent = by_name.pop("cmp")
    assert parent.data.tags["hetfl.comparison_of"] == str(out.resolve()) and parent.info.status == "FINISHED"
    for name, run in by_name.items():
        assert run.data.tags["hetfl.algorithm"] == name and run.data.tags["hetfl.run_dir"] == str((out / name).resolve())
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.value for m in history] == [r["accuracy"] for r in metrics_of(out / name)]
        assert [v for _, v in tensorboard_scalars(tmp_path / "tb" / "cmp" / name)["accuracy"]] == pytest.approx(
            [r["accuracy"] for r in metrics_of(out / name)], rel=1e-6)
    assert by_name["fedprox"].data.tags["hetfl.variant"].startswith("fedprox")
    with open(tmp_path / "all.csv", newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["fedavg"] * 3 + ["fedprox"] * 3


def test_resume_continues_the_mlflow_run_and_tells_trackers(tmp_path, mlflow_db):
    (tmp_path / "mytrackers.py").write_text(RECORDER)
    config = write_config(tmp_path, name="resumed", rounds=2, tracking={
        "mlflow": str(mlflow_db), "callbacks": [{"name": "mytrackers:Recorder", "params": {"path": str(tmp_path / "c.jsonl")}}]})
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--resume", str(out), "--set", "rounds=4", "--quiet"]) == 0
    records = metrics_of(out)
    client, runs = mlflow_runs(mlflow_db, "resumed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["hetfl.resumed_from"] == "2"
    history = client.get_metric_history(runs[0].info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["accuracy"]) for r in records]
    seen = calls(tmp_path / "c.jsonl")
    assert [c["resumed_from"] for c in seen if c["hook"] == "on_start"] == [None, 2]
    assert [c["record"] for c in seen if c["hook"] == "on_metrics"] == records


def test_hetfl_server_tells_the_same_trackers(env, deployment, tmp_path):  # noqa: F811 - fixtures
    (tmp_path / "mytrackers.py").write_text(RECORDER)
    config = write_deploy_config(tmp_path, rounds=2, strategy__clients_per_round=2, deploy__min_clients=2, tracking={
        "csv": "m.csv", "callbacks": [{"name": "mytrackers:Recorder", "params": {"path": str(tmp_path / "c.jsonl")}}]})
    deployment.start_server(config)
    # two clients are enough for the server's trackers; they are not sent the tracking section (nor its code)
    deployment.start_clients(clients=[0, 1])
    assert deployment.wait_server() == 0, deployment.server_log()
    records = deployment.metrics()
    seen = calls(tmp_path / "c.jsonl")
    assert seen[0]["hook"] == "on_start" and seen[0]["tags"]["engine"] == "deploy"
    assert [c["record"] for c in seen[1:-1]] == records and len(records) == 3
    assert seen[-1]["summary"] == deployment.summary() and seen[-1]["summary"]["status"] == "completed"
    with open(tmp_path / "m.csv", newline="") as f:
        assert [float(r["accuracy"]) for r in csv.DictReader(f)] == [r["accuracy"] for r in records]


def test_a_raising_tracker_is_disabled_and_the_run_goes_on(tmp_path, caplog):
    (tmp_path / "mytrackers.py").write_text(RECORDER)
    config = write_config(tmp_path, tracking={"callbacks": ["mytrackers:Broken"]})
    memory = Memory()
    with caplog.at_level(logging.WARNING, logger="hetfl.tracking"):
        summary = run_experiment(validate_file(config), tmp_path / "run", show_progress=False, trackers=[memory])
    assert summary["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.name == "hetfl.tracking"]
    assert warnings == ["tracker mytrackers:Broken raised in on_metrics (RuntimeError: disk full); it is disabled for "
                        "the rest of the run"]
    assert memory.records == metrics_of(tmp_path / "run") and memory.ended[0]["status"] == "completed"


def validate_file(path: Path):
    from hetfl.config import load_config

    return load_config(path)


def test_on_end_is_called_when_the_run_is_interrupted_or_fails(tmp_path, monkeypatch):
    cfg = validate({**TINY, "rounds": 5})
    saves = {"n": 0}

    def save_then(exc):
        def save(self):
            saves["n"] += 1
            if saves["n"] == 2:
                raise exc
        return save

    memory = Memory()
    monkeypatch.setattr(engine_run.Run, "save_checkpoint", save_then(KeyboardInterrupt()))
    assert run_experiment(cfg, tmp_path / "a", show_progress=False, trackers=[memory])["status"] == "interrupted"
    assert [e["status"] for e in memory.ended] == ["interrupted"] and len(memory.records) == 3

    saves["n"], memory = 0, Memory()
    monkeypatch.setattr(engine_run.Run, "save_checkpoint", save_then(RuntimeError("no space left")))
    with pytest.raises(RuntimeError):
        run_experiment(cfg, tmp_path / "b", show_progress=False, trackers=[memory])
    assert len(memory.ended) == 1
    end = memory.ended[0]
    assert end["status"] == "failed" and end["rounds"] == 2 and "no space left" in end["error"]


def test_trackers_call_hooks_a_tracker_has_and_end_once():
    class OnlyEnd:
        def __init__(self):
            self.ends = 0

        def on_end(self, summary):
            self.ends += 1

    only = OnlyEnd()
    trackers = Trackers([("only", only)])
    trackers.start(RunInfo("r", Path("r"), "e", "fedavg", None, 0))
    trackers.metrics({"round": 0, "accuracy": 0.5})
    trackers.end({"status": "completed"})
    trackers.end({"status": "failed"})
    assert only.ends == 1


def test_a_tracker_failing_at_start_hears_no_more(caplog):
    class FailsAtStart(Memory):
        def on_start(self, run):
            raise OSError("no such folder")

    failing, fine = FailsAtStart(), Memory()
    trackers = Trackers([("failing", failing), ("fine", fine)])
    with caplog.at_level(logging.WARNING, logger="hetfl.tracking"):
        trackers.start(RunInfo("r", Path("r"), "e", "fedavg", None, 0))
        trackers.metrics({"round": 0, "accuracy": 0.5})
        trackers.end({"status": "completed"})
    assert failing.records == [] and failing.ended == []
    assert fine.records == [{"round": 0, "accuracy": 0.5}] and fine.ended == [{"status": "completed"}]
    assert len(caplog.records) == 1 and "tracker failing raised in on_start (OSError: no such folder)" in caplog.text


@pytest.mark.parametrize("flush_s, sent_before_end", [(0, 2), (1e9, 0)])
def test_the_mlflow_writer_sends_each_record_or_batches(mlflow_db, tmp_path, flush_s, sent_before_end):
    from hetfl.results.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_db, experiment="flush", flush_s=flush_s)
    tracker.on_start(RunInfo(f"f{flush_s}", tmp_path, "e", "fedavg", None, 0, {"rounds": 2}, {"run_dir": str(tmp_path)}))
    tracker.on_metrics({"round": 0, "accuracy": 0.25, "loss": None})
    tracker.on_metrics({"round": 1, "accuracy": 0.5, "loss": 1.5})
    history = lambda: [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, "accuracy")]  # noqa: E731
    assert len(history()) == sent_before_end
    tracker.on_end({"status": "interrupted", "rounds": 1, "final_accuracy": 0.5})
    assert history() == [(0, 0.25), (1, 0.5)]
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, "loss")] == [(1, 1.5)]
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["summary.final_accuracy"] == 0.5


def test_csv_widens_its_header_and_a_run_replaces_its_own_rows(tmp_path):
    path = tmp_path / "m.csv"

    def start(name, resumed_from=None):
        tracker = CSVTracker(path)
        tracker.on_start(RunInfo(name, tmp_path / name, "e", "fedavg", None, 0, resumed_from=resumed_from))
        return tracker

    a = start("a")
    a.on_metrics({"round": 0, "accuracy": 0.25, "staleness_mean": None})
    a.on_metrics({"round": 1, "accuracy": 0.5, "staleness_mean": 0.0, "groups": [1, 2]})  # a new key: a wider header
    b = start("b")
    b.on_metrics({"round": 0, "accuracy": 0.125, "staleness_mean": None})
    text = path.read_text().splitlines()
    assert text[0] == "run,round,accuracy,staleness_mean,groups" and len(text) == 4
    rows = list(csv.DictReader(open(path, newline="")))
    assert [(r["run"], r["round"], r["accuracy"], r["groups"]) for r in rows] == [
        ("a", "0", "0.25", ""), ("a", "1", "0.5", "[1, 2]"), ("b", "0", "0.125", "")]
    start("a", resumed_from=0)  # resumed at its checkpoint of round 0: its later rows are measured again
    assert [(r["run"], r["round"]) for r in csv.DictReader(open(path, newline=""))] == [("a", "0"), ("b", "0")]
    start("b")  # started anew: its earlier rows go
    assert [(r["run"], r["round"]) for r in csv.DictReader(open(path, newline=""))] == [("a", "0")]


def test_scalars_and_mlflow_uris(tmp_path):
    assert scalars({"round": 2, "a": 0.5, "b": None, "c": "x", "d": [1], "e": True, "f": {"g": 3}}) == {
        "round": 2.0, "a": 0.5, "f/g": 3.0}
    assert mlflow_uri("http://host:5000") == "http://host:5000"
    assert mlflow_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert mlflow_uri(tmp_path / "store") == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


@pytest.mark.parametrize("key, module", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, key, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    config = write_config(tmp_path, tracking={key: "somewhere"})
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"tracking.{key}: the {module} package is not installed; pip install hetfl[{key}]" in err
    cfg = validate({**TINY, "tracking": {"callbacks": [{"name": key, "params": {}}]}})  # the same tracker by name
    with pytest.raises(ConfigError, match=rf"tracking.callbacks.0.name: {key} needs the {module} package.*hetfl\[{key}\]"):
        build_trackers(cfg, tmp_path)


def test_tracker_paths_are_relative_to_the_config_file(tmp_path):
    from hetfl.config import load_config

    (tmp_path / "sub").mkdir()
    cfg = load_config(write_config(tmp_path / "sub", tracking={"csv": "m.csv", "mlflow": "http://h:5000"}))
    assert cfg.tracking.csv == str(tmp_path / "sub" / "m.csv") and cfg.tracking.mlflow == "http://h:5000"


def test_importing_hetfl_imports_no_tracker_package():
    code = ("import sys, hetfl, hetfl.cli, hetfl.engine.run, hetfl.results.tracking; "
            "print([m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_extending_pages_tracker_is_the_examples_and_runs(tmp_path, monkeypatch):
    import re
    import shutil

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "extending.md").read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", doc, flags=re.S | re.M) if b.startswith("# mylab/tracking.py"))
    example = (root / "examples" / "custom" / "mylab" / "tracking.py").read_text()
    assert block.split("\n", 1)[1].strip() in example
    shutil.copytree(root / "examples" / "custom" / "mylab", tmp_path / "mylab", ignore=shutil.ignore_patterns("__pycache__"))
    config = write_config(tmp_path, tracking={"callbacks": [{"name": "mylab.tracking:JsonlMirror",
                                                             "params": {"path": str(tmp_path / "acc.jsonl")}}]})
    try:
        assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    finally:
        for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
            del sys.modules[name]
    mirrored = [json.loads(line) for line in (tmp_path / "acc.jsonl").read_text().splitlines()]
    assert mirrored == [{"run": "run", "round": r["round"], "accuracy": r["accuracy"]} for r in metrics_of(tmp_path / "run")]


@pytest.mark.serial  # starts a Ray cluster
def test_the_ray_backend_tells_the_same_trackers(tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install hetfl[ray])")
    from hetfl.engine.backends import start_ray

    started = start_ray(None, 2, 1, None)  # a local Ray of 2 CPUs, as hetfl starts one (a node timing out: once more)
    try:
        memory = Memory()
        cfg = validate({**TINY, "backend": {"name": "ray"}, "tracking": {"csv": str(tmp_path / "m.csv")}})
        summary = run_experiment(cfg, tmp_path / "run", show_progress=False, trackers=[memory])
    finally:
        if started:
            ray.shutdown()
    assert memory.started[0].tags["engine"] == "ray" and memory.records == metrics_of(tmp_path / "run")
    assert memory.ended == [json.loads((tmp_path / "run" / "summary.json").read_text())] and summary["status"] == "completed"
    with open(tmp_path / "m.csv", newline="") as f:
        assert [float(r["accuracy"]) for r in csv.DictReader(f)] == [r["accuracy"] for r in memory.records]
