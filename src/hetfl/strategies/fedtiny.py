"""FedTiny: a coarse-pruned model chosen by the clients, then pruned progressively within the devices' memory.

Huang, Zhang, Sun, Fang, Yuan and Wu, "Distributed Pruning Towards Tiny Neural Networks in Federated Learning"
(arXiv:2212.01977, ICDCS 2023).

From the paper (its abstract, and the authors' code in their FedPruning library, read for the facts): two modules.
*Adaptive batch-normalisation selection*: the server makes a pool of candidate coarse-pruned models; the clients
re-estimate each candidate's BatchNorm statistics on their local data and evaluate it; the server aggregates the
evaluations and keeps the best candidate, so the coarse pruning is chosen on the clients' data, not biased by any
one client's. *Progressive pruning*: training runs on the sparse model; every ΔT rounds until T_end, the clients
also report, layer by layer, the top-K gradients of the pruned weights; the server averages the reports, prunes the
K active weights of smallest magnitude of each layer and grows the K pruned weights of largest averaged gradient
(RigL-like; grown weights start at 0), with K = f(t) x (active weights of the layer), f(t) = alpha / 2 (1 + cos(pi t
/ T_end)). The density stays fixed, one for every device; a device never holds a dense model or a dense gradient.

Our choices, where hetfl's interface or tiny CPU settings ask for one:

- Rounds: round 0 is the selection round (tasks of 0 training steps; its commit installs the chosen candidate; a
  selection round that gets no update is run again), then FedAvg rounds on the sparse model; the training round after
  commit t is round t, and a round with t % ``adjust_every`` == 0 and t <= ``adjust_until`` is an adjustment round.
- Candidates (``candidates`` of them, as in the authors' code): the server's initial model and ``candidates - 1``
  re-initialisations of it (each module's ``reset_parameters``, seeded from the server's random stream), each
  magnitude-pruned at the run's density with the same density in every prunable layer (every linear and convolution
  weight; at least one weight kept per layer; ties to the lower index). The server sends each candidate sparse.
- Selection: each client re-estimates a candidate's BatchNorm running statistics on its local data (a cumulative
  average over its samples in batches, the model in training mode, no gradients) and scores it by its mean local
  loss in evaluation mode; a model without BatchNorm (hetfl's MLP, CNN, cnn1d) is scored on the local loss alone.
  The server keeps the candidate of least sample-weighted mean loss (ties: the lower index) with the sample-weighted
  mean of the clients' statistics for it. One exchange, where the authors' code has two (statistics aggregated
  first, then losses computed with them): a client scores a candidate with its own statistics.
- The report: after its local steps, an adjustment round's client computes the gradient of its loss on
  ``grad_batches`` batches at the model it trained and returns, for each layer, the K_l = floor(f(t) x active_l)
  (at most the layer's pruned count) pruned weights of largest |gradient| with their values (ties to the lower
  index). The server averages the reports sample-weighted (a weight no client reported counts 0), and in each layer
  prunes the K_l active weights of least |w| of the new model, grows the K_l weights, pruned before this round, of
  largest |averaged gradient| (the same tie rule). Worked example (tests): w = [0.5, -0.1, 0, 0, 2.0, 0] with mask
  [1, 1, 0, 0, 1, 0], averaged report g = [0, 0, 0.3, -0.7, 0, 0.1], K = 1: prune index 1 (|w| 0.1), grow index 3
  (|g| 0.7); the mask becomes [1, 0, 0, 1, 1, 0].
- Memory (``devices.memory``): ``density`` (the paper's target density) is capped by the densest model the smallest
  device can train (:class:`Footprint`): 4-byte floats for the kept weights and the other parameters (biases,
  normalisation), their gradients and the optimiser's states (SGD with momentum: one, Adam: two), the buffers, a
  batch's activations (every leaf module's output), one layer's dense gradient at a time while a report is made, the
  kept weights' positions (int32 indices or a bitmask, whichever is smaller) and the top-K report (value and index,
  8 bytes, at most alpha x kept). Worked example (tests): 100 prunable weights, 10 other parameters, no buffers, SGD,
  batch 2 of 5 activations a sample, largest layer 60, alpha 0.3: k kept cost 4 (2 (k + 10) + 10 + 60) + min(4 k,
  13) + 8 floor(0.3 k) bytes; 40 weights cost 789 and 41 cost 797, so a budget of 789 bytes gives density 0.40.
  ``density: 1`` with ``devices.memory`` set: the densest the smallest device allows.
- FLOPs (:meth:`FedTiny.task_flops`): a training task, its steps at the sparse model's price (dense step FLOPs times
  :func:`~hetfl.models.sparsity.sparse_forward_share`); the report adds ``grad_batches`` dense steps (the gradient of
  every pruned weight is a dense weight gradient); a selection task, the candidates' sparse forward passes over the
  client's samples, twice with BatchNorm (re-estimation and evaluation), once without.
- Bytes (:meth:`FedTiny.transfer_bytes`, 4-byte floats): down, the kept weights with their positions
  (:func:`~hetfl.models.sparsity.sparse_bytes`), the other parameters and the buffers; up, the same without
  positions (the client knows the mask), plus, in an adjustment round, each layer's report (values and positions
  among the layer's pruned weights). A selection task downloads every candidate so and uploads a loss and the
  buffers per candidate. Worked example (tests): 100 prunable weights, 40 kept, 10 other: 160 + min(160, 13) + 40 =
  213 bytes down, 200 up.
- Only the global model (no personalisation); classifiers on features (a model on token ids is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfl.errors import ConfigError
from hetfl.models.cost import BACKWARD_FACTOR
from hetfl.models.cost import sample_shape
from hetfl.models.sparsity import prunable, sparse_bytes, sparse_forward_share, weight_slices
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update, buffer_entries
from hetfl.strategies.rounds import RoundStrategy, sample_weights, weighted_mean
from hetfl.strategies.selection import Selection
from hetfl.training.local import task_loss

SELECT, TRAIN, REPORT = "select", "train", "report"


# -- the arithmetic (module docstring) ------------------------------------------------------------
def decay(t: int, alpha: float, t_end: int) -> float:
    """f(t) = alpha / 2 (1 + cos(pi t / T_end)): the share of a layer's active weights adjusted at round t."""
    return alpha / 2 * (1 + math.cos(math.pi * t / t_end))


def top(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Positions of the ``k`` largest (or smallest) ``values``; ties to the lower position."""
    return torch.argsort(-values if largest else values, stable=True)[:k]


def prune_and_grow(weights: torch.Tensor, grads: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """One layer's new mask: its ``k`` active weights of least |w| pruned, its ``k`` inactive ones of largest |g|
    grown (``k`` cut to the smaller of the two counts)."""
    active, inactive = mask.nonzero().flatten(), (~mask).nonzero().flatten()
    k = min(k, len(active), len(inactive))
    new = mask.clone()
    new[active[top(weights[active].abs(), k, largest=False)]] = False
    new[inactive[top(grads[inactive].abs(), k, largest=True)]] = True
    return new


def magnitude_mask(params: torch.Tensor, slices: list[slice], density: float) -> torch.Tensor:
    """Coarse pruning: in each prunable layer (``slices`` of ``params``) the ``max(1, round(density * n))`` weights
    of largest magnitude kept (ties to the lower index); True elsewhere (parameters that are not pruned)."""
    mask = torch.ones(len(params), dtype=torch.bool)
    for where in slices:
        layer = params[where]
        keep = top(layer.abs(), max(1, round(density * len(layer))), largest=True)
        mask[where] = False
        mask[where.start + keep] = True
    return mask


def activation_numel(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Entries of every leaf module's output for one sample (the activations a training step keeps)."""
    total = [0]

    def count(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total[0]


@dataclass(frozen=True)
class Footprint:
    """What a device's training memory holds, in entries (module docstring, Memory)."""

    prunable: int
    other: int
    buffers: int
    activations: int  # of one sample
    largest_layer: int
    batch_size: int
    optimizer_states: int
    alpha: float
    layers: int = 1  # prunable layers (each keeps one weight at least)

    def bytes(self, kept: int) -> int:
        """Training memory in bytes with ``kept`` prunable weights kept."""
        params = kept + self.other
        floats = (params * (2 + self.optimizer_states) + self.buffers + self.batch_size * self.activations
                  + self.largest_layer)
        return 4 * floats + min(4 * kept, math.ceil(self.prunable / 8)) + 8 * math.floor(self.alpha * kept)

    def densest(self, budget: float) -> int:
        """The most kept weights whose training memory fits ``budget`` bytes (-1: not even none)."""
        lo, hi = -1, self.prunable
        while lo < hi:  # the memory grows with the kept weights: bisect
            mid = (lo + hi + 1) // 2
            if self.bytes(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def smallest_memory(profiles: Any) -> float:
    """The smallest device memory (``memory_bytes``; inf where none is set)."""
    column = getattr(profiles, "memory_bytes", None)
    if column is not None:
        return float(np.min(column)) if len(column) else math.inf
    return min((getattr(p, "memory_bytes", math.inf) for p in profiles), default=math.inf)


# -- the algorithm --------------------------------------------------------------------------------
class FedTiny(RoundStrategy):
    """FedTiny: adaptive BatchNorm selection of a coarse-pruned model, then progressive pruning (module docstring).

    Parameters
    ----------
    density : float, default 0.5
        Share of the prunable weights (every linear and convolution weight) kept, in (0, 1]; capped by the densest
        model the smallest device's memory (``devices.memory``) can train.
    candidates : int, default 4
        Coarse-pruned candidate models the selection round scores.
    adjust_every : int, default 5
        ΔT: rounds between two adjustments of the mask.
    adjust_until : int, default 30
        T_end: the last round that may adjust the mask (f(t) reaches 0 there).
    alpha : float, default 0.3
        f(0): the largest share of a layer's active weights one adjustment moves.
    grad_batches : int, default 1
        Batches of local data the report's gradient is computed on.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedtiny"
    compressible = False  # the upload is a sparse model and a top-K report, not a change to compress

    def __init__(
        self,
        *,
        density: float = 0.5,
        candidates: int = 4,
        adjust_every: int = 5,
        adjust_until: int = 30,
        alpha: float = 0.3,
        grad_batches: int = 1,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if not 0 < density <= 1:
            raise ValueError("density must be in (0, 1]: the share of the prunable weights kept")
        if candidates < 1:
            raise ValueError("candidates must be at least 1")
        if adjust_every < 1 or adjust_until < 1:
            raise ValueError("adjust_every and adjust_until must be at least 1 (rounds)")
        if not 0 <= alpha <= 1:
            raise ValueError("alpha must be in [0, 1]: the share of a layer's active weights adjusted at first")
        if grad_batches < 1:
            raise ValueError("grad_batches must be at least 1")
        self.density = density
        self.candidates = candidates
        self.adjust_every = adjust_every
        self.adjust_until = adjust_until
        self.alpha = alpha
        self.grad_batches = grad_batches
        self._run_density: float | None = None  # density, capped by the smallest device's memory
        self._memory_density: float | None = None
        self._footprint: Footprint | None = None  # the reference model's memory, from check_models
        self._pool: torch.Tensor | None = None  # (candidates, flat): the coarse-pruned candidates
        self._mask: torch.Tensor | None = None  # flat: True where an entry is trained (kept or not prunable)
        self._share: float | None = None  # sparse forward FLOPs / dense of the current mask
        self._selected: int | None = None
        self._selection_losses: list[float] = []
        self._adjustments = 0
        self._moved: float | None = None

    # -- checks and memory ----------------------------------------------------------------------
    def check_models(self, trainers) -> None:
        for trainer in trainers:
            if trainer.token_input:
                raise ConfigError(f"model.name: fedtiny prunes classifiers on features, not {trainer.label} (token "
                                  "ids)")
        self._footprint = self.footprint(trainers[0].reference)

    def footprint(self, trainer) -> Footprint:
        """The reference model's :class:`Footprint` under the run's training settings."""
        model, cfg = trainer.model, trainer.cfg
        candidates = prunable(model)
        states = 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)
        return Footprint(
            prunable=int(candidates.sum()), other=int((~candidates).sum()), buffers=trainer.n_buffers,
            activations=activation_numel(model, sample_shape(trainer, "fedtiny needs the input's shape to prune")),
            largest_layer=max(where.stop - where.start for _, where in weight_slices(model)),
            batch_size=cfg.batch_size, optimizer_states=states, alpha=self.alpha, layers=len(weight_slices(model)),
        )

    def run_density(self, profiles: Any) -> float:
        """``density`` capped by what the smallest device's memory trains (module docstring, Memory); needs the
        footprint (:meth:`check_models`)."""
        budget = smallest_memory(profiles)
        if math.isinf(budget):
            self._memory_density = 1.0
            return self.density
        fp, layers = self._footprint, self._footprint.layers
        if fp.densest(budget) < layers:
            raise ConfigError(f"devices.memory: the smallest device has {budget:.4g} bytes and fedtiny needs "
                              f"{fp.bytes(layers):.4g} to train the model with one weight a layer; raise the "
                              "memory, or lower training.batch_size")
        self._memory_density = fp.densest(budget) / fp.prunable
        return min(self.density, self._memory_density)

    def check_devices(self, profiles: list[Any]) -> None:
        if self._footprint is not None:
            self._run_density = self.run_density(profiles)

    # -- the server half: candidates, rounds, masks ---------------------------------------------
    def _slices(self, trainer) -> list[slice]:
        nb = trainer.n_buffers
        return [slice(nb + where.start, nb + where.stop) for _, where in weight_slices(trainer.model)]

    def _prepare(self, server: Server) -> None:
        """The run's density and the candidate pool (once, before the selection round)."""
        if self._pool is not None or self._mask is not None:
            return
        trainer = server.trainer
        if self._footprint is None:
            self._footprint = self.footprint(trainer)
        self._run_density = self.run_density(server.profiles)
        saved = trainer.flat.detach().clone()
        pool = [server.params.clone()]
        try:
            with torch.random.fork_rng(devices=[]):
                for _ in range(1, self.candidates):
                    torch.manual_seed(int(server.rng.integers(2**31)))
                    with torch.no_grad():
                        for module in trainer.model.modules():
                            if hasattr(module, "reset_parameters"):
                                module.reset_parameters()
                    trainer.collect()
                    pool.append(trainer.flat.detach().clone())
        finally:
            trainer.load(saved)
        slices = self._slices(trainer)
        for candidate in pool:
            candidate[~magnitude_mask(candidate, slices, self._run_density)] = 0.0
        self._pool = torch.stack(pool)

    def start(self, server: Server) -> None:
        self._prepare(server)
        super().start(server)

    def round_kind(self, server: Server) -> str:
        t = server.version
        if self._mask is None:
            return SELECT
        return REPORT if t % self.adjust_every == 0 and t <= self.adjust_until else TRAIN

    def report_sizes(self, server: Server) -> torch.Tensor:
        """K_l of each layer for this round: floor(f(t) x active_l), at most the layer's pruned weights."""
        f = decay(server.version, self.alpha, self.adjust_until)
        sizes = []
        for where in self._slices(server.trainer):
            active = int(self._mask[where].sum())
            sizes.append(min(math.floor(f * active), where.stop - where.start - active))
        return torch.tensor(sizes, dtype=torch.int64)

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        self._prepare(server)
        kind = self.round_kind(server)
        if kind == SELECT:
            return {"steps": 0, "payload": {"candidates": self._pool}, "options": {"fedtiny": SELECT}}
        payload = {"mask": self._mask}
        if kind == REPORT:
            payload["k"] = self.report_sizes(server)
        return {"payload": payload, "options": {"fedtiny": kind}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        kind = updates[0].task.options["fedtiny"]
        weights = sample_weights(updates)
        if kind == SELECT:
            losses = (torch.stack([u.payload["losses"] for u in updates]).T @ weights).tolist()
            best = min(range(len(losses)), key=lambda i: (losses[i], i))
            params = self._pool[best].clone()
            nb = buffer_entries(server)
            if nb:
                params[:nb] = torch.stack([u.payload["buffers"][best] for u in updates]).T @ weights
            self._selected, self._selection_losses = best, losses
            self._mask = params != 0
            self._mask[~self._prunable_flat(server)] = True
            self._pool, self._share = None, None
            return params
        new = weighted_mean(updates)
        if kind == REPORT:
            grads = torch.stack([u.payload["grad"] for u in updates]).T @ weights
            mask = self._mask.clone()
            for where, k in zip(self._slices(server.trainer), updates[0].task.payload["k"].tolist()):
                mask[where] = prune_and_grow(new[where], grads[where], self._mask[where], k)
            kept = self._mask & self._prunable_flat(server)
            self._moved = float((kept & ~mask).sum()) / max(int(kept.sum()), 1)
            self._mask, self._share = mask, None
            self._adjustments += 1
        new[~self._mask] = 0.0
        return new

    def _prunable_flat(self, server: Server) -> torch.Tensor:
        nb = buffer_entries(server)
        return torch.cat([torch.zeros(nb, dtype=torch.bool), prunable(server.trainer.model)])

    # -- the client half --------------------------------------------------------------------------
    def local_training(self, task: Task) -> dict[str, Any] | None:
        return None  # selection and reports are not plain training; a task trains alone

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        if task.options["fedtiny"] == SELECT:
            losses, buffers = self.score_candidates(trainer, task.payload["candidates"], data, seed)
            payload = {"losses": losses, **({"buffers": buffers} if trainer.n_buffers else {})}
            return ClientResult(task.params, 0, float(losses.min()), payload)
        mask = task.payload["mask"].to(trainer.device)
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed, grad_mask=mask.float())
        params = torch.where(mask, result.params, torch.zeros_like(result.params))
        if task.options["fedtiny"] == TRAIN:
            return ClientResult(params, result.steps, result.loss)
        report = self.report(trainer, params, mask, task.payload["k"], data, seed)
        return ClientResult(params, result.steps, result.loss, {"grad": report})

    @staticmethod
    def score_candidates(
        trainer, candidates: torch.Tensor, data: ClientData, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each candidate's mean local loss (after re-estimating its BatchNorm statistics on ``data``, if it has
        any) and those statistics, ``(candidates,)`` and ``(candidates, n_buffers)``."""
        nb = trainer.n_buffers
        norms = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        chunks = torch.arange(data.n_samples).split(trainer.cfg.batch_size)
        losses, buffers = [], []
        for candidate in candidates:
            trainer.load(candidate.to(trainer.device))
            if nb:
                momenta = [m.momentum for m in norms]
                try:
                    for m in norms:
                        m.reset_running_stats()
                        m.momentum = None  # a cumulative average over the client's batches
                    with trainer.training(seed, "fedtiny's BatchNorm re-estimation"), torch.no_grad():
                        for chunk in chunks:
                            trainer.model(data.x[chunk])
                finally:
                    for m, momentum in zip(norms, momenta):
                        m.momentum = momentum
                trainer.collect()
            buffers.append(trainer.flat[:nb].detach().clone())
            with torch.no_grad():
                total = sum(float(task_loss(trainer.model(data.x[c]), data.y[c])) * len(c) for c in chunks)
            losses.append(total / data.n_samples)
        return torch.tensor(losses, dtype=torch.float32), torch.stack(buffers).float()

    def report(
        self, trainer, params: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor, data: ClientData, seed: int
    ) -> torch.Tensor:
        """The top-K report: each layer's K_l pruned weights of largest |gradient| at ``params`` (module docstring),
        their gradients in place, 0 elsewhere."""
        trainer.load(params)
        trainer.grad.zero_()
        with trainer.training(seed + 1, "fedtiny's gradient report"):
            for batch in trainer.batches(data.n_samples, self.grad_batches, seed + 1):
                (task_loss(trainer.model(data.x[batch]), data.y[batch]) / self.grad_batches).backward()
        grad = trainer.grad.detach()
        report = torch.zeros_like(params)
        for where, k in zip(self._slices(trainer), sizes.tolist()):
            pruned = (~mask[where]).nonzero().flatten() + where.start
            chosen = pruned[top(grad[pruned].abs(), k, largest=True)]
            report[chosen] = grad[chosen]
        trainer.grad.zero_()
        return report

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        kind = task.options.get("fedtiny")
        if kind == SELECT:
            n = len(task.payload["candidates"])
            nb = buffer_entries(server)
            return {"losses": ((n,), torch.float32), **({"buffers": ((n, nb), torch.float32)} if nb else {})}
        if kind == REPORT:
            return {"grad": ((server.params.numel(),), torch.float32)}
        return {}

    # -- what a task costs --------------------------------------------------------------------------
    def _kept(self, server: Server, mask: torch.Tensor) -> tuple[int, int, int, int]:
        """(kept prunable weights, prunable weights, other parameters, buffer entries) under ``mask``."""
        prunable_flat = self._prunable_flat(server)
        nb = buffer_entries(server)
        return (int((mask & prunable_flat).sum()), int(prunable_flat.sum()),
                len(mask) - nb - int(prunable_flat.sum()), nb)

    def _mask_of(self, server: Server, task: Task) -> torch.Tensor:
        if task.options["fedtiny"] == SELECT:
            return (task.payload["candidates"][0] != 0) | ~self._prunable_flat(server)
        return task.payload["mask"]

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        """Sparse models down and up, the report's values and positions, the candidates (module docstring, Bytes)."""
        k, n, other, nb = self._kept(server, self._mask_of(server, task))
        dense = 4 * (other + nb)
        if task.options["fedtiny"] == SELECT:
            c = len(task.payload["candidates"])
            return c * (sparse_bytes(k, n) + dense), c * 4 * (1 + nb)
        down, up = sparse_bytes(k, n) + dense, 4 * k + dense
        if task.options["fedtiny"] == REPORT:
            mask = task.payload["mask"]
            for where, size in zip(self._slices(server.trainer), task.payload["k"].tolist()):
                up += sparse_bytes(size, int((~mask[where]).sum()))
        return down, up

    def forward_share(self, server: Server, mask: torch.Tensor) -> float:
        nb = buffer_entries(server)
        return sparse_forward_share(server.trainer.model, sample_shape(server.trainer, "fedtiny needs the input's shape to prune"), mask[nb:])

    def task_flops(self, server: Server, task: Task) -> float:
        """Sparse steps, a report's dense gradient steps, or the candidates' forward passes (module docstring)."""
        kind = task.options["fedtiny"]
        step = server.step_flops(task.client_id)
        if kind == SELECT:
            share = self.forward_share(server, self._mask_of(server, task))
            forward = step / (BACKWARD_FACTOR * server.trainer.cfg.batch_size) * server.num_samples(task.client_id)
            passes = 2 if buffer_entries(server) else 1
            return forward * share * passes * len(task.payload["candidates"])
        if self._share is None or task.payload["mask"] is not self._mask:
            self._share = self.forward_share(server, task.payload["mask"])
        flops = self.compute_steps(task.steps) * step * self._share
        return flops + (self.grad_batches * step if kind == REPORT else 0.0)

    def server_flops(self, server: Server, updates: list[Update]) -> float:
        """The weighted mean of the models, and of the reports in an adjustment round; a selection commit averages
        the losses and the statistics."""
        if not updates:
            return 0.0
        kind = updates[0].task.options["fedtiny"]
        if kind == SELECT:
            return 2.0 * len(updates) * len(updates[0].payload["losses"]) * (1 + buffer_entries(server))
        return super().server_flops(server, updates) * (2 if kind == REPORT else 1)

    def describe_transfer(self, trainer) -> str:
        return f"a sparse model (density at most {self.density:g}: values and positions); {self.candidates} candidates once"

    def metrics(self) -> dict[str, float]:
        """``fedtiny_density``: kept share of the prunable weights; ``fedtiny_moved``: share of the kept weights the
        last adjustment moved."""
        out: dict[str, float] = {}
        if self._run_density is not None:
            out["fedtiny_density"] = self._run_density
        if self._moved is not None:
            out["fedtiny_moved"] = self._moved
        return out

    def summary(self, server: Server) -> dict[str, Any]:
        return {"density": self._run_density, "memory_density": self._memory_density, "selected": self._selected,
                "selection_losses": self._selection_losses, "adjustments": self._adjustments}
