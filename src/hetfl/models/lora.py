"""LoRA adapters and the server arithmetic of heterogeneous-rank federated LoRA (HetLoRA, FLoRA).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) freezes a
linear layer ``W`` (d_out x d_in) and learns a low-rank change::

    y = W x + b + s * B A x,      A: r x d_in,  B: d_out x r,  s = alpha / r,  B = 0 at the start

With heterogeneous ranks ``r_k`` and client weights ``p_k`` (normalised to sum to one), the update
the server wants is ``sum_k p_k B_k A_k``. Averaging the factors separately does not give it:
``(sum_k p_k B_k)(sum_k p_k A_k) = sum_k sum_l p_k p_l B_k A_l`` has cross terms. The two rules here:

HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, arXiv:2401.06432) -- :func:`aggregate_hetlora`::

    A~_k, B~_k = A_k, B_k zero-padded to the global rank R = max_k r_k
    A = sum_k p_k A~_k,   B = sum_k p_k B~_k            (server keeps rank R)
    client j downloads truncate(A, B, r_j) = (A[:r_j], B[:, :r_j])

  The global product ``B A`` keeps the cross terms above, and client j receives
  ``sum_{i < r_j} B[:, i] A[i, :]``, the first ``r_j`` rank-one components. Component ``i`` is averaged
  over all clients with the zeros of those with ``r_k <= i`` included, so it is shrunk by
  ``sum_{k: r_k > i} p_k``. HetLoRA's sparsity-weighted aggregation sets ``p_k`` proportional to
  ``||B_k A_k||_F`` (:func:`hetlora_sparsity_weights` for one layer; :func:`sparsity_weights` for a
  client's adapters on several layers, :func:`adapter_norm`); its local rank self-pruning is a
  client-side rule not implemented here.

FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv:2409.05976) -- :func:`aggregate_flora`::

    A = [p_1 A_1; p_2 A_2; ...; p_K A_K]   (sum_k r_k) x d_in,  stacked along the rank dimension
    B = [B_1, B_2, ..., B_K]               d_out x (sum_k r_k), unscaled
    B A = sum_k p_k B_k A_k                exactly (block matrix product)

  The stacked rank grows with the number of clients, so FLoRA's server sends the stack and every
  client merges ``B A`` into its frozen base weight (:func:`merge_into`) and starts the next round with
  fresh adapters of its own rank (A random, B zero). Keeping the stack as an adapter instead
  (:func:`load_lora_state` with the stacked factors, rank ``sum_k r_k``) is for when the base weight
  must stay untouched, e.g. to evaluate or undo the round's update.

The functions act on raw factors. The scaling ``s = alpha / r`` is fixed per adapter when it is
created (:class:`LoRALinear` keeps it when factors of another rank are loaded); when clients' scalings
differ, pass ``s_k * A_k`` as the k-th A so the products stay what each client applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen :class:`~torch.nn.Linear` plus a trainable low-rank change ``s * B @ A``.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt; its parameters are frozen (``requires_grad = False``).
    rank : int
        The rank ``r`` of the adapter.
    alpha : float, optional
        Scaling numerator; ``s = alpha / rank``. Defaults to ``rank`` (``s = 1``), so that adapters of
        different ranks apply their factors on the same scale.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer; got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = float(alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the nn.Linear default, as in Hu et al.

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The change of the weight, ``s * B @ A`` (d_out x d_in)."""
        return self.scaling * self.B @ self.A

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replace the factors, possibly with another rank; the scaling ``s`` stays as it was."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"A (r x d_in) and B (d_out x r) must share the rank; got {tuple(A.shape)}, {tuple(B.shape)}")
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"factors {tuple(A.shape)}, {tuple(B.shape)} do not fit a {self.out_features}x{self.in_features} layer"
            )
        dtype = self.base.weight.dtype
        self.A = nn.Parameter(A.detach().to(dtype).clone())
        self.B = nn.Parameter(B.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.A.T) @ self.B.T)


def attach_lora(
    model: nn.Module, rank: int, *, targets: Sequence[str] = ("q", "v"), alpha: float | None = None
) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose attribute name is in ``targets`` with LoRA.

    Names are the last component of the module path (``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``,
    ``head`` in :class:`~hetfl.models.transformer.TinyLM`). Afterwards only the adapters' ``A`` and ``B``
    are trainable. The model is changed in place and returned.
    """
    hits = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in set(targets)
    ]
    if not hits:
        raise ValueError(f"no nn.Linear named one of targets={tuple(targets)} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in hits:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(module, rank=rank, alpha=alpha))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter of ``model`` by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every adapter's factors: ``{"<path>.A": A, "<path>.B": B}``."""
    state: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.A"] = m.A.detach().clone()
        state[f"{name}.B"] = m.B.detach().clone()
    return state


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load factors into every adapter of ``model``; the rank follows the loaded tensors."""
    for name, m in lora_modules(model).items():
        missing = [k for k in (f"{name}.A", f"{name}.B") if k not in state]
        if missing:
            raise KeyError(f"LoRA state has no {missing[0]}")
        m.set_factors(state[f"{name}.A"], state[f"{name}.B"])


@torch.no_grad()
def merge_into(linear: nn.Linear | LoRALinear, delta: torch.Tensor) -> None:
    """Add ``delta`` (d_out x d_in) to the weight of ``linear`` in place (into the base of an adapter)."""
    target = linear.base if isinstance(linear, LoRALinear) else linear
    if tuple(delta.shape) != tuple(target.weight.shape):
        raise ValueError(f"delta shape {tuple(delta.shape)} differs from the weight shape {tuple(target.weight.shape)}")
    target.weight.add_(delta.to(target.weight.dtype))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter merged (``W + s B A``) and unwrapped to a plain trainable Linear."""
    model = copy.deepcopy(model)
    for name, m in lora_modules(model).items():
        merge_into(m, m.delta())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- server arithmetic on factor lists -----------------------------------------------------------------


def _check(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights) -> torch.Tensor:
    """Validate factor pairs and return the weights normalised to sum to one."""
    if len(As) != len(Bs) or len(As) == 0:
        raise ValueError(f"need one A and one B per client; got {len(As)} A and {len(Bs)} B")
    for k, (A, B) in enumerate(zip(As, Bs)):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"client {k}: A {tuple(A.shape)} and B {tuple(B.shape)} must share the rank")
        if A.shape[1] != As[0].shape[1] or B.shape[0] != Bs[0].shape[0]:
            raise ValueError(f"client {k}: factors of a different layer shape than client 0")
    w = torch.as_tensor(weights, dtype=As[0].dtype).flatten()
    if w.numel() != len(As):
        raise ValueError(f"need one of weights per client ({len(As)}); got {w.numel()}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return w / w.sum()


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (r x d_in) with rows and ``B`` (d_out x r) with columns up to ``rank``; ``B A`` is unchanged."""
    r = A.shape[0]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}; use truncate")
    return (torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1))


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` components: ``(A[:rank], B[:, :rank])`` (HetLoRA's download to a rank-``rank`` client)."""
    if not 1 <= rank <= A.shape[0]:
        raise ValueError(f"rank must be in 1..{A.shape[0]}; got {rank}")
    return A[:rank].clone(), B[:, :rank].clone()


def aggregate_hetlora(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA: zero-pad every client's factors to ``rank`` (default the largest) and average them.

    Returns the global ``(A, B)`` of rank ``rank``; see the module docstring for the product it yields.
    """
    w = _check(As, Bs, weights)
    top = max(A.shape[0] for A in As)
    rank = top if rank is None else rank
    if rank < top:
        raise ValueError(f"global rank {rank} is below the largest client rank {top}")
    padded = [pad_rank(A, B, rank) for A, B in zip(As, Bs)]
    A = sum(wk * Ak for wk, (Ak, _) in zip(w, padded))
    B = sum(wk * Bk for wk, (_, Bk) in zip(w, padded))
    return A, B


def hetlora_sparsity_weights(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """HetLoRA's sparsity-weighted aggregation weights: ``p_k = ||B_k A_k||_F / sum_l ||B_l A_l||_F``."""
    _check(As, Bs, [1.0] * len(As))
    return sparsity_weights([[(A, B)] for A, B in zip(As, Bs)])


def adapter_norm(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Frobenius norm of the change a client's adapters make, over all its layers at once:
    ``sqrt(sum_layers ||B_l A_l||_F^2)`` for ``factors`` = one ``(A, B)`` per layer."""
    return torch.sqrt(sum(torch.linalg.matrix_norm(B @ A) ** 2 for A, B in factors))


def sparsity_weights(clients: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """HetLoRA's sparsity weights (Cho et al., arXiv:2401.06432) of clients with adapters on several layers::

        p_k = ||dW_k||_F / sum_j ||dW_j||_F,      ||dW_k||_F = adapter_norm(client k's factors)

    ``clients``: per client, one ``(A, B)`` per layer. Equal weights when every norm is 0 (adapters that
    change nothing, e.g. B = 0 before any training)."""
    if not clients:
        raise ValueError("need the factors of at least one client")
    norms = torch.stack([adapter_norm(factors) for factors in clients])
    if not torch.isfinite(norms).all():
        raise ValueError("a client's adapters are not finite")
    if norms.sum() <= 0:
        return torch.full_like(norms, 1.0 / len(norms))
    return norms / norms.sum()


def aggregate_flora(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA: stack ``p_k A_k`` and ``B_k`` along the rank, so that ``B @ A == sum_k p_k B_k A_k`` exactly."""
    w = _check(As, Bs, weights)
    A = torch.cat([wk * Ak for wk, Ak in zip(w, As)], dim=0)
    B = torch.cat(list(Bs), dim=1)
    return A, B


def aggregate_naive(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of the factors separately (equal ranks only): ``(sum p_k A_k, sum p_k B_k)``; inexact, for comparison."""
    w = _check(As, Bs, weights)
    if len({A.shape[0] for A in As}) != 1:
        raise ValueError("naive factor averaging needs equal ranks; use aggregate_hetlora or aggregate_flora")
    return sum(wk * Ak for wk, Ak in zip(w, As)), sum(wk * Bk for wk, Bk in zip(w, Bs))
