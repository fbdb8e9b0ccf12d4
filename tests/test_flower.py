"""A Flower client under hetfl's clock (hetfl.flower): a user's Flower app, unchanged, run by ``hetfl run``.

The app (:data:`APP`, written to a temporary folder as ``flowerapp.py``) is what a Flower user writes: a
``NumPyClient`` training a small torch MLP on its own partition of scikit-learn's digits, which it loads itself by
``context.node_config['partition-id']``. hetfl and flwr are imported in one process: this file is the CI check
that they install side by side (``make`` installs ``.[dev,ray,hf,flower]``), so a missing flwr fails here in the
project's ``.venv`` rather than skipping.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - depends on the interpreter
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        pytest.fail("flwr is not installed in the project's .venv; run make (it installs .[dev,ray,hf,flower])",
                    pytrace=False)
    pytest.skip(f"flwr is not installed in {sys.prefix} (outside the project's .venv; pip install hetfl[flower])",
                allow_module_level=True)

from flwr.common import Context, FitIns, RecordDict, ndarrays_to_parameters  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hetfl.cli import main  # noqa: E402
from hetfl.config import load_config, validate  # noqa: E402
from hetfl.devices.profiles import BYTES_PER_MBIT, NETWORK_TIERS  # noqa: E402
from hetfl.engine.run import run_experiment  # noqa: E402
from hetfl.errors import ConfigError, HetflError  # noqa: E402
from hetfl.flower import from_numpy_client  # noqa: E402

APP = '''\
"""A Flower app: a NumPyClient training a small torch MLP on its partition of digits."""
from functools import lru_cache

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import Context
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@lru_cache(maxsize=None)
def partitions(n):
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    shares = np.linspace(1.0, 3.0, n)  # client i holds more than client i - 1
    cuts = np.cumsum(shares / shares.sum() * len(y)).astype(int)[:-1]
    out = []
    for part in np.split(order, cuts):
        k = int(0.8 * len(part))
        out.append(((x[part[:k]], y[part[:k]]), (x[part[k:]], y[part[k:]])))
    return out


class DigitsClient(NumPyClient):
    def __init__(self, partition_id, num_partitions, hidden):
        self.model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.train, self.test = partitions(num_partitions)[partition_id]

    def get_parameters(self, config):
        return [v.detach().numpy().copy() for v in self.model.state_dict().values()]

    def set_parameters(self, arrays):
        keys = self.model.state_dict().keys()
        self.model.load_state_dict({k: torch.tensor(a) for k, a in zip(keys, arrays)})

    def fit(self, parameters, config):
        if config.get("explode"):
            raise ValueError("out of memory")
        self.set_parameters(parameters)
        x, y = self.train
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                            batch_size=int(config["batch_size"]), shuffle=True)
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["lr"]))
        mu = float(config.get("proximal_mu", 0.0))
        start = [p.detach().clone() for p in self.model.parameters()]
        # a client that ignores local_steps trains one epoch, whatever it is asked
        steps = len(loader) if config.get("ignore_steps") else int(config["local_steps"])
        losses = []
        while len(losses) < steps:
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(self.model(xb), yb)
                if mu:
                    loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(self.model.parameters(), start))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if len(losses) == steps:
                    break
        return self.get_parameters({}), len(y), {"loss": float(np.mean(losses))}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        x, y = self.test
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
        return float(loss), len(y), {"accuracy": float((logits.argmax(1).numpy() == y).mean())}


def client_fn(context: Context):
    return DigitsClient(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                        int(context.run_config.get("hidden", 32))).to_client()


def legacy_client_fn(cid: str):
    return DigitsClient(int(cid), 3, 16)


def two_arguments(context, extra):
    return None
'''

N_CLIENTS = 6
MEDIAN_FLOPS = 1.0e6  # FLOP/s of a speed-1 device: slow enough that compute dominates the clock
CONFIG = {
    "name": "flower-digits",
    "seed": 1,
    "rounds": 4,
    "client": "flowerapp:client_fn",
    "flower": {"run_config": {"hidden": 32}},
    "data": {"n_clients": N_CLIENTS},
    "training": {"local_steps": 10, "batch_size": 16, "lr": 0.1},
    "strategy": {"name": "fedavg", "clients_per_round": N_CLIENTS},
    "evaluation": {"target_accuracy": 0.99},
    "devices": {
        "jitter": 0.0,
        "compute": {"distribution": "tiers", "median_flops": MEDIAN_FLOPS, "tiers": {"slow": 0.25, "fast": 1.0}},
        "network": {"tiers": {"ethernet": 1.0}},
    },
}


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    """A folder holding the user's Flower app and its config (``fedavg.yaml``)."""
    folder = tmp_path_factory.mktemp("flowerapp")
    (folder / "flowerapp.py").write_text(APP)
    (folder / "fedavg.yaml").write_text(yaml.safe_dump(CONFIG))
    return folder


@pytest.fixture(scope="module")
def fedavg_run(app, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fedavg"
    assert main(["run", str(app / "fedavg.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def user_app(app: Path):
    """The user's module, as hetfl imported it (the config put its folder on sys.path)."""
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    return importlib.import_module("flowerapp")


def measured_fit(app: Path, client: int, steps: int) -> tuple[float, int]:
    """FLOPs and num_examples of one fit of ``client`` through Flower's own Client API, counted here, by the test."""
    module = user_app(app)
    context = Context(run_id=0, node_id=client, node_config={"partition-id": client, "num-partitions": N_CLIENTS},
                      state=RecordDict(), run_config={"hidden": 32})
    flower_client = module.client_fn(context)
    arrays = flower_client.numpy_client.get_parameters({})
    config = {"local_steps": steps, "batch_size": 16, "lr": 0.1, "seed": 0, "server_round": 1}
    counter = FlopCounterMode(display=False)
    with counter:
        res = flower_client.fit(FitIns(parameters=ndarrays_to_parameters(arrays), config=config))
    return float(counter.get_total_flops()), res.num_examples


def test_flwr_and_hetfl_grpc_in_one_process():
    """flwr and hetfl's generated gRPC code import side by side (one protobuf runtime serves both)."""
    import google.protobuf
    from flwr.proto import fleet_pb2  # noqa: F401  (Flower's own generated code)

    from hetfl.deploy import federation_pb2 as pb
    from hetfl.deploy import federation_pb2_grpc as pb_grpc

    task = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, task_id=3, steps=5, tensors=[pb.TensorSpec(name="p", nbytes=16)])
    assert pb.TaskHeader.FromString(task.SerializeToString()) == task
    assert hasattr(pb_grpc, "FederationStub")
    major, minor = (int(part) for part in google.protobuf.__version__.split(".")[:2])
    assert (5, 28) <= (major, minor) < (8, 0)  # pyproject.toml's range, which flwr's (protobuf<7 so far) overlaps


def test_fedavg_times_tasks_by_measured_flops_and_device_speeds(app, fedavg_run):
    rows, s = metrics(fedavg_run), summary(fedavg_run)
    assert s["status"] == "completed" and s["rounds"] == 4
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # the Flower clients' training works under hetfl
    assert s["architectures"] == ["flowerapp:client_fn"]
    assert s["code"]["client"]["path"] == "flowerapp:client_fn"

    # bytes: the model's arrays (float32) down and up, once per task
    arrays = user_app(app).DigitsClient(0, N_CLIENTS, 32).get_parameters({})
    model_bytes = sum(a.nbytes for a in arrays)
    assert model_bytes == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert s["updates"] == 4 * N_CLIENTS
    assert s["bytes_up"] == s["bytes_down"] == s["updates"] * model_bytes

    # FLOPs: each client's fit of 10 steps, measured here independently of hetfl's calibration
    flops = np.array([measured_fit(app, c, 10)[0] for c in range(N_CLIENTS)])
    assert s["train_flops"] == pytest.approx(4 * flops.sum(), rel=1e-12)

    # the clock by hand: every round trains all clients from t = round start; it ends with the slowest task
    speed = np.array(s["client_speed"])
    assert len(set(speed.tolist())) > 1  # heterogeneous devices
    net = NETWORK_TIERS["ethernet"]
    down, up, latency = net.down_mbps * BYTES_PER_MBIT, net.up_mbps * BYTES_PER_MBIT, net.latency_ms / 1000
    task_s = (model_bytes / down + latency) + flops / (speed * MEDIAN_FLOPS) + (model_bytes / up + latency)
    slowest = int(np.argmax(task_s))
    assert speed[slowest] == speed.min()  # a slow device decides the round
    for row in rows[1:]:
        assert row["sim_time_s"] == pytest.approx(row["round"] * task_s[slowest], rel=1e-9)


def test_fedbuff_runs_a_flower_client_asynchronously(app, tmp_path):
    """FedBuff with local_epochs (each client's steps follow its num_examples), heterogeneous devices."""
    config = {**CONFIG, "rounds": 10, "training": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
              "strategy": {"name": "fedbuff", "params": {"buffer_size": 2, "concurrency": 4}}}
    path = app / "fedbuff.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "fedbuff"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    rows, s = metrics(out), summary(out)
    assert s["algorithm"] == "fedbuff" and s["rounds"] == 10 and s["updates"] == 20
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert s["staleness_mean"] > 0  # asynchronous: updates from older models were aggregated
    # a task costs its client's fit of one epoch: ceil(num_examples / 16) steps, as measured
    fits = [measured_fit(app, c, 1) for c in range(N_CLIENTS)]
    epoch = [measured_fit(app, c, -(-n // 16))[0] for c, (_, n) in enumerate(fits)]
    assert min(epoch) <= s["flops_per_task"] <= max(epoch)
    assert s["bytes_up"] % (4 * 2410) == 0


def test_resume_continues_a_flower_run_exactly(app, fedavg_run, tmp_path):
    out = tmp_path / "resumed"
    assert main(["run", str(app / "fedavg.yaml"), "--out", str(out), "--quiet", "--set", "rounds=2"]) == 0
    assert main(["run", "--resume", str(out), "--set", "rounds=4", "--quiet"]) == 0
    straight, resumed = metrics(fedavg_run), metrics(out)
    assert [(r["round"], r["accuracy"], r["sim_time_s"]) for r in resumed] == [
        (r["round"], r["accuracy"], r["sim_time_s"]) for r in straight
    ]


def test_compare_two_algorithms_on_a_flower_client(app, tmp_path, capsys):
    code, out, err = cli(capsys, "compare", app / "fedavg.yaml", "--algorithms", "fedavg,fedprox", "--out",
                         tmp_path / "cmp", "--quiet", "--set", "rounds=2",
                         "--set", "strategy.per_algorithm={fedprox: {mu: 0.1}}")
    assert code == 0, err
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["algorithm"] for r in runs] == ["fedavg", "fedprox"]
    # FedProx's proximal term reaches the client's fit (config['proximal_mu']): a different model
    assert runs[0]["final_accuracy"] != runs[1]["final_accuracy"] or runs[0]["final_loss"] != runs[1]["final_loss"]


@pytest.mark.parametrize("overrides, needles", [
    (["strategy.name=scaffold"], ["strategy.name: scaffold cannot run a Flower client", "client_train"]),
    (["strategy.name=ditto"], ["strategy.name: ditto cannot run a Flower client"]),
    (["backend.name=ray"], ["backend.name: ray", "Flower client"]),
    (["training.vectorize=on"], ["training.vectorize: on"]),
    (["strategy.selection.name=hetero_select"], ["hetero_select", "label histograms"]),
    (["client=flowerapp:two_arguments"], ["client:", "takes 2 required arguments"]),
    (["flower.fit_config={explode: true}"],
     ["client: flowerapp:client_fn: fit of client 0 raised ValueError: out of memory"]),
])
def test_refusals_are_one_line(app, tmp_path, capsys, overrides, needles):
    argv = ["run", app / "fedavg.yaml", "--out", tmp_path / "out", "--quiet"]
    for item in overrides:
        argv += ["--set", item]
    one_line_error(*cli(capsys, *argv)[::2], *needles)


def test_flower_section_needs_a_client(tmp_path):
    with pytest.raises(ConfigError, match="flower.run_config: used only with client"):
        validate({"flower": {"run_config": {"a": 1}}})


def test_a_client_that_ignores_local_steps(app, tmp_path, capsys):
    """Its fit trains one epoch whatever local_steps says: a task costs what its fit measured; FedCompass, which
    gives each client its own steps, is refused."""
    argv = ["run", app / "fedavg.yaml", "--quiet", "--set", "flower.fit_config={ignore_steps: true}",
            "--set", "rounds=1"]
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "avg")
    assert code == 0, err
    epoch = [measured_fit(app, c, -(-measured_fit(app, c, 1)[1] // 16))[0] for c in range(N_CLIENTS)]
    assert summary(tmp_path / "avg")["train_flops"] == pytest.approx(sum(epoch), rel=1e-12)
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "compass", "--set", "strategy.name=fedcompass")
    one_line_error(code, err, "fedcompass", "does not follow config['local_steps']")


def test_python_api_is_the_same_door(app, tmp_path):
    """``from_numpy_client`` from Python records the same import path a config names; the legacy ``cid`` signature
    and a NumPyClient returned directly work too."""
    module = user_app(app)
    base = {"rounds": 1, "data": {"n_clients": 3}, "training": {"local_steps": 3}, "strategy": {"clients_per_round": 3},
            "devices": {"jitter": 0.0}}
    cfg = validate({**base, "client": from_numpy_client(module.client_fn)})
    assert cfg.client == "flowerapp:client_fn" and cfg.code["client"].path == "flowerapp:client_fn"
    assert run_experiment(cfg, tmp_path / "py", show_progress=False)["status"] == "completed"
    legacy = validate({**base, "client": from_numpy_client(module.legacy_client_fn)})
    assert run_experiment(legacy, tmp_path / "legacy", show_progress=False)["rounds"] == 1
    with pytest.raises(ConfigError, match="takes 2 required arguments"):
        from_numpy_client(module.two_arguments)


def test_evaluate_must_report_accuracy(app, tmp_path):
    module = user_app(app)

    def no_accuracy(context):
        client = module.DigitsClient(int(context.node_config["partition-id"]), 2, 8)
        client.evaluate = lambda parameters, config: (0.5, 10, {})
        return client

    cfg = validate({"rounds": 1, "data": {"n_clients": 2}, "training": {"local_steps": 1},
                    "client": from_numpy_client(no_accuracy)})
    with pytest.raises(HetflError, match="without a number 'accuracy'"):
        run_experiment(cfg, tmp_path / "noacc", show_progress=False)


def test_config_records_the_flower_section(fedavg_run):
    cfg = load_config(fedavg_run / "config.yaml")
    assert cfg.flower.run_config == {"hidden": 32}
