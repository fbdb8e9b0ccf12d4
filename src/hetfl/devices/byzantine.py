"""Simulated Byzantine clients: a fixed set of attackers that return a corrupted model (``devices.byzantine``).

The simulator asks :meth:`Byzantine.returned` for every arriving update; for an attacker it replaces the
trained model w_i = w_start + d (d: the honest change) by

- ``sign_flip``: w_start - scale * d (the change reversed and amplified; the "reversed gradient" attack of
  the Byzantine-robustness literature, e.g. Damaskinos et al., "Asynchronous Byzantine Machine Learning",
  ICML 2018);
- ``scaled_random``: w_start + scale * ||d|| * u, u a uniformly random unit direction (a Gaussian vector
  normalised), the "Gaussian" attack of Blanchard et al. (NeurIPS 2017) with a length tied to honest updates.

Which clients attack is drawn once from the run's seed (round(fraction * n_clients), halves up); each
attack's randomness comes from ``(seed, task_id)``, so a run is reproducible whatever the order of events.
Attackers train honestly and only lie in what they upload (their timing and reported loss are honest).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hetfl.config import ByzantineConfig


class Byzantine:
    """The attackers of a run and their attack.

    Parameters
    ----------
    cfg : ByzantineConfig
        ``devices.byzantine``: fraction, attack, scale.
    n_clients : int
        Clients of the federation.
    seed : int
        The run's seed.
    """

    def __init__(self, cfg: ByzantineConfig, n_clients: int, seed: int) -> None:
        self.attack, self.scale, self.seed = cfg.attack, cfg.scale, seed
        k = math.floor(cfg.fraction * n_clients + 0.5)
        rng = np.random.default_rng([seed, 11])
        self.clients = frozenset(int(c) for c in rng.choice(n_clients, size=k, replace=False))

    def returned(self, client_id: int, task_id: int, start: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """What client ``client_id`` uploads for task ``task_id`` started from ``start``, having trained ``params``."""
        if client_id not in self.clients:
            return params
        base = start if start.shape == params.shape else torch.zeros_like(params)  # a strategy sending something else
        d = params - base
        if self.attack == "sign_flip":
            return base - self.scale * d
        g = np.random.default_rng([self.seed, 12, task_id]).standard_normal(d.numel())
        u = torch.from_numpy(g / max(np.linalg.norm(g), 1e-300)).to(d.dtype).reshape(d.shape)
        return base + self.scale * float(torch.linalg.vector_norm(d)) * u
