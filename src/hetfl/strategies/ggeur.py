"""GGEUR: clients share the geometric shape of their class-wise embedding distributions; each client augments
its local embeddings along the global shape, so its training sees a localised version of the global distribution.

Ma, Dai, Huang and Chen, "Geometric Knowledge-Guided Localized Global Distribution Alignment for Federated
Learning", CVPR 2025 (arXiv:2503.06457); the authors' code is github.com/WeiDai-David/2025CVPR_GGEUR (read as
facts only).

From the paper (single-domain label skew): the geometric shape of class j's embedding distribution is the
eigen-structure of its covariance. Client i sends its class-wise covariance Sigma_ij, mean mu_ij and count n_ij;
the server forms the global covariance of the pooled samples,

    N_j = sum_i n_ij,   mu_j = sum_i (n_ij / N_j) mu_ij,
    Sigma_j = sum_i (n_ij / N_j) (Sigma_ij + (mu_ij - mu_j)(mu_ij - mu_j)^T)        (covariances with 1/n),

and sends back its eigenvectors xi_jk and eigenvalues lambda_jk. A client generates new embeddings of its class-j
samples around each local embedding z along the global shape, z' = z + sum_k eps_k sqrt(lambda_jk) xi_jk,
eps ~ N(0, 1) (a draw from N(z, Sigma_j), as the authors' code draws them), and trains its classifier on the
real and generated embeddings; the model is aggregated by FedAvg. Classes a client does not hold get no
samples (the multi-domain variant's prototypes are not part of this single-domain method).

Our choices, at hetfl's scale:

- The paper embeds with a frozen CLIP encoder, computed once; hetfl's models learn their representation (the
  head's input, :mod:`hetfl.models.zoo`'s head protocol), so the statistics are recomputed every task, under
  the task's start model (the round's global model, ``eval`` mode, so every client of a round embeds with the same
  encoder and the pooled covariance is meaningful), and the shape a client uses is the one aggregated in the
  previous round (one round stale; none in the first round).
- Generation is per batch rather than once: each real sample of a class with a global shape gets ``augment``
  generated embeddings around its (detached) current embedding, and the loss adds ``lam`` times the
  cross-entropy of the head on them (only the head learns from generated embeddings, as the paper trains only
  the classifier on them). The paper fills every local class up to a fixed count instead.
- ``rank``: only the r leading eigenpairs are sent (all d by default), the paper's principal directions.

What travels, charged by ``transfer_bytes``: down, the model and the C global shapes (C x d x r floats); up, the
model and the client's statistics at their fixed shapes (C x (d^2 + d + 1) floats, every class's slot, held or
not). The server keeps the last pooled statistics of every class reported so far.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.hetero import prototypes_of, representations


def class_covariances(features: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Per class j, (1/n_j) sum over its samples of (z - mu_j)(z - mu_j)^T: (C, d, d); zeros for an absent class."""
    centred = features - means[y]
    covs = torch.zeros(len(means), features.shape[1], features.shape[1], dtype=features.dtype, device=features.device)
    for j in torch.unique(y).tolist():
        rows = centred[y == j]
        covs[j] = rows.T @ rows / len(rows)
    return covs


def pooled_statistics(
    means: torch.Tensor, covs: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The covariance of the union of the clients' samples, per class, from each client's (mu_ij, Sigma_ij, n_ij)
    (leading axis: clients): (mu_j, Sigma_j, N_j); a class nobody holds gets zeros and N_j = 0."""
    total = counts.sum(0)  # (C,)
    w = counts / total.clamp(min=1)  # (clients, C)
    mu = (w.unsqueeze(2) * means).sum(0)  # (C, d)
    spread = means - mu  # (clients, C, d)
    between = spread.unsqueeze(3) * spread.unsqueeze(2)  # (clients, C, d, d)
    return mu, (w.view(*w.shape, 1, 1) * (covs + between)).sum(0), total


def geometric_shape(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of each covariance scaled by the square roots of their eigenvalues, (C, d, r):
    ``shape_j @ eps`` with eps ~ N(0, I_r) is a draw of covariance (the rank-r part of) Sigma_j."""
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(-1)[..., :rank], vectors.flip(-1)[..., :rank]
    return vectors * values.clamp(min=0).sqrt().unsqueeze(-2)


class GGEUR(FedAvg):
    """FedAvg whose clients train their classifier on embeddings augmented along the global class shapes
    (Ma et al., arXiv:2503.06457).

    Parameters
    ----------
    lam : float, default 1.0
        Weight of the cross-entropy on the generated embeddings (0: FedAvg, with the statistics still shared).
    augment : int, default 4
        Generated embeddings per real sample of a class with a global shape, per batch.
    rank : int or None, default None
        Eigenpairs of each class's global covariance sent to the clients; None: all (the representation's width).
    clients_per_round, deadline_s, selection, server_lr, aggregator
        As for :class:`~hetfl.strategies.fedavg.FedAvg`; ``strategy.privacy`` is refused (the covariances travel in the
        clear).
    """

    name = "ggeur"
    linear_aggregation = False  # the statistics are pooled with their between-client spread, not a plain sum

    def __init__(self, *, lam: float = 1.0, augment: int = 4, rank: int | None = None, **kwargs: Any) -> None:
        if getattr(kwargs.get("privacy"), "enabled", False):
            raise ValueError("strategy.privacy: ggeur's clients send their class covariances in the clear, which "
                             "DP-FedAvg's noise on the model does not cover; disable strategy.privacy")
        super().__init__(**kwargs)  # FedAvg's: clients_per_round, deadline_s, selection, server_lr, aggregator, privacy
        if lam < 0:
            raise ValueError("lam must be non-negative (0: no generated embeddings)")
        if augment < 1:
            raise ValueError("augment must be at least 1")
        if rank is not None and rank < 1:
            raise ValueError("rank must be at least 1 (or None for every eigenpair)")
        self.lam = lam
        self.augment = augment
        self.rank = rank
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # pooled (mu, Sigma, N) per class

    def check_models(self, trainers) -> None:
        for t in trainers:
            t.require_head(self.name)

    def _sizes(self, trainer) -> tuple[int, int, int]:
        """(C, d, r): classes, representation width, eigenpairs sent."""
        d = trainer.head.in_features
        return trainer.head.out_features, d, min(self.rank or d, d)

    # -- the server half ------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        n_classes, d, r = self._sizes(server.trainer)
        if self._stats is None:
            return {"payload": {"shape": torch.zeros(n_classes, d, r), "known": torch.zeros(n_classes)}}
        _, cov, total = self._stats
        return {"payload": {"shape": geometric_shape(cov, r), "known": (total > 0).float()}}

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n_classes, d, _ = self._sizes(server.trainer)
        return {"means": ((n_classes, d), torch.float32), "covs": ((n_classes, d, d), torch.float32),
                "counts": ((n_classes,), torch.float32)}

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        down, up = super().transfer_bytes(server, task)
        n_classes, d, _ = self._sizes(server.trainer)
        return down, up + n_classes * (d * d + d + 1) * server.params.element_size()

    def describe_transfer(self, trainer) -> str:
        n_classes, d, r = self._sizes(trainer)
        model = trainer.initial.numel()
        return (f"{(model + n_classes * d * r) * 4 / 1e3:.1f} kB down, {(model + n_classes * (d * d + d + 1)) * 4 / 1e3:.1f} "
                "kB up a task (model and class shapes)")

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        mu, cov, total = pooled_statistics(*(torch.stack([u.payload[k] for u in updates]) for k in ("means", "covs", "counts")))
        if self._stats is not None:  # a class no client of the round holds keeps its shape
            seen = total > 0
            old_mu, old_cov, old_total = self._stats
            mu = torch.where(seen.unsqueeze(1), mu, old_mu)
            cov = torch.where(seen.view(-1, 1, 1), cov, old_cov)
            total = torch.where(seen, total, old_total)
        self._stats = (mu, cov, total)
        return super().aggregate(server, updates)

    # -- the client half ------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        n_classes = trainer.head.out_features
        features = representations(trainer, task.params, data.x)
        means, counts = prototypes_of(features, data.y, n_classes)
        covs = class_covariances(features, data.y, means)
        known = task.payload["known"] > 0
        pull = self._regularizer(trainer, task.payload["shape"], known) if self.lam and known.any() else None
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed, regularizer=pull, **task.options)
        return ClientResult(result.params, result.steps, result.loss,
                            payload={"means": means, "covs": covs, "counts": counts})

    def _regularizer(self, trainer, shape: torch.Tensor, known: torch.Tensor):
        """``lam`` times the head's cross-entropy on ``augment`` embeddings generated around each (detached) embedding
        of the batch whose class has a global shape: z + shape_y eps, eps ~ N(0, I_r) (torch's task-seeded stream)."""
        head, lam, m = trainer.head, self.lam, self.augment

        def regularizer(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            keep = known[y]
            if not keep.any():
                return features.new_zeros(())
            z, labels = features.detach()[keep].repeat(m, 1), y[keep].repeat(m)
            eps = torch.randn(len(labels), shape.shape[2], 1, device=z.device)
            generated = z + (shape[labels] @ eps).squeeze(2)
            return lam * F.cross_entropy(head(generated), labels)

        return regularizer
