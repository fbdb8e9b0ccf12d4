"""FedConv: the server derives each client's smaller model from the global one by learned convolutions over the
weight tensors, and maps the trained small models back by learned transposed convolutions.

Shen, Yang, Cui, Zheng, Wei, Liu, Han, "FedConv: A Learning-on-Model Paradigm for Heterogeneous Federated
Clients", MobiSys 2024 (arXiv:2502.20639).

From the paper (and its authors' code, read for facts):

- Every client has a *shrinkage ratio* r from its resources (their code: ratios 0.75^k, k = 0, 1, 2); its model has
  every hidden width scaled by r (the input and the classes stay). r = 1 is the global model itself.
- *Convolutional compression.* A weight tensor of the global model, rows O (outputs) by columns C (inputs), becomes
  the sub-model's o = int(r O) by c = int(r C) tensor by a learned 2-d convolution over it with stride 1 and no
  padding, whose kernel is therefore (O - o + 1) x (C - c + 1); a convolution layer's weight (O, C, kh, kw) has one
  such kernel per kernel position (kh kw of them); a bias is a 1-d convolution of kernel O - o + 1. The first
  layer keeps its columns (the input), the last its rows (the classes). One set of compression kernels per size.
- *Transposed-convolutional dilation.* A trained sub-model is mapped back to the global shapes by transposed
  convolutions of the same kernel sizes: (o + O - o) x (c + C - c) = O x C.
- Both are learned on the server on a small public data set: the compression kernels minimise the cross-entropy of
  the compressed model on it, the dilation kernels that of the dilated model, by Adam.
- *Weighted aggregation.* The dilated models are averaged with weights learned on the public data, times the
  clients' sample counts.
- Clients train their sub-model as an ordinary model: nothing is decompressed on the device.

Our choices (hetfl's tiny CPU settings, one module):

- The convolution is the plain valid one: the paper's code adds a 1x1 convolution before it, weight normalisation
  and a leaky activation after it; we keep the linear map, which is what makes the hand-worked tests possible.
- Kernels start as a *delta* (1 at the corner, 0 elsewhere): compression then starts as slicing the first o rows
  and c columns (HeteroFL's static sub-model) and dilation as zero padding (a zero-padded sub-model computes the
  same function: padded units have zero weights and bias, ReLU(0) = 0). The paper starts from random kernels.
  ``server_steps: 0`` keeps them there: static slicing, the ablation the benchmark compares with.
- Dilation maps a sub-model's *change* back onto the global model it started from, W + D(w_i - C(W)), where the
  paper dilates the sub-model itself, D(w_i). With the delta start (and the few server steps hetfl affords), D(w_i)
  is the sub-model zero-padded, and averaging those shrinks every unit a small client lacks by that client's share
  each round: on ``benchmarks/fedconv.yaml`` the units beyond the smallest width fell to 1e-11 in 30 rounds (global
  accuracy 0.86 against 0.89 for FedAvg on the smallest model). With the change dilated, a unit a client lacks
  keeps its global value in that client's term (HeteroFL's effect, damped by the clients that lack it).
- Dilation kernels are one set per size (the paper's code keeps one per client), and the aggregation weights are one
  learned logit a_s per size: client i's weight is n_i exp(a_s(i)) / sum_j n_j exp(a_s(j)) (the paper's code learns
  one weight per element and client). a_s = 0 is FedAvg's sample-weighted mean.
- Learning is full-batch on the public samples, ``server_steps`` Adam steps per size and round, each kernel at
  ``server_lr`` over its number of entries (a sum over thousands of entries each moved by Adam's full step would
  wreck the model: the paper's code uses rate 0.001 with weight normalisation); the step of lowest public loss is
  kept (the paper's code keeps the best of its epochs). Kernels and logits carry over from round to round.
- The public data: ``public_samples`` samples of the validation split (``data.validation_fraction``), pooled over
  the clients' validation splits by ``hetfl run`` (:meth:`FedConv.set_public`) and never trained on by a client.
  With ``evaluation.split: validation`` they are also scored on: score on ``test``. A simulator built by hand
  without them (the conformance checks) keeps the delta kernels (static slicing).
- Sizes come from the devices: ``ratios`` is a list (by speed group, slowest first) or a map from compute tier.
- Models: chains of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers without BatchNorm (mlp, cnn, cnn1d, a
  user's model of that kind); a linear layer after a flattened convolution scales its columns by whole channels.

Cost (charged, not assumed): a task costs its sub-model's training FLOPs (the engine's step FLOPs times the
sub-model's share of the global model's forward FLOPs) and moves the sub-model's parameters down and up
(:meth:`FedConv.task_flops`, :meth:`FedConv.transfer_bytes`); the server's learning (a forward and backward pass
of the model on the public samples and of the convolutions, per step) is server work, timed where ``server.flops``
is set (compression at a round's dispatch, dilation and weights at its commit).

A client's personal model (``personal_acc_*``) is the sub-model it last trained, zero-padded to the global shapes
(the same function): the model that client uses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.errors import ConfigError
from hetfl.models.assign import by_tier, speed_groups
from hetfl.models.cost import BACKWARD_FACTOR, flops_per_sample
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection
from hetfl.training.local import LocalTrainer, task_loss

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# --------------------------------------------------------------------------- the arithmetic
@dataclass(frozen=True)
class Piece:
    """One parameter tensor: its name, its shape in the global model and in the sub-model, and both viewed as
    (rows, columns, positions): (O, C, K) and (o, c, K)."""

    name: str
    full: tuple[int, ...]
    small: tuple[int, ...]
    grid: tuple[int, int, int]
    sub: tuple[int, int, int]

    @property
    def kernel(self) -> tuple[int, int, int, int]:
        """The shape of its kernels: one (O - o + 1) x (C - c + 1) kernel per position."""
        (O, C, K), (o, c, _) = self.grid, self.sub
        return (K, 1, O - o + 1, C - c + 1)

    @property
    def numel(self) -> int:
        return math.prod(self.full)

    @property
    def small_numel(self) -> int:
        return math.prod(self.small)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]


def check_chain(model: nn.Module, label: str) -> None:
    """Refuse a model fedconv cannot scale: buffers, parameters outside linear/convolution layers, grouped
    convolutions, or a layer whose inputs are not whole multiples of the previous layer's outputs."""
    if any(b.is_floating_point() for b in model.buffers()):
        raise ConfigError(f"model.name: fedconv scales widths of linear and convolution layers, and {label} has "
                          "floating-point buffers (BatchNorm); use mlp, cnn or cnn1d")
    layers = _layers(model)
    expected = [f"{n}.{p}" if n else p for n, m in layers for p in ("weight", "bias") if getattr(m, p) is not None]
    names = [n for n, _ in model.named_parameters()]
    if not layers or names != expected:
        other = next((n for n in names if n not in expected), names[0] if names else "none")
        raise ConfigError(f"model.name: fedconv scales a chain of linear and convolution layers, and {label} has "
                          f"other parameters ({other}); use mlp, cnn or cnn1d")
    if len(layers) < 2:
        raise ConfigError(f"model.name: fedconv scales hidden widths, and {label} is one layer (no hidden width); "
                          "use mlp, cnn or cnn1d")
    previous = None
    for name, m in layers:
        if getattr(m, "groups", 1) != 1:
            raise ConfigError(f"model.name: fedconv does not scale grouped convolutions ({label}: {name})")
        width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if previous is not None and width % previous:
            raise ConfigError(f"model.name: fedconv scales a chain of layers, and {label}'s {name} takes {width} "
                              f"inputs, not a multiple of the previous layer's {previous} outputs")
        previous = m.out_features if isinstance(m, nn.Linear) else m.out_channels


def plan(model: nn.Module, ratio: float) -> list[Piece]:
    """Every parameter of ``model`` (a chain: :func:`check_chain`), in its flat order, scaled by ``ratio``: hidden
    widths int(ratio * width) (at least 1), the input and the last layer's outputs kept."""
    layers = _layers(model)
    pieces: list[Piece] = []
    prev_full = prev_small = None
    for j, (name, m) in enumerate(layers):
        linear = isinstance(m, nn.Linear)
        O = m.out_features if linear else m.out_channels
        o = O if j == len(layers) - 1 else max(1, int(ratio * O))
        width = m.in_features if linear else m.in_channels
        C, c = (width, width) if prev_full is None else (prev_full, prev_small)
        K = m.weight.numel() // (O * C)
        small_in = c * (width // C)  # a flattened convolution's positions stay
        small = (o, small_in, *m.weight.shape[2:])
        prefix = f"{name}." if name else ""
        pieces.append(Piece(prefix + "weight", tuple(m.weight.shape), small, (O, C, K), (o, c, K)))
        if m.bias is not None:
            pieces.append(Piece(prefix + "bias", (O,), (o,), (O, 1, 1), (o, 1, 1)))
        prev_full, prev_small = O, o
    return pieces


def sub_model(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``model`` with every layer replaced by its scaled one (:func:`plan`); global random state untouched."""
    small = copy.deepcopy(model)
    shapes = {p.name: p.small for p in plan(model, ratio)}
    with torch.random.fork_rng(devices=[]):
        for name, m in _layers(model):
            prefix = f"{name}." if name else ""
            o, c = shapes[prefix + "weight"][:2]
            bias = m.bias is not None
            if isinstance(m, nn.Linear):
                new: nn.Module = nn.Linear(c, o, bias=bias)
            else:
                new = type(m)(c, o, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, bias=bias, padding_mode=m.padding_mode)
            if not name:
                return new
            parent, _, child = name.rpartition(".")
            setattr(small.get_submodule(parent) if parent else small, child, new)
    return small


def delta_kernel(piece: Piece) -> torch.Tensor:
    """1 at each kernel's corner: compression slices the first o rows and c columns, dilation pads with zeros."""
    kernel = torch.zeros(piece.kernel)
    kernel[:, 0, 0, 0] = 1.0
    return kernel


def shrink(w: torch.Tensor, piece: Piece, kernel: torch.Tensor) -> torch.Tensor:
    """The compression of one global tensor: a valid convolution (stride 1, no padding), per position."""
    O, C, K = piece.grid
    grid = w.reshape(O, C, K).permute(2, 0, 1).unsqueeze(0)  # (1, K, O, C)
    out = F.conv2d(grid, kernel, groups=K)  # (1, K, o, c)
    return out.squeeze(0).permute(1, 2, 0).reshape(piece.small)


def dilate(w: torch.Tensor, piece: Piece, kernel: torch.Tensor) -> torch.Tensor:
    """The dilation of one sub-model tensor back to the global shape: the transposed convolution, per position."""
    o, c, K = piece.sub
    grid = w.reshape(o, c, K).permute(2, 0, 1).unsqueeze(0)  # (1, K, o, c)
    out = F.conv_transpose2d(grid, kernel, groups=K)  # (1, K, O, C)
    return out.squeeze(0).permute(1, 2, 0).reshape(piece.full)


def compress(flat: torch.Tensor, pieces: list[Piece], kernels: list[torch.Tensor]) -> torch.Tensor:
    """A global flat vector -> the sub-model's flat vector."""
    out, at = [], 0
    for piece, kernel in zip(pieces, kernels):
        out.append(shrink(flat[at : at + piece.numel], piece, kernel).reshape(-1))
        at += piece.numel
    return torch.cat(out)


def expand(flat: torch.Tensor, pieces: list[Piece], kernels: list[torch.Tensor]) -> torch.Tensor:
    """A sub-model's flat vector -> a global flat vector."""
    out, at = [], 0
    for piece, kernel in zip(pieces, kernels):
        out.append(dilate(flat[at : at + piece.small_numel], piece, kernel).reshape(-1))
        at += piece.small_numel
    return torch.cat(out)


def conv_flops(pieces: list[Piece]) -> float:
    """FLOPs of one compression (or dilation) of every tensor: a multiply and an add per kernel entry and output."""
    return float(sum(2 * piece.sub[0] * piece.sub[1] * piece.sub[2] * math.prod(piece.kernel[2:]) for piece in pieces))


def mixed(models: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The weighted aggregation: sum_i beta_i W_i with beta_i = n_i exp(a_i) / sum_j n_j exp(a_j) (``logits`` a_i:
    the logit of client i's size)."""
    beta = torch.softmax(logits + counts.log(), dim=0)
    return beta @ models


def _forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``model`` with the parameters ``flat`` (differentiable) on ``x``."""
    params, at = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[at : at + p.numel()].view_as(p)
        at += p.numel()
    return torch.func.functional_call(model, params, (x,))


# --------------------------------------------------------------------------- the strategy
class FedConv(RoundStrategy):
    """FedConv: sub-models by learned convolutions of the global model, mapped back by learned transposed
    convolutions, aggregated with learned per-size weights (Shen et al., arXiv:2502.20639).

    Parameters
    ----------
    ratios : list of float or dict of str to float, optional
        Each client's shrinkage ratio in (0, 1]: a list by device speed group (slowest first), or a map from compute
        tier. Default (0.5625, 0.75, 1.0): the paper's 0.75^k by speed group.
    public_samples : int, default 256
        Public samples the server learns on, pooled from the validation split (``data.validation_fraction``).
    server_steps : int, default 10
        Adam steps per round for each size's compression kernels, dilation kernels and the aggregation weights;
        0 keeps the delta kernels and the sample-weighted mean (static slicing and zero padding).
    server_lr : float, default 0.01
        The server's Adam learning rate.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedconv"
    personalised = True

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        ratios: list[float] | dict[str, float] | None = None,
        public_samples: int = 256,
        server_steps: int = 10,
        server_lr: float = 0.01,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        values = list(ratios.values()) if isinstance(ratios, dict) else list(ratios or [])
        if ratios is not None and (not values or not all(0 < r <= 1 for r in values)):
            raise ValueError(f"ratios must be shrinkage ratios in (0, 1], by speed group or by compute tier; got {ratios}")
        if public_samples < 0 or server_steps < 0 or server_lr <= 0:
            raise ValueError("public_samples and server_steps must be at least 0, server_lr positive")
        self.ratios = ratios if ratios is not None else [0.5625, 0.75, 1.0]
        self.public_samples, self.server_steps, self.server_lr = public_samples, server_steps, server_lr
        self._public: tuple[torch.Tensor, torch.Tensor] | None = None
        self._client_ratio: np.ndarray | None = None
        self._shrink: dict[float, list[torch.Tensor]] = {}  # per ratio < 1, per tensor
        self._dilate: dict[float, list[torch.Tensor]] = {}
        self._logits: dict[float, float] = {}  # aggregation logit a_s per ratio
        self._sent: tuple[int, dict[float, torch.Tensor]] | None = None  # (version, sub-model per ratio)
        self._forward: dict[float, float] = {}  # forward FLOPs of a sample through each size's model
        self._commit_flops = 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def set_public(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The server's public samples (``hetfl run`` hands it ``public_samples`` of the validation split)."""
        self._public = (x[: self.public_samples].float(), y[: self.public_samples])

    def check_models(self, trainers) -> None:
        for t in trainers:
            check_chain(t.model, t.label)

    def resolve_ratios(self, profiles) -> np.ndarray:
        if isinstance(self.ratios, dict):
            return np.array(by_tier(profiles, self.ratios, "strategy.params.ratios", "shrinkage ratio"), dtype=float)
        return np.asarray(self.ratios, dtype=float)[speed_groups(profiles, len(self.ratios))]

    def check_devices(self, profiles) -> None:
        self.resolve_ratios(profiles)

    def ratio_of(self, server: Server, client_id: int) -> float:
        if self._client_ratio is None:
            self._client_ratio = self.resolve_ratios(server.profiles)
        return float(self._client_ratio[client_id])

    def kernels(self, trainer, ratio: float, table: dict[float, list[torch.Tensor]]) -> list[torch.Tensor]:
        if ratio not in table:
            table[ratio] = [delta_kernel(p) for p in plan(trainer.model, ratio)]
        return table[ratio]

    # -- the server's learning ------------------------------------------------------------------
    def learn(self, params: list[torch.Tensor], loss_of, forward_flops: float) -> float:
        """``server_steps`` Adam steps on ``params`` minimising ``loss_of()``, each tensor at ``server_lr`` over the
        entries of one of its kernels (its last two dimensions: a kernel's output sums them all, so each entry moves
        that much less); the values of the step with the lowest loss are kept (the first included, so learning never
        makes the public loss worse). Returns the server's FLOPs: per step ``forward_flops`` (what ``loss_of``
        computes) times the backward factor, and one last forward pass. Nothing without public samples."""
        if self._public is None or not self.server_steps:
            return 0.0
        groups = [{"params": [p], "lr": self.server_lr / math.prod(p.shape[-2:])} for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        best, kept = math.inf, [p.detach().clone() for p in params]
        for step in range(self.server_steps + 1):
            opt.zero_grad()
            loss = loss_of()
            if float(loss.detach()) < best:
                best, kept = float(loss.detach()), [p.detach().clone() for p in params]
            if step == self.server_steps:
                break
            loss.backward()
            opt.step()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.requires_grad_(False)
                p.grad = None
                p.copy_(value)
        return (self.server_steps * BACKWARD_FACTOR + 1) * forward_flops

    def public_loss(self, model: nn.Module, flat: torch.Tensor) -> torch.Tensor:
        x, y = self._public
        return task_loss(_forward(model, flat, x), y)

    def forward_flops(self, trainer, ratio: float) -> float:
        """Forward FLOPs of one sample through the ``ratio`` sub-model (1: the global model), counted once."""
        if ratio not in self._forward:
            model = trainer.model if ratio == 1.0 else sub_model(trainer.model, ratio)
            self._forward[ratio] = flops_per_sample(model, self.input_shape(trainer))
        return self._forward[ratio]

    def forward_share(self, trainer, ratio: float) -> float:
        """Forward FLOPs of the ``ratio`` sub-model over the global model's."""
        full = self.forward_flops(trainer, 1.0)
        return self.forward_flops(trainer, ratio) / full if full else 1.0

    @staticmethod
    def input_shape(trainer) -> tuple[int, ...]:
        if getattr(trainer, "input_shape", None) is not None:
            return tuple(trainer.input_shape)
        first = _layers(trainer.model)[0][1]
        if not isinstance(first, nn.Linear):
            raise ConfigError(f"fedconv needs the input's shape to count {trainer.label}'s FLOPs")
        return (first.in_features,)

    def sub_models(self, server: Server) -> dict[float, torch.Tensor]:
        """Each size's sub-model of the current global model, the compression kernels learned first (once per
        version: a round's dispatches share it)."""
        if self._sent is not None and self._sent[0] == server.version:
            return self._sent[1]
        trainer, ratios = server.trainer, sorted({self.ratio_of(server, c) for c in range(server.n_clients)})
        out, flops = {}, 0.0
        for r in ratios:
            if r == 1.0:
                continue
            pieces, kernels = plan(trainer.model, r), self.kernels(trainer, r, self._shrink)
            small = sub_model(trainer.model, r)
            if self._public is not None:
                forward = len(self._public[1]) * self.forward_flops(trainer, r) + conv_flops(pieces)
                flops += self.learn(kernels, lambda: self.public_loss(small, compress(server.params, pieces, kernels)),
                                    forward)
            with torch.no_grad():
                out[r] = compress(server.params, pieces, kernels)
        server.server_work(flops)
        self._sent = (server.version, out)
        return out

    # -- dispatch, the client half, cost ---------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        r = self.ratio_of(server, client_id)
        subs = self.sub_models(server)
        return {"options": {"ratio": r}, "payload": {"model": subs[r]} if r < 1.0 else {}}

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        r = float(task.options.get("ratio", 1.0))
        if r == 1.0:
            result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed)
        else:
            small = LocalTrainer(sub_model(trainer.model, r), trainer.cfg, f"{trainer.label} x{r:g}")
            result = small.train(task.payload["model"], data.x, data.y, steps=task.steps, seed=seed)
        state["model"], state["ratio"] = result.params.clone(), r
        return ClientResult(result.params, result.steps, result.loss, stats={"ratio": r})

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        """The client's last trained sub-model, zero-padded to the global shapes (the same function)."""
        if "model" not in state:
            return None
        r = state["ratio"]
        if r == 1.0:
            return state["model"]
        pieces = plan(trainer.model, r)
        return expand(state["model"], pieces, [delta_kernel(p) for p in pieces])

    def task_flops(self, server: Server, task: Task) -> float:
        return super().task_flops(server, task) * self.forward_share(server.trainer, float(task.options["ratio"]))

    def upload_reference(self, server: Server, task: Task) -> torch.Tensor:
        """The sub-model the client was sent (the global model itself at ratio 1): what it trains and sends back."""
        return task.params if float(task.options.get("ratio", 1.0)) == 1.0 else task.payload["model"]

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        sub = task.payload.get("model", server.params)
        size = sub.numel() * sub.element_size()
        return size, size

    def describe_transfer(self, trainer) -> str:
        values = list(self.ratios.values()) if isinstance(self.ratios, dict) else list(self.ratios)
        sizes = [sum(p.small_numel for p in plan(trainer.model, r)) * 4 / 1e3 for r in (min(values), max(values))]
        return f"sub-models of {sizes[0]:.1f}-{sizes[1]:.1f} kB each way (ratios {min(values):g}-{max(values):g})"

    # -- aggregation --------------------------------------------------------------------------------
    @staticmethod
    def dilated(update: Update, pieces: list[Piece], kernels: list[torch.Tensor]) -> torch.Tensor:
        """The global-shaped model of a sub-model's update: the global model it started from plus its change
        dilated (module docstring)."""
        return update.task.params + expand(update.params - update.task.payload["model"], pieces, kernels)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        trainer = server.trainer
        model, n_public = trainer.model, 0 if self._public is None else len(self._public[1])
        full_forward = self.forward_flops(trainer, 1.0) if n_public and self.server_steps else 0.0
        self._commit_flops = 0.0
        ratios = [float(u.task.options["ratio"]) for u in updates]
        for r in sorted(set(ratios) - {1.0}):
            pieces, kernels = plan(model, r), self.kernels(trainer, r, self._dilate)
            mine = [u for u, ur in zip(updates, ratios) if ur == r]
            self._commit_flops += self.learn(
                kernels, lambda: torch.stack([self.public_loss(model, self.dilated(u, pieces, kernels)) for u in mine]).mean(),
                len(mine) * (n_public * full_forward + conv_flops(pieces)))
        with torch.no_grad():
            models = torch.stack([
                u.params if r == 1.0 else self.dilated(u, plan(model, r), self.kernels(trainer, r, self._dilate))
                for u, r in zip(updates, ratios)
            ])
        counts = torch.tensor([float(u.n_samples) for u in updates])
        sizes = sorted(set(ratios))
        logits = torch.tensor([self._logits.get(r, 0.0) for r in sizes])
        which = torch.tensor([sizes.index(r) for r in ratios])
        if len(sizes) > 1:
            self._commit_flops += self.learn(
                [logits], lambda: self.public_loss(model, mixed(models, counts, logits[which])),
                n_public * full_forward + 2.0 * models.numel())
            self._logits.update({r: float(a) for r, a in zip(sizes, logits)})
        with torch.no_grad():
            return mixed(models, counts, logits[which])

    def server_flops(self, server: Server, updates: list[Update]) -> float:
        """The weighted mean (a multiply and an add per parameter and update) plus this commit's learning."""
        flops, self._commit_flops = self._commit_flops, 0.0
        return 2.0 * server.params.numel() * len(updates) + flops

    def metrics(self) -> dict[str, float]:
        """``fedconv_weight_<ratio>``: the learned aggregation logit of each size (0: the sample-weighted mean)."""
        return {**super().metrics(), **{f"fedconv_weight_{r:g}": a for r, a in sorted(self._logits.items())}}
