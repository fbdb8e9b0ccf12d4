"""Small federations built by hand, for tests that check the engine's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hetfl.config import ModelConfig, TrainingConfig
from hetfl.devices import DeviceProfile
from hetfl.engine import ClientPool, Simulator
from hetfl.models import build_model
from hetfl.training import LocalTrainer


def profile(client_id: int, *, speed: float = 1.0, flops: float = 1e6, bw: float = 1e5, latency: float = 0.0,
            windows=None, dropout: float = 0.0) -> DeviceProfile:
    return DeviceProfile(client_id=client_id, speed=speed, flops=flops, down_Bps=bw, up_Bps=bw,
                         latency_s=latency, windows=windows, dropout=dropout, tier="test")


def blobs(n: int, seed: int = 0, features: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable-ish Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, features, generator=g) * 3
    return centers[y] + torch.randn(n, features, generator=g), y


def make_simulator(strategy, sizes, profiles, *, training=None, seed=0, jitter=0.0, on_commit=None,
                   model="logreg") -> Simulator:
    x, y = blobs(sum(sizes), seed)
    bounds = np.cumsum([0, *sizes])
    indices = [torch.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    torch.manual_seed(seed)
    net = build_model(ModelConfig(name=model, hidden=[8]), (x.shape[1],), 3)
    trainer = LocalTrainer(net, training or TrainingConfig(local_steps=2, batch_size=4, lr=0.1))
    return Simulator(strategy=strategy, trainer=trainer, pool=ClientPool(x, y, indices), profiles=profiles,
                     flops_per_step=1e6, seed=seed, jitter=jitter, on_commit=on_commit)


def run_rounds(sim: Simulator, rounds: int, observe=None) -> Simulator:
    """Step ``sim`` until ``rounds`` commits; ``observe(sim)`` after every commit, if given."""
    def stop_after(s):
        if observe is not None:
            observe(s)
        if s.version >= rounds:
            s.stop("rounds")
    sim.on_commit = stop_after
    sim.proceed()
    while sim.step():
        pass
    return sim


@pytest.fixture
def digits_config():
    """A small digits experiment that runs in seconds."""
    from hetfl.config import validate
    return validate({
        "name": "test", "seed": 0, "rounds": 5,
        "data": {"dataset": "digits", "n_clients": 10, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "devices": {"compute": {"distribution": "lognormal", "median_flops": 2e8}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 10},
        "strategy": {"name": "fedavg", "clients_per_round": 5},
    })


# A federation that runs in a fraction of a second: 6 digits clients, 3 rounds of 3 clients, 5 local steps.
TINY = {
    "name": "tiny",
    "seed": 0,
    "rounds": 3,
    "checkpoint_every": 1,
    "data": {"dataset": "digits", "n_clients": 6, "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "devices": {"compute": {"distribution": "lognormal", "median_flops": 2.0e8}},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"lr": 0.05, "batch_size": 16, "local_steps": 5},
    "strategy": {"name": "fedavg", "clients_per_round": 3},
    "evaluation": {"target_accuracy": 0.2},
}


def write_config(folder: Path, filename: str = "config.yaml", base: dict | None = None, **changes) -> Path:
    """``base`` (default TINY) with ``changes`` (``data__partition__alpha=0`` sets data.partition.alpha) written to ``folder/name``."""
    raw = json.loads(json.dumps(TINY if base is None else base))
    for key, value in changes.items():
        node, parts = raw, key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = folder / filename
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- the order of files
def _starts_processes(module) -> bool:
    """Whether a test file starts ``hetfl`` processes (a deployment, CLI runs): tens of seconds a test."""
    return hasattr(module, "HETFL") or any(getattr(value, "__module__", None) == "test_deploy_support"
                                           for value in vars(module).values())


def pytest_collection_modifyitems(config, items):
    """The files that start processes first, then the rest; each file's tests keep their order.

    ``make test`` hands whole files to its two workers in this order (``--dist loadfile --no-loadscope-reorder``):
    the long files are taken first and the many short ones fill in after, instead of xdist's default order (files
    with the most tests first), which left the long deployment files, each a few tests, for the end, run by one
    worker while the other had nothing left to do.
    """
    first = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in first:
            first[module.__name__] = _starts_processes(module)
    items.sort(key=lambda item: not first.get(getattr(getattr(item, "module", None), "__name__", None), False))
