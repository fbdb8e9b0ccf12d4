"""Runs end to end through the command line: Ctrl-C, resume, determinism.

A run interrupted keeps what it measured and resumes from its last checkpoint; a resumed run
measures exactly what a straight run of the same length measures (wall time aside); the same
config and seed give the same numbers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY as BASE
from conftest import write_config as write_shared
from hetfl.cli import main
from hetfl.engine import run as engine_run

TINY = {**BASE, "name": "e2e", "seed": 3, "rounds": 6}

# heterogeneity that exercises every event kind: deadlines (timers), dropouts (failures), devices
# going offline (Markov availability), evaluation every other round
HARSH = {
    "strategy__deadline_s": 0.05,
    "devices__dropout": 0.2,
    "devices__availability": {"kind": "markov", "mean_online_s": 0.2, "mean_offline_s": 0.1, "horizon_s": 5.0},
    "evaluation__every": 2,
}


def write_config(folder: Path, filename: str = "config.yaml", **changes) -> Path:
    return write_shared(folder, filename, base=TINY, **changes)


def hetfl(*argv) -> int:
    return main([str(a) for a in argv])


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def without_wall(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "started_at")}


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders measured the same thing: metrics and summary equal but for wall-clock fields."""
    assert without_wall(read_metrics(a)) == without_wall(read_metrics(b))
    assert comparable(read_summary(a)) == comparable(read_summary(b))


# --------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_the_same_run(tmp_path, capsys):
    config = write_config(tmp_path, **HARSH)
    assert hetfl("run", config, "--out", tmp_path / "one", "--quiet") == 0
    assert hetfl("run", config, "--out", tmp_path / "two", "--quiet") == 0
    assert_same_run(tmp_path / "one", tmp_path / "two")
    summary = read_summary(tmp_path / "one")
    assert summary["status"] == "completed" and summary["rounds"] == 6
    assert summary["failed_tasks"] > 0 or summary["dropped"] > 0  # the harsh settings did bite

    assert hetfl("run", config, "--out", tmp_path / "other-seed", "--quiet", "--set", "seed=4") == 0
    assert without_wall(read_metrics(tmp_path / "other-seed")) != without_wall(read_metrics(tmp_path / "one"))


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("algorithm", "changes"),
    [("fedavg", {}), ("scaffold", {}), ("fedyogi", {}), ("fednova", HARSH), ("scaffold", HARSH)],
    ids=["fedavg", "scaffold", "fedyogi", "fednova-harsh", "scaffold-harsh"],
)
def test_resumed_run_equals_straight_run(tmp_path, capsys, algorithm, changes):
    config = write_config(tmp_path, strategy__name=algorithm, **changes)
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet", "--set", "rounds=10") == 0
    assert hetfl("run", config, "--out", tmp_path / "resumed", "--quiet") == 0
    assert read_summary(tmp_path / "resumed")["rounds"] == 6
    assert hetfl("run", "--resume", tmp_path / "resumed", "--quiet", "--set", "rounds=10") == 0

    straight, resumed = read_summary(tmp_path / "straight"), read_summary(tmp_path / "resumed")
    assert resumed["status"] == "completed" and resumed["rounds"] == 10
    for key in ("final_accuracy", "best_accuracy", "sim_time_s", "bytes_up", "bytes_down", "time_to_target_s"):
        assert resumed[key] == straight[key], key
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["rounds"] == 10


def _interrupt_at(monkeypatch, version: int) -> None:
    """Make the next run raise KeyboardInterrupt (as Ctrl-C would) once the server reaches ``version``."""
    evaluate = engine_run.Run.evaluate

    def interrupted(self):
        if self.sim.version == version:
            raise KeyboardInterrupt
        return evaluate(self)

    monkeypatch.setattr(engine_run.Run, "evaluate", interrupted)


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, rounds=12, checkpoint_every=5)
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet") == 0

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 8)
        assert hetfl("run", config, "--out", out, "--quiet") == 130
    summary = read_summary(out)
    assert summary["status"] == "interrupted"
    assert [m["round"] for m in read_metrics(out)] == list(range(8))  # what it measured, up to the interrupt
    assert summary["final_accuracy"] == read_metrics(out)[-1]["accuracy"]

    assert hetfl("run", "--resume", out, "--quiet") == 0  # from the checkpoint at round 5, to round 12
    assert [m["round"] for m in read_metrics(out)] == list(range(13))
    assert read_summary(out)["status"] == "completed"
    assert_same_run(tmp_path / "straight", out)


def test_ctrl_c_keeps_the_measurements_and_resume_finishes(tmp_path, capsys):
    config = write_config(tmp_path, rounds=2000, checkpoint_every=5)
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("hetfl")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hetfl.cli"]
    # default SIGINT handling in the child even when this test runs with SIGINT ignored (a background job)
    proc = subprocess.Popen([*cmd, "run", str(config), "--out", str(out), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stdout

    summary = read_summary(out)
    assert summary["status"] == "interrupted"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]  # every line whole
    rounds = [m["round"] for m in metrics]
    assert rounds == list(range(len(rounds))) and len(rounds) >= 12
    assert rounds[-1] <= summary["rounds"] < 2000
    assert (out / "checkpoint.pt").is_file()

    target = summary["rounds"] + 5
    assert hetfl("run", "--resume", out, "--quiet", "--set", f"rounds={target}") == 0
    summary = read_summary(out)
    assert summary["status"] == "completed" and summary["rounds"] == target
    rounds = [m["round"] for m in read_metrics(out)]
    assert rounds == sorted(set(rounds))  # strictly increasing: no round measured twice
    assert rounds == list(range(target + 1))
    assert summary["final_accuracy"] == read_metrics(out)[-1]["accuracy"]

    # and it measured what a straight run of that length measures
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet", "--set", f"rounds={target}") == 0
    assert_same_run(tmp_path / "straight", out)


# --------------------------------------------------------------------------- resume: what it must refuse
def test_resume_of_a_finished_run_adds_no_round(tmp_path, capsys):
    out = tmp_path / "run"
    assert hetfl("run", write_config(tmp_path), "--out", out, "--quiet") == 0
    before = read_metrics(out)
    assert hetfl("run", "--resume", out, "--quiet") == 0
    assert read_summary(out)["rounds"] == 6
    assert without_wall(read_metrics(out)) == without_wall(before)


def test_bad_override_on_resume_leaves_the_run_resumable(tmp_path, capsys):
    out = tmp_path / "run"
    assert hetfl("run", write_config(tmp_path), "--out", out, "--quiet") == 0
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert hetfl("run", "--resume", out, "--quiet", "--set", "rounds=8", "--set", "strategy.name=fedbest") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "strategy.name" in err
    assert (out / "config.yaml").read_text() == config_before
    assert hetfl("run", "--resume", out, "--quiet", "--set", "rounds=8") == 0


def test_resume_refuses_a_different_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert hetfl("run", write_config(tmp_path), "--out", out, "--quiet") == 0
    capsys.readouterr()
    assert hetfl("run", "--resume", out, "--quiet", "--set", "rounds=8", "--set", "model.hidden=[8]") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.hidden" in err


def test_resume_refuses_a_different_federation(tmp_path, capsys):
    out = tmp_path / "run"
    assert hetfl("run", write_config(tmp_path), "--out", out, "--quiet") == 0
    capsys.readouterr()
    assert hetfl("run", "--resume", out, "--quiet", "--set", "rounds=8", "--set", "data.n_clients=9") == 2
    assert "data.n_clients" in capsys.readouterr().err
