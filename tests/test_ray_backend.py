"""The Ray backend (``backend.name: ray``): client halves on Ray workers, the same run as in-process.

One local Ray with 2 CPUs serves the whole module; a run that finds Ray initialised uses it and leaves it up.
"""

from __future__ import annotations

import sys

import pytest
import torch

from hetfl.config import ModelConfig, StrategyConfig, TrainingConfig, validate
from hetfl.engine import ClientPool, Simulator
from hetfl.engine.backends import RayBackend
from hetfl.errors import ConfigError, HetflError
from hetfl.models import build_model
from hetfl.strategies import STRATEGIES, build_strategy
from hetfl.training import LocalTrainer
from test_runs_end_to_end import HARSH, assert_same_run, hetfl, read_summary, write_config
from test_simulator import model_for
from test_vectorized_engine import harsh_profiles

pytestmark = pytest.mark.serial  # timing-sensitive or a Ray cluster: run alone (the Makefile's test target)

ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install hetfl[ray])")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from hetfl.engine.backends import start_ray

    started = start_ray(None, 2, 1, None)  # a local Ray of 2 CPUs, as hetfl starts one (a node timing out: once more)
    yield
    if started:
        ray.shutdown()


def final_params(run_dir) -> torch.Tensor:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"].params


# --------------------------------------------------------------------------- whole runs, through the CLI
@pytest.mark.parametrize(
    ("algorithm", "params"),
    [("fedavg", {}), ("ditto", {"lam": 0.5}), ("fedbuff", {"concurrency": 4, "buffer_size": 2})],
    ids=["fedavg", "ditto", "fedbuff"],
)
def test_a_ray_run_equals_the_in_process_run(tmp_path, capsys, algorithm, params):
    # deadlines cancel stragglers, dropouts and offline windows lose tasks: every event kind, on both backends
    config = write_config(tmp_path, strategy__name=algorithm, strategy__params=params, **HARSH)
    assert hetfl("run", config, "--out", tmp_path / "inprocess", "--quiet") == 0
    assert hetfl("run", config, "--out", tmp_path / "ray", "--quiet", "--set", "backend.name=ray") == 0
    assert_same_run(tmp_path / "inprocess", tmp_path / "ray")  # every metric of every evaluation, and the summary
    assert torch.equal(final_params(tmp_path / "inprocess"), final_params(tmp_path / "ray"))
    summary = read_summary(tmp_path / "ray")
    assert summary["status"] == "completed" and summary["failed_tasks"] + summary["dropped"] > 0
    if algorithm == "ditto":
        assert summary["personal_acc_mean"] is not None  # the personal models came back from the workers


def test_a_run_resumed_on_ray_resubmits_the_tasks_in_flight(tmp_path, capsys):
    # FedBuff keeps 4 clients busy: the checkpoint holds tasks in flight, which the Ray backend never saw
    config = write_config(tmp_path, strategy__name="fedbuff", strategy__params={"concurrency": 4, "buffer_size": 2})
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet", "--set", "rounds=10") == 0
    assert hetfl("run", config, "--out", tmp_path / "resumed", "--quiet") == 0
    assert hetfl("run", "--resume", tmp_path / "resumed", "--quiet", "--set", "rounds=10",
                 "--set", "backend.name=ray") == 0
    assert read_summary(tmp_path / "resumed")["rounds"] == 10
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert torch.equal(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))


# --------------------------------------------------------------------------- every strategy, on the simulator
def simulate(name: str, backend=None, rounds: int = 4, seed: int = 0) -> Simulator:
    strategy = build_strategy(StrategyConfig(name=name, clients_per_round=4, deadline_s=4.0,
                                             params={"server_lr": 0.1} if name in ("fedadam", "fedyogi") else {}))
    model = model_for(strategy)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.randn(3, 4, generator=g)[y] * 3 + torch.randn(48, 4, generator=g)
    torch.manual_seed(seed)
    trainer = LocalTrainer(build_model(ModelConfig(name=model, hidden=[8]), (4,), 3),
                           TrainingConfig(local_steps=2, batch_size=4, lr=0.1, vectorize="off"))
    sim = Simulator(strategy=strategy, trainer=trainer, pool=ClientPool(x, y, list(torch.arange(48).chunk(8))),
                    profiles=harsh_profiles(seed), flops_per_step=1e6, seed=seed, backend=backend)

    def stop(s):
        if s.version >= rounds:
            s.stop("rounds")

    sim.on_commit = stop
    sim.proceed()
    try:
        while sim.step():
            pass
    finally:
        sim.close()
    return sim


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_the_same_run_on_ray(name):
    # each client half reads only its task, its state and the strategy's parameters, so the strategy as built
    # (what the workers get) computes what the live one would; the states come back to the simulator
    local = simulate(name)
    remote = simulate(name, RayBackend())
    assert torch.equal(local.params, remote.params)
    assert (local.now, local.version, local.counters.arrived) == (remote.now, remote.version, remote.counters.arrived)
    assert sorted(local.state.client_state) == sorted(remote.state.client_state)
    for client, state in local.state.client_state.items():
        assert same(state, remote.state.client_state[client]), client


def same(a, b) -> bool:
    """Equal, bit for bit, through nested dicts, lists and tuples of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# --------------------------------------------------------------------------- cancellation
class SpyRay:
    """The ``ray`` module, recording which object references the backend waited on and which it cancelled."""

    def __init__(self) -> None:
        self.fetched: set = set()
        self.cancelled: set = set()

    def __getattr__(self, name):
        return getattr(ray, name)

    def get(self, ref, **kwargs):
        self.fetched.add(ref)
        return ray.get(ref, **kwargs)

    def cancel(self, ref, **kwargs):
        self.cancelled.add(ref)
        return ray.cancel(ref, **kwargs)


def test_a_cancelled_task_is_never_waited_on():
    backend = RayBackend()
    spy = backend.ray = SpyRay()
    forgotten = []
    forget = backend.forget

    def recording_forget(task):
        entry = backend._futures.get(task.task_id)
        if entry is not None:
            forgotten.append(entry[1])
        forget(task)

    backend.forget = recording_forget
    sim = simulate("fedavg", backend, rounds=8)
    assert sim.counters.cancelled > 0, "the deadlines cut stragglers"
    assert forgotten and not spy.fetched & set(forgotten)  # their results were never fetched
    assert not spy.cancelled  # never ray.cancel: it races with a finishing task and can abort the driver
    assert backend.collected == sim.counters.arrived
    assert backend.submitted == sim.counters.arrived + len(forgotten) + sum(
        e.kind == "arrival" for e in sim.state.busy.values())  # lost tasks were never submitted


# --------------------------------------------------------------------------- configuration
def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, as if it were not installed
    with pytest.raises(ConfigError, match=r"^config: backend\.name: ray is not installed; pip install hetfl\[ray\]$"):
        validate({"backend": {"name": "ray"}})
    with pytest.raises(ConfigError, match=r"^backend\.name: ray is not installed; pip install hetfl\[ray\]$"):
        RayBackend()
    assert validate({"backend": {"name": "inprocess"}}).backend.name == "inprocess"


def test_a_cluster_address_takes_no_worker_count():
    with pytest.raises(ConfigError, match=r"backend\.num_workers: only for a local Ray"):
        validate({"backend": {"name": "ray", "address": "auto", "num_workers": 4}})


# --------------------------------------------------------------------------- lost nodes and workers
class LosingRay(SpyRay):
    """The ``ray`` module, whose first ``lose`` fetches fail as if the task's node had died."""

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose

    def get(self, ref, **kwargs):
        if self.lose > 0:
            self.lose -= 1
            raise ray.exceptions.NodeDiedError("node 0 died (a test)")
        return super().get(ref, **kwargs)


def test_a_task_lost_with_its_node_is_submitted_again_with_the_same_result():
    backend = RayBackend()
    backend.ray = LosingRay(lose=3)
    sim = simulate("fedavg", backend, rounds=3)
    assert backend.resubmitted == 3
    assert torch.equal(sim.params, simulate("fedavg", rounds=3).params)
    forever = RayBackend()
    forever.ray = LosingRay(lose=100)
    with pytest.raises(HetflError, match=r"^backend ray: task \d+ \(client \d+\) failed 4 times, the last: node 0 died"):
        simulate("fedavg", forever, rounds=3)


def test_dispatched_tasks_train_in_batches_on_the_workers():
    # vectorize on: each round's tasks as at most one batch per worker slot (2 here), trained by train_many
    backend = RayBackend(vectorize="on")
    sim = simulate("fedprox", backend, rounds=4)
    assert backend.batches and max(backend.batches) > 1 and len(backend.batches) >= 4
    assert backend.collected == sim.counters.arrived
    local = simulate("fedprox", rounds=4)
    assert torch.allclose(sim.params, local.params, atol=1e-5, rtol=1e-4)


def test_a_local_ray_node_that_times_out_at_startup_is_started_once_more(monkeypatch):
    from hetfl.engine import backends
    from hetfl.errors import ConfigError

    class FakeRay:
        def __init__(self, failures: list[str]) -> None:
            self.failures, self.calls = failures, []

        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            self.calls.append("init")
            if self.failures:
                raise RuntimeError(self.failures.pop(0))

        def shutdown(self) -> None:
            self.calls.append("shutdown")

    timeout = "The current node timed out during startup. This could happen because some of the raylet failed"
    for failures, calls, ok in [([timeout], ["init", "shutdown", "init"], True),
                                ([timeout, timeout], ["init", "shutdown", "init"], False),
                                (["bad runtime_env"], ["init"], False)]:  # not a timeout: not retried
        ray = FakeRay(list(failures))
        monkeypatch.setattr(backends, "import_ray", lambda: ray)
        if ok:
            assert backends.start_ray(None, 1, 1, None) is True
        else:
            with pytest.raises(ConfigError, match="^backend: starting a local Ray failed: "):
                backends.start_ray(None, 1, 1, None)
        assert ray.calls == calls
