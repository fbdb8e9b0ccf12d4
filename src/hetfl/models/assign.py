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
from hetfl.devices import DeviceProfile, DeviceTable
from hetfl.errors import ConfigError


def speed_groups(profiles: Sequence[DeviceProfile], k: int) -> np.ndarray:
    """Clients ranked by relative compute speed (ties by id) and cut into ``k`` groups whose sizes differ by
    at most one: the group of every client, 0 for the slowest."""
    n = len(profiles)
    speeds = profiles.speed if isinstance(profiles, DeviceTable) else [p.speed for p in profiles]  # a column, or a list
    order = np.lexsort((np.arange(n), speeds))  # slowest first, ties by id
    group = np.empty(n, dtype=np.int64)
    group[order] = np.arange(n) * k // n
    return group


def by_tier(profiles: Sequence[DeviceProfile], values: dict, key: str, what: str) -> list:
    """``values[tier]`` for every client's compute tier; a tier missing from ``values`` is a one-line error
    naming the config ``key`` (``what`` says what it maps a tier to)."""
    names = profiles.tiers.tolist() if isinstance(profiles, DeviceTable) else [p.tier for p in profiles]
    tiers = [t.split("/")[0] for t in names]
    missing = sorted({t for t in tiers if t not in values})
    if missing:
        raise ConfigError(
            f"{key}: no {what} for compute tier '{missing[0]}' (the devices' tiers: {', '.join(sorted(set(tiers)))}; "
            "values by tier need devices.compute.distribution: tiers)"
        )
    return [values[t] for t in tiers]


def assign_architectures(cfg: ModelConfig, profiles: Sequence[DeviceProfile]) -> np.ndarray:
    """The zoo index of every client (all zeros without a zoo)."""
    n, k = len(profiles), len(cfg.zoo)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if cfg.assign == "speed":
        return speed_groups(profiles, k)
    if cfg.assign == "tier":
        return np.array(by_tier(profiles, cfg.tiers, "model.tiers", "zoo index"), dtype=np.int64)
    if cfg.assign == "cycle":
        return np.arange(n, dtype=np.int64) % k
    assignment = cfg.assignment or []
    if len(assignment) != n:
        raise ConfigError(f"model.assignment: {len(assignment)} zoo indices for {n} clients (data.n_clients)")
    return np.array(assignment, dtype=np.int64)
