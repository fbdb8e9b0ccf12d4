"""FedProx: FedAvg whose clients add a proximal term (mu/2)||w - w_global||^2 to their loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).
The proximal term limits how far a client drifts on non-IID data; ``mu = 0`` is FedAvg.
Aggregation is FedAvg's.
"""

from __future__ import annotations

from typing import Any

from hetfl.config import AggregatorConfig, PrivacyConfig
from hetfl.strategies.base import Server
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.selection import Selection


class FedProx(FedAvg):
    """FedAvg with a proximal term on the clients.

    Parameters
    ----------
    mu : float, default 0.01
        Weight of the proximal term; its gradient ``mu * (w - w_global)`` is added at every local step.
    clients_per_round, deadline_s, selection, server_lr, aggregator, privacy
        As for :class:`~hetfl.strategies.fedavg.FedAvg`.
    """

    name = "fedprox"

    def __init__(
        self,
        *,
        mu: float = 0.01,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
        aggregator: AggregatorConfig | None = None,
        privacy: PrivacyConfig | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection, server_lr=server_lr,
                         aggregator=aggregator, privacy=privacy)
        if mu < 0:
            raise ValueError("mu must be non-negative")
        self.mu = mu

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        return {"options": {"prox_mu": self.mu}}
