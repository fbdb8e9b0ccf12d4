"""docs/extending.md, run as written, on a copy of examples/custom (a user's package, outside src/).

- Every ``hetfl ...`` line of the page's ``bash`` blocks runs, in order, from a folder that holds the copy at
  ``examples/custom`` (as the repository root does), and exits 0. ``pip install -e examples/custom`` is the one
  line not run as written: the package goes into a temporary folder (``pip install --target``), never into the
  project's environment, and the later commands see it through PYTHONPATH.
- The one-line error the page shows (``$ hetfl ...`` then ``error: ...`` in a ``text`` block) is the one hetfl
  prints.
- The ``check_strategy`` example runs.
- The same package (a BatchNorm CNN, a data loader, FedAvgM) runs over gRPC: ``hetfl server`` and two ``hetfl
  client`` processes on loopback, each client importing its own copy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_deploy_support import HETFL, HETFL_CLIENT, RUN_TIMEOUT_S, free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
EXAMPLE = ROOT / "examples" / "custom"


def blocks(kind: str) -> list[str]:
    """The page's fenced blocks of ``kind`` (bash, text, python), in order."""
    return re.findall(rf"^ *```{kind}\n(.*?)^ *```", DOC.read_text(), flags=re.S | re.M)


def commands() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as the repository root for the docs' commands: the example at examples/custom."""
    root = tmp_path_factory.mktemp("extending")
    shutil.copytree(EXAMPLE, root / "examples" / "custom", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return root


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_pages_commands_run_as_written_on_the_example(workspace):
    env = {**os.environ, "COLUMNS": "250"}
    env.pop("PYTHONPATH", None)
    seen = []
    for line in commands():
        words = shlex.split(line)
        if words[:3] == ["pip", "install", "-e"]:  # into a temporary folder, not the project's environment
            site = workspace / "site"
            done = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(site), words[3]], workspace, env)
            assert done.returncode == 0, done.stderr
            env["PYTHONPATH"] = str(site)
            seen.append("pip")
            continue
        assert words[0] == "hetfl", f"docs/extending.md: a command this test does not know how to run: {line}"
        done = run([*HETFL, *words[1:]], workspace, env)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr
        seen.append(words[1] if words[1] != "run" or "--resume" not in words else "resume")
        if words[1] == "algorithms":
            listed = done.stdout
            assert re.search(r"fedavgm\s*│\s*entry point mylab 0\.1\.0", listed), listed
            assert re.search(r"smallresnet\s*│\s*entry point mylab 0\.1\.0", listed), listed
    assert {"run", "compare", "resume", "algorithms", "pip"} <= set(seen), seen

    results = workspace / "results"
    custom = json.loads((results / "custom" / "summary.json").read_text())
    assert custom["algorithm"] == "mylab.strategies:FedAvgM" and custom["rounds"] == 25  # resumed to 25
    assert custom["final_accuracy"] > 0.8, custom["final_accuracy"]
    models_py = workspace / "examples" / "custom" / "mylab" / "models.py"
    assert custom["code"]["model.name"]["file"] == str(models_py.resolve())
    assert custom["code"]["data.dataset"]["path"] == "mylab.data:load_noisy_digits"
    assert custom["architectures"] == ["mylab.models:SmallResNet(width=16,blocks=1)"]
    compared = {s["algorithm"]: s for s in json.loads((results / "custom-compare" / "comparison.json").read_text())}
    assert set(compared) == {"fedavg", "fedbn", "mylab.strategies:FedAvgM"}
    assert compared["fedbn"]["personal_acc_mean"] is not None
    flower = json.loads((results / "custom-flower" / "summary.json").read_text())
    assert flower["status"] == "completed" and flower["final_accuracy"] > 0.5
    by_name = json.loads((results / "custom-ep" / "summary.json").read_text())
    assert by_name["code"]["strategy.name"]["origin"] == "entry point mylab 0.1.0"


def test_the_error_the_page_shows_is_the_one_hetfl_prints(workspace):
    shown = [block for block in blocks("text") if block.startswith("$ hetfl")]
    assert shown, "docs/extending.md shows no error example"
    for block in shown:
        command, expected = block.strip().splitlines()
        done = run([*HETFL, *shlex.split(command.removeprefix("$ hetfl "))], workspace, dict(os.environ))
        assert done.returncode == 2
        assert done.stderr.strip() == expected, (done.stderr, expected)


def test_the_check_strategy_example_runs(workspace, monkeypatch):
    example = next(block for block in blocks("python") if "check_strategy" in block)
    monkeypatch.syspath_prepend(str(workspace / "examples" / "custom"))
    namespace: dict = {}
    try:
        exec(compile(example, "docs/extending.md", "exec"), namespace)  # noqa: S102 - the page's own example
        namespace["test_fedavgm_is_a_hetfl_strategy"]()
    finally:
        for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
            del sys.modules[name]


def test_the_example_package_runs_over_grpc_with_two_client_processes(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    config = yaml.safe_load((project / "experiment.yaml").read_text())
    config.update(rounds=5)
    config["data"]["n_clients"] = 2
    config["strategy"]["clients_per_round"] = 2
    config["deploy"] = {"heartbeat_timeout_s": 15, "poll_s": 2}
    path = project / "deploy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    for args in (["partition", str(path), "--export", str(tmp_path / "parts")],
                 ["tokens", "2", "--out", str(tmp_path / "tokens.yaml")]):
        done = run([*HETFL, *args], tmp_path, env)
        assert done.returncode == 0, done.stderr
    tokens = yaml.safe_load((tmp_path / "tokens.yaml").read_text())
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    server_log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([*HETFL, "server", str(path), "--address", address, "--out", str(out), "--tokens",
                               str(tmp_path / "tokens.yaml")], stdout=server_log, stderr=subprocess.STDOUT, env=env)
    clients = []
    try:
        for c in range(2):
            folder = tmp_path / f"client{c}"  # each client in a folder of its own, with its own copy of the package
            shutil.copytree(project / "mylab", folder / "mylab")
            token = next(t for t, client in _token_items(tokens) if client == c)
            (folder / "token").write_text(token)
            clients.append(subprocess.Popen(
                [*HETFL_CLIENT, "--server", address, "--token-file", "token", "--data",
                 str(tmp_path / "parts" / f"client_{c}.npz"), "--quiet"],
                cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        assert server.wait(RUN_TIMEOUT_S) == 0, (tmp_path / "server.log").read_text()
        for proc in clients:
            output = proc.communicate(timeout=60)[0]
            assert proc.returncode == 0, output
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["updates"] == 10
    assert summary["architectures"] == ["mylab.models:SmallResNet(width=16,blocks=1)"]
    assert set(summary["code"]) == {"model.name", "data.dataset", "strategy.name"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"] + 0.1, metrics


def _token_items(tokens) -> list[tuple[str, int]]:
    """(token, client id) pairs of a token file as ``hetfl tokens`` writes it."""
    table = tokens.get("tokens", tokens) if isinstance(tokens, dict) else tokens
    if isinstance(table, dict):
        return [(str(t), int(c)) for t, c in table.items()]
    return [(str(row["token"]), int(row["client"])) for row in table]
