"""HC-meta: adaptive hierarchical clustering into semi-global models, then Reptile inside each cluster.

"Adaptive Personalization in Federated Learning for Highly Non-i.i.d. Data" (HETIA conference; we found no
arXiv version and only its abstract, which claims "a significant boost in performance and training stability"
from "a clustered and personalized federated learning approach" where "vanilla federated algorithms frequently
fail to converge and generalize across all tasks").

From the paper (as its abstract and the issue describe it): clients are grouped by an adaptive hierarchical
clustering into clusters, each with a semi-global model; inside each cluster the model is meta-learned, so that
a client's personal model is a few local steps from its cluster's meta-model.

Our choices:

1. Clustering: FL+HC's (:class:`~hetfl.strategies.clustered.FLHC`, whose bookkeeping this class reuses):
   ``warmup_rounds`` rounds of FedAvg, then agglomerative clustering of the clients' latest updates with cosine
   distance, cut at ``distance_threshold``; "adaptive" is the cut by distance, so the number of clusters follows
   the data.
2. Meta-learning: federated Reptile (Nichol, Achiam and Schulman, arXiv:1803.02999) per cluster. A member runs
   the task's local SGD steps from its cluster's meta-model theta_c and returns phi_i; the server moves

       theta_c <- theta_c + meta_lr * sum_i p_i (phi_i - theta_c),   p_i = n_i / sum_j n_j over the members,

   With ``meta_lr = 1`` this step is the cluster's FedAvg (Jiang et al., arXiv:1909.12488, read FedAvg as
   Reptile); what makes the meta-model one is that it is used only as the start of adaptation:
3. Personal model of client k: ``finetune_steps`` local SGD steps (default: as many as a training task) at
   ``finetune_lr`` from its cluster's meta-model (a client not yet clustered starts from the global model),
   computed afresh at every evaluation (:func:`~hetfl.strategies.finetune.finetuned`, FedAvg + fine-tuning's
   step); this computation is not charged to simulated time.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from hetfl.strategies.base import ClientData, Update
from hetfl.strategies.clustered import FLHC
from hetfl.strategies.finetune import finetuned
from hetfl.strategies.rounds import weighted_mean
from hetfl.strategies.selection import Selection


class HCMeta(FLHC):
    """FL+HC's adaptive clustering, a Reptile meta-model per cluster, personal models by local adaptation.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    warmup_rounds, distance_threshold, linkage
        As for :class:`~hetfl.strategies.clustered.FLHC` (the number of clusters follows from the cut).
    meta_lr : float, default 1.0
        Reptile's outer step size within a cluster (1: the members' weighted mean).
    finetune_steps : int or None, default None
        Local steps of adaptation from the cluster's meta-model at evaluation; None: a training task's steps.
    finetune_lr : float or None, default None
        Learning rate of the adaptation; None: ``training.lr``.
    """

    name = "hcmeta"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        warmup_rounds: int = 5,
        distance_threshold: float = 0.8,
        linkage: Literal["average", "complete", "single"] = "average",
        meta_lr: float = 1.0,
        finetune_steps: int | None = None,
        finetune_lr: float | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection,
                         warmup_rounds=warmup_rounds, distance_threshold=distance_threshold, linkage=linkage)
        if not 0 < meta_lr <= 1:
            raise ValueError("meta_lr must be in (0, 1] (Reptile's outer step size)")
        if finetune_steps is not None and finetune_steps < 0:
            raise ValueError("finetune_steps must be non-negative (0: the cluster's meta-model itself)")
        if finetune_lr is not None and finetune_lr <= 0:
            raise ValueError("finetune_lr must be positive (or None for training.lr)")
        self.meta_lr = meta_lr
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr

    def cluster_step(self, model: torch.Tensor, updates: list[Update]) -> torch.Tensor:
        """Reptile's outer step towards the members' sample-weighted mean."""
        return model + self.meta_lr * (weighted_mean(updates) - model)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any],
                        seed: int) -> torch.Tensor | None:
        meta = super().personal_params(trainer, params, data, state, seed)  # the cluster's model; None: global
        start = params if meta is None else meta
        adapted = finetuned(trainer, start, data, self.finetune_steps, self.finetune_lr, seed)
        return meta if adapted is None else adapted
