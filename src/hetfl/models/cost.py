"""Cost accounting: FLOPs of a training step and exact bytes of a model transfer.

FLOPs are counted by torch itself, :class:`torch.utils.flop_counter.FlopCounterMode`, on one forward pass of
the model (any ``torch.nn.Module``) on a batch of one sample, in ``eval`` mode. It counts the operations that
dominate: matrix products (``mm``, ``addmm``, ``bmm``, ``matmul`` however they are reached: ``nn.Linear``,
``x @ W``, attention's ``q k^T`` and ``attn v``), convolutions (and their transposes) and fused attention
(``scaled_dot_product_attention``), each multiply-add as two operations. For hetfl's built-in models that is
exactly the count the hand-written formulas gave (``tests/test_models.py`` writes them out):

- a linear layer ``d_in -> d_out`` on a sequence ``(1, L, d_in)``: ``2 * L * d_in * d_out`` (``L = 1`` for a
  feature vector); the bias add is not counted;
- a convolution: ``2 * (C_in / groups) * k_h * k_w`` per output element; the bias add is not counted;
- TinyLM's attention, which is no ``nn.Linear``: ``2 * 2 * L^2 * n_heads * d_head`` per layer (the causal
  mask's skipped half included, as dense kernels compute it), and its tied output projection ``h E^T``:
  ``2 * L * d_model * vocab``.

Left out, by torch's counter as by the formulas before it: embedding look-ups, normalisation (BatchNorm,
LayerNorm), softmax, activations, pooling and element-wise arithmetic (residual adds): a few percent at these
sizes, more for a model made mostly of them. A training step costs three forward passes' worth (forward, and
backward for activations and for weights), the usual estimate (Kaplan et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hetfl.errors import ConfigError

BACKWARD_FACTOR = 3.0


def batch_share(batch_size: int, n_samples: int | None) -> float:
    """The share of a full batch of ``batch_size`` that a client with ``n_samples`` samples trains on in a step:
    ``min(batch_size, n) / batch_size`` (its batches hold all it has, ``LocalTrainer.batches``); 1 when ``n`` is
    unknown (None). A step priced for a full batch is scaled by it."""
    if n_samples is None or n_samples >= batch_size:
        return 1.0
    return max(n_samples, 1) / batch_size


def flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], token_input: bool = False) -> float:
    """Forward-pass FLOPs for one sample: :class:`~torch.utils.flop_counter.FlopCounterMode` on a forward pass of
    zeros of shape ``(1, *input_shape)`` (token ids 0 if ``token_input``), the model in ``eval`` mode (put back in
    the mode it was in). Exceptions of the forward pass propagate."""
    return float(_count(model, input_shape, token_input).get_total_flops())


def flops_by_module(model: nn.Module, input_shape: tuple[int, ...], token_input: bool = False) -> dict[str, float]:
    """Forward-pass FLOPs for one sample of each of the model's modules (``model.named_modules()`` names; a
    parent's count includes its children's; the root's name is ``""``), counted as :func:`flops_per_sample`
    counts them: a pruned model's layers are priced with them (:mod:`hetfl.strategies.hidenseek`)."""
    counts = _count(model, input_shape, token_input).get_flop_counts()
    root = type(model).__name__
    return {name: float(sum(counts.get(f"{root}.{name}" if name else root, {}).values()))
            for name, _ in model.named_modules()}


def sample_shape(trainer, who: str) -> tuple[int, ...]:
    """One sample's shape for ``trainer`` (its ``input_shape``, as the federation built it; for a trainer built by
    hand, its first layer's input if that is an ``nn.Linear``), for pricing its layers; ConfigError naming ``who``
    (e.g. "hidenseek needs the input's shape to prune") when neither is known."""
    if trainer.input_shape is not None:
        return tuple(trainer.input_shape)
    first = next((m for m in trainer.model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if not isinstance(first, nn.Linear):
        raise ConfigError(f"{who} {trainer.label}, which this trainer does not know")
    return (first.in_features,)


def _count(model: nn.Module, input_shape: tuple[int, ...], token_input: bool) -> FlopCounterMode:
    dtype = torch.long if token_input else torch.float32
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        model.train(was_training)
    return counter


def training_flops(forward_flops_per_sample: float, batch_size: int) -> float:
    """FLOPs of one optimiser step on a batch."""
    return BACKWARD_FACTOR * forward_flops_per_sample * batch_size


def model_bytes(model: nn.Module) -> int:
    """Exact bytes of what a transfer of the model carries (raw tensor data, no framing): its parameters and its
    floating-point persistent buffers (BatchNorm's running statistics), as :class:`hetfl.training.LocalTrainer`'s
    flat vector holds them."""
    from hetfl.training.local import federated_buffers

    tensors = [*model.parameters(), *(b for _, b in federated_buffers(model))]
    return sum(t.numel() * t.element_size() for t in tensors)
