"""Cost accounting: FLOPs of a training step and exact bytes of a model transfer.

FLOPs count multiply-adds as two operations, for the layers that dominate (linear and
convolution); a training step costs three forward passes' worth (forward, and backward
for activations and for weights), the usual estimate (Kaplan et al. 2020).

A linear layer applied to a sequence ``(1, L, d_in)`` counts once per position. For a
:class:`~hetfl.models.transformer.TinyLM` the two matrix products of attention that are no
``nn.Linear`` are added (``q k^T`` and ``attn v``: ``2 * 2 * L^2 * n_heads * d_head`` per layer,
the causal mask's skipped half included, as dense kernels compute it), and so is the tied
output projection ``h E^T`` (``2 * L * d_model * vocab``). Embedding look-ups, layer norms,
softmax and activations are left out (a few percent at these sizes).
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
        positions = output.numel() // module.out_features  # 1 for a feature vector, L for a sequence
        total += 2.0 * module.in_features * module.out_features * positions

    def attention_hook(module, inputs, output) -> None:
        nonlocal total
        L = inputs[0].shape[1]
        total += 2.0 * 2.0 * L * L * module.n_heads * module.d_head

    def tied_head_hook(module, inputs, output) -> None:
        nonlocal total
        if module.head is None:
            total += 2.0 * inputs[0].shape[1] * module.d_model * module.vocab_size

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = 2.0 * (module.in_channels // module.groups) * kh * kw
        total += per_output * output[0].numel()

    from hetfl.models.transformer import CausalSelfAttention, TinyLM

    handles = []
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            handles.append(m.register_forward_hook(attention_hook))
        elif isinstance(m, TinyLM):
            handles.append(m.register_forward_hook(tied_head_hook))
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
