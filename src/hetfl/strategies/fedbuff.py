"""FedBuff: asynchronous clients, updates aggregated K at a time from a buffer.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022
(arXiv:2106.06639), Algorithm 1; staleness scaling s(tau) = 1 / sqrt(1 + tau) as in its experiments.

Clients train asynchronously (``concurrency`` tasks in flight). Each arriving change
Delta_i = w_i - w_start,i (client model minus the global model it started from) is buffered; once
K updates are in the buffer the server takes one step and empties it:

    w <- w + eta_g * (1/K) * sum_{i in buffer} s(tau_i) Delta_i

with tau_i = (server version at aggregation) - (version client i started from). The K updates form
one aggregation (one server version). As in the paper, updates are not weighted by sample count.
``strategy.aggregator`` replaces the buffer's mean by a robust rule (:mod:`hetfl.strategies.robust`: every
buffered change one vote, scaled by the buffer's mean s(tau)); differential privacy is not offered, since
the buffer is filled by whoever arrives first, not by a uniform sample of the clients.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.config import AggregatorConfig
from hetfl.strategies.asynchronous import AsyncStrategy
from hetfl.strategies.base import Server, Update
from hetfl.strategies.recovery import RecoveryConfig
from hetfl.strategies.robust import Aggregation
from hetfl.strategies.staleness import StalenessKind, check_staleness, staleness_weight


class FedBuff(AsyncStrategy):
    """Buffered asynchronous aggregation.

    Parameters
    ----------
    concurrency, recovery
        See :class:`~hetfl.strategies.asynchronous.AsyncStrategy` (defaults 10 and None).
    buffer_size : int, default 10
        K, updates per aggregation (the paper's usual choice).
    server_lr : float, default 1.0
        eta_g, the server step on the buffer's average change.
    staleness : {"constant", "polynomial", "hinge"}, default "polynomial"
        s(tau), see :mod:`hetfl.strategies.staleness`; with the default a = 0.5 it is 1 / sqrt(1 + tau).
    staleness_a : float, default 0.5
        a of the polynomial or hinge.
    staleness_b : int, default 4
        b, the hinge's knee.
    aggregator : AggregatorConfig, optional
        ``strategy.aggregator``: how the buffer is combined; default: the mean above.
    """

    name = "fedbuff"

    def __init__(
        self,
        *,
        concurrency: int = 10,
        recovery: RecoveryConfig | None = None,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        staleness: StalenessKind = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
        aggregator: AggregatorConfig | None = None,
    ) -> None:
        super().__init__(concurrency=concurrency, recovery=recovery)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1 (updates per aggregation), got {buffer_size}")
        if server_lr <= 0:
            raise ValueError(f"server_lr must be positive, got {server_lr}")
        check_staleness(staleness, staleness_a, staleness_b)
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.staleness = staleness
        self.staleness_a = staleness_a
        self.staleness_b = staleness_b
        self.buffer: list[Update] = []
        self.aggregation = Aggregation(aggregator, cohort=buffer_size, cohort_key="strategy.params.buffer_size")

    def receive(self, server: Server, update: Update) -> None:
        self.buffer.append(update)
        if len(self.buffer) < self.buffer_size:
            return
        updates, self.buffer = self.buffer, []
        s = torch.tensor([self.weight(server.version - u.task.version) for u in updates])
        step = self.aggregation.delta(server, torch.stack([u.delta for u in updates]), s) / len(updates)
        server.commit(self.server_step(server, step, self.server_lr * step), updates)

    def held_updates(self) -> int:
        return len(self.buffer)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **self.aggregation.metrics()}

    def weight(self, tau: int) -> float:
        """s(tau) with this strategy's staleness function."""
        return staleness_weight(tau, self.staleness, self.staleness_a, self.staleness_b)
