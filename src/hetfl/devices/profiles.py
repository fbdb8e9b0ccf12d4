"""Device profiles: how fast each client computes, how fast it talks, and when it is online.

A :class:`DeviceProfile` is everything the virtual clock needs to know about one client. It is
drawn once per run by :func:`hetfl.devices.draw.build_profiles` from the ``devices`` config section (or read from a
trace, see :mod:`hetfl.devices.trace`), and :func:`task_timing` turns it into the simulated
seconds a task takes.

Compute speed is relative: 1.0 is the median device, whose FLOP/s is
``devices.compute.median_flops``. Distributions:

- ``constant``: every device has speed 1.0.
- ``lognormal``: ``speed = exp(N(0, sigma))``; median 1.
- ``pareto``: a heavy tail of *slow* devices. ``speed = 2**(1/shape) / X`` with ``X`` a Pareto
  variable of tail index ``shape`` and minimum 1, so the median speed is 1, the fastest device
  is ``2**(1/shape)`` times the median and the slowest are unbounded (clipped at 1e-3).
- ``tiers``: named tiers with fixed relative speeds, drawn with ``tier_weights`` (default equal).

Network tiers (:data:`hetfl.devices.tiers.NETWORK_TIERS`) are *typical* figures for each kind of link, chosen to
give plausible orders of magnitude, not measurements of any network:

==========  =============  ===========  ============
tier        down Mbit/s    up Mbit/s    latency ms
==========  =============  ===========  ============
3g          2              0.5          150
4g          20             5            60
5g          150            30           25
wifi        50             20           15
ethernet    1000           1000         2
==========  =============  ===========  ============

The ``5g_measured``, ``wifi_measured`` and ``ethernet_measured`` tiers are calibrated to a paper's measurements
instead (uplinks 30.03, 534.5 and 1000 Mbit/s; :mod:`hetfl.devices.tiers` says from what, and what is our choice).

Memory (``devices.memory``): the bytes a device can train in, ``memory_bytes`` (unlimited by default),
one limit for every device or one per compute tier. Only strategies that size a model per device read it
(fedspine); device traces carry no memory column, so trace devices get ``devices.memory.limit``.

Availability: ``always`` (``windows=None``) or ``markov``, an alternating online/offline process
with exponential period lengths (means ``mean_online_s`` and ``mean_offline_s``). Each client
starts online with the stationary probability ``mean_online / (mean_online + mean_offline)``;
as the periods are memoryless, the first period's remaining length is again exponential, so the
process starts at a random phase of its stationary cycle. Periods are drawn up to ``horizon_s``;
**after the horizon the client is online forever** (its last window ends at ``math.inf``), so a
run longer than the horizon never stalls waiting for clients.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
from rich.table import Table

from hetfl.devices.tiers import BYTES_PER_MBIT, NETWORK_TIERS, NetworkTier  # noqa: F401 - re-exported


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device.

    ``windows`` are sorted, disjoint online intervals ``[start, end)`` in simulated seconds
    (``end`` may be ``math.inf``); ``None`` means always online.
    """

    client_id: int
    speed: float  # relative compute speed, 1.0 = the median device
    flops: float  # FLOP/s of this device
    down_Bps: float  # download bandwidth, bytes per second
    up_Bps: float  # upload bandwidth, bytes per second
    latency_s: float  # one-way latency added to each transfer
    windows: tuple[tuple[float, float], ...] | None = None
    dropout: float = 0.0  # probability that a task given to this client is never returned
    tier: str = ""  # e.g. "mid/wifi", for reports
    memory_bytes: float = math.inf  # memory the device can train in (devices.memory); inf: unlimited

    def _last_start_at_or_before(self, t: float) -> int:
        """Index of the last window starting at or before ``t``; -1 if none."""
        return bisect.bisect_right(self.windows, t, key=itemgetter(0)) - 1

    def is_online(self, t: float) -> bool:
        if self.windows is None:
            return True
        i = self._last_start_at_or_before(t)
        return i >= 0 and t < self.windows[i][1]

    def next_online(self, t: float) -> float:
        """``t`` if online at ``t``, else the start of the next window, else ``math.inf``."""
        if self.windows is None:
            return t
        i = self._last_start_at_or_before(t)
        if i >= 0 and t < self.windows[i][1]:
            return t
        return self.windows[i + 1][0] if i + 1 < len(self.windows) else math.inf

    def online_until(self, t: float) -> float:
        """End of the window containing ``t`` (``math.inf`` if always online); ``t`` itself when offline."""
        if self.windows is None:
            return math.inf
        i = self._last_start_at_or_before(t)
        if i >= 0 and t < self.windows[i][1]:
            return self.windows[i][1]
        return t

    def online_fraction(self, horizon: float) -> float:
        """Share of ``[0, horizon)`` this client is online."""
        if self.windows is None or horizon <= 0:
            return 1.0
        online = sum(max(0.0, min(end, horizon) - start) for start, end in self.windows if start < horizon)
        return online / horizon




# --------------------------------------------------------------------------- task timing
@dataclass(frozen=True)
class TaskTiming:
    """The seconds of one task, in order: ``wait_s`` for the server (its compute and a download slot, ``server:``;
    0 for a free server), then the download, the local training and the upload."""

    download_s: float
    compute_s: float
    upload_s: float
    wait_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.wait_s + self.download_s + self.compute_s + self.upload_s

    def cut(self, done: int, steps: int) -> "TaskTiming":
        """The timing of ``done`` of the task's ``steps`` local steps: the same wait and transfers, ``done / steps``
        of the compute (each step at the speed, jitter included, this timing gives the whole task)."""
        return TaskTiming(self.download_s, self.compute_s * done / steps, self.upload_s, self.wait_s)


def steps_in_time(timing: TaskTiming, steps: int, time_s: float) -> int:
    """Of a task of ``steps`` local steps timed ``timing``, how many fit in ``time_s`` seconds after its wait and
    download and before its upload: ``min(steps, floor((time_s - wait - download - upload) / (compute / steps)))``;
    0 when not even the transfers fit (partial work, ``strategy.partial_work``)."""
    spare = time_s - timing.wait_s - timing.download_s - timing.upload_s
    if steps <= 0 or spare < 0:
        return 0
    if timing.compute_s <= 0:
        return steps
    return min(steps, math.floor(spare * steps / timing.compute_s))


def task_timing(
    profile: DeviceProfile,
    *,
    flops: float,
    bytes_down: int,
    bytes_up: int,
    jitter: float,
    rng: np.random.Generator,
) -> TaskTiming:
    """Simulated seconds to download the model, train on it and upload the update.

    With ``jitter > 0`` each of the three times is multiplied by an independent log-normal factor
    ``exp(N(0, jitter) - jitter**2 / 2)``, whose mean is 1. With ``jitter == 0`` nothing is drawn
    from ``rng`` and the times are exact.
    """
    download_s = bytes_down / profile.down_Bps + profile.latency_s
    compute_s = flops / profile.flops
    upload_s = bytes_up / profile.up_Bps + profile.latency_s
    if jitter > 0:
        f_down, f_compute, f_up = np.exp(rng.normal(0.0, jitter, size=3) - jitter**2 / 2)
        download_s, compute_s, upload_s = download_s * f_down, compute_s * f_compute, upload_s * f_up
    return TaskTiming(float(download_s), float(compute_s), float(upload_s))


# --------------------------------------------------------------------------- summary
def describe_profiles(profiles: Sequence[DeviceProfile], *, horizon_s: float | None = None) -> Table:
    """A summary table: one row per tier (``compute/network``) and one for all devices.

    The online share is measured over ``[0, horizon_s)``; by default up to the last finite window
    boundary of any device (the availability horizon for ``markov``).
    """
    if horizon_s is None:
        bounds = [x for p in profiles for w in (p.windows or ()) for x in w if math.isfinite(x)]
        horizon_s = max(bounds, default=0.0)

    table = Table(title=f"{len(profiles)} devices")
    for column in ("tier", "clients", "speed min", "median", "max", "spread"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for column in ("down Mbit/s", "up Mbit/s", "latency ms", "online", "dropout"):
        table.add_column(column, justify="right")

    if not profiles:
        return table
    groups: dict[str, list[DeviceProfile]] = {}
    for p in profiles:
        groups.setdefault(p.tier or "(none)", []).append(p)
    rows = sorted(groups.items())
    if len(rows) > 1:
        rows.append(("all", list(profiles)))
    for i, (name, group) in enumerate(rows):
        speeds = np.array([p.speed for p in group])
        table.add_row(
            name,
            str(len(group)),
            f"{speeds.min():.3g}",
            f"{np.median(speeds):.3g}",
            f"{speeds.max():.3g}",
            f"{speeds.max() / speeds.min():.3g}x",
            _range_text([p.down_Bps / BYTES_PER_MBIT for p in group]),
            _range_text([p.up_Bps / BYTES_PER_MBIT for p in group]),
            _range_text([p.latency_s * 1000 for p in group]),
            f"{np.mean([p.online_fraction(horizon_s) for p in group]):.0%}",
            f"{np.mean([p.dropout for p in group]):.0%}",
            end_section=len(rows) > 1 and i == len(rows) - 2,  # a rule above the "all" row
        )
    return table


def _range_text(values: list[float]) -> str:
    """The value shared by the group, or its range when the values differ."""
    low, high = min(values), max(values)
    return f"{low:.4g}" if low == high else f"{low:.4g}-{high:.4g}"
