"""FedSA: class representations the server keeps (semantic anchors), which every client's model is aligned to.

Zhou, Qu, You, Zhou, Tang, Zheng, Cai and Wu, "FedSA: A Unified Representation Learning via Semantic Anchors for
Prototype-based Federated Learning", AAAI 2025 (arXiv:2501.05496).

From the paper (its abstract; see Sources below): prototype methods (FedProto, FedGH) build their global prototypes from local representations that
each client's skewed data and own architecture bias, and then pull the clients towards those biased prototypes.
FedSA decouples the two: the server holds one *semantic anchor* a_c per class, initialised at random, and the
clients learn towards the anchors with two losses besides cross-entropy:

- anchor-based regularisation with margin-enhanced contrastive learning (RMCL): each representation h of a
  sample of class y is pulled to its anchor and pushed from the others, with a margin m on its own class,

      L_RMCL = -log( exp(-(||h - a_y|| + m)) / (exp(-(||h - a_y|| + m)) + sum_{c != y} exp(-||h - a_c||)) )

  (intra-class compactness and inter-class separability);
- anchor-based classifier calibration (CC): the client's classifier head is trained to classify the anchors
  themselves, L_CC = (1/C) sum_c CE(head(a_c), c), so every client's decision boundaries agree with one
  anchor layout.

Client i minimises  CE + lambda_MCL * L_RMCL + lambda_CC * L_CC  (mean over the batch) for the task's steps and
sends its class prototypes C_i^(c) (mean representations of its samples of class c) with their counts. The
server forms the global prototypes P_c (the sample-weighted mean over the round's clients that hold c, as
FedProto's) and moves each anchor towards them by an exponential moving average,

    a_c <- rho * a_c + (1 - rho) * P_c         (classes no client of the round holds keep their anchor).

A client classifies with its own model and its own (calibrated) head.

Sources: the abstract and the authors' README (whose command line sets the contrastive margin and the
calibration weight, both 1.0 by default); the method section's equations were not available to us, so the loss
forms above are written from the abstract's description, the margin-enhanced contrast in the form of FedTGP's
(Zhang et al., arXiv:2401.03230). Our choices, where the paper leaves room or hetfl's settings force one: the
random initial anchors are the rows of the reference architecture's initial head weight, each scaled to unit
length (a draw from the run's seed, as the paper's anchors are drawn at random; no extra random stream); the
distance is Euclidean, unsquared, with no temperature; L_CC is the mean over every class's anchor, the classes the
client does not hold included; ``rho = 0.9`` by default. The count row of what the server sends is the number of
samples behind each anchor's last update (0: still the initial draw); clients use every anchor.

What travels: the anchors and counts down, the prototypes and counts up, C * (d + 1) floats each way, as FedProto.
Kept per client: its whole model, buffers included. A model of one's own needs the head protocol of
:mod:`hetfl.models.zoo`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.hetero import OwnModels, pack_prototypes, prototype_mean, unpack_prototypes
from hetfl.strategies.selection import Selection


def anchor_contrast(features: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, margin: float) -> torch.Tensor:
    """L_RMCL, the batch mean: cross-entropy over logits -||h - a_c||, the own class's distance increased by ``margin``."""
    distance = torch.cdist(features, anchors)  # (batch, C)
    distance = distance + margin * F.one_hot(y, anchors.shape[0]).to(distance.dtype)
    return F.cross_entropy(-distance, y)


def anchor_calibration(head: torch.nn.Module, anchors: torch.Tensor) -> torch.Tensor:
    """L_CC: the head's cross-entropy on the anchors, anchor c labelled c."""
    return F.cross_entropy(head(anchors), torch.arange(anchors.shape[0], device=anchors.device))


def anchor_update(anchors: torch.Tensor, prototypes: torch.Tensor, counts: torch.Tensor, rho: float) -> torch.Tensor:
    """a_c <- rho a_c + (1 - rho) P_c for the classes with a global prototype (count > 0); the others keep a_c."""
    moved = rho * anchors + (1 - rho) * prototypes
    return torch.where((counts > 0).unsqueeze(1), moved, anchors)


class FedSA(OwnModels):
    """FedSA: clients align their representations and heads to the server's semantic anchors (Zhou et al., arXiv:2501.05496).

    Parameters
    ----------
    margin : float, default 1.0
        m, the margin added to a sample's distance to its own anchor in L_RMCL (the authors' README's default).
    contrast : float, default 1.0
        lambda_MCL, the weight of L_RMCL (0: none).
    calibration : float, default 1.0
        lambda_CC, the weight of the classifier calibration on the anchors (the authors' README's default; 0: none).
    rho : float, default 0.9
        The anchors' moving-average coefficient: the share of the old anchor kept at each aggregation.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedsa"

    def __init__(
        self,
        *,
        margin: float = 1.0,
        contrast: float = 1.0,
        calibration: float = 1.0,
        rho: float = 0.9,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if margin < 0:
            raise ValueError("margin must be non-negative")
        if contrast < 0:
            raise ValueError("contrast must be non-negative (0: no anchor contrast)")
        if calibration < 0:
            raise ValueError("calibration must be non-negative (0: no classifier calibration)")
        if not 0 <= rho < 1:
            raise ValueError("rho must be in [0, 1) (0: the anchors become the round's global prototypes)")
        self.margin = margin
        self.contrast = contrast
        self.calibration = calibration
        self.rho = rho

    def initial_params(self, trainer) -> torch.Tensor:
        n_classes, d = trainer.head.out_features, trainer.head.in_features
        weight = trainer.initial[trainer.head_slice][: n_classes * d].reshape(n_classes, d)
        anchors = weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return pack_prototypes(anchors, torch.zeros(n_classes))

    def anchor_losses(self, trainer, anchors: torch.Tensor):
        """The regulariser ``(h, logits, y) -> lambda_MCL L_RMCL + lambda_CC L_CC`` for ``trainer.train``."""

        def regularizer(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = torch.zeros((), device=features.device)
            if self.contrast:
                loss = loss + self.contrast * anchor_contrast(features, y, anchors, self.margin)
            if self.calibration:
                loss = loss + self.calibration * anchor_calibration(trainer.head, anchors)
            return loss

        return regularizer

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        n_classes = trainer.head.out_features
        anchors, _ = unpack_prototypes(task.params, n_classes)
        anchors = anchors.to(trainer.device)
        reg = self.anchor_losses(trainer, anchors) if self.contrast or self.calibration else None
        return self.train_for_prototypes(trainer, task, data, state, seed, reg)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        n_classes = server.trainer.head.out_features
        anchors, old_counts = unpack_prototypes(server.params, n_classes)
        prototypes, counts = prototype_mean(updates, n_classes)
        moved = anchor_update(anchors, prototypes, counts, self.rho)
        return pack_prototypes(moved, torch.where(counts > 0, counts, old_counts))

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return self.own_model(trainer, state)
