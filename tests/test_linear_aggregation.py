"""``linear_aggregation``: a strategy that claims it must aggregate identically when each update is replaced by
the updates' sample-weighted mean, which is all secure aggregation hands the server (issue 14, item 12)."""

import pytest
import torch
import yaml

from conftest import make_simulator, profile, run_rounds
from hetfl.cli import main
from hetfl.config import StrategyConfig
from hetfl.deploy.tokens import write_tokens
from hetfl.strategies import STRATEGIES, FedStale, FedVARP, Task, Update, build_strategy
from hetfl.strategies.checks import check_linear_aggregation, secure_updates

LINEAR = sorted(name for name, cls in STRATEGIES.items() if cls.linear_aggregation)
ROUNDS = 5


def run_federation(strategy):
    """Five clients of different sizes and speeds, three a round, five rounds: the same federation every call."""
    profiles = [profile(i, flops=1e6 * (1 + i % 3)) for i in range(5)]
    run_rounds(make_simulator(strategy, [6, 10, 14, 20, 8], profiles), ROUNDS)


def test_the_strategies_that_claim_it():
    assert LINEAR == ["ditto", "fedavg", "fedavg_ft", "fedprox"]
    assert not FedStale.linear_aggregation and not FedVARP.linear_aggregation


@pytest.mark.parametrize("name", LINEAR)
def test_a_strategy_that_claims_linear_aggregation_aggregates_the_mean_as_the_updates(name):
    def make():
        return build_strategy(StrategyConfig(name=name, clients_per_round=3))

    assert check_linear_aggregation(make, run_federation) == ROUNDS


@pytest.mark.parametrize("cls", [FedStale, FedVARP])
def test_the_check_catches_fedstale_and_fedvarp(cls):
    # FedStale's first round stores nothing yet, so it equals FedAvg's; from the second on, the stale term uses
    # the stored changes y_j, which under secure aggregation are all the mean of their round
    with pytest.raises(AssertionError, match=rf"{cls.name}: aggregation 2 of {ROUNDS} gives a different model"):
        check_linear_aggregation(lambda: cls(clients_per_round=3), run_federation)


def test_fedstale_with_beta_zero_is_fedavg_and_passes():
    # the stale updates are stored but weigh nothing: the check is not fooled by the stored state alone
    assert check_linear_aggregation(lambda: FedStale(clients_per_round=3, beta=0.0), run_federation) == ROUNDS


def test_secure_updates_are_each_cohorts_weighted_mean():
    # cohort of version 0 from w = (1, 1): n = (1, 3), changes (4, 0) and (0, 4): mean change (1, 3) -> (2, 4);
    # a lone update of version 1 is its own mean
    def update(client, version, start, end, n):
        task = Task(task_id=client, client_id=client, version=version, params=torch.tensor(start), steps=1,
                    dispatched_at=0.0)
        return Update(task=task, params=torch.tensor(end), n_samples=n, steps=1, loss=float(client), arrived_at=0.0,
                      payload={"extra": torch.zeros(1)})

    updates = [update(0, 0, [1.0, 1.0], [5.0, 1.0], 1), update(1, 0, [1.0, 1.0], [1.0, 5.0], 3),
               update(2, 1, [0.0, 0.0], [7.0, 7.0], 2)]
    secure = secure_updates(updates)
    assert [u.params.tolist() for u in secure] == [[2.0, 4.0], [2.0, 4.0], [7.0, 7.0]]
    assert [(u.n_samples, u.loss, u.payload) for u in secure] == [(1, 0.0, {}), (3, 1.0, {}), (2, 2.0, {})]


@pytest.mark.parametrize("name", ["fedstale", "fedvarp"])
def test_hetfl_server_refuses_secure_aggregation_for_them(name, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3},
                                      "strategy": {"name": name}, "deploy": {"secure_aggregation": True}}))
    write_tokens(tmp_path / "t.yaml", 3)
    assert main(["server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"deploy.secure_aggregation: {name} does not aggregate by a weighted mean" in err
