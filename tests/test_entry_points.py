"""Names that installed packages add through entry points (``hetfl.strategies``, ``hetfl.selections``,
``hetfl.models``, ``hetfl.datasets``, ``hetfl.partitions``).

A real distribution, ``hetfl-test-plugin 0.3.1``, is built from a ``pyproject.toml`` and installed with pip into a
temporary folder (never into the project's environment); hetfl runs in a process whose ``PYTHONPATH`` holds it,
as it would with the package installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_config

HETFL = [sys.executable, "-m", "hetfl.cli"]
DIST = "entry point hetfl-test-plugin 0.3.1"

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "hetfl-test-plugin"
version = "0.3.1"

[project.entry-points."hetfl.strategies"]
fedavgm = "hetfl_test_plugin:FedAvgM"
fedavg = "hetfl_test_plugin:Impostor"
broken = "hetfl_test_plugin_broken:Thing"

[project.entry-points."hetfl.selections"]
roundrobin = "hetfl_test_plugin:RoundRobin"

[project.entry-points."hetfl.models"]
widemlp = "hetfl_test_plugin:wide_mlp"

[project.entry-points."hetfl.datasets"]
blobs = "hetfl_test_plugin:blobs"

[project.entry-points."hetfl.partitions"]
halves = "hetfl_test_plugin:halves"

[tool.setuptools]
py-modules = ["hetfl_test_plugin", "hetfl_test_plugin_broken"]
'''

PLUGIN = '''
"""hetfl-test-plugin: a strategy, a selection, a model, a dataset and a partition for hetfl, by entry points."""
import numpy as np
from torch import nn

from hetfl.strategies import FedAvg
from hetfl.strategies.selection import Selection


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al., arXiv:1909.06335)."""

    def __init__(self, *, beta: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta
        self.velocity = None

    def aggregate(self, server, updates):
        delta = self.combined_delta(server, updates)
        self.velocity = delta if self.velocity is None else self.beta * self.velocity + delta
        return server.params + self.server_lr * self.velocity


class Impostor(FedAvg):
    """Claims the built-in name fedavg: the built-in must win."""

    def __init__(self, **kwargs):
        raise RuntimeError("the impostor was used")


class RoundRobin(Selection):
    """Clients in id order, each round continuing where the last stopped."""

    def __init__(self):
        self.turn = 0

    def select(self, server, available, k):
        order = [(self.turn + i) % server.n_clients for i in range(server.n_clients)]
        chosen = [c for c in order if c in available][:k]
        self.turn = (chosen[-1] + 1) % server.n_clients if chosen else self.turn
        return sorted(chosen)


def wide_mlp(input_shape, n_classes, width: int = 24):
    """One hidden layer of ``width`` units."""
    (features,) = input_shape
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, n_classes))


def blobs(cfg, seed):
    """Gaussian blobs (listed only)."""
    raise NotImplementedError


def halves(labels, n_clients, rng):
    """Shuffled, in equal parts."""
    return np.array_split(rng.permutation(len(labels)), n_clients)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """hetfl-test-plugin, built and installed by pip into a temporary folder (the project's .venv is not touched)."""
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "source", root / "site"
    source.mkdir()
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / "hetfl_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (source / "hetfl_test_plugin_broken.py").write_text("raise ImportError('this plugin module is broken on purpose')\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"pip could not install the test plugin:\n{done.stderr}")
    assert (site / "hetfl_test_plugin-0.3.1.dist-info" / "entry_points.txt").is_file()
    return site


def hetfl(*argv, site: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(site) if site else "", os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([*HETFL, *(str(a) for a in argv)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, "COLUMNS": "200"})


def row(stdout: str, name: str) -> str:
    """The table line whose first cell is ``name``."""
    lines = [line for line in stdout.splitlines() if line.strip("│ ").split(" ")[0] == name]
    assert len(lines) == 1, (name, lines)
    return lines[0]


def test_hetfl_algorithms_lists_builtins_and_entry_points_with_their_origin(site, tmp_path):
    done = hetfl("algorithms", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    fedavgm = row(out, "fedavgm")
    assert DIST in fedavgm and "FedAvg with server momentum" in fedavgm and "beta=0.9, server_lr=1.0" in fedavgm
    assert "built-in" in row(out, "fedavg") and "Impostor" not in out  # a built-in name wins over an entry point
    assert DIST in row(out, "roundrobin") and "Clients in id order" in row(out, "roundrobin")
    assert DIST in row(out, "widemlp") and "hetfl_test_plugin:wide_mlp" in row(out, "widemlp")
    assert DIST in row(out, "blobs") and DIST in row(out, "halves")
    broken = row(out, "broken")  # a package whose module does not import is listed, with why, and hides nothing
    assert DIST in broken and "cannot be loaded: importing hetfl_test_plugin_broken" in broken
    assert "ImportError: this plugin module is broken on purpose" in " ".join(out.split())  # the cell wraps
    for builtin in ("mlp", "tinylm", "dirichlet", "iid", "oort", "random", "fedcompass"):
        assert "built-in" in row(out, builtin)
    for title in ("strategy.name", "strategy.selection.name", "model.name and model.zoo[i].name", "data.dataset",
                  "data.partition.kind"):
        assert title in out
    assert "import path, package.module:attribute" in out and "hetfl.strategies, hetfl.selections, hetfl.models" in out


def test_a_run_with_names_from_an_installed_package(site, tmp_path):
    config = write_config(tmp_path, strategy__name="fedavgm", strategy__params={"beta": 0.5},
                          strategy__selection={"name": "roundrobin"}, model={"name": "widemlp", "params": {"width": 12}})
    done = hetfl("run", config, "--out", tmp_path / "run", "--quiet", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "fedavgm" and summary["status"] == "completed"
    assert summary["tasks_per_client"] == [2, 2, 2, 1, 1, 1]  # round robin: clients 0-2, 3-5, 0-2
    module = site / "hetfl_test_plugin.py"
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    for key, path in (("strategy.name", "hetfl_test_plugin:FedAvgM"), ("strategy.selection.name", "hetfl_test_plugin:RoundRobin"),
                      ("model.name", "hetfl_test_plugin:wide_mlp")):
        assert summary["code"][key] == {"path": path, "origin": DIST, "file": str(module.resolve()), "sha256": digest,
                                        "root": None}, key
    assert summary["architectures"][0].startswith("widemlp")

    # fedavg stays the built-in with the plugin installed (its Impostor raises if it is ever built)
    plain = write_config(tmp_path, "plain.yaml")
    done = hetfl("run", plain, "--out", tmp_path / "plain", "--quiet", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["code"] == {}

    # a parameter the entry point's class does not take: one line, as for a built-in
    done = hetfl("run", config, "--out", tmp_path / "bad", "--quiet", "--set", "strategy.params.gamma=1", site=site,
                 cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "strategy.params.gamma: not a parameter of fedavgm (known: beta, server_lr)" in done.stderr


def test_without_the_package_its_names_are_unknown(tmp_path):
    config = write_config(tmp_path, strategy__name="fedavgm")
    done = hetfl("run", config, "--out", tmp_path / "run", "--quiet", site=None, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "unknown algorithm 'fedavgm'" in line and "package.module:attribute" in line
    assert not (tmp_path / "run").exists()
