"""Stale-update recovery by gradient inversion (Wang and Gao, arXiv:2309.13536): the mathematics first.

For one sample (x, y) of a logistic regression, one SGD step of softmax cross-entropy changes the
weights by -eta (p - y) x^T and the bias by -eta (p - y), so the update determines x and y, and the
inversion must find them. The server's replay of local steps must be torch's SGD exactly; a stale
update must come back fresh and closer to what the client's data would give at the current model;
and an asynchronous strategy with recovery must run and learn on the simulator.
"""

from types import SimpleNamespace

import pytest
import torch

from conftest import blobs, make_simulator, profile, run_rounds
from hetfl.config import ModelConfig, TrainingConfig
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.strategies import _typed
from hetfl.strategies.asynchronous import AsyncStrategy
from hetfl.strategies.base import Task, Update
from hetfl.strategies.recovery import (
    INVERSION_FACTOR,
    LocalSteps,
    RecoveryConfig,
    StaleRecovery,
    converted_weight,
    invert,
)
from hetfl.training import LocalTrainer


class MixOnArrival(AsyncStrategy):
    """FedAsync's mixing without staleness weights: w <- (1 - a) w + a w_i on every arrival."""

    name = "mix-on-arrival-test"

    def __init__(self, *, a: float = 0.5, concurrency: int = 2, recovery: RecoveryConfig | None = None) -> None:
        super().__init__(concurrency=concurrency, recovery=recovery)
        self.a = a
        self.seen: list[Update] = []

    def receive(self, server, update):
        self.seen.append(update)
        server.commit((1 - self.a) * server.params + self.a * update.params, [update])


def logreg(features=4, classes=3, seed=0, **training):
    torch.manual_seed(seed)
    net = build_model(ModelConfig(name="logreg"), (features,), classes)
    return LocalTrainer(net, TrainingConfig(**{"lr": 0.1, "batch_size": 1, "local_steps": 1, **training}))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- the inversion itself
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_inversion_recovers_one_sample_of_a_logistic_regression(seed):
    trainer = logreg()
    w_old = trainer.flat.clone()
    g = torch.Generator().manual_seed(seed)
    x, y = 2 * torch.randn(1, 4, generator=g), torch.randint(0, 3, (1,), generator=g)
    target = trainer.train(w_old, x, y, steps=1, seed=0).params - w_old
    local = LocalSteps(trainer.model, steps=1, lr=0.1)
    start = torch.Generator().manual_seed(100 + seed)
    x0, z0 = torch.randn(1, 4, generator=start), torch.randn(1, 3, generator=start)
    x_hat, z_hat, evaluations = invert(local, w_old, target, x0, z0, iterations=100)
    # a softmax label never reaches one-hot, and its residual in (p - y) (~3e-5 here) leaks into x:
    # measured errors are 2e-5 to 5e-5 in 29 to 38 evaluations over seeds 0-5; 1e-3 leaves a margin
    assert relative(x_hat, x) < 1e-3
    assert int(z_hat.argmax()) == int(y) and float(z_hat.softmax(1).max()) > 0.99
    assert relative(local.delta(w_old, x_hat, z_hat.softmax(1)), target) < 1e-3
    assert evaluations <= 100


def test_replayed_local_steps_are_torch_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="mlp", hidden=[8]), (4,), 3)
    trainer = LocalTrainer(net, TrainingConfig(lr=0.1, momentum=0.9, weight_decay=0.01, batch_size=16, local_steps=3))
    x, y = blobs(16, seed=1)
    w0 = trainer.flat.clone()
    expected = trainer.train(w0, x, y, steps=3, seed=0).params - w0  # full batch: every step sees all 16
    local = LocalSteps(net, steps=3, lr=0.1, momentum=0.9, weight_decay=0.01)
    soft = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(local.delta(w0, x, soft), expected, atol=1e-6)
    with_graph = local.delta(w0, x.clone().requires_grad_(), soft, create_graph=True)
    assert with_graph.requires_grad and torch.allclose(with_graph.detach(), expected, atol=1e-6)


def test_the_two_matching_losses_by_hand():
    # a 1-feature, 2-class logistic regression: weight (2 x 1) then bias (2), four entries
    local = LocalSteps(logreg(features=1, classes=2).model, steps=1, lr=0.1)
    ref = torch.tensor([1.0, -2.0, 0.0, 4.0])
    diff = torch.tensor([0.5, 0.5, -1.0, 0.0])
    zero = torch.zeros(4)
    # relative_l2, per tensor: weight 0.5 / 5 = 0.1, bias 1 / 16 = 0.0625, mean 0.08125
    assert float(local.error(diff, zero, ref)) == pytest.approx(0.08125)
    # l1, all entries: (0.5 + 0.5 + 1 + 0) / (1 + 2 + 0 + 4) = 2 / 7
    assert float(local.error(diff, zero, ref, norm="l1")) == pytest.approx(2 / 7)
    # on the entries kept (the two largest of ref: -2 and 4): l1 0.5 / 6; relative_l2 0.25 / 4 and 0 / 16
    kept = ref.abs().topk(2).indices
    assert float(local.error(diff, zero, ref, kept, norm="l1")) == pytest.approx(0.5 / 6)
    assert float(local.error(diff, zero, ref, kept)) == pytest.approx((0.0625 + 0.0) / 2)


def test_the_authors_adam_recovers_one_sample_too():
    # Adam with X's gradient replaced by its sign and lr / 10 at 3/8, 5/8, 7/8 of the iterations
    trainer = logreg()
    w_old = trainer.flat.clone()
    g = torch.Generator().manual_seed(0)
    x, y = 2 * torch.randn(1, 4, generator=g), torch.randint(0, 3, (1,), generator=g)
    target = trainer.train(w_old, x, y, steps=1, seed=0).params - w_old
    local = LocalSteps(trainer.model, steps=1, lr=0.1)
    start = torch.Generator().manual_seed(100)
    x0, z0 = torch.randn(1, 4, generator=start), torch.randn(1, 3, generator=start)
    x_hat, z_hat, evaluations = invert(local, w_old, target, x0, z0, iterations=150, lr=0.1, optimizer="adam")
    assert evaluations == 150  # Adam spends its whole budget; L-BFGS stops when it has converged
    # measured: relative error of x 0.026 (L-BFGS: 3e-5 in 29 evaluations), label right
    assert relative(x_hat, x) < 0.1 and int(z_hat.argmax()) == int(y)


def test_the_papers_switch_on_a_made_up_error_sequence():
    # (inversion error L*, staleness error e): convert while e > L*, switch back at the first L* >= e
    sequence = [(0.1, 0.9), (0.2, 0.5), (0.3, 0.3), (0.1, 0.9)]
    decisions = [converted_weight(loss, drift, blend=False, switch_back=True) for loss, drift in sequence]
    assert decisions[:3] == [(1.0, False), (1.0, False), (0.0, True)]
    # the blend weighs the same errors: e / (e + L*)
    assert converted_weight(0.1, 0.9, blend=True, switch_back=False) == (pytest.approx(0.9), False)
    assert converted_weight(0.3, 0.3, blend=True, switch_back=False) == (pytest.approx(0.5), False)
    assert converted_weight(0.3, 0.3, blend=False, switch_back=False) == (1.0, False)


# --------------------------------------------------------------------------- converting a stale update
def stale_setting(**cfg):
    """A logreg client of 12 blob samples, dispatched at version 0; the server moved on to version 3.

    Four synthetic samples stand for twelve: the estimate fits the update almost exactly but is not the
    data (the update does not determine twelve samples), so the converted update is close, not exact.
    """
    trainer = logreg(lr=0.2, batch_size=12, local_steps=3)
    x, y = blobs(60, seed=0)
    w_old = trainer.flat.clone()
    w_now = trainer.train(w_old, x[12:], y[12:], steps=5, seed=1).params  # what other clients taught it
    xc, yc = x[:12], y[:12]
    task = Task(task_id=5, client_id=1, version=0, params=w_old, steps=3, dispatched_at=0.0)
    result = trainer.train(w_old, xc, yc, steps=3, seed=2)
    update = Update(task, result.params, n_samples=12, steps=3, loss=result.loss, arrived_at=4.0,
                    stats={"n_labels": 3.0}, arrived_version=3)
    truth = trainer.train(w_now, xc, yc, steps=3, seed=2).params - w_now  # the client's update at w_now
    server = SimpleNamespace(version=3, params=w_now, trainer=trainer)
    return StaleRecovery(RecoveryConfig(**{"samples": 4, "iterations": 60, **cfg})), server, update, truth


def test_a_stale_update_comes_back_fresh_and_closer_to_the_truth():
    recovery, server, update, truth = stale_setting()
    fresh = recovery.recover(server, update)
    assert fresh.task.version == server.version and fresh.task.params is server.params
    assert fresh.staleness == 0 and fresh.task.task_id == update.task.task_id
    assert (fresh.n_samples, fresh.steps, fresh.client_id) == (12, 3, 1)
    assert fresh.stats["recovered"] == 1.0 and fresh.stats["n_labels"] == 3.0
    stale_error = relative(update.delta, truth)
    fresh_error = relative(fresh.delta, truth)
    assert fresh_error < 0.3 * stale_error, (fresh_error, stale_error)  # measured: 0.39 against 2.69
    assert 0.0 <= fresh.stats["recovery_weight"] <= 1.0 and fresh.stats["recovery_loss"] < 0.05
    # cost: S k F (9 evaluations + 6), F = 2 * 4 * 3 forward FLOPs of the 4->3 logistic regression
    m = recovery.metrics()
    assert m["recovered"] == 1 and m["recovery_failed"] == 0 and m["recovery_wall_s"] > 0
    evaluations = (m["recovery_flops"] / (4 * 3 * 24) - 6) / INVERSION_FACTOR
    assert evaluations == int(evaluations) and 1 <= evaluations <= 60
    assert m["recovery_loss"] == pytest.approx(fresh.stats["recovery_loss"])


def test_fresher_updates_pass_unchanged_and_cost_nothing():
    recovery, server, update, _ = stale_setting(min_staleness=4)
    assert recovery.recover(server, update) is update
    assert recovery.metrics()["recovered"] == 0 and recovery.metrics()["recovery_flops"] == 0


def test_recovery_is_deterministic_and_warm_starts_from_the_clients_estimate():
    one, server, update, _ = stale_setting()
    two, *_ = stale_setting()
    assert torch.equal(one.recover(server, update).params, two.recover(server, update).params)
    assert 1 in one._estimates  # the next inversion for client 1 starts here
    cold, *_ = stale_setting(warm_start=False, blend=False)
    cold.recover(server, update)
    assert not cold._estimates


def test_after_the_papers_switch_stale_updates_pass_unchanged():
    recovery, server, update, _ = stale_setting(switch_back=True, blend=False, iterations=5)
    assert recovery.recover(server, update).stats["recovery_weight"] == 1.0  # the model moved: e >> L*
    assert recovery.switched_at is None
    # a server that has not moved since dispatch: staleness error 0, so the inversion's error outweighs it
    still = SimpleNamespace(version=3, params=update.task.params, trainer=server.trainer)
    assert recovery.recover(still, update) is update
    assert recovery.switched_at == 3 and recovery.metrics()["recovery_switched_at"] == 3.0
    flops = recovery.metrics()["recovery_flops"]
    assert recovery.recover(server, update) is update  # from now on plain asynchronous FL, at no cost
    assert recovery.metrics()["recovery_flops"] == flops and recovery.metrics()["recovered"] == 1


# --------------------------------------------------------------------------- on the simulator
def test_an_asynchronous_strategy_with_recovery_runs_and_learns():
    # client 0 is three times as fast as client 1, so client 1's updates arrive 2-3 versions stale
    fast, slow = profile(0, flops=2e6, bw=1e12), profile(1, flops=2e6 / 3, bw=1e12)
    strategy = MixOnArrival(recovery=RecoveryConfig(min_staleness=2, samples=4, iterations=30))
    sim = make_simulator(strategy, [24, 24], [fast, slow])
    x, y = blobs(48, 0)
    before = float((sim.trainer.predict(sim.params, x).argmax(1) == y).float().mean())
    run_rounds(sim, 16)
    after = float((sim.trainer.predict(sim.params, x).argmax(1) == y).float().mean())
    recovered = [u for u in strategy.seen if u.stats.get("recovered")]
    assert recovered and all(u.client_id == 1 and u.staleness == 0 for u in recovered)
    assert all(u.stats["recovered_staleness"] >= 2 for u in recovered)
    assert after > max(before, 0.8), (before, after)
    m = strategy.metrics()
    assert m["recovered"] == len(recovered) and m["recovery_flops"] > 0


# --------------------------------------------------------------------------- what is refused, and config
def test_a_cnn_is_refused_in_one_line_before_and_at_the_start():
    strategy = MixOnArrival(recovery=RecoveryConfig())
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery: .*cnn") as err:
        strategy.check_model("cnn")
    assert "\n" not in str(err.value)
    MixOnArrival().check_model("cnn")  # no recovery, nothing to refuse
    strategy.check_model("mlp")
    sim = make_simulator(MixOnArrival(recovery=RecoveryConfig()), [8, 8], [profile(0), profile(1)], model="cnn")
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery: .*cnn"):
        sim.step()


def test_adam_is_refused():
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery: .*adam"):
        MixOnArrival(recovery=RecoveryConfig()).check_training("adam", 0.0)
    MixOnArrival(recovery=RecoveryConfig()).check_training("sgd", 0.9)


def test_a_yaml_dict_validates_and_a_wrong_key_is_named():
    where = {"recovery": "strategy.params.recovery"}
    kwargs = _typed(MixOnArrival, {"recovery": {"iterations": 20, "samples": 4, "keep": 0.05}}, where)
    assert kwargs["recovery"] == RecoveryConfig(iterations=20, samples=4, keep=0.05)
    paper = {"loss": "l1", "optimizer": "adam", "switch_back": True, "blend": False}
    assert _typed(MixOnArrival, {"recovery": paper}, where)["recovery"] == RecoveryConfig(**paper)
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery\.optimizer: "):
        _typed(MixOnArrival, {"recovery": {"optimizer": "sgd"}}, where)
    assert MixOnArrival(**kwargs).recovery.cfg.keep == 0.05
    assert _typed(MixOnArrival, {"recovery": None}, where)["recovery"] is None
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery\.iteration: .*not permitted"):
        _typed(MixOnArrival, {"recovery": {"iteration": 20}}, where)
    with pytest.raises(ConfigError, match=r"^strategy\.params\.recovery\.keep: "):
        _typed(MixOnArrival, {"recovery": {"keep": 0}}, where)


def test_the_intertwined_example_gives_digits_8_and_9_to_the_slow_clients_only():
    # examples/custom/intertwined.yaml, the federation of benchmarks/recovery.py (mylab.partitions:held_by)
    from pathlib import Path

    from hetfl.config import load_config
    from hetfl.engine.run import build_federation

    fed = build_federation(load_config(Path(__file__).resolve().parents[1] / "examples/custom/intertwined.yaml"))
    y = fed.data.dataset.y
    for parts in (fed.data.train, fed.data.test):  # the test split is dealt by each client's label mix
        held = [set(y[part].tolist()) for part in parts]
        assert held[8] == held[9] == {8, 9} and all(c == set(range(8)) for c in held[:8])
    dealt = [i for part in fed.data.train for i in part.tolist()]
    assert len(dealt) == len(set(dealt))  # no sample twice
    assert fed.profiles.speed.tolist() == [1.0] * 8 + [0.1, 0.1]
