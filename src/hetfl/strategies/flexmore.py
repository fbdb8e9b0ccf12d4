"""FlexMoRE: a mixture of rank-heterogeneous experts (LoRA adapters or full-sized), trained in isolation per domain.

"FlexMoRE: A Flexible Mixture of Rank-heterogeneous Experts for Efficient Federatedly-trained Large Language
Models" (arXiv:2602.08818). From the paper: it builds on FlexOlmo (Shi et al., "FlexOlmo: Open Language Models
for Flexible Data Use", arXiv:2507.07024), where each data owner trains one expert (a copy of the FFN) in
isolation from the other experts, against a frozen common (public) base that coordinates them, together with the
expert's own router embedding; the experts are then joined in one mixture-of-experts model whose router scores
every expert for every token. FlexMoRE lets each expert be either full-sized or a low-rank adapter of a rank
chosen per expert (domain): its adapters are rank-r truncations (post-hoc SVD) of a full expert's change to the
public FFN, ``W_expert - W_public``. It finds low ranks suffice for some domains and higher ranks pay off for
others, and that a mixture of well-chosen ranks matches or beats the mixture of full-sized experts at about a
third of the parameters.

Our choices (hetfl's tiny TinyLM, and what the papers leave open):

- Domains, experts, federation, training length and bytes are :class:`~hetfl.strategies.hdee.HDEE`'s:
  client ``c`` is in domain ``c mod domains`` (the text dataset's styles), domain ``d``'s clients train its
  expert together (sample-weighted mean), on the frozen pretrained base on ``targets``, and a task moves its
  own expert (matrices and router vectors) each way.
- An expert of domain ``d`` is, on every adapted layer, LoRA adapters of rank ``ranks[d]`` (``B A``, trained
  directly rather than extracted from a trained full expert by SVD: training the full expert first would cost
  what the adapter saves), or, with ``ranks[d] = full``, a full-sized expert: a dense change ``dW`` (d_out x
  d_in, every entry trained, starting at 0), so that the layer's weight for that expert is ``W + dW``: exactly
  FlexOlmo's expert, a full copy of the layer started from the public one, written as its change, which is the
  matrix FlexMoRE's adapters approximate. Both kinds sit on the same layers behind the same router, so a
  comparison differs only in the expert's size. (FlexOlmo makes the FFN's matrices experts: ``targets: [fc1,
  fc2]``; the default q and v is hetfl's LoRA family's.)
- The router, per adapted layer: a vector ``r_d`` (d_in numbers) per expert, and the base itself as
  expert 0 with ``r_0 = 0`` fixed and no change (FlexOlmo's frozen public expert). For a token's input
  ``x`` to the layer the gate is ``w = softmax(0, x . r_1, ..., x . r_D)`` and the layer adds
  ``sum_{d >= 1} w_d dW_d x`` (``dW_d = B_d A_d`` for an adapter) to the base's output. Dense gating over all
  experts (FlexOlmo routes to its top-k; with two or three experts here top-k would drop little).
- Training in isolation: a task of domain ``d`` sees only the base and its own expert, so its gate is the
  two-expert case, ``sigmoid(x . r_d)``, and it trains the expert's matrices and ``r_d`` (``r_d`` starts at 0:
  the gate starts at 1/2). Evaluation scores every client with the joined mixture (:class:`Mixture`).
- Router after joining. FlexOlmo may fine-tune the joined router on a small proxy set of every domain's data,
  pooled; no data leaves a client here, so by default nothing is trained after joining. With ``expert_rounds:
  N`` the rounds after the first N train the joined router the federated way instead: every task downloads the
  whole mixture (every expert and router), trains all router vectors on its own data with the experts frozen,
  and uploads them; the server takes their sample-weighted mean. Our addition, not the papers'.

Cost. A task is charged (``task_flops``) the model's step (the default, as every LoRA method here) plus what its
expert adds: on a layer of forward FLOPs ``F_l`` (``2 d_in d_out`` a token) the expert's ``m_l`` numbers (``r (d_in
+ d_out)`` for an adapter, ``d_in d_out`` for a full expert, plus the router's ``d_in``) cost ``F_l m_l / (d_in
d_out)`` more, forward and backward alike; a router task runs every expert. Worked example: one layer 4 -> 3 that
is the whole model (24 FLOPs a token), a rank-1 expert: 7 + 4 = 11 numbers, 24 * 11/12 = 22 more (x 1.92); a full
one: 12 + 4 = 16 numbers, 32 more (x 2.33). Bytes: 4 per number of what moves.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from hetfl.models.cost import flops_by_module, sample_shape
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.fedlora import Layer, chain, train_hooked
from hetfl.strategies.hdee import HDEE
from hetfl.strategies.rounds import weighted_mean
from hetfl.strategies.selection import Selection

FULL = "full"


def mixture_delta(x: torch.Tensor, experts: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """What a layer adds to its base output for inputs ``x`` (..., d_in): ``sum_d w_d dW_d x`` with
    ``w = softmax(0, x . r_1, ..., x . r_D)`` per token; ``experts`` = one ``(*matrices, r_d)`` per expert: an
    adapter's ``(A_d, B_d, r_d)`` (``dW_d = B_d A_d``) or a full expert's ``(dW_d, r_d)``."""
    scores = torch.stack([torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)] + [x @ e[-1] for e in experts], dim=-1)
    w = torch.softmax(scores, dim=-1)
    return sum(w[..., d + 1, None] * chain(x, e[:-1]) for d, e in enumerate(experts))


def mixture_hooks(layers: list[Layer], experts, routers) -> list[tuple[Any, Any]]:
    """Forward hooks ``(module, hook)`` that make each layer the joined mixture of ``experts`` (per domain, one
    tuple of matrices per layer) with ``routers`` (per domain, one vector per layer)."""
    return [(layer.module, lambda m, inputs, out, i=i: out + mixture_delta(
        inputs[0], [(*f[i], r[i]) for f, r in zip(experts, routers)])) for i, layer in enumerate(layers)]


class Mixture:
    """Scores a FlexMoRE parameter vector as the joined mixture of experts (:meth:`FlexMoRE.scorer`)."""

    def __init__(self, strategy: "FlexMoRE", trainer) -> None:
        self.strategy, self.trainer = strategy, trainer

    def predict(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layers = self.strategy.layers(self.trainer)
        hooks = mixture_hooks(layers, self.strategy.experts(layers, params), self.strategy.routers(layers, params))
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        try:
            with torch.no_grad():
                return self.trainer.predict(self.trainer.initial, x)
        finally:
            for handle in handles:
                handle.remove()


class FlexMoRE(HDEE):
    """FlexMoRE: per-domain experts (LoRA of their own ranks, or full-sized) with router vectors, joined by a softmax router.

    Parameters
    ----------
    domains : int, default 2
        How many domains; client ``c`` is in domain ``c mod domains`` (the text dataset's styles).
    ranks : list of (int or "full"), optional
        Each domain's expert: a LoRA rank, or ``full`` for a full-sized expert (a dense change of every adapted
        layer); default rank 4 for every domain. One entry per domain.
    steps : list of float, optional
        Each domain's training length, a multiple of ``training.local_steps``; default 1 for every domain.
    targets : list of str, optional
        Linear layers with experts and routers (default q and v on TinyLM).
    expert_rounds : int, optional
        Rounds that train the experts; the rounds after them train the joined router on every client (module
        docstring). Default: every round trains experts, the router is never trained after joining.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "flexmore"

    def __init__(
        self,
        *,
        domains: int = 2,
        ranks: list[int | Literal["full"]] | None = None,
        steps: list[float] | None = None,
        targets: list[str] | None = None,
        expert_rounds: int | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        given = None if ranks is None else list(ranks)
        if given is not None and any(r != FULL and (not isinstance(r, int) or r < 1) for r in given):
            raise ValueError(f"ranks must list one positive rank or 'full' per domain ({domains}); got {given}")
        if expert_rounds is not None and expert_rounds < 1:
            raise ValueError(f"expert_rounds must be a positive number of rounds (or unset); got {expert_rounds}")
        super().__init__(domains=domains, ranks=None if given is None else [1 if r == FULL else r for r in given],
                         steps=steps, targets=targets, clients_per_round=clients_per_round, deadline_s=deadline_s,
                         selection=selection)
        if given is not None:
            self.domain_ranks = given
        self.expert_rounds = expert_rounds
        self._extra: dict[int, float] = {}  # per domain: its expert's FLOPs over the model's (task_flops)

    # -- the experts: matrices, then router vectors, one domain after another ---------------------------
    def matrices_numel(self, layers: list[Layer], d: int) -> int:
        """Numbers of domain ``d``'s expert without its routers: adapters, or a dense change of every layer."""
        if self.domain_ranks[d] == FULL:
            return sum(layer.d_in * layer.d_out for layer in layers)
        return self.adapter_numel(layers, self.domain_ranks[d])

    def expert_numel(self, layers: list[Layer], d: int) -> int:
        return self.matrices_numel(layers, d) + sum(layer.d_in for layer in layers)

    def fresh_expert(self, layers: list[Layer], d: int) -> torch.Tensor:
        routers = torch.zeros(sum(layer.d_in for layer in layers))
        if self.domain_ranks[d] == FULL:
            return torch.cat([torch.zeros(self.matrices_numel(layers, d)), routers])  # W + 0: the base
        return torch.cat([super().fresh_expert(layers, d), routers])

    def experts(self, layers: list[Layer], params: torch.Tensor) -> list[list[tuple[torch.Tensor, ...]]]:
        """Each domain's matrices, one tuple per layer: ``(A, B)`` for an adapter, ``(dW,)`` for a full expert."""
        out = []
        for d, seg in enumerate(self.segments(layers)):
            flat = params[seg][: self.matrices_numel(layers, d)]
            if self.domain_ranks[d] == FULL:
                dense = torch.split(flat, [layer.d_in * layer.d_out for layer in layers])
                out.append([(m.reshape(layer.d_out, layer.d_in),) for m, layer in zip(dense, layers)])
            else:
                out.append(self.unpack(layers, flat, self.domain_ranks[d]))
        return out

    def routers(self, layers: list[Layer], params: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each domain's router vectors, one per layer, from the flat ``params`` (after its matrices)."""
        return [list(torch.split(params[seg][self.matrices_numel(layers, d) :], [layer.d_in for layer in layers]))
                for d, seg in enumerate(self.segments(layers))]

    def client_ranks(self) -> list[int]:
        return sorted({r for r in self.domain_ranks if r != FULL})

    # -- the server half -----------------------------------------------------------------------------
    def router_phase(self, server: Server) -> bool:
        return self.expert_rounds is not None and server.version >= self.expert_rounds

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        if not self.router_phase(server):
            return super().configure(server, client_id)
        return {"options": {"domain": self.domain(client_id), "phase": "router"}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        if updates[0].task.options.get("phase") != "router":
            return super().aggregate(server, updates)
        new = server.params.clone()  # the experts stay; every domain's routers become the clients' mean
        routers = weighted_mean(updates)
        layers, offset = self.layers(server.trainer), 0
        for d, seg in enumerate(self.segments(layers)):
            start = seg.start + self.matrices_numel(layers, d)
            new[start : seg.stop] = routers[offset : offset + seg.stop - start]
            offset += seg.stop - start
        return new

    def upload_reference(self, server: Server, task: Task) -> torch.Tensor:
        """A router round's client sends back every domain's router vectors; an expert's task, its expert."""
        if task.options.get("phase") != "router":
            return super().upload_reference(server, task)
        return torch.cat([r for rs in self.routers(self.layers(server.trainer), task.params) for r in rs])

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        if task.options.get("phase") != "router":
            return super().transfer_bytes(server, task)
        layers = self.layers(server.trainer)
        return 4 * server.params.numel(), 4 * self.domains * sum(layer.d_in for layer in layers)

    def extra_share(self, server: Server, d: int) -> float:
        """Domain ``d``'s expert's forward FLOPs over the model's (module docstring, Cost), computed once."""
        if d not in self._extra:
            trainer = server.trainer
            flops = flops_by_module(trainer.model, sample_shape(trainer, "flexmore prices its experts with"),
                                    token_input=trainer.token_input)
            layers = self.layers(trainer)
            numel = [(self.matrices_numel([layer], d) + layer.d_in) for layer in layers]
            extra = sum(flops[layer.name] * m / (layer.d_in * layer.d_out) for layer, m in zip(layers, numel))
            self._extra[d] = extra / flops[""] if flops[""] else 0.0
        return self._extra[d]

    def task_flops(self, server: Server, task: Task) -> float:
        domains = range(self.domains) if task.options.get("phase") == "router" else [task.options["domain"]]
        return super().task_flops(server, task) * (1.0 + sum(self.extra_share(server, d) for d in domains))

    # -- the client half -----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        layers = self.layers(trainer)
        if task.options.get("phase") == "router":
            return self.train_router(trainer, layers, task, data, seed)
        d = int(task.options["domain"])
        start, gates = self.experts(layers, task.params)[d], self.routers(layers, task.params)[d]
        factors, loss = self.train_adapters(trainer, layers, trainer.initial, start, data, task.steps, seed, routers=gates)
        return ClientResult(torch.cat([self.pack(factors), *gates]), task.steps, loss,
                            stats={"expert_params": float(self.expert_numel(layers, d))})

    def train_router(self, trainer, layers: list[Layer], task: Task, data: ClientData, seed: int) -> ClientResult:
        """Every domain's router vectors trained on this client's data through the joined mixture, experts frozen."""
        routers = [[r.clone().requires_grad_(True) for r in rs] for rs in self.routers(layers, task.params)]
        hooks = mixture_hooks(layers, self.experts(layers, task.params), routers)
        loss = train_hooked(trainer, trainer.initial, [r for rs in routers for r in rs], hooks, data, task.steps, seed)
        return ClientResult(torch.cat([r.detach() for rs in routers for r in rs]), task.steps, loss)

    def scorer(self, trainer) -> Mixture:
        return Mixture(self, trainer)
