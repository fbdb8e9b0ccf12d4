"""Loaders: tiny files of every supported format, written into tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from hetfl.config import DataConfig
from hetfl.data import ALL_LETTERS, load_dataset
from hetfl.errors import DataError


def load(dataset: str, path, **kwargs):
    return load_dataset(DataConfig(dataset=dataset, path=str(path), **kwargs))


# --------------------------------------------------------------------------- digits
def test_digits():
    ds = load_dataset(DataConfig(dataset="digits"))
    assert ds.name == "digits"
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and set(np.unique(ds.y)) == set(range(10))
    assert ds.x.min() == 0 and ds.x.max() == 16
    assert ds.n_classes == 10 and ds.input_shape == (64,)
    assert ds.groups is None and ds.vocab_size is None


def test_digits_are_scikit_learns_without_importing_it():
    from sklearn.datasets import load_digits  # the reference: hetfl reads its file, row for row

    ds, bunch = load_dataset(DataConfig(dataset="digits")), load_digits()
    assert np.array_equal(ds.x, bunch.data.astype(np.float32)) and np.array_equal(ds.y, bunch.target)
    # and a fresh process that loads them has not imported scikit-learn (about 1.5 s of its start-up)
    code = ("import sys; from hetfl.config import DataConfig; from hetfl.data import load_dataset; "
            "load_dataset(DataConfig(dataset='digits')); print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# --------------------------------------------------------------------------- MNIST
def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def mnist_folder(folder, n_train=5, n_test=3, gz=False, with_test=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {}
    splits = [("train", n_train)] + ([("t10k", n_test)] if with_test else [])
    for split, n in splits:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_pools_train_and_t10k(tmp_path, gz):
    arrays = mnist_folder(tmp_path / "mnist", gz=gz)
    ds = load("mnist", tmp_path / "mnist")
    assert ds.x.shape == (8, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.n_classes == 10
    images = np.concatenate([arrays["train"][0], arrays["t10k"][0]])
    labels = np.concatenate([arrays["train"][1], arrays["t10k"][1]])
    assert np.allclose(ds.x[:, 0], images / 255.0)
    assert np.array_equal(ds.y, labels)
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0


def test_fashion_mnist_train_only(tmp_path):
    mnist_folder(tmp_path / "fm", with_test=False)
    ds = load("fashion_mnist", tmp_path / "fm")
    assert ds.name == "fashion_mnist" and ds.x.shape == (5, 1, 28, 28)


def test_mnist_missing_train_labels(tmp_path):
    mnist_folder(tmp_path / "m")
    (tmp_path / "m" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load("mnist", tmp_path / "m")


def test_mnist_half_a_t10k_pair(tmp_path):
    mnist_folder(tmp_path / "m")
    (tmp_path / "m" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load("mnist", tmp_path / "m")


def test_mnist_bad_magic(tmp_path):
    mnist_folder(tmp_path / "m")
    target = tmp_path / "m" / "train-images-idx3-ubyte"
    target.write_bytes(b"\x1f\x8b\x08\x03" + target.read_bytes()[4:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file"):
        load("mnist", tmp_path / "m")


def test_mnist_truncated_and_swapped_files(tmp_path):
    mnist_folder(tmp_path / "m")
    target = tmp_path / "m" / "train-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: IDX header announces shape"):
        load("mnist", tmp_path / "m")

    mnist_folder(tmp_path / "m")
    labels = (tmp_path / "m" / "train-labels-idx1-ubyte").read_bytes()
    target.write_bytes(labels)  # a label file where the images belong
    with pytest.raises(DataError, match="train-images-idx3-ubyte: expected an IDX image file"):
        load("mnist", tmp_path / "m")


def test_mnist_label_count_mismatch(tmp_path):
    mnist_folder(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="4 labels for the 5 images"):
        load("mnist", tmp_path / "m")


def test_mnist_corrupt_gzip(tmp_path):
    mnist_folder(tmp_path / "m", gz=True)
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load("mnist", tmp_path / "m")


def test_missing_path_and_wrong_kind_of_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load("mnist", missing)
    message = str(err.value)
    assert message == (
        f"data.path: {missing} does not exist; dataset 'mnist' expects a folder with "
        "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]"
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; dataset 'mnist' expects a folder"):
        load("mnist", tmp_path / "file")
    with pytest.raises(DataError, match="is a folder; dataset 'csv' expects a CSV file"):
        load("csv", tmp_path)
    with pytest.raises(DataError, match="does not exist; dataset 'npz'"):
        load("npz", missing)


# --------------------------------------------------------------------------- CIFAR-10
def write_cifar_batch(path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f, protocol=2)
    return data, labels


def test_cifar10_pools_batches(tmp_path):
    d1, l1 = write_cifar_batch(tmp_path / "data_batch_1", 4, 1)
    d2, l2 = write_cifar_batch(tmp_path / "data_batch_3", 3, 2)
    dt, lt = write_cifar_batch(tmp_path / "test_batch", 2, 3)
    (tmp_path / "batches.meta").write_bytes(b"never unpickled")
    ds = load("cifar10", tmp_path)
    assert ds.x.shape == (9, 3, 32, 32) and ds.x.dtype == np.float32 and ds.n_classes == 10
    assert np.array_equal(ds.y, np.array(l1 + l2 + lt))
    # channel-major rows: value (c, i, j) is data[c * 1024 + i * 32 + j]
    assert ds.x[0, 2, 5, 7] == pytest.approx(d1[0, 2 * 1024 + 5 * 32 + 7] / 255)
    assert ds.x[-1, 1, 31, 0] == pytest.approx(dt[-1, 1024 + 31 * 32] / 255)


def test_cifar10_inside_extracted_folder(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", 2, 0)
    assert load("cifar10", tmp_path).x.shape == (2, 3, 32, 32)


def test_cifar10_errors(tmp_path):
    write_cifar_batch(tmp_path / "test_batch", 2, 0)
    with pytest.raises(DataError, match="no data_batch_"):
        load("cifar10", tmp_path)

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"data_batch_1: expected data of shape \(N, 3072\)"):
        load("cifar10", tmp_path)

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_1: 1 labels for 2 images"):
        load("cifar10", tmp_path)


def test_cifar10_refuses_pickled_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch"):
        load("cifar10", tmp_path)
    assert not (tmp_path / "owned").exists()


# --------------------------------------------------------------------------- LEAF
def write_leaf(path, users: dict[str, tuple[list, list]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    path.write_text(json.dumps(data))


def test_leaf_femnist_like(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.random((7, 784)).round(3)
    write_leaf(tmp_path / "train" / "a.json", {"w1": (pixels[:3].tolist(), [0, 5, 61]), "w2": (pixels[3:5].tolist(), [9, 9])})
    write_leaf(tmp_path / "test" / "a.json", {"w2": (pixels[5:6].tolist(), [1]), "w1": (pixels[6:].tolist(), [2])})
    ds = load("leaf", tmp_path)
    assert ds.x.shape == (7, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.n_classes == 62 and ds.vocab_size is None
    assert np.array_equal(ds.y, [0, 5, 61, 9, 9, 1, 2])
    assert np.array_equal(ds.groups, [0, 0, 0, 1, 1, 1, 0])  # a user's train and test share a group
    assert np.allclose(ds.x.reshape(7, 784), pixels[[0, 1, 2, 3, 4, 5, 6]])


def test_leaf_files_directly_and_a_single_file(tmp_path):
    write_leaf(tmp_path / "one.json", {"u": ([[0.5, 1.0]] * 3, [0, 1, 3])})
    write_leaf(tmp_path / "two.json", {"v": ([[0.0, 2.0]], [2])})
    folder = load("leaf", tmp_path)
    assert folder.x.shape == (4, 2) and folder.n_classes == 4
    assert np.array_equal(folder.groups, [0, 0, 0, 1])
    single = load("leaf", tmp_path / "two.json")
    assert single.x.shape == (1, 2)


def test_leaf_shakespeare_like(tmp_path):
    assert len(ALL_LETTERS) == 80
    x = ["to be", "or no", "t\u00e9 ~!"]  # é and ~ are not in LEAF's table
    y = ["o", "t", "A"]
    write_leaf(tmp_path / "train" / "s.json", {"ROMEO": (x[:2], y[:2])})
    write_leaf(tmp_path / "test" / "s.json", {"JULIET": (x[2:], y[2:])})
    ds = load("leaf", tmp_path)
    assert ds.x.dtype == np.int64 and ds.x.shape == (3, 5)
    assert ds.n_classes == 80 and ds.vocab_size == 80
    assert "".join(ALL_LETTERS[i] for i in ds.x[0]) == "to be"
    space = ALL_LETTERS.index(" ")
    assert ds.x[2].tolist() == [ALL_LETTERS.index("t"), space, space, space, ALL_LETTERS.index("!")]
    assert ds.y.tolist() == [ALL_LETTERS.index(c) for c in y]
    assert ds.groups.tolist() == [0, 0, 1]


def test_leaf_errors(tmp_path):
    write_leaf(tmp_path / "train" / "bad.json", {"u": ([[1.0], [2.0]], [0])})
    with pytest.raises(DataError, match=r"bad.json: user 'u' has 2 samples but 1 labels"):
        load("leaf", tmp_path)
    (tmp_path / "train" / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load("leaf", tmp_path)
    (tmp_path / "train" / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="bad.json: expected LEAF JSON"):
        load("leaf", tmp_path)
    (tmp_path / "train" / "bad.json").unlink()
    with pytest.raises(DataError, match=r"no \*.json files"):
        load("leaf", tmp_path)


# --------------------------------------------------------------------------- CSV
def test_csv_with_id_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f1,who,label,f2\n1.5,bob,cat,0\n2,alice,dog,1\n-3,bob,cat,2\n4e1,carol,bird,3\n")
    ds = load("csv", path, id_column="who")
    assert ds.x.dtype == np.float32 and ds.x.shape == (4, 2)
    assert np.allclose(ds.x, [[1.5, 0], [2, 1], [-3, 2], [40, 3]])
    assert ds.y.tolist() == [1, 2, 1, 0]  # sorted: bird, cat, dog
    assert ds.n_classes == 3
    assert ds.groups.tolist() == [1, 0, 1, 2]  # sorted: alice, bob, carol


def test_csv_numeric_labels_sort_numerically(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("target,a\n10,1\n2,2\n2,3\n-1,4\n")
    ds = load("csv", path, label_column="target")
    assert ds.y.tolist() == [2, 1, 1, 0]
    assert ds.groups is None and ds.x.shape == (4, 1)


def test_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,colour,label\n1,red,0\n2,blue,1\n")
    with pytest.raises(DataError, match=r"d.csv: column 'colour' is not numeric \(value 'red'\)"):
        load("csv", path)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"d.csv: no column 'label' \(data.label_column\); columns are a, b"):
        load("csv", path)
    with pytest.raises(DataError, match=r"no column 'user' \(data.id_column\)"):
        load("csv", path, label_column="a", id_column="user")
    path.write_text("a,label\n1,0\n2\n")
    with pytest.raises(DataError, match="d.csv: row 3 has 1 fields"):
        load("csv", path)
    path.write_text("a,label\n")
    with pytest.raises(DataError, match="d.csv: expected a header row and at least one data row"):
        load("csv", path)
    path.write_text("a,label\n1,0\n,1\n")
    with pytest.raises(DataError, match="column 'a' is not numeric"):
        load("csv", path)


# --------------------------------------------------------------------------- NPZ
def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((6, 2, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 3, 3, 1, 0, 2]), groups=np.array([10, 10, 20, 30, 30, 30]))
    ds = load("npz", tmp_path / "d.npz")
    assert ds.x.dtype == np.float32 and ds.x.shape == (6, 2, 3) and np.allclose(ds.x, x)
    assert ds.y.tolist() == [0, 3, 3, 1, 0, 2] and ds.n_classes == 4
    assert ds.groups.tolist() == [0, 0, 1, 2, 2, 2]


def test_npz_maps_labels_that_are_not_codes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros(3), y=np.array([-1.0, 5.5, -1.0]))
    ds = load("npz", tmp_path / "d.npz")
    assert ds.y.tolist() == [0, 1, 0] and ds.n_classes == 2
    assert ds.x.shape == (3, 1)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.zeros((3, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="d.npz: no array 'x'"):
        load("npz", tmp_path / "d.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match=r"d.npz: expected x \(N, ...\) and y \(N,\) of one length"):
        load("npz", tmp_path / "d.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(3, dtype=int), groups=np.zeros(2))
    with pytest.raises(DataError, match="d.npz: 3 samples but 2 group ids"):
        load("npz", tmp_path / "d.npz")
    (tmp_path / "d.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="d.npz: not a readable .npz file"):
        load("npz", tmp_path / "d.npz")


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "d.csv").write_text("a,label\nx\ny,1\n")
    for call in (lambda: load("csv", tmp_path / "d.csv"), lambda: load("leaf", tmp_path / "none")):
        with pytest.raises(DataError) as err:
            call()
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the public loaders, called directly
def test_public_loaders_take_a_path_and_agree_with_load_dataset(tmp_path):
    from hetfl.data import datasets

    mnist_folder(tmp_path / "m")
    assert np.array_equal(datasets.load_mnist(tmp_path / "m").x, load("mnist", tmp_path / "m").x)
    fashion = datasets.load_mnist(str(tmp_path / "m"), DataConfig(dataset="fashion_mnist", path=str(tmp_path / "m")))
    assert fashion.name == "fashion_mnist"
    write_cifar_batch(tmp_path / "data_batch_1", 2, 0)
    assert datasets.load_cifar10(tmp_path).x.shape == (2, 3, 32, 32)
    write_leaf(tmp_path / "leaf" / "a.json", {"u": ([[0.5, 1.0]] * 2, [0, 1])})
    assert datasets.load_leaf(tmp_path / "leaf").groups.tolist() == [0, 0]
    (tmp_path / "d.csv").write_text("y,a\n1,5\n0,6\n")
    assert datasets.load_csv(tmp_path / "d.csv", DataConfig(dataset="csv", path="d.csv", label_column="y")).y.tolist() == [1, 0]
    with pytest.raises(DataError) as err:
        datasets.load_npz(tmp_path / "nowhere.npz")
    assert str(err.value) == (
        f"data.path: {tmp_path / 'nowhere.npz'} does not exist; dataset 'npz' expects an .npz file with arrays x and y "
        "(optional groups)"
    )


def test_npz_features_must_be_finite_numbers(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([["1.5", "2"]] * 3), y=np.arange(3))  # numbers written as strings are still strings
    with pytest.raises(DataError, match=r"d.npz: x holds strings \(<U3\); features must be numbers"):
        load("npz", path)
    x = np.ones((5, 2))
    x[3, 1] = -np.inf
    np.savez(path, x=x, y=np.arange(5))
    with pytest.raises(DataError, match=r"d.npz: x has NaN or infinite values \(the first in sample 3\)"):
        load("npz", path)
    np.savez(path, x=np.full((2, 2), 1e39), y=np.arange(2))  # finite in float64, not in float32
    with pytest.raises(DataError, match=r"d.npz: x has values beyond float32's range \(the first in sample 0\)"):
        load("npz", path)
    np.savez(path, x=np.ones((3, 2), dtype=bool), y=np.arange(3))
    assert load("npz", path).x.dtype == np.float32


def test_npz_empty_truncated_and_corrupt(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((50, 4)), y=np.arange(50) % 2)
    good = path.read_bytes()
    for content, expected in (
        (b"", "not a readable .npz file (the file is empty)"),
        (good[:-40], "not a readable .npz file (not a zip archive of .npy arrays, as numpy.savez writes, or truncated)"),
        (good[:300] + bytes(b ^ 0x5A for b in good[300:400]) + good[400:], "not a readable .npz file (truncated or corrupt"),
    ):
        path.write_bytes(content)
        with pytest.raises(DataError) as err:
            load("npz", path)
        assert str(err.value).startswith(f"{path}: {expected}") and "\n" not in str(err.value)
