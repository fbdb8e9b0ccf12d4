"""``hetfl partition CONFIG --export DIR``: each client's training data as its own file, for real clients.

``DIR/client_<i>.npz`` holds client i's training split (arrays ``x``, ``y``), exactly the samples the simulator
trains client i on (normalised as the run normalises them), so a deployment and a simulation of the same
config and seed train on the same data. ``DIR/test.npz`` holds the union of the test splits (with ``owner``,
the client each test sample belongs to), which the server evaluates on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetfl.config import ExperimentConfig
from hetfl.errors import HetflError


def export_partitions(cfg: ExperimentConfig, out: str | Path) -> list[Path]:
    """Write the partition of ``cfg`` to ``out``; return the files written."""
    from hetfl.data import federate

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HetflError(f"--export {out}: exists and is not a folder")
    fed = federate(cfg.data, cfg.seed)
    if fed.drift is not None:
        raise HetflError("--export: data.drift changes labels at a simulated time, which exported files cannot carry; "
                         "set data.drift.kind: none")
    out.mkdir(parents=True, exist_ok=True)
    ds, written = fed.dataset, []
    for client, idx in enumerate(fed.train):
        path = out / f"client_{client}.npz"
        np.savez(path, x=ds.x[idx], y=ds.y[idx])
        written.append(path)
    test = np.concatenate(fed.test) if fed.test else np.zeros(0, dtype=np.int64)
    owner = np.concatenate([np.full(len(t), c) for c, t in enumerate(fed.test)]) if fed.test else test
    path = out / "test.npz"
    np.savez(path, x=ds.x[test], y=ds.y[test], owner=owner)
    written.append(path)
    return written
