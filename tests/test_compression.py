"""Update compression (hetfl.compression, strategy.compression), worked by hand: top-k with error feedback, QSGD,
float16, and the bytes a simulated round charges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetfl.compression import RESIDUAL, Compression, decode, encode, nbytes
from hetfl.config import CompressionConfig, StrategyConfig, validate
from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, build_strategy
from hetfl.strategies.base import ClientResult, Task

from conftest import make_simulator, profile, run_rounds


def _task(start: torch.Tensor) -> Task:
    return Task(task_id=0, client_id=0, version=0, params=start, steps=1, dispatched_at=0.0)


def test_topk_with_error_feedback_carries_the_residual_over_two_rounds():
    # k = ceil(0.4 * 5) = 2. Round 1: delta = [0.5, -3, 1, 0.2, 2] -> send -3 (index 1) and 2 (index 4);
    # residual e = [0.5, 0, 1, 0.2, 0]. Round 2: delta = [0.6, 1, -0.1, 0.1, 0] plus e = [1.1, 1, 0.9, 0.3, 0]
    # -> send 1.1 (index 0) and 1 (index 1); e = [0, 0, 0.9, 0.3, 0]. Without feedback round 2 sends 1 and 0.6.
    comp = Compression(CompressionConfig(kind="topk", ratio=0.4))
    start, state = torch.zeros(5), {}
    first = comp.apply(_task(start), ClientResult(torch.tensor([0.5, -3.0, 1.0, 0.2, 2.0]), 1, 0.0), state, seed=0)
    assert first.params.tolist() == [0.0, -3.0, 0.0, 0.0, 2.0]
    assert state[RESIDUAL].tolist() == pytest.approx([0.5, 0.0, 1.0, 0.2, 0.0])
    start = torch.ones(5)  # the next task starts from another model: only the change counts
    second = comp.apply(_task(start), ClientResult(start + torch.tensor([0.6, 1.0, -0.1, 0.1, 0.0]), 1, 0.0),
                        state, seed=1)
    assert (second.params - start).tolist() == pytest.approx([1.1, 1.0, 0.0, 0.0, 0.0])
    assert state[RESIDUAL].tolist() == pytest.approx([0.0, 0.0, 0.9, 0.3, 0.0])
    plain = Compression(CompressionConfig(kind="topk", ratio=0.4, error_feedback=False))
    state = {}
    again = plain.apply(_task(start), ClientResult(start + torch.tensor([0.6, 1.0, -0.1, 0.1, 0.0]), 1, 0.0), state, 1)
    assert (again.params - start).tolist() == pytest.approx([0.6, 1.0, 0.0, 0.0, 0.0]) and state == {}


def test_qsgd_levels_bytes_and_unbiasedness():
    # v = [3, -4]: ||v|| = 5, s = 4. |v_i| s / ||v|| = 2.4 and 3.2: entry 0 is 5 * 2/4 = 2.5 with probability 0.6,
    # 5 * 3/4 = 3.75 with 0.4 (mean 3); entry 1 is -3.75 with 0.8, -5 with 0.2 (mean -4).
    # Bytes: one bucket's float32 norm, then 2 entries of a sign bit and ceil(log2 5) = 3 level bits: 4 + 1 = 5.
    v = torch.tensor([3.0, -4.0])
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(4000):
        data, meta = encode(v, "qsgd", levels=4, rng=rng)
        assert len(data) == 5 == nbytes("qsgd", 2, levels=4)
        draws.append(decode(data, meta))
    draws = torch.stack(draws).double()
    assert set(draws[:, 0].tolist()) == {2.5, 3.75} and set(draws[:, 1].tolist()) == {-3.75, -5.0}
    assert float((draws[:, 0] == 3.75).double().mean()) == pytest.approx(0.4, abs=0.03)
    assert draws.mean(0).tolist() == pytest.approx([3.0, -4.0], abs=0.03)
    # a larger vector in 3 buckets of 4 (the last short): 3 norms and 10 x (1 + 2) bits for s = 3 -> 12 + 4 bytes
    w = torch.randn(10, generator=torch.Generator().manual_seed(1))
    data, meta = encode(w, "qsgd", levels=3, bucket=4, rng=np.random.default_rng(1))
    assert len(data) == 16 == nbytes("qsgd", 10, levels=3, bucket=4)
    mean = torch.stack([decode(*encode(w, "qsgd", levels=3, bucket=4, rng=rng)) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, w, atol=0.06)
    assert torch.equal(decode(*encode(torch.zeros(3), "qsgd", rng=rng)), torch.zeros(3))  # a zero bucket stays zero


def test_float16_rounds_to_nearest_even_and_charges_two_bytes_an_entry():
    # float16 steps are 2^-10 in [1, 2): 1 + 2^-11 is halfway between 1 and 1 + 2^-10 and goes to the even 1;
    # 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9 and goes to the even 1 + 2^-9.
    comp = Compression(CompressionConfig(kind="float16", error_feedback=False))
    start = torch.zeros(3, dtype=torch.float64)
    delta = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -0.25], dtype=torch.float64)
    sent = comp.apply(_task(start), ClientResult(delta, 1, 0.0), {}, 0).params
    assert sent.tolist() == [1.0, 1 + 2**-9, -0.25]
    assert comp.upload_bytes(torch.zeros(1000)) == 2000


def test_a_simulated_round_charges_and_times_the_codecs_bytes():
    # logreg 4 -> 3: 15 parameters (60 bytes down). topk 0.2: k = 3, 24 bytes up at 1e5 B/s; compute 2 x 1e6 FLOPs
    # at 1e6 FLOP/s. The round ends at 60/1e5 + 2 + 24/1e5, and its two uploads count 48 bytes.
    strategy = build_strategy(StrategyConfig(name="fedavg", clients_per_round=2,
                                             compression=CompressionConfig(kind="topk", ratio=0.2)))
    sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
    start = sim.params
    run_rounds(sim, 1)
    assert sim.now == pytest.approx(60 / 1e5 + 2.0 + 24 / 1e5)
    assert sim.counters.bytes_up == 48
    step = sim.params - start
    assert 0 < int((step != 0).sum()) <= 6  # the mean of two changes of 3 entries each
    for client in (0, 1):  # each client kept what it did not send: 12 entries, none larger than what it sent
        residual = sim.state.client_state.load(client)[RESIDUAL]
        assert int((residual != 0).sum()) == 12
    uncompressed = make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)])
    run_rounds(uncompressed, 1)
    assert uncompressed.counters.bytes_up == 120 and uncompressed.now > sim.now


def test_the_config_section_and_its_refusals(tmp_path):
    cfg = validate({"strategy": {"name": "fedavg", "compression": {"kind": "qsgd", "levels": 8}}})
    strategy = build_strategy(cfg.strategy)
    assert strategy.compression is not None and strategy.compression.levels == 8
    assert build_strategy(validate({}).strategy).compression is None
    with pytest.raises(ConfigError, match="strategy.compression.kind: scaffold uploads more than a change"):
        build_strategy(StrategyConfig(name="scaffold", compression=CompressionConfig(kind="float16")))
    with pytest.raises(ConfigError, match="strategy.compression.kind: ditto does not upload a change of one global"):
        build_strategy(StrategyConfig(name="ditto", compression=CompressionConfig(kind="topk")))
    with pytest.raises(ConfigError, match="compression.kind"):
        validate({"strategy": {"compression": {"kind": "zip"}}})
