"""Secure aggregation by pairwise masking: the server learns the sum of the clients' vectors, not each one.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(ePrint 2017/281), the pairwise masks and their removal after dropouts; without its self-masks and its
Shamir secret sharing (see "Trust assumptions" below).

The rule. Every member i of a cohort has an X25519 key pair; the server relays all public keys. For each
pair i < j both sides derive the same secret s_ij = X25519(sk_i, pk_j) = X25519(sk_j, pk_i), and from it,
per round, a mask m_ij in (Z / 2^32)^d: HKDF-SHA256 (info: a label, round_id, i, j) gives a 256-bit AES
key, and AES-256-CTR over zeros gives the 4 d bytes of m_ij (a cryptographic pseudo-random generator).
Member i sends

    y_i = q(x_i) + sum_{j > i} m_ij - sum_{j < i} m_ji   (mod 2^32),   q(x) = round(clip(x, -C, C) * scale)

so every mask is added once and subtracted once, and sum_i y_i = sum_i q(x_i) (mod 2^32). The server reads
that sum as signed 32-bit integers and divides by scale; it is exact as long as |sum_i q(x_i)| < 2^31,
guaranteed when n * round(C * scale) < 2^31 (checked). Each q(x_i) is off by at most 1 / (2 scale) per
coordinate (rounding), so the total is within n / (2 scale) of the sum of the clipped vectors.

Dropouts. If member j fails after the others masked, the masks m_ij of the survivors i with j do not
cancel. Each survivor i then reveals the net mask it added for the failed members,
sum_{j failed} +-m_ij (:meth:`MaskingClient.unmask_share`), and the server subtracts these shares.

Trust assumptions (what leaving out self-masks and secret sharing costs). The server learns only the sum
of the survivors' vectors if

- it is honest about dropouts: it declares failed only members whose masked vector it has not received,
  and never accepts one afterwards (:class:`SecureCohort` refuses it). Once the survivors revealed their
  masks with j, j's own masked vector would unmask to q(x_j) alone. Bonawitz et al. prevent a lying server
  with a self-mask b_i per client, shared by Shamir's scheme so the server can learn either b_i or the
  pairwise secrets of i, never both; here the server is trusted (honest but curious) on this point;
- it relays public keys faithfully: keys are not authenticated, so a server that substitutes its own
  keys (man in the middle) can unmask everyone. Bonawitz et al.'s active-security variant signs keys
  under a PKI; this module does not;
- every survivor answers the unmasking request: without secret sharing nobody else can reconstruct a
  survivor's masks, so if a survivor fails during unmasking the round cannot be decoded and is discarded.

Clients colluding with the server learn their own masks, hence nothing about two or more honest survivors
but the sum of their vectors. Masks hide individual vectors from an eavesdropper only with TLS on top.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

MODULUS = 2**32
_INFO = b"hetfl secagg pairwise mask v1"


def fixed_point_bound(n_members: int, clip: float, scale: float) -> None:
    """Raise ValueError unless n_members vectors clipped to +-clip, times scale, sum within signed int32."""
    if not clip > 0 or not scale > 0:
        raise ValueError(f"clip and scale must be positive (got clip={clip}, scale={scale})")
    largest = float(np.rint(clip * scale))  # the largest |q(x)| of one coordinate
    if n_members * largest >= 2**31:
        raise ValueError(
            f"fixed point could overflow: {n_members} members * round(clip {clip:g} * scale {scale:g}) = "
            f"{n_members * largest:.0f} >= 2^31 = 2147483648; lower scale or clip"
        )


class MaskingClient:
    """One member's side of pairwise masking (see the module docstring).

    Parameters
    ----------
    seed : int or None
        Derive the X25519 private key from this integer, for reproducible tests only (anyone who knows the
        seed knows the key); None (the default) draws it from the operating system's random source.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            self._key = X25519PrivateKey.generate()
        else:
            raw = hashlib.sha256(b"hetfl secagg test key" + struct.pack("<q", seed)).digest()
            self._key = X25519PrivateKey.from_private_bytes(raw)
        self.public_key: bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def __getstate__(self) -> dict:
        return {"private": self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())}

    def __setstate__(self, state: dict) -> None:
        self._key = X25519PrivateKey.from_private_bytes(state["private"])
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def mask(
        self, vector: np.ndarray, peers: dict[int, bytes], my_id: int, round_id: int, *, clip: float, scale: float
    ) -> np.ndarray:
        """y_i = q(vector) + sum_{j > i} m_ij - sum_{j < i} m_ji (mod 2^32), as uint32.

        ``peers`` maps every cohort member's id to its 32-byte public key (this member's own entry, if
        present, is skipped); ``clip`` bounds each coordinate, ``scale`` is the fixed-point factor.
        """
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        fixed_point_bound(len(set(peers) | {my_id}), clip, scale)
        if not np.isfinite(vector).all():
            raise ValueError(f"{int((~np.isfinite(vector)).sum())} non-finite values in the vector to mask")
        self._check_own(peers, my_id)
        q = np.rint(np.clip(vector, -clip, clip) * scale).astype(np.int64)
        out = (q % MODULUS).astype(np.uint32)
        out += self._net_mask([j for j in peers if j != my_id], peers, my_id, round_id, vector.size)
        return out

    def unmask_share(
        self, dropped: list[int], peers: dict[int, bytes], my_id: int, round_id: int, numel: int
    ) -> np.ndarray:
        """The net mask this member added for its pairs with ``dropped``: sum_{j in dropped} +-m_ij, as uint32.

        The server subtracts it from the sum of the masked vectors (:meth:`SecureCohort.add_share`).
        """
        if my_id in dropped:
            raise ValueError(f"member {my_id} cannot reveal masks for itself")
        unknown = [j for j in dropped if j not in peers]
        if unknown:
            raise ValueError(f"dropped member {unknown[0]} has no public key in peers")
        self._check_own(peers, my_id)
        return self._net_mask(sorted(set(dropped)), peers, my_id, round_id, numel)

    def _check_own(self, peers: dict[int, bytes], my_id: int) -> None:
        if my_id in peers and peers[my_id] != self.public_key:
            raise ValueError(f"peers[{my_id}] is not this client's public key")

    def _net_mask(self, others: list[int], peers: dict[int, bytes], my_id: int, round_id: int, numel: int) -> np.ndarray:
        total = np.zeros(numel, dtype=np.uint32)
        for j in others:
            m = self._pair_mask(peers[j], my_id, j, round_id, numel)
            if my_id < j:
                total += m
            else:
                total -= m
        return total

    def _pair_mask(self, peer_key: bytes, i: int, j: int, round_id: int, numel: int) -> np.ndarray:
        """m_ij for the unordered pair {i, j} in round ``round_id``: both members compute the same array."""
        if len(peer_key) != 32:
            raise ValueError(f"public key of member {j} has {len(peer_key)} bytes, not 32")
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_key))
        info = _INFO + struct.pack("<qqq", round_id, min(i, j), max(i, j))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()  # a fresh key per pair and round
        return np.frombuffer(stream.update(bytes(4 * numel)), dtype="<u4").astype(np.uint32)


class SecureCohort:
    """The server's side of one round of secure aggregation.

    Parameters
    ----------
    members : list of int
        The cohort: every client whose public key was in the ``peers`` each member masked with.
    numel : int
        Length of the vectors.
    scale : float
        The fixed-point factor the members used.
    clip : float or None
        The clip the members used; when given, refuse at once a cohort whose fixed-point sum could overflow.

    The server ``add``\\ s each masked vector that arrives and ``fail``\\ s each member that will not send
    one; once all are accounted for, ``needs_shares`` says which survivor must reveal the masks it shares
    with which failed members, ``add_share`` takes the answers, and when ``complete``, ``total`` is the
    sum of the survivors' clipped vectors.
    """

    def __init__(self, members: list[int], numel: int, *, scale: float, clip: float | None = None) -> None:
        if len(set(members)) != len(members) or not members:
            raise ValueError("members must be a non-empty list of distinct ids")
        if numel < 1:
            raise ValueError(f"numel must be positive, got {numel}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if clip is not None:
            fixed_point_bound(len(members), clip, scale)
        self.members = sorted(members)
        self.numel = numel
        self.scale = scale
        self._sum = np.zeros(numel, dtype=np.uint32)
        self._arrived: set[int] = set()
        self._failed: set[int] = set()
        self._revealed: dict[int, set[int]] = {}  # survivor -> failed members whose masks it revealed

    @property
    def survivors(self) -> list[int]:
        """Members whose masked vector is in the sum."""
        return sorted(self._arrived)

    @property
    def failed(self) -> list[int]:
        return sorted(self._failed)

    def add(self, member: int, masked: np.ndarray) -> None:
        """Add ``member``'s masked vector (uint32, length ``numel``) to the sum."""
        self._check_pending(member)
        masked = np.asarray(masked)
        if masked.dtype != np.uint32 or masked.shape != (self.numel,):
            raise ValueError(f"masked vector of member {member}: {masked.dtype} {masked.shape}, expected uint32 ({self.numel},)")
        self._sum += masked
        self._arrived.add(member)
        self._revealed[member] = set()

    def fail(self, member: int) -> None:
        """``member`` will not send its masked vector (a later one is refused: see the trust assumptions)."""
        self._check_pending(member)
        self._failed.add(member)

    def needs_shares(self) -> dict[int, list[int]]:
        """Each survivor -> the failed members whose masks it has yet to reveal; empty when nobody failed."""
        return {i: sorted(self._failed - self._revealed[i]) for i in sorted(self._arrived) if self._failed - self._revealed[i]}

    def add_share(self, member: int, share: np.ndarray, dropped: list[int] | None = None) -> None:
        """Take survivor ``member``'s :meth:`MaskingClient.unmask_share` for ``dropped`` (by default the failed
        members :meth:`needs_shares` lists for it now; pass the list the share was computed for if members may
        have failed since the request)."""
        if member not in self._arrived:
            raise ValueError(f"member {member} is not a survivor of this cohort")
        outstanding = self._failed - self._revealed[member]
        dropped_set = set(outstanding if dropped is None else dropped)
        if not dropped_set or not dropped_set <= outstanding:
            raise ValueError(f"member {member}: a share for {sorted(dropped_set)} is not needed (needed: {sorted(outstanding)})")
        share = np.asarray(share)
        if share.dtype != np.uint32 or share.shape != (self.numel,):
            raise ValueError(f"share of member {member}: {share.dtype} {share.shape}, expected uint32 ({self.numel},)")
        self._sum -= share
        self._revealed[member] |= dropped_set

    @property
    def complete(self) -> bool:
        """Every member arrived or failed, and every share needed is in."""
        return len(self._arrived) + len(self._failed) == len(self.members) and not self.needs_shares()

    def total(self) -> np.ndarray:
        """sum over survivors of q(x_i), read as signed int32 and divided by scale (float64)."""
        if not self.complete:
            missing = [m for m in self.members if m not in self._arrived and m not in self._failed]
            raise ValueError(
                f"cohort incomplete: waiting for members {missing} and shares from {sorted(self.needs_shares())}"
            )
        return self._sum.view(np.int32).astype(np.float64) / self.scale

    def _check_pending(self, member: int) -> None:
        if member not in self.members:
            raise ValueError(f"{member} is not a member of this cohort")
        if member in self._arrived:
            raise ValueError(f"member {member} already sent its masked vector")
        if member in self._failed:
            raise ValueError(f"member {member} was declared failed; its masked vector is no longer accepted")
