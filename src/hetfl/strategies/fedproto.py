"""FedProto: clients share class prototypes (mean representations), not model parameters.

Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous Clients", AAAI 2022
(arXiv:2105.00243). Each client keeps its own model (any architecture of the zoo whose representation
has the common width ``model.feature_dim``), and the server keeps one global prototype per class.

Client i, given the global prototypes C̄^(j) (classes nobody has reported yet have none):

    minimise  L_S(F_i(w_i; x), y) + lambda * L_R,    L_R = mean over the batch and the d features of
                                                           (h - C̄^(y))^2, h = f_i(phi_i; x)

(the paper's L_R = sum_j d(C_i^(j), C̄^(j)) with the L2 distance, applied per sample as in the
authors' code; a sample whose class has no global prototype contributes 0). After the task's steps it
sends its prototypes C_i^(j) = mean of h over its samples of class j, with the counts |D_ij|.

Server, per class j, over the clients of the round that hold j:

    C̄^(j) = sum_i (|D_ij| / N_j) C_i^(j),    N_j = sum_i |D_ij|

the sample-weighted mean. (The paper's eq. 6 prints an extra factor 1/|N_j|, which would shrink every
prototype by the number of clients holding the class; we read it as a typo.) With partial
participation, a class no client of the round holds keeps its previous prototype.

Inference (``inference: prototypes``, the paper's): the class of the nearest global prototype,
argmin_j ||h - C̄^(j)||. It is folded exactly into a linear head, since
argmin_j ||h - C̄_j||^2 = argmax_j (2 C̄_j . h - ||C̄_j||^2), so a client's personal model is its body
with head W = 2 C̄, b = -||C̄||^2 (classes without a prototype get bias -1e4). Before any prototype
exists, and with ``inference: head``, the client's own trained head is used.

What travels: the prototypes and counts, C * (d + 1) floats each way (``server.params``).

Kept per client: its whole model, buffers included (BatchNorm's running statistics). Prototypes are computed
with the model in ``eval`` mode. A model of one's own needs a classifier head (the head protocol of
:mod:`hetfl.models.zoo`), whose input is the representation the prototypes average.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.hetero import OwnModels, pack_prototypes, prototype_mean, unpack_prototypes
from hetfl.strategies.selection import Selection

NO_PROTOTYPE_BIAS = -1e4  # logit bias of a class without a global prototype: never predicted


def prototype_pull(prototypes: torch.Tensor, counts: torch.Tensor, lam: float):
    """FedProto's regulariser ``(h, logits, y) -> lambda * mean((h - C̄_y)^2)``, 0 for classes without a prototype."""
    known = counts > 0

    def regularizer(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = known[y].unsqueeze(1).float()
        return lam * (((features - prototypes[y]) ** 2) * mask).sum() / features.numel()

    return regularizer


def prototype_head(prototypes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A linear head (flat weight then bias) whose argmax is the nearest prototype: W = 2C, b = -||C||^2."""
    weight = 2 * prototypes
    bias = torch.where(counts > 0, -(prototypes**2).sum(1), torch.full_like(counts, NO_PROTOTYPE_BIAS))
    return torch.cat([weight.reshape(-1), bias])


class FedProto(OwnModels):
    """FedProto: clients exchange class prototypes of their representations (Tan et al., arXiv:2105.00243).

    Parameters
    ----------
    lam : float, default 1.0
        lambda, the weight of the prototype regulariser L_R (the authors' default).
    inference : {"prototypes", "head"}, default "prototypes"
        How a client classifies: by the nearest global prototype (the paper) or with its own head.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedproto"

    def __init__(
        self,
        *,
        lam: float = 1.0,
        inference: Literal["prototypes", "head"] = "prototypes",
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if lam < 0:
            raise ValueError("lam must be non-negative (0: no prototype regulariser)")
        if inference not in ("prototypes", "head"):
            raise ValueError("inference must be 'prototypes' or 'head'")
        self.lam = lam
        self.inference = inference

    def initial_params(self, trainer) -> torch.Tensor:
        n_classes, d = trainer.head.out_features, trainer.head.in_features
        return torch.zeros(n_classes * (d + 1))  # no prototype yet: every count is 0

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        n_classes = trainer.head.out_features
        prototypes, counts = unpack_prototypes(task.params, n_classes)
        pull = prototype_pull(prototypes, counts, self.lam) if self.lam and counts.any() else None
        return self.train_for_prototypes(trainer, task, data, state, seed, pull)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        n_classes = server.trainer.head.out_features
        old, old_counts = unpack_prototypes(server.params, n_classes)
        new, counts = prototype_mean(updates, n_classes)
        seen = counts > 0
        return pack_prototypes(torch.where(seen.unsqueeze(1), new, old), torch.where(seen, counts, old_counts))

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        own = self.own_model(trainer, state)
        prototypes, counts = unpack_prototypes(params, trainer.head.out_features)
        if self.inference == "head" or not counts.any():
            return own
        return self.with_head(trainer, own, prototype_head(prototypes, counts))
