"""Upload checks (hetfl.deploy.validate) and wire encodings (hetfl.compression), worked by hand."""

import json
import math

import numpy as np
import pytest
import torch

from hetfl.compression import METHODS, decode, encode
from hetfl.deploy.validate import check_update


# --------------------------------------------------------------------------- validate
def test_an_acceptable_update_passes():
    ref = torch.zeros(4)
    # ||(3, 4, 0, 0) - 0|| = 5 <= 5
    assert check_update(torch.tensor([3.0, 4.0, 0.0, 0.0]), reference=ref, max_norm=5.0) is None
    assert check_update(torch.full((4,), 1e6), reference=ref, max_norm=None) is None


def test_each_reason_is_one_line_with_the_numbers():
    ref = torch.zeros(4810)
    assert check_update(torch.zeros(10), reference=ref, max_norm=None) == "shape (10,) != expected (4810,)"
    assert check_update(torch.zeros(4810, dtype=torch.float64), reference=ref, max_norm=None) == "dtype float64 != float32"
    bad = torch.zeros(4810)
    bad[[0, 5, 9]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    assert check_update(bad, reference=ref, max_norm=None) == "3 non-finite values"
    bad[5] = bad[9] = 0.0
    assert check_update(bad, reference=ref, max_norm=None) == "1 non-finite value"
    # the norm is of params - reference: (3, 4) - (1, 1) = (2, 3), sqrt(13) = 3.6056 > 3
    assert check_update(torch.tensor([3.0, 4.0]), reference=torch.ones(2), max_norm=3.0) == "update norm 3.6 > bound 3.0"
    # 812.3 along one axis
    far = torch.zeros(4810)
    far[7] = 812.3
    assert check_update(far, reference=ref, max_norm=100.0) == "update norm 812.3 > bound 100.0"
    # a norm that rounds to the bound shows more digits: 100.04 > 100.0
    assert check_update(torch.tensor([100.04]), reference=torch.zeros(1), max_norm=100.0) == "update norm 100.04 > bound 100.0"


def test_shape_is_checked_before_values_and_a_bad_bound_is_refused():
    ref = torch.zeros(3)
    assert check_update(torch.full((2,), float("nan")), reference=ref, max_norm=1.0).startswith("shape")
    with pytest.raises(ValueError, match="max_norm"):
        check_update(ref, reference=ref, max_norm=0.0)


# --------------------------------------------------------------------------- compress
def test_none_round_trips_exactly_with_json_meta():
    for dtype in (torch.float32, torch.float64, torch.float16):
        t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
        data, meta = encode(t)
        assert len(data) == 15 * t.element_size()  # 15 values of 4, 8, 2 bytes
        back = decode(data, json.loads(json.dumps(meta)))
        assert back.dtype == dtype and back.shape == (3, 5) and torch.equal(back, t)
    assert METHODS == ("none", "float16", "topk", "qsgd")


def test_float16_halves_the_bytes_within_its_error_bound():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 10
    t[:3] = torch.tensor([1e-7, 0.0, -3.0e-6])  # subnormal in float16
    data, meta = encode(t, "float16")
    assert len(data) == 2000  # 1000 values * 2 bytes, half of float32's 4000
    back = decode(data, meta)
    assert back.dtype == torch.float32 and meta["k"] == 1000
    # round to nearest with 10 fraction bits: |error| <= 2^-11 |x| for normal values, <= 2^-25 for subnormals
    assert bool(((back - t).abs() <= t.abs() * 2**-11 + 2**-25).all())
    assert float((back - t).abs().max()) > 0  # it is lossy
    # 1.5 and -0.25 are exact in float16
    assert decode(*encode(torch.tensor([1.5, -0.25]), "float16")).tolist() == [1.5, -0.25]


def test_float16_refuses_values_beyond_its_range():
    with pytest.raises(ValueError, match="2 values exceed float16's range"):
        encode(torch.tensor([1.0, 7e4, -1e5]), "float16")


def test_topk_keeps_exactly_the_largest_magnitudes():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, 0.05, -1.0, 0.4])
    # ratio 0.25 of 10 entries: k = ceil(2.5) = 3 -> |-5| at 1, |4| at 6, |2| at 3
    data, meta = encode(t, "topk", topk_ratio=0.25)
    assert meta == {"method": "topk", "dtype": "float32", "shape": [10], "k": 3}
    assert len(data) == 3 * 4 + 3 * 4  # three int32 indices + three float32 values = 24 bytes
    assert np.frombuffer(data[:12], dtype="<i4").tolist() == [1, 3, 6]  # ascending
    expected = torch.zeros(10)
    expected[[1, 3, 6]] = torch.tensor([-5.0, 2.0, 4.0])
    assert torch.equal(decode(data, meta), expected)


def test_topk_ties_go_to_the_lower_index_and_shapes_survive():
    t = torch.tensor([[1.0, -1.0], [1.0, 0.5]])
    # k = ceil(0.5 * 4) = 2; three entries of magnitude 1: indices 0 and 1 win
    back = decode(*encode(t, "topk", topk_ratio=0.5))
    assert back.tolist() == [[1.0, -1.0], [0.0, 0.0]]
    # ratio 1 keeps everything (8 bytes per entry), and the smallest ratio keeps one entry
    assert torch.equal(decode(*encode(t, "topk", topk_ratio=1.0)), t)
    assert math.isclose(float(decode(*encode(t, "topk", topk_ratio=1e-9)).abs().sum()), 1.0)


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="method 'zip' is unknown"):
        encode(torch.zeros(2), "zip")
    with pytest.raises(ValueError, match="topk_ratio"):
        encode(torch.zeros(2), "topk", topk_ratio=0.0)
    with pytest.raises(ValueError, match="dtype int64"):
        encode(torch.zeros(2, dtype=torch.int64))
    data, meta = encode(torch.zeros(4))
    with pytest.raises(ValueError, match="15 bytes do not hold"):
        decode(data[:15], meta)
    data, meta = encode(torch.arange(4.0), "topk", topk_ratio=0.5)
    with pytest.raises(ValueError, match="index is outside"):
        decode(np.array([0, 9], dtype="<i4").tobytes() + data[8:], meta)
