"""Which architecture of the zoo each client trains (``model.zoo`` and ``model.assign``).

- ``speed``: clients ranked by relative compute speed (ties by client id), cut into ``len(zoo)``
  groups whose sizes differ by at most one; the slowest group trains ``zoo[0]``, the fastest the
  last one. List the zoo smallest first, and slow phones get the small models.
- ``tier``: by the compute tier of the device profile (``devices.compute.distribution: tiers``),
  through the map ``model.tiers`` (tier name -> zoo index).
- ``cycle``: client ``i`` trains ``zoo[i mod len(zoo)]`` (HtFLlib's assignment).
- ``explicit``: ``model.assignment``, one zoo index per client.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hetfl.config import ModelConfig
from hetfl.devices import DeviceProfile
from hetfl.errors import ConfigError


def assign_architectures(cfg: ModelConfig, profiles: Sequence[DeviceProfile]) -> np.ndarray:
    """The zoo index of every client (all zeros without a zoo)."""
    n, k = len(profiles), len(cfg.zoo)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if cfg.assign == "speed":
        order = np.lexsort((np.arange(n), [p.speed for p in profiles]))  # slowest first, ties by id
        arch = np.empty(n, dtype=np.int64)
        arch[order] = np.arange(n) * k // n
        return arch
    if cfg.assign == "tier":
        tiers = [p.tier.split("/")[0] for p in profiles]
        missing = sorted({t for t in tiers if t not in cfg.tiers})
        if missing:
            raise ConfigError(
                f"model.tiers: no zoo index for compute tier '{missing[0]}' (the devices' tiers: "
                f"{', '.join(sorted(set(tiers)))}; assign 'tier' needs devices.compute.distribution: tiers)"
            )
        return np.array([cfg.tiers[t] for t in tiers], dtype=np.int64)
    if cfg.assign == "cycle":
        return np.arange(n, dtype=np.int64) % k
    assignment = cfg.assignment or []
    if len(assignment) != n:
        raise ConfigError(f"model.assignment: {len(assignment)} zoo indices for {n} clients (data.n_clients)")
    return np.array(assignment, dtype=np.int64)
