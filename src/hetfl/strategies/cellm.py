"""CELLM: federated LoRA whose uploads are sparse (top-k of the adapters' change, with error feedback).

Vavekanand and Sam, "CELLM: An Efficient Communication in Large Language Models Training for Federated
Learning" (arXiv:2407.20557). From the paper: clients train low-rank adapters (LoRA) on a frozen base to
cut local compute, and communicate *sparse* updates to cut communication, reporting up to 10x fewer bytes
than dense LoRA; it stresses choosing the rank and the sparsity together.

Our choices (the abstract fixes neither the sparsifier nor what happens to what is left out):

- Everything but the upload is :class:`~hetfl.strategies.fedlora.FedLoRA` with ``aggregation: hetlora``
  (ranks per client from ``rank``/``ranks``, the server's adapters of the largest rank truncated for each
  client, the zero-padded weighted mean).
- The upload. A task starts from the adapters ``s`` it downloaded (the rank-r truncation) and trains them
  to ``x``. With error feedback (``error_feedback: true``, the default) the client adds what it left out
  last time, ``e``::

      acc  = (x - s) + e
      I    = the k = ceil(density * numel) entries of acc of largest magnitude (ties to the lower index;
             :func:`hetfl.compression.topk_indices`, the rule of the gRPC ``topk`` encoding)
      send   acc[I] and I                       (8 k bytes: float32 values, int32 indices)
      e    <- acc with acc[I] set to 0          (kept in the client's state for its next task)

  The server rebuilds the client's adapters as ``s + sparse(acc)`` (it knows ``s``: it sent it) and
  aggregates them as HetLoRA does. A client whose rank changed since its last task drops its residual.
- Downloads stay dense (the rank-r truncation of the server's adapters), as in fedlora: the server's
  mean of sparse updates is not sparse.

Bytes (``transfer_bytes``): down ``4 r sum_layers (d_in + d_out)``; up ``8 k``, k as above for that
numel. The simulator times and counts exactly those. (In a gRPC deployment the client's result is the
rebuilt dense adapters; set ``deploy.compression: topk`` to send them sparse on the wire.)

Cost: as fedlora (the top-k selection is O(numel) and not charged).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hetfl.compression import topk_indices
from hetfl.models.lora import truncate
from hetfl.strategies.base import ClientData, ClientResult, Server, Task
from hetfl.strategies.fedlora import FedLoRA
from hetfl.strategies.selection import Selection


def sparsify(delta: torch.Tensor, residual: torch.Tensor | None, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with error feedback: ``(sent, new_residual)`` for ``acc = delta + residual`` (module docstring).

    ``sent`` is ``acc`` on its ``ceil(density * numel)`` largest-magnitude entries and 0 elsewhere;
    ``new_residual = acc - sent``. ``residual`` None: none (no error feedback, or a first task).
    """
    acc = delta if residual is None else delta + residual
    chosen = torch.from_numpy(topk_indices(acc.detach().cpu().numpy(), density))
    sent = torch.zeros_like(acc)
    sent[chosen] = acc[chosen]
    return sent, acc - sent


class CELLM(FedLoRA):
    """CELLM: HetLoRA fine-tuning with top-k sparse uploads of the adapters' change and error feedback.

    Parameters
    ----------
    density : float, default 0.1
        Share of the adapters' numbers a client uploads, in (0, 1]; 1 is fedlora (hetlora), up to float rounding.
    error_feedback : bool, default True
        Keep what was not sent and add it to the client's next update.
    rank : int, default 4
        Every client's rank, unless ``ranks`` is set.
    ranks : list of int or dict of str to int, optional
        Ranks by device speed or by compute tier (as :class:`~hetfl.strategies.fedlora.FedLoRA`).
    targets : list of str, optional
        Linear layers with adapters (default q and v on TinyLM).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "cellm"

    def __init__(
        self,
        *,
        density: float = 0.1,
        error_feedback: bool = True,
        rank: int = 4,
        ranks: list[int] | dict[str, int] | None = None,
        targets: list[str] | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1] (the share of adapter numbers uploaded, e.g. 0.1); got {density}")
        super().__init__(aggregation="hetlora", rank=rank, ranks=ranks, targets=targets,
                         clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        self.density, self.error_feedback = density, error_feedback

    def sent_count(self, numel: int) -> int:
        """How many numbers a client of ``numel`` adapter numbers uploads (the k of top-k)."""
        return math.ceil(self.density * numel)

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        numel = self.adapter_numel(self.layers(server.trainer), task.options["rank"])
        return 4 * numel, 8 * self.sent_count(numel)

    def describe_transfer(self, trainer) -> str:
        layers = self.layers(trainer)
        ranks = self.client_ranks()
        sizes = [self.adapter_numel(layers, r) for r in (ranks[0], ranks[-1])]
        return (f"adapters of rank {ranks[0]}-{ranks[-1]}, {4 * sizes[0] / 1e3:.1f}-{4 * sizes[1] / 1e3:.1f} kB down, "
                f"{8 * self.sent_count(sizes[0]) / 1e3:.1f}-{8 * self.sent_count(sizes[1]) / 1e3:.1f} kB up "
                f"(top {self.density:g}, values and indices)")

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        layers = self.layers(trainer)
        rank = int(task.options["rank"])
        start = [truncate(A, B, rank) for A, B in self.unpack(layers, task.params, self.max_rank)]
        factors, loss = self.train_adapters(trainer, layers, trainer.initial, start, data, task.steps, seed)
        s = self.pack(start)
        residual = state.get("residual") if self.error_feedback else None
        if residual is not None and residual.shape != s.shape:
            residual = None  # a new rank: the old residual's coordinates mean something else
        sent, residual = sparsify(self.pack(factors) - s, residual, self.density)
        if self.error_feedback:
            state["residual"] = residual
        return ClientResult(s + sent, task.steps, loss,
                            stats={"rank": float(rank), "sent": float(self.sent_count(s.numel()))})
