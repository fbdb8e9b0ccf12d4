"""A dataset loader, as a user would bring one: scikit-learn's digits as 1x8x8 images with an official test set.

hetfl calls ``load_noisy_digits`` with ``data.params`` (and ``seed``, because the signature asks for it). It
returns ``{"train": (x, y), "test": (x, y)}``: hetfl partitions the training part among the clients and deals the
test part to them class by class, in proportion to each client's training samples of that class
(:mod:`hetfl.data.datasets`).
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_noisy_digits(noise: float = 0.0, test_size: float = 0.25, seed: int = 0):
    """Digits images (N, 1, 8, 8) in [0, 1], with Gaussian pixel noise of standard deviation ``noise``."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    if noise:
        x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}
