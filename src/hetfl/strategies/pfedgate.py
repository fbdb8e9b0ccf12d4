"""pFedGate: each client adapts the shared global model into a sparse personal one with a small gating layer.

Chen, Yao, Gao, Ding and Li, "Efficient Personalized Federated Learning via Sparse Model-Adaptation",
ICML 2023 (arXiv:2305.02776). The global model w is cut into blocks; client i keeps a private gating
layer phi_i that maps a batch x to one weight per block, and uses the personal model

    w_i(x) = w ⊙ m_i(x),     m_i(x)_b = g_b(x) * [b in K_i(x)],     g(x) = mean_over_batch sigmoid(BN(A x + c)),

where K_i(x) is the set of blocks kept within the client's budget, sum_{b in K} |b| <= s_i * sum_b |b|
(the paper: a knapsack maximising the kept gate values). A task trains w and phi_i jointly on the
client's loss, every step

    w     <- w     - eta   * d/dw     CE(f(x; w ⊙ m(x)), y)      (the trainer's optimiser)
    phi_i <- phi_i - eta_g * d/dphi_i CE(f(x; w ⊙ m(x)), y)      (SGD, gradient norm clipped at 10)

and sends back the dense w; phi_i stays on the client. The server averages the w's as FedAvg,
w <- sum_i p_i w_i, p_i = n_i / sum_j n_j (the paper aggregates the dense global model). A block
outside K_i(x) gets no gradient at that step (its entries of w are multiplied by 0), so a client
moves mostly the blocks its gate keeps (momentum and weight decay, inside the optimiser, still move
the others). The authors also clip the model's gradient norm at 10; we keep the trainer's step as
it is for every algorithm.

hetfl's choices where the paper leaves room or our interface asks for one:

- Blocks: one per output unit: a row of an ``nn.Linear`` weight with its bias entry, one output
  channel of an ``nn.Conv2d`` with its bias (:func:`block_map`). A dropped block is a removed neuron or
  filter, so the sparse model is a smaller dense one. The paper splits each parameter tensor into a
  few equal contiguous chunks instead. The classifier head (the last ``nn.Linear``) is kept dense by
  default (``dense_head``): zeroing a head row would silence a class. Parameters of any other layer
  are kept dense too.
- Selection (:func:`select_blocks`): greedy, as the authors' code solves the knapsack: blocks in
  order of decreasing gate (ties: lower index first), each kept if it still fits the budget (a block
  that does not fit is skipped and smaller ones after it may still be kept). First, each gated layer
  keeps its highest-gate block, so no layer is cut off entirely (the paper always keeps the first
  chunk of every tensor for the same reason). ``sparsity`` is the share of the gated (non-dense)
  parameters kept; every client has the same budget (the client half does not see its device, so
  the paper's per-client s_i from resources is not modelled).
- The gate: one linear layer from the flattened input (token ids as floats for text) to one logit
  per block, normalised over the batch (a batch norm without running statistics, with a learnt scale
  and shift per block: the paper's BatchNorm1d on the gate outputs), then sigmoid and the mean over
  the batch: one weight per block for the whole batch. The paper also normalises the input
  (switchable norm); we rely on the dataset's own normalisation. The logits' shift starts at
  ``gate_shift``: 2 by default (gates near 0.85), where the authors' code has 0 (gates near 0.5);
  see the parameter for why 2, with ``gate_lr`` 1, trains much faster on models without batch norm.
- Evaluation (``personal_params``): the gate's output on the client's whole training set, so one
  sparse model per client, ``w ⊙ m_i(X_train)``; a client that never trained uses the global model.
- Cost (``charge: sparse``, :meth:`PFedGate.task_flops`): a task is charged its sparse model and its gate, as
  hardware that skips the removed units would compute them (our simulation multiplies by zeros, so its wall
  time does not shrink; the simulated time and ``train_flops`` do). Every ``nn.Linear`` and ``nn.Conv2d`` i has
  dense forward FLOPs F_i per sample (:func:`layer_costs`: torch's ``FlopCounterMode``, as
  :mod:`hetfl.models.cost`, 2 per multiply-add); a Linear's and a (groups 1) convolution's are bilinear in its
  input and output units, so when gated layer l keeps the share k_l of its units, layer i costs
  ``F_i * k_out(i) * k_in(i)``: k_out the share its own gate keeps (1 for the dense head), k_in the share kept
  of the gated layer that feeds it (1 if none): a removed neuron or filter also removes an input of the next
  layer. "Feeds" is checked on the model, not assumed (:func:`feeds`): the layer called just before it,
  both called once, whose removed units reach its input as whole zero columns (channels), in proportion:
  true through ReLU, pooling and flattening (hetfl's MLP and CNN), false through a residual sum or a sigmoid,
  which are then charged in full. Everything else (``rest``: attention products, a layer called twice) is
  charged in full, and the gate, ``Linear(inputs, blocks)``, is charged its forward pass
  ``2 * inputs * blocks``. A step costs :data:`~hetfl.models.cost.BACKWARD_FACTOR` (3) times the forward FLOPs
  of the batch, as every step in hetfl; the task costs the engine's dense price (``server.step_flops``, the
  steps) times ``(sparse forward + gate forward) / dense forward``. The kept shares are decided on the client
  during the task, per batch, while the engine prices a task at dispatch: the client reports the mean over its
  steps of each gated layer's kept share (``pfedgate_kept_<l>`` in the update's stats), the server keeps the
  last one per client, and a client's first task is charged ``sparsity`` for every gated layer (the budget
  spread evenly). So the charge is exact for a kept set the client keeps at every step and, when the set
  varies, the formula applied to the mean shares. Worked example: MLP 4 -> 6 -> 5 -> 3, dense head, 11
  blocks; dense forward 2 * (4*6 + 6*5 + 5*3) = 138. Keeping 3 of 6 and 2 of 5 units: 48 * 1/2 + 60 * 2/5 *
  1/2 + 30 * 2/5 = 2 * (4*3 + 3*2 + 2*3) = 48; the gate 2 * 4 * 11 = 88; a step of batch 2 costs 3 * 2 *
  (48 + 88) = 816 FLOPs against FedAvg's 3 * 2 * 138 = 828. One block per output unit makes the gate about
  as large as the model's first layer (the paper's chunks are fewer), so on small MLPs it eats the saving:
  see docs/benchmarks.md. ``charge: dense`` charges a task what FedAvg's costs (the dense model's steps, no
  gate). Bytes: the engine counts the dense model both ways.
- The dense global model (``accuracy``, ``client_acc_mean``) is evaluated without any gate; it was
  trained only through gated, sparse forward passes, so the personal accuracy is the meaningful one.
- Buffers (BatchNorm's running statistics, the first entries of the flat vector; never gated): each client
  keeps its own (``state["buffers"]``, next to its gate), since they are statistics of its own sparse model's
  activations; a task starts from the global parameters with the client's own buffers (the global ones the
  first time), and the personal model uses them. The global vector's buffers are the sample-weighted mean of
  the returned ones, with the parameters.
- A model of one's own needs a classifier head (the head protocol of :mod:`hetfl.models.zoo`) with
  ``dense_head``; without it, any model whose gated layers are ``nn.Linear`` and ``nn.Conv2d`` works.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from hetfl.errors import ConfigError, DivergedError
from hetfl.models.cost import flops_per_sample
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection
from hetfl.training.local import classifier_head, federated_buffers


# -- blocks of the flat parameter vector ----------------------------------------------------------
@dataclass(frozen=True)
class BlockMap:
    """Blocks of a model's flat parameter vector.

    ``ids[j]``: the block of flat entry j (``n_blocks`` for entries kept dense); ``sizes[b]``: entries
    of block b; ``layer[b]``: the index of the layer (module) block b belongs to.
    """

    ids: torch.Tensor
    sizes: torch.Tensor
    layer: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return int(self.sizes.numel())


def gated_layers(model: nn.Module, *, dense_head: bool = True) -> list[nn.Module]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of the model, in ``model.modules()`` order, but the classifier head
    (``model.head``) if ``dense_head``: layer l of :class:`BlockMap`'s ``layer``."""
    head = classifier_head(model) if dense_head else None
    if dense_head and head is None:
        raise ValueError(f"{type(model).__name__} has no classifier head (model.head) to keep dense")
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not head]


def block_map(model: nn.Module, *, dense_head: bool = True) -> BlockMap:
    """One block per output unit of every ``nn.Linear`` and ``nn.Conv2d`` (weight row or filter, with its
    bias entry), over the trainer's flat vector (the model's floating-point buffers, then its parameters in
    ``model.parameters()`` order); the classifier head (``model.head``, the head protocol of
    :mod:`hetfl.models.zoo`) is dense if ``dense_head``, and so are the buffers and every parameter of another
    kind of layer."""
    offset = sum(b.numel() for _, b in federated_buffers(model))
    offsets = {}
    for p in model.parameters():
        offsets[id(p)] = offset
        offset += p.numel()
    gated = gated_layers(model, dense_head=dense_head)
    ids = torch.full((offset,), -1, dtype=torch.long)  # -1: dense, renumbered below
    sizes, layer = [], []
    for index, module in enumerate(gated):
        units = module.weight.shape[0]
        first = len(sizes)
        for p in (module.weight, module.bias):
            if p is None:
                continue
            start = offsets[id(p)]
            ids[start : start + p.numel()] = first + torch.arange(units).repeat_interleave(p.numel() // units)
        per_unit = (module.weight.numel() + (units if module.bias is not None else 0)) // units
        sizes += [per_unit] * units
        layer += [index] * units
    ids[ids < 0] = len(sizes)
    return BlockMap(ids, torch.tensor(sizes, dtype=torch.long), torch.tensor(layer, dtype=torch.long))


_BLOCK_MAPS: dict[tuple, BlockMap] = {}


def architecture_key(model: nn.Module, *extra: Any) -> tuple:
    """What identifies an architecture for the caches here: its parameters' and buffers' names and shapes."""
    return (tuple((name, tuple(p.shape)) for name, p in model.named_parameters()),
            tuple((name, tuple(b.shape)) for name, b in federated_buffers(model)), *extra)


def cached_block_map(model: nn.Module, *, dense_head: bool = True) -> BlockMap:
    """:func:`block_map`, computed once per architecture (parameter names and shapes)."""
    key = architecture_key(model, dense_head)
    if key not in _BLOCK_MAPS:
        _BLOCK_MAPS[key] = block_map(model, dense_head=dense_head)
    return _BLOCK_MAPS[key]


def select_blocks(gates: torch.Tensor, sizes: torch.Tensor, layer: torch.Tensor, capacity: float) -> torch.Tensor:
    """The blocks kept (a boolean mask): first the highest-gate block of each layer, then, in order of
    decreasing gate (ties: lower index first), every block that still fits in ``capacity`` entries."""
    order = torch.argsort(gates, descending=True, stable=True).tolist()
    size, of_layer = sizes.tolist(), layer.tolist()
    keep, used, covered = [False] * len(size), 0, set()
    for b in order:  # the first block met of each layer is its highest-gate one
        if of_layer[b] not in covered:
            covered.add(of_layer[b])
            keep[b], used = True, used + size[b]
    for b in order:
        if not keep[b] and used + size[b] <= capacity:
            keep[b], used = True, used + size[b]
    return torch.tensor(keep, dtype=torch.bool)


def entry_scale(gates: torch.Tensor, keep: torch.Tensor, blocks: BlockMap) -> torch.Tensor:
    """m over the flat vector: each entry's block gate if the block is kept, 0 if not, 1 if dense."""
    return torch.cat([gates * keep, torch.ones(1)])[blocks.ids]


def masked_forward(model: nn.Module, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's output with parameters ``w ⊙ scale`` (w: the model's own, as a flat vector whose buffer entries
    ``scale`` skips: the buffers are the model's own); gradients reach both the model's parameters and ``scale``."""
    params, offset = {}, sum(b.numel() for _, b in federated_buffers(model))
    for name, p in model.named_parameters():
        params[name] = p * scale[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return torch.func.functional_call(model, params, (x,))


KEPT = "pfedgate_kept_"
"""A task's stats: ``pfedgate_kept_<l>``, the mean over its steps of the share of gated layer l's units kept."""


class Gate(nn.Module):
    """The client's gating layer: g(x) = mean over the batch of sigmoid(scale * normalise(A x + c) + shift).

    ``normalise`` standardises each block's logit over the batch (a batch norm without running
    statistics; a single sample gives sigmoid(shift)).
    """

    def __init__(
        self, in_features: int, n_blocks: int, generator: torch.Generator | None = None, shift: float = 0.0
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, n_blocks)
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, from our own stream
        with torch.no_grad():
            self.linear.weight.copy_((torch.rand(n_blocks, in_features, generator=generator) * 2 - 1) * bound)
            self.linear.bias.copy_((torch.rand(n_blocks, generator=generator) * 2 - 1) * bound)
        self.scale = nn.Parameter(torch.ones(n_blocks))
        self.shift = nn.Parameter(torch.full((n_blocks,), float(shift)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1).float())
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        return torch.sigmoid(self.scale * z + self.shift).mean(0)


# -- what a task costs (module docstring, Cost) ---------------------------------------------------
@dataclass(frozen=True)
class LayerCosts:
    """Forward FLOPs of one sample, split by what the gate removes.

    Layer i (every ``nn.Linear`` and ``nn.Conv2d``, the dense head included, in ``model.modules()`` order) costs
    ``flops[i]`` dense; its output units are gated layer ``out[i]``'s (-1: kept dense) and its input units gated
    layer ``feed[i]``'s outputs (-1: none, or not known: charged in full). ``rest``: every other FLOP of the
    forward pass; ``gate``: the gate's forward pass. All as :class:`~torch.utils.flop_counter.FlopCounterMode`
    counts them (2 per multiply-add).
    """

    flops: tuple[float, ...]
    out: tuple[int, ...]
    feed: tuple[int, ...]
    rest: float
    gate: float

    @property
    def dense(self) -> float:
        """The dense model's forward FLOPs (what ``server.step_flops`` prices), without the gate."""
        return self.rest + sum(self.flops)

    def forward(self, kept: Sequence[float]) -> float:
        """The sparse model's forward FLOPs when gated layer l keeps the share ``kept[l]`` of its units:
        ``rest + sum_i flops[i] * k[out[i]] * k[feed[i]]`` with k = 1 for -1 (without the gate)."""
        k = [*(float(v) for v in kept), 1.0]
        return self.rest + sum(f * k[o] * k[i] for f, o, i in zip(self.flops, self.out, self.feed))


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def feeds(model: nn.Module, sample: torch.Tensor, a: nn.Module, b: nn.Module) -> bool:
    """Whether removing output units of layer ``a`` removes the same share of layer ``b``'s input units (columns
    of an ``nn.Linear``'s input, channels of an ``nn.Conv2d``'s), each unit as many: ``a``'s outputs are
    replaced by 0 for its even units and 1 for the others, and ``b``'s input must then be 0 in whole input units,
    exactly ``in(b) * removed / units(a)`` of them, and nowhere else. True through element-wise activations
    that keep 0 at 0 (ReLU), pooling and flattening; false through a residual sum, a sigmoid, a normalisation
    that shifts (BatchNorm in eval mode), or a grouped convolution ``b``."""
    units, width = _units(a), _width(b)
    if (isinstance(b, nn.Conv2d) and b.groups != 1) or width % units:
        return False
    cut = torch.arange(units) % 2 == 0
    seen: list[torch.Tensor] = []

    def replace(module, args, out):
        shape = [1] * out.dim()
        shape[-1 if isinstance(a, nn.Linear) else 1] = units
        return torch.ones_like(out) * (~cut).to(out.dtype).view(shape)

    hooks = [a.register_forward_hook(replace), b.register_forward_pre_hook(lambda module, args: seen.append(args[0]))]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen) != 1:
        return False
    x = seen[0]
    columns = x.reshape(-1, width) if isinstance(b, nn.Linear) else x.transpose(0, 1).reshape(width, -1).T
    zero = columns == 0
    gone = int(zero.all(0).sum())
    return int(zero.sum()) == gone * columns.shape[0] and gone * units == width * int(cut.sum())


def layer_costs(
    model: nn.Module, input_shape: Sequence[int], *, token_input: bool = False, dense_head: bool = True
) -> LayerCosts:
    """The model's :class:`LayerCosts` for one sample of ``input_shape``: each layer's FLOPs from one forward
    pass under :class:`~torch.utils.flop_counter.FlopCounterMode` (as :func:`hetfl.models.cost.flops_per_sample`),
    in ``eval`` mode; layer b's inputs are gated layer a's outputs when a is the layer called just before b, both
    are called once, and :func:`feeds` holds on a sample of uniform noise (zeros for token ids)."""
    gated = gated_layers(model, dense_head=dense_head)
    index = {id(m): l for l, m in enumerate(gated)}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    calls: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, args, out: calls.append(module)) for _, m in layers]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(torch.zeros((1, *input_shape), dtype=torch.long if token_input else torch.float32))
        for hook in hooks:
            hook.remove()
        probe = (torch.zeros((1, *input_shape), dtype=torch.long) if token_input
                 else torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)))
        counts = counter.get_flop_counts()
        root = type(model).__name__
        flops = tuple(float(sum(counts.get(f"{root}.{name}", {}).values())) for name, _ in layers)
        feed = []
        for _, b in layers:
            at = [i for i, m in enumerate(calls) if m is b]
            a = calls[at[0] - 1] if len(at) == 1 and at[0] > 0 else None
            once = a is not None and sum(m is a for m in calls) == 1
            feed.append(index[id(a)] if once and id(a) in index and feeds(model, probe, a, b) else -1)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    gate = 0.0
    if gated:
        with torch.random.fork_rng(devices=[]):  # a gate only to count: torch's global stream stays as it was
            counted = Gate(math.prod(input_shape), sum(_units(m) for m in gated))
        gate = flops_per_sample(counted, tuple(input_shape), token_input)
    return LayerCosts(flops, tuple(index.get(id(m), -1) for _, m in layers), tuple(feed),
                      float(counter.get_total_flops()) - sum(flops), gate)


_LAYER_COSTS: dict[tuple, LayerCosts] = {}


def cached_layer_costs(
    model: nn.Module, input_shape: Sequence[int], *, token_input: bool = False, dense_head: bool = True
) -> LayerCosts:
    """:func:`layer_costs`, computed once per architecture and sample shape, on a copy of ``model`` (whose hooks no
    training of the original, in another thread, can meet)."""
    key = architecture_key(model, tuple(input_shape), token_input, dense_head)
    if key not in _LAYER_COSTS:
        _LAYER_COSTS[key] = layer_costs(copy.deepcopy(model), input_shape, token_input=token_input,
                                        dense_head=dense_head)
    return _LAYER_COSTS[key]


def kept_shares(keep: torch.Tensor, blocks: BlockMap) -> torch.Tensor:
    """The share of each gated layer's units (blocks) that ``keep`` keeps."""
    n_layers = int(blocks.layer.max()) + 1
    kept = torch.bincount(blocks.layer[keep], minlength=n_layers).double()
    return kept / torch.bincount(blocks.layer, minlength=n_layers).double()


# -- the algorithm --------------------------------------------------------------------------------
class PFedGate(RoundStrategy):
    """FedAvg on the dense global model; each client trains a private gate that makes it sparse and personal.

    Parameters
    ----------
    sparsity : float, default 0.5
        The budget s: share of the gated parameters (all but the dense head) a client's model keeps,
        in (0, 1]. 0.5 is the paper's main setting (it also reports 0.3 and 1).
    gate_lr : float, default 1.0
        SGD learning rate of the gating layer. The authors' scripts use 0.1 (their sweep spans 0.01 to
        1.5); 1.0 with ``gate_shift`` 2 is hetfl's default for the zoo's models (see ``gate_shift``).
    gate_clip : float, default 10.0
        Largest norm of the gate's gradient per step (the authors' code clips at 10).
    gate_shift : float, default 2.0
        Initial shift of every gate logit (after the normalisation), so gates start near
        sigmoid(gate_shift). 0 (about 0.5) is the authors' code (their batch norm's initial bias). Their
        models have batch norm, which undoes a channel's scale; ours do not, so a gate of 0.5 halves
        every gated layer's output and slows training. 2 (gates near 0.85), with ``gate_lr`` 1, learns
        much faster on the zoo's models: on digits, Dirichlet 0.1, 10 clients, 15 rounds, personal
        accuracy 0.89 / 0.95 / 0.92 (seeds 0-2) against 0.57 / 0.66 / 0.56 with the authors' 0 and 0.1.
    dense_head : bool, default True
        Keep the classifier head (the last linear layer) dense; False gates its rows (classes) too,
        which logreg, all head, needs.
    charge : {"sparse", "dense"}, default "sparse"
        What a task costs (its simulated compute time and ``train_flops``): ``sparse``, the sparse model
        the client's gate kept in its previous task and the gate itself (module docstring, Cost);
        ``dense``, the dense model's steps as FedAvg's (hetfl before the sparse model was priced), for
        comparison.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "pfedgate"
    personalised = True

    def __init__(
        self,
        *,
        sparsity: float = 0.5,
        gate_lr: float = 1.0,
        gate_clip: float = 10.0,
        gate_shift: float = 2.0,
        dense_head: bool = True,
        charge: Literal["sparse", "dense"] = "sparse",
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if not 0 < sparsity <= 1:
            raise ValueError("sparsity must be in (0, 1]: the share of the model's parameters a client keeps")
        if gate_lr <= 0:
            raise ValueError("gate_lr must be positive")
        if gate_clip <= 0:
            raise ValueError("gate_clip must be positive")
        if charge not in ("sparse", "dense"):
            raise ValueError("charge must be sparse (the kept sub-model and the gate) or dense (FedAvg's steps)")
        self.sparsity = sparsity
        self.gate_lr = gate_lr
        self.gate_clip = gate_clip
        self.gate_shift = gate_shift
        self.dense_head = dense_head
        self.charge = charge
        self._density: float | None = None
        self._kept: dict[int, tuple[float, ...]] = {}  # per client: each gated layer's kept share, last task

    def check_model(self, model_name: str) -> None:
        if model_name == "logreg" and self.dense_head:
            raise ConfigError(
                "model.name: pfedgate gates the layers before the classifier head, and logreg is the head alone; "
                "use mlp or cnn, or set strategy.params.dense_head: false to gate the classes"
            )

    def check_models(self, trainers) -> None:
        if self.dense_head:
            for trainer in trainers:
                trainer.require_head(f"{self.name} (dense_head: true)")

    def with_own_buffers(self, trainer, params: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``params`` with the client's own buffers, if it has kept any."""
        if "buffers" not in state:
            return params
        mixed = params.clone()
        mixed[trainer.buffer_slice] = state["buffers"]
        return mixed

    # -- the client half ------------------------------------------------------------------------
    def blocks(self, trainer) -> BlockMap:
        return cached_block_map(trainer.model, dense_head=self.dense_head)

    def capacity(self, blocks: BlockMap) -> float:
        """Entries the budget allows; refuses a budget smaller than one block per gated layer."""
        capacity = self.sparsity * float(blocks.sizes.sum())
        smallest = sum(int(blocks.sizes[blocks.layer == k].min()) for k in blocks.layer.unique())
        if smallest > capacity:
            raise ConfigError(
                f"strategy.params.sparsity: {self.sparsity} keeps fewer parameters ({capacity:.0f}) than one unit "
                f"of every gated layer of this model ({smallest}); raise it"
            )
        return capacity

    def gate(self, blocks: BlockMap, data: ClientData, state: dict[str, Any], seed: int) -> Gate:
        """The client's gate from its ``state``; a fresh one (seeded by the task) the first time."""
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))
        gate = Gate(data.x.flatten(1).shape[1], blocks.n_blocks, generator, self.gate_shift)
        if "gate" in state:
            gate.load_state_dict(state["gate"])
        return gate

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        blocks = self.blocks(trainer)
        if not blocks.n_blocks:  # nothing to gate (logreg with a dense head): FedAvg's task
            return super().client_train(trainer, task, data, state, seed)
        capacity = self.capacity(blocks)
        gate = self.gate(blocks, data, state, seed)
        trainer.load(self.with_own_buffers(trainer, task.params, state))
        opt, gate_opt = trainer.optimizer(), torch.optim.SGD(gate.parameters(), lr=self.gate_lr)
        total = float(blocks.sizes.sum())
        loss_sum, kept_sum, shares = 0.0, 0.0, torch.zeros(int(blocks.layer.max()) + 1, dtype=torch.float64)
        with trainer.training(seed, "gated training"):
            for batch in trainer.batches(data.n_samples, task.steps, seed):
                x, y = data.x[batch], data.y[batch]
                trainer.grad.zero_()
                gate_opt.zero_grad()
                gates = gate(x)
                keep = select_blocks(gates.detach(), blocks.sizes, blocks.layer, capacity)
                loss = F.cross_entropy(masked_forward(trainer.model, entry_scale(gates, keep, blocks), x), y)
                loss.backward()
                nn.utils.clip_grad_norm_(gate.parameters(), self.gate_clip)
                opt.step()
                gate_opt.step()
                loss_sum += loss.item()
                kept_sum += float(blocks.sizes[keep].sum()) / total
                shares += kept_shares(keep, blocks)
        steps = max(task.steps, 1)
        if not math.isfinite(loss_sum) or not torch.isfinite(trainer.flat).all():
            raise DivergedError(
                f"training diverged (loss {loss_sum / steps}); lower training.lr or strategy.params.gate_lr"
            )
        state["gate"] = {k: v.detach().clone() for k, v in gate.state_dict().items()}
        if trainer.n_buffers:
            state["buffers"] = trainer.flat[trainer.buffer_slice].clone()
        kept = {f"{KEPT}{layer}": float(share) / steps for layer, share in enumerate(shares)}
        return ClientResult(trainer.flat.clone(), task.steps, loss_sum / steps,
                            stats={"pfedgate_density": kept_sum / steps, **kept})

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        if "gate" not in state:
            return None  # never trained: the global model
        blocks = self.blocks(trainer)
        gate = self.gate(blocks, data, state, seed)
        with torch.no_grad():
            gates = gate(data.x)
            keep = select_blocks(gates, blocks.sizes, blocks.layer, self.capacity(blocks))
            return self.with_own_buffers(trainer, params * entry_scale(gates, keep, blocks), state)

    # -- the server half ------------------------------------------------------------------------
    def layer_costs(self, trainer) -> LayerCosts:
        """The :class:`LayerCosts` of ``trainer``'s model on one sample of the federation's input shape (a trainer
        built by hand, without ``input_shape``: the first layer's, if it is an ``nn.Linear``)."""
        shape, tokens = trainer.input_shape, trainer.token_input
        if shape is None:
            first = next((m for m in trainer.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
            if not isinstance(first, nn.Linear):
                raise ConfigError(f"strategy.params.charge: sparse needs the input's shape to price {trainer.label}'s "
                                  "layers, which this trainer does not know; set charge: dense")
            shape, tokens = (first.in_features,), False
        return cached_layer_costs(trainer.model, shape, token_input=tokens, dense_head=self.dense_head)

    def task_kept(self, client_id: int, n_layers: int) -> tuple[float, ...]:
        """Each gated layer's kept share the client reported from its previous task; ``sparsity`` for every layer
        before its first."""
        return self._kept.get(client_id, (self.sparsity,) * n_layers)

    def task_flops(self, server: Server, task: Task) -> float:
        """The dense price (:meth:`Strategy.task_flops`) times (sparse forward + gate forward) / dense forward, the
        forward passes of :class:`LayerCosts` at the client's :meth:`task_kept` (module docstring, Cost)."""
        dense = super().task_flops(server, task)
        blocks = self.blocks(server.trainer)
        if self.charge == "dense" or not blocks.n_blocks:
            return dense
        costs = self.layer_costs(server.trainer)
        kept = self.task_kept(task.client_id, int(blocks.layer.max()) + 1)
        return dense * (costs.forward(kept) + costs.gate) / costs.dense

    def on_update(self, server: Server, update: Update) -> None:
        shares = sorted((int(key[len(KEPT):]), value) for key, value in update.stats.items() if key.startswith(KEPT))
        if shares and [layer for layer, _ in shares] == list(range(len(shares))):
            self._kept[update.client_id] = tuple(min(max(float(v), 0.0), 1.0) for _, v in shares)
        super().on_update(server, update)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        self._density = float(np.mean([u.stats.get("pfedgate_density", 1.0) for u in updates]))
        return weighted_mean(updates)

    def metrics(self) -> dict[str, float]:
        """``pfedgate_density``: mean share of the gated parameters the last round's clients kept."""
        return {} if self._density is None else {"pfedgate_density": self._density}
