"""A small ResNet-style CNN with BatchNorm, as a user would bring one.

hetfl calls the class with ``model.params`` and, because the signature asks for them, the data's
``input_shape`` and ``n_classes``. Its BatchNorm running statistics are buffers: hetfl federates them with the
weights (FedAvg averages them; FedBN keeps them on each client). The ``head`` attribute, an ``nn.Linear`` whose
parameters come last, tells the algorithms that split a model into a representation and a classifier head
(FedPer, FedRep, LG-FedAvg, FedProto, ...) where the representation ends.
"""

from __future__ import annotations

import math

from torch import nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a residual connection), then ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + x).relu()


class SmallResNet(nn.Module):
    """A stem, ``blocks`` residual blocks of ``width`` channels, global average pooling and a linear head.

    Parameters
    ----------
    input_shape : tuple
        (C, H, W), or (H, W), or a flat square number of features (64 -> 1x8x8).
    n_classes : int
        Number of classes.
    width : int, default 16
        Channels of every block.
    blocks : int, default 2
        Residual blocks.
    """

    def __init__(self, input_shape, n_classes: int, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        if len(input_shape) == 1:
            side = math.isqrt(input_shape[0])
            input_shape = (1, side, side)
        elif len(input_shape) == 2:
            input_shape = (1, *input_shape)
        self.image_shape = tuple(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(self.image_shape[0], width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.image_shape)
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.head(features)
