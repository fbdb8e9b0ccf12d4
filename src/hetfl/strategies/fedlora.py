"""Federated LoRA fine-tuning with heterogeneous ranks: only adapters travel, the base stays frozen.

Every client holds the same (pretrained) base model and trains LoRA adapters (Hu et al., arXiv:2106.09685)
on some of its linear layers; each client has a rank of its own, fitted to its device. Three server rules,
``aggregation``, all from :mod:`hetfl.models.lora`:

- ``hetlora``: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
  (EMNLP 2024, arXiv:2401.06432). The server keeps adapters of the largest rank R; a client of rank r
  downloads their first r components (:func:`~hetfl.models.lora.truncate`), trains them and sends them
  back; the server zero-pads them to R (:func:`~hetfl.models.lora.pad_rank`) and takes their weighted
  mean (:func:`~hetfl.models.lora.aggregate_hetlora`). ``weighting: samples`` (the default): p_k = n_k /
  sum_j n_j, client k's training samples. ``weighting: norm``: HetLoRA's sparsity-weighted aggregation,
  p_k = ||dW_k||_F / sum_j ||dW_j||_F with dW_k = B_k A_k the change client k's adapters make, its Frobenius
  norm taken over every adapted layer at once (sqrt of the sum of the layers' squared norms; one weight a
  client, :func:`~hetfl.models.lora.adapter_norm`), so that clients whose adapters say little (small
  updates, typically of a rank too large for their data) count less; sample counts are not used. A
  component i that no update of the round has (every client's rank <= i) keeps its previous value (hetfl's
  choice: a round of small-rank clients would otherwise erase it); one that some have is averaged with
  the others' zeros, i.e. shrunk by the weight of the clients that have it, as in the paper. (HetLoRA's
  local rank self-pruning is not implemented: every client trains the rank its device is given.)
- ``flora``: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
  Adaptations" (NeurIPS 2024, arXiv:2409.05976). Each client trains fresh adapters of its rank (A drawn
  at random, B = 0); the server stacks the round's adapters (:func:`~hetfl.models.lora.aggregate_flora`,
  rank sum_k r_k), so that B A = sum_k p_k B_k A_k exactly, and the stack is merged into the base:
  W <- W + B A, on the server and on every client. Clients keep their merged base in their state; a task
  carries what the client needs to catch up with the server's model since it last merged (its payload):
  per adapted layer, the stacks of every round it missed, which it merges in order before training, or,
  when that is smaller, the layer's current dense weight on the server (d_out x d_in numbers, for sum_s r_s
  (d_in + d_out) of stacks: the dense weight wins once the missed ranks add up to more than
  d_in d_out / (d_in + d_out)), which it copies. The server's ``params`` are the merged model (base plus
  every stack so far), so ``global_model`` is True and the engine scores it; every client that has caught
  up holds exactly the same bits, since client and server add the same products in the same order (or
  the client copies the server's weight).
- ``fedavg``: the factors averaged separately (:func:`~hetfl.models.lora.aggregate_naive`), one rank for
  every client only. Not the mean of the products (it has cross terms B_k A_l); the baseline HetLoRA and
  FLoRA improve on.

Ranks. ``rank`` for every client, or ``ranks``: a list, by device speed (clients ranked by relative
compute speed, ties by id, cut into ``len(ranks)`` equal groups, the slowest get ``ranks[0]``: the
rule of ``model.assign: speed``), or a map from compute tier (``devices.compute.distribution: tiers``)
to rank. The server knows each device's profile from its registration (``server.profiles``) and tells
each task its rank in ``task.options["rank"]``: the client half never sees a profile, and a later
strategy (a bandit) can choose the rank per task.

Adapters. ``targets`` names the linear layers that get one (by attribute name, as
:func:`~hetfl.models.lora.attach_lora`): TinyLM's ``q`` and ``v`` by default, every ``nn.Linear`` of a
model that has no such layer names (the classifiers of the zoo). An adapter adds ``B A x`` to the layer's
output, A: r x d_in, B: d_out x r, scaling 1 for every rank (``alpha = r``, LoRALinear's default, so
ranks mix without rescaling). Adapters are attached by forward hooks on the client's model; only their
factors are given to the optimiser (``training.optimizer``, ``lr``, ``weight_decay``), the base is not
even differentiated, and ``trainer.flat`` holds the base bit for bit before and after a task.

What travels (``transfer_bytes``), float32: an adapter of rank r is r * sum_layers (d_in + d_out) numbers.
``hetlora``/``fedavg``: a task downloads the rank-r truncation of the server's adapters and uploads its
rank-r adapters. ``flora``: a task downloads, per adapted layer, the smaller of the stacks the client has
not merged yet (sum of the ranks of the round's clients, per round; a client that missed rounds downloads
all of them, so stacks grow with clients per round and with absence) and the layer's dense weight, and
uploads its rank-r adapters; never the whole model (the rest of it does not change).

Evaluation. ``flora``: the server's merged model (the global model, every client's model once caught
up). ``hetlora``/``fedavg``: there is no model on the server, only adapters (``global_model`` False); each
client is scored with the base plus the server's adapters truncated to its rank, the model its next task
would start from. With one rank for everyone that is the global model base + B A on every client.

Cost: a step is timed as a full training step of the model (3 forward passes' worth), an upper bound:
the base's weight gradients are not computed, and the adapters' FLOPs are left out.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from hetfl.errors import ConfigError, DivergedError
from hetfl.models.assign import by_tier, speed_groups
from hetfl.models.lora import aggregate_flora, aggregate_hetlora, aggregate_naive, sparsity_weights, truncate
from hetfl.models.transformer import TinyLM
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, sample_weights
from hetfl.strategies.selection import Selection
from hetfl.training.local import task_loss

LM_TARGETS = ("q", "v")
INIT_SEED = 0  # the generator seed of the server's initial A (hetlora, fedavg)


class Layer:
    """A target layer: its module, shapes, and where its weight lies in the flat parameter vector."""

    def __init__(self, name: str, module: nn.Linear, weight: slice) -> None:
        self.name, self.module, self.weight = name, module, weight
        self.d_in, self.d_out = module.in_features, module.out_features


def target_layers(model: nn.Module, targets: tuple[str, ...] | None) -> list[Layer]:
    """The layers that get an adapter, in module order (see the module docstring for ``targets``)."""
    offsets, offset = {}, 0
    for p in model.parameters():
        offsets[id(p)] = offset
        offset += p.numel()
    names = targets if targets is not None else LM_TARGETS if isinstance(model, TinyLM) else None
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name.rsplit(".", 1)[-1] in names):
            start = offsets[id(module.weight)]
            layers.append(Layer(name, module, slice(start, start + module.weight.numel())))
    return layers


def chain(x: torch.Tensor, matrices: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x`` through ``matrices`` in order, ``x M_1^T M_2^T ...``: LoRA's ``(A, B)`` gives ``B A x`` per token."""
    for m in matrices:
        x = x @ m.T
    return x


def train_hooked(trainer, base: torch.Tensor, trainable: list[torch.Tensor], hooks, data: ClientData, steps: int,
                 seed: int) -> float:
    """``steps`` optimiser steps on the tensors ``trainable`` (leaves with ``requires_grad``) of the model ``base``,
    frozen, with the forward ``hooks`` ``(module, hook)`` that use them attached; the mean training loss.
    ``trainer.flat`` holds ``base`` bit for bit afterwards. DivergedError on a non-finite loss or tensor."""
    trainer.flat.copy_(base)
    frozen = [p for p in trainer.model.parameters() if p.requires_grad]
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        for p in frozen:
            p.requires_grad_(False)
        opt = trainer.optimizer(None, trainable)
        loss_sum = torch.zeros((), device=trainer.device)
        for batch in trainer.batches(data.n_samples, steps, seed):
            loss = task_loss(trainer.model(data.x[batch]), data.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for handle in handles:
            handle.remove()
    mean_loss = loss_sum.item() / max(steps, 1)
    if not math.isfinite(mean_loss) or not all(torch.isfinite(t).all() for t in trainable):
        raise DivergedError(f"adapter training diverged (loss {mean_loss}); lower training.lr")
    return mean_loss


class FedLoRA(RoundStrategy):
    """Federated LoRA fine-tuning with heterogeneous ranks (HetLoRA, FLoRA, or FedAvg of the factors).

    Parameters
    ----------
    aggregation : {"hetlora", "flora", "fedavg"}, default "hetlora"
        The server rule (module docstring).
    rank : int, default 4
        Every client's rank, unless ``ranks`` is set.
    ranks : list of int or dict of str to int, optional
        Ranks by device speed (a list, slowest group first) or by compute tier (tier name -> rank).
    weighting : {"samples", "norm"}, default "samples"
        hetlora's client weights: training samples, or HetLoRA's sparsity weights (the Frobenius norm of each
        client's adapter product; module docstring). ``norm`` needs ``aggregation: hetlora``.
    targets : list of str, optional
        Attribute names of the linear layers that get adapters; default ``["q", "v"]`` on TinyLM, every
        linear layer on other models.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedlora"

    def __init__(
        self,
        *,
        aggregation: Literal["hetlora", "flora", "fedavg"] = "hetlora",
        rank: int = 4,
        ranks: list[int] | dict[str, int] | None = None,
        weighting: Literal["samples", "norm"] = "samples",
        targets: list[str] | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if aggregation not in ("hetlora", "flora", "fedavg"):
            raise ValueError(f"aggregation must be hetlora, flora or fedavg; got {aggregation!r}")
        if rank < 1:
            raise ValueError(f"rank must be a positive integer (e.g. 4); got {rank}")
        values = list(ranks.values()) if isinstance(ranks, dict) else list(ranks or [])
        if ranks is not None and (not values or min(values) < 1):
            raise ValueError(f"ranks must list positive ranks (by speed group, or by compute tier); got {ranks}")
        if aggregation == "fedavg" and len(set(values)) > 1:
            raise ValueError(
                "aggregation fedavg averages factors of one rank; use hetlora or flora for heterogeneous ranks"
            )
        if targets is not None and not targets:
            raise ValueError("targets must name at least one linear layer (e.g. [q, v]), or be unset")
        if weighting not in ("samples", "norm"):
            raise ValueError(f"weighting must be samples or norm; got {weighting!r}")
        if weighting == "norm" and aggregation != "hetlora":
            raise ValueError(f"weighting norm is HetLoRA's sparsity-weighted aggregation; set aggregation: hetlora "
                             f"(got {aggregation}) or weighting: samples")
        self.rule, self.weighting = aggregation, weighting  # self.aggregation is RoundStrategy's (robust rules)
        self.rank, self.ranks = rank, ranks
        self.targets = None if targets is None else tuple(targets)
        self.max_rank = max(values) if values else rank
        self.global_model = aggregation == "flora"  # an instance attribute: it depends on the rule
        self.personalised = not self.global_model
        self._client_ranks: np.ndarray | None = None
        self._history: list[tuple[int, torch.Tensor]] = []  # flora: (stacked rank, stacked adapters) per round
        self._synced: dict[int, int] = {}  # flora: rounds of the history each client has merged

    # -- ranks ------------------------------------------------------------------------------------
    def resolve_ranks(self, profiles: list[Any]) -> np.ndarray:
        """Every client's rank, from the device profiles (module docstring)."""
        n = len(profiles)
        if self.ranks is None:
            return np.full(n, self.rank, dtype=np.int64)
        if isinstance(self.ranks, dict):
            return np.array(by_tier(profiles, self.ranks, "strategy.params.ranks", "rank"), dtype=np.int64)
        return np.asarray(self.ranks, dtype=np.int64)[speed_groups(profiles, len(self.ranks))]

    def check_devices(self, profiles: list[Any]) -> None:
        self.resolve_ranks(profiles)

    def client_rank(self, server: Server, client_id: int) -> int:
        if self._client_ranks is None:
            self._client_ranks = self.resolve_ranks(server.profiles)
        return int(self._client_ranks[client_id])

    # -- adapters as flat vectors: per layer, A (r x d_in) then B (d_out x r), row-major ----------------
    def layers(self, trainer) -> list[Layer]:
        return target_layers(trainer.model, self.targets)

    def check_models(self, trainers) -> None:
        for trainer in trainers:
            if not self.layers(trainer):
                raise ConfigError(
                    f"strategy.params.targets: {trainer.label} has no linear layer named one of {list(self.targets or ())}"
                )

    @staticmethod
    def adapter_numel(layers: list[Layer], rank: int) -> int:
        return rank * sum(layer.d_in + layer.d_out for layer in layers)

    @staticmethod
    def pack(factors: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Every layer's matrices (LoRA's ``(A, B)``; FlexMoRE's full experts ``(dW,)``), flat, in order."""
        return torch.cat([t.reshape(-1) for f in factors for t in f])

    @staticmethod
    def unpack(layers: list[Layer], flat: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, offset = [], 0
        for layer in layers:
            a, b = rank * layer.d_in, layer.d_out * rank
            A = flat[offset : offset + a].reshape(rank, layer.d_in)
            B = flat[offset + a : offset + a + b].reshape(layer.d_out, rank)
            out.append((A, B))
            offset += a + b
        if offset != flat.numel():
            raise ValueError(f"{flat.numel()} numbers are no rank-{rank} adapters of these layers ({offset} expected)")
        return out

    @staticmethod
    def merge(layers: list[Layer], model: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A copy of the flat ``model`` with every layer's weight plus ``B @ A``."""
        out = model.clone()
        for layer, (A, B) in zip(layers, factors):
            out[layer.weight] += (B @ A).reshape(-1)
        return out

    def fresh(self, layers: list[Layer], rank: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """New adapters: A uniform in +-1/sqrt(d_in) (nn.Linear's default, as LoRA initialises it), B = 0."""
        return [((torch.rand(rank, layer.d_in, generator=gen) * 2 - 1) / math.sqrt(layer.d_in),
                 torch.zeros(layer.d_out, rank)) for layer in layers]

    def initial_params(self, trainer) -> torch.Tensor:
        if self.rule == "flora":
            return trainer.initial.clone()  # the (pretrained) base: stacks are merged into it
        return self.pack(self.fresh(self.layers(trainer), self.max_rank, torch.Generator().manual_seed(INIT_SEED)))

    # -- the server half ----------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        options: dict[str, Any] = {"rank": self.client_rank(server, client_id)}
        if self.rule != "flora":
            return {"options": options}
        missed = self._history[self._synced.get(client_id, 0) :]
        layers = self.layers(server.trainer)
        dense = self.dense_layers(layers, sum(r for r, _ in missed))
        options |= {"stack_ranks": [r for r, _ in missed], "synced_to": len(self._history), "dense_layers": dense}
        payload = {}
        stacked = [i for i in range(len(layers)) if i not in dense]
        if missed and stacked:  # per missed round, the stacked factors of the layers that travel as stacks
            payload["stacks"] = torch.cat([self.pack([factors[i] for i in stacked])
                                           for r, s in missed for factors in [self.unpack(layers, s, r)]])
        if missed and dense:  # the server's current weights of the others: what the stacks would have made
            payload["dense"] = torch.cat([server.params[layers[i].weight] for i in dense])
        return {"options": options, "payload": payload}

    @staticmethod
    def dense_layers(layers: list[Layer], rank: int) -> list[int]:
        """FLoRA: the layers (indices) a client catching up on stacks of total rank ``rank`` downloads dense,
        because ``d_out * d_in < rank * (d_in + d_out)`` numbers (a tie goes to the stacks); none for rank 0."""
        return [i for i, layer in enumerate(layers) if layer.d_out * layer.d_in < rank * (layer.d_in + layer.d_out)]

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        up = 4 * self.adapter_numel(self.layers(server.trainer), task.options["rank"])
        if self.rule == "flora":  # per layer the smaller of its stacks and its dense weight (configure)
            return sum(t.numel() * t.element_size() for t in task.payload.values()), up
        return up, up  # the rank-r truncation down, rank-r adapters up

    def client_ranks(self) -> list[int]:
        """The ranks clients may train, smallest first."""
        values = list(self.ranks.values()) if isinstance(self.ranks, dict) else list(self.ranks or [self.rank])
        return sorted(set(values))

    def describe_transfer(self, trainer) -> str:
        layers = self.layers(trainer)
        ranks = self.client_ranks()
        sizes = [4 * self.adapter_numel(layers, r) / 1e3 for r in (ranks[0], ranks[-1])]
        what = f"rank-{ranks[0]} adapters, {sizes[0]:.1f} kB" if len(ranks) == 1 else (
            f"adapters of rank {ranks[0]}-{ranks[-1]}, {sizes[0]:.1f}-{sizes[1]:.1f} kB")
        if self.rule == "flora":
            return f"{what} up, the missed rounds' stacks (or dense weights) of {len(layers)} layers down"
        return f"{what} a transfer"

    def on_update(self, server: Server, update: Update) -> None:
        if self.rule == "flora":  # it trained, so it merged what the task carried (even if the round is over)
            self._synced[update.client_id] = update.task.options["synced_to"]
        super().on_update(server, update)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        layers = self.layers(server.trainer)
        clients = [self.unpack(layers, u.params, u.task.options["rank"]) for u in updates]
        weights = sparsity_weights(clients) if self.weighting == "norm" else sample_weights(updates)
        if self.rule == "flora":
            stack = [aggregate_flora([c[i][0] for c in clients], [c[i][1] for c in clients], weights)
                     for i in range(len(layers))]
            rank = stack[0][0].shape[0]
            self._history.append((rank, self.pack(stack)))
            return self.merge(layers, server.params, stack)
        if self.rule == "fedavg":
            return self.pack([aggregate_naive([c[i][0] for c in clients], [c[i][1] for c in clients], weights)
                              for i in range(len(layers))])
        old = self.unpack(layers, server.params, self.max_rank)
        covered = max(u.task.options["rank"] for u in updates)
        new = []
        for i, (A_old, B_old) in enumerate(old):
            A, B = aggregate_hetlora([c[i][0] for c in clients], [c[i][1] for c in clients], weights, rank=self.max_rank)
            A[covered:], B[:, covered:] = A_old[covered:], B_old[:, covered:]  # components nobody trained
            new.append((A, B))
        return self.pack(new)

    # -- the client half ----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        layers = self.layers(trainer)
        rank = int(task.options["rank"])
        if self.rule == "flora":
            base = state.get("base", trainer.initial)
            dense = task.options.get("dense_layers", [])
            stacked = [layer for i, layer in enumerate(layers) if i not in dense]
            stacks, offset = task.payload.get("stacks"), 0
            for r in task.options["stack_ranks"]:  # merge the rounds missed, in order, as the server did
                n = self.adapter_numel(stacked, r)
                if n:
                    base = self.merge(stacked, base, self.unpack(stacked, stacks[offset : offset + n], r))
                offset += n
            if dense:  # the other layers: the server's weights, copied
                base, offset = base.clone(), 0
                for i in dense:
                    n = layers[i].weight.stop - layers[i].weight.start
                    base[layers[i].weight] = task.payload["dense"][offset : offset + n]
                    offset += n
            state["base"] = base
            start = self.fresh(layers, rank, torch.Generator().manual_seed(seed))
        else:
            base = trainer.initial
            start = [truncate(A, B, rank) for A, B in self.unpack(layers, task.params, self.max_rank)]
        factors, loss = self.train_adapters(trainer, layers, base, start, data, task.steps, seed)
        return ClientResult(self.pack(factors), task.steps, loss, stats={"rank": float(rank)})

    def train_adapters(
        self, trainer, layers: list[Layer], base: torch.Tensor, start, data: ClientData, steps: int, seed: int,
        routers: list[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, ...]], float]:
        """``steps`` optimiser steps on the adapters ``start`` with the model ``base`` frozen; (factors, mean loss).

        An adapter is the matrices a layer's input goes through (:func:`chain`): LoRA's ``(A, B)``, or FlexMoRE's
        full expert ``(dW,)``. ``routers`` (FlexMoRE): one vector ``r`` (d_in) per layer, trained too, gating the
        adapter per token: the layer adds ``sigmoid(x . r) B A x``; the trained vectors replace the list's entries."""
        factors = [tuple(t.clone().requires_grad_(True) for t in f) for f in start]
        gates = [r.clone().requires_grad_(True) for r in routers] if routers is not None else []
        if gates:
            hooks = [(layer.module, lambda m, inputs, out, f=f, r=r: out + torch.sigmoid(inputs[0] @ r)[..., None]
                      * chain(inputs[0], f)) for layer, f, r in zip(layers, factors, gates)]
        else:
            hooks = [(layer.module, lambda m, inputs, out, f=f: out + chain(inputs[0], f))
                     for layer, f in zip(layers, factors)]
        loss = train_hooked(trainer, base, [t for f in factors for t in f] + gates, hooks, data, steps, seed)
        if routers is not None:
            routers[:] = [r.detach() for r in gates]
        return [tuple(t.detach() for t in f) for f in factors], loss

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        if self.rule == "flora":
            return None  # the server's merged model is every client's
        rank = self.max_rank if self._client_ranks is None else int(self._client_ranks[data.client_id])
        layers = self.layers(trainer)
        return self.merge(layers, trainer.initial, [truncate(A, B, rank) for A, B in self.unpack(layers, params, self.max_rank)])

    def metrics(self) -> dict[str, float]:
        if self.rule != "flora" or not self._history:
            return {}
        return {"flora_stack_rank": float(self._history[-1][0])}
