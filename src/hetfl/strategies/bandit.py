"""Per-device online bandits that choose a configuration (pruning ratio, LoRA rank) for each round.

FedSpine (Yao et al., "Efficient Deployment of Large Language Models on Resource-constrained Devices",
arXiv:2501.02438) gives every device an online multi-armed bandit over pruning ratios and LoRA ranks,
learning without prior knowledge of the device's compute and bandwidth. Its abstract names no
algorithm or reward, so this module provides two standard bandits on one interface and a reward of our
own design, :func:`fedspine_reward`.

UCB1 (Auer, Cesa-Bianchi and Fischer, "Finite-time Analysis of the Multiarmed Bandit Problem", 2002)::

    pull every (feasible) arm once, in index order; then
    a_t = argmax_a  mean_a + c * sqrt(2 ln t / n_a)       t = pulls so far, n_a = pulls of arm a

EXP3 (Auer, Cesa-Bianchi, Freund and Schapire, "The Nonstochastic Multiarmed Bandit Problem", 2002),
rewards in [0, 1], over the K feasible arms::

    p_a = (1 - gamma) * w_a / sum_b w_b + gamma / K
    after pulling a with reward r:  x_hat = r / p_a,   w_a <- w_a * exp(gamma * x_hat / K)

Both expose ``select(rng, feasible=None) -> arm index``, ``update(arm, reward)`` and ``history``, a
list of ``(t, arm, reward)`` with ``t`` counting updates from 1. An arm the device cannot run (its
model does not fit memory, say) is excluded by ``feasible``, a boolean mask, and is never selected.
Ties in UCB1 go to the lower index, so UCB1 uses ``rng`` only for the interface; EXP3 samples with it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


class Bandit:
    """Common state: the arms, pull counts, reward sums and the history.

    Parameters
    ----------
    arms : sequence of hashable
        The choices, e.g. ``[(0.0, 8), (0.5, 4)]`` as (pruning ratio, LoRA rank); indices refer to it.
    """

    def __init__(self, *, arms: Sequence[Hashable]) -> None:
        self.arms = list(arms)
        if not self.arms:
            raise ValueError("arms must hold at least one arm")
        k = len(self.arms)
        self.counts = np.zeros(k, dtype=np.int64)
        self.sums = np.zeros(k, dtype=np.float64)
        self.history: list[tuple[int, int, float]] = []

    @property
    def t(self) -> int:
        """Number of updates so far."""
        return len(self.history)

    def means(self) -> np.ndarray:
        """Mean reward per arm (0 for an arm never pulled)."""
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)

    def _mask(self, feasible) -> np.ndarray:
        mask = np.ones(len(self.arms), dtype=bool) if feasible is None else np.asarray(feasible, dtype=bool)
        if mask.shape != (len(self.arms),):
            raise ValueError(f"feasible must be a mask of {len(self.arms)} booleans; got shape {mask.shape}")
        if not mask.any():
            raise ValueError("no feasible arm: the device can run none of the configurations")
        return mask

    def update(self, arm: int, reward: float) -> None:
        """Record ``reward`` for ``arm``."""
        if not 0 <= arm < len(self.arms):
            raise IndexError(f"arm index {arm} is outside 0..{len(self.arms) - 1}")
        self.counts[arm] += 1
        self.sums[arm] += reward
        self.history.append((self.t + 1, int(arm), float(reward)))

    def select(self, rng: np.random.Generator, feasible=None) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class UCB1(Bandit):
    """UCB1 with exploration constant ``c``.

    Parameters
    ----------
    arms : sequence of hashable
        The choices.
    c : float, default 1.0
        Multiplies the confidence bonus ``sqrt(2 ln t / n_a)``; 1 is Auer et al.'s UCB1 (rewards in [0, 1]).
    """

    def __init__(self, *, arms: Sequence[Hashable], c: float = 1.0) -> None:
        super().__init__(arms=arms)
        if c < 0:
            raise ValueError(f"c must be non-negative; got {c}")
        self.c = c

    def index(self) -> np.ndarray:
        """``mean_a + c * sqrt(2 ln t / n_a)`` per arm; ``inf`` for an arm never pulled."""
        bonus = np.full(len(self.arms), np.inf)
        pulled = self.counts > 0
        bonus[pulled] = self.c * np.sqrt(2.0 * math.log(max(self.t, 1)) / self.counts[pulled])
        return self.means() + bonus

    def select(self, rng: np.random.Generator, feasible=None) -> int:
        """The feasible arm of highest index (an untried one first, lowest index first)."""
        mask = self._mask(feasible)
        return int(np.argmax(np.where(mask, self.index(), -np.inf)))


class EXP3(Bandit):
    """EXP3 for adversarial rewards in [0, 1].

    Parameters
    ----------
    arms : sequence of hashable
        The choices.
    gamma : float, default 0.1
        Exploration rate in (0, 1]: every feasible arm keeps probability at least ``gamma / K``.
    """

    def __init__(self, *, arms: Sequence[Hashable], gamma: float = 0.1) -> None:
        super().__init__(arms=arms)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1]; got {gamma}")
        self.gamma = gamma
        self.log_weights = np.zeros(len(self.arms))
        self._last: np.ndarray | None = None  # probabilities of the last select, for its update

    def probabilities(self, feasible=None) -> np.ndarray:
        """``(1 - gamma) w_a / sum w + gamma / K`` over the feasible arms, 0 for the others."""
        mask = self._mask(feasible)
        k = int(mask.sum())
        w = np.where(mask, np.exp(self.log_weights - self.log_weights[mask].max()), 0.0)
        return np.where(mask, (1.0 - self.gamma) * w / w.sum() + self.gamma / k, 0.0)

    def select(self, rng: np.random.Generator, feasible=None) -> int:
        """Sample an arm from :meth:`probabilities`."""
        p = self.probabilities(feasible)
        self._last = p
        return int(rng.choice(len(self.arms), p=p / p.sum()))

    def update(self, arm: int, reward: float) -> None:
        """Importance-weighted update of ``arm`` with ``reward`` in [0, 1] (use :func:`scale_reward`)."""
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"EXP3 needs rewards in [0, 1]; got {reward}; scale it with scale_reward")
        p = self._last if self._last is not None else self.probabilities()
        if not 0 <= arm < len(self.arms) or p[arm] <= 0:
            raise IndexError(f"arm {arm} could not have been selected (infeasible or out of range)")
        super().update(arm, reward)
        k = int((p > 0).sum())
        self.log_weights[arm] += self.gamma * (reward / p[arm]) / k
        self._last = None


def scale_reward(reward: float, *, low: float, high: float) -> float:
    """Map ``reward`` from a known range ``[low, high]`` to [0, 1], clipping outside values."""
    if not high > low:
        raise ValueError(f"high ({high}) must exceed low ({low})")
    return float(min(1.0, max(0.0, (reward - low) / (high - low))))


class RunningScaler:
    """Min-max scaling by the range of the raw rewards seen so far (0.5 while the range is empty).

    A heuristic for when no range is known in advance: the map changes as new extremes arrive, so
    EXP3's guarantees (which assume a fixed range) no longer hold exactly.
    """

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf

    def __call__(self, reward: float) -> float:
        self.low, self.high = min(self.low, reward), max(self.high, reward)
        if self.high == self.low:
            return 0.5
        return (reward - self.low) / (self.high - self.low)


def fedspine_reward(
    gain: float,
    sim_time_s: float,
    *,
    rate_scale: float = 1.0,
    time_exponent: float = 1.0,
    deadline_s: float | None = None,
) -> float:
    """Reward in [0, 1) of one round a device ran with one arm: loss improvement per simulated second.

    ::

        rate   = max(gain, 0) / sim_time_s ** time_exponent
        reward = 1 - exp(-rate / rate_scale)        (0 if sim_time_s > deadline_s)

    Parameters
    ----------
    gain : float
        Decrease of the device's validation loss from the model it downloaded (before pruning) to
        the model it returns (after pruning and tuning), so the damage pruning does counts against
        the arm. A negative gain earns 0.
    sim_time_s : float
        Simulated seconds the device spent on the round (download, computation, upload).
    rate_scale : float, default 1.0
        The rate (loss units per second) that earns ``1 - 1/e``; set it to a typical rate, such as the
        median of the first round, so rewards spread over [0, 1).
    time_exponent : float, default 1.0
        1 rewards improvement per second; 0 rewards the improvement alone; in between trades them.
    deadline_s : float, optional
        A round longer than this earns 0 (its update would arrive too late to count).
    """
    if sim_time_s <= 0:
        raise ValueError(f"sim_time_s must be positive; got {sim_time_s}")
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be positive; got {rate_scale}")
    if deadline_s is not None and sim_time_s > deadline_s:
        return 0.0
    rate = max(gain, 0.0) / sim_time_s**time_exponent
    return float(1.0 - math.exp(-rate / rate_scale))
