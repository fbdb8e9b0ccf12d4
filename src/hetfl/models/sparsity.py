"""Unstructured sparsity of classifiers: which weights may be pruned, and what a pruned model costs.

Shared by the pruning strategies (:mod:`hetfl.strategies.hidenseek`, :mod:`hetfl.strategies.fedtiny`):

- :func:`prunable`: the weights (two or more dimensions) of every ``nn.Linear`` and convolution, as a mask over the
  model's flat parameter vector (``model.parameters()`` order, no buffers); :func:`weight_slices`: each such layer's
  slice of that vector.
- :func:`sparse_forward_share`: sparse forward FLOPs / dense, as hardware that skips pruned weights computes them: a
  prunable layer's forward FLOPs (:func:`~hetfl.models.cost.flops_by_module`) scale with the share of its weights
  kept (every weight of a linear layer or a convolution takes part in the same number of multiply-adds), the rest of
  the forward pass is charged in full.
- :func:`sparse_bytes`: k values of a tensor of n entries sent sparse: the values, and their positions as int32
  indices or as a bitmask of n bits, whichever is smaller.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hetfl.models.cost import flops_by_module

_KINDS = (nn.Linear, nn.modules.conv._ConvNd)


def is_prunable(module: nn.Module) -> bool:
    """A linear layer or a convolution with a weight of two or more dimensions."""
    return isinstance(module, _KINDS) and module.weight is not None and module.weight.dim() >= 2


def prunable(model: nn.Module) -> torch.Tensor:
    """Which entries of the model's flat parameter vector (``model.parameters()`` order, no buffers) are prunable:
    the weights (two or more dimensions) of every ``nn.Linear`` and convolution."""
    weights = {id(m.weight) for m in model.modules() if is_prunable(m)}
    return torch.cat([torch.full((p.numel(),), id(p) in weights) for p in model.parameters()])


def weight_slices(model: nn.Module) -> list[tuple[str, slice]]:
    """Each prunable layer's module name and the slice of its weight in the flat parameter vector, in
    ``model.named_modules()`` order."""
    offsets, offset = {}, 0
    for p in model.parameters():
        offsets[id(p)] = offset
        offset += p.numel()
    return [(name, slice(offsets[id(m.weight)], offsets[id(m.weight)] + m.weight.numel()))
            for name, m in model.named_modules() if is_prunable(m)]


def sparse_forward_share(model: nn.Module, input_shape: tuple[int, ...], kept: torch.Tensor) -> float:
    """Sparse forward FLOPs / dense for the kept entries ``kept`` of the flat parameter vector (module docstring)."""
    flops = flops_by_module(model, input_shape)
    if not flops[""]:
        return 1.0
    sparse = flops[""]
    for name, where in weight_slices(model):
        sparse -= flops[name] * (1 - float(kept[where].double().mean()))
    return sparse / flops[""]


def sparse_bytes(k: int, n: int, itemsize: int = 4) -> int:
    """Bytes of ``k`` values of a tensor of ``n`` entries sent sparse: the values, and their positions as int32
    indices (4 bytes each) or as a bitmask (``ceil(n / 8)``), whichever is smaller."""
    return k * itemsize + min(4 * k, math.ceil(n / 8))
