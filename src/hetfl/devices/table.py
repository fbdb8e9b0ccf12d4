"""Device profiles as columns: one numpy array per field, a :class:`DeviceProfile` made only when asked for.

A federation of 100,000 clients as a list of :class:`DeviceProfile` objects costs tens of megabytes and
turns every "who is online now" into a Python loop over all of them. :class:`DeviceTable` holds the
same information as arrays (speed, FLOP/s, bandwidths, latency, dropout, memory; the tier as a code
into a list of names; all availability windows concatenated, with each client's offset into them) and
answers the simulator's questions for every client at once:

- :meth:`online_mask` / :meth:`next_online`: a vectorised binary search in each client's windows
  (``O(n log w)``), or nothing at all when every device is always online;
- :meth:`online_seconds`: seconds online over ``[0, t]`` (the idle-time metric), from per-client prefix
  sums of the windows' lengths.

It is a sequence of profiles for everyone else: ``table[c]`` builds client ``c``'s
:class:`DeviceProfile` (equal to the one it was made from), ``len``, iteration and ``==`` work as on a
list, and ``table[c] = profile`` replaces a device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hetfl.devices.profiles import DeviceProfile

_FLOAT_COLUMNS = ("speed", "flops", "down_Bps", "up_Bps", "latency_s", "dropout", "memory_bytes")


class DeviceTable(Sequence):
    """Every client's device profile, column by column (see the module docstring).

    Build one with :meth:`from_profiles` or :meth:`from_columns`.
    """

    def __init__(
        self,
        *,
        client_id: np.ndarray,
        columns: dict[str, np.ndarray],
        tier_names: list[str],
        tier_code: np.ndarray,
        always: np.ndarray,
        win_start: np.ndarray,
        win_end: np.ndarray,
        win_offsets: np.ndarray,
    ) -> None:
        self.client_id = np.asarray(client_id, dtype=np.int64)
        for name in _FLOAT_COLUMNS:
            setattr(self, name, np.asarray(columns[name], dtype=np.float64))
        self.tier_names = list(tier_names)
        self.tier_code = np.asarray(tier_code, dtype=np.int32)
        self.always = np.asarray(always, dtype=bool)  # windows is None: online at every moment
        self.win_start = np.asarray(win_start, dtype=np.float64)
        self.win_end = np.asarray(win_end, dtype=np.float64)
        self.win_offsets = np.asarray(win_offsets, dtype=np.int64)  # client c's windows: [offsets[c], offsets[c + 1])
        self._derive()

    def _derive(self) -> None:
        """What the queries need, computed from the columns (again after a device is replaced)."""
        self.all_always = bool(self.always.all())
        self._windowed = np.flatnonzero(~self.always)
        # online seconds in client c's windows before window i (exclusive prefix sums, summed in window order)
        before = np.zeros(len(self.win_start))
        lengths = self.win_end - self.win_start
        for c in self._windowed:
            a, b = self.win_offsets[c], self.win_offsets[c + 1]
            if b - a > 1:
                before[a + 1 : b] = np.cumsum(lengths[a : b - 1])
        self._before = np.append(before, 0.0)
        # one sentinel window at the end, so that gathers at "no such window" stay in bounds (and are masked)
        self._start = np.append(self.win_start, math.inf)
        self._end = np.append(self.win_end, math.inf)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_profiles(cls, profiles: Sequence[DeviceProfile]) -> DeviceTable:
        """The table of a list of profiles (a table is returned as it is)."""
        if isinstance(profiles, DeviceTable):
            return profiles
        tiers: dict[str, int] = {}  # tier name -> code, in order of first appearance
        codes = np.array([tiers.setdefault(p.tier, len(tiers)) for p in profiles], dtype=np.int32)
        windows = [p.windows for p in profiles]
        counts = [0 if w is None else len(w) for w in windows]
        flat = [x for w in windows if w for pair in w for x in pair]
        pairs = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        return cls(
            client_id=np.array([p.client_id for p in profiles], dtype=np.int64),
            columns={name: np.array([getattr(p, name) for p in profiles], dtype=np.float64) for name in _FLOAT_COLUMNS},
            tier_names=list(tiers),
            tier_code=codes,
            always=np.array([w is None for w in windows], dtype=bool),
            win_start=pairs[:, 0],
            win_end=pairs[:, 1],
            win_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    @classmethod
    def from_columns(
        cls,
        *,
        speed: np.ndarray,
        flops: np.ndarray,
        down_Bps: np.ndarray,
        up_Bps: np.ndarray,
        latency_s: np.ndarray,
        dropout: np.ndarray,
        memory_bytes: np.ndarray,
        tiers: Sequence[str],
        windows: Sequence[tuple[tuple[float, float], ...] | None] | None = None,
    ) -> DeviceTable:
        """A table of ``len(speed)`` devices numbered ``0..n-1``; ``windows`` None: all always online."""
        n = len(speed)
        names, code = np.unique(np.asarray(tiers, dtype=object).astype(str), return_inverse=True)
        if windows is None:
            always, counts, pairs = np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros((0, 2))
        else:
            always = np.array([w is None for w in windows], dtype=bool)
            counts = np.array([0 if w is None else len(w) for w in windows], dtype=np.int64)
            pairs = np.asarray([x for w in windows if w for pair in w for x in pair], dtype=np.float64).reshape(-1, 2)
        columns = {"speed": speed, "flops": flops, "down_Bps": down_Bps, "up_Bps": up_Bps, "latency_s": latency_s,
                   "dropout": dropout, "memory_bytes": memory_bytes}
        return cls(
            client_id=np.arange(n, dtype=np.int64), columns=columns, tier_names=[str(t) for t in names],
            tier_code=code.reshape(-1), always=always, win_start=pairs[:, 0], win_end=pairs[:, 1],
            win_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    # ------------------------------------------------------------------ the sequence of profiles
    def __len__(self) -> int:
        return len(self.client_id)

    def windows_of(self, c: int) -> tuple[tuple[float, float], ...] | None:
        if self.always[c]:
            return None
        a, b = self.win_offsets[c], self.win_offsets[c + 1]
        return tuple(zip(self.win_start[a:b].tolist(), self.win_end[a:b].tolist()))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[c] for c in range(*index.indices(len(self)))]
        c = int(index)
        if c < 0:
            c += len(self)
        if not 0 <= c < len(self):
            raise IndexError(f"device {index} out of range for {len(self)} devices")
        return DeviceProfile(
            client_id=int(self.client_id[c]),
            speed=float(self.speed[c]),
            flops=float(self.flops[c]),
            down_Bps=float(self.down_Bps[c]),
            up_Bps=float(self.up_Bps[c]),
            latency_s=float(self.latency_s[c]),
            windows=self.windows_of(c),
            dropout=float(self.dropout[c]),
            tier=self.tier_names[self.tier_code[c]],
            memory_bytes=float(self.memory_bytes[c]),
        )

    def __iter__(self) -> Iterator[DeviceProfile]:
        for c in range(len(self)):
            yield self[c]

    def __setitem__(self, index: int, profile: DeviceProfile) -> None:
        """Replace device ``index`` (tests and what-if studies; rebuilds the window arrays if its windows change)."""
        c = int(index) % len(self)
        self.client_id[c] = profile.client_id
        for name in _FLOAT_COLUMNS:
            getattr(self, name)[c] = getattr(profile, name)
        if profile.tier not in self.tier_names:
            self.tier_names.append(profile.tier)
        self.tier_code[c] = self.tier_names.index(profile.tier)
        if profile.windows != self.windows_of(c):
            replaced = DeviceTable.from_profiles([*self[:c], profile, *self[c + 1 :]])
            self.always, self.win_start, self.win_end, self.win_offsets = (
                replaced.always, replaced.win_start, replaced.win_end, replaced.win_offsets
            )
            self._derive()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DeviceTable({len(self)} devices)"

    @property
    def tiers(self) -> np.ndarray:
        """Every device's tier string (``compute/network``)."""
        return np.asarray(self.tier_names, dtype=object)[self.tier_code]

    # ------------------------------------------------------------------ availability, all clients at once
    def _current(self, t: float, clients: np.ndarray) -> np.ndarray:
        """For each of ``clients`` (with windows), the index of its last window starting at or before ``t``
        (its first window index - 1 when none): a binary search run on every client at once."""
        lo, hi = self.win_offsets[clients].copy(), self.win_offsets[clients + 1].copy()
        while True:
            open_ = lo < hi
            if not open_.any():
                return lo - 1
            mid = (lo + hi) // 2
            right = open_ & (self._start[mid] <= t)
            lo = np.where(right, mid + 1, lo)
            hi = np.where(open_ & ~right, mid, hi)

    def online_mask(self, t: float) -> np.ndarray:
        """Whether each client is online at ``t`` (as :meth:`DeviceProfile.is_online`)."""
        mask = self.always.copy()
        if self.all_always:
            return mask
        clients = self._windowed
        i = self._current(t, clients)
        has = i >= self.win_offsets[clients]
        mask[clients] = has & (t < self._end[np.maximum(i, 0)])
        return mask

    def next_online(self, t: float) -> np.ndarray:
        """For each client, ``t`` if online at ``t``, else the start of its next window, else inf
        (as :meth:`DeviceProfile.next_online`)."""
        out = np.full(len(self), float(t))
        if self.all_always:
            return out
        clients = self._windowed
        i = self._current(t, clients)
        has = i >= self.win_offsets[clients]
        online = has & (t < self._end[np.maximum(i, 0)])
        following = i + 1
        upcoming = np.where(following < self.win_offsets[clients + 1], self._start[following], math.inf)
        out[clients] = np.where(online, float(t), upcoming)
        return out

    def online_seconds(self, t: float) -> np.ndarray:
        """Seconds each client has been online over ``[0, t]``: prefix sums of its windows' lengths, one binary search."""
        out = np.where(self.always, max(t, 0.0), 0.0)
        if self.all_always:
            return out
        clients = self._windowed
        i = self._current(t, clients)
        has = i >= self.win_offsets[clients]
        j = np.maximum(i, 0)
        seconds = self._before[j] + np.minimum(self._end[j], t) - self._start[j]
        out[clients[has]] = seconds[has]
        return out
