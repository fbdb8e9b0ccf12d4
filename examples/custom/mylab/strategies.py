"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, arXiv:1909.06335), a strategy as a user writes one.

    v <- beta * v + sum_i p_i (w_i - w),    w <- w + server_lr * v,    p_i = n_i / sum_j n_j
"""

from __future__ import annotations

from hetfl.strategies import FedAvg


class FedAvgM(FedAvg):
    """FedAvg whose server step carries momentum ``beta``; FedAvg's own parameters are forwarded to it."""

    def __init__(self, *, beta: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta, self.velocity = beta, None

    def aggregate(self, server, updates):
        change = self.combined_delta(server, updates)  # FedAvg's sample-weighted mean change
        self.velocity = change if self.velocity is None else self.beta * self.velocity + change
        # the step moves the parameters; the model's buffers (BatchNorm statistics) take the plain mean change
        return self.server_step(server, change, self.server_lr * self.velocity)
