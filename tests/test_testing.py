"""hetfl.testing.check_strategy, the public conformance checks: a correct strategy of one's own passes them, and each
kind of broken strategy is caught by the invariant it breaks, with a message naming the strategy and the invariant.
(tests/test_simulator.py runs the same function over every built-in algorithm.)"""

from __future__ import annotations

import dataclasses

import random
import subprocess
import sys
import textwrap

import pytest
import torch

from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, Strategy
from hetfl.testing import ACCOUNTING, CHECKS, DETERMINISTIC, LEARNS, LINEAR, RESUME, check_strategy
from test_user_strategy import FEDAVGM


class MixOnArrival(Strategy):
    """Mixes each update into the model as it arrives and keeps every online client busy (not a RoundStrategy)."""

    def __init__(self, *, alpha: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must lie in (0, 1]")
        self.alpha = alpha
        self.in_flight: set[int] = set()

    def start(self, server) -> None:
        self.fill(server)

    def on_update(self, server, update) -> None:
        self.in_flight.discard(update.client_id)
        server.commit(self.mix(server, update), [update])
        self.fill(server)

    def on_failure(self, server, task) -> None:
        self.in_flight.discard(task.client_id)
        self.fill(server)

    def on_timer(self, server, tag) -> None:
        self.fill(server)

    def on_proceed(self, server) -> None:
        self.fill(server)

    def mix(self, server, update) -> torch.Tensor:
        return (1 - self.alpha) * server.params + self.alpha * update.params

    def fill(self, server) -> None:
        if server.stopping:
            return
        for client in server.available():
            server.dispatch(client)
            self.in_flight.add(client)
        if not self.in_flight:  # everyone is offline: look again when the next one comes online
            wake = server.next_available_time()
            if wake < float("inf"):
                server.set_timer(wake, "wake")


class Twice(MixOnArrival):
    def on_update(self, server, update) -> None:
        self.in_flight.discard(update.client_id)
        server.commit(self.mix(server, update), [update, update])  # counts one update as two
        self.fill(server)


class Forgetful(MixOnArrival):
    def on_update(self, server, update) -> None:
        self.in_flight.discard(update.client_id)
        if update.staleness == 0:  # a stale update vanishes: neither aggregated nor reported as dropped
            server.commit(self.mix(server, update), [update])
        self.fill(server)


class Jittery(MixOnArrival):
    def mix(self, server, update) -> torch.Tensor:
        a = self.alpha * (0.9 + 0.2 * random.random())  # Python's unseeded global stream
        return (1 - a) * server.params + a * update.params


class TorchNoise(MixOnArrival):
    def mix(self, server, update) -> torch.Tensor:
        # torch's global stream: seeded where the run is built, but not part of the checkpoint
        return super().mix(server, update) + 1e-3 * torch.randn(server.params.shape)


class Unpicklable(MixOnArrival):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log = lambda message: None  # a checkpoint cannot pickle it


class Lazy(MixOnArrival):
    def mix(self, server, update) -> torch.Tensor:
        return server.params.clone()


class HalfSent(MixOnArrival):
    """Its clients send back the first half of the model but it does not say so (``upload_reference``)."""

    def client_train(self, trainer, task, data, state, seed):
        result = super().client_train(trainer, task, data, state, seed)
        half = task.params.numel() // 2
        return dataclasses.replace(result, params=result.params[:half])

    def mix(self, server, update) -> torch.Tensor:
        half = update.params.numel()
        return torch.cat([(1 - self.alpha) * server.params[:half] + self.alpha * update.params, server.params[half:]])


class Undeclared(MixOnArrival):
    """Its clients return a payload it never declares (``expected_payload``)."""

    def client_train(self, trainer, task, data, state, seed):
        result = super().client_train(trainer, task, data, state, seed)
        return dataclasses.replace(result, payload={"momentum": torch.zeros(3)})


class Picky(MixOnArrival):
    name = "picky"

    def check_model(self, model_name: str) -> None:
        raise ConfigError(f"model.name: picky trains only models of its own, not {model_name}")


def test_a_correct_strategy_of_ones_own_passes_every_check():
    report = check_strategy(MixOnArrival, alpha=0.5)
    assert report.passed == list(CHECKS) and report.skipped == {} and report.model == "logreg"
    assert report.strategy == f"{__name__}:MixOnArrival"  # no name of its own: its import path
    assert str(report).startswith(f"{__name__}:MixOnArrival: passed every task accounted for exactly once, ")


@pytest.mark.parametrize(("cls", "invariant", "detail"), [
    (Twice, ACCOUNTING, "were aggregated more than once"),
    (Forgetful, ACCOUNTING, "were aggregated + 0 dropped + 0 held"),
    (Jittery, DETERMINISTIC, "the models differ"),
    (TorchNoise, RESUME, "the models differ"),
    (Unpicklable, RESUME, "its state does not save"),
    (Lazy, LEARNS, "expected below"),
    (HalfSent, ACCOUNTING, "updates a deployed server would reject (hetfl.deploy.validate; task, reason): [(3, 'shape (7,) != expected (15,)'), "),
    (Undeclared, ACCOUNTING, "payload momentum is not one the strategy expects (it expects: none)"),
])
def test_a_broken_strategy_fails_the_invariant_it_breaks(cls, invariant, detail):
    with pytest.raises(AssertionError) as caught:
        check_strategy(cls)
    message = str(caught.value)
    assert message.startswith(f"hetfl.testing: {__name__}:{cls.__name__} breaks '{invariant}' ("), message
    assert detail in message, message


class FalselyLinear(FedAvg):
    """Claims linear aggregation but weighs each update by its own loss: secure aggregation would change it."""

    def aggregate(self, server, updates):
        w = torch.tensor([1.0 + u.loss for u in updates])
        return server.params + torch.stack([u.delta for u in updates]).T @ (w / w.sum())


def test_a_false_claim_of_linear_aggregation_is_caught():
    with pytest.raises(AssertionError, match=rf"breaks '{LINEAR}' .*aggregation 1 of 5 gives a different model"):
        check_strategy(FalselyLinear)


def test_what_a_strategy_refuses_is_skipped_with_its_reason():
    report = check_strategy(Picky)
    assert report.passed == [] and list(report.skipped) == list(CHECKS) and report.model is None
    assert "picky trains only models of its own, not logreg" in report.reason
    assert "not mlp" in report.reason and report.strategy == "picky"


def test_parameters_are_validated_as_a_configs_and_names_are_accepted():
    with pytest.raises(ConfigError, match=rf"^check_strategy\({__name__}:MixOnArrival\): strategy\.params\.beta: not a "
                                          r"parameter of .*:MixOnArrival \(known: alpha\)$"):
        check_strategy(MixOnArrival, beta=1)
    with pytest.raises(ConfigError, match=r"strategy\.params\.alpha: .*valid number"):
        check_strategy(MixOnArrival, alpha="half")
    with pytest.raises(ConfigError, match=r"alpha must lie in \(0, 1\]"):
        check_strategy(MixOnArrival, alpha=2.0)
    report = check_strategy("fedavg", seeds=[3], clients_per_round=2)  # a config's name; a strategy.* key
    assert report.strategy == "fedavg" and report.passed == [*CHECKS, LINEAR]  # FedAvg claims linear aggregation
    with pytest.raises(ValueError, match="at least one seed"):
        check_strategy("fedavg", seeds=[])
    with pytest.raises(ConfigError, match=r"^check_strategy\('fedbest'\): strategy\.name: unknown algorithm 'fedbest'"):
        check_strategy("fedbest")
    with pytest.raises(ConfigError, match=r"^check_strategy\('fedavg'\): strategy\.clients_per_round: "):
        check_strategy("fedavg", clients_per_round=0)


def test_a_users_own_pytest_file_runs_the_checks(tmp_path):
    (tmp_path / "mystrats.py").write_text(textwrap.dedent(FEDAVGM))
    (tmp_path / "test_mystrats.py").write_text(textwrap.dedent('''
        from hetfl.testing import CHECKS, check_strategy
        from mystrats import FedAvgM


        def test_fedavgm_is_a_hetfl_strategy():
            report = check_strategy(FedAvgM, beta=0.5)
            assert report.passed[:len(CHECKS)] == list(CHECKS) and not report.skipped, report
    '''))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mystrats.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
