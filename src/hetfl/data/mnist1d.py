"""``data.dataset: mnist1d``: MNIST-1D, generated on this machine by the ``mnist1d`` package, then cached.

Greydanus, "Scaling down Deep Learning" (2020), arXiv:2011.14439. Each sample is one of ten 12-point digit
templates, padded, dilated, scaled, translated, given correlated and i.i.d. noise and sheared, then resampled
to ``final_seq_length`` (40) points: a 1-d signal that a small CNN classifies well and an MLP does not, so it
tells models apart on a CPU in minutes.

The samples come from ``mnist1d.data.make_dataset`` alone: the package's ``get_dataset``, which downloads a
pickled copy from GitHub, is never called, so nothing is fetched (``tests/test_data_mnist1d.py`` runs the loader
with sockets blocked). ``make_dataset`` draws from NumPy's and Python's global random streams after seeding
them with ``seed``; :func:`generate` puts both streams back as they were, so loading the dataset does not change
a run's other draws.

``data.params`` are the generator's settings, by the package's names (:data:`DEFAULTS`, the package's own
defaults): ``num_samples`` (or ``n_samples``) samples in all, 10 classes of ``num_samples // 10`` each,
``train_split`` of them the official training set, the rest the official test set, both as the package splits
them. The dataset is a function of these settings alone: ``seed`` (default 42, the package's) is the
generator's, not the run's, so runs of different seeds share one dataset, as they would share MNIST.
``test_fraction`` does not apply: the official test samples are dealt to the clients
(:func:`hetfl.data.partition.deal_test`). ``x`` is float32 ``(N, 1, final_seq_length)``, one channel as for
MNIST's images: ``cnn1d`` reads it as one channel, ``mlp`` and ``logreg`` flatten it.

Generation is a Python loop over samples (about 0.55 CPU-ms each: 21.5 s for 40,000; docs/benchmarks.md), so
the arrays are cached: ``<cache>/mnist1d-<key>.npz``, ``key`` a hash of the settings and the package's version,
``<cache>`` ``$HETFL_CACHE``, else ``~/.cache/hetfl`` (:func:`hetfl.cache.default_cache_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, ValidationError, field_validator

from hetfl.cache import default_cache_dir
from hetfl.config import Section
from hetfl.errors import DataError

if TYPE_CHECKING:
    from hetfl.config import DataConfig

FORMAT = 1  # bump when what a cached file holds changes
CLASSES = 10


class Mnist1dParams(Section):
    """``data.params`` of ``mnist1d``: the generator's settings, by the package's names, with its defaults."""

    num_samples: int = Field(5000, ge=2 * CLASSES, description="Samples in all (train and test), num_samples // 10 per class.")
    train_split: float = Field(0.8, gt=0, lt=1, description="Share of the samples in the official training set.")
    template_len: int = Field(12, ge=2, description="Points of a digit template after padding (the package's 12).")
    padding: tuple[int, int] = Field((36, 60), description="Zeros appended to a template: drawn from [low, high].")
    scale_coeff: float = Field(0.4, ge=0, description="Amplitude scaled by 1 + scale_coeff * U(-0.5, 0.5).")
    max_translation: int = Field(48, ge=1, description="Circular shift drawn from 0..max_translation - 1.")
    corr_noise_scale: float = Field(0.25, ge=0, description="Scale of the smoothed (correlated) background noise.")
    iid_noise_scale: float = Field(0.02, ge=0, description="Scale of the i.i.d. noise.")
    shear_scale: float = Field(0.75, ge=0, description="Shear: a linear ramp of slope shear_scale * U(-0.5, 0.5).")
    shuffle_seq: bool = Field(False, description="Permute the points of every signal by one fixed permutation.")
    final_seq_length: int = Field(40, ge=2, description="Points of a signal.")
    seed: int = Field(42, ge=0, description="The generator's seed (the package's default), not the run's.")

    @field_validator("padding")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(value)}")
        return value


DEFAULTS = Mnist1dParams().model_dump()
"""The generator's settings when ``data.params`` gives none: the package's ``get_dataset_args()`` less its URL."""


def check_params(params: dict[str, Any]) -> Mnist1dParams:
    """``data.params`` as :class:`Mnist1dParams` (``n_samples`` is ``num_samples``); a ValueError naming the key
    (``data.params.<key>: ...``) otherwise, which the config reports as one line."""
    params = dict(params)
    if "n_samples" in params:
        if "num_samples" in params:
            raise ValueError("data.params.n_samples: give num_samples or n_samples (the same setting), not both")
        params["num_samples"] = params.pop("n_samples")
    try:
        return Mnist1dParams.model_validate(params)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ValueError(
                f"data.params.{key}: mnist1d has no setting '{key}' (its settings: {', '.join(DEFAULTS)}, n_samples)"
            ) from None
        raise ValueError(f"data.params.{key}: {first['msg'].removeprefix('Value error, ')}") from None


def cache_path(settings: Mnist1dParams, folder: Path | None = None) -> Path:
    """Where the samples of ``settings`` are cached: ``<folder>/mnist1d-<key>.npz`` (folder: the default cache)."""
    what = {"format": FORMAT, "package": importlib.metadata.version("mnist1d"), **settings.model_dump(mode="json")}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return (folder or default_cache_dir()) / f"mnist1d-{key}.npz"


def generate(settings: Mnist1dParams) -> dict[str, np.ndarray]:
    """The package's ``make_dataset`` for ``settings``: ``x``, ``y``, ``x_test``, ``y_test`` (float32 signals
    ``(n, final_seq_length)``, int64 labels). NumPy's and Python's global random streams are left as they were."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("data.dataset: mnist1d needs the mnist1d package; pip install mnist1d") from None
    args = get_dataset_args()
    for name, value in settings.model_dump().items():
        setattr(args, name, list(value) if name == "padding" else value)
    args.url = None  # make_dataset never reads it; nothing here downloads
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": np.asarray(made["x"], dtype=np.float32), "y": np.asarray(made["y"], dtype=np.int64),
        "x_test": np.asarray(made["x_test"], dtype=np.float32), "y_test": np.asarray(made["y_test"], dtype=np.int64),
    }


def samples(settings: Mnist1dParams, folder: Path | None = None) -> dict[str, np.ndarray]:
    """:func:`generate`'s arrays, read from the cache when they are there, else generated and cached."""
    path = cache_path(settings, folder)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:
                return {k: saved[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: generate again, replace it
            pass
    arrays = generate(settings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the samples are still good, only not kept
        pass
    return arrays


def load_mnist1d(config: DataConfig | None = None):
    """MNIST-1D by ``config.params`` (:class:`Mnist1dParams`): the official training samples, then the official test
    samples (``Dataset.n_test``); ``x`` float32 ``(N, 1, final_seq_length)``, 10 classes."""
    from hetfl.data.datasets import Dataset

    try:
        settings = check_params(config.params if config is not None else {})
    except ValueError as err:
        raise DataError(str(err)) from None
    arrays = samples(settings)
    x = np.concatenate([arrays["x"], arrays["x_test"]])[:, None, :]
    y = np.concatenate([arrays["y"], arrays["y_test"]])
    return Dataset("mnist1d", x, y, n_classes=CLASSES, n_test=len(arrays["y_test"]))
