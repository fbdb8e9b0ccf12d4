"""The models clients train: small, CPU-friendly, without buffers (the whole state is the parameters).

``tinylm`` is the language model of the ``text`` dataset (:class:`hetfl.models.transformer.TinyLM`, its
context the data's sequence length, vocabulary the data's): it maps token ids ``(N, L)`` to next-token
logits ``(N, L, V)`` and has no classifier head in the sense below (its output projection is the tied
token embedding), so the head-sharing algorithms do not apply to it.

Inputs are either float features shaped ``input_shape`` or integer token sequences (LEAF Shakespeare),
which are one-hot encoded by :class:`OneHot` in front of the model.

Every model is a *body* followed by a linear classifier *head* (the last ``nn.Linear``, whose
parameters are the last in ``parameters()`` order). The head's input is the model's representation.
Given ``feature_dim``, every architecture hands its head a representation of that width, so models
of different families can share a head, class prototypes or an adapter on the representation
(model-heterogeneous FL): the MLP appends a hidden layer of that width unless its last one has it,
the CNN projects its flattened feature map with Linear + ReLU, and logistic regression becomes a
linear model with a rank-``feature_dim`` bottleneck (Linear, no activation, then the head).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from hetfl.config import ArchitectureConfig
from hetfl.errors import ConfigError


class OneHot(nn.Module):
    """(N, L) token ids -> (N, L * vocab) floats."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x, self.vocab_size).flatten(1).float()


class LogisticRegression(nn.Module):
    """A linear classifier; with ``feature_dim``, a linear map to that width first (still a linear model)."""

    def __init__(self, in_features: int, n_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.project = nn.Linear(in_features, feature_dim) if feature_dim else nn.Identity()
        self.linear = nn.Linear(feature_dim or in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.project(x.flatten(1)))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], n_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        if feature_dim and (not hidden or hidden[-1] != feature_dim):
            hidden = [*hidden, feature_dim]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Conv(3x3) -> ReLU -> MaxPool(2) blocks, then a linear classifier.

    Pooling stops once the feature map is 2x2 or smaller, so 8x8 digits and 32x32 CIFAR both work.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], channels: list[int], n_classes: int, feature_dim: int | None = None
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if min(h, w) >= 4:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*blocks)
        width = c * h * w
        self.project = nn.Sequential(nn.Linear(width, feature_dim), nn.ReLU()) if feature_dim else nn.Identity()
        self.classifier = nn.Linear(feature_dim or width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.classifier(self.project(self.features(x).flatten(1)))


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Image shape for a CNN: (C,H,W) as given, (H,W) with one channel, or a flat square (64 -> 1x8x8)."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    side = math.isqrt(input_shape[0])
    if side * side == input_shape[0]:
        return (1, side, side)
    raise ConfigError(
        f"model.name: cnn needs image inputs (C,H,W) or a square number of features; got shape {input_shape}"
    )


def build_model(
    cfg: ArchitectureConfig,
    input_shape: tuple[int, ...],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
) -> nn.Module:
    """Build the configured model for inputs of ``input_shape`` (token inputs when ``vocab_size`` is set).

    ``feature_dim``: the width of the representation the head receives (see the module docstring);
    None keeps each architecture's natural width.
    """
    if cfg.name == "tinylm":
        if vocab_size is None or len(input_shape) != 1:
            raise ConfigError("model.name: tinylm reads token sequences; use data.dataset text")
        from hetfl.models.transformer import TinyLM

        return TinyLM(vocab_size=vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                      n_layers=cfg.n_layers, context=input_shape[0])
    prefix: list[nn.Module] = []
    if vocab_size is not None:
        if cfg.name == "cnn":
            raise ConfigError("model.name: cnn does not take token (text) inputs; use logreg or mlp")
        prefix.append(OneHot(vocab_size))
        in_features = math.prod(input_shape) * vocab_size
    else:
        in_features = math.prod(input_shape)
    if cfg.name == "logreg":
        body: nn.Module = LogisticRegression(in_features, n_classes, feature_dim)
    elif cfg.name == "mlp":
        body = MLP(in_features, cfg.hidden, n_classes, feature_dim)
    else:
        body = CNN(_image_shape(input_shape), cfg.channels, n_classes, feature_dim)
    return nn.Sequential(*prefix, body) if prefix else body
