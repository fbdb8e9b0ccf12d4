"""FedNova: normalised averaging for clients that ran different numbers of local steps.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020 (arXiv:2007.07481).

A client that runs tau_i local SGD steps with momentum rho changes its model by
Delta_i = -eta * G_i a_i, where the weights a_i of its gradients sum to

    ||a_i||_1 = tau_i                                        (plain SGD)
    ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)     (SGD with momentum)

FedAvg weights clients by how far they walked, so clients that ran more steps pull the model
towards their own objective. FedNova divides each change by ||a_i||_1 and rescales by the
effective number of steps tau_eff = sum_i p_i ||a_i||_1:

    w <- w + tau_eff * sum_i p_i Delta_i / ||a_i||_1
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, sample_weights


def nova_norm(steps: int, momentum: float = 0.0) -> float:
    """||a_i||_1 for ``steps`` SGD steps with heavy-ball ``momentum`` (FedNova, Section 4)."""
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(RoundStrategy):
    """Normalised averaging (clients must use SGD, with or without momentum).

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fednova"

    def check_training(self, optimizer: str, momentum: float) -> None:
        if optimizer != "sgd":
            raise ConfigError("training.optimizer: fednova normalises SGD steps; set training.optimizer=sgd")

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed)
        a_norm = nova_norm(result.steps, trainer.cfg.momentum)
        return ClientResult(result.params, result.steps, result.loss, stats={"a_norm": a_norm})

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        p = sample_weights(updates)
        a = torch.tensor([u.stats["a_norm"] for u in updates], dtype=torch.float32)
        tau_eff = float((p * a).sum())
        normalised = torch.stack([u.delta for u in updates]).T @ (p / a)
        return self.server_step(server, torch.stack([u.delta for u in updates]).T @ p, tau_eff * normalised)
