"""training.device: resolution, the one-line errors, the boundary a task crosses, and (on a CUDA machine only) the
same runs on the GPU.

The CPU tests run everywhere. The CUDA tests are skipped without CUDA, with the reason; a session with a GPU runs
them: same-seed CPU and CUDA results close (float32, different kernels: ``CUDA_TOL``), the vectorised path and the
evaluation on CUDA, and no host-to-device copy of a client's data per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, blobs, write_config
from hetfl.config import ModelConfig, TrainingConfig, validate
from hetfl.engine.simulator import ClientPool
from hetfl.errors import ConfigError, HetflError
from hetfl.models import build_model
from hetfl.strategies.base import ClientData, ClientResult, Task
from hetfl.training import LocalTrainer
from hetfl.training import device as device_mod
from hetfl.training.device import CPU, client_half, resolve_device, to_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False here)")
CUDA_TOL = dict(atol=1e-4, rtol=1e-3)  # float32 on different kernels; docs/architecture.md, "Where the device lives"


def fake_machine(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    """Make torch report ``cuda`` CUDA devices and ``mps`` (no real device is touched: only resolution runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: mps)


# ----------------------------------------------------------------------------- resolution
def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch):
    fake_machine(monkeypatch, cuda=2, mps=True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    fake_machine(monkeypatch, cuda=0, mps=True)
    assert resolve_device("auto") == torch.device("mps")
    fake_machine(monkeypatch, cuda=0, mps=False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_cuda_n_is_checked_against_the_devices_this_machine_has(monkeypatch):
    fake_machine(monkeypatch, cuda=2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"training.device: cuda:2, but this machine has CUDA devices cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_a_device_this_machine_lacks_is_one_line_naming_the_key(monkeypatch):
    fake_machine(monkeypatch, cuda=0)
    for text in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ConfigError) as err:
            resolve_device(text)
        message = str(err.value)
        assert message.startswith("training.device: ") and "only the CPU" in message and "auto or cpu" in message
        assert "\n" not in message
    with pytest.raises(ConfigError, match="--device: 'gpu' is not a device"):
        resolve_device("gpu", key="--device")


def test_the_config_checks_the_spelling_and_the_ray_gpu_share():
    base = json.loads(json.dumps(TINY))
    assert validate({**base, "training": {**base["training"], "device": "CUDA:1"}}).training.device == "cuda:1"
    with pytest.raises(ConfigError, match="training.device"):
        validate({**base, "training": {**base["training"], "device": "gpu0"}})
    with pytest.raises(ConfigError, match="backend.num_gpus_per_worker: only for backend.name: ray"):
        validate({**base, "backend": {"num_gpus_per_worker": 0.5}})
    with pytest.raises(ConfigError, match="num_gpus_per_worker"):
        validate({**base, "backend": {"name": "ray", "num_gpus_per_worker": -1}})


# ----------------------------------------------------------------------------- runs on this machine
def _run(tmp_path: Path, name: str, **changes) -> tuple[dict, list[dict]]:
    from hetfl.cli import main

    out = tmp_path / name
    assert main(["run", str(write_config(tmp_path, f"{name}.yaml", **changes)), "--out", str(out), "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("wall_time_s", None)
    return json.loads((out / "summary.json").read_text()), lines


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_run_with_cuda_without_cuda_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    from hetfl.cli import main

    config = write_config(tmp_path, training={**TINY["training"], "device": "cuda"})
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "training.device: cuda, but this machine has" in err and "set training.device to auto or cpu" in err


def test_cpu_and_auto_give_the_default_run_and_record_the_device(tmp_path):
    default, default_lines = _run(tmp_path, "default")
    cpu, cpu_lines = _run(tmp_path, "cpu", training={**TINY["training"], "device": "cpu"})
    assert default["device"] == cpu["device"] == "cpu"
    assert cpu_lines == default_lines  # bit for bit: device=cpu is the default
    auto, auto_lines = _run(tmp_path, "auto", training={**TINY["training"], "device": "auto"})
    assert auto["device"] == str(resolve_device("auto"))
    if not CUDA:
        assert auto_lines == default_lines


def test_the_client_data_moves_to_the_device_once_per_run_not_per_task(tmp_path, monkeypatch):
    """Every task, sequential or vectorised, indexes the pool that build_federation moved once (ClientPool.to)."""
    from hetfl.engine.backends import InProcess
    from hetfl.engine.run import build_federation
    from hetfl.training import vectorized

    moves, seen = [], []
    real_to, real_train, real_many = ClientPool.to, LocalTrainer.train, vectorized.train_many
    monkeypatch.setattr(ClientPool, "to", lambda pool, dev: moves.append(dev) or real_to(pool, dev))
    monkeypatch.setattr(LocalTrainer, "train", lambda self, params, x, y, **kw: seen.append(x.device) or real_train(self, params, x, y, **kw))

    def many(trainer, starts, datasets, *args, **kw):
        seen.extend(x.device for x, _ in datasets)
        return real_many(trainer, starts, datasets, *args, **kw)

    monkeypatch.setattr("hetfl.engine.backends.train_many", many)
    for vectorize in ("off", "on"):
        moves.clear()
        cfg = validate({**TINY, "rounds": 4, "training": {**TINY["training"], "vectorize": vectorize, "device": "auto"}})
        fed = build_federation(cfg)
        sim = fed.simulator()
        assert isinstance(sim.backend, InProcess)
        before = len(seen)
        sim.on_commit = lambda s: s.stop("rounds") if s.version >= 4 else None
        sim.proceed()
        while sim.step():
            pass
        assert moves == [fed.trainer.device]  # the pool: once, at build
        assert len(seen) - before >= 4 * 3 and set(seen[before:]) == {fed.pool.x.device}
        assert fed.evaluator.x.device == fed.trainer.device


class _Spy:
    """A client half that records where its inputs are and returns new CPU tensors."""

    seen: dict = {}

    def client_train(self, trainer, task, data, state, seed):
        self.seen = {"params": task.params.device, "payload": task.payload["c"].device, "option": task.options["mask"].device,
                     "x": data.x.device, "state": state["c_i"].device}
        state["c_i"] = torch.full((3,), 7.0)  # the client's new state
        return ClientResult(torch.ones(3), 2, 0.5, payload={"delta": torch.zeros(3)})


def test_the_boundary_moves_a_tasks_inputs_to_the_device_and_its_results_back(monkeypatch):
    """On a stand-in device (``meta``: same device rules, no values) the client half sees every input there; what it
    returns, and the client's new state, are on the CPU."""
    trainer = LocalTrainer(build_model(ModelConfig(name="logreg"), (3,), 3), TrainingConfig())
    monkeypatch.setattr(trainer, "device", torch.device("meta"))
    task = Task(1, 0, 0, torch.zeros(3), 2, 0.0, payload={"c": torch.zeros(3)}, options={"mask": torch.ones(3), "lr": 0.1})
    state = {"c_i": torch.zeros(3)}
    spy = _Spy()
    result = client_half(spy, trainer, task, ClientData(0, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), state, 0)
    assert set(spy.seen.values()) == {torch.device("meta")}
    assert result.params.device == CPU and result.payload["delta"].device == CPU and state["c_i"].device == CPU
    assert task.params.device == CPU  # the engine's task is not changed
    assert to_device({"a": [torch.zeros(1)], "b": 3}, CPU)["b"] == 3


def test_ray_tasks_reserve_the_configured_gpu_share(monkeypatch):
    pytest.importorskip("ray")
    from hetfl.engine import backends

    asked = {}

    class FakeRay:
        def remote(self, **options):
            asked.update(options)
            return lambda fn: fn

        def put(self, value):
            return value

        def cluster_resources(self):
            return {"CPU": 4.0, "GPU": 1.0}

    backend = backends.RayBackend(threads=2, num_gpus=0.25)
    backend.ray, backend._client_side = FakeRay(), None
    monkeypatch.setattr(backends, "start_ray", lambda *a, **k: False)
    backend._connect()
    assert asked == {"num_cpus": 2, "num_gpus": 0.25, "max_retries": backends.RAY_RETRIES}  # single tasks and batches
    cfg = validate({**TINY, "backend": {"name": "ray", "num_gpus_per_worker": 0.5}})
    built = backends.build_backend(cfg.backend, threads=1, training=cfg.training)
    assert built.num_gpus == 0.5


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_a_deployed_client_refuses_a_device_it_lacks_in_one_line(tmp_path):
    from hetfl.deploy.client import client_command

    with pytest.raises(HetflError, match=r"^--device: cuda, but this machine has"):
        client_command(server="localhost:50051", token="t", token_file=None, data=str(tmp_path / "none.npz"), device="cuda")


# ----------------------------------------------------------------------------- CUDA only
def _trainers(hidden=(16,), **training):
    cfg = dict(lr=0.1, batch_size=8, local_steps=6, momentum=0.9, **training)
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="mlp", hidden=list(hidden)), (4,), 3)
    cpu = LocalTrainer(net, TrainingConfig(**cfg))
    torch.manual_seed(0)
    gpu = LocalTrainer(build_model(ModelConfig(name="mlp", hidden=list(hidden)), (4,), 3), TrainingConfig(device="cuda", **cfg))
    return cpu, gpu


@needs_cuda
def test_cuda_sequential_training_matches_the_cpu():
    cpu, gpu = _trainers()
    assert torch.equal(cpu.initial, gpu.initial) and gpu.flat.device.type == "cuda" and gpu.initial.device == CPU
    x, y = blobs(40)
    a = cpu.train(cpu.initial, x, y, steps=6, seed=3, prox_mu=0.1)
    b = gpu.train(gpu.initial, x.cuda(), y.cuda(), steps=6, seed=3, prox_mu=0.1)
    assert b.params.device.type == "cuda"
    torch.testing.assert_close(b.params.cpu(), a.params, **CUDA_TOL)
    assert abs(a.loss - b.loss) < 1e-4


@needs_cuda
def test_cuda_vectorised_training_matches_sequential_cpu_training():
    from hetfl.training.vectorized import train_many

    cpu, gpu = _trainers()
    data = [blobs(n, seed=n) for n in (5, 12, 30)]
    seq = [cpu.train(cpu.initial, x, y, steps=s, seed=s, lr=0.05) for (x, y), s in zip(data, (2, 6, 4))]
    many = train_many(gpu, torch.stack([gpu.initial] * 3), [(x.cuda(), y.cuda()) for x, y in data], [2, 6, 4], [2, 6, 4], lr=0.05)
    for a, b in zip(seq, many):
        assert b.params.device.type == "cuda"
        torch.testing.assert_close(b.params.cpu(), a.params, **CUDA_TOL)


@needs_cuda
def test_cuda_evaluation_matches_the_cpu():
    from hetfl.training.evaluate import Evaluator

    cpu, gpu = _trainers()
    x, y = blobs(60)
    test = [np.arange(0, 20), np.arange(20, 60)]
    a = Evaluator.from_splits(cpu, x, y, test)(cpu.initial)
    ev = Evaluator.from_splits(gpu, x, y, test)
    assert ev.x.device.type == "cuda"
    b = ev(gpu.initial)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


@needs_cuda
@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_cuda_runs_match_cpu_runs_and_never_copy_client_data_per_task(tmp_path, monkeypatch, vectorize):
    """The same seed on CUDA and on the CPU: close metrics; after the build, no tensor of a client's data size is
    copied from the host to the GPU (the pool and the test set moved once)."""
    from hetfl.engine.run import build_federation

    def run(device, spy=False):
        cfg = validate({**TINY, "rounds": 4, "training": {**TINY["training"], "vectorize": vectorize, "device": device}})
        fed = build_federation(cfg)
        copies = []
        if spy:
            real = torch.Tensor.to

            def to(self, *args, **kwargs):
                out = real(self, *args, **kwargs)
                if self.device.type == "cpu" and out.device.type == "cuda" and self.dim() >= 2 and self.shape[0] > 1:
                    copies.append(tuple(self.shape))
                return out

            monkeypatch.setattr(torch.Tensor, "to", to)
        sim = fed.simulator()
        sim.on_commit = lambda s: s.stop("rounds") if s.version >= 4 else None
        sim.proceed()
        while sim.step():
            pass
        monkeypatch.undo()
        return sim.params.clone(), fed.evaluator(sim.params), copies, sim.params.device

    p_cpu, m_cpu, _, _ = run("cpu")
    p_gpu, m_gpu, copies, where = run("cuda", spy=True)
    assert where == CPU  # the server's model stays on the CPU
    torch.testing.assert_close(p_gpu, p_cpu, atol=1e-3, rtol=1e-2)
    assert abs(m_cpu["accuracy"] - m_gpu["accuracy"]) <= 0.02
    assert copies == [], f"host-to-device copies of data during the run: {copies}"


@needs_cuda
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "fednova", "fedbuff", "fedasync", "ditto", "fedper",
                                  "fedbn", "ifca", "fedproto", "fedgh", "pfedgate", "semipfl", "ggeur", "fedsa",
                                  "fedld"])
def test_strategies_client_halves_run_on_cuda(tmp_path, name):
    """Every client half listed runs on the GPU through the boundary, with a finite result close to the CPU's."""
    from hetfl.cli import main
    from hetfl.strategies import STRATEGIES

    if name not in STRATEGIES:
        pytest.skip(f"{name} is not a built-in here")
    outs = {}
    for device in ("cpu", "cuda"):
        config = write_config(tmp_path, f"{device}.yaml", training={**TINY["training"], "device": device},
                              strategy={"name": name, "clients_per_round": 3} if name not in ("fedbuff", "fedasync")
                              else {"name": name})
        assert main(["run", str(config), "--out", str(tmp_path / device), "--quiet"]) == 0
        outs[device] = json.loads((tmp_path / device / "summary.json").read_text())
    assert outs["cuda"]["device"] == "cuda:0" and outs["cuda"]["status"] == "completed"
    assert abs(outs["cuda"]["final_accuracy"] - outs["cpu"]["final_accuracy"]) <= 0.05
