"""A partitioner, as a user would bring one: some classes are held only by some clients (intertwined heterogeneity).

hetfl calls ``held_by(labels, n_clients, rng, **data.partition.params)`` and gets one index array per client.
Paired with a device trace whose slowest devices are those clients (``examples/custom/intertwined.yaml``), the
classes they hold reach the server only in stale updates: the setting of Wang and Gao (arXiv:2309.13536), where
data and device heterogeneity are intertwined.
"""

from __future__ import annotations

import numpy as np

from hetfl.data.partition import iid


def held_by(labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, classes: list[int], clients: list[int]):
    """Samples of ``classes`` dealt at random among ``clients`` only, the other samples among the other clients."""
    labels = np.asarray(labels)
    if not clients or len(set(clients)) == n_clients or not all(0 <= c < n_clients for c in clients):
        raise ValueError(f"held_by: clients must be some, not all, of 0..{n_clients - 1}, got {clients}")
    held = np.isin(labels, classes)
    others = [c for c in range(n_clients) if c not in set(clients)]
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_clients
    for owners, mask in ((sorted(set(clients)), held), (others, ~held)):
        index = np.flatnonzero(mask)
        for client, part in zip(owners, iid(labels[index], len(owners), rng)):
            parts[client] = np.sort(index[part])
    return parts
