"""Per-device bandits (UCB1, EXP3), reward scaling and FedSpine's reward: hand steps and seeded convergence."""

import math

import numpy as np
import pytest

from hetfl.strategies.bandit import EXP3, UCB1, RunningScaler, fedspine_reward, scale_reward

ARMS = [(0.0, 8), (0.25, 8), (0.5, 4), (0.75, 2)]  # (pruning ratio, LoRA rank)
MEANS = [0.2, 0.5, 0.8, 0.4]  # Bernoulli success probabilities; the best arm is 2


def play(bandit, pulls: int, seed: int, feasible=None, means=MEANS) -> list[int]:
    rng = np.random.default_rng(seed)
    env = np.random.default_rng(seed + 1000)
    picks = []
    for _ in range(pulls):
        a = bandit.select(rng, feasible=feasible)
        bandit.update(a, float(env.random() < means[a]))
        picks.append(a)
    return picks


def test_ucb1_tries_every_arm_once_first_in_order():
    ucb = UCB1(arms=ARMS)
    rng = np.random.default_rng(0)
    firsts = []
    for reward in (1.0, 0.0, 0.5, 0.25):
        a = ucb.select(rng)
        firsts.append(a)
        ucb.update(a, reward)
    assert firsts == [0, 1, 2, 3]
    assert ucb.history == [(1, 0, 1.0), (2, 1, 0.0), (3, 2, 0.5), (4, 3, 0.25)]
    # t = 4, every n_a = 1: index = mean + sqrt(2 ln 4) -> arm 0 (mean 1) is next
    bonus = math.sqrt(2 * math.log(4))
    np.testing.assert_allclose(ucb.index(), [1 + bonus, bonus, 0.5 + bonus, 0.25 + bonus])
    assert ucb.select(rng) == 0


def test_ucb1_index_of_a_hand_case_with_unequal_counts():
    # arm 0: rewards 1, 0 (mean 0.5, n 2); arm 1: reward 0.4 (n 1); t = 3, c = 1
    ucb = UCB1(arms=["a", "b"])
    for arm, r in [(0, 1.0), (1, 0.4), (0, 0.0)]:
        ucb.update(arm, r)
    idx = ucb.index()
    assert idx[0] == pytest.approx(0.5 + math.sqrt(2 * math.log(3) / 2))  # 1.548
    assert idx[1] == pytest.approx(0.4 + math.sqrt(2 * math.log(3) / 1))  # 1.882
    assert ucb.select(np.random.default_rng(0)) == 1
    half = UCB1(arms=["a", "b"], c=0.5)
    for arm, r in [(0, 1.0), (1, 0.4), (0, 0.0)]:
        half.update(arm, r)
    assert half.index()[0] == pytest.approx(0.5 + 0.5 * math.sqrt(math.log(3)))


def test_ucb1_finds_the_best_bernoulli_arm():
    picks = play(UCB1(arms=ARMS), 1000, seed=0)
    assert picks[-200:].count(2) >= 0.8 * 200


def test_exp3_first_step_by_hand():
    # K = 2, gamma = 0.5: p = (0.5, 0.5); reward 1 on the pulled arm a -> x_hat = 1 / 0.5 = 2,
    # log w_a += gamma * x_hat / K = 0.5, so p_a = (1 - 0.5) * e^0.5 / (e^0.5 + 1) + 0.5 / 2
    exp3 = EXP3(arms=["x", "y"], gamma=0.5)
    np.testing.assert_allclose(exp3.probabilities(), [0.5, 0.5])
    a = exp3.select(np.random.default_rng(3))
    exp3.update(a, 1.0)
    p = exp3.probabilities()
    expected = 0.5 * math.exp(0.5) / (math.exp(0.5) + 1) + 0.25
    assert p[a] == pytest.approx(expected) and p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        exp3.update(exp3.select(np.random.default_rng(0)), 2.0)


def test_exp3_finds_the_best_bernoulli_arm_looser():
    picks = play(EXP3(arms=ARMS, gamma=0.1), 1000, seed=0)
    assert picks[-200:].count(2) >= 0.6 * 200
    # exploration keeps every arm's probability at least gamma / K
    assert picks.count(0) > 0


def test_exp3_on_gaussian_rewards_scaled_into_0_1():
    rng_env = np.random.default_rng(7)
    means = [1.0, 3.0, 2.0]  # best arm 1; raw rewards outside [0, 1]
    exp3, rng = EXP3(arms=range(3), gamma=0.1), np.random.default_rng(8)
    picks = []
    for _ in range(1000):
        a = exp3.select(rng)
        exp3.update(a, scale_reward(rng_env.normal(means[a], 0.5), low=0.0, high=4.0))
        picks.append(a)
    assert picks[-200:].count(1) >= 0.6 * 200


@pytest.mark.parametrize("make", [lambda: UCB1(arms=ARMS), lambda: EXP3(arms=ARMS, gamma=0.1)])
def test_an_infeasible_arm_is_never_selected(make):
    feasible = np.array([True, True, False, True])  # the best arm does not fit this device
    picks = play(make(), 600, seed=1, feasible=feasible)
    assert 2 not in picks
    assert max(set(picks), key=picks[-200:].count) == 1  # best of the feasible arms (mean 0.5)
    with pytest.raises(ValueError, match="feasible"):
        make().select(np.random.default_rng(0), feasible=np.zeros(4, dtype=bool))


def test_exp3_refuses_an_update_for_an_arm_it_could_not_have_picked():
    exp3 = EXP3(arms=ARMS)
    exp3.select(np.random.default_rng(0), feasible=[True, False, True, True])
    with pytest.raises(IndexError, match="infeasible"):
        exp3.update(1, 0.5)
    assert exp3.history == []


def test_bandits_are_deterministic_for_a_seed():
    assert play(EXP3(arms=ARMS, gamma=0.1), 300, seed=5) == play(EXP3(arms=ARMS, gamma=0.1), 300, seed=5)
    assert play(UCB1(arms=ARMS), 300, seed=5) == play(UCB1(arms=ARMS), 300, seed=5)


def test_constructor_validation():
    with pytest.raises(ValueError, match="arms"):
        UCB1(arms=[])
    with pytest.raises(ValueError, match="gamma"):
        EXP3(arms=ARMS, gamma=0.0)
    with pytest.raises(ValueError, match="c must"):
        UCB1(arms=ARMS, c=-1)
    with pytest.raises(IndexError):
        UCB1(arms=ARMS).update(7, 0.5)


def test_scaling_helpers():
    assert scale_reward(5.0, low=0.0, high=10.0) == 0.5
    assert scale_reward(-3.0, low=0.0, high=10.0) == 0.0 and scale_reward(30.0, low=0.0, high=10.0) == 1.0
    s = RunningScaler()
    assert s(2.0) == 0.5  # one value seen: no range yet
    assert s(4.0) == 1.0 and s(3.0) == 0.5 and s(1.0) == 0.0


def test_fedspine_reward_by_hand():
    # rate = gain / time = 0.5 per s; reward = 1 - exp(-rate / rate_scale) with rate_scale 0.5 -> 1 - 1/e
    assert fedspine_reward(1.0, 2.0, rate_scale=0.5) == pytest.approx(1 - math.exp(-1))
    assert fedspine_reward(-0.2, 2.0) == 0.0  # the loss went up
    assert fedspine_reward(1.0, 5.0, deadline_s=4.0) == 0.0  # too late to count
    # time_exponent 0: the gain alone; a faster device earns more for the same gain otherwise
    assert fedspine_reward(1.0, 100.0, rate_scale=1.0, time_exponent=0.0) == pytest.approx(1 - math.exp(-1))
    assert fedspine_reward(1.0, 1.0) > fedspine_reward(1.0, 2.0) > 0
    assert 0.0 <= fedspine_reward(1e9, 1e-9) <= 1.0
    with pytest.raises(ValueError, match="sim_time_s"):
        fedspine_reward(1.0, 0.0)
