"""Secure aggregation by pairwise masking (hetfl.deploy.secagg): masks cancel in the sum, and only there."""

import pickle

import numpy as np
import pytest
from scipy import stats

from hetfl.deploy.secagg import MaskingClient, SecureCohort


def cohort(n, seed=0):
    clients = {i: MaskingClient(seed=seed + i) for i in range(n)}
    return clients, {i: c.public_key for i, c in clients.items()}


def test_two_members_by_hand():
    # scale 10: q(0.34) = round(3.4) = 3, q(-0.26) = round(-2.6) = -3, q(5.0) = q(clip 1) = 10, q(-0.05) = round(-0.5) = -0 (even)
    clients, peers = cohort(2)
    x0, x1 = np.array([0.34, 5.0]), np.array([-0.26, -0.05])
    y0 = clients[0].mask(x0, peers, 0, round_id=7, clip=1.0, scale=10.0)
    y1 = clients[1].mask(x1, peers, 1, round_id=7, clip=1.0, scale=10.0)
    m = clients[0]._pair_mask(peers[1], 0, 1, 7, 2)
    # member 0 < 1 adds m, member 1 subtracts it (mod 2^32)
    assert y0.tolist() == ((np.array([3, 10]) + m.astype(np.int64)) % 2**32).tolist()
    assert y1.tolist() == ((np.array([-3, 0]) - m.astype(np.int64)) % 2**32).tolist()
    sc = SecureCohort([0, 1], 2, scale=10.0)
    sc.add(0, y0)
    sc.add(1, y1)
    assert sc.complete and sc.needs_shares() == {}
    assert sc.total().tolist() == [0.0, 1.0]  # (3 - 3) / 10, (10 + 0) / 10


def test_both_sides_derive_the_same_mask_and_rounds_differ():
    clients, peers = cohort(2)
    m01 = clients[0]._pair_mask(peers[1], 0, 1, 3, 16)
    assert np.array_equal(m01, clients[1]._pair_mask(peers[0], 1, 0, 3, 16))
    assert not np.array_equal(m01, clients[0]._pair_mask(peers[1], 0, 1, 4, 16))


@pytest.mark.parametrize("n", [3, 4, 5])
def test_total_is_the_sum_of_clipped_vectors(n):
    rng = np.random.default_rng(n)
    clients, peers = cohort(n)
    clip, scale, d = 2.0, 2.0**16, 50
    xs = [rng.normal(0, 1.5, d) for _ in range(n)]  # some coordinates beyond +-2 are clipped
    sc = SecureCohort(list(range(n)), d, scale=scale, clip=clip)
    for i in range(n):
        sc.add(i, clients[i].mask(xs[i], peers, i, round_id=1, clip=clip, scale=scale))
    assert sc.complete
    expected = sum(np.clip(x, -clip, clip) for x in xs)
    # each member rounds to the nearest 1/scale: off by at most 1/(2 scale) each
    assert np.abs(sc.total() - expected).max() <= n / (2 * scale)
    assert np.abs(sc.total() - sum(xs)).max() > 0.1  # clipping did happen


def test_shares_recover_the_survivors_exact_sum_after_dropouts():
    n, d, clip, scale = 5, 30, 1.0, 1000.0
    rng = np.random.default_rng(0)
    clients, peers = cohort(n, seed=10)
    xs = [rng.uniform(-1, 1, d) for _ in range(n)]
    masked = {i: clients[i].mask(xs[i], peers, i, round_id=2, clip=clip, scale=scale) for i in range(n)}
    sc = SecureCohort(list(range(n)), d, scale=scale)
    for i in (0, 2, 4):
        sc.add(i, masked[i])
    sc.fail(1)  # masked, never delivered
    assert not sc.complete
    sc.fail(3)
    assert sc.needs_shares() == {0: [1, 3], 2: [1, 3], 4: [1, 3]}
    assert not sc.complete
    for i, dropped in sc.needs_shares().items():
        sc.add_share(i, clients[i].unmask_share(dropped, peers, i, 2, d))
    assert sc.complete and sc.survivors == [0, 2, 4]
    # exact: the total is the sum of the survivors' fixed-point vectors, divided by scale
    fixed = sum(np.rint(xs[i] * scale).astype(np.int64) for i in (0, 2, 4))
    assert np.array_equal(sc.total(), fixed / scale)
    # the failed member's masked vector is no longer accepted: its masks were revealed
    with pytest.raises(ValueError, match="member 1 was declared failed"):
        sc.add(1, masked[1])


def test_a_share_computed_for_some_failures_leaves_later_ones_outstanding():
    clients, peers = cohort(4)
    sc = SecureCohort([0, 1, 2, 3], 8, scale=10.0)
    for i in (0, 1):
        sc.add(i, clients[i].mask(np.ones(8), peers, i, 0, clip=1.0, scale=10.0))
    sc.fail(2)
    share = clients[0].unmask_share([2], peers, 0, 0, 8)
    sc.fail(3)  # fails while member 0 computes its share for [2]
    sc.add_share(0, share, dropped=[2])
    assert sc.needs_shares() == {0: [3], 1: [2, 3]}
    sc.add_share(0, clients[0].unmask_share([3], peers, 0, 0, 8))
    sc.add_share(1, clients[1].unmask_share([2, 3], peers, 1, 0, 8))
    assert sc.total().tolist() == [2.0] * 8  # 10 + 10 fixed points, / 10


def test_a_single_masked_vector_looks_uniform():
    n, d, scale = 4, 4000, 2.0**20
    clients, peers = cohort(n)
    x = np.full(d, 0.5)  # q(x) = 2^19 everywhere: far from uniform
    y = clients[1].mask(x, peers, 1, round_id=0, clip=1.0, scale=scale)
    # distance to the true fixed point, on the ring Z / 2^32: a uniform difference is mostly ~2^30 away
    diff = (y.astype(np.int64) - 2**19) % 2**32
    ring = np.minimum(diff, 2**32 - diff)
    assert np.median(ring) > 2**29 and (ring < 2**20).sum() < 5  # expected 4000 * 2^21 / 2^32 = 0.002
    # and the values themselves pass a test of uniformity on [0, 2^32)
    assert stats.kstest(y / 2**32, "uniform").pvalue > 1e-3
    # a member with no peers would send q(x) in the clear: the protection is all in the pairwise masks
    alone = MaskingClient(seed=99)
    assert alone.mask(x, {}, 0, 0, clip=1.0, scale=scale).tolist() == [2**19] * d


def test_fixed_point_overflow_is_refused_with_the_numbers():
    # 4 members * clip 1 * scale 2^29 = 2^31: the sum could reach +2^31, which int32 cannot hold
    with pytest.raises(ValueError, match=r"4 members \* round\(clip 1 \* scale 5.36871e\+08\) = 2147483648 >= 2\^31"):
        SecureCohort([0, 1, 2, 3], 5, scale=2.0**29, clip=1.0)
    SecureCohort([0, 1, 2], 5, scale=2.0**29, clip=1.0)  # 3 * 2^29 < 2^31
    clients, peers = cohort(4)
    with pytest.raises(ValueError, match="fixed point could overflow"):
        clients[0].mask(np.zeros(5), peers, 0, 0, clip=1.0, scale=2.0**29)


def test_seeds_make_keys_and_masks_reproducible():
    a, b = MaskingClient(seed=5), MaskingClient(seed=5)
    assert a.public_key == b.public_key and len(a.public_key) == 32
    assert MaskingClient(seed=6).public_key != a.public_key
    assert MaskingClient().public_key != MaskingClient().public_key  # drawn from the OS
    peers = {0: a.public_key, 1: MaskingClient(seed=1).public_key}
    v = np.linspace(-1, 1, 10)
    ya = a.mask(v, peers, 0, 3, clip=1.0, scale=100.0)
    assert np.array_equal(ya, b.mask(v, peers, 0, 3, clip=1.0, scale=100.0))
    assert np.array_equal(ya, pickle.loads(pickle.dumps(a)).mask(v, peers, 0, 3, clip=1.0, scale=100.0))


def test_misuse_is_refused():
    clients, peers = cohort(3)
    with pytest.raises(ValueError, match=r"peers\[0\] is not this client's public key"):
        clients[1].mask(np.zeros(2), peers, 0, 0, clip=1.0, scale=1.0)
    with pytest.raises(ValueError, match="2 non-finite values"):
        clients[0].mask(np.array([np.nan, np.inf]), peers, 0, 0, clip=1.0, scale=1.0)
    sc = SecureCohort([0, 1, 2], 2, scale=1.0)
    with pytest.raises(ValueError, match="expected uint32"):
        sc.add(0, np.zeros(2, dtype=np.int64))
    sc.add(0, clients[0].mask(np.zeros(2), peers, 0, 0, clip=1.0, scale=1.0))
    with pytest.raises(ValueError, match="already sent"):
        sc.add(0, np.zeros(2, dtype=np.uint32))
    with pytest.raises(ValueError, match="7 is not a member"):
        sc.fail(7)
    with pytest.raises(ValueError, match="cohort incomplete: waiting for members \\[1, 2\\]"):
        sc.total()
    with pytest.raises(ValueError, match="not needed"):
        sc.add_share(0, np.zeros(2, dtype=np.uint32))
