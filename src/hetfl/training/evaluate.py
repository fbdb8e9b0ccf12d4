"""Evaluation of a global model on every client's test split, in one forward pass.

Labels are classes ``(N,)``, or next-token targets ``(N, L)`` for language modelling: then every token is
one prediction, ``loss`` is the mean cross-entropy per token and ``accuracy`` is next-token accuracy
(every test sample has ``L`` tokens, so per-client accuracies are means over the client's tokens).

The test set is moved to the trainer's device once (``training.device``), where every evaluation computes; only
the metrics come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hetfl.data.skew import LabelDrift
from hetfl.training.local import LocalTrainer, task_loss


def hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of its predictions that are right: 0/1 for a class, next-token accuracy for a sequence."""
    correct = (logits.argmax(-1) == y).double()
    return correct if correct.dim() == 1 else correct.flatten(1).mean(1)


@dataclass
class Evaluator:
    """Scores a model on the union of the clients' test splits and on each split alone.

    ``owner[i]`` is the client whose test split holds sample ``i``.
    """

    trainer: LocalTrainer
    x: torch.Tensor
    y: torch.Tensor
    owner: np.ndarray
    n_clients: int
    drift: LabelDrift | None = None  # from drift.at_s on, drifting clients' test labels are the new ones

    def __post_init__(self) -> None:
        self.x, self.y = self.x.to(self.trainer.device), self.y.to(self.trainer.device)  # once: every evaluation's

    @classmethod
    def from_splits(
        cls, trainer: LocalTrainer, x: torch.Tensor, y: torch.Tensor, test: list[np.ndarray], drift: LabelDrift | None = None
    ) -> "Evaluator":
        idx = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
        owner = np.concatenate([np.full(len(t), c) for c, t in enumerate(test)]) if test else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(idx.astype(np.int64))
        return cls(trainer, x[index], y[index], owner.astype(np.int64), len(test), drift)

    def labels(self, t: float) -> torch.Tensor:
        """The test labels at simulated time ``t``: a drifting client's rows relabelled once it has drifted."""
        if self.drift is None or t < self.drift.at_s:
            return self.y
        moved = torch.from_numpy(self.drift.drifting[self.owner]).to(self.y.device)
        return torch.where(moved, torch.from_numpy(self.drift.mapping).to(self.y.device)[self.y], self.y)

    def personal(
        self,
        global_params: torch.Tensor,
        models: Callable[[int], tuple[LocalTrainer, torch.Tensor] | None],
        t: float = 0.0,
    ) -> dict[str, float]:
        """Each client's own test split scored with its own model ``models(c)``: an architecture's trainer
        and its parameters (None: the global model ``global_params``, scored by ``self.trainer``).

        Returns the mean, 10th percentile and minimum of the clients' accuracies (clients with a test
        split), how many clients used a model of their own, and, pooled over all test samples, the
        accuracy and loss of the clients' own models (``personal_accuracy``, ``personal_loss``).
        """
        accuracy, own = [], 0
        hit_sum = loss_sum = 0.0
        y = self.labels(t)
        global_logits: torch.Tensor | None = None  # computed once, if some client uses the global model
        sizes = np.bincount(self.owner, minlength=self.n_clients)
        order = np.argsort(self.owner, kind="stable")
        ends = np.cumsum(sizes)
        for c in np.flatnonzero(sizes).tolist():  # clients with a test split, ascending; rows in one pass over owner
            index = torch.from_numpy(order[ends[c] - sizes[c] : ends[c]])
            model = models(c)
            if model is None:
                if global_logits is None:
                    global_logits = self.trainer.predict(global_params, self.x)
                logits = global_logits[index]
            else:
                own += 1
                trainer, params = model
                logits = trainer.predict(params, self.x[index])
            correct = hits(logits, y[index])
            accuracy.append(float(correct.mean()))
            hit_sum += float(correct.sum())
            loss_sum += float(task_loss(logits, y[index], reduction="sum")) / max(y[0].numel(), 1)
        acc = np.array(accuracy)
        n = max(int(sizes.sum()), 1)
        return {
            "personal_acc_mean": float(acc.mean()),
            "personal_acc_p10": float(np.percentile(acc, 10)),
            "personal_acc_min": float(acc.min()),
            "personal_models": float(own),
            "personal_accuracy": hit_sum / n,
            "personal_loss": loss_sum / n,
        }

    def __call__(self, params: torch.Tensor, t: float = 0.0) -> dict[str, float]:
        """The model ``params`` on every test split, with the labels of simulated time ``t``."""
        y = self.labels(t)
        logits = self.trainer.predict(params, self.x)
        loss = float(task_loss(logits, y))
        correct = hits(logits, y).cpu().numpy()
        client_hits = np.bincount(self.owner, weights=correct, minlength=self.n_clients)
        sizes = np.bincount(self.owner, minlength=self.n_clients)
        per_client = client_hits[sizes > 0] / sizes[sizes > 0]
        return {
            "accuracy": float(correct.mean()),
            "loss": loss,
            "client_acc_mean": float(per_client.mean()),
            "client_acc_p10": float(np.percentile(per_client, 10)),
            "client_acc_min": float(per_client.min()),
        }
