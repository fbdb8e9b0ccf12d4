"""Local training on one client: the whole training step fits on one screen.

The model's parameters and gradients are views into two flat buffers, so loading a global
model is one copy (``flat.copy_(params)``), reading the result is one clone, and the
algorithm-specific terms (FedProx's proximal pull, SCAFFOLD's control-variate correction)
are one vector operation on the flat gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hetfl.config import TrainingConfig
from hetfl.errors import DivergedError


@dataclass
class LocalResult:
    params: torch.Tensor  # flat parameters after local training
    steps: int
    loss: float  # mean training loss over the steps


def flatten_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-home every parameter (and its gradient) as a view into one flat buffer; return both buffers."""
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    flat = torch.empty(n, dtype=torch.float32)
    grad = torch.zeros(n, dtype=torch.float32)
    offset = 0
    for p in params:
        k = p.numel()
        flat[offset : offset + k].copy_(p.data.reshape(-1))
        p.data = flat[offset : offset + k].view_as(p)
        p.grad = grad[offset : offset + k].view_as(p)
        offset += k
    return flat, grad


def head_slice(model: nn.Module) -> slice:
    """The classifier head's entries in the flat parameter vector: the last ``nn.Linear``'s weight and bias.

    In every model of the zoo they are the last parameters in ``model.parameters()`` order, so the head
    is the tail of the flat buffer and everything before it is the body (the representation).
    """
    params = list(model.parameters())
    head = list(classifier_head(model).parameters())
    if [id(p) for p in params[len(params) - len(head):]] != [id(p) for p in head]:
        raise ValueError(f"{type(model).__name__}: the last nn.Linear's parameters are not the last of the model")
    total = sum(p.numel() for p in params)
    return slice(total - sum(p.numel() for p in head), total)


def classifier_head(model: nn.Module) -> nn.Linear:
    """The model's classifier head: its last ``nn.Linear`` (see :func:`head_slice`)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as its classifier head")
    return linears[-1]


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``y``, over every prediction.

    Classification: logits ``(B, C)``, labels ``(B,)``. Language modelling: logits ``(B, L, V)``, next-token
    targets ``(B, L)``, every token one prediction (``mean``: the mean over all ``B * L`` tokens, which is
    :func:`hetfl.models.transformer.lm_loss`). The flattening is a no-op reshape for classification.
    """
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


Regularizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(features, logits, y) -> scalar`` added to a batch's cross-entropy (FedProto's prototype pull)."""


class LocalTrainer:
    """Trains one shared model instance for whichever client is active.

    Parameters
    ----------
    model : nn.Module
        The architecture; its parameters are re-homed into flat buffers.
    cfg : TrainingConfig
        Optimiser, learning rate, batch size, local steps or epochs.
    label : str
        A short name of the architecture (``mlp[64]``), for reports.

    Attributes
    ----------
    initial : torch.Tensor
        The parameters the model was built with: where a client of this architecture starts when
        it keeps a model of its own (model-heterogeneous FL).
    head : nn.Linear
        The classifier head; its input is the model's representation (:meth:`features`).
    reference : LocalTrainer
        The federation's reference architecture (``model.name``), whose parameters a global-model
        strategy's ``server.params`` are; itself unless a zoo gives this client another one.
    """

    def __init__(self, model: nn.Module, cfg: TrainingConfig, label: str = "") -> None:
        self.model = model
        self.cfg = cfg
        self.label = label or type(model).__name__.lower()
        self.flat, self.grad = flatten_parameters(model)
        self.initial = self.flat.clone()
        self.head = classifier_head(model)
        self.reference: LocalTrainer = self

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def twin(self) -> "LocalTrainer":
        """A second trainer of this architecture on its own deep copy of the model (made once, then cached),
        for algorithms that train two models of one architecture side by side (FML's private and shared
        models). Its parameters are whatever was last loaded into it; load before use."""
        import copy

        twin = self.__dict__.get("_twin")
        if twin is None:
            twin = LocalTrainer(copy.deepcopy(self.model), self.cfg, self.label)
            twin.initial = self.initial.clone()
            twin.reference = self.reference
            self._twin = twin
        return twin

    def steps_for(self, n_samples: int) -> int:
        """Local steps of a task on a client holding ``n_samples`` training samples."""
        if self.cfg.local_steps is not None:
            return self.cfg.local_steps
        return max(1, math.ceil(self.cfg.local_epochs * n_samples / self.cfg.batch_size))

    def optimizer(self, lr: float | None = None, params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """A fresh local optimiser (``training.optimizer``) over ``params`` (default: the model's)."""
        lr = self.cfg.lr if lr is None else lr
        params = list(self.model.parameters()) if params is None else params
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def train(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        steps: int,
        seed: int,
        prox_mu: float = 0.0,
        correction: torch.Tensor | None = None,
        lr: float | None = None,
        grad_mask: torch.Tensor | None = None,
        regularizer: Regularizer | None = None,
    ) -> LocalResult:
        """Run ``steps`` optimiser steps from ``params`` on (x, y); mini-batches reshuffled every epoch.

        The loss is :func:`task_loss`: cross-entropy per sample, or per token for language modelling.
        ``prox_mu`` adds FedProx's gradient ``mu * (w - params)``; ``correction`` is added to every
        gradient (SCAFFOLD's ``c - c_i``); ``grad_mask`` then multiplies the flat gradient (0 freezes an
        entry: FedRep's head and body phases; ``weight_decay``, applied inside the optimiser, still
        decays frozen entries); ``regularizer(features, logits, y)`` is added to each batch's loss.
        Batches are drawn from a generator seeded by ``seed`` (:meth:`batches`), so a task's result
        does not depend on what else ran before it.
        """
        self.flat.copy_(params)
        anchor = params if prox_mu else None
        opt = self.optimizer(lr)
        loss_sum = torch.zeros(())
        for batch in self.batches(x.shape[0], steps, seed):
            self.grad.zero_()
            if regularizer is None:
                loss = task_loss(self.model(x[batch]), y[batch])
            else:
                features, logits = self.features(x[batch])
                loss = task_loss(logits, y[batch]) + regularizer(features, logits, y[batch])
            loss.backward()
            if anchor is not None:
                self.grad.add_(self.flat - anchor, alpha=prox_mu)
            if correction is not None:
                self.grad.add_(correction)
            if grad_mask is not None:
                self.grad.mul_(grad_mask)
            opt.step()
            loss_sum += loss.detach()
        mean_loss = loss_sum.item() / max(steps, 1)
        if not math.isfinite(mean_loss) or not torch.isfinite(self.flat).all():
            raise DivergedError(
                f"training diverged (loss {mean_loss}); lower training.lr or check the data normalisation"
            )
        return LocalResult(self.flat.clone(), steps, mean_loss)

    def batches(self, n: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """Index batches of ``steps`` local steps over ``n`` samples: a seeded permutation, reshuffled every epoch."""
        gen = torch.Generator().manual_seed(seed)
        bs = min(self.cfg.batch_size, n)
        order, cursor = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if cursor + bs > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            yield order[cursor : cursor + bs]
            cursor += bs

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(representation, logits) of the current parameters on ``x``: the head's input and output."""
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return captured[0], logits

    @torch.no_grad()
    def predict(self, params: torch.Tensor, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Logits of the model with ``params`` on ``x`` (evaluated in large batches)."""
        self.flat.copy_(params)
        return torch.cat([self.model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
