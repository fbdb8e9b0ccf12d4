"""Robust aggregation rules, DP-FedAvg and simulated attackers (hetfl.strategies.robust,
hetfl.devices.byzantine), each worked by hand on a few tiny vectors."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hetfl.config import AggregatorConfig, ByzantineConfig, PrivacyConfig, validate
from hetfl.devices.byzantine import Byzantine
from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, build_strategy, parameters
from hetfl.strategies.robust import Aggregation, clip_rows, combine, dp_epsilon, krum_scores

# four changes in 2-d; the last is an outlier
FOUR = torch.tensor([[1.0, 0.0], [2.0, 10.0], [3.0, -2.0], [100.0, 1.0]])
QUARTER = torch.full((4,), 0.25)


def test_mean_is_the_weighted_sum():
    # (1 + 2 + 3 + 100) / 4 = 26.5, (0 + 10 - 2 + 1) / 4 = 2.25
    assert combine(FOUR, QUARTER, "mean").tolist() == [26.5, 2.25]
    # weights need not be equal: 0.5 * (1, 0) + 0.5 * (2, 10) = (1.5, 5)
    assert combine(FOUR, torch.tensor([0.5, 0.5, 0.0, 0.0]), "mean").tolist() == [1.5, 5.0]


def test_median_takes_the_middle_of_each_coordinate():
    # even K: columns sorted (1, 2, 3, 100) and (-2, 0, 1, 10): the mean of the two middle values
    assert combine(FOUR, QUARTER, "median").tolist() == [2.5, 0.5]
    # odd K (drop the outlier): (1, 2, 3) -> 2 and (-2, 0, 10) -> 0
    assert combine(FOUR[:3], torch.full((3,), 1 / 3), "median").tolist() == pytest.approx([2.0, 0.0])
    # weights do not vote, only their total scales: sum 0.5 halves the step
    assert combine(FOUR, torch.tensor([0.4, 0.05, 0.05, 0.0]), "median").tolist() == [1.25, 0.25]


def test_trimmed_mean_drops_b_from_each_end():
    # trim_frac 0.25 of K = 4: b = 1; what is left: (2, 3) -> 2.5 and (0, 1) -> 0.5
    assert combine(FOUR, QUARTER, "trimmed_mean", trim_frac=0.25).tolist() == [2.5, 0.5]
    # trim_frac 0.1: b = floor(0.4) = 0, the plain mean
    assert combine(FOUR, QUARTER, "trimmed_mean", trim_frac=0.1).tolist() == [26.5, 2.25]
    # K = 5, trim_frac 0.2: b = 1; column (1, 2, 3, 100, 4) -> (2, 3, 4) -> 3
    five = torch.cat([FOUR, torch.tensor([[4.0, 5.0]])])
    assert combine(five, torch.full((5,), 0.2), "trimmed_mean", trim_frac=0.2)[0].item() == pytest.approx(3.0)


# five 2-d points: four close together, one far; K = 5, f = 1, each score sums the K - f - 2 = 2 nearest
POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 2.0], [10.0, 10.0]]) + 1.0


def test_krum_scores_by_hand():
    # squared distances: p0: 1 (p1), 1 (p2), 5 (p3), 200 (p4) -> 1 + 1 = 2
    # p1: 1, 2, 4, 181 -> 3;  p2: 1, 2, 2, 181 -> 3;  p3: 5, 4, 2, 145 -> 6;  p4: 200, 181, 181, 145 -> 326
    assert krum_scores(POINTS, 1).tolist() == [2.0, 3.0, 3.0, 6.0, 326.0]


def test_krum_picks_the_lowest_score_and_multi_krum_averages_k_minus_f():
    w = torch.full((5,), 0.2)
    assert combine(POINTS, w, "krum", byzantine=1).tolist() == pytest.approx([1.0, 1.0])  # p0
    # m = K - f = 4 best: p0, p1, p2, p3 -> ((1 + 2 + 1 + 2) / 4, (1 + 1 + 2 + 3) / 4) = (1.5, 1.75)
    assert combine(POINTS, w, "multi_krum", byzantine=1).tolist() == pytest.approx([1.5, 1.75])
    # f = 0 on K = 5: scores sum the 3 nearest; multi_krum then averages all five
    assert combine(POINTS, w, "multi_krum", byzantine=0).tolist() == pytest.approx(POINTS.mean(0).tolist())


def test_krum_refuses_too_few_updates():
    with pytest.raises(ValueError, match=r"krum with f = 1 needs more than 2f \+ 2 = 4 updates, got 4"):
        combine(FOUR, QUARTER, "krum", byzantine=1)
    with pytest.raises(ValueError, match="unknown aggregation rule 'mode'"):
        combine(FOUR, QUARTER, "mode")


def test_clip_rows_by_hand():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    # norm 5 > 1: scaled by 1/5 -> (0.6, 0.8); norm 0.5 and 0: unchanged
    assert torch.allclose(clip_rows(rows, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert clip_rows(rows, 1.0)[1:].equal(rows[1:])  # exactly unchanged


def server(n_clients=10, seed=0):
    return SimpleNamespace(n_clients=n_clients, rng=np.random.default_rng(seed))


def test_dp_mean_clips_and_divides_by_the_expected_count():
    agg = Aggregation(None, PrivacyConfig(clip=1.0, noise_multiplier=0.0), cohort=4)
    # two of the expected four arrived: clipped (0.6, 0.8) and (0.3, 0.4); (0.9, 1.2) / 4, not / 2
    out = agg.delta(server(), torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([0.9, 0.1]))
    assert out.tolist() == pytest.approx([0.225, 0.3])
    m = agg.metrics()
    assert m["dp_epsilon"] is None and m["dp_delta"] == 1e-5 and m["dp_clipped_frac"] == 0.5  # z = 0: no guarantee


def test_dp_noise_has_standard_deviation_z_c_over_m():
    # zero changes: what comes out is the noise / m; std = z C / m = 2 * 0.5 / 4 = 0.25, variance 0.0625
    agg = Aggregation(None, PrivacyConfig(clip=0.5, noise_multiplier=2.0), cohort=4)
    draws = agg.delta(server(seed=1), torch.zeros(3, 20000), torch.full((3,), 1 / 3)).double()
    assert draws.var().item() == pytest.approx(0.0625, rel=0.05)  # standard error of the variance: 1%
    assert abs(draws.mean().item()) < 5 * 0.25 / math.sqrt(20000)
    # the same server seed draws the same noise
    again = Aggregation(None, PrivacyConfig(clip=0.5, noise_multiplier=2.0), cohort=4)
    assert torch.equal(again.delta(server(seed=1), torch.zeros(3, 20000), torch.full((3,), 1 / 3)).double(), draws)


def test_epsilon_without_sampling_matches_the_gaussian_rdp_by_hand():
    # q = 1: T Gaussian mechanisms have RDP T a / (2 z^2) at order a (Mironov 2017); dp_accounting converts with
    # eps = min over its orders a of  rdp + log(1 - 1/a) - log(delta a) / (a - 1)  (Canonne et al. 2020)
    z, T, delta = 2.0, 10, 1e-5
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    by_hand = min(T * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders if a > 1.01)
    assert dp_epsilon(1.0, z, T, delta) == pytest.approx(by_hand, rel=1e-9)


def test_epsilon_of_a_subsampled_run_and_how_it_grows():
    # dp_accounting 0.6, RDP of the Poisson-subsampled Gaussian: q = 0.01, z = 1.1, T = 1000, delta = 1e-5
    assert dp_epsilon(0.01, 1.1, 1000, 1e-5) == pytest.approx(1.7117701662, rel=1e-6)
    eps = [dp_epsilon(0.1, 1.0, t, 1e-5) for t in (1, 10, 100)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert dp_epsilon(0.1, 1.0, 10, 1e-5) < dp_epsilon(1.0, 1.0, 10, 1e-5)  # sampling amplifies privacy
    assert dp_epsilon(0.1, 1.0, 0, 1e-5) == 0.0


def test_aggregation_counts_rounds_and_reports_the_budget():
    agg = Aggregation(None, PrivacyConfig(clip=1.0, noise_multiplier=1.0, delta=1e-6), cohort=2)
    assert agg.metrics()["dp_epsilon"] == 0.0
    for _ in range(3):
        agg.delta(server(n_clients=8), torch.ones(2, 3), torch.full((2,), 0.5))
    # q = 2 / 8 = 0.25
    assert agg.summary() == {"dp_epsilon": dp_epsilon(0.25, 1.0, 3, 1e-6), "dp_delta": 1e-6, "dp_rounds": 3}


def test_krum_rounds_with_too_few_updates_leave_the_model_unchanged():
    agg = Aggregation(AggregatorConfig(rule="krum", byzantine=1), cohort=5)
    assert agg.delta(server(), POINTS[:4], torch.full((4,), 0.25)).tolist() == [0.0, 0.0]
    assert agg.metrics() == {"robust_skipped": 1}
    assert agg.delta(server(), POINTS, torch.full((5,), 0.2)).tolist() == pytest.approx([1.0, 1.0])


def test_fedadam_takes_no_momentum_step_in_a_krum_round_with_too_few_updates():
    from hetfl.strategies import FedAdam
    from hetfl.strategies.base import Task, Update

    strategy = FedAdam(clients_per_round=5, aggregator=AggregatorConfig(rule="krum", byzantine=1))

    def updates(points):
        tasks = [Task(task_id=i, client_id=i, version=0, params=torch.zeros(2), steps=1, dispatched_at=0.0)
                 for i in range(len(points))]
        return [Update(task=t, params=p, n_samples=1, steps=1, loss=0.0, arrived_at=0.0) for t, p in zip(tasks, points)]

    srv = SimpleNamespace(params=torch.zeros(2))
    srv.params = strategy.aggregate(srv, updates(POINTS))  # Krum picks p0 = (1, 1): a step, and momentum m != 0
    assert srv.params.abs().min() > 0
    m = strategy.m.clone()
    assert torch.equal(strategy.aggregate(srv, updates(POINTS[:4])), srv.params)  # 4 <= 2f + 2: no step at all
    assert torch.equal(strategy.m, m) and strategy.aggregation.skipped == 1


def build(**strategy):
    return build_strategy(validate({"strategy": strategy}).strategy)


def test_options_reach_the_mean_aggregating_strategies_and_are_refused_elsewhere():
    s = build(name="fedprox", aggregator={"rule": "median"})
    assert s.aggregation.aggregator.rule == "median" and not s.linear_aggregation
    assert build(name="fedavg").linear_aggregation and FedAvg.linear_aggregation
    assert build(name="fedyogi", privacy={"clip": 1.0}).aggregation.privacy.clip == 1.0
    assert build(name="fedbuff", aggregator={"rule": "trimmed_mean"}).aggregation.aggregator.rule == "trimmed_mean"
    assert "aggregator" not in [p.name for p in parameters(FedAvg)]  # a strategy.* key, not a strategy.params one
    for name in ("fednova", "scaffold", "ditto", "fedper", "fedstale", "fedasync"):
        with pytest.raises(ConfigError, match=f"^strategy.aggregator.rule: {name} does not aggregate a mean"):
            build(name=name, aggregator={"rule": "median"})
    with pytest.raises(ConfigError, match="^strategy.privacy.clip: DP-FedAvg .* fedbuff"):
        build(name="fedbuff", privacy={"clip": 1.0})


def test_bad_combinations_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^strategy.aggregator.byzantine: krum with f = 2 needs more than 2f \+ 2 = 6 "
                       r"updates per aggregation; strategy.clients_per_round is 6$"):
        build(name="fedavg", clients_per_round=6, aggregator={"rule": "krum", "byzantine": 2})
    with pytest.raises(ConfigError, match="strategy.params.buffer_size is 3"):
        build(name="fedbuff", params={"buffer_size": 3}, aggregator={"rule": "multi_krum"})
    with pytest.raises(ConfigError, match="^strategy.aggregator.rule: differential privacy .* not median"):
        build(name="fedavg", aggregator={"rule": "median"}, privacy={"clip": 1.0})
    with pytest.raises(ConfigError, match="^strategy.selection.name: the privacy accounting assumes"):
        build(name="fedavg", selection={"name": "oort"}, privacy={"clip": 1.0})
    with pytest.raises(ConfigError, match="strategy.privacy.clip: set the clipping norm"):
        validate({"strategy": {"privacy": {"noise_multiplier": 2.0}}})
    with pytest.raises(ConfigError, match="strategy.aggregator.trim_frac"):
        validate({"strategy": {"aggregator": {"trim_frac": 0.5}}})


def test_byzantine_clients_and_attacks_by_hand():
    start, trained = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.5, 0.0, 1.0])  # d = (0.5, -1, 0), ||d|| = 1.118
    flip = Byzantine(ByzantineConfig(fraction=0.25, attack="sign_flip", scale=4.0), n_clients=10, seed=0)
    assert len(flip.clients) == 3  # round(2.5) = 3, halves up
    attacker, honest = min(flip.clients), min(set(range(10)) - flip.clients)
    assert torch.equal(flip.returned(honest, 0, start, trained), trained)
    assert flip.returned(attacker, 0, start, trained).tolist() == [-1.0, 5.0, 1.0]  # 1 - 4 d
    rand = Byzantine(ByzantineConfig(fraction=0.25, attack="scaled_random", scale=4.0), n_clients=10, seed=0)
    assert rand.clients == flip.clients  # chosen by the seed alone
    out = rand.returned(attacker, 7, start, trained)
    assert torch.linalg.vector_norm(out - start).item() == pytest.approx(4.0 * math.sqrt(1.25), rel=1e-6)
    assert torch.equal(out, rand.returned(attacker, 7, start, trained))  # seeded by the task
    assert not torch.equal(out, rand.returned(attacker, 8, start, trained))
    assert Byzantine(ByzantineConfig(fraction=0.25), 10, seed=1).clients != flip.clients


def test_fedbuff_takes_the_rule_over_its_buffer_scaled_by_the_mean_staleness_weight():
    from hetfl.strategies import FedBuff
    from hetfl.strategies.base import Task, Update

    strategy = FedBuff(buffer_size=3, aggregator=AggregatorConfig(rule="median"))
    committed = []
    srv = SimpleNamespace(version=3, params=torch.zeros(2), commit=lambda params, updates: committed.append(params))
    # changes (1, 0), (2, 5), (9, -1) from versions 3, 3, 0: s(tau) = 1/sqrt(1 + tau) = 1, 1, 1/2
    for i, (delta, version) in enumerate([((1.0, 0.0), 3), ((2.0, 5.0), 3), ((9.0, -1.0), 0)]):
        task = Task(task_id=i, client_id=i, version=version, params=torch.zeros(2), steps=1, dispatched_at=0.0)
        strategy.receive(srv, Update(task=task, params=torch.tensor(delta), n_samples=1, steps=1, loss=0.0, arrived_at=0.0))
    # median (2, 0), times sum s / K = 2.5 / 3
    assert len(committed) == 1 and committed[0].tolist() == pytest.approx([2 * 2.5 / 3, 0.0])


def test_the_config_reference_lists_the_new_keys():
    from hetfl.config import reference

    keys = {row[0] for row in reference()}
    assert {"strategy.aggregator.rule", "strategy.privacy.clip", "strategy.privacy.noise_multiplier",
            "devices.byzantine.fraction", "devices.byzantine.attack"} <= keys


def test_a_resolved_config_with_the_privacy_defaults_reads_back():
    import yaml

    from hetfl.config import dump_config

    # config.yaml of a run lists every default (noise_multiplier 1.0, delta 1e-5) next to clip: null
    cfg = validate({})
    assert validate(yaml.safe_load(dump_config(cfg))).strategy.privacy.clip is None
    with pytest.raises(ConfigError, match=r"strategy.privacy.clip: .* \(delta alone does nothing\)"):
        validate({"strategy": {"privacy": {"delta": 1e-6}}})
