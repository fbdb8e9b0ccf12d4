"""HideNseek: the server prunes a random network once; clients learn only the signs of the weights it kept.

Vallapuram, Zhou, Kwon, Lee, Xu and Hui, "HideNseek: Federated Lottery Ticket via Server-side Pruning and Sign
Supermask" (arXiv:2206.04385).

From the paper: the server prunes the randomly initialised network once, at initialisation and without data
(one-shot, data-agnostic), keeping the weights of highest synaptic saliency; the kept weights w are never trained.
Each client optimises a sign supermask m in {-1, +1} multiplied by the unpruned weights, so its model is

    w_eff = m ⊙ p ⊙ w        p in {0, 1}: the server's pruning mask,

and only masks travel, which cuts communication and (with a sparse model) training time.

Our choices, where the paper's text (we read its abstract and the synaptic-saliency method it cites) leaves room
or hetfl's interface asks for one:

- Saliency: SynFlow's (Tanaka et al., arXiv:2006.05467), data-agnostic: with every parameter replaced by its
  absolute value and the model in ``eval`` mode, R = 1^T f(1; |theta|) (the output summed, on one input of ones,
  in double precision), and the score of a weight is ``dR/d|w| * |w|``. The weights of every ``nn.Linear`` and
  convolution (``prunable``: weights of two or more dimensions, the classifier head included) are ranked together
  (global pruning) and the top ``round((1 - sparsity) * P)`` kept (ties: lower index first), over SynFlow's
  iterative schedule: ``iterations`` rounds of scoring the pruned model, keeping ``(1 - sparsity) ** (k / n)`` of
  the weights at round k (100, SynFlow's default; still at initialisation and without data, so the paper's
  "one-shot" pruning: once, before training). ``iterations: 1`` scores once, which collapses layers at high
  sparsity: on an MLP 64 -> 64 -> 10 at sparsity 0.9 it kept none of the first layer's weights (tests; on the
  quickstart, accuracy 0.10), 100 iterations keep 8% of them (docs/benchmarks.md). Worked example (tests, with
  ``iterations: 1``): ``Linear(2, 2) -> ReLU -> Linear(2, 1)`` without biases, W1 = [[1, -2], [3, 0.5]],
  W2 = [[2, -1]]: R = 2 * (1 + 2) + 1 * (3 + 0.5) = 9.5, scores W1: [[2, 4], [3, 0.5]], W2: [6, 3.5]; sparsity 0.5
  keeps W2's two entries and W1[0, 1].
- Everything but the prunable weights (biases, normalisation's scale and shift) stays at its initial value
  (part of the random network, never trained); buffers (BatchNorm's running statistics) move as the model's
  training-mode forward moves them and are averaged as FedAvg averages them.
- The sign supermask is held as w_eff itself: the global model ``server.params`` is ``m ⊙ p ⊙ w``, so the
  engine evaluates it as any global model, and a client recovers p and |w| from what it downloads (the kept
  entries are the prunable non-zero ones: a weight drawn exactly 0 is pruned, which changes nothing). m's sign
  relative to w's is folded in: learning sign(w_eff) is learning m.
- The client half: a real score s per kept weight, starting at ``score_init`` times the downloaded w_eff (a task
  starts from the global mask, with a magnitude relative to the weight's: under SGD a sign then flips once
  ``lr`` times the accumulated dL/dw_eff passes ``score_init``, whatever the weight's size; starting at |w| itself,
  no sign flipped in 20 rounds of the quickstart, and a constant start suited only weights of one size); the
  forward pass uses ``sign(s) ⊙ |w|`` (sign(0) = +1), the backward pass the straight-through estimator
  (d sign(s) / ds := 1, so dL/ds = dL/dw_eff ⊙ |w|); the trainer's optimiser (``training.optimizer``, ``lr``)
  steps the scores. It returns ``sign(s) ⊙ |w|`` on the kept entries.
- Aggregation: the sample-weighted vote, sign(sum_i p_i m_i), p_i = n_i / sum_j n_j; a tie keeps the current
  sign. The paper's personalisation (clients' own masks) is not modelled: this is the global model's variant.
- Bytes (:meth:`HideNseek.transfer_bytes`): each task moves one bit per kept weight each way (the signs,
  ``ceil(k / 8)`` bytes) and the buffers as floats; a client's first task also downloads the pruned random model:
  the pruning mask at one bit per prunable weight (``ceil(P / 8)``), the k kept weights and the fixed parameters
  as floats. Worked example: P = 6, k = 3, no other parameters: 1 byte each way, and 1 + 12 = 13 bytes more the
  first time.
- FLOPs (:meth:`HideNseek.task_flops`): unstructured sparsity as hardware that skips the pruned weights would
  compute it (our simulation multiplies by zeros, so its wall time does not shrink; the simulated time and
  ``train_flops`` do): a prunable layer's forward FLOPs (:func:`~hetfl.models.cost.flops_by_module`) scale with
  the share of its weights kept (every weight of a linear layer or a convolution takes part in the same number of
  multiply-adds); the rest of the forward pass is charged in full; a task costs the dense price
  (``server.step_flops``, the steps) times sparse forward / dense forward. Worked example: the network above on
  one sample, 2 * (4 + 2) = 12 FLOPs dense; keeping 1 of W1's 4 and both of W2's: 8 * 1/4 + 4 = 6, half.
- Classifiers on features only: SynFlow needs an input of ones, so a model on token ids is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hetfl.errors import ConfigError, DivergedError
from hetfl.models.cost import sample_shape
from hetfl.models.sparsity import prunable, sparse_forward_share
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update, buffer_entries
from hetfl.strategies.rounds import RoundStrategy, sample_weights, weighted_mean
from hetfl.strategies.selection import Selection
from hetfl.training.local import task_loss


# -- pruning at initialisation (module docstring, Saliency) ---------------------------------------
def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flat parameter vector as ``{name: tensor}`` for :func:`torch.func.functional_call` (views of ``flat``)."""
    params, offset = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return params


def synflow_scores(model: nn.Module, params: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """SynFlow's saliency of every parameter, ``dR/d|theta| * |theta|`` with R = sum f(1; |theta|) (module
    docstring), in double precision, the model in ``eval`` mode (put back after); ``params``: the flat parameter
    vector (pruned entries 0)."""
    theta = params.detach().double().abs().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        buffers = {name: b.double() for name, b in model.named_buffers()}
        out = torch.func.functional_call(model, {**unflatten(model, theta), **buffers},
                                         (torch.ones((1, *input_shape), dtype=torch.float64),))
        (grad,) = torch.autograd.grad(out.sum(), theta)
    finally:
        model.train(was_training)
    return (grad * theta).detach()


def synflow_prune(
    model: nn.Module, params: torch.Tensor, input_shape: tuple[int, ...], sparsity: float, iterations: int = 1
) -> torch.Tensor:
    """The kept prunable entries (a boolean mask over the flat parameter vector; False off the prunable ones):
    the top ``round((1 - sparsity) * P)`` by SynFlow saliency, over ``iterations`` rounds of pruning."""
    candidates = prunable(model)
    keep = candidates.clone()
    n_prunable = int(candidates.sum())
    for k in range(1, iterations + 1):
        scores = synflow_scores(model, params * keep, input_shape)
        scores[~keep] = -math.inf  # once pruned, pruned for good
        n_keep = round((1 - sparsity) ** (k / iterations) * n_prunable)
        order = torch.argsort(scores[candidates], descending=True, stable=True)
        kept = torch.zeros(n_prunable, dtype=torch.bool)
        kept[order[:n_keep]] = True
        keep = candidates.clone()
        keep[candidates] = kept
    return keep


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, -1 elsewhere (sign(0) = +1: a kept weight is never silenced)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# -- the algorithm --------------------------------------------------------------------------------
class HideNseek(RoundStrategy):
    """Server-side pruning at initialisation (SynFlow), then a global sign supermask voted by the clients.

    Parameters
    ----------
    sparsity : float, default 0.5
        Share of the prunable weights (every linear and convolution weight) pruned away, in [0, 1).
    iterations : int, default 100
        SynFlow's pruning iterations (its paper's default); 1 scores once, which can prune a layer away.
    score_init : float, default 0.001
        The clients' sign scores start at ``score_init`` times the downloaded weights (their signs: the global
        mask's): the smaller, the sooner a sign flips.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "hidenseek"

    def __init__(
        self,
        *,
        sparsity: float = 0.5,
        iterations: int = 100,
        score_init: float = 0.001,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if not 0 <= sparsity < 1:
            raise ValueError("sparsity must be in [0, 1): the share of the prunable weights removed")
        if iterations < 1:
            raise ValueError("iterations must be at least 1 (1: score once)")
        if score_init <= 0:
            raise ValueError("score_init must be positive")
        self.sparsity = sparsity
        self.score_init = score_init
        self.iterations = iterations
        self._has_model: set[int] = set()  # clients that have downloaded the pruned random model
        self._forward_share: float | None = None  # sparse forward FLOPs / dense, fixed for a run
        self._flipped: float | None = None

    def check_models(self, trainers) -> None:
        for trainer in trainers:
            if trainer.token_input:
                raise ConfigError(f"model.name: hidenseek prunes with an input of ones (SynFlow), which "
                                  f"{trainer.label} (token ids) cannot take; use a classifier on features")

    @staticmethod
    def input_shape(trainer) -> tuple[int, ...]:
        """One sample's shape (a trainer built by hand, without ``input_shape``: its first layer's, if linear)."""
        return sample_shape(trainer, "hidenseek needs the input's shape to prune")

    def initial_params(self, trainer) -> torch.Tensor:
        """The random initial model with the pruned weights set to 0."""
        flat = trainer.initial.clone()
        nb = trainer.n_buffers
        candidates = prunable(trainer.model)
        keep = synflow_prune(trainer.model, flat[nb:], self.input_shape(trainer), self.sparsity, self.iterations)
        flat[nb:][candidates & ~keep] = 0.0
        return flat

    @staticmethod
    def kept(model: nn.Module, params: torch.Tensor) -> torch.Tensor:
        """The kept weights of a model's flat parameter vector ``params``: its prunable non-zero entries."""
        return prunable(model) & (params != 0)

    # -- the client half ------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        nb = trainer.n_buffers
        params = task.params.to(trainer.device)
        trainer.load(params)
        base = params[nb:]
        kept = self.kept(trainer.model, base.cpu()).to(trainer.device)
        magnitude = base.abs()
        scores = (base * self.score_init).requires_grad_(True)
        opt = trainer.optimizer(params=[scores])
        loss_sum = 0.0
        with trainer.training(seed, "sign supermask training"):
            for batch in trainer.batches(data.n_samples, task.steps, seed):
                opt.zero_grad()
                straight_through = sign(scores).detach() + scores - scores.detach()  # value sign(s), gradient 1
                w = torch.where(kept, straight_through * magnitude, base)
                loss = task_loss(torch.func.functional_call(trainer.model, unflatten(trainer.model, w),
                                                            (data.x[batch],)), data.y[batch])
                loss.backward()
                opt.step()
                loss_sum += loss.item()
        mean_loss = loss_sum / max(task.steps, 1)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"training diverged (loss {mean_loss}); lower training.lr")
        result = trainer.flat.detach().clone()
        result[nb:] = torch.where(kept, sign(scores.detach()) * magnitude, base)
        return ClientResult(result, task.steps, mean_loss)

    # -- the server half ------------------------------------------------------------------------
    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        """The weighted vote of the clients' signs on the kept weights; buffers: the weighted mean."""
        nb = buffer_entries(server)
        current = server.params
        kept = self.kept(server.trainer.model, current[nb:])
        votes = torch.stack([sign(u.params[nb:]) for u in updates]).T @ sample_weights(updates)
        new_sign = torch.where(votes == 0, sign(current[nb:]), torch.sign(votes))
        new = current.clone()
        new[nb:] = torch.where(kept, new_sign * current[nb:].abs(), current[nb:])
        if nb:
            new[:nb] = weighted_mean(updates)[:nb]
        self._flipped = float((new_sign != sign(current[nb:]))[kept].double().mean()) if kept.any() else 0.0
        return new

    def counts(self, server: Server) -> tuple[int, int, int, int]:
        """(kept weights k, prunable weights P, other parameters, buffer entries) of ``server.params``."""
        nb = buffer_entries(server)
        candidates = prunable(server.trainer.model)
        k = int(self.kept(server.trainer.model, server.params[nb:]).sum())
        return k, int(candidates.sum()), int((~candidates).sum()), nb

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        """One bit per kept weight each way and the buffers as floats; a client's first task also downloads the
        pruned random model (module docstring, Bytes)."""
        k, n_prunable, other, nb = self.counts(server)
        size = server.params.element_size()
        signs = math.ceil(k / 8) + nb * size
        down = signs
        if task.client_id not in self._has_model:
            self._has_model.add(task.client_id)
            down += math.ceil(n_prunable / 8) + (k + other) * size
        return down, signs

    def describe_transfer(self, trainer) -> str:
        k = int(self.kept(trainer.model, self.initial_params(trainer)[trainer.n_buffers:]).sum())
        return f"{math.ceil(k / 8) / 1e3:.1f} kB of signs a transfer ({k} kept weights), the pruned model once"

    def forward_share(self, server: Server) -> float:
        """Sparse forward FLOPs / dense (module docstring, FLOPs), computed once: the kept set never changes."""
        if self._forward_share is None:
            kept = self.kept(server.trainer.model, server.params[buffer_entries(server):])
            self._forward_share = sparse_forward_share(server.trainer.model, self.input_shape(server.trainer), kept)
        return self._forward_share

    def task_flops(self, server: Server, task: Task) -> float:
        return super().task_flops(server, task) * self.forward_share(server)

    def metrics(self) -> dict[str, float]:
        """``hidenseek_flipped``: the share of the kept weights whose sign the last aggregation changed."""
        return {} if self._flipped is None else {"hidenseek_flipped": self._flipped}
