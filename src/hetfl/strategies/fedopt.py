"""Adaptive server optimisers: FedAdam and FedYogi.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2.
The averaged client change is a pseudo-gradient for a server-side Adam or Yogi step:

    d   = sum_i p_i (w_i - w)
    m   = beta1 * m + (1 - beta1) * d
    v   = beta2 * v + (1 - beta2) * d^2                      (Adam)
    v   = v - (1 - beta2) * d^2 * sign(v - d^2)              (Yogi)
    w  <- w + eta * m / (sqrt(v) + tau)

The paper uses no bias correction; neither do we. ``v`` starts at ``tau**2`` as in the paper's
experiments, so the first steps are not huge. ``strategy.aggregator`` and ``strategy.privacy`` change how d is
formed from the clients' changes (a robust rule, DP-FedAvg: :mod:`hetfl.strategies.robust`).
"""

from __future__ import annotations

import torch

from hetfl.config import AggregatorConfig, PrivacyConfig
from hetfl.strategies.base import Server, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection


class FedAdam(RoundStrategy):
    """FedAvg clients, Adam on the server.

    Parameters
    ----------
    server_lr : float, default 0.01
        Server step size eta.
    beta1, beta2 : float, default 0.9, 0.99
        Moment decay rates.
    tau : float, default 1e-3
        Adaptivity: added to sqrt(v); smaller is more adaptive.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    aggregator, privacy : AggregatorConfig, PrivacyConfig, optional
        ``strategy.aggregator`` and ``strategy.privacy``: how d is formed; default: the weighted mean.
    """

    name = "fedadam"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        aggregator: AggregatorConfig | None = None,
        privacy: PrivacyConfig | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if server_lr <= 0 or tau <= 0:
            raise ValueError("server_lr and tau must be positive")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in [0, 1)")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.use_aggregator(aggregator, privacy)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        skipped = self.aggregation.skipped
        d = self.combined_delta(server, updates)
        if self.aggregation.skipped > skipped:  # too few updates for Krum: no step, not even the momentum's
            return server.params
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(d)
            self.v = torch.full_like(d, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * d
        self.v = self.second_moment(self.v, d * d)
        return self.server_step(server, d, self.server_lr * self.m / (self.v.sqrt() + self.tau))


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second-moment update (v changes by at most (1 - beta2) d^2 a step)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
