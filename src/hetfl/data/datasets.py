"""Dataset loaders: hetfl's built-in datasets and loaders of one's own; nothing is downloaded.

:func:`load_dataset` turns a :class:`~hetfl.config.DataConfig` into a :class:`Dataset`: all the samples of one
dataset in memory. ``data.dataset`` names a loader through :mod:`hetfl.registry`: a built-in name is an import
path into this module (``digits`` is ``hetfl.data.datasets:load_digits``), a loader of one's own is
``package.module:function``, and both are called through the same door, :func:`hetfl.registry.call`, which
passes each of these that the loader's signature names (a ``**kwargs`` signature gets them all):

==============  ===============================================================================
``path``        ``data.path`` (only when it is set)
``config``      the validated ``data`` section (:class:`~hetfl.config.DataConfig`)
``seed``        the run's seed
``n_clients``   ``data.n_clients``
==============  ===============================================================================

and, for a loader of one's own, ``data.params`` as keyword arguments. ``synthetic``
(:class:`hetfl.data.synthetic.SyntheticData`) is the exception: its samples are generated per client when
a client trains, so it is never loaded as a whole.

Built-in datasets
-----------------
Each pools its official train and test files; the partitioner makes the per-client splits (``mnist1d`` keeps its
official test split instead).

=================  =====================================================================
``digits``         scikit-learn's bundled 8x8 digits; ``x`` is ``(N, 64)``, raw 0..16.
``text``           built in: byte-level language modelling on text that ships with Python
                   (:mod:`hetfl.data.text`, ``data.text``). Client ``c`` gets
                   ``tokens_per_client`` bytes of style ``styles[c mod S]``, cut into
                   non-overlapping windows of ``context + 1`` bytes (the tail dropped);
                   ``x`` is a window's first ``context`` bytes, ``y`` its last ``context``
                   (the next-token targets), both int64 ``(N, context)``; ``groups`` is the
                   client, so ``partition.kind: natural`` deals each client its own text.
``mnist1d``        built in: MNIST-1D (Greydanus 2020), generated on this machine by the
                   ``mnist1d`` package and cached (:mod:`hetfl.data.mnist1d`; its settings in
                   ``data.params``: ``num_samples``, ``train_split``, ``seed``, ...); ``x`` is
                   ``(N, 1, 40)``. Its official test split is kept (``data.test_fraction``
                   does not apply). Nothing is downloaded.
``mnist``          a folder with the IDX files ``train-images-idx3-ubyte``,
``fashion_mnist``  ``train-labels-idx1-ubyte`` and optionally ``t10k-images-idx3-ubyte``,
                   ``t10k-labels-idx1-ubyte``, each plain or ``.gz``; ``x`` is
                   ``(N, 1, 28, 28)`` in [0, 1].
``cifar10``        a folder with the python batches ``data_batch_1`` .. ``data_batch_5`` and
                   ``test_batch`` (or the ``cifar-10-batches-py`` folder inside it); ``x`` is
                   ``(N, 3, 32, 32)`` in [0, 1].
``leaf``           LEAF JSON: a folder with ``train/`` and/or ``test/`` subfolders of
                   ``*.json`` (or the files directly, or one file). ``groups`` is the user
                   (writer) of each sample. Image data (784 numbers per sample, FEMNIST) gives
                   ``(N, 1, 28, 28)``; text data (Shakespeare) gives token ids, see below.
``csv``            a header row (names unique; a UTF-8 byte-order mark is ignored), a label
                   column (``data.label_column``; every row has a label), an optional
                   client-id column (``data.id_column``), every other column a numeric
                   feature (finite numbers, none missing).
``npz``            a ``numpy.savez`` archive: arrays ``x`` ``(N, ...)`` (numbers, finite) and
                   ``y`` ``(N,)``, optional ``groups`` ``(N,)`` and ``vocab_size`` (a scalar:
                   marks ``x`` as integer token ids in ``[0, vocab_size)``). Never unpickled.
``hf``             a Hugging Face ``datasets`` dataset saved to local disk
                   (``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``), read with
                   ``load_from_disk`` (``pip install hetfl[hf]``); see :func:`load_hf`.
=================  =====================================================================

Labels are int64 in ``[0, n_classes)``. Labels that are not already non-negative integers
(CSV strings, say) are mapped to ``0..K-1`` in sorted order (numerically when every value is a
number, :func:`encode`). Natural client ids (``groups``) are always mapped to ``0..G-1`` in sorted
order, except LEAF users, numbered in order of first appearance.

Shakespeare text is encoded with LEAF's 80-character table :data:`ALL_LETTERS`; a character
outside the table becomes a space (LEAF's own ``str.find`` would give -1, which is no index).

A loader of your own
--------------------
``data.dataset: mydata:load`` (``mydata.py`` beside the config, in the current folder, or an installed
package) names a function that returns one of:

1. ``(x, y)``, or ``(x, y, groups)``: numpy arrays, torch tensors or anything ``numpy.asarray`` takes.
   ``x`` is ``(N, ...)`` numeric features, ``y`` ``(N,)`` class labels, ``groups`` ``(N,)`` natural client
   ids (for ``data.partition.kind: natural``). hetfl partitions the samples (``data.partition``) and splits
   each client's share into train and test (``data.test_fraction``), as for a built-in dataset.
2. ``{"x": x, "y": y}``, the same with its optional extras as keys: ``groups``, ``n_classes`` (default: from the
   labels, the largest + 1 when they are non-negative integers; give it when a class has no sample) and ``vocab_size`` (marks ``x`` as integer token
   ids in ``[0, vocab_size)``, which the model embeds; ``y`` may then be next-token targets of ``x``'s
   shape, and ``n_classes`` defaults to ``vocab_size``).
3. ``{"train": part, "test": part}``, each part a pair or triple as in 1, a dict as in 2 (without the
   extras) or a torch dataset as in 4, with the optional ``n_classes``, ``vocab_size`` and ``groups``
   (``{"train": g, "test": g}``, or inside the parts): an **official test set**. Only the train part is
   partitioned among clients, each client trains on all of its share (``data.test_fraction`` does not
   apply), and the test samples are dealt out to the clients so that each client's test label mix follows
   its training label mix (:func:`hetfl.data.partition.deal_test`, whose rule is exact): class by class, in
   proportion to the clients' training samples of that class, every test sample to exactly one client;
   with ``data.partition.kind: natural`` and groups on the test part, a test sample whose group a client
   trains on goes to that client. Labels and groups are mapped over both parts together.
4. a ``torch.utils.data.Dataset`` of ``(x, y)`` items (a map-style dataset: ``len`` and indexing), read
   once: ``x`` a tensor or numpy array of one shape for every item, ``y`` a label (an int, a string, or a
   one-element tensor). A ``TensorDataset`` of two tensors (or three: groups) is taken as it is. At most
   :data:`MATERIALISE_LIMIT_BYTES` of float32 features; an ``IterableDataset`` (no length) is refused.
5. a list of per-client datasets, each an ``(x, y)`` tuple, a dict as in 2 (without extras) or as in 4: element ``i`` is
   natural group ``i``, so it needs ``data.partition.kind: natural`` (with more elements than
   ``data.n_clients``, groups are merged as :func:`hetfl.data.partition.natural` merges them).
6. a :class:`Dataset` (its ``n_test`` last samples an official test set, as in 3).

Float features become float32 and integer features float32 too (unless ``vocab_size`` marks them as token
ids), a 1-d ``x`` becomes ``(N, 1)``; labels and groups are mapped as above. What the loader returns is
checked: equal lengths, at least one sample, numeric features (never strings or Python objects), finite
floats, integer token ids in range, labels that are finite and, with ``n_classes``, in range. A problem is a
:class:`~hetfl.errors.DataError` of one line naming the loader's import path and the part (``test x``,
``client 3's y``, ``item 17``); an exception the loader raises is one line with its file and line
(``HETFL_DEBUG=1``: the traceback).

A missing or malformed file of a built-in dataset is a :class:`~hetfl.errors.DataError` whose one-line
message names the file and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import json
import math
import pickle
import sys
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetfl import registry
from hetfl.config import DataConfig
from hetfl.errors import DataError, HetflError

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare character table; a character's token id is its index here."""

UNKNOWN_LETTER = ALL_LETTERS.index(" ")
"""Token id given to characters outside :data:`ALL_LETTERS` (the space)."""

FEMNIST_CLASSES = 62

MATERIALISE_LIMIT_BYTES = 8 * 2**30
"""The most float32 feature bytes a torch dataset a loader returns is read into (hetfl holds every sample in memory)."""


@dataclass
class Dataset:
    """All the samples of one dataset.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"digits"``, or a loader's import path.
    x : numpy.ndarray
        float32 features shaped ``(N, *input_shape)``, or int64 token ids ``(N, seq_len)``.
    y : numpy.ndarray
        int64 labels in ``[0, n_classes)``, ``(N,)``; for language modelling (``text``) the next-token
        targets ``(N, L)`` of each input sequence.
    n_classes : int
        Number of classes.
    groups : numpy.ndarray or None
        Natural client id of each sample (int64, ``0..G-1``), or None.
    vocab_size : int or None
        Vocabulary size for token inputs, else None.
    n_test : int, default 0
        The last ``n_test`` samples are an official test set: only the first ``N - n_test`` are partitioned
        among clients, and the test samples are dealt to clients after
        (:func:`hetfl.data.partition.deal_test`). 0: none; each client's share is split instead.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    n_classes: int
    groups: np.ndarray | None = None
    vocab_size: int | None = None
    n_test: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def n_train(self) -> int:
        """Samples that are partitioned among clients (all but an official test set)."""
        return len(self.y) - self.n_test

    def train_part(self) -> "Dataset":
        """The samples partitioned among clients, as a Dataset of views (itself when there is no official test set)."""
        if not self.n_test:
            return self
        m = self.n_train
        groups = None if self.groups is None else self.groups[:m]
        return Dataset(self.name, self.x[:m], self.y[:m], self.n_classes, groups, self.vocab_size)

    def __len__(self) -> int:
        return len(self.y)


# --------------------------------------------------------------------------- entry point
EXPECTED = {
    "digits": "nothing (it ships with scikit-learn)",
    "mnist1d": "nothing (the mnist1d package generates it)",
    "text": "nothing (it reads text that ships with Python)",
    "mnist": "a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]",
    "fashion_mnist": "a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]",
    "cifar10": "a folder with the python batches data_batch_1..data_batch_5 and test_batch",
    "leaf": "a LEAF folder with train/ and/or test/ subfolders of *.json files (or a .json file)",
    "csv": "a CSV file with a header row and a label column",
    "npz": "an .npz file with arrays x and y (optional groups)",
    "hf": "a folder written by a Hugging Face Dataset's or DatasetDict's save_to_disk",
}
"""What each dataset expects at ``data.path``, for error messages."""

_SOURCES = {"digits": "sklearn digits", "text": "text", "mnist1d": "mnist1d"}
"""How a built-in dataset without a path is named in messages about its data."""


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the dataset ``cfg.dataset`` names: a built-in one or a loader of one's own.

    Parameters
    ----------
    cfg : DataConfig
        The validated ``data`` section.
    seed : int, default 0
        Seeds what a dataset draws (``text``: which text each client gets); passed to a loader that asks.

    Returns
    -------
    Dataset
        Every sample of the dataset, labels int64 in ``[0, n_classes)``.

    Raises
    ------
    DataError
        If the path is missing, a file does not hold what the dataset expects, or a loader returns what
        hetfl cannot take (the module docstring lists what it can).
    ConfigError
        If a loader of one's own cannot be imported or called with ``data.params``, or raises.
    """
    key = "data.dataset"
    resolved = registry.resolve("dataset", cfg.dataset, key=key, search=registry.user_search_path())
    if cfg.dataset == "synthetic":
        raise DataError(
            "data.dataset: synthetic has no pooled samples; each client's are generated when it trains "
            "(hetfl.data.synthetic.SyntheticData), so it cannot be loaded or partitioned as a whole"
        )
    provided: dict[str, Any] = {"config": cfg, "seed": seed, "n_clients": cfg.n_clients}
    if cfg.path is not None:
        provided["path"] = cfg.path
    if resolved.builtin:
        ds = registry.call(resolved.obj, provided, {}, key=key, spec=cfg.dataset)
        return _check(ds, _SOURCES.get(cfg.dataset) or str(Path(cfg.path).expanduser()))
    label = resolved.path if resolved.path == cfg.dataset else f"{cfg.dataset} ({resolved.path})"
    _path_asked(resolved.obj, cfg, label)
    result = registry.call(resolved.obj, provided, cfg.params, key=key, spec=cfg.dataset)
    if _is_client_list(result) and cfg.partition.kind != "natural":
        raise DataError(
            f"data.partition.kind: {label} returns a list of {len(result)} per-client datasets, each a natural "
            f"client; set data.partition.kind: natural, not '{cfg.partition.kind}'"
        )
    return as_dataset(result, cfg.dataset, source=f"data.dataset: {label}")


def _path_asked(loader: Any, cfg: DataConfig, label: str) -> None:
    """A loader whose signature requires ``path`` needs ``data.path``: say so rather than 'missing an argument'."""
    try:
        parameter = inspect.signature(loader).parameters.get("path")
    except (TypeError, ValueError):
        return
    if parameter is not None and parameter.default is parameter.empty and cfg.path is None and "path" not in cfg.params:
        raise DataError(f"data.path: {label} reads a path (its parameter 'path'); set data.path")


def _check(ds: Any, source: str) -> Dataset:
    """Refuse a dataset whose arrays disagree with each other."""
    if not isinstance(ds, Dataset):
        raise DataError(f"{source}: the loader returned {type(ds).__name__}, not a hetfl.data.datasets.Dataset")
    n = len(ds.x)
    if len(ds.y) != n:
        raise DataError(f"{source}: {n} samples but {len(ds.y)} labels; expected one label per sample")
    if n == 0:
        raise DataError(f"{source}: no samples found")
    sequence = ds.vocab_size is not None and ds.y.shape == ds.x.shape  # next-token targets of each input token
    if (ds.y.ndim != 1 and not sequence) or ds.y.dtype != np.int64:
        raise DataError(f"{source}: labels must be a 1-d integer array, got shape {ds.y.shape} {ds.y.dtype}")
    if ds.y.min() < 0 or ds.y.max() >= ds.n_classes:
        raise DataError(f"{source}: labels must lie in 0..{ds.n_classes - 1}, found {ds.y.min()}..{ds.y.max()}")
    if ds.groups is not None and len(ds.groups) != n:
        raise DataError(f"{source}: {n} samples but {len(ds.groups)} group ids; expected one per sample")
    if not 0 <= ds.n_test < n:
        raise DataError(f"{source}: n_test={ds.n_test} must leave at least one of the {n} samples to train on")
    return ds


# --------------------------------------------------------------------------- checks every loader shares
def _first_nonfinite(a: np.ndarray, chunk: int = 8192) -> int | None:
    """The first sample (index along axis 0) of the float array ``a`` that holds NaN or an infinity, or None."""
    if a.size == 0:
        return None
    rows = a.reshape(len(a), -1)
    for start in range(0, len(rows), chunk):
        bad = ~np.isfinite(rows[start : start + chunk]).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def check_numeric(a: np.ndarray, source: str, what: str = "x") -> None:
    """Refuse an array that is not real numbers (strings, Python objects, complex numbers, dates) or that holds NaN
    or infinities, with a one-line :class:`~hetfl.errors.DataError` that begins with ``source`` and names ``what``."""
    kind = a.dtype.kind
    if kind in "US":
        raise DataError(
            f"{source}: {what} holds strings ({a.dtype}); features must be numbers (encode text or categories as numbers first)"
        )
    if kind == "O":
        raise DataError(
            f"{source}: {what} holds Python objects (dtype object: samples of different shapes, or mixed types); "
            "features must be one numeric array"
        )
    if kind not in "biuf":
        raise DataError(f"{source}: {what} has dtype {a.dtype}; features must be real numbers (bool, integer or float)")
    if kind == "f":
        row = _first_nonfinite(a)
        if row is not None:
            raise DataError(f"{source}: {what} has NaN or infinite values (the first in sample {row}); remove or impute them")


def _features(x: np.ndarray, source: str, what: str, vocab_size: int | None) -> np.ndarray:
    """``x`` checked and converted: float32 features (a 1-d array as ``(N, 1)``), or int64 token ids with ``vocab_size``."""
    if x.ndim == 0:
        raise DataError(f"{source}: {what} is a single value (shape ()); expected samples first, (N, ...)")
    check_numeric(x, source, what)
    if vocab_size is not None:
        if x.dtype.kind == "f" and np.any(x != np.floor(x)):
            raise DataError(f"{source}: {what} must hold integer token ids (vocab_size marks it as tokens), found fractions")
        ids = x.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(
                f"{source}: {what} token ids must lie in 0..{vocab_size - 1} (vocab_size {vocab_size}), found "
                f"{ids.min()}..{ids.max()}"
            )
        return ids
    with np.errstate(over="ignore"):
        out = x.astype(np.float32, copy=False)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        row = _first_nonfinite(out)
        if row is not None:
            raise DataError(f"{source}: {what} has values beyond float32's range (the first in sample {row})")
    return out[:, None] if out.ndim == 1 else out


def _raw_labels(y: np.ndarray, source: str, what: str, x_shape: tuple[int, ...] | None) -> np.ndarray:
    """``y`` checked before its labels are mapped: one finite label per sample (an ``(N, 1)`` column is flattened),
    or, when ``x_shape`` is given (token inputs), next-token targets of that shape."""
    if y.ndim == 0:
        raise DataError(f"{source}: {what} is a single value (shape ()); expected one label per sample, (N,)")
    if x_shape is not None and y.ndim > 1 and y.shape == x_shape:  # next-token targets
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and _first_nonfinite(y) is None and np.all(y == np.floor(y))):
            raise DataError(f"{source}: {what} next-token targets must be integer token ids, found {y.dtype}")
        return y
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: {what} has shape {y.shape}; expected one label per sample, (N,)")
    kind = y.dtype.kind
    if kind == "f":
        row = _first_nonfinite(y)
        if row is not None:
            raise DataError(f"{source}: {what} has a missing (NaN) or infinite label (sample {row}); every sample needs a label")
    elif kind == "O":
        missing = _first_missing(y)
        if missing is not None:
            raise DataError(f"{source}: {what} has a missing label (sample {missing}: {y[missing]!r}); every sample needs a label")
    elif kind not in "biuUS":
        raise DataError(f"{source}: {what} has dtype {y.dtype}; labels must be integers, strings or numbers")
    return y


def _first_missing(values: np.ndarray) -> int | None:
    """The first of 1-d ``values`` that is None, NaN or infinite (float or object arrays), or None."""
    if values.dtype.kind == "f":
        return _first_nonfinite(values)
    if values.dtype.kind == "O":
        return next((i for i, v in enumerate(values) if v is None or (isinstance(v, float) and not math.isfinite(v))), None)
    return None


def class_ids(y: np.ndarray, source: str, what: str = "y") -> np.ndarray:
    """``y`` as int64 class ids as they are (a deployed client's labels are the server's classes): integers, or floats
    of integer value, non-negative; anything else is a one-line :class:`~hetfl.errors.DataError`."""
    kind = y.dtype.kind
    if kind == "f" and (_first_nonfinite(y) is not None or np.any(y != np.floor(y))):
        raise DataError(f"{source}: {what} must hold integer class labels, found NaN, infinite or fractional values")
    if kind not in "iuf" and not (kind == "b"):
        raise DataError(f"{source}: {what} must hold integer class labels, found {y.dtype}")
    ids = y.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise DataError(f"{source}: {what} must hold non-negative class labels, found {ids.min()}")
    return ids


# --------------------------------------------------------------------------- what a loader of one's own returns
_DICT_KEYS = ("x", "y", "groups", "train", "test", "n_classes", "vocab_size")


def _is_torch_dataset(obj: Any) -> bool:
    torch_data = getattr(sys.modules.get("torch.utils.data"), "Dataset", None)  # no torch Dataset before torch is imported
    return torch_data is not None and isinstance(obj, torch_data)


def _is_client_list(obj: Any) -> bool:
    """Whether a loader returned a list of per-client datasets (pairs, dicts or torch datasets), not ``[x, y]``."""
    return (
        isinstance(obj, list)
        and len(obj) > 0
        and all(isinstance(e, (tuple, Mapping)) or _is_torch_dataset(e) for e in obj)
    )


def _describe(obj: Any) -> str:
    """``a PIL.Image.Image``, ``a str``: what an unexpected object is, for messages."""
    cls = type(obj)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"a {name}"


def _whole(p: str) -> str:
    """The part a prefix names, for messages: ``''`` what the loader returned, ``'test '`` the test part."""
    return "what it returned" if not p else (f"{p.strip()}'s data" if p.endswith("'s ") else f"the {p.strip()} part")


def _to_numpy(value: Any, source: str, what: str) -> np.ndarray:
    """An array, a tensor or a nested sequence as a numpy array (a tensor's memory is shared, not copied)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:
        raise DataError(
            f"{source}: {what} is not an array ({str(err).splitlines()[0][:120]}); samples of different shapes?"
        ) from None


def _item_array(value: Any, source: str, what: str, i: int) -> np.ndarray | None:
    """One item's x (or y) of a torch dataset as a numpy array; None when it is not a tensor, array or number."""
    if isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return _to_numpy(value, source, what)
    return None


def _materialise(data: Any, source: str, p: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A map-style torch dataset of ``(x, y)`` items read once into ``(x, y, None)``; a TensorDataset taken as it is."""
    from torch.utils.data import IterableDataset, TensorDataset

    if isinstance(data, TensorDataset):
        if len(data.tensors) not in (2, 3):
            raise DataError(f"{source}: {_whole(p)} is a TensorDataset of {len(data.tensors)} tensors; expected x, y (and groups)")
        return data.tensors[0], data.tensors[1], data.tensors[2] if len(data.tensors) == 3 else None
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise DataError(
            f"{source}: {_whole(p)} is an IterableDataset, which has no length; return a map-style torch Dataset "
            "(__len__ and __getitem__) or arrays"
        )
    n = len(data)
    if n == 0:
        raise DataError(f"{source}: {_whole(p)} is a torch Dataset of no samples")

    def item(i: int) -> tuple[Any, Any]:
        try:
            it = data[i]
        except HetflError:
            raise
        except Exception as err:  # the user's __getitem__ failed: one line with its file and line
            raise DataError(f"{source}: reading {p}item {i} of the torch Dataset raised {registry._short(err)}") from None
        if isinstance(it, (str, bytes, Mapping)) or not isinstance(it, (tuple, list)) or len(it) != 2:
            raise DataError(f"{source}: {p}item {i} of the torch Dataset is {_describe(it)}; expected an (x, y) pair")
        return it[0], it[1]

    def x_of(value: Any, i: int) -> np.ndarray:
        array = _item_array(value, source, f"{p}x", i)
        if array is None:
            raise DataError(
                f"{source}: {p}item {i} of the torch Dataset has x of type {_describe(value)[2:]}; expected a tensor or a "
                "numpy array (a torchvision dataset: transform=torchvision.transforms.ToTensor())"
            )
        return array

    def y_of(value: Any, i: int) -> Any:
        if isinstance(value, str):
            return value
        array = _item_array(value, source, f"{p}y", i)
        if array is None:
            raise DataError(
                f"{source}: {p}item {i} of the torch Dataset has y of type {_describe(value)[2:]}; expected a class label "
                "(an int, a string or a one-element tensor)"
            )
        return array

    x0, y0 = item(0)
    x0 = x_of(x0, 0)
    need = n * max(x0.size, 1) * 4
    if need > MATERIALISE_LIMIT_BYTES:
        raise DataError(
            f"{source}: {_whole(p)} is a torch Dataset of {n:,} items of shape {tuple(x0.shape)}: {need / 2**30:.1f} GiB as "
            f"float32 features, more than hetfl reads into memory ({MATERIALISE_LIMIT_BYTES / 2**30:.0f} GiB, "
            "hetfl.data.datasets.MATERIALISE_LIMIT_BYTES); use a subset"
        )
    xs = np.empty((n, *x0.shape), dtype=x0.dtype)
    label0 = y_of(y0, 0)
    scalar = isinstance(label0, str) or label0.size == 1
    ys: Any = [] if scalar else np.empty((n, *label0.shape), dtype=label0.dtype)
    for i in range(n):
        if i:
            xi, yi = item(i)
            xi, label = x_of(xi, i), y_of(yi, i)
        else:
            xi, label = x0, label0
        if xi.shape != x0.shape:
            raise DataError(
                f"{source}: {p}item {i} of the torch Dataset has x of shape {tuple(xi.shape)}, item 0 {tuple(x0.shape)}; every "
                "sample must have one shape"
            )
        if not np.can_cast(xi.dtype, xs.dtype, "same_kind") or xi.dtype.itemsize > xs.dtype.itemsize:
            xs = xs.astype(np.result_type(xs.dtype, xi.dtype))
        xs[i] = xi
        if scalar:
            if not isinstance(label, str) and label.size != 1:
                raise DataError(f"{source}: {p}item {i} of the torch Dataset has y of shape {tuple(label.shape)}, item 0 one label")
            ys.append(label if isinstance(label, str) else label.reshape(()).item())
        else:
            if isinstance(label, str) or label.shape != label0.shape:
                raise DataError(f"{source}: {p}item {i} of the torch Dataset has y unlike item 0's (shape {tuple(label0.shape)})")
            ys[i] = label
    return xs, (np.asarray(ys) if scalar else ys), None


def _part(obj: Any, source: str, p: str) -> tuple[Any, Any, Any]:
    """``(x, y, groups)`` of one part a loader returned: a pair or triple, a dict of x, y (and groups), a torch dataset."""
    if _is_torch_dataset(obj):
        return _materialise(obj, source, p)
    if isinstance(obj, Mapping):
        unknown = [k for k in obj if k not in ("x", "y", "groups")]
        missing = [k for k in ("x", "y") if k not in obj]
        if unknown or missing:
            found = ", ".join(map(repr, obj)) or "none"
            raise DataError(f"{source}: {_whole(p)} is a dict with keys {found}; expected 'x' and 'y' (and 'groups')")
        return obj["x"], obj["y"], obj.get("groups")
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        return obj[0], obj[1], obj[2] if len(obj) == 3 else None
    if isinstance(obj, (tuple, list)):
        raise DataError(f"{source}: {_whole(p)} is a sequence of {len(obj)} items; expected (x, y) or (x, y, groups)")
    raise DataError(
        f"{source}: {_whole(p)} is {_describe(obj)}; expected (x, y), a dict {{'x': x, 'y': y}}, {{'train': ..., "
        "'test': ...}, a torch Dataset, a list of per-client datasets or a hetfl Dataset (see hetfl.data.datasets)"
    )


def _positive_int(value: Any, source: str, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def as_dataset(result: Any, name: str, source: str = "the loader") -> Dataset:
    """What a dataset loader returned (any form the module docstring lists) as a checked :class:`Dataset`.

    Parameters
    ----------
    result : object
        The loader's return value.
    name : str
        The dataset's name (``data.dataset``: the loader's import path).
    source : str
        How messages name the loader: ``data.dataset: package.module:function``.
    """
    if isinstance(result, Dataset):
        m = result.n_train
        groups = result.groups
        if result.n_test:
            parts = [(result.x[:m], result.y[:m], None if groups is None else groups[:m], "train "),
                     (result.x[m:], result.y[m:], None if groups is None else groups[m:], "test ")]
        else:
            parts = [(result.x, result.y, groups, "")]
        return _assemble(result.name, source, parts, result.n_classes, result.vocab_size, test=bool(result.n_test))
    if _is_client_list(result):
        parts = []
        for i, element in enumerate(result):
            x, y, groups = _part(element, source, f"client {i}'s ")
            if groups is not None:
                raise DataError(f"{source}: client {i}'s data has groups; in a list of per-client datasets each element is one client")
            parts.append((x, y, None, f"client {i}'s "))
        return _assemble(name, source, parts, None, None, test=False, groups_by_part=True)
    if isinstance(result, Mapping):
        unknown = [k for k in result if k not in _DICT_KEYS]
        if unknown:
            raise DataError(f"{source}: returned a dict with the unknown key {unknown[0]!r}; its keys are {', '.join(_DICT_KEYS)}")
        n_classes = _positive_int(result.get("n_classes"), source, "n_classes")
        vocab_size = _positive_int(result.get("vocab_size"), source, "vocab_size")
        if "train" in result:
            if "x" in result or "y" in result:
                raise DataError(f"{source}: returned a dict with both 'train' and 'x'/'y'; give x and y inside the parts")
            splits = ["train", "test"] if "test" in result else ["train"]
            groups = result.get("groups")
            if groups is not None and not (isinstance(groups, Mapping) and set(groups) == set(splits)):
                raise DataError(
                    f"{source}: with train and test parts, groups must be a dict {{{', '.join(repr(s) + ': ...' for s in splits)}}} "
                    "(or give (x, y, groups) as each part)"
                )
            parts = []
            for split in splits:
                x, y, g = _part(result[split], source, f"{split} ")
                if groups is not None:
                    if g is not None:
                        raise DataError(f"{source}: groups of the {split} part are given twice (in the part and in 'groups')")
                    g = groups[split]
                parts.append((x, y, g, f"{split} " if len(splits) > 1 else ""))
            return _assemble(name, source, parts, n_classes, vocab_size, test=len(splits) > 1)
        if "test" in result:
            raise DataError(f"{source}: returned a test part without a train part; give {{'train': (x, y), 'test': (x, y)}}")
        x, y, g = _part({k: result[k] for k in ("x", "y", "groups") if k in result}, source, "")
        return _assemble(name, source, [(x, y, g, "")], n_classes, vocab_size, test=False)
    x, y, g = _part(result, source, "")
    return _assemble(name, source, [(x, y, g, "")], None, None, test=False)


def _assemble(
    name: str, source: str, parts: list[tuple[Any, Any, Any, str]], n_classes: int | None, vocab_size: int | None,
    *, test: bool, groups_by_part: bool = False, columns: tuple[str, str] | None = None,
) -> Dataset:
    """One checked :class:`Dataset` of ``parts`` (``(x, y, groups, prefix)``; with ``test`` the last is an official test
    set; with ``groups_by_part`` part ``i`` is natural group ``i``): labels and groups mapped over all parts together.
    ``columns`` names the columns x and y came from, for messages."""
    xs, ys, gs = [], [], []
    for x, y, g, p in parts:
        xw, yw = (f"{p}x", f"{p}y") if columns is None else (f"{p}x (column {columns[0]!r})", f"{p}y (column {columns[1]!r})")
        raw = _to_numpy(x, source, xw)
        x = _features(raw, source, xw, vocab_size)
        if np.may_share_memory(x, raw):  # hetfl normalises x in place: never the loader's own array
            x = x.copy()
        y = _raw_labels(_to_numpy(y, source, yw), source, yw, x.shape if vocab_size is not None else None)
        if len(y) != len(x):
            raise DataError(f"{source}: {xw} has {len(x)} samples and {yw} {len(y)} labels; expected one label per sample")
        if len(x) == 0:
            raise DataError(f"{source}: {_whole(p)} has no samples")
        if g is not None:
            g = _to_numpy(g, source, f"{p}groups")
            g = g[:, 0] if g.ndim == 2 and g.shape[1] == 1 else g
            if g.ndim != 1 or len(g) != len(x):
                raise DataError(f"{source}: {p}groups has shape {g.shape}; expected one group id per sample, ({len(x)},)")
            missing = _first_missing(g)
            if missing is not None:
                raise DataError(f"{source}: {p}groups has a missing group id (sample {missing}: {g[missing]!r})")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            first = parts[0][3]
            raise DataError(
                f"{source}: {p}x has samples of shape {x.shape[1:]}, {first}x of shape {xs[0].shape[1:]}; every sample "
                "must have one shape"
            )
        xs.append(x)
        ys.append(y)
        gs.append(g)
    if not groups_by_part and any(g is None for g in gs) and any(g is not None for g in gs):
        given = [p.strip() for (*_, p), g in zip(parts, gs) if g is not None]
        raise DataError(f"{source}: groups are given for the {given[0]} part only; give them for every part or none")
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    sequence = vocab_size is not None and all(y.shape == x_.shape and y.ndim > 1 for y, x_ in zip(ys, xs))
    if sequence:
        y = np.concatenate(ys).astype(np.int64)
        k = vocab_size
        if y.min() < 0 or y.max() >= (n_classes or vocab_size):
            raise DataError(f"{source}: next-token targets must lie in 0..{(n_classes or vocab_size) - 1}, found {y.min()}..{y.max()}")
    else:
        if any(y.ndim != 1 for y in ys):
            bad = next(p for y, (*_, p) in zip(ys, parts) if y.ndim != 1)
            raise DataError(f"{source}: {bad}y is not one label per sample (next-token targets need vocab_size and x's shape)")
        y, k = _as_labels(ys[0] if len(ys) == 1 else np.concatenate(ys))
        if np.may_share_memory(y, ys[0]):
            y = y.copy()
    if n_classes is not None and n_classes < k:
        raise DataError(f"{source}: n_classes={n_classes}, but the labels need {k} classes (0..{k - 1})")
    if groups_by_part:
        groups = np.repeat(np.arange(len(xs), dtype=np.int64), [len(v) for v in xs])
    elif gs[0] is not None:
        groups = encode(gs[0] if len(gs) == 1 else np.concatenate(gs))[0]
    else:
        groups = None
    n_test = len(ys[-1]) if test else 0
    return _check(Dataset(name, x, y, n_classes or k, groups, vocab_size, n_test), source)


# --------------------------------------------------------------------------- digits
def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: ``x`` ``(1797, 64)`` float32, raw 0..16; 10 classes.

    Read from scikit-learn's own file (64 pixels then the label a row, as its ``load_digits`` reads it) without
    importing scikit-learn, which costs every hetfl process about 1.5 s of start-up; its loader if the file moved.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        return Dataset("digits", bunch.data.astype(np.float32), bunch.target.astype(np.int64), n_classes=10)
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    return Dataset("digits", rows[:, :-1].astype(np.float32), rows[:, -1].astype(np.int64), n_classes=10)


# --------------------------------------------------------------------------- text
def load_text(config: DataConfig, seed: int = 0) -> Dataset:
    """The ``text`` dataset: every client's byte stream (:func:`hetfl.data.text.client_corpora`) as LM windows."""
    from hetfl.data.text import VOCAB_SIZE, client_corpora

    text = config.text
    try:
        corpora = client_corpora(config.n_clients, tuple(text.styles), seed, tokens_per_client=text.tokens_per_client)
    except ValueError as err:
        raise DataError(f"data.text.tokens_per_client: {err}") from None
    rows = [lm_rows(tokens, text.context) for tokens in corpora.tokens]
    windows = np.concatenate(rows)
    groups = np.repeat(np.arange(config.n_clients, dtype=np.int64), [len(r) for r in rows])
    x, y = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    return Dataset("text", x, y, n_classes=VOCAB_SIZE, groups=groups, vocab_size=VOCAB_SIZE)


def lm_rows(tokens: np.ndarray, context: int) -> np.ndarray:
    """A token stream cut into non-overlapping rows of ``context + 1`` tokens ``(n, context + 1)``, the tail dropped."""
    n = len(tokens) // (context + 1)
    return np.asarray(tokens[: n * (context + 1)], dtype=np.int64).reshape(n, context + 1)


# --------------------------------------------------------------------------- helpers
def _existing(path: str | Path, dataset: str) -> Path:
    """``path`` as a Path; a DataError saying what ``dataset`` expects there if nothing is there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist; dataset '{dataset}' expects {EXPECTED[dataset]}")
    return path


def _require_folder(path: Path, dataset: str) -> None:
    if not path.is_dir():
        raise DataError(f"data.path: {path} is a file; dataset '{dataset}' expects {EXPECTED[dataset]}")


def _require_file(path: Path, dataset: str) -> None:
    if not path.is_file():
        raise DataError(f"data.path: {path} is a folder; dataset '{dataset}' expects {EXPECTED[dataset]}")


def _read_bytes(path: Path) -> bytes:
    """The bytes of a file, decompressed when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map values to ``0..K-1`` in sorted order (numeric order if every value is a number).

    Returns
    -------
    codes : numpy.ndarray
        int64 code of each value.
    uniques : numpy.ndarray
        The distinct values, ``uniques[codes] == values``.
    """
    values = np.asarray(values)
    if values.dtype.kind in "US" or values.dtype == object:
        try:
            values = values.astype(np.float64)
        except (ValueError, TypeError):
            values = values.astype(str)
    uniques, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64).ravel(), uniques


def _as_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep non-negative integer labels as they are; map anything else to ``0..K-1``."""
    y = np.asarray(y).ravel()
    if y.size and y.dtype.kind in "iu" and y.min() >= 0:
        return y.astype(np.int64), int(y.max()) + 1
    codes, uniques = encode(y)
    return codes, len(uniques)


# --------------------------------------------------------------------------- MNIST (IDX)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``): magic ``00 00 <type> <ndim>``, big-endian dims, data."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>, found {raw[:4].hex(' ')})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path}: IDX header truncated (expected {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) != offset + count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header announces shape {dims} ({offset + count * dtype.itemsize} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected an IDX image file of shape (N, rows, cols), found shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected an IDX label file of shape (N,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}")
    return images, labels


def load_mnist(path: str | Path, config: DataConfig | None = None) -> Dataset:
    """MNIST or Fashion-MNIST (``config.dataset`` says which; default mnist): pool the train and (if present) t10k
    IDX files of the folder ``path``."""
    name = config.dataset if config is not None and config.dataset in ("mnist", "fashion_mnist") else "mnist"
    path = _existing(path, name)
    _require_folder(path, name)
    xs, ys = [], []
    for split in ("train", "t10k"):
        images_path = _find_idx(path, f"{split}-images-idx3-ubyte")
        labels_path = _find_idx(path, f"{split}-labels-idx1-ubyte")
        if images_path is None and labels_path is None and split == "t10k":
            continue  # train only is fine
        if images_path is None or labels_path is None:
            missing = f"{split}-images-idx3-ubyte" if images_path is None else f"{split}-labels-idx1-ubyte"
            raise DataError(f"{path}: {missing}[.gz] not found; dataset '{name}' expects {EXPECTED[name]}")
        images, labels = _read_idx_pair(images_path, labels_path)
        xs.append(images)
        ys.append(labels)
    x = np.concatenate(xs)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = (x.astype(np.float32) / np.float32(scale))[:, None, :, :]
    return Dataset(name, x, np.concatenate(ys).astype(np.int64), n_classes=10)


# --------------------------------------------------------------------------- CIFAR-10
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: plain containers and numpy arrays, no other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a pickled dict with keys b'data' and b'labels'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected data of shape (N, 3072), found {data.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data, labels


def load_cifar10(path: str | Path) -> Dataset:
    """CIFAR-10 python version in the folder ``path``: pool the batches that exist (at least one ``data_batch_*``)."""
    path = _existing(path, "cifar10")
    _require_folder(path, "cifar10")
    if not (path / "data_batch_1").exists() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    files = [path / name for name in CIFAR_BATCHES if (path / name).is_file()]
    if not any(f.name.startswith("data_batch_") for f in files):
        raise DataError(f"{path}: no data_batch_* file found; dataset 'cifar10' expects {EXPECTED['cifar10']}")
    batches = [_read_cifar_batch(f) for f in files]
    data = np.concatenate([b[0] for b in batches])
    x = (data.astype(np.float32) / np.float32(255.0)).reshape(-1, 3, 32, 32)
    return Dataset("cifar10", x, np.concatenate([b[1] for b in batches]), n_classes=10)


# --------------------------------------------------------------------------- LEAF JSON
def _leaf_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    subfolders = [path / "train", path / "test"]
    if any(s.is_dir() for s in subfolders):
        return [f for s in subfolders if s.is_dir() for f in sorted(s.glob("*.json"))]
    return sorted(path.glob("*.json"))


def _read_leaf_file(path: Path) -> dict:
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), list) or not isinstance(data.get("user_data"), dict):
        raise DataError(f"{path}: expected LEAF JSON with keys 'users' and 'user_data'")
    return data


def _pool_leaf_users(files: list[Path]) -> tuple[list, list, np.ndarray]:
    """Concatenate every user's samples over all files; users numbered in order of first appearance."""
    user_ids: dict[str, int] = {}
    xs: list = []
    ys: list = []
    groups: list[np.ndarray] = []
    for path in files:
        data = _read_leaf_file(path)
        for user in data["users"]:
            record = data["user_data"].get(user)
            if not isinstance(record, dict) or "x" not in record or "y" not in record:
                raise DataError(f"{path}: user {user!r} has no user_data entry with 'x' and 'y'")
            if len(record["x"]) != len(record["y"]):
                raise DataError(f"{path}: user {user!r} has {len(record['x'])} samples but {len(record['y'])} labels")
            uid = user_ids.setdefault(user, len(user_ids))
            xs.extend(record["x"])
            ys.extend(record["y"])
            groups.append(np.full(len(record["y"]), uid, dtype=np.int64))
    if not xs:
        raise DataError(f"{files[0].parent}: the LEAF files hold no samples")
    return xs, ys, np.concatenate(groups)


def text_to_ids(texts: list[str]) -> np.ndarray:
    """Token ids of equal-length strings under :data:`ALL_LETTERS`, shaped ``(len(texts), length)``."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    table = np.full(128, UNKNOWN_LETTER, dtype=np.int64)
    table[[ord(c) for c in ALL_LETTERS]] = np.arange(len(ALL_LETTERS))
    ids = table[np.minimum(codes, 127)]
    ids[codes >= 128] = UNKNOWN_LETTER
    return ids.reshape(len(texts), -1)


def _leaf_text(xs: list, ys: list, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(s, str) for s in xs):
        raise DataError(f"{source}: expected every text sample (x) to be a string")
    lengths = sorted({len(s) for s in xs})
    if len(lengths) != 1:
        raise DataError(f"{source}: expected text samples (x) of one length, found lengths {lengths[:5]}")
    if not all(isinstance(c, str) and len(c) == 1 for c in ys):
        raise DataError(f"{source}: expected each text label (y) to be a single character")
    return text_to_ids(xs), text_to_ids(ys).ravel()


def load_leaf(path: str | Path) -> Dataset:
    """LEAF JSON at ``path`` (a folder or one file): pool train and test of each user; groups are the users."""
    path = _existing(path, "leaf")
    files = _leaf_files(path)
    if not files:
        raise DataError(f"{path}: no *.json files found; dataset 'leaf' expects {EXPECTED['leaf']}")
    xs, ys, groups = _pool_leaf_users(files)
    if isinstance(xs[0], str):
        x, y = _leaf_text(xs, ys, str(path))
        return Dataset("leaf", x, y, n_classes=len(ALL_LETTERS), groups=groups, vocab_size=len(ALL_LETTERS))
    try:
        x = np.asarray(xs, dtype=np.float32)
        y, n_classes = _as_labels(np.asarray(ys))
    except (ValueError, TypeError):
        raise DataError(f"{path}: expected numeric samples of one length and numeric labels") from None
    if x.ndim == 1:  # one number per sample
        x = x[:, None]
    if x.ndim == 2 and x.shape[1] == 28 * 28:  # FEMNIST
        x = x.reshape(-1, 1, 28, 28)
        n_classes = max(n_classes, FEMNIST_CLASSES)
    return Dataset("leaf", x, y, n_classes=n_classes, groups=groups)


# --------------------------------------------------------------------------- CSV
def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is not part of the header
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from None
    rows = [r for r in rows if r]  # blank lines
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    twice = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if twice is not None:
        raise DataError(f"{path}: the header names column {twice!r} twice; every column needs its own name")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: row {line} has {len(row)} fields, the header has {len(header)}")
    return header, rows[1:]


def _numeric_column(values: tuple[str, ...], name: str, path: Path) -> np.ndarray:
    try:
        column = np.asarray(values, dtype=np.float64)
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise DataError(
            f"{path}: column {name!r} is not numeric (value {bad!r}); every feature column must be a number"
        ) from None
    row = _first_nonfinite(column)
    if row is None:
        with np.errstate(over="ignore"):
            row = _first_nonfinite(column.astype(np.float32))  # beyond float32's range
    if row is not None:
        raise DataError(
            f"{path}: column {name!r} has missing or non-finite values (row {row + 2}: {values[row]!r}); every feature "
            "must be a finite number"
        )
    return column


def _key_column(values: tuple[str, ...], name: str, option: str, path: Path) -> np.ndarray:
    """A label or id column: its values stripped of surrounding spaces, none empty or NaN."""
    column = np.asarray([v.strip() for v in values])
    for row, value in enumerate(column.tolist(), start=2):
        if value == "" or value.lower() in ("nan", "-nan", "+nan"):
            what = "a label" if option == "label_column" else "an id"
            raise DataError(f"{path}: column {name!r} (data.{option}) has no value in row {row}; every row needs {what}")
    return column


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_csv(path: str | Path, config: DataConfig | None = None) -> Dataset:
    """CSV: a header row, the label column ``config.label_column`` (default ``label``), an optional id column
    ``config.id_column`` (natural client ids), every other column a numeric feature."""
    label_column = config.label_column if config is not None else "label"
    id_column = config.id_column if config is not None else None
    path = _existing(path, "csv")
    _require_file(path, "csv")
    header, rows = _read_csv(path)
    for option, column in (("label_column", label_column), ("id_column", id_column)):
        if column is not None and column not in header:
            raise DataError(f"{path}: no column {column!r} (data.{option}); columns are {', '.join(header)}")
    columns = dict(zip(header, zip(*rows)))
    features = [h for h in header if h not in (label_column, id_column)]
    if not features:
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    x = np.stack([_numeric_column(columns[h], h, path) for h in features], axis=1).astype(np.float32)
    y, uniques = encode(_key_column(columns[label_column], label_column, "label_column", path))
    groups = encode(_key_column(columns[id_column], id_column, "id_column", path))[0] if id_column else None
    return Dataset("csv", x, y, n_classes=len(uniques), groups=groups)


# --------------------------------------------------------------------------- NPZ
NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | Path, source: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive (``numpy.savez``), never unpickling anything.

    An empty, truncated or corrupt file, a file that is not a zip archive (a lone ``.npy``, a CSV) and an array of
    Python objects are each a one-line :class:`~hetfl.errors.DataError` beginning with ``source``; the caller checks
    which arrays it needs.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise DataError(f"{source}: cannot read ({err.strerror or err})") from None
    if size == 0:
        raise DataError(f"{source}: not a readable .npz file (the file is empty)")
    if not zipfile.is_zipfile(path):
        what = ("a single .npy array; write x and y with numpy.savez(path, x=x, y=y)" if head == NPY_MAGIC else
                "not a zip archive of .npy arrays, as numpy.savez writes, or truncated")
        raise DataError(f"{source}: not a readable .npz file ({what})")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError as err:
                    if "allow_pickle" in str(err) or "Object arrays" in str(err):
                        raise DataError(
                            f"{source}: array {key!r} holds Python objects (dtype object), which hetfl never unpickles; "
                            "save numeric arrays"
                        ) from None
                    raise
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{source}: not a readable .npz file (truncated or corrupt: {reason})") from None
    return arrays


def load_npz(path: str | Path) -> Dataset:
    """NPZ: arrays ``x`` ``(N, ...)`` and ``y`` ``(N,)``, optional ``groups`` ``(N,)`` and ``vocab_size`` (a scalar)."""
    path = _existing(path, "npz")
    _require_file(path, "npz")
    arrays = read_npz(path, str(path))
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r}; expected arrays x (N, ...) and y (N,), optional groups (N,)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: expected x (N, ...) and y (N,) of one length, found x {x.shape} and y {y.shape}")
    vocab_size = None
    if "vocab_size" in arrays:
        vocab = arrays["vocab_size"]
        if vocab.size != 1 or vocab.dtype.kind not in "iu" or int(vocab.reshape(())) < 1:
            raise DataError(f"{path}: vocab_size must be one positive integer, found {vocab.dtype} {vocab.shape}")
        vocab_size = int(vocab.reshape(()))
    x = _features(x, str(path), "x", vocab_size)
    y, n_classes = _as_labels(_raw_labels(y, str(path), "y", None))
    groups = None
    if "groups" in arrays:
        raw = arrays["groups"]
        if raw.ndim == 1 and _first_missing(raw) is not None:
            raise DataError(f"{path}: groups has a missing group id (sample {_first_missing(raw)})")
        groups = encode(raw)[0]
    return Dataset("npz", x, y, n_classes, groups, vocab_size=vocab_size)


# --------------------------------------------------------------------------- Hugging Face datasets on disk
def load_hf(path: str | Path, config: DataConfig | None = None) -> Dataset:
    """A Hugging Face ``datasets`` dataset saved to local disk, read with ``datasets.load_from_disk`` (never downloaded).

    ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``. Of a DatasetDict, the
    ``train`` split is the data and a ``test`` split, if there is one, an official test set (dealt to clients by
    their training label mix, :func:`hetfl.data.partition.deal_test`); other splits (``validation``) are not used;
    a DatasetDict of one split of another name is that split. ``config.columns`` names the feature column ``x`` and
    the label column ``y`` (default: the first two columns; one not given is the first other column).

    The feature column may hold images (``datasets.Image``: decoded with Pillow, converted to the first image's
    mode, or to ``L`` or ``RGB`` for other modes, and given as float32 ``(C, H, W)`` in [0, 1]; all of one size),
    numbers (``(N, 1)``) or fixed-length lists or arrays of numbers. The label column's ``ClassLabel`` gives
    ``n_classes`` (a ``-1``, its missing value, is refused); string labels and other numbers are mapped to
    ``0..K-1`` in sorted order (:func:`encode`). Needs ``pip install hetfl[hf]``.
    """
    path = _existing(path, "hf")
    _require_folder(path, "hf")
    try:
        import datasets as hf
    except ImportError:
        raise DataError(
            "data.dataset: hf reads Hugging Face datasets saved to disk, and the datasets package is not installed; "
            "pip install hetfl[hf]"
        ) from None
    try:
        saved = hf.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a dataset written by save_to_disk ({str(err).splitlines()[0]})") from None
    except Exception as err:  # a damaged folder: its arrow files, its JSON
        raise DataError(f"{path}: datasets.load_from_disk failed: {registry._short(err)}") from None
    if isinstance(saved, hf.DatasetDict):
        splits = list(saved)
        if "train" in saved:
            train, test = saved["train"], saved["test"] if "test" in saved else None
        elif len(splits) == 1:
            train, test = saved[splits[0]], None
        else:
            raise DataError(
                f"{path}: a DatasetDict of splits {', '.join(splits)} and none named 'train'; hetfl trains on 'train' "
                "(and tests on 'test')"
            )
    else:
        train, test = saved, None
    x_column, y_column = _hf_columns(train, dict(config.columns) if config is not None else {}, path)
    parts, n_classes = [], None
    for split, part in (("train", train), ("test", test)):
        if part is None:
            continue
        p = f"{split} " if test is not None else ""
        missing = [c for c in (x_column, y_column) if c not in part.column_names]
        if missing:
            raise DataError(f"{path}: the {split} split has no column {missing[0]!r}; its columns are {', '.join(part.column_names)}")
        x = _hf_column(part, x_column, hf, path, f"{p}x (column {x_column!r})", features=True)
        y = _hf_column(part, y_column, hf, path, f"{p}y (column {y_column!r})", features=False)
        feature = part.features[y_column]
        if isinstance(feature, hf.ClassLabel):
            if y.size and y.min() < 0:
                raise DataError(
                    f"{path}: the {split} split has samples without a label (ClassLabel -1) in column {y_column!r}; "
                    "hetfl needs a label for every sample"
                )
            n_classes = max(n_classes or 0, feature.num_classes)
        parts.append((x, y, None, p))
    return _assemble("hf", str(path), parts, n_classes, None, test=test is not None, columns=(x_column, y_column))


def _hf_columns(ds: Any, columns: dict[str, str], path: Path) -> tuple[str, str]:
    """The feature and label columns: ``data.columns``' x and y, else the first two columns."""
    names = list(ds.column_names)
    for key, column in columns.items():
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (data.columns.{key}); columns are {', '.join(names)}")
    x = columns.get("x") or next((c for c in names if c != columns.get("y")), None)
    y = columns.get("y") or next((c for c in names if c != x), None)
    if x is None or y is None:
        raise DataError(f"{path}: expected a feature and a label column, found {', '.join(names) or 'no column'}")
    if x == y:
        raise DataError(f"{path}: data.columns names {x!r} as both the features and the labels")
    return x, y


def _hf_column(ds: Any, column: str, hf: Any, path: Path, what: str, features: bool) -> np.ndarray:
    """One column of a Hugging Face dataset as a numpy array: images decoded, everything else numpy-formatted."""
    feature = ds.features[column]
    if isinstance(feature, hf.Image):
        if not features:
            raise DataError(f"{path}: {what} holds images; the label column must hold class labels")
        return _hf_images(ds[column], len(ds), path, what)
    if features and isinstance(feature, hf.Value) and feature.dtype in ("string", "large_string"):
        raise DataError(
            f"{path}: {what} holds strings; hetfl needs numeric features (tokenise text to ids or pick another column "
            "with data.columns)"
        )
    try:
        return np.asarray(ds.select_columns([column]).with_format("numpy")[column])
    except ValueError as err:
        raise DataError(
            f"{path}: {what} holds samples of different shapes ({str(err).splitlines()[0][:100]}); hetfl needs one shape"
        ) from None


_IMAGE_MODES = {"1": "L", "L": "L", "I": "L", "I;16": "L", "F": "L", "RGB": "RGB", "RGBA": "RGBA"}
"""The mode a Hugging Face image column is converted to, by the mode of its first image (others: RGB)."""


def _hf_images(images: Any, n: int, path: Path, what: str) -> np.ndarray:
    """Decoded PIL images as float32 ``(n, C, H, W)`` in [0, 1], all converted to the first image's mode."""
    out: np.ndarray | None = None
    mode, shape = "L", ()
    for i, image in enumerate(images):
        if image is None:
            raise DataError(f"{path}: {what} has no image in sample {i}")
        if out is None:
            mode = _IMAGE_MODES.get(image.mode, "RGB")
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
        if out is None:
            shape = pixels.shape
            channels = 1 if pixels.ndim == 2 else pixels.shape[2]
            out = np.empty((n, channels, *pixels.shape[:2]), dtype=np.float32)
        elif pixels.shape != shape:
            raise DataError(
                f"{path}: {what}: image {i} is {pixels.shape[1]}x{pixels.shape[0]}, image 0 {shape[1]}x{shape[0]}; hetfl "
                "needs images of one size (resize them first, e.g. with Dataset.map)"
            )
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = chw.astype(np.float32) / np.float32(255.0)
    if out is None:
        raise DataError(f"{path}: {what} has no images")
    return out
