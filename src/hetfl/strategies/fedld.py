"""FedLD: margin control on the clients, principal-gradient aggregation on the server.

Zeng, Guo, Wang, Wang, Zhou and Qu, "Tackling Data Heterogeneity in Federated Learning via Loss Decomposition",
MICCAI 2024 (arXiv:2408.12300; the authors' code: github.com/Zeng-Shuang/FedLD).

From the paper (its abstract) and the authors' code (the formulas; the method section was not available to
us): the global loss of a round is decomposed into the clients' *local loss*, a *distribution shift loss* (a local
model evaluated on the global distribution rather than its own) and an *aggregation loss* (what combining
conflicting client changes costs the global model). Local-training methods (FedProx, ...) act on the second,
aggregation methods on the third; FedLD acts on both:

- Margin control (clients, against the distribution shift loss): the loss is cross-entropy plus

      lambda * log(1 + ||softmax(z)||_F^2)

  over a batch's logits z (``||.||_F``: the Frobenius norm of the batch's probability matrix, as the authors'
  code computes it), which keeps local models from becoming over-confident on the classes they hold.

- Principal-gradient aggregation (server, against the aggregation loss), layer by layer (each parameter tensor
  and each federated buffer of the flat vector is one layer): with the m round changes g_i = w_i - w of the
  layer as the rows of G, and G = U diag(sigma) V^T its thin SVD, the principal directions are the first
  k = max(1, floor(k_proportion * m)) right singular vectors v_j, each oriented to agree in sign with the
  majority of the g_i (ties: with the sign of sum_i g_i . v_j). Each change is replaced by its projections on
  them, each rescaled to a share of the change's own length,

      g~_i = ||g_i|| * sum_{j<=k} r_j * sign(g_i . v_j) * v_j,     r_j = sigma_j^2 / sum_l sigma_l^2,

  and the server steps by their mean, w <- w + (1/m) sum_i g~_i. (The authors' code takes the eigenvectors of
  the m x m matrix G G^T / m, whose eigenvalues are sigma_j^2 / m and whose v_j = G^T e_j point along the same
  right singular vectors: the same arithmetic.) Layers of one entry are averaged plainly.

Our choices, where the paper and code leave room or hetfl's settings force one: the mean over clients is
unweighted, as in the authors' code (their sample-weighted average that follows is over models that are all
``w + mean``, so it changes nothing); the first aggregation is the plain mean, as in the code (it has no
gradient history yet); ``k`` is at least 1, so a round of one or two clients still moves (the code's
``int(m * 0.8)`` is 0 for one client, which would freeze the model); a change orthogonal to a direction
contributes 0 along it (the code divides 0 by 0 there). The code's learning-rate warm-up and SGD momentum are
training settings (``training.*``), not part of the algorithm.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn import functional as F

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection


def margin_control(lam: float):
    """FedLD's local regulariser ``(h, logits, y) -> lambda * log(1 + ||softmax(logits)||_F^2)``."""

    def regularizer(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lam * torch.log1p((F.softmax(logits, dim=1) ** 2).sum())

    return regularizer


def principal_mean(changes: torch.Tensor, k_proportion: float) -> torch.Tensor:
    """The mean of the rows of ``changes`` (m x d, one layer's client changes) revised along their principal
    directions (the module docstring's g~_i); a layer of one entry is averaged plainly."""
    m, d = changes.shape
    if d == 1:
        return changes.mean(0)
    _, sigma, vh = torch.linalg.svd(changes, full_matrices=False)
    energy = sigma**2
    if energy.sum() == 0:
        return changes.mean(0)  # every client left this layer unchanged
    k = max(1, int(k_proportion * m))
    directions = vh[:k]  # (k, d), unit rows
    dots = changes @ directions.T  # (m, k)
    against = (dots < 0).sum(0) > (dots >= 0).sum(0)
    tie = (dots < 0).sum(0) == (dots >= 0).sum(0)
    flip = against | (tie & (dots.sum(0) < 0))
    directions = torch.where(flip.unsqueeze(1), -directions, directions)
    dots = torch.where(flip.unsqueeze(0), -dots, dots)
    shares = energy[:k] / energy.sum()  # r_j
    revised = changes.norm(dim=1, keepdim=True) * (torch.sign(dots) * shares) @ directions  # (m, d)
    return revised.mean(0)


def layer_slices(trainer) -> list[slice]:
    """The flat vector's layers, in order: each federated buffer, then each parameter tensor."""
    sizes = [s.numel() for s in trainer.buffer_shapes] + [p.numel() for p in trainer.model.parameters()]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class FedLD(RoundStrategy):
    """FedLD: margin-control regulariser on clients, principal-gradient aggregation (Zeng et al., arXiv:2408.12300).

    Parameters
    ----------
    margin_penalty : float, default 0.1
        lambda, the weight of the margin-control term (the authors' command line; their code's default is 0.03).
        0 leaves plain cross-entropy.
    k_proportion : float, default 0.8
        Share of the round's clients m whose principal directions are kept: k = max(1, floor(k_proportion * m)).
    aggregation : {"principal", "mean"}, default "principal"
        The server's step: principal-gradient aggregation (the paper), or the plain mean of the changes (the
        paper's ablation without it).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedld"

    def __init__(
        self,
        *,
        margin_penalty: float = 0.1,
        k_proportion: float = 0.8,
        aggregation: Literal["principal", "mean"] = "principal",
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if margin_penalty < 0:
            raise ValueError("margin_penalty must be non-negative (0: no margin control)")
        if not 0 < k_proportion <= 1:
            raise ValueError("k_proportion must be in (0, 1]")
        if aggregation not in ("principal", "mean"):
            raise ValueError("aggregation must be 'principal' or 'mean'")
        self.margin_penalty = margin_penalty
        self.aggregation_rule = aggregation
        self.k_proportion = k_proportion
        self.aggregations = 0

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        reg = margin_control(self.margin_penalty) if self.margin_penalty else None
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed, regularizer=reg)
        return ClientResult(result.params, result.steps, result.loss)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        changes = torch.stack([u.delta for u in updates])
        self.aggregations += 1
        if self.aggregations == 1 or self.aggregation_rule == "mean":
            return server.params + changes.mean(0)
        step = torch.cat([principal_mean(changes[:, s], self.k_proportion) for s in layer_slices(server.trainer)])
        return server.params + step
