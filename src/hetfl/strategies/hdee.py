"""HDEE: independent domain experts of different sizes and training lengths, ensembled at inference.

Joshi et al., "HDEE: Heterogeneous Domain Expert Ensemble" (arXiv:2502.19385). From the paper: instead of
one dense model, train an embarrassingly parallel ensemble of small, independent experts, one per data
domain, and let the experts differ by domain: a harder or larger domain gets a bigger expert and more
training steps, under the same total compute as a homogeneous ensemble. The ensemble is scored by
perplexity on every domain.

Our choices (hetfl's tiny CPU settings and its federation):

- Domains. Client ``c`` belongs to domain ``c mod domains``: the text dataset's rule (client ``c`` holds
  style ``styles[c mod S]``, so with ``domains`` = the number of styles each style is a domain). The
  clients of one domain train that domain's expert together (FedAvg of its factors, sample-weighted);
  experts never exchange anything.
- Expert size. Every expert is LoRA adapters on the shared frozen (pretrained) base, as in
  :class:`~hetfl.strategies.fedlora.FedLoRA` (``targets``); an expert's size is its rank, ``ranks[d]``
  (the paper varies whole models' widths and depths; a rank is the size knob the rest of hetfl's LLM
  family has, and a TinyLM is too small to split further).
- Training length. A task of domain ``d`` trains ``round(steps[d] * local_steps)`` steps (at least 1); the
  simulator times and counts those steps (``task_flops`` is the default: steps x the model's step FLOPs).
- The ensemble. Every client's model is the ensemble of all experts: the next-token distribution is the
  uniform mean of the experts' distributions, ``p(y|x) = 1/D sum_d softmax(f_d(x))_y``, with ``f_d`` the
  base plus expert ``d``'s adapters (:func:`ensemble_logits` returns ``log p``, so the evaluation's
  cross-entropy is ``-log p`` and its perplexity the ensemble's). The paper's weighting of experts at
  inference is not reproduced; uniform weights are what its homogeneous baseline ensembles use too.

Bytes: a task downloads and uploads its own expert only (``4 ranks[d] sum_layers (d_in + d_out)`` each
way). Fetching the whole ensemble for inference is not a training transfer and is not counted (as no
strategy counts the download of the model it is evaluated with).
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.fedlora import INIT_SEED, FedLoRA, Layer
from hetfl.strategies.rounds import weighted_mean
from hetfl.strategies.selection import Selection


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """``log(1/D sum_d softmax(logits[d]))`` over the last dimension: the log of the experts' mean distribution."""
    stacked = torch.stack([torch.log_softmax(z, dim=-1) for z in logits])
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(logits)), dtype=stacked.dtype))


class Ensemble:
    """Scores an HDEE parameter vector (every expert's adapters) as the ensemble of the experts: what the
    evaluation calls ``predict(params, x)`` on (:meth:`HDEE.scorer`)."""

    def __init__(self, strategy: "HDEE", trainer) -> None:
        self.strategy, self.trainer = strategy, trainer

    def predict(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layers = self.strategy.layers(self.trainer)
        models = [self.strategy.merge(layers, self.trainer.initial, factors)
                  for factors in self.strategy.experts(layers, params)]
        return ensemble_logits([self.trainer.predict(m, x) for m in models])


class HDEE(FedLoRA):
    """HDEE: one LoRA expert per domain (its own rank and training length), the experts' distributions averaged.

    Parameters
    ----------
    domains : int, default 2
        How many domains; client ``c`` is in domain ``c mod domains`` (the text dataset's styles).
    ranks : list of int, optional
        Each domain's expert rank (its size); default 4 for every domain. One entry per domain.
    steps : list of float, optional
        Each domain's training length, a multiple of ``training.local_steps``; default 1 for every domain.
    targets : list of str, optional
        Linear layers with adapters (default q and v on TinyLM).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "hdee"
    global_model = False
    personalised = True

    def __init__(
        self,
        *,
        domains: int = 2,
        ranks: list[int] | None = None,
        steps: list[float] | None = None,
        targets: list[str] | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        if domains < 1:
            raise ValueError(f"domains must be a positive integer (e.g. the number of text styles); got {domains}")
        ranks = [4] * domains if ranks is None else list(ranks)
        steps = [1.0] * domains if steps is None else list(steps)
        if len(ranks) != domains or min(ranks) < 1:
            raise ValueError(f"ranks must list one positive rank per domain ({domains}); got {ranks}")
        if len(steps) != domains or min(steps) <= 0:
            raise ValueError(f"steps must list one positive multiple of local_steps per domain ({domains}); got {steps}")
        super().__init__(aggregation="fedavg", rank=max(ranks), targets=targets, clients_per_round=clients_per_round,
                         deadline_s=deadline_s, selection=selection)
        self.global_model, self.personalised = False, True
        self.domains, self.domain_ranks, self.domain_steps = domains, ranks, steps

    # -- the experts, one after another in the flat parameter vector -----------------------------------
    def expert_numel(self, layers: list[Layer], d: int) -> int:
        """Numbers of domain ``d``'s expert: its adapters (FlexMoRE adds its router vectors)."""
        return self.adapter_numel(layers, self.domain_ranks[d])

    def segments(self, layers: list[Layer]) -> list[slice]:
        """Where each domain's expert lies in the flat parameters."""
        out, offset = [], 0
        for d in range(self.domains):
            n = self.expert_numel(layers, d)
            out.append(slice(offset, offset + n))
            offset += n
        return out

    def experts(self, layers: list[Layer], params: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each domain's adapters (one ``(A, B)`` per layer) from the flat ``params``."""
        out = []
        for d, seg in enumerate(self.segments(layers)):
            n = self.adapter_numel(layers, self.domain_ranks[d])
            out.append(self.unpack(layers, params[seg][:n], self.domain_ranks[d]))
        return out

    def fresh_expert(self, layers: list[Layer], d: int) -> torch.Tensor:
        """Domain ``d``'s starting expert: fresh adapters (A random, B = 0), seeded by the domain."""
        return self.pack(self.fresh(layers, self.domain_ranks[d], torch.Generator().manual_seed(INIT_SEED + d)))

    def initial_params(self, trainer) -> torch.Tensor:
        layers = self.layers(trainer)
        return torch.cat([self.fresh_expert(layers, d) for d in range(self.domains)])

    def domain(self, client_id: int) -> int:
        return client_id % self.domains

    def client_rank(self, server: Server, client_id: int) -> int:
        return self.domain_ranks[self.domain(client_id)]

    def check_devices(self, profiles: list[Any]) -> None:
        """Any devices: the rank follows the domain, not the device."""

    def client_ranks(self) -> list[int]:
        return sorted(set(self.domain_ranks))

    # -- the server half -----------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        d = self.domain(client_id)
        steps = max(1, round(self.domain_steps[d] * server.default_steps(client_id)))
        return {"steps": steps, "options": {"rank": self.domain_ranks[d], "domain": d}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        """Per domain, the sample-weighted mean of its clients' experts (of LoRA factors: FedAvg of A and of B,
        :func:`~hetfl.models.lora.aggregate_naive`); an expert no client of the round trained stays."""
        new = server.params.clone()
        for d, seg in enumerate(self.segments(self.layers(server.trainer))):
            mine = [u for u in updates if u.task.options["domain"] == d]
            if mine:
                new[seg] = weighted_mean(mine)
        return new

    # -- the client half -----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        layers = self.layers(trainer)
        d = int(task.options["domain"])
        start = self.experts(layers, task.params)[d]
        factors, loss = self.train_adapters(trainer, layers, trainer.initial, start, data, task.steps, seed)
        return ClientResult(self.pack(factors), task.steps, loss, stats={"rank": float(self.domain_ranks[d])})

    def upload_reference(self, server: Server, task: Task) -> torch.Tensor:
        """The task's domain's expert as it left the server: all a client sends back."""
        return task.params[self.segments(self.layers(server.trainer))[int(task.options["domain"])]]

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        size = 4 * self.expert_numel(self.layers(server.trainer), task.options["domain"])
        return size, size  # its own expert, each way

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return params  # every expert: the ensemble (scored by scorer)

    def scorer(self, trainer) -> Ensemble:
        return Ensemble(self, trainer)

    def describe_transfer(self, trainer) -> str:
        layers = self.layers(trainer)
        sizes = ", ".join(f"{4 * self.expert_numel(layers, d) / 1e3:.1f}" for d in range(self.domains))
        return f"{self.domains} domain experts (ranks {self.domain_ranks}); a task moves its own: {sizes} kB"

    def metrics(self) -> dict[str, float]:
        return {}
