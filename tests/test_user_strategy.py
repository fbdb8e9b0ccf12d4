"""An algorithm in the user's own file, through every command: a strategy (FedAvgM, FedAvg with server momentum) and a
client selection written to a temporary folder as modules and named by import path in a config beside them.

In-process tests give each module a name of its own (``mystrats_<hex>``) and forget it afterwards, so no test sees
another's; the tests that prove where code is looked for (``hetfl run`` and ``--resume`` from other folders, Ray
workers) run ``python -m hetfl.cli`` in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import TINY, write_config
from test_deploy_support import finish
from hetfl import registry
from hetfl.cli import main
from hetfl.config import StrategyConfig, load_config
from hetfl.engine.backends import code_roots, with_code_roots
from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, Oort, Task, Update, build_strategy, constructor_parameters, parameters
from hetfl.testing import CHECKS, LINEAR, check_strategy

HETFL = [sys.executable, "-m", "hetfl.cli"]

FEDAVGM = '''
"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, 2019, arXiv:1909.06335).

    v <- beta * v + sum_i p_i (w_i - w),    w <- w + server_lr * v
"""
from hetfl.strategies import FedAvg


class FedAvgM(FedAvg):
    """FedAvg whose server step carries momentum ``beta``; FedAvg's parameters are forwarded to it."""

    def __init__(self, *, beta: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.velocity = None

    def aggregate(self, server, updates):
        delta = self.combined_delta(server, updates)  # FedAvg's sample-weighted mean change
        self.velocity = delta if self.velocity is None else self.beta * self.velocity + delta
        return server.params + self.server_lr * self.velocity


class NamedFedAvgM(FedAvgM):
    """The same, with a name of its own."""

    name = "fedavgm"


class Sloppy(FedAvg):
    """Takes a parameter of its own and does not forward FedAvg's."""

    def __init__(self, *, gamma: int = 1):
        super().__init__()
        self.gamma = gamma


class Deeper(FedAvgM):
    def __init__(self, *, rounds_warm: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.rounds_warm = rounds_warm
'''

SELECTION = '''
"""A client selection of one's own: take the available clients in turn."""
from hetfl.strategies.selection import Selection


class RoundRobin(Selection):
    """Clients in id order, each round continuing where the last stopped."""

    def __init__(self, *, offset: int = 0):
        self.turn = offset

    def select(self, server, available, k):
        n = server.n_clients
        order = [(self.turn + i) % n for i in range(n)]
        chosen = [c for c in order if c in available][:k]
        self.turn = (chosen[-1] + 1) % n if chosen else self.turn
        return sorted(chosen)
'''


# --------------------------------------------------------------------------- user code on disk
@pytest.fixture
def user_module():
    """``write(folder, source, stem)``: ``source`` as ``folder/<stem>_<hex>.py``; its module name. Afterwards the module
    is forgotten (sys.modules, the registry's cache, sys.path), so the next test imports its own."""
    written: list[tuple[str, Path]] = []

    def write(folder: Path, source: str, stem: str = "mystrats") -> str:
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        written.append((name, folder))
        return name

    yield write
    for name, folder in written:
        sys.modules.pop(name, None)
        for key in [k for k, r in registry._cache.items() if r.path.startswith(f"{name}:")]:
            del registry._cache[key]
        while str(folder.resolve()) in sys.path:
            sys.path.remove(str(folder.resolve()))


def on_path(folder: Path) -> None:
    """Make ``folder`` importable, as the registry leaves a config's folder (the fixture removes it)."""
    sys.path.insert(0, str(folder.resolve()))


def run_config(folder: Path, strategy: str, filename: str = "config.yaml", **changes) -> Path:
    return write_config(folder, filename, **{"strategy__name": strategy, **changes})


def hetfl(*argv) -> int:
    return main([str(a) for a in argv])


def hetfl_process(*argv, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(hetfl_start(*argv, cwd=cwd, env=env), timeout=300)


def hetfl_start(*argv, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``hetfl *argv`` started in ``cwd``; :func:`finish` waits for it."""
    return subprocess.Popen([*HETFL, *(str(a) for a in argv)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200", **(env or {})})


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_wall(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- the algorithm, by hand
def update(start: torch.Tensor, end: list[float], n: int, task_id: int) -> Update:
    task = Task(task_id=task_id, client_id=task_id, version=0, params=start, steps=1, dispatched_at=0.0)
    return Update(task=task, params=torch.tensor(end), n_samples=n, steps=1, loss=0.0, arrived_at=1.0)


def test_fedavgm_aggregates_with_server_momentum_by_hand(tmp_path, user_module):
    name = user_module(tmp_path, FEDAVGM)
    on_path(tmp_path)
    strategy = build_strategy(StrategyConfig(name=f"{name}:FedAvgM", params={"beta": 0.5, "server_lr": 2.0}))
    w0 = torch.zeros(2)
    # round 1: p = (1/4, 3/4); delta = 1/4 (1, 0) + 3/4 (0, 2) = (0.25, 1.5); v = delta; w = w0 + 2 v = (0.5, 3)
    w1 = strategy.aggregate(SimpleNamespace(params=w0), [update(w0, [1.0, 0.0], 1, 0), update(w0, [0.0, 2.0], 3, 1)])
    assert torch.allclose(w1, torch.tensor([0.5, 3.0]))
    # round 2: p = (1/2, 1/2); delta = 1/2 (1, 0) + 1/2 (0, 0) = (0.5, 0); v = 0.5 (0.25, 1.5) + (0.5, 0) = (0.625, 0.75)
    # w = (0.5, 3) + 2 (0.625, 0.75) = (1.75, 4.5)
    w2 = strategy.aggregate(SimpleNamespace(params=w1), [update(w1, [1.5, 3.0], 2, 2), update(w1, [0.5, 3.0], 2, 3)])
    assert torch.allclose(w2, torch.tensor([1.75, 4.5]))
    # beta 0 is FedAvg with the same server step
    plain = build_strategy(StrategyConfig(name=f"{name}:FedAvgM", params={"beta": 0.0, "server_lr": 2.0}))
    fedavg = FedAvg(server_lr=2.0)
    ups = [update(w0, [1.0, 0.0], 1, 0), update(w0, [0.0, 2.0], 3, 1)]
    assert torch.equal(plain.aggregate(SimpleNamespace(params=w0), ups), fedavg.aggregate(SimpleNamespace(params=w0), ups))


def test_fedavgm_passes_the_common_checks(tmp_path, user_module):
    name = user_module(tmp_path, FEDAVGM)
    on_path(tmp_path)
    report = check_strategy(f"{name}:FedAvgM", beta=0.5)
    assert report.passed == [*CHECKS, LINEAR] and not report.skipped  # it inherits FedAvg's claim, and keeps it
    assert report.strategy == f"{name}:FedAvgM"  # no name of its own: its import path


# --------------------------------------------------------------------------- parameters, from the constructor
def test_constructor_parameters_follow_kwargs_up_to_the_builtin_base(tmp_path, user_module):
    name = user_module(tmp_path, FEDAVGM)
    on_path(tmp_path)
    module = __import__(name)
    params = constructor_parameters(module.FedAvgM)
    assert list(params) == ["beta", "clients_per_round", "deadline_s", "selection", "server_lr", "aggregator", "privacy"]
    assert params["beta"][1] is float and params["server_lr"][1] is float  # the base's annotation, typed from its module
    assert params["server_lr"][0].default == 1.0
    assert [p.name for p in parameters(module.FedAvgM)] == ["beta", "server_lr"]  # strategy.* keys are not params
    assert [p.name for p in parameters(module.Deeper)] == ["rounds_warm", "beta", "server_lr"]  # two levels of kwargs
    assert list(constructor_parameters(module.Sloppy)) == ["gamma"]  # no **kwargs: the base's are not its own


def test_parameters_are_validated_as_for_a_builtin(tmp_path, user_module):
    name = user_module(tmp_path, FEDAVGM)
    on_path(tmp_path)
    path = f"{name}:FedAvgM"

    def build(**strategy):
        return build_strategy(StrategyConfig(name=path, **strategy))

    with pytest.raises(ConfigError, match=rf"^strategy\.params\.gamma: not a parameter of {path} \(known: beta, server_lr\)$"):
        build(params={"gamma": 1})
    with pytest.raises(ConfigError, match=r"^strategy\.params\.beta: .*valid number.*\(got 'high'\)$"):
        build(params={"beta": "high"})
    with pytest.raises(ConfigError, match=r"^strategy\.params\.server_lr: .*valid number.*\(got \[1\]\)$"):  # the base's type
        build(params={"server_lr": [1]})
    with pytest.raises(ConfigError, match=r"^strategy\.params\.clients_per_round: .*set strategy\.clients_per_round"):
        build(params={"clients_per_round": 4})
    with pytest.raises(ConfigError, match=rf"^strategy\.params: {path}: beta must lie in \[0, 1\), got 1\.5$"):
        build(params={"beta": 1.5})  # the constructor's own check, in one line
    with pytest.raises(ConfigError, match=rf"^strategy\.params: {path}: server_lr must be positive$"):
        build(params={"server_lr": -1})  # the base's check, reached through **kwargs
    with pytest.raises(ConfigError, match=r"^strategy\.aggregator\.rule: "):
        build_strategy(StrategyConfig(name=f"{name}:Sloppy", aggregator={"rule": "median"}))  # takes no aggregator

    strategy = build(params={"beta": "0.25", "server_lr": 3}, clients_per_round=4, deadline_s=7.5,
                     selection={"name": "oort"}, aggregator={"rule": "median"})
    assert strategy.beta == 0.25 and isinstance(strategy.server_lr, float) and strategy.server_lr == 3.0
    assert strategy.clients_per_round == 4 and strategy.deadline_s == 7.5  # forwarded to RoundStrategy
    assert isinstance(strategy.selection, Oort)
    assert strategy.aggregation.aggregator.rule == "median"
    sloppy = build_strategy(StrategyConfig(name=f"{name}:Sloppy", clients_per_round=4))
    assert sloppy.clients_per_round == 10  # it does not take clients_per_round: its base's default stays
    with pytest.raises(ConfigError, match=r"^strategy\.params\.server_lr: not a parameter of .*:Sloppy \(known: gamma\)$"):
        build_strategy(StrategyConfig(name=f"{name}:Sloppy", params={"server_lr": 0.5}))


def test_a_class_is_called_by_its_own_name_or_else_its_import_path(tmp_path, user_module, capsys):
    name = user_module(tmp_path, FEDAVGM)
    on_path(tmp_path)
    assert build_strategy(StrategyConfig(name=f"{name}:FedAvgM")).name == f"{name}:FedAvgM"  # not FedAvg's "fedavg"
    assert build_strategy(StrategyConfig(name=f"{name}:NamedFedAvgM")).name == "fedavgm"

    for cls, shown in (("FedAvgM", f"{name}:FedAvgM"), ("NamedFedAvgM", "fedavgm")):
        out = tmp_path / f"run-{cls}"
        capsys.readouterr()
        assert hetfl("run", run_config(tmp_path, f"{name}:{cls}"), "--out", out) == 0  # with the progress bar
        stdout = capsys.readouterr().out
        assert read_summary(out)["algorithm"] == shown
        assert stdout.count(shown) >= 2, stdout  # the bar's label and the closing line
        assert "fedavg:" not in stdout and " fedavg " not in stdout


# --------------------------------------------------------------------------- a selection of one's own
def test_a_selection_of_ones_own_by_import_path(tmp_path, user_module, capsys):
    name = user_module(tmp_path, SELECTION, "mysel")
    config = run_config(tmp_path, "fedavg", strategy__selection={"name": f"{name}:RoundRobin", "params": {"offset": 1}})
    assert hetfl("run", config, "--out", tmp_path / "run", "--quiet") == 0
    summary = read_summary(tmp_path / "run")
    assert summary["tasks_per_client"] == [1, 2, 2, 2, 1, 1]  # rounds took clients 1-3, 4-5 and 0, 1-3
    record = summary["code"]["strategy.selection.name"]
    assert record["path"] == f"{name}:RoundRobin" and record["origin"] == "import path"
    assert record["sha256"] == sha256(tmp_path / f"{name}.py") and record["root"] == str(tmp_path.resolve())
    assert "strategy.name" not in summary["code"]  # fedavg is built in

    config = run_config(tmp_path, "fedavg", "bad.yaml", strategy__selection={"name": f"{name}:RoundRobin",
                                                                            "params": {"offset": "one"}})
    capsys.readouterr()
    assert hetfl("run", config, "--out", tmp_path / "bad", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategy.selection.params.offset" in err, err
    config = run_config(tmp_path, "fedasync", "async.yaml", strategy__selection={"name": f"{name}:RoundRobin"})
    assert hetfl("run", config, "--out", tmp_path / "async", "--quiet") == 2
    assert "does not run rounds" in capsys.readouterr().err


# --------------------------------------------------------------------------- hetfl run, --resume, from other folders
def test_run_and_resume_from_other_folders_and_changed_code_is_refused(tmp_path):
    project, elsewhere, third = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "third"
    for folder in (project, elsewhere, third):
        folder.mkdir()
    (project / "mystrats.py").write_text(textwrap.dedent(FEDAVGM))
    config = run_config(project, "mystrats:FedAvgM", strategy__params={"beta": 0.5}, rounds=3)

    # the straight run, the reference the resumed run is compared with below, needs nothing of the others: it runs
    # meanwhile (one process start-up less to wait for)
    straight = tmp_path / "reference" / "straight"
    started = hetfl_start("run", config, "--out", straight, "--quiet", "--set", "rounds=5", cwd=third)
    done = hetfl_process("run", config, "--out", tmp_path / "resumed", "--quiet", cwd=elsewhere)  # not beside it
    assert done.returncode == 0, done.stderr
    out = tmp_path / "resumed"
    summary = read_summary(out)
    assert summary["algorithm"] == "mystrats:FedAvgM" and summary["rounds"] == 3
    record = {"path": "mystrats:FedAvgM", "origin": "import path", "file": str((project / "mystrats.py").resolve()),
              "sha256": sha256(project / "mystrats.py"), "root": str(project.resolve())}
    assert summary["code"] == {"strategy.name": record}
    assert yaml.safe_load((out / "config.yaml").read_text())["code"] == {"strategy.name": record}

    # from a third folder: the module is found where the run recorded it, before the checkpoint (which pickles the
    # strategy and its momentum) loads; the resumed run measures what a straight run measures
    done = hetfl_process("run", "--resume", out, "--quiet", "--set", "rounds=5", cwd=third)
    assert done.returncode == 0, done.stderr
    done = finish(started, timeout=300)
    assert done.returncode == 0, done.stderr
    assert without_wall(read_metrics(out)) == without_wall(read_metrics(straight))
    volatile = ("wall_time_s", "started_at")
    assert {k: v for k, v in read_summary(out).items() if k not in volatile} == {
        k: v for k, v in read_summary(straight).items() if k not in volatile}

    # the code changed since the run: resuming is refused in one line, nothing touched
    before = (out / "metrics.jsonl").read_text()
    (project / "mystrats.py").write_text(textwrap.dedent(FEDAVGM).replace("self.beta * self.velocity", "0.5 * self.velocity"))
    done = hetfl_process("run", "--resume", out, "--quiet", "--set", "rounds=6", cwd=third)
    one_line_error(done, "strategy.name", "mystrats:FedAvgM has changed", "code.strategy.name")
    assert (out / "metrics.jsonl").read_text() == before

    # a module that is nowhere to be found: one line naming where it was looked for
    (project / "mystrats.py").unlink()
    done = hetfl_process("run", config, "--out", tmp_path / "gone", "--quiet", cwd=third)
    one_line_error(done, "strategy.name", "cannot import 'mystrats'", str(project.resolve()))
    assert not (tmp_path / "gone").exists()


# --------------------------------------------------------------------------- hetfl compare
def test_compare_mixes_builtins_and_a_user_strategy(tmp_path, user_module, monkeypatch, capsys):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = user_module(project, FEDAVGM)
    path = f"{name}:FedAvgM"
    config = run_config(project, "fedavg")
    monkeypatch.chdir(elsewhere)  # the module is beside the config, not here: found through the config's folder
    out = tmp_path / "cmp"
    assert hetfl("compare", config, "--algorithms", f"fedavg,{path}", "--out", out, "--quiet") == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fedavg", f"{name}.FedAvgM"]
    comparison = json.loads((out / "comparison.json").read_text())
    assert [s["algorithm"] for s in comparison] == ["fedavg", path]
    assert comparison[1]["code"]["strategy.name"]["path"] == path and comparison[0]["code"] == {}
    saved = load_config(out / f"{name}.FedAvgM" / "config.yaml")
    assert saved.strategy.name == path
    assert saved.code["strategy.name"].sha256 == sha256(project / f"{name}.py")
    assert path in (out / "report.html").read_text()
    assert comparison[0]["final_accuracy"] != comparison[1]["final_accuracy"]  # momentum changed the run

    # a name that is not known, and one that does not import: one line, before any run
    capsys.readouterr()
    assert hetfl("compare", config, "--algorithms", "fedavg,nosuchthing", "--out", tmp_path / "c2", "--quiet") == 2
    assert "nosuchthing" in capsys.readouterr().err
    assert hetfl("compare", config, "--algorithms", "fedavg,nosuchmodule:X", "--out", tmp_path / "c3", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot import 'nosuchmodule'" in err
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3" / "fedavg").exists()


def test_compare_refuses_algorithms_that_would_share_a_folder(tmp_path, capsys):
    config = write_config(tmp_path)
    assert hetfl("compare", config, "--algorithms", "a.b:C,a:b.C", "--out", tmp_path / "cmp") == 2
    err = capsys.readouterr().err
    assert "a.b:C and a:b.C would share the run folder a.b.C" in err and not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- Ray
def test_ray_workers_get_the_code_roots_merged_into_the_runtime_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/from/env")
    assert with_code_roots(None, []) == {}
    assert with_code_roots({"pip": ["x"]}, ["/a", "/b"]) == {"pip": ["x"], "env_vars": {"PYTHONPATH": "/a:/b:/from/env"}}
    given = {"env_vars": {"PYTHONPATH": "/mine:/a", "OMP_NUM_THREADS": "1"}, "py_modules": ["/m"]}
    merged = with_code_roots(given, ["/a"])
    assert merged == {"env_vars": {"PYTHONPATH": "/a:/mine", "OMP_NUM_THREADS": "1"}, "py_modules": ["/m"]}
    assert given["env_vars"]["PYTHONPATH"] == "/mine:/a"  # the config's own mapping is not changed
    code = {"model.name": SimpleNamespace(root="/a"), "strategy.name": SimpleNamespace(root="/a"),
            "data.dataset": SimpleNamespace(root=None)}
    assert code_roots(code) == ["/a"]


@pytest.mark.serial  # a Ray cluster: run alone (the Makefile's test target)
def test_a_user_strategy_runs_on_a_local_ray_started_by_hetfl(tmp_path):
    pytest.importorskip("ray", reason="the Ray backend needs ray (pip install hetfl[ray])")
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "mystrats.py").write_text(textwrap.dedent(FEDAVGM))
    base = run_config(project, "fedavg", rounds=2, training__vectorize="off")
    # Ray puts the driver's current folder on its workers' sys.path, not the config's: the workers find the module
    # only through the roots hetfl adds to their PYTHONPATH. hetfl compare starts one Ray for all its runs, with
    # the roots of every algorithm's code (here only --algorithms names it)
    on_ray = hetfl_process("compare", base, "--algorithms", "fedavg,mystrats:FedAvgM", "--out", tmp_path / "cmp",
                           "--quiet", "--set", "backend.name=ray", "--set", "backend.num_workers=1", cwd=elsewhere)
    assert on_ray.returncode == 0, on_ray.stderr
    config = run_config(project, "mystrats:FedAvgM", "own.yaml", rounds=2, training__vectorize="off")
    local = hetfl_process("run", config, "--out", tmp_path / "inprocess", "--quiet", cwd=elsewhere)
    assert local.returncode == 0, local.stderr
    ray_run = tmp_path / "cmp" / "mystrats.FedAvgM"
    assert read_summary(ray_run)["algorithm"] == "mystrats:FedAvgM"
    assert without_wall(read_metrics(ray_run)) == without_wall(read_metrics(tmp_path / "inprocess"))


# --------------------------------------------------------------------------- summary and config.yaml
def test_builtins_only_record_no_code(tmp_path, capsys):
    assert hetfl("run", write_config(tmp_path), "--out", tmp_path / "run", "--quiet") == 0
    assert read_summary(tmp_path / "run")["code"] == {}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["code"] == {}
    assert TINY["strategy"]["name"] == "fedavg"
