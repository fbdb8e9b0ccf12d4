"""FedIns: instance-adaptive inference by a federated pool of scale-and-shift (SSF) modulations.

Feng, Yu, Liu, Xu, Khan and Zuo, "Towards Instance-adaptive Inference for Federated Learning", ICCV 2023
(arXiv:2308.06051).

From the paper: a client's data may come from several distributions (intra-client heterogeneity), so one model
per client, or one global model, fits none of its instances well. On a frozen pretrained backbone, every client
trains a pool of M SSF modulations (a scale gamma and a shift beta, x -> gamma * x + beta), each with a key.
For an instance, the frozen backbone's feature is the query q; the N pool entries whose keys are nearest to q
(cosine similarity) are averaged into the instance's own SSF, and a matching term pulls those keys towards
their queries (as L2P's prompt pools do, Wang et al., arXiv:2112.08654). The server aggregates the clients' pools (and
the classifier head) by FedAvg; at inference every instance picks its SSF from the global pool.

Our choices. hetfl's models (the head protocol of :mod:`hetfl.models.zoo`) give the representation h in front of
the linear head; the SSF sits there, the minimal form of the paper's per-layer SSF::

    q = h (the frozen backbone's representation),   S(q) = the top_k keys by cos(q, k_m)
    gamma(q) = mean_{m in S(q)} gamma_m,   beta(q) = mean_{m in S(q)} beta_m
    logits = W (gamma(q) * h + beta(q)) + b
    loss = cross_entropy(logits, y) + key_weight * mean_i sum_{m in S(q_i)} (1 - cos(q_i, k_m))

The paper starts from an ImageNet-pretrained ViT; hetfl downloads nothing, so the backbone is pretrained in the
federation: the first ``warmup_rounds`` rounds are FedAvg rounds on the whole model (the pool untouched), after
which the body is frozen and tasks train the pool, its keys and the head. Every round's aggregation is the
sample-weighted mean of the returned vectors (FedAvg over pool, keys and head; the frozen body's mean is itself).
The pool starts as the identity (gamma = 1, beta = 0), the keys uniform in [-1, 1] from a generator of fixed seed
0, so before the first SSF round the model is the plain backbone and its head.

``server.params`` is ``[model, gamma (M x d), beta (M x d), keys (M x d)]``, d the representation's width. There
is no model of the reference architecture alone to score (``global_model = False``): every client scores the
global model with instance-adaptive inference (:meth:`FedIns.scorer`), so ``accuracy`` and ``personal_acc_*`` are
those of the global FedIns model. Bytes: the whole vector both ways, though after the warm-up only the pool and
head need to travel; FLOPs: an SSF step is charged as a full training step (it runs the body forward only), an
upper bound. The defaults (a pool of 4, top 1, ``key_weight`` 0.5, 5 warm-up rounds) are ours, sized for hetfl's
small models, not the paper's.

Measured (docs/reproductions.md, ``benchmarks/fedins.sh``): on digits whose samples are each rotated by one of four
angles, FedIns (20 warm-up rounds, then 20 SSF rounds at ``ssf_lr`` 0.5) is level with FedAvg and with a pool of one
entry: the claim's direction does not hold for an SSF on a small MLP's last representation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from hetfl.errors import DivergedError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection


def select(q: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices N x top_k of the keys nearest each query by cosine similarity, nearest first; those
    similarities N x top_k)."""
    cos = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T
    sims, index = torch.topk(cos, top_k, dim=1, sorted=True)
    return index, sims


def modulate(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gamma(q) * h + beta(q)``: each row's SSF the mean of the pool entries ``index`` chose for it."""
    return gamma[index].mean(1) * h + beta[index].mean(1)


class InstanceScorer:
    """Scores FedIns's vector ``[model, pool]`` on inputs: the instance-adaptive inference, with the ``predict``
    of a trainer (what :meth:`hetfl.training.evaluate.Evaluator.personal` calls)."""

    def __init__(self, strategy: "FedIns", trainer) -> None:
        self.strategy, self.trainer = strategy, trainer

    @torch.no_grad()
    def predict(self, params: torch.Tensor, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        trainer = self.trainer
        model, (gamma, beta, keys) = self.strategy.unpack(trainer, params.to(trainer.device))
        trainer.load(model)
        out = []
        for i in range(0, x.shape[0], batch_size):
            h, _ = trainer.features(x[i : i + batch_size].to(trainer.device))
            index, _ = select(h, keys, self.strategy.top_k)
            out.append(trainer.head(modulate(h, gamma, beta, index)))
        return torch.cat(out)


class FedIns(RoundStrategy):
    """FedIns: a federated pool of SSF modulations on a frozen backbone, chosen per instance (arXiv:2308.06051).

    Parameters
    ----------
    pool_size : int, default 4
        M, the SSF entries (each a scale, a shift and a key) in the pool.
    top_k : int, default 1
        N, the entries each instance averages into its SSF (at most ``pool_size``).
    key_weight : float, default 0.5
        Weight of the key-matching term ``sum (1 - cos(q, k))`` in the local loss.
    warmup_rounds : int, default 5
        FedAvg rounds on the whole model (the backbone's pretraining) before the body is frozen.
    ssf_lr : float or None, default None
        Learning rate of the SSF steps (pool, keys, head); None: ``training.lr``.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedins"
    personalised = True
    global_model = False
    init_seed = 0  # the generator seed of the initial keys

    def __init__(
        self,
        *,
        pool_size: int = 4,
        top_k: int = 1,
        key_weight: float = 0.5,
        warmup_rounds: int = 5,
        ssf_lr: float | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1 (the SSF entries in the pool); got {pool_size}")
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be between 1 and pool_size ({pool_size}); got {top_k}")
        if key_weight < 0:
            raise ValueError(f"key_weight must be at least 0; got {key_weight}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be at least 0; got {warmup_rounds}")
        if ssf_lr is not None and not ssf_lr > 0:
            raise ValueError(f"ssf_lr must be positive, or None for training.lr; got {ssf_lr}")
        self.pool_size, self.top_k, self.key_weight = pool_size, top_k, key_weight
        self.warmup_rounds, self.ssf_lr = warmup_rounds, ssf_lr
        self._entries: float | None = None  # fedins_entries of the last round with SSF tasks

    def check_models(self, trainers) -> None:
        for trainer in trainers:  # the SSF sits on the head's input (a zoo is refused for every one-model algorithm)
            trainer.require_head(self.name)

    # -- the vector [model, gamma, beta, keys] --------------------------------------------------------
    def initial_params(self, trainer) -> torch.Tensor:
        size = self.pool_size * trainer.head.in_features
        gen = torch.Generator().manual_seed(self.init_seed)
        keys = torch.rand(size, generator=gen) * 2 - 1
        return torch.cat([trainer.initial, torch.ones(size), torch.zeros(size), keys])

    def unpack(self, trainer, params: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(the model's flat vector, (gamma, beta, keys), each pool_size x d) of a FedIns vector."""
        n, d = trainer.numel, trainer.head.in_features
        pool = params[n:].reshape(3, self.pool_size, d)
        return params[:n], (pool[0], pool[1], pool[2])

    def scorer(self, trainer) -> InstanceScorer:
        return InstanceScorer(self, trainer)

    # -- the server half --------------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        return {"options": {"warmup": server.version < self.warmup_rounds}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        used = [u.stats["fedins_entries"] for u in updates if "fedins_entries" in u.stats]
        self._entries = sum(used) / len(used) if used else None
        return weighted_mean(updates)

    def metrics(self) -> dict[str, Any]:
        """``fedins_entries``: over the last round's SSF tasks, the mean number of pool entries a client's training
        instances choose (1: the pool acts as one SSF; ``pool_size``: every entry in use)."""
        return super().metrics() | ({} if self._entries is None else {"fedins_entries": self._entries})

    # -- the client half --------------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        model, _ = self.unpack(trainer, task.params)
        if task.options.get("warmup", False):  # the backbone's pretraining: FedAvg on the whole model
            result = trainer.train(model, data.x, data.y, steps=task.steps, seed=seed)
            params = torch.cat([result.params, task.params[trainer.numel :].to(result.params.device)])
            return ClientResult(params, result.steps, result.loss)
        params, loss = self.train_ssf(trainer, task.params, data, task.steps, seed)
        return ClientResult(params, task.steps, loss, stats={"fedins_entries": self.entries_used(trainer, params, data)})

    def entries_used(self, trainer, params: torch.Tensor, data: ClientData) -> float:
        """How many of the pool's entries the instances of ``data`` choose (their top-1 key) under ``params``."""
        model, (_, _, keys) = self.unpack(trainer, params)
        trainer.load(model)
        with torch.no_grad():
            h, _ = trainer.features(data.x)
        return float(select(h, keys, 1)[0].unique().numel())

    def train_ssf(self, trainer, params: torch.Tensor, data: ClientData, steps: int, seed: int) -> tuple[torch.Tensor, float]:
        """``steps`` optimiser steps on the pool, its keys and the head, the body frozen; (vector, mean loss)."""
        model, pool = self.unpack(trainer, params)
        gamma, beta, keys = (t.clone().requires_grad_(True) for t in pool)
        trainer.load(model)  # the frozen backbone in eval mode: its representation, as inference reads it
        head = [p.detach().clone().requires_grad_(True) for p in trainer.head.parameters()]  # W, then b if any
        opt = trainer.optimizer(self.ssf_lr, [gamma, beta, keys, *head])
        loss_sum = torch.zeros((), device=trainer.device)
        for batch in trainer.batches(data.n_samples, steps, seed):
            with torch.no_grad():  # the body lies before the SSF and is frozen: no graph through it
                h, _ = trainer.features(data.x[batch])
            index, _ = select(h, keys.detach(), self.top_k)
            cos = (F.normalize(h, dim=1).unsqueeze(1) * F.normalize(keys[index], dim=2)).sum(2)  # N x top_k
            loss = F.cross_entropy(F.linear(modulate(h, gamma, beta, index), *head), data.y[batch])
            loss = loss + self.key_weight * (1 - cos).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        mean_loss = loss_sum.item() / max(steps, 1)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"FedIns's SSF training diverged (loss {mean_loss}); lower strategy.params.ssf_lr")
        out = model.clone()
        out[trainer.head_slice] = torch.cat([p.detach().reshape(-1) for p in head])
        return torch.cat([out, gamma.detach().reshape(-1), beta.detach().reshape(-1), keys.detach().reshape(-1)]), mean_loss

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return params  # the global model, scored instance by instance (scorer)
