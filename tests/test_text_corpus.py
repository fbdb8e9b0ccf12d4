"""Per-client byte-level text from the Python standard library: deterministic, and the styles differ."""

import itertools

import numpy as np
import pytest

from hetfl.data.text import (
    VOCAB_SIZE,
    available_styles,
    byte_histogram,
    client_corpora,
    decode,
    encode,
    js_distance,
    lm_windows,
    style_text,
)
from hetfl.errors import DataError


def test_code_and_prose_are_always_available():
    assert {"code", "prose"} <= set(available_styles())
    assert "def " in style_text("code") and "import " in style_text("code")
    assert "The " in style_text("prose")


def test_encode_decode_round_trip_and_byte_vocabulary():
    tokens = encode("héllo\n")
    assert tokens.dtype == np.int64 and tokens.tolist() == [104, 195, 169, 108, 108, 111, 10]
    assert decode(tokens) == "héllo\n"
    assert VOCAB_SIZE == 256


def test_js_distance_by_hand():
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert js_distance(p, q) == pytest.approx(1.0)  # disjoint supports: JS = 1 bit
    assert js_distance(p, p) == 0.0
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = 1/2 KL(p||m) + 1/2 KL(q||m) in bits
    js = 0.5 * np.log2(1 / 0.75) + 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25))
    assert js_distance(p, np.array([0.5, 0.5])) == pytest.approx(np.sqrt(js))
    np.testing.assert_allclose(byte_histogram(np.array([0, 0, 255, 1])), np.r_[0.5, 0.25, np.zeros(253), 0.25])


def test_client_corpora_are_deterministic_for_a_seed_and_labelled():
    a = client_corpora(5, ("code", "prose"), seed=3, tokens_per_client=2048)
    b = client_corpora(5, ("code", "prose"), seed=3, tokens_per_client=2048)
    c = client_corpora(5, ("code", "prose"), seed=4, tokens_per_client=2048)
    assert a.styles == ["code", "prose", "code", "prose", "code"]
    assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(np.array_equal(x, y) for x, y in zip(a.tokens, c.tokens))
    for t in a.tokens:
        assert t.shape == (2048,) and t.dtype == np.int64 and 0 <= t.min() and t.max() < 256
    tokens, styles = a  # unpacks as a pair
    assert len(tokens) == len(styles) == 5


def test_clients_of_one_style_get_different_text():
    tokens, _ = client_corpora(6, ("code",), seed=0, tokens_per_client=1024)
    text = style_text("code").encode()
    starts = sorted(text.find(t.astype(np.uint8).tobytes()) for t in tokens)
    assert all(s >= 0 for s in starts)
    assert all(b - a >= 1024 for a, b in zip(starts, starts[1:]))  # disjoint windows


def test_styles_differ_more_between_than_within():
    # byte-histogram Jensen-Shannon distance between clients: on average clients of two styles are
    # further apart than clients of one style. 4 kB windows make within-style distances well above zero,
    # and code windows vary (docstrings vs code) about as much as code differs from prose, which has
    # code examples; so per pair we only ask for more than the tighter of the two styles.
    styles = available_styles()
    tokens, labels = client_corpora(6 * len(styles), styles, seed=0, tokens_per_client=4096)
    hists = [byte_histogram(t) for t in tokens]
    pairs: dict[tuple[str, str], list[float]] = {}
    for i, j in itertools.combinations(range(len(tokens)), 2):
        pairs.setdefault(tuple(sorted((labels[i], labels[j]))), []).append(js_distance(hists[i], hists[j]))
    mean = {k: float(np.mean(v)) for k, v in pairs.items()}
    for a, b in itertools.combinations(sorted(styles), 2):
        assert mean[(a, b)] > min(mean[(a, a)], mean[(b, b)]), (a, b, mean)
    within = np.mean([v for (a, b), v in mean.items() if a == b])
    between = np.mean([v for (a, b), v in mean.items() if a != b])
    assert between > 1.4 * within


def test_lm_windows_are_contiguous_slices():
    tokens = np.arange(100)
    rows = lm_windows(tokens, context=8, n=5, rng=np.random.default_rng(0))
    assert rows.shape == (5, 9)
    assert all((np.diff(r) == 1).all() for r in rows)
    with pytest.raises(ValueError, match="context"):
        lm_windows(np.arange(5), context=8, n=1, rng=np.random.default_rng(0))


def test_bad_arguments_are_refused():
    with pytest.raises(DataError, match="available"):
        style_text("klingon")
    with pytest.raises(ValueError, match="n_clients"):
        client_corpora(0)
    with pytest.raises(ValueError, match="tokens_per_client"):
        client_corpora(2, ("code",), tokens_per_client=10**9)
