"""FedAvg: federated averaging of client models, weighted by sample count.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (arXiv:1602.05629).

    w <- w + eta_s * sum_i p_i (w_i - w),   p_i = n_i / sum_j n_j

With ``server_lr = 1`` this is the sample-weighted mean of the client models. ``strategy.aggregator`` replaces
the weighted mean by a robust rule and ``strategy.privacy`` makes it DP-FedAvg (:mod:`hetfl.strategies.robust`).
"""

from __future__ import annotations

import torch

from hetfl.config import AggregatorConfig, PrivacyConfig
from hetfl.strategies.base import Server, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection


class FedAvg(RoundStrategy):
    """Federated averaging.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    server_lr : float, default 1.0
        Server step size on the averaged model change.
    aggregator, privacy : AggregatorConfig, PrivacyConfig, optional
        ``strategy.aggregator`` and ``strategy.privacy`` (:mod:`hetfl.strategies.robust`); default: the mean.
    """

    name = "fedavg"
    linear_aggregation = True  # FedProx inherits it: its aggregation is FedAvg's

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
        aggregator: AggregatorConfig | None = None,
        privacy: PrivacyConfig | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        self.server_lr = server_lr
        self.use_aggregator(aggregator, privacy)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        delta = self.combined_delta(server, updates)
        return self.server_step(server, delta, self.server_lr * delta)
