"""pFedLoRA-style: heterogeneous client models share one low-rank adapter on the representation (arXiv:2310.13283).

After Yi, Yu, Wang, Liu and Li, "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with LoRA
Tuning" (arXiv:2310.13283): every client keeps a model of its own architecture, all of them carry an
adapter of one (homogeneous) shape, only the adapter travels, and the server averages the adapters.

The adapter. Each model of the zoo is a body then a linear head on a representation h of width
d (``model.feature_dim``, or the head's natural input width without a zoo; for logistic regression
without ``feature_dim`` that is the raw input). A residual low-rank map sits in front of the head::

    h' = h + s * B A h,     A: r x d,   B: d x r,   s = alpha / r

so the client's prediction is ``head(h') = W (h + s B A h) + b``. The paper attaches its LoRA adapter
to layers of the models; here it sits on the representation, the one place every backbone of the zoo
shares a shape, so one adapter fits all of them (a choice of hetfl's).

A task (the paper's *iterative training*: one part frozen while the other trains), given the global
adapter (A_g, B_g) and the client's own model w_k:

    1. the task's ``steps`` steps on w_k with the adapter (A_g, B_g) frozen in front of the head
       (global knowledge flows into the local model);
    2. ``adapter_steps`` steps on (A, B), from (A_g, B_g), with the updated w_k frozen (local knowledge
       flows into the adapter), learning rate ``adapter_lr``;

and the client sends (A_k, B_k) back and keeps w_k and (A_k, B_k). This order (model first, then the
adapter, which is uploaded) is our reading of the paper's iterative training.

The server, over a round's updates with p_k = n_k / sum_j n_j::

    A <- sum_k p_k A_k,     B <- sum_k p_k B_k

the paper's FedAvg over the adapters. This averages the factors, not the maps: sum_k p_k B_k A_k is in
general not (sum_k p_k B_k)(sum_k p_k A_k), which has the cross terms B_k A_l. (Exact aggregation of the
products, FLoRA's stacking, is in :mod:`hetfl.models.lora`; its stacked rank is the sum of the clients'.)

``server.params`` is ``[A.flatten(), B.flatten()]``. It starts with A drawn uniformly from
[-1/sqrt(d), 1/sqrt(d)] (``nn.Linear``'s default, as LoRA initialises A) by a generator of fixed seed 0,
and B = 0: the adapter starts as the identity map, so a client's model with the initial adapter is
exactly its own model, and B receives a gradient (s * dL/dh' (A h)^T) from the first step.

The client keeps its whole model, buffers included (BatchNorm's running statistics), in its state; the
adapter's steps read the frozen model's representation in ``eval`` mode (its running statistics, as it is
used), so they leave the buffers as the model's steps left them. Any model with a classifier head (the head
protocol of :mod:`hetfl.models.zoo`) fits.

Evaluation. A client uses its own model with the adapter it trained last (the pair local training
ended with), or, before its first task, its architecture's initial model with the global adapter. The
engine's ``trainer.predict`` takes the model's flat parameters only, so the adapter is folded into the
head, which is exact::

    W (h + s B A h) + b = (W + s (W B) A) h + b,    so W' = W + s (W B) A.

Learning rate. From B = 0 the adapter moves slowly at ``training.lr``: on the digits zoo of
``model.feature_dim`` 32 (lr 0.05, 10 steps a task, 10 rounds), ``|s B A h| / |h|`` was about 0.01 and
personal accuracy matched local training's; ``adapter_lr`` 0.5 made it about 1 and beat local training.
The default stays ``training.lr`` (untuned); set ``adapter_lr`` (or ``alpha``) for the adapter to matter.

Cost: step 2 runs the body forward only (the body is frozen and before the adapter), the adapter and the
head; ``compute_steps`` still charges it as full training steps (``steps + adapter_steps``), an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hetfl.errors import ConfigError, DivergedError
from hetfl.strategies.base import ClientData, ClientResult, Task
from hetfl.strategies.hetero import OwnModels
from hetfl.strategies.selection import Selection


def adapt(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``h + scale * B A h`` for each row h of ``h`` (N x d)."""
    return h + scale * (h @ A.T) @ B.T


def fold(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The head weight W' = W (I + scale * B A) = W + scale * (W B) A: ``W' h = W adapt(h)``."""
    return W + scale * (W @ B) @ A


class AdapterFL(OwnModels):
    """pFedLoRA-style adapter sharing across heterogeneous models (after Yi et al., arXiv:2310.13283).

    Every architecture must hand its head a representation of one width (``model.feature_dim``).

    Parameters
    ----------
    rank : int, default 4
        The adapter's rank r.
    alpha : float or None, default None
        Scaling numerator, s = alpha / r; None: r (s = 1), as in :class:`hetfl.models.lora.LoRALinear`.
    adapter_steps : int or None, default None
        Optimiser steps on the adapter (model frozen) after the model's steps; None: the task's steps.
        0 never trains the adapter: it stays the identity and clients train alone.
    adapter_lr : float or None, default None
        Learning rate of the adapter's steps; None: ``training.lr``.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "pfedlora"
    shares_representation = True
    init_seed = 0  # the generator seed of the initial A

    def __init__(
        self,
        *,
        rank: int = 4,
        alpha: float | None = None,
        adapter_steps: int | None = None,
        adapter_lr: float | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if rank < 1:
            raise ValueError(f"rank must be a positive integer (the adapter's rank, e.g. 4); got {rank}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be positive (the scaling is alpha / rank), or None for rank; got {alpha}")
        if adapter_steps is not None and adapter_steps < 0:
            raise ValueError(
                f"adapter_steps must be at least 0 (0 never trains the adapter), or None for the task's steps; got "
                f"{adapter_steps}"
            )
        if adapter_lr is not None and not adapter_lr > 0:
            raise ValueError(f"adapter_lr must be positive, or None for training.lr; got {adapter_lr}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.adapter_steps = adapter_steps
        self.adapter_lr = adapter_lr

    def compute_steps(self, steps: int) -> int:
        return steps + (steps if self.adapter_steps is None else self.adapter_steps)

    def check_models(self, trainers) -> None:
        super().check_models(trainers)  # every architecture, and the reference, has a classifier head
        widths = {t.head.in_features for t in trainers}
        reference = {t.reference.head.in_features for t in trainers}
        if widths != reference:
            raise ConfigError(
                f"model.feature_dim: {self.name}'s adapter is shaped by the reference architecture's representation "
                f"(width {', '.join(map(str, sorted(reference)))}) and the zoo's differs "
                f"({', '.join(map(str, sorted(widths)))}); set model.feature_dim to give every architecture one width"
            )

    # -- the adapter as a flat vector [A.flatten(), B.flatten()] -----------------------------------
    def initial_params(self, trainer) -> torch.Tensor:
        d = trainer.head.in_features
        gen = torch.Generator().manual_seed(self.init_seed)
        A = (torch.rand(self.rank, d, generator=gen) * 2 - 1) / math.sqrt(d)
        return torch.cat([A.reshape(-1), torch.zeros(d * self.rank)])

    def unpack(self, trainer, adapter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a flat adapter, for ``trainer``'s representation width."""
        d, r = trainer.head.in_features, self.rank
        if adapter.numel() != 2 * r * d:
            raise ValueError(
                f"an adapter of {adapter.numel()} entries does not fit rank {r} on a representation of width {d}; "
                "set model.feature_dim to give every architecture one width"
            )
        return adapter[: r * d].reshape(r, d), adapter[r * d :].reshape(d, r)

    def folded(self, trainer, model: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        """``model`` with ``adapter`` folded into its head (W -> W + s (W B) A): one flat parameter vector."""
        A, B = self.unpack(trainer, adapter)
        W = trainer.head.weight
        weight = slice(trainer.head_slice.start, trainer.head_slice.start + W.numel())  # then the bias
        out = model.clone()
        out[weight] = fold(model[weight].reshape(W.shape), A, B, self.scale).reshape(-1)
        return out

    @contextmanager
    def attached(self, trainer, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
        """``trainer``'s model with the adapter (A, B) in front of its head, while the block runs."""
        handle = trainer.head.register_forward_pre_hook(lambda module, inputs: (adapt(inputs[0], A, B, self.scale),))
        try:
            yield
        finally:
            handle.remove()

    # -- the client half ----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        A, B = self.unpack(trainer, task.params)
        with self.attached(trainer, A, B):  # 1. the model, the global adapter frozen (constants: no gradient)
            result = trainer.train(self.own_model(trainer, state), data.x, data.y, steps=task.steps, seed=seed)
        state["model"] = result.params
        steps = task.steps if self.adapter_steps is None else self.adapter_steps
        adapter_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])  # its own batch order
        adapter, loss = self.train_adapter(trainer, result.params, task.params, data, steps, adapter_seed)  # 2.
        state["adapter"] = adapter
        stats = {"adapter_steps": float(steps)} | ({"adapter_loss": loss} if steps else {})
        return ClientResult(adapter.clone(), result.steps, result.loss, stats=stats)

    def train_adapter(
        self, trainer, model: torch.Tensor, adapter: torch.Tensor, data: ClientData, steps: int, seed: int
    ) -> tuple[torch.Tensor, float]:
        """``steps`` optimiser steps on the adapter with the model ``model`` frozen; (adapter, mean loss)."""
        if steps == 0:
            return adapter.clone(), 0.0
        A, B = (t.clone().requires_grad_(True) for t in self.unpack(trainer, adapter))
        trainer.load(model)  # the frozen model in eval mode: its representation, as it will be used
        W, b = trainer.head.weight.detach(), None if trainer.head.bias is None else trainer.head.bias.detach()
        opt = trainer.optimizer(self.adapter_lr, [A, B])
        loss_sum = torch.zeros((), device=trainer.device)
        for batch in trainer.batches(data.n_samples, steps, seed):
            with torch.no_grad():  # the body is frozen and lies before the adapter: no graph through it
                h, _ = trainer.features(data.x[batch])
            loss = F.cross_entropy(F.linear(adapt(h, A, B, self.scale), W, b), data.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        mean_loss = loss_sum.item() / steps
        if not math.isfinite(mean_loss) or not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise DivergedError(
                f"adapter training diverged (loss {mean_loss}); lower strategy.params.adapter_lr or training.lr"
            )
        return torch.cat([A.detach().reshape(-1), B.detach().reshape(-1)]), mean_loss

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return self.folded(trainer, self.own_model(trainer, state), state.get("adapter", params))
