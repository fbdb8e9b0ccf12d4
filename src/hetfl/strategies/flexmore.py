"""FlexMoRE: a mixture of rank-heterogeneous LoRA experts, trained in isolation per domain, joined by a router.

"FlexMoRE: A Flexible Mixture of Rank-heterogeneous Experts for Efficient Federatedly-trained Large Language
Models" (arXiv:2602.08818). From the paper: it builds on FlexOlmo, where each data owner trains one expert
in isolation from the other experts, against a frozen common (public) base that coordinates them, together
with the expert's own router embedding; the experts are then joined in one mixture-of-experts model whose
router scores every expert for every token. FlexMoRE replaces full-sized experts by low-rank adapters of a
rank chosen per expert (domain), finding that low ranks suffice for some domains and higher ranks pay off
for others, at a fraction of the memory.

Our choices (hetfl's tiny TinyLM, and what the abstract leaves open):

- Domains, experts, federation, training length and bytes are :class:`~hetfl.strategies.hdee.HDEE`'s:
  client ``c`` is in domain ``c mod domains`` (the text dataset's styles), domain ``d``'s clients train its
  expert together (sample-weighted mean), an expert is LoRA adapters of rank ``ranks[d]`` on the frozen
  pretrained base on ``targets``, and a task moves its own expert (adapters and router vectors) each way.
- The router, per adapted layer: a vector ``r_d`` (d_in numbers) per expert, and the base itself as
  expert 0 with ``r_0 = 0`` fixed and no adapter (FlexOlmo's frozen public expert). For a token's input
  ``x`` to the layer the gate is ``w = softmax(0, x . r_1, ..., x . r_D)`` and the layer adds
  ``sum_{d >= 1} w_d B_d A_d x`` to the base's output. Dense gating over all experts (FlexOlmo routes to
  its top-k; with two or three experts here top-k would drop little).
- Training in isolation: a task of domain ``d`` sees only the base and its own expert, so its gate is the
  two-expert case, ``sigmoid(x . r_d)``, and it trains ``A_d``, ``B_d`` and ``r_d`` (``r_d`` starts at 0: the
  gate starts at 1/2). Evaluation scores every client with the joined mixture (:class:`Mixture`).
- No router fine-tuning on pooled data after joining (FlexOlmo's optional step): no data leaves a client.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.strategies.base import ClientData, ClientResult, Task
from hetfl.strategies.fedlora import Layer
from hetfl.strategies.hdee import HDEE


def mixture_delta(x: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """What a layer adds to its base output for inputs ``x`` (..., d_in): ``sum_d w_d B_d A_d x`` with
    ``w = softmax(0, x . r_1, ..., x . r_D)`` per token; ``experts`` = one ``(A_d, B_d, r_d)`` per expert."""
    scores = torch.stack([torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)] + [x @ r for _, _, r in experts], dim=-1)
    w = torch.softmax(scores, dim=-1)
    return sum(w[..., d + 1, None] * ((x @ A.T) @ B.T) for d, (A, B, _) in enumerate(experts))


class Mixture:
    """Scores a FlexMoRE parameter vector as the joined mixture of experts (:meth:`FlexMoRE.scorer`)."""

    def __init__(self, strategy: "FlexMoRE", trainer) -> None:
        self.strategy, self.trainer = strategy, trainer

    def predict(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layers = self.strategy.layers(self.trainer)
        experts = self.strategy.experts(layers, params)
        routers = self.strategy.routers(layers, params)
        hooks = [layer.module.register_forward_hook(
            lambda m, inputs, out, i=i: out + mixture_delta(inputs[0], [(*f[i], r[i]) for f, r in zip(experts, routers)]))
            for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                return self.trainer.predict(self.trainer.initial, x)
        finally:
            for hook in hooks:
                hook.remove()


class FlexMoRE(HDEE):
    """FlexMoRE: per-domain LoRA experts of their own ranks with router vectors, joined by a softmax router.

    Parameters
    ----------
    domains : int, default 2
        How many domains; client ``c`` is in domain ``c mod domains`` (the text dataset's styles).
    ranks : list of int, optional
        Each domain's expert rank; default 4 for every domain. One entry per domain.
    steps : list of float, optional
        Each domain's training length, a multiple of ``training.local_steps``; default 1 for every domain.
    targets : list of str, optional
        Linear layers with adapters and routers (default q and v on TinyLM).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "flexmore"

    def expert_numel(self, layers: list[Layer], d: int) -> int:
        return super().expert_numel(layers, d) + sum(layer.d_in for layer in layers)

    def fresh_expert(self, layers: list[Layer], d: int) -> torch.Tensor:
        return torch.cat([super().fresh_expert(layers, d), torch.zeros(sum(layer.d_in for layer in layers))])

    def routers(self, layers: list[Layer], params: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each domain's router vectors, one per layer, from the flat ``params`` (after its adapters)."""
        out = []
        for d, seg in enumerate(self.segments(layers)):
            flat = params[seg][self.adapter_numel(layers, self.domain_ranks[d]) :]
            out.append(list(torch.split(flat, [layer.d_in for layer in layers])))
        return out

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        layers = self.layers(trainer)
        d = int(task.options["domain"])
        start, gates = self.experts(layers, task.params)[d], self.routers(layers, task.params)[d]
        factors, loss = self.train_adapters(trainer, layers, trainer.initial, start, data, task.steps, seed, routers=gates)
        return ClientResult(torch.cat([self.pack(factors), *gates]), task.steps, loss,
                            stats={"rank": float(self.domain_ranks[d])})

    def scorer(self, trainer) -> Mixture:
        return Mixture(self, trainer)
