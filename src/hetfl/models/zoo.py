"""The models clients train: small, CPU-friendly, without buffers (the whole state is the parameters).

Inputs are either float features shaped ``input_shape`` or integer token sequences (LEAF Shakespeare),
which are one-hot encoded by :class:`OneHot` in front of the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from hetfl.config import ModelConfig
from hetfl.errors import ConfigError


class OneHot(nn.Module):
    """(N, L) token ids -> (N, L * vocab) floats."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x, self.vocab_size).flatten(1).float()


class LogisticRegression(nn.Module):
    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
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

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], n_classes: int) -> None:
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
        self.classifier = nn.Linear(c * h * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.classifier(self.features(x).flatten(1))


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
    cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int, vocab_size: int | None = None
) -> nn.Module:
    """Build the configured model for inputs of ``input_shape`` (token inputs when ``vocab_size`` is set)."""
    prefix: list[nn.Module] = []
    if vocab_size is not None:
        if cfg.name == "cnn":
            raise ConfigError("model.name: cnn does not take token (text) inputs; use logreg or mlp")
        prefix.append(OneHot(vocab_size))
        in_features = math.prod(input_shape) * vocab_size
    else:
        in_features = math.prod(input_shape)
    if cfg.name == "logreg":
        body: nn.Module = LogisticRegression(in_features, n_classes)
    elif cfg.name == "mlp":
        body = MLP(in_features, cfg.hidden, n_classes)
    else:
        body = CNN(_image_shape(input_shape), cfg.channels, n_classes)
    return nn.Sequential(*prefix, body) if prefix else body
