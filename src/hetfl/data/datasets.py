"""Dataset loaders: every dataset is read from a local path, nothing is downloaded.

:func:`load_dataset` turns a :class:`~hetfl.config.DataConfig` into a :class:`Dataset`: all the
samples of one dataset pooled in memory (official train and test files together; the
partitioner makes the per-client splits). Loaders and the files they expect:

=================  =====================================================================
``digits``         scikit-learn's bundled 8x8 digits; ``x`` is ``(N, 64)``, raw 0..16.
``text``           built in: byte-level language modelling on text that ships with Python
                   (:mod:`hetfl.data.text`, ``data.text``). Client ``c`` gets
                   ``tokens_per_client`` bytes of style ``styles[c mod S]``, cut into
                   non-overlapping windows of ``context + 1`` bytes (the tail dropped);
                   ``x`` is a window's first ``context`` bytes, ``y`` its last ``context``
                   (the next-token targets), both int64 ``(N, context)``; ``groups`` is the
                   client, so ``partition.kind: natural`` deals each client its own text.
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
``csv``            a header row, a label column (``data.label_column``), an optional client-id
                   column (``data.id_column``), every other column a numeric feature.
``npz``            arrays ``x`` ``(N, ...)`` and ``y`` ``(N,)``, optional ``groups`` ``(N,)``
                   and ``vocab_size`` (marks ``x`` as integer token ids).
=================  =====================================================================

Labels are int64 in ``[0, n_classes)``. Labels that are not already non-negative integers
(CSV strings, say) are mapped to ``0..K-1`` in sorted order (numerically when every value is a
number). Natural client ids (``groups``) are always mapped to ``0..G-1`` in sorted order,
except LEAF users, numbered in order of first appearance.

Shakespeare text is encoded with LEAF's 80-character table :data:`ALL_LETTERS`; a character
outside the table becomes a space (LEAF's own ``str.find`` would give -1, which is no index).

A missing or malformed file is a :class:`~hetfl.errors.DataError` whose one-line message names
the file and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hetfl.config import DataConfig
from hetfl.errors import DataError

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare character table; a character's token id is its index here."""

UNKNOWN_LETTER = ALL_LETTERS.index(" ")
"""Token id given to characters outside :data:`ALL_LETTERS` (the space)."""

FEMNIST_CLASSES = 62


@dataclass
class Dataset:
    """All the samples of one dataset.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"digits"``.
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
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    n_classes: int
    groups: np.ndarray | None = None
    vocab_size: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


# --------------------------------------------------------------------------- entry point
EXPECTED = {
    "digits": "nothing (it ships with scikit-learn)",
    "text": "nothing (it reads text that ships with Python)",
    "mnist": "a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]",
    "fashion_mnist": "a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]",
    "cifar10": "a folder with the python batches data_batch_1..data_batch_5 and test_batch",
    "leaf": "a LEAF folder with train/ and/or test/ subfolders of *.json files (or a .json file)",
    "csv": "a CSV file with a header row and a label column",
    "npz": "an .npz file with arrays x and y (optional groups)",
}
"""What each dataset expects at ``data.path``, for error messages."""


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the dataset named by ``cfg.dataset`` from ``cfg.path``.

    Parameters
    ----------
    cfg : DataConfig
        The validated ``data`` section.
    seed : int, default 0
        Seeds what a built-in dataset draws (``text``: which text each client gets).

    Returns
    -------
    Dataset
        Every sample of the dataset, labels int64 in ``[0, n_classes)``.

    Raises
    ------
    DataError
        If the path is missing or a file does not hold what the dataset expects.
    """
    if cfg.dataset == "digits":
        return _check(_load_digits(), "sklearn digits")
    if cfg.dataset == "text":
        return _check(load_text(cfg, seed), "text")
    if cfg.dataset == "synthetic":
        raise DataError(
            "data.dataset: synthetic has no pooled samples; each client's are generated when it trains "
            "(hetfl.data.synthetic.SyntheticData), so it cannot be loaded or partitioned as a whole"
        )
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist; dataset '{cfg.dataset}' expects {EXPECTED[cfg.dataset]}")
    return _check(LOADERS[cfg.dataset](path, cfg), str(path))


def _check(ds: Dataset, source: str) -> Dataset:
    """Refuse a dataset whose arrays disagree with each other."""
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
    return ds


# --------------------------------------------------------------------------- digits
def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Dataset("digits", bunch.data.astype(np.float32), bunch.target.astype(np.int64), n_classes=10)


# --------------------------------------------------------------------------- text
def load_text(cfg: DataConfig, seed: int) -> Dataset:
    """The ``text`` dataset: every client's byte stream (:func:`hetfl.data.text.client_corpora`) as LM windows."""
    from hetfl.data.text import VOCAB_SIZE, client_corpora

    text = cfg.text
    try:
        corpora = client_corpora(cfg.n_clients, tuple(text.styles), seed, tokens_per_client=text.tokens_per_client)
    except ValueError as err:
        raise DataError(f"data.text.tokens_per_client: {err}") from None
    rows = [lm_rows(tokens, text.context) for tokens in corpora.tokens]
    windows = np.concatenate(rows)
    groups = np.repeat(np.arange(cfg.n_clients, dtype=np.int64), [len(r) for r in rows])
    x, y = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    return Dataset("text", x, y, n_classes=VOCAB_SIZE, groups=groups, vocab_size=VOCAB_SIZE)


def lm_rows(tokens: np.ndarray, context: int) -> np.ndarray:
    """A token stream cut into non-overlapping rows of ``context + 1`` tokens ``(n, context + 1)``, the tail dropped."""
    n = len(tokens) // (context + 1)
    return np.asarray(tokens[: n * (context + 1)], dtype=np.int64).reshape(n, context + 1)


# --------------------------------------------------------------------------- helpers
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


def _load_mnist(path: Path, cfg: DataConfig) -> Dataset:
    """MNIST or Fashion-MNIST: pool the train and (if present) t10k IDX files."""
    _require_folder(path, cfg.dataset)
    xs, ys = [], []
    for split in ("train", "t10k"):
        images_path = _find_idx(path, f"{split}-images-idx3-ubyte")
        labels_path = _find_idx(path, f"{split}-labels-idx1-ubyte")
        if images_path is None and labels_path is None and split == "t10k":
            continue  # train only is fine
        if images_path is None or labels_path is None:
            missing = f"{split}-images-idx3-ubyte" if images_path is None else f"{split}-labels-idx1-ubyte"
            raise DataError(f"{path}: {missing}[.gz] not found; dataset '{cfg.dataset}' expects {EXPECTED[cfg.dataset]}")
        images, labels = _read_idx_pair(images_path, labels_path)
        xs.append(images)
        ys.append(labels)
    x = np.concatenate(xs)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = (x.astype(np.float32) / np.float32(scale))[:, None, :, :]
    return Dataset(cfg.dataset, x, np.concatenate(ys).astype(np.int64), n_classes=10)


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


def _load_cifar10(path: Path, cfg: DataConfig) -> Dataset:
    """CIFAR-10 python version: pool the batches that exist (at least one ``data_batch_*``)."""
    _require_folder(path, cfg.dataset)
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


def _load_leaf(path: Path, cfg: DataConfig) -> Dataset:
    """LEAF JSON: pool train and test of each user; groups are the users."""
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
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from None
    rows = [r for r in rows if r]  # blank lines
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
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
    if not np.isfinite(column).all():
        raise DataError(f"{path}: column {name!r} has missing or non-finite values")
    return column


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _load_csv(path: Path, cfg: DataConfig) -> Dataset:
    """CSV: label column, optional id column (groups), every other column a numeric feature."""
    _require_file(path, "csv")
    header, rows = _read_csv(path)
    for option, column in (("label_column", cfg.label_column), ("id_column", cfg.id_column)):
        if column is not None and column not in header:
            raise DataError(f"{path}: no column {column!r} (data.{option}); columns are {', '.join(header)}")
    columns = dict(zip(header, zip(*rows)))
    features = [h for h in header if h not in (cfg.label_column, cfg.id_column)]
    if not features:
        raise DataError(f"{path}: no feature columns besides {cfg.label_column!r}")
    x = np.stack([_numeric_column(columns[h], h, path) for h in features], axis=1).astype(np.float32)
    y, uniques = encode(np.asarray(columns[cfg.label_column]))
    groups = encode(np.asarray(columns[cfg.id_column]))[0] if cfg.id_column else None
    return Dataset("csv", x, y, n_classes=len(uniques), groups=groups)


# --------------------------------------------------------------------------- NPZ
def _load_npz(path: Path, cfg: DataConfig) -> Dataset:
    """NPZ: arrays ``x`` and ``y``, optional ``groups`` and ``vocab_size``."""
    _require_file(path, "npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz file of numeric arrays ({err})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r}; expected arrays x (N, ...) and y (N,), optional groups (N,)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: expected x (N, ...) and y (N,) of one length, found x {x.shape} and y {y.shape}")
    y, n_classes = _as_labels(y)
    groups = encode(arrays["groups"])[0] if "groups" in arrays else None
    if "vocab_size" in arrays:
        return Dataset("npz", x.astype(np.int64), y, n_classes, groups, vocab_size=int(arrays["vocab_size"]))
    x = x.astype(np.float32)
    return Dataset("npz", x[:, None] if x.ndim == 1 else x, y, n_classes, groups)


LOADERS: dict[str, Callable[[Path, DataConfig], Dataset]] = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "leaf": _load_leaf,
    "csv": _load_csv,
    "npz": _load_npz,
}
"""Loader of each dataset read from ``data.path`` (``digits`` needs no path)."""
