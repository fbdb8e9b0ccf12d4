"""Cost accounting: FLOPs of a training step and exact bytes of a model transfer.

FLOPs count multiply-adds as two operations, for the layers that dominate (linear and
convolution); a training step costs three forward passes' worth (forward, and backward
for activations and for weights), the usual estimate (Kaplan et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn

BACKWARD_FACTOR = 3.0


def flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], token_input: bool = False) -> float:
    """Forward-pass FLOPs for one sample, measured by hooks on a dry run."""
    total = 0.0

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += 2.0 * module.in_features * module.out_features

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = 2.0 * (module.in_channels // module.groups) * kh * kw
        total += per_output * output[0].numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    dtype = torch.long if token_input else torch.float32
    with torch.no_grad():
        model(torch.zeros((1, *input_shape), dtype=dtype))
    for h in handles:
        h.remove()
    return total


def training_flops(forward_flops_per_sample: float, batch_size: int) -> float:
    """FLOPs of one optimiser step on a batch."""
    return BACKWARD_FACTOR * forward_flops_per_sample * batch_size


def model_bytes(model: nn.Module) -> int:
    """Exact bytes of the parameters as sent over the wire (raw tensor data, no framing)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
