"""Any dataset: built-in loaders through the registry, every return form of a loader of one's own, an official test
set dealt by the clients' training label mix, partitioners of one's own, Hugging Face datasets saved to disk, and
bad data files (npz, CSV, a deployed client's --data), each one line and exit code 2.

The user's loaders and partitioners live in :data:`SOURCE`, written to a temporary folder as ``hetfl_test_userdata.py``
beside the configs that name them by import path, as a user's would be.
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hetfl import registry
from hetfl.cli import main
from hetfl.config import DataConfig, load_config
from hetfl.data import as_dataset, check_parts, deal_test, federate, load_dataset
from hetfl.data import datasets as hetfl_datasets
from hetfl.data import mnist1d as hetfl_mnist1d
from hetfl.data.datasets import Dataset
from hetfl.data.partition import _apportion
from hetfl.deploy.client import load_data
from hetfl.errors import ConfigError, DataError

MODULE = "hetfl_test_userdata"

SOURCE = '''
"""Loaders and partitioners a user might write (hetfl's tests name them by import path, hetfl_test_userdata:pair)."""
import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset, IterableDataset, TensorDataset

from hetfl.data.datasets import Dataset


def blobs(n, seed=0, classes=3, features=4):
    """Gaussian blobs, one class every `classes` samples: learnable, so a short run's accuracy means something."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, features)) + 4.0 * y[:, None]
    return x, y


# ---------------------------------------------------------------- every return form
def pair(n=120):
    return blobs(n)


def tensors(n=120):
    x, y = blobs(n)
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def xy_dict(n=120):
    x, y = blobs(n)
    return {"x": x, "y": np.array(["cat", "dog", "emu"])[y], "n_classes": 4}


def official(n_train=120, n_test=60):
    return {"train": blobs(n_train, seed=0), "test": blobs(n_test, seed=1)}


def official_groups(n_train=120, n_test=60):
    (x, y), (xt, yt) = blobs(n_train, 0), blobs(n_test, 1)
    return {"train": (x, y, np.arange(n_train) % 6), "test": (xt, yt, np.arange(n_test) % 6)}


class Items(TorchDataset):
    def __init__(self, n):
        self.x, self.y = blobs(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.tensor(self.x[i], dtype=torch.float32), int(self.y[i])


def torch_items(n=90):
    return Items(n)


def tensor_dataset(n=90):
    x, y = blobs(n)
    return TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y))


def per_client(clients=5):
    return [blobs(20 + 4 * c, seed=c) for c in range(clients)]


def hetfl_dataset(n=120):
    x, y = blobs(n)
    return Dataset("mine", x.astype(np.float32), y.astype(np.int64), n_classes=3)


def tokens(n=120, vocab=12):
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(n, 6))
    return {"x": x, "y": x[:, 0] % 3, "vocab_size": vocab}


def with_path(path, scale=1.0):
    with np.load(path) as npz:
        return npz["x"] * scale, npz["y"]


SEEN = {}


def asks_everything(path, seed, n_clients, config, *, extra=0):
    SEEN.update(path=path, seed=seed, n_clients=n_clients, config=config, extra=extra)
    return blobs(60)


SHARED = blobs(120)


def shared():
    """The same module-level arrays every call (a loader that caches): hetfl must not normalise them in place."""
    return SHARED


# ---------------------------------------------------------------- bad loaders
def returns_none():
    return None


def strings():
    return np.array([["1.5", "2"]] * 10), np.arange(10) % 2


def nan_x():
    x, y = blobs(30)
    x[7, 2] = np.nan
    return x, y


def unequal():
    x, y = blobs(30)
    return x, y[:29]


def empty():
    return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)


def nan_labels():
    x, y = blobs(30)
    return x, np.where(np.arange(30) == 4, np.nan, y)


def too_many_labels():
    x, y = blobs(30)
    return {"x": x, "y": y, "n_classes": 2}


def bad_key():
    return {"x": 1, "y": 2, "labels": 3}


class ObjectItems(TorchDataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return object(), 1


def object_items():
    return ObjectItems()


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), 0


def iterable():
    return Stream()


def raises():
    raise RuntimeError("the bucket is gone")


def groups_train_only():
    (x, y), (xt, yt) = blobs(60, 0), blobs(20, 1)
    return {"train": (x, y, np.arange(60) % 3), "test": (xt, yt)}


def shapes_differ():
    return {"train": blobs(60, 0, features=4), "test": blobs(20, 1, features=5)}


def ragged():
    return [np.zeros(3), np.zeros(4)] * 5, np.arange(10) % 2


# ---------------------------------------------------------------- partitioners
def round_robin(labels, n_clients, rng, *, offset=0):
    owner = (np.arange(len(labels)) + offset) % n_clients
    return [np.flatnonzero(owner == c)[::-1].copy() for c in range(n_clients)]  # unsorted: hetfl sorts them


def by_group(labels, n_clients, rng, groups):
    return [np.flatnonzero(groups % n_clients == c) for c in range(n_clients)]


def first_feature(labels, n_clients, rng, x):
    order = np.argsort(x[:, 0], kind="stable")
    return [torch.from_numpy(part) for part in np.array_split(order, n_clients)]


def overlapping(labels, n_clients, rng):
    parts = round_robin(labels, n_clients, rng)
    parts[1] = np.concatenate([parts[1], parts[0][:1]])
    return parts


def too_few(labels, n_clients, rng):
    return round_robin(labels, n_clients - 1, rng)


def empty_part(labels, n_clients, rng):
    parts = round_robin(labels, n_clients - 1, rng)
    return parts + [np.array([], dtype=np.int64)]


def out_of_range(labels, n_clients, rng):
    parts = round_robin(labels, n_clients, rng)
    parts[2] = np.append(parts[2], len(labels))
    return parts


def float_indices(labels, n_clients, rng):
    return [p.astype(float) for p in round_robin(labels, n_clients, rng)]


def masks(labels, n_clients, rng):
    return [np.arange(len(labels)) % n_clients == c for c in range(n_clients)]


def owner_array(labels, n_clients, rng):
    return np.arange(len(labels)) % n_clients


def dropped(labels, n_clients, rng):
    parts = round_robin(labels, n_clients, rng)
    parts[0] = parts[0][1:]
    return parts


def two_arguments(labels, n_clients):
    return round_robin(labels, n_clients, None)


def fails(labels, n_clients, rng):
    raise ValueError("no sites file")
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The folder holding hetfl_test_userdata.py and the configs that name it (the registry imports from there)."""
    folder = tmp_path_factory.mktemp("user_data")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    yield folder
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def user(folder):
    """The module itself, imported from ``folder`` as the registry imports it."""
    registry.resolve("dataset", f"{MODULE}:pair", key="data.dataset", search=[folder])
    return sys.modules[MODULE]


def config(folder: Path, data: dict, **top) -> Path:
    """A short run's config beside the loader module."""
    raw = {
        "name": "user-data", "seed": 0, "rounds": 2,
        "data": {"n_clients": 4, **data},
        "devices": {"compute": {"distribution": "constant"}},
        "model": {"name": "logreg"},
        "training": {"lr": 0.1, "batch_size": 8, "local_steps": 3},
        "strategy": {"name": "fedavg", "clients_per_round": 4},
        **top,
    }
    path = folder / f"config_{abs(hash(json.dumps(raw, sort_keys=True, default=str))) % 10**10}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_line_error(capsys, argv: list) -> str:
    """Run the CLI, expecting exit code 2 and one line on stderr without a traceback; return that line."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error:"), err
    return err


def run_error(capsys, cfg: Path, out: Path) -> str:
    return one_line_error(capsys, ["run", cfg, "--out", out])


def run_ok(capsys, cfg: Path, out: Path) -> tuple[dict, str]:
    """Run the CLI; return summary.json and what it printed."""
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    return json.loads((out / "summary.json").read_text()), " ".join(printed.split())


# =========================================================================== built-ins through the same door
BUILT_IN_PARAMETERS = {"path", "config", "seed", "n_clients"}


def test_every_built_in_dataset_is_a_loader_the_registry_resolves():
    builtins = registry.KINDS["dataset"].builtins
    assert set(builtins) == {"digits", "text", "synthetic", "mnist1d", "mnist", "fashion_mnist", "cifar10", "leaf", "csv",
                             "npz", "hf"}
    for name, path in builtins.items():
        resolved = registry.resolve("dataset", name, key="data.dataset")
        assert resolved.builtin and resolved.path == path
        if name == "synthetic":  # generated per client; the engine builds it
            continue
        module = hetfl_mnist1d if name == "mnist1d" else hetfl_datasets  # MNIST-1D's generator has its own module
        assert resolved.obj is getattr(module, path.split(":")[1])
        assert set(inspect.signature(resolved.obj).parameters) <= BUILT_IN_PARAMETERS, name


def test_built_ins_called_from_python_and_through_load_dataset_agree(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((10, 3)), y=np.arange(10) % 2)
    direct = hetfl_datasets.load_npz(tmp_path / "d.npz")
    through = load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")))
    assert np.array_equal(direct.x, through.x) and np.array_equal(direct.y, through.y)
    digits = hetfl_datasets.load_digits()
    assert np.array_equal(digits.x, load_dataset(DataConfig()).x)
    (tmp_path / "d.csv").write_text("a,label\n1,x\n2,y\n")
    assert hetfl_datasets.load_csv(tmp_path / "d.csv").y.tolist() == [0, 1]  # config optional: label column 'label'


def test_synthetic_still_cannot_be_loaded_as_a_whole():
    with pytest.raises(DataError, match="synthetic has no pooled samples"):
        load_dataset(DataConfig(dataset="synthetic", partition={}, n_clients=5))


# =========================================================================== every return form, end to end
FORMS = {
    # loader: (partition kind, training samples, test samples)
    "pair": ("iid", 96, 24),
    "tensors": ("iid", 96, 24),
    "xy_dict": ("dirichlet", None, None),
    "official": ("iid", 120, 60),
    "official_groups": ("natural", 120, 60),
    "torch_items": ("iid", 72, 18),
    "tensor_dataset": ("iid", 72, 18),
    "per_client": ("natural", None, None),
    "hetfl_dataset": ("iid", 96, 24),
    "tokens": ("iid", 96, 24),
}


@pytest.mark.parametrize("loader", FORMS)
def test_each_return_form_runs_end_to_end(folder, tmp_path, capsys, loader):
    kind, n_train, n_test = FORMS[loader]
    cfg = config(folder, {"dataset": f"{MODULE}:{loader}", "partition": {"kind": kind}})
    summary, printed = run_ok(capsys, cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert f"{MODULE}:{loader}: 4 clients" in printed
    if n_train is not None:
        assert f"({n_train} train / {n_test} test samples, {kind} partition)" in printed
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["code"]["data.dataset"]
    assert recorded["path"] == f"{MODULE}:{loader}" and recorded["file"].endswith(f"{MODULE}.py")


def test_blobs_are_learnt_from_a_loader_of_ones_own(folder, tmp_path, capsys):
    cfg = config(folder, {"dataset": f"{MODULE}:official"}, rounds=10, training={"lr": 0.5, "batch_size": 8, "local_steps": 5})
    summary, _ = run_ok(capsys, cfg, tmp_path / "run")
    assert summary["final_accuracy"] > 0.9  # the test part was dealt and scored, and the blobs are separable


def test_what_each_form_becomes(folder, user):
    def load(loader, **data):
        return load_dataset(load_config(config(folder, {"dataset": f"{MODULE}:{loader}", **data})).data)

    x, y = user.blobs(120)
    pair = load("pair")
    assert pair.x.dtype == np.float32 and np.allclose(pair.x, x) and pair.y.tolist() == y.tolist()
    assert pair.n_classes == 3 and pair.groups is None and pair.n_test == 0 and pair.name == f"{MODULE}:pair"
    named = load("xy_dict")
    assert named.n_classes == 4 and named.y.tolist() == y.tolist()  # cat, dog, emu in sorted order
    split = load("official")
    assert len(split) == 180 and split.n_test == 60 and split.n_train == 120
    assert np.allclose(split.x[120:], user.blobs(60, seed=1)[0])
    grouped = load("official_groups", partition={"kind": "natural"})
    assert grouped.groups.tolist() == (np.arange(120) % 6).tolist() + (np.arange(60) % 6).tolist()
    items = load("torch_items")
    assert items.x.shape == (90, 4) and np.allclose(items.x, user.blobs(90)[0], atol=1e-6)
    clients = load("per_client", partition={"kind": "natural"})
    assert np.bincount(clients.groups).tolist() == [20, 24, 28, 32, 36]
    tokens = load("tokens")
    assert tokens.vocab_size == 12 and tokens.x.dtype == np.int64 and tokens.input_shape == (6,)


def test_a_loader_gets_what_its_signature_asks_for(folder, user, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2)), y=np.arange(4) % 2)
    cfg = load_config(config(folder, {"dataset": f"{MODULE}:asks_everything", "path": str(tmp_path / "d.npz"),
                                      "params": {"extra": 7}}))
    load_dataset(cfg.data, seed=5)
    assert user.SEEN["path"] == str(tmp_path / "d.npz") and user.SEEN["seed"] == 5 and user.SEEN["n_clients"] == 4
    assert user.SEEN["extra"] == 7 and user.SEEN["config"] is cfg.data

    np.savez(tmp_path / "e.npz", x=np.arange(8.0).reshape(4, 2), y=np.arange(4) % 2)
    cfg = load_config(config(folder, {"dataset": f"{MODULE}:with_path", "path": str(tmp_path / "e.npz"),
                                      "params": {"scale": 2.0}}))
    assert load_dataset(cfg.data).x.tolist() == (2 * np.arange(8.0).reshape(4, 2)).tolist()


def test_hetfl_never_normalises_a_loaders_own_arrays(folder, user):
    before = user.SHARED[0].copy()
    cfg = load_config(config(folder, {"dataset": f"{MODULE}:shared"}))
    first, again = federate(cfg.data, 0), federate(cfg.data, 0)
    assert np.array_equal(user.SHARED[0], before)
    assert np.array_equal(first.dataset.x, again.dataset.x)


# =========================================================================== an official test set
def test_deal_test_follows_each_clients_training_label_mix_exactly():
    # 2 clients; training: client 0 has 3 of class 0, client 1 has 1 of class 0 and 2 of class 1
    labels = np.array([0, 0, 0, 0, 1, 1] + [0, 0, 0, 0, 1, 1, 1])
    train = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    test = np.arange(6, 13)
    parts = deal_test(train, labels, test, np.random.default_rng(0))
    assert [np.bincount(labels[p], minlength=2).tolist() for p in parts] == [[3, 0], [1, 3]]
    assert sorted(np.concatenate(parts).tolist()) == test.tolist()
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_deal_test_remainders_ties_and_unseen_classes():
    # three clients, one class-0 training sample each: 4 test samples give 1, 1, 1 and one more to a random client
    labels = np.array([0, 0, 0] + [0] * 4 + [5] * 6)  # class 5: no client trains on it
    train = [np.array([0]), np.array([1]), np.array([2])]
    extra = set()
    for seed in range(20):
        parts = deal_test(train, labels, np.arange(3, 13), np.random.default_rng(seed))
        zeros = [int(np.sum(labels[p] == 0)) for p in parts]
        assert sorted(zeros) == [1, 1, 2]
        extra.add(zeros.index(2))
        assert [int(np.sum(labels[p] == 5)) for p in parts] == [2, 2, 2]  # by training sizes, equal here
        assert sorted(np.concatenate(parts).tolist()) == list(range(3, 13))
    assert extra == {0, 1, 2}  # ties broken at random, not always the first client


def test_apportion_is_largest_remainders():
    rng = np.random.default_rng(0)
    assert _apportion(10, np.array([5, 3, 2]), rng).tolist() == [5, 3, 2]
    assert _apportion(7, np.array([5, 3, 2]), rng).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4: the .5 gets the extra one
    assert _apportion(5, np.array([0, 1, 0]), rng).tolist() == [0, 5, 0]
    for n in range(0, 40):
        weights = np.random.default_rng(n).integers(0, 9, size=7)
        weights[0] += 1
        shares = _apportion(n, weights, rng)
        assert shares.sum() == n and np.all(shares[weights == 0] == 0)
        assert np.all(np.abs(shares - n * weights / weights.sum()) < 1)


def test_deal_test_keeps_a_natural_group_with_its_client():
    groups = np.array([0, 0, 1, 1, 2, 2] + [2, 0, 1, 3])  # group 3 is not trained on: dealt by label
    labels = np.array([0, 1, 0, 1, 0, 1] + [1, 1, 0, 0])
    train = [np.array([0, 1, 4, 5]), np.array([2, 3])]  # client 0: groups 0 and 2; client 1: group 1
    parts = deal_test(train, labels, np.arange(6, 10), np.random.default_rng(0), groups=groups)
    assert 6 in parts[0] and 7 in parts[0] and 8 in parts[1]
    assert sorted(np.concatenate(parts).tolist()) == [6, 7, 8, 9]


def test_federate_deals_an_official_test_set_by_label_mix(folder):
    def fed_of(partition):
        cfg = load_config(config(folder, {"dataset": f"{MODULE}:official", "params": {"n_train": 600, "n_test": 300},
                                          "n_clients": 6, "partition": partition}))
        return federate(cfg.data, 0)

    fed = fed_of({"kind": "dirichlet", "alpha": 0.3})
    y = fed.dataset.y
    assert sorted(np.concatenate(fed.train).tolist()) == list(range(600))  # all of the train part, no split
    assert sorted(np.concatenate(fed.test).tolist()) == list(range(600, 900))  # every test sample once
    train_counts = np.stack([np.bincount(y[t], minlength=3) for t in fed.train])
    test_counts = np.stack([np.bincount(y[t], minlength=3) for t in fed.test])
    expected = 100 * train_counts / train_counts.sum(axis=0)  # 100 test samples of each class
    assert np.all(np.abs(test_counts - expected) < 1)
    assert np.all(test_counts[train_counts == 0] == 0)  # no test sample of a class a client never trains on
    assert fed.dataset.x[np.concatenate(fed.train)].mean() == pytest.approx(0, abs=1e-5)  # normalised on train only


def test_official_test_set_with_natural_groups(folder):
    cfg = load_config(config(folder, {"dataset": f"{MODULE}:official_groups", "n_clients": 3,
                                      "partition": {"kind": "natural"}}))
    fed = federate(cfg.data, 0)
    groups = fed.dataset.groups
    for train, test in zip(fed.train, fed.test):
        assert set(groups[test].tolist()) == set(groups[train].tolist())  # a group's test samples stay with it
    assert sorted(np.concatenate(fed.test).tolist()) == list(range(120, 180))


def test_more_clients_than_training_samples(folder, tmp_path, capsys):
    cfg = config(folder, {"dataset": f"{MODULE}:official", "params": {"n_train": 3}, "n_clients": 4})
    assert "data.n_clients=4 exceeds the 3 training samples" in run_error(capsys, cfg, tmp_path / "r")


# =========================================================================== a loader's mistakes: one line, exit 2
BAD_LOADERS = {
    "returns_none": (f"data.dataset: {MODULE}:returns_none: what it returned is a NoneType; expected (x, y)", {}),
    "strings": ("x holds strings (<U3); features must be numbers", {}),
    "nan_x": ("x has NaN or infinite values (the first in sample 7)", {}),
    "unequal": ("x has 30 samples and y 29 labels", {}),
    "empty": ("what it returned has no samples", {}),
    "nan_labels": ("y has a missing (NaN) or infinite label (sample 4)", {}),
    "too_many_labels": ("n_classes=2, but the labels need 3 classes", {}),
    "bad_key": ("returned a dict with the unknown key 'labels'", {}),
    "object_items": ("item 0 of the torch Dataset has x of type object; expected a tensor", {}),
    "iterable": ("is an IterableDataset, which has no length", {}),
    "raises": (f"data.dataset: {MODULE}:raises() raised RuntimeError: the bucket is gone (", {}),
    "groups_train_only": ("groups are given for the train part only", {}),
    "shapes_differ": ("test x has samples of shape (5,), train x of shape (4,)", {}),
    "ragged": ("x is not an array", {}),
    "per_client": (f"data.partition.kind: {MODULE}:per_client returns a list of 5 per-client datasets, each a natural "
                   "client; set data.partition.kind: natural, not 'iid'", {}),
    "with_path": (f"data.path: {MODULE}:with_path reads a path (its parameter 'path'); set data.path", {}),
    "pair": (f"data.dataset: {MODULE}:pair takes no parameter 'bogus'", {"params": {"bogus": 1}}),
}


@pytest.mark.parametrize("loader", BAD_LOADERS)
def test_a_loaders_mistake_is_one_line_naming_it(folder, tmp_path, capsys, loader):
    expected, data = BAD_LOADERS[loader]
    err = run_error(capsys, config(folder, {"dataset": f"{MODULE}:{loader}", **data}), tmp_path / "r")
    assert expected in err, err
    assert f"{MODULE}:{loader}" in err
    if loader == "raises":  # the loader's own file and line
        assert f"{MODULE}.py, line " in err


def test_torch_datasets_beyond_the_memory_bound_are_refused(folder, monkeypatch):
    monkeypatch.setattr(hetfl_datasets, "MATERIALISE_LIMIT_BYTES", 1000)
    cfg = load_config(config(folder, {"dataset": f"{MODULE}:torch_items"}))
    with pytest.raises(DataError, match=r"torch Dataset of 90 items of shape \(4,\): 0.0 GiB as float32 features, more"):
        load_dataset(cfg.data)


def test_as_dataset_from_python():
    ds = as_dataset({"train": (np.ones((4, 2)), ["b", "a", "b", "c"]), "test": (np.zeros((2, 2)), ["c", "d"])}, "mine")
    assert isinstance(ds, Dataset) and ds.n_test == 2 and ds.n_train == 4
    assert ds.y.tolist() == [1, 0, 1, 2, 2, 3] and ds.n_classes == 4  # mapped over both parts
    ds = as_dataset({"train": (np.ones((3, 2)), [0, 1, 1]), "test": (np.zeros((2, 2)), [1, 0]),
                     "groups": {"train": ["s1", "s2", "s1"], "test": ["s2", "s3"]}}, "mine")
    assert ds.groups.tolist() == [0, 1, 0, 1, 2]
    seq = as_dataset({"x": np.arange(12).reshape(3, 4) % 5, "y": np.arange(12).reshape(3, 4) % 5, "vocab_size": 5}, "lm")
    assert seq.y.shape == (3, 4) and seq.n_classes == 5
    with pytest.raises(DataError, match=r"lm: x token ids must lie in 0..4 \(vocab_size 5\), found 0..7"):
        as_dataset({"x": np.arange(8).reshape(2, 4), "y": [0, 1], "vocab_size": 5}, "lm", source="lm")
    with pytest.raises(DataError, match="client 1's x has NaN"):
        as_dataset([(np.ones((2, 2)), [0, 1]), (np.full((2, 2), np.inf), [0, 1])], "c", source="c")
    with pytest.raises(DataError, match="x has dtype complex128"):
        as_dataset((np.ones((2, 2)) * 1j, [0, 1]), "c", source="c")
    with pytest.raises(DataError, match="returned a test part without a train part"):
        as_dataset({"test": (np.ones((2, 2)), [0, 1])}, "c", source="c")
    with pytest.raises(DataError, match="n_classes must be a positive integer, got 2.5"):
        as_dataset({"x": np.ones((2, 2)), "y": [0, 1], "n_classes": 2.5}, "c", source="c")
    with pytest.raises(DataError, match=r"x is a single value \(shape \(\)\)"):
        as_dataset((np.float32(1), [0]), "c", source="c")


# =========================================================================== partitioners of one's own
def test_user_partitioners_end_to_end(folder, tmp_path, capsys):
    cfg = config(folder, {"dataset": f"{MODULE}:pair", "partition": {"kind": f"{MODULE}:round_robin",
                                                                      "params": {"offset": 1}}})
    summary, printed = run_ok(capsys, cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert f"96 train / 24 test samples, {MODULE}:round_robin partition" in printed
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["code"]["data.partition.kind"]["path"] == (
        f"{MODULE}:round_robin")


def test_user_partitioners_get_params_groups_and_x(folder):
    def parts(kind, loader="pair", params=None, **data):
        partition = {"kind": f"{MODULE}:{kind}", **({"params": params} if params else {})}
        cfg = load_config(config(folder, {"dataset": f"{MODULE}:{loader}", "partition": partition, **data}))
        fed = federate(cfg.data, 0)
        return [np.sort(np.concatenate([a, b])) for a, b in zip(fed.train, fed.test)], fed

    got, _ = parts("round_robin", params={"offset": 1})
    assert [p.tolist() for p in got] == [np.flatnonzero((np.arange(120) + 1) % 4 == c).tolist() for c in range(4)]
    got, fed = parts("by_group", loader="official_groups")
    for c, p in enumerate(fed.train):
        assert set((fed.dataset.groups[p] % 4).tolist()) == {c}
    got, fed = parts("first_feature", normalize=False)
    raw = fed.dataset.x[:, 0]
    assert max(raw[got[0]]) <= min(raw[got[1]])  # split by the raw first feature, handed over as x


BAD_PARTITIONERS = {
    "overlapping": f"data.partition.kind: {MODULE}:overlapping gave sample 116 to clients 0 and 1; every sample must go "
                   "to exactly one client",
    "too_few": f"data.partition.kind: {MODULE}:too_few returned 3 parts for data.n_clients=4",
    "empty_part": f"data.partition.kind: {MODULE}:empty_part gave client 3 no samples",
    "out_of_range": f"data.partition.kind: {MODULE}:out_of_range gave client 2 the index 120; the 120 samples are 0..119",
    "float_indices": f"data.partition.kind: {MODULE}:float_indices gave client 0 indices of dtype float64",
    "masks": "indices of dtype bool; expected integer sample indices (a boolean mask? give np.flatnonzero(mask))",
    "owner_array": f"data.partition.kind: {MODULE}:owner_array returned ndarray; expected a list of data.n_clients=4",
    "dropped": f"data.partition.kind: {MODULE}:dropped gave 1 of the 120 samples to no client (the first: 116)",
    "two_arguments": f"data.partition.kind: {MODULE}:two_arguments must take (labels, n_clients, rng)",
    "fails": f"data.partition.kind: {MODULE}:fails() raised ValueError: no sites file",
    "by_group": f"data.partition.kind: {MODULE}:by_group takes natural client ids (its parameter 'groups'), and "
                f"dataset '{MODULE}:pair' has none",
}


@pytest.mark.parametrize("partitioner", BAD_PARTITIONERS)
def test_a_partitioners_mistake_is_one_line_naming_it(folder, tmp_path, capsys, partitioner):
    cfg = config(folder, {"dataset": f"{MODULE}:pair", "partition": {"kind": f"{MODULE}:{partitioner}"}})
    err = run_error(capsys, cfg, tmp_path / "r")
    assert BAD_PARTITIONERS[partitioner] in err, err


def test_check_parts_sorts_and_accepts_tensors():
    parts = check_parts([torch.tensor([3, 0]), [2, 1]], 4, 2, "p")
    assert [p.tolist() for p in parts] == [[0, 3], [1, 2]] and all(p.dtype == np.int64 for p in parts)
    with pytest.raises(DataError, match="p gave sample 1 twice to client 0"):
        check_parts([[1, 1, 0], [2, 3]], 4, 2, "p")


# =========================================================================== Hugging Face datasets saved to disk
def hf_images(tmp_path, name="imgs", sizes=None, labels=(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2), split=None):
    hf = pytest.importorskip("datasets")
    from PIL import Image

    sizes = sizes or [(6, 5)] * len(labels)
    images = [Image.fromarray(np.full((h, w, 3), 17 * i % 256, np.uint8)) for i, (w, h) in enumerate(sizes)]
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["a", "b", "c", "d"])})
    ds = hf.Dataset.from_dict({"image": images, "label": list(labels)}, features=features)
    if split:
        ds = hf.DatasetDict({"train": ds, "test": ds.select(range(split))})
    ds.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_hf_images_classlabel_and_an_official_split(tmp_path, capsys):
    path = hf_images(tmp_path, split=4)
    ds = load_dataset(DataConfig(dataset="hf", path=str(path)))
    assert ds.x.shape == (16, 3, 5, 6) and ds.x.dtype == np.float32  # (C, H, W)
    assert ds.x[1, 0, 0, 0] == pytest.approx(17 / 255) and 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.n_classes == 4 and ds.n_test == 4  # ClassLabel's four names, though 'd' has no sample
    assert ds.y.tolist() == [0, 1, 2] * 4 + [0, 1, 2, 0]

    (tmp_path / "hf.yaml").write_text(yaml.safe_dump({
        "rounds": 2, "data": {"dataset": "hf", "path": "imgs", "n_clients": 3}, "model": {"name": "logreg"},
        "strategy": {"name": "fedavg", "clients_per_round": 3}, "training": {"local_steps": 2, "batch_size": 4}}))
    summary, printed = run_ok(capsys, tmp_path / "hf.yaml", tmp_path / "run")
    assert summary["status"] == "completed" and "hf: 3 clients (12 train / 4 test samples" in printed


def test_hf_columns_strings_and_numbers(tmp_path):
    hf = pytest.importorskip("datasets")
    hf.Dataset.from_dict({
        "id": ["r1", "r2", "r3", "r4"], "vec": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]],
        "kind": ["dog", "cat", "dog", "emu"], "score": [0.5, 1.5, 2.5, 3.5],
    }).save_to_disk(str(tmp_path / "tab"))
    ds = load_dataset(DataConfig(dataset="hf", path=str(tmp_path / "tab"), columns={"x": "vec", "y": "kind"}))
    assert ds.x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]] and ds.y.tolist() == [1, 0, 1, 2] and ds.n_classes == 3
    ds = load_dataset(DataConfig(dataset="hf", path=str(tmp_path / "tab"), columns={"x": "score", "y": "kind"}))
    assert ds.x.shape == (4, 1)
    with pytest.raises(DataError, match=r"x \(column 'id'\) holds strings; hetfl needs numeric features"):
        load_dataset(DataConfig(dataset="hf", path=str(tmp_path / "tab"), columns={"y": "kind"}))  # x: the first other


def test_hf_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    hf = pytest.importorskip("datasets")

    def error(path, columns=None):
        raw = {"rounds": 1, "data": {"dataset": "hf", "path": str(path), "n_clients": 2,
                                     **({"columns": columns} if columns else {})}}
        cfg = tmp_path / f"c{abs(hash(json.dumps(raw))) % 10**8}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        return run_error(capsys, cfg, tmp_path / "r")

    (tmp_path / "plain").mkdir()
    assert "plain: not a dataset written by save_to_disk" in error(tmp_path / "plain")
    images = hf_images(tmp_path)
    assert f"{images}: no column 'pixels' (data.columns.x); columns are image, label" in error(images, {"x": "pixels"})
    odd = hf_images(tmp_path, "odd", sizes=[(6, 5)] * 11 + [(7, 5)])
    assert "image 11 is 7x5, image 0 6x5; hetfl needs images of one size" in error(odd)
    unlabeled = hf_images(tmp_path, "unlabeled", labels=[0, 1, -1, 2])
    assert "samples without a label (ClassLabel -1) in column 'label'" in error(unlabeled)
    hf.DatasetDict({"a": hf.Dataset.from_dict({"x": [1.0], "y": [0]}), "b": hf.Dataset.from_dict({"x": [1.0], "y": [0]})}
                   ).save_to_disk(str(tmp_path / "splits"))
    assert "a DatasetDict of splits a, b and none named 'train'" in error(tmp_path / "splits")
    hf.Dataset.from_dict({"x": [1.0, None, 2.0], "y": [0, 1, 0]}).save_to_disk(str(tmp_path / "holes"))
    assert "x (column 'x') has NaN or infinite values (the first in sample 1)" in error(tmp_path / "holes")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if hetfl[hf] were not installed
    assert "the datasets package is not installed; pip install hetfl[hf]" in error(images)


# =========================================================================== bad data files: npz, CSV, --data
def npz_bytes(tmp_path, **arrays) -> bytes:
    np.savez(tmp_path / "tmp.npz", **arrays)
    return (tmp_path / "tmp.npz").read_bytes()


def bad_npz_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    """File name -> (its bytes, what the one-line error says), each case as a user could make it."""
    rng = np.random.default_rng(0)
    good = npz_bytes(tmp_path, x=rng.random((20, 3)), y=np.arange(20) % 2)
    corrupt = bytearray(good)
    corrupt[200] ^= 0xFF
    nan_x, inf_x = rng.random((20, 3)), rng.random((20, 3))
    nan_x[5, 1], inf_x[9, 0] = np.nan, np.inf
    with zipfile.ZipFile(tmp_path / "objects.npz", "w") as archive:
        with archive.open("x.npy", "w") as f:
            np.save(f, np.array([1, "a", None], dtype=object), allow_pickle=True)
        with archive.open("y.npy", "w") as f:
            np.save(f, np.arange(3))
    np.save(tmp_path / "lone.npy", np.ones(3))
    return {
        "empty.npz": (b"", "not a readable .npz file (the file is empty)"),
        "truncated.npz": (good[: len(good) // 2], "not a readable .npz file (not a zip archive of .npy arrays"),
        "corrupt.npz": (bytes(corrupt), "not a readable .npz file (truncated or corrupt: Bad CRC-32 for file 'x.npy')"),
        "text.npz": (b"x,y\n1,0\n", "not a readable .npz file (not a zip archive of .npy arrays"),
        "lone.npz": ((tmp_path / "lone.npy").read_bytes(),
                     "not a readable .npz file (a single .npy array; write x and y with numpy.savez"),
        "objects.npz": ((tmp_path / "objects.npz").read_bytes(), "array 'x' holds Python objects (dtype object)"),
        "strings.npz": (npz_bytes(tmp_path, x=np.array([["1", "2"]] * 4), y=np.arange(4) % 2), "x holds strings (<U1)"),
        "nan.npz": (npz_bytes(tmp_path, x=nan_x, y=np.arange(20) % 2), "x has NaN or infinite values (the first in sample 5)"),
        "inf.npz": (npz_bytes(tmp_path, x=inf_x, y=np.arange(20) % 2), "x has NaN or infinite values (the first in sample 9)"),
        "complex.npz": (npz_bytes(tmp_path, x=np.ones((4, 2)) * 1j, y=np.arange(4) % 2), "x has dtype complex128"),
    }


def test_bad_npz_files_are_one_line_in_a_run(tmp_path, capsys):
    for name, (content, expected) in bad_npz_files(tmp_path).items():
        (tmp_path / name).write_bytes(content)
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"dataset": "npz", "path": name, "n_clients": 2}}))
        err = run_error(capsys, cfg, tmp_path / "r")
        assert f"{tmp_path / name}: {expected}" in err, (name, err)


def test_bad_npz_labels_and_vocab(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2)), y=np.array([0, np.nan, 1, 0]))
    with pytest.raises(DataError, match=r"d.npz: y has a missing \(NaN\) or infinite label \(sample 1\)"):
        load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2)), y=np.array(["b", "a", "b", "c"]))  # string labels are mapped
    assert load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz"))).y.tolist() == [1, 0, 1, 2]
    np.savez(tmp_path / "d.npz", x=np.full((4, 2), 9), y=np.arange(4) % 2, vocab_size=5)
    with pytest.raises(DataError, match=r"x token ids must lie in 0..4 \(vocab_size 5\), found 9..9"):
        load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2), int), y=np.arange(4) % 2, vocab_size=np.array([5, 6]))
    with pytest.raises(DataError, match="vocab_size must be one positive integer"):
        load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")))


CSV_CASES = {
    "duplicate.csv": (b"label,a,a\n0,1,2\n1,2,3\n", "the header names column 'a' twice"),
    "no_label.csv": (b"label,a\n0,1\n,2\n1,3\n", "column 'label' (data.label_column) has no value in row 3"),
    "nan_label.csv": (b"label,a\n0,1\nNaN,2\n", "column 'label' (data.label_column) has no value in row 3"),
    "nan.csv": (b"label,a\n0,1\n1,nan\n", "column 'a' has missing or non-finite values (row 3: 'nan')"),
    "huge.csv": (b"label,a\n0,1e39\n1,2\n", "column 'a' has missing or non-finite values (row 2: '1e39')"),
    "empty.csv": (b"", "expected a header row and at least one data row"),
    "binary.csv": (bytes(range(128, 256)), "cannot read as CSV ('utf-8' codec can't decode byte 0x80"),
    "words.csv": (b"label,a\n0,high\n", "column 'a' is not numeric (value 'high')"),
}


def test_bad_csv_files_are_one_line_in_a_run(tmp_path, capsys):
    for name, (content, expected) in CSV_CASES.items():
        (tmp_path / name).write_bytes(content)
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"dataset": "csv", "path": name, "n_clients": 1}}))
        err = run_error(capsys, cfg, tmp_path / "r")
        assert f"{tmp_path / name}: {expected}" in err, (name, err)


def test_csv_byte_order_mark_and_spaces_around_labels(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufefflabel,a\n cat ,1\ncat,2\ndog,3\n".encode())
    ds = load_dataset(DataConfig(dataset="csv", path=str(tmp_path / "d.csv")))
    assert ds.y.tolist() == [0, 0, 1] and ds.n_classes == 2


def test_bad_client_data_files_are_one_line(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("a" * 30)
    cases = dict(bad_npz_files(tmp_path))
    cases.update({
        "string_y.npz": (npz_bytes(tmp_path, x=np.ones((4, 2)), y=np.array(["a", "b", "a", "b"])),
                         "y must hold integer class labels, found <U1"),
        "float_y.npz": (npz_bytes(tmp_path, x=np.ones((4, 2)), y=np.array([0, 0.5, 1, 1])),
                        "y must hold integer class labels, found NaN, infinite or fractional values"),
        "negative_y.npz": (npz_bytes(tmp_path, x=np.ones((4, 2)), y=np.array([0, -1, 1, 1])),
                           "y must hold non-negative class labels, found -1"),
        "scalar.npz": (npz_bytes(tmp_path, x=np.float32(1), y=np.int64(0)), "x has shape () and y (); expected samples first"),
    })
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        err = one_line_error(capsys, ["client", "--server", "127.0.0.1:1", "--token-file", token, "--data", tmp_path / name])
        assert f"--data {tmp_path / name}: {expected}" in err, (name, err)


def test_client_data_that_is_fine_loads(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.ones((3, 2)), y=np.array([0.0, 1.0, 2.0]))  # whole-number floats are classes
    x, y = load_data(tmp_path / "ok.npz")
    assert x.dtype == torch.float32 and y.tolist() == [0, 1, 2]
    np.savez(tmp_path / "tok.npz", x=np.arange(6).reshape(2, 3), y=np.arange(6).reshape(2, 3))  # next-token targets
    x, y = load_data(tmp_path / "tok.npz")
    assert x.dtype == torch.int64 and y.shape == (2, 3)
    with pytest.raises(DataError):
        load_data(tmp_path / "missing.npz")


def test_config_errors_name_the_key(folder):
    with pytest.raises(ConfigError, match=r"data.dataset: cannot import 'no_such_module'"):
        load_config(config(folder, {"dataset": "no_such_module:load"}))
