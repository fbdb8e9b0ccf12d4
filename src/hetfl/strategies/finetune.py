"""FedAvg + local fine-tuning: each client adapts the current global model to its own data before using it.

Wang et al., "Federated Evaluation of On-device Personalization" (arXiv:1910.10252): personalise a
federated model by a few local SGD steps on the client's own data, the standard baseline for
personalised FL. Training is FedAvg's (McMahan et al., arXiv:1602.05629),

    w <- w + eta_s * sum_i p_i (w_i - w),   p_i = n_i / sum_j n_j,

and at evaluation client k uses

    v_k = w - eta sum_{s < S} grad f_k(v_k^(s); batch_s),   v_k^(0) = w,   S = ``finetune_steps``,

computed afresh from the current global model each time (nothing is kept on the client).
``finetune_steps = 0`` is FedAvg.

Fine-tuning is local training, so it also moves the model's buffers (BatchNorm's running statistics) towards
the client's data; nothing is kept between evaluations.

Cost: every evaluation fine-tunes every client with a test split (S steps each); this computation is
not charged to simulated time, which measures the training only.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.strategies.base import ClientData
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.selection import Selection


def finetuned(trainer, params: torch.Tensor, data: ClientData, steps: int | None, lr: float | None,
              seed: int) -> torch.Tensor | None:
    """``params`` after ``steps`` local SGD steps on the client's data (None: a training task's steps; ``lr`` None:
    ``training.lr``); None, meaning ``params`` itself, for 0 steps or a client without data."""
    steps = trainer.steps_for(data.n_samples) if steps is None else steps
    if steps == 0 or data.n_samples == 0:
        return None
    return trainer.train(params, data.x, data.y, steps=steps, seed=seed, lr=lr).params


class FedAvgFineTune(FedAvg):
    """FedAvg whose clients fine-tune the global model locally before using it.

    Parameters
    ----------
    finetune_steps : int or None, default None
        Local steps of fine-tuning at evaluation; None: as many as a training task of this client
        (``training.local_steps``, or ``local_epochs`` over its data). 0: the global model itself.
    finetune_lr : float or None, default None
        Learning rate of the fine-tuning; None: ``training.lr``.
    clients_per_round, deadline_s, selection, server_lr
        As for :class:`~hetfl.strategies.fedavg.FedAvg`.
    """

    name = "fedavg_ft"
    personalised = True

    def __init__(
        self,
        *,
        finetune_steps: int | None = None,
        finetune_lr: float | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection, server_lr=server_lr)
        if finetune_steps is not None and finetune_steps < 0:
            raise ValueError("finetune_steps must be non-negative (0: no fine-tuning)")
        if finetune_lr is not None and finetune_lr <= 0:
            raise ValueError("finetune_lr must be positive (or None for training.lr)")
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr

    def personal_params(
        self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int
    ) -> torch.Tensor | None:
        return finetuned(trainer, params, data, self.finetune_steps, self.finetune_lr, seed)  # None: the global model
