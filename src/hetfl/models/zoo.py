"""The built-in models, and :func:`build_model`, which builds any model a config names, built-in or a user's.

Every model a config names goes through one door, :func:`hetfl.registry.resolve` (``model.name``,
``model.zoo.<i>.name``): the built-in names are import paths like a user's, ``logreg``, ``mlp``, ``cnn``,
``cnn1d`` (1-d signals, MNIST-1D) and ``resnet`` (CIFAR-style, with BatchNorm) the factories of this module and
``tinylm`` :func:`hetfl.models.transformer.tinylm`. A factory (or an
``nn.Module`` class) is called with its own keyword parameters (for built-ins the config's size keys:
``hidden``, ``channels``, ``blocks``, ``d_model``, ...; unset ``channels``: the factory's own default; for a
user's model ``model.params``) and, where its signature
asks for them, what hetfl knows of the data: ``input_shape``, ``n_classes``, ``vocab_size`` (token inputs)
and ``feature_dim`` (``model.feature_dim``).

Any ``torch.nn.Module`` trains with the plain algorithms (FedAvg and kin); see
:class:`hetfl.training.local.LocalTrainer` for what is federated (parameters and floating-point buffers).
Algorithms that split a model into a body and a classifier head, or share what lies on the representation
(FedPer, FedRep, LG-FedAvg, FedProto, FedGH, adapters, pFedGate with a dense head), need to find the head:

**The head protocol.** The model has an attribute ``head``, an ``nn.Linear`` classifier whose parameters are
the last of ``model.parameters()``; its input is the model's representation. Every built-in classifier has
one (a read-only property naming its last ``nn.Linear``, so it adds no parameters and no ``state_dict`` key).
A model without it trains under every other algorithm; the head algorithms refuse it in one line.

``tinylm`` is the language model of the ``text`` dataset (:class:`hetfl.models.transformer.TinyLM`, its
context the data's sequence length, vocabulary the data's): it maps token ids ``(N, L)`` to next-token
logits ``(N, L, V)`` and has no classifier head in the sense above (its output projection is the tied
token embedding), so the head-sharing algorithms do not apply to it.

Inputs are either float features shaped ``input_shape`` or integer token sequences (LEAF Shakespeare),
which are one-hot encoded by :class:`OneHot` in front of the built-in classifiers.

Every built-in classifier is a *body* followed by a linear classifier *head* (its last ``nn.Linear``).
Given ``feature_dim``, every architecture hands its head a representation of that width, so models
of different families can share a head, class prototypes or an adapter on the representation
(model-heterogeneous FL): the MLP appends a hidden layer of that width unless its last one has it,
the CNNs project their flattened feature map (ResNet: its pooled one) with Linear + ReLU, and logistic regression becomes a
linear model with a rank-``feature_dim`` bottleneck (Linear, no activation, then the head).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from hetfl import registry
from hetfl.config import ArchitectureConfig
from hetfl.errors import ConfigError

SIZE_KEYS = ("hidden", "channels", "blocks", "d_model", "n_heads", "d_ff", "n_layers", "prompt_tokens")
"""The config's size keys (:class:`~hetfl.config.ArchitectureConfig`), passed to a built-in factory that takes them."""


class OneHot(nn.Module):
    """(N, L) token ids -> (N, L * vocab) floats."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x, self.vocab_size).flatten(1).float()


class TokenClassifier(nn.Sequential):
    """``OneHot`` then a classifier: an ``nn.Sequential`` (its ``state_dict`` keys ``0.``, ``1.``) whose ``head``
    is the classifier's."""

    @property
    def head(self) -> nn.Linear:
        return self[-1].head


class LogisticRegression(nn.Module):
    """A linear classifier; with ``feature_dim``, a linear map to that width first (still a linear model)."""

    def __init__(self, in_features: int, n_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.project = nn.Linear(in_features, feature_dim) if feature_dim else nn.Identity()
        self.linear = nn.Linear(feature_dim or in_features, n_classes)

    @property
    def head(self) -> nn.Linear:
        return self.linear

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

    @property
    def head(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class _ConvClassifier(nn.Module):
    """Convolutional ``features`` over inputs reshaped to ``shape``, flattened (``width`` numbers), then an optional
    ``feature_dim`` projection and a linear classifier: the :attr:`head` of the head and prototype algorithms."""

    def __init__(self, shape: tuple[int, ...], features: nn.Sequential, width: int, n_classes: int,
                 feature_dim: int | None) -> None:
        super().__init__()
        self.shape = shape
        self.features = features
        self.project = nn.Sequential(nn.Linear(width, feature_dim), nn.ReLU()) if feature_dim else nn.Identity()
        self.classifier = nn.Linear(feature_dim or width, n_classes)

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.shape)
        return self.classifier(self.project(self.features(x).flatten(1)))


class CNN(_ConvClassifier):
    """Conv(3x3) -> ReLU -> MaxPool(2) blocks, then a linear classifier.

    Pooling stops once the feature map is 2x2 or smaller, so 8x8 digits and 32x32 CIFAR both work.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], channels: list[int], n_classes: int, feature_dim: int | None = None
    ) -> None:
        c, h, w = image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if min(h, w) >= 4:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        super().__init__(image_shape, nn.Sequential(*blocks), c * h * w, n_classes, feature_dim)


class CNN1D(_ConvClassifier):
    """Conv1d(kernel 5, stride 2) -> ReLU blocks over a signal, then a linear classifier on the flattened features.

    Each block halves the length until it is 4 or shorter (later blocks keep it), so MNIST-1D's 40 points become
    20, 10, 5. No pooling to one value: where a feature lies in the signal is kept for the head. The shape is that
    of the 1-D CNN of Greydanus (2020), arXiv:2011.14439, with ``channels`` for its three blocks of 25.
    """

    def __init__(
        self, signal_shape: tuple[int, int], channels: list[int], n_classes: int, feature_dim: int | None = None
    ) -> None:
        c, length = signal_shape
        blocks: list[nn.Module] = []
        for out in channels:
            stride = 2 if length > 4 else 1
            blocks += [nn.Conv1d(c, out, kernel_size=5, stride=stride, padding=2), nn.ReLU()]
            length = (length - 1) // stride + 1
            c = out
        super().__init__(signal_shape, nn.Sequential(*blocks), c * length, n_classes, feature_dim)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 convolution where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), arXiv:1512.03385, section 4.2: a 3x3 convolution of ``channels[0]``,
    then one stage per entry of ``channels``, each of ``blocks`` :class:`BasicBlock` (the first of each stage after
    the first halves the resolution), global average pooling and a linear classifier. ``channels`` (16, 32, 64) is
    ResNet-(6 * blocks + 2): ResNet-8 with one block per stage, ResNet-20 with three."""

    def __init__(
        self, image_shape: tuple[int, int, int], channels: list[int], blocks: int, n_classes: int,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.image_shape = image_shape
        self.stem = nn.Sequential(
            nn.Conv2d(image_shape[0], channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c = channels[0]
        for stage, out in enumerate(channels):
            for b in range(blocks):
                layers.append(BasicBlock(c, out, stride=2 if stage > 0 and b == 0 else 1))
                c = out
        self.stages = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU()) if feature_dim else nn.Identity()
        self.classifier = nn.Linear(feature_dim or c, n_classes)

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x.reshape(x.shape[0], *self.image_shape)))
        return self.classifier(self.project(x.mean(dim=(2, 3))))


def _image_shape(input_shape: tuple[int, ...], name: str = "cnn") -> tuple[int, int, int]:
    """Image shape for a CNN: (C,H,W) as given, (H,W) with one channel, or a flat square (64 -> 1x8x8)."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    side = math.isqrt(input_shape[0])
    if side * side == input_shape[0]:
        return (1, side, side)
    raise ConfigError(
        f"model.name: {name} needs image inputs (C,H,W) or a square number of features; got shape {input_shape}"
    )


def _signal_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Signal shape for a 1-d CNN: (C,L) as given, (L,) with one channel."""
    if len(input_shape) == 2:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 1:
        return (1, input_shape[0])
    raise ConfigError(
        f"model.name: cnn1d needs 1-d signals, (C,L) or (L,) features (e.g. data.dataset mnist1d); got shape "
        f"{input_shape}; use cnn or resnet for images"
    )


def _classifier(body: nn.Module, vocab_size: int | None) -> nn.Module:
    """``body`` as it is for float features, after a one-hot encoding for token inputs."""
    return body if vocab_size is None else TokenClassifier(OneHot(vocab_size), body)


def _in_features(input_shape: Sequence[int], vocab_size: int | None) -> int:
    return math.prod(input_shape) * (vocab_size or 1)


# --------------------------------------------------------------------------- the built-in factories
def logreg(
    *, input_shape: Sequence[int], n_classes: int, vocab_size: int | None = None, feature_dim: int | None = None
) -> nn.Module:
    """Logistic regression (:class:`LogisticRegression`): ``model.name: logreg``."""
    in_features = _in_features(input_shape, vocab_size)
    return _classifier(LogisticRegression(in_features, n_classes, feature_dim), vocab_size)


def mlp(
    *,
    input_shape: Sequence[int],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
    hidden: Sequence[int] = (64,),
) -> nn.Module:
    """A ReLU MLP of hidden widths ``hidden`` (:class:`MLP`): ``model.name: mlp``."""
    in_features = _in_features(input_shape, vocab_size)
    return _classifier(MLP(in_features, list(hidden), n_classes, feature_dim), vocab_size)


def cnn(
    *,
    input_shape: Sequence[int],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
    channels: Sequence[int] = (16, 32),
) -> nn.Module:
    """A small CNN of conv blocks of ``channels`` (:class:`CNN`): ``model.name: cnn``; image inputs only."""
    if vocab_size is not None:
        raise ConfigError("model.name: cnn does not take token (text) inputs; use logreg or mlp")
    return CNN(_image_shape(tuple(input_shape)), list(channels), n_classes, feature_dim)


def cnn1d(
    *,
    input_shape: Sequence[int],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
    channels: Sequence[int] = (32, 32, 32),
) -> nn.Module:
    """A 1-d CNN of conv blocks of ``channels`` (:class:`CNN1D`): ``model.name: cnn1d``; signal inputs only."""
    if vocab_size is not None:
        raise ConfigError("model.name: cnn1d does not take token (text) inputs; use logreg or mlp")
    return CNN1D(_signal_shape(tuple(input_shape)), list(channels), n_classes, feature_dim)


def resnet(
    *,
    input_shape: Sequence[int],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
    channels: Sequence[int] = (16, 32, 64),
    blocks: int = 1,
) -> nn.Module:
    """A CIFAR-style ResNet of stages of ``channels``, ``blocks`` residual blocks each (:class:`ResNet`):
    ``model.name: resnet``; image inputs only. Its BatchNorm makes it train one task at a time (``training.vectorize``
    falls back). On 3x32x32 inputs ResNet-8 (``blocks: 1``) has 78k parameters and 25 MFLOP a sample forward,
    ResNet-20 (``blocks: 3``) 272k and 82 MFLOP; a step of 32 CIFAR images of ResNet-8 took about 0.12 CPU-seconds
    on one thread (a busy 2-core machine), so an epoch of CIFAR-10 is minutes per client: CIFAR-10 with this model is
    practical with ``training.device: cuda`` (or ``auto``) on a machine with a GPU."""
    if vocab_size is not None:
        raise ConfigError("model.name: resnet does not take token (text) inputs; use logreg or mlp")
    if not channels:
        raise ConfigError("model.channels: resnet needs the width of at least one stage, e.g. [16, 32, 64]")
    return ResNet(_image_shape(tuple(input_shape), "resnet"), list(channels), blocks, n_classes, feature_dim)


# --------------------------------------------------------------------------- any model
def build_model(
    cfg: ArchitectureConfig,
    input_shape: tuple[int, ...],
    n_classes: int,
    vocab_size: int | None = None,
    feature_dim: int | None = None,
    key: str = "model.name",
) -> nn.Module:
    """The model ``cfg.name`` names, for inputs of ``input_shape`` (token inputs when ``vocab_size`` is set).

    ``cfg.name`` is resolved by :func:`hetfl.registry.resolve` and called by :func:`hetfl.registry.call` with
    its parameters (a built-in: the size keys of ``cfg`` it takes; a model of one's own: ``cfg.params``) and,
    where its signature asks, ``input_shape``, ``n_classes``, ``vocab_size`` and ``feature_dim`` (the width of
    the representation the head receives, see the module docstring; None keeps each architecture's natural
    width). ``key`` is the config key that named it (``model.name``, ``model.zoo.<i>.name``), for messages:
    every error is a one-line :class:`~hetfl.errors.ConfigError` naming it.
    """
    resolved = registry.resolve("model", cfg.name, key=key)
    factory = resolved.obj
    if resolved.builtin:
        accepted = inspect.signature(factory).parameters
        params = {name: getattr(cfg, name) for name in SIZE_KEYS if name in accepted and getattr(cfg, name) is not None}
    else:
        params = dict(cfg.params)
    provided = {"input_shape": tuple(input_shape), "n_classes": n_classes, "vocab_size": vocab_size,
                "feature_dim": feature_dim}
    try:
        model = registry.call(factory, provided, params, key=key, spec=cfg.name)
    except ConfigError as err:  # a built-in's own message names model.name: name the key that named it
        text = str(err)
        if key != "model.name" and text.startswith("model.name: "):
            raise ConfigError(f"{key}: {text.removeprefix('model.name: ')}") from None
        raise
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{key}: {cfg.name} returned {type(model).__name__}, not a torch.nn.Module; return the model itself"
        )
    return model
