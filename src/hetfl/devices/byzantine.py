"""Simulated Byzantine clients: a fixed set of attackers that return a corrupted model (``devices.byzantine``).

The simulator asks :meth:`Byzantine.returned` for every arriving update; for an attacker it replaces the
trained model w_i = w_start + d (d: the honest change) by

- ``sign_flip``: w_start - scale * d (the change reversed and amplified; the "reversed gradient" attack of
  the Byzantine-robustness literature, e.g. Damaskinos et al., "Asynchronous Byzantine Machine Learning",
  ICML 2018);
- ``scaled_random``: w_start + scale * ||d|| * u, u a uniformly random unit direction (a Gaussian vector
  normalised), the "Gaussian" attack of Blanchard et al. (NeurIPS 2017) with a length tied to honest updates.
- ``backdoor``: w_start + scale * d, where d is *really* trained, by the engine's ordinary client half, on the
  attacker's data with a trigger stamped on a share ``poison_frac`` of its samples and those relabelled ``target``
  (:meth:`Byzantine.poison`, applied once when the federation is built). The boost ``scale`` (gamma) is model
  replacement: Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020 (arXiv:1807.00459), upload
  gamma (X - G) + G with gamma = n / eta, so that the server's mean lands near the attacker's model X. The trigger
  (:func:`stamp`) sets a sample's last ``trigger_size`` features (flattened: the last pixels of an image) to the
  dataset's largest feature value. :meth:`Byzantine.success_rate` is the attack success rate: the share of
  stamped evaluation samples whose true class is not the target that the model classifies as the target.

Which clients attack is drawn once from the run's seed (round(fraction * n_clients), halves up); each
attack's randomness comes from ``(seed, task_id)``, so a run is reproducible whatever the order of events.
Attackers train honestly and only lie in what they upload (their timing and reported loss are honest).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from hetfl.config import ByzantineConfig
from hetfl.errors import ConfigError


def stamp(x: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """A copy of the samples ``x`` (N, ...) with the last ``size`` features of each (flattened) set to ``value``."""
    flat = x.reshape(len(x), -1).clone()
    flat[:, flat.shape[1] - size :] = value
    return flat.reshape(x.shape)


def attack_success(predicted: torch.Tensor, y: torch.Tensor, target: int) -> float | None:
    """The share of the samples whose true class ``y`` is not ``target`` that are ``predicted`` as ``target``
    (None when every sample is of the target class)."""
    others = y != target
    if not bool(others.any()):
        return None
    return float((predicted[others] == target).double().mean())


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
        self.target, self.poison_frac, self.trigger_size = cfg.target, cfg.poison_frac, cfg.trigger_size
        self.trigger_value = 1.0  # backdoor: the dataset's largest feature value, set by poison
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
        if self.attack == "backdoor":
            return base + self.scale * d
        g = np.random.default_rng([self.seed, 12, task_id]).standard_normal(d.numel())
        u = torch.from_numpy(g / max(np.linalg.norm(g), 1e-300)).to(d.dtype).reshape(d.shape)
        return base + self.scale * float(torch.linalg.vector_norm(d)) * u

    @property
    def backdoor(self) -> bool:
        return self.attack == "backdoor"

    def check(self, n_classes: int, input_shape: tuple[int, ...], token_input: bool) -> None:
        """Refuse, in one line naming the key, a backdoor the data cannot carry."""
        if not self.backdoor:
            return
        if token_input:
            raise ConfigError("devices.byzantine.attack: backdoor stamps a trigger on float features; this dataset's "
                              "samples are tokens")
        if self.target >= n_classes:
            raise ConfigError(f"devices.byzantine.target: {self.target} is not a class of this dataset (0 to {n_classes - 1})")
        features = math.prod(input_shape)
        if self.trigger_size > features:
            raise ConfigError(f"devices.byzantine.trigger_size: {self.trigger_size} is more than a sample's {features} "
                              "features")

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, train: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """The training data with each attacker's poisoned samples: ``(x, y, train)`` with stamped, relabelled
        copies of round(poison_frac * n) of each attacker's n samples appended as new rows, and those indices
        replaced by the copies' in ``train`` (so nobody else's samples, nor the evaluation's, change). Which samples:
        drawn from ``(seed, client)``. Nothing changes unless the attack is backdoor."""
        if not self.backdoor or not self.clients:
            return x, y, train
        self.trigger_value = float(x.max())
        train = [np.asarray(t).copy() for t in train]
        new_x, n = [], len(x)
        for c in sorted(self.clients):
            idx = train[c]
            k = math.floor(self.poison_frac * len(idx) + 0.5)
            where = np.sort(np.random.default_rng([self.seed, 13, c]).choice(len(idx), size=k, replace=False))
            new_x.append(stamp(x[torch.from_numpy(idx[where].astype(np.int64))], self.trigger_size, self.trigger_value))
            idx[where] = n + np.arange(k)
            n += k
        added = torch.cat(new_x)
        return (torch.cat([x, added]), torch.cat([y, torch.full((len(added),), self.target, dtype=y.dtype)]), train)

    def success_rate(self, predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float | None:
        """The attack success rate of the model ``predict`` (samples -> logits) on the evaluation samples ``x, y``
        stamped with the trigger (see :func:`attack_success`)."""
        others = y != self.target
        if not bool(others.any()):
            return None
        stamped = stamp(x[others], self.trigger_size, self.trigger_value)
        return attack_success(predict(stamped).argmax(-1), y[others], self.target)
