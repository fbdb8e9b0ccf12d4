"""A strategy of one's own in a real deployment: ``hetfl server`` sends its clients the config with its ``code``
section (import path, file, SHA-256 of each piece of user code), and each ``hetfl client`` imports its own copy and
refuses to join, in one line and a non-zero exit, when that copy hashes differently or cannot be imported.

One server and two client processes on loopback (``tests/test_deploy_support.py``'s helpers); the clients run in
folders of their own, each with its own copy of the module.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import yaml

from test_deploy_support import deployment, env  # noqa: F401 - fixtures
from test_deploy_support import HETFL, Deployment, write_config
from test_user_strategy import FEDAVGM, sha256


def project(folder: Path, **changes) -> Path:
    """``folder/mystrats.py`` (FedAvgM) and a deployment config naming it, beside it; the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mystrats.py").write_text(textwrap.dedent(FEDAVGM))
    return write_config(folder, strategy__name="mystrats:FedAvgM", strategy__params={"beta": 0.5}, **changes)


def client_folder(folder: Path, source: str | None) -> Path:
    """A client's working folder, with its own copy of ``mystrats.py`` (``source``; None: none)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        (folder / "mystrats.py").write_text(source)
    return folder


def refused(dep: Deployment, client: int, cwd: Path) -> str:
    """Run a client that must refuse to join; its one line of stderr."""
    done = subprocess.run(
        [*HETFL, "client", "--server", dep.address, "--token-file", str(dep.env.token_files[client]),
         "--data", str(dep.env.parts / f"client_{client}.npz"), "--quiet", "--give-up-after", "30"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_user_strategy_runs_over_grpc_with_clients_holding_the_same_code(env, deployment, tmp_path):
    config = project(tmp_path / "project", rounds=3, strategy__clients_per_round=2, deploy__min_clients=2)
    deployment.start_server(config)
    same = (tmp_path / "project" / "mystrats.py").read_text()
    for client in (0, 1):  # each in a folder of its own, with an identical copy: the hash decides, not the path
        deployment.start_client(client, cwd=client_folder(tmp_path / f"client{client}", same))
    assert deployment.wait_server() == 0, deployment.server_log()
    summary = deployment.summary()
    assert summary["status"] == "completed" and summary["rounds"] == 3 and summary["updates"] == 6
    assert summary["algorithm"] == "mystrats:FedAvgM"
    record = summary["code"]["strategy.name"]
    assert record["sha256"] == sha256(tmp_path / "project" / "mystrats.py")
    assert record["file"] == str((tmp_path / "project" / "mystrats.py").resolve())
    assert yaml.safe_load((deployment.out / "config.yaml").read_text())["code"]["strategy.name"] == record
    metrics = deployment.metrics()
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"] + 0.2  # it trained
    assert all(p.wait(30) == 0 for p in deployment.clients)


def test_a_client_with_other_code_or_none_refuses_to_join_in_one_line(env, deployment, tmp_path):
    # a server waiting for all five clients: the refused ones never start a round
    config = project(tmp_path / "project", rounds=2)
    deployment.start_server(config)
    deployment.wait_listening()

    changed = textwrap.dedent(FEDAVGM).replace("self.beta * self.velocity", "0.5 * self.velocity")
    line = refused(deployment, 2, client_folder(tmp_path / "changed", changed))
    assert line.startswith(f"error: this client cannot join the run at {deployment.address}: its strategy.name "
                           "mystrats:FedAvgM differs from the server's"), line
    ours = tmp_path / "changed" / "mystrats.py"
    assert f"{ours.resolve()} has SHA-256 {sha256(ours)[:12]}" in line
    assert f"the server's ({(tmp_path / 'project' / 'mystrats.py').resolve()}) " in line
    assert sha256(tmp_path / "project" / "mystrats.py")[:12] in line and "install the server's version" in line

    # no copy in the client's folder, and none where the server found its own (moved away): cannot be imported
    (tmp_path / "project" / "mystrats.py").rename(tmp_path / "project" / "kept.py")
    line = refused(deployment, 3, client_folder(tmp_path / "bare", None))
    assert line.startswith(f"error: this client cannot join the run at {deployment.address}: the server's "
                           "configuration: strategy.name: cannot import 'mystrats' for mystrats:FedAvgM"), line
    assert str((tmp_path / "bare").resolve()) in line  # where it looked

    assert deployment.server.poll() is None, deployment.server_log()  # the server is unharmed
    assert "Traceback" not in deployment.server_log()
