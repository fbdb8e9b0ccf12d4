"""The simulator's time, byte and failure accounting, checked against hand computations."""

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import blobs, make_simulator, profile, run_rounds
from hetfl.engine import ClientPool
from hetfl.config import ModelConfig, TrainingConfig
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.strategies import STRATEGIES, FedAvg, FedProx
from hetfl.testing import CHECKS, LINEAR, MODELS as CHECK_MODELS, check_strategy
from hetfl.training import LocalTrainer


def test_round_time_is_the_slowest_client_computed_by_hand():
    # logreg 4 -> 3: 15 parameters = 60 bytes each way. Steps 2, flops_per_step 1e6.
    # client 0: 1e6 FLOP/s, 1e5 B/s, 0.01 s latency: 60/1e5 + .01 + 2 + 60/1e5 + .01 = 2.0212 s
    # client 1: 4e6 FLOP/s: 0.5 s compute -> 0.5212 s.  The round ends when the slower returns.
    profiles = [profile(0, flops=1e6, latency=0.01), profile(1, flops=4e6, latency=0.01)]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles), 1)
    assert sim.now == pytest.approx(2 * (60 / 1e5 + 0.01) + 2.0)
    assert sim.counters.bytes_down == 120 and sim.counters.bytes_up == 120
    run_rounds(sim, 3)
    assert sim.now == pytest.approx(3 * (2 * (60 / 1e5 + 0.01) + 2.0))


def test_a_client_with_fewer_samples_than_a_batch_is_charged_for_the_samples_it_has():
    # batch 4, flops_per_step 1e6 priced for a batch of 4. Client 0 holds 2 samples, so its batches are its 2 samples
    # (LocalTrainer.batches): 2 steps x 1e6 x 2/4 = 1e6 FLOP, 4 s at 0.25e6 FLOP/s (8 s if charged a full batch).
    # Client 1 holds 8: 2 steps x 1e6 = 2 s at 1e6 FLOP/s. Transfers 60 B each way at 1e5 B/s. The round: 4.0012 s.
    profiles = [profile(0, flops=0.25e6), profile(1, flops=1e6)]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [2, 8], profiles), 1)
    assert sim.step_flops(0) == pytest.approx(0.5e6) and sim.step_flops(1) == pytest.approx(1e6)
    assert sim.now == pytest.approx(2 * 60 / 1e5 + 4.0)
    assert sim.counters.trained_flops == pytest.approx(1e6 + 2e6)


def test_deadline_drops_the_straggler_without_training_it():
    # client 2 needs 20 s; the deadline is 5 s: every round aggregates two updates, drops one
    profiles = [profile(0, flops=1e6), profile(1, flops=1e6), profile(2, flops=1e5)]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=3, deadline_s=5.0), [8, 8, 8], profiles), 4)
    assert sim.counters.updates == 8 and sim.counters.dropped == 4
    assert sim.counters.trained_steps == 8 * 2  # the straggler's work is never computed
    assert sim.now == pytest.approx(4 * 5.0)
    assert sim.counters.bytes_up == 8 * 60  # dropped clients never upload


def test_dropout_is_reported_as_failure_and_the_round_goes_on():
    profiles = [profile(0), profile(1, dropout=0.999999)]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles), 3)
    assert sim.counters.failed == 3 and sim.counters.dropped == 3 and sim.counters.updates == 3
    assert sim.now < 3 * 2.0013  # each failure comes before the task would have finished


def test_offline_clients_are_not_sampled_and_going_offline_loses_the_task():
    # client 1 is online only in [0, 1): its first task (2 s) is lost at t = 1; it is never picked again
    profiles = [profile(0), profile(1, windows=((0.0, 1.0),))]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles), 3)
    assert sim.counters.failed == 1
    assert sim.counters.updates == 3  # client 0 alone in every round


def test_waits_for_a_client_to_come_online():
    # nobody is online before t = 100: the first round starts then
    profiles = [profile(0, windows=((100.0, math.inf),))]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=1), [8], profiles), 1)
    assert sim.now == pytest.approx(100.0 + 2.0 + 2 * 60 / 1e5)


def test_a_federation_nobody_can_join_stalls_instead_of_hanging():
    profiles = [profile(0, windows=((5.0, 6.0),))]  # online only briefly, a task takes 2 s
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=1), [8], profiles), 10)
    assert sim.stop_reason == "stalled"


def test_fedavg_one_client_full_batch_equals_centralised_gradient_descent():
    # one client holding all the data, batch = all of it, k local steps per round, R rounds
    # == k * R steps of full-batch gradient descent from the same initial model
    n, k, rounds, lr = 24, 3, 4, 0.2
    training = TrainingConfig(lr=lr, batch_size=n, local_steps=k)
    sim = make_simulator(FedAvg(clients_per_round=1), [n], [profile(0)], training=training)
    w0 = sim.params.clone()
    run_rounds(sim, rounds)

    x, y = blobs(n, 0)
    w = w0.clone().requires_grad_(True)
    for _ in range(k * rounds):
        weight, bias = w[:12].view(3, 4), w[12:]
        loss = F.cross_entropy(x @ weight.T + bias, y)
        (g,) = torch.autograd.grad(loss, w)
        w = (w - lr * g).detach().requires_grad_(True)
    assert torch.allclose(sim.params, w.detach(), atol=1e-6)


def test_fedavg_of_identical_clients_equals_one_client():
    # two clients with the same data and batch order average to the single client's model
    training = TrainingConfig(lr=0.1, batch_size=8, local_steps=3)
    one = run_rounds(make_simulator(FedAvg(clients_per_round=1), [8], [profile(0)], training=training), 1)
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)], training=training)
    same = one.pool.train_indices[0]
    sim.pool = ClientPool(one.pool.x, one.pool.y, [same, same])
    sim.task_seed = lambda task_id: one.task_seed(0)  # same batch order for both
    run_rounds(sim, 1)
    assert torch.allclose(sim.params, one.params, atol=1e-6)


def test_fedprox_pulls_clients_towards_the_global_model():
    training = TrainingConfig(lr=0.1, batch_size=4, local_steps=20)
    drift = {}
    for mu in (0.0, 10.0):
        sim = make_simulator(FedProx(mu=mu, clients_per_round=1), [16], [profile(0)], training=training)
        w0 = sim.params.clone()
        run_rounds(sim, 1)
        drift[mu] = float((sim.params - w0).norm())
    assert drift[10.0] < 0.5 * drift[0.0]


def test_jitter_is_deterministic_per_seed_and_varies_durations():
    times = []
    for seed in (0, 0, 1):
        sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)], seed=seed,
                                        jitter=0.3), 3)
        times.append(sim.now)
    assert times[0] == times[1] != times[2]
    assert times[0] != pytest.approx(3 * 2.0012)


def model_for(strategy, first: str = "logreg") -> str:
    """The first of the common tests' small classifiers the strategy takes, by name and built (FedPer needs a body:
    an MLP; pFedPG a soft prompt: hetfl.testing's PromptMLP); skip a strategy that takes none (FedSpine prunes
    language models; its own tests run it end to end)."""
    for model in dict.fromkeys((first, "mlp", *CHECK_MODELS)):
        try:
            strategy.check_model(model)
            strategy.check_models([LocalTrainer(build_model(ModelConfig(name=model, hidden=[8]), (4,), 3),
                                                TrainingConfig())])
            return model
        except ConfigError as err:
            refusal = err
    pytest.skip(f"{strategy.name} refuses the common tests' models: {refusal}")


# the common tests' parameters, where an algorithm's defaults do not suit a 5-round federation of 4 clients
COMMON_PARAMS = {"fedadam": {"server_lr": 0.1}, "fedyogi": {"server_lr": 0.1}, "fedamd": {"server_lr": 0.5}}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_passes_the_common_checks(name):
    # hetfl.testing.check_strategy, the conformance checks users run on their own strategies: every task accounted
    # for exactly once under deadlines, dropout and churn (3 seeds), deterministic, resume from a checkpoint equals
    # the straight run bit for bit, and the loss of a tiny federation falls
    report = check_strategy(STRATEGIES[name], **COMMON_PARAMS.get(name, {}))
    if not report.passed:
        pytest.skip(str(report))  # a model the strategy refuses (FedSpine prunes language models; FedBN needs BatchNorm)
    assert report.passed[:len(CHECKS)] == list(CHECKS) and not report.skipped, report
    assert (LINEAR in report.passed) == STRATEGIES[name].linear_aggregation  # checked where it is claimed


def test_a_strategy_that_computes_more_than_its_task_steps_is_timed_for_it():
    # Ditto trains the global model (2 steps) and then its personal model (3 steps): 5 steps of 1 s
    from hetfl.strategies import Ditto

    sim = make_simulator(Ditto(clients_per_round=1, personal_steps=3), [8], [profile(0, flops=1e6, bw=1e12)])
    run_rounds(sim, 1)
    assert sim.now == pytest.approx(5.0, abs=1e-6)
    assert sim.counters.trained_steps == 5
