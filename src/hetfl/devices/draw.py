"""Drawing each client's device from the ``devices`` config section (or reading it from a trace).

:func:`build_profiles` turns the config into a :class:`~hetfl.devices.table.DeviceTable`: speeds from the
compute distribution or tiers, links from the network tiers, memory, availability windows. The model of a device
itself (:class:`~hetfl.devices.profiles.DeviceProfile`, the distributions, task timing) is in
:mod:`hetfl.devices.profiles`; this module only draws, so that profiles, table and trace import one way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from hetfl.devices.table import DeviceTable
from hetfl.devices.tiers import BYTES_PER_MBIT, NETWORK_TIERS
from hetfl.devices.trace import load_trace

if TYPE_CHECKING:
    from hetfl.config import AvailabilityConfig, DevicesConfig

MIN_PARETO_SPEED = 1e-3


def build_profiles(cfg: DevicesConfig, n_clients: int, rng: np.random.Generator) -> DeviceTable:
    """Draw one profile per client from the ``devices`` config (or read them from its trace).

    With a trace, client ``i`` of the federation gets the ``i``-th trace device in order of its id
    (``client_id`` is renumbered ``0..n_clients-1``); ``devices.dropout`` applies to every device
    whose trace row gives no dropout. The same ``rng`` state gives the same profiles.

    Returns a :class:`~hetfl.devices.table.DeviceTable`: the profiles as columns, a sequence of
    :class:`DeviceProfile` to whoever indexes or iterates it.
    """
    if cfg.trace:
        loaded = load_trace(cfg.trace, n_clients, cfg.compute.median_flops, default_dropout=cfg.dropout)
        memory = math.inf if cfg.memory.limit is None else cfg.memory.limit  # traces carry no memory column
        return DeviceTable.from_profiles([replace(p, client_id=i, memory_bytes=memory) for i, p in enumerate(loaded)])

    # tier names, speeds and weights were checked where the config was validated (hetfl.config)
    speeds, compute_labels = _draw_speeds(cfg, n_clients, rng)
    network_names = _draw_choice(cfg.network.tiers, n_clients, rng)
    nets = [NETWORK_TIERS[name] for name in network_names]
    memory_of = {label: _memory(cfg, label) for label in set(compute_labels)}
    windows = (
        [_markov_windows(cfg.availability, rng) for _ in range(n_clients)]  # client by client, as the draws were always made
        if cfg.availability.kind == "markov" else None
    )
    speeds = np.asarray(speeds, dtype=float)
    return DeviceTable.from_columns(
        speed=speeds,
        flops=speeds * cfg.compute.median_flops,
        down_Bps=np.array([net.down_mbps * BYTES_PER_MBIT for net in nets]),
        up_Bps=np.array([net.up_mbps * BYTES_PER_MBIT for net in nets]),
        latency_s=np.array([net.latency_ms / 1000 for net in nets]),
        dropout=np.full(n_clients, float(cfg.dropout)),
        memory_bytes=np.array([memory_of[label] for label in compute_labels], dtype=float),
        tiers=[f"{label}/{name}" for label, name in zip(compute_labels, network_names)],
        windows=windows,
    )


def _memory(cfg: DevicesConfig, compute_label: str) -> float:
    """Memory in bytes of a device of compute tier ``compute_label``: its tier's, else the limit, else unlimited."""
    value = cfg.memory.tiers.get(compute_label, cfg.memory.limit)
    return math.inf if value is None else float(value)


def _draw_speeds(cfg: DevicesConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Relative speeds of ``n`` devices and the compute label of each (for the tier string)."""
    compute = cfg.compute
    kind = compute.distribution
    if kind == "constant":
        return np.ones(n), [kind] * n
    if kind == "lognormal":
        return np.exp(rng.normal(0.0, compute.sigma, size=n)), [kind] * n
    if kind == "pareto":
        x = 1.0 + rng.pareto(compute.pareto_shape, size=n)  # classic Pareto, minimum 1, median 2**(1/shape)
        speeds = 2.0 ** (1.0 / compute.pareto_shape) / x
        return np.maximum(speeds, MIN_PARETO_SPEED), [kind] * n
    weights = compute.tier_weights or {name: 1.0 for name in compute.tiers}
    names = _draw_choice(weights, n, rng)
    return np.array([compute.tiers[name] for name in names], dtype=float), names


def _draw_choice(weights: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """Draw ``n`` names with probabilities proportional to ``weights`` (validated by the config)."""
    names = list(weights)
    w = np.array([weights[name] for name in names], dtype=float)
    picks = rng.choice(len(names), size=n, p=w / w.sum())
    return [names[k] for k in picks]


def _markov_windows(avail: AvailabilityConfig, rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """Alternating exponential online/offline periods up to the horizon, then online forever.

    Periods are drawn in vectorised batches of (first, second) pairs, so parity never breaks.
    """
    mean_on, mean_off, horizon = avail.mean_online_s, avail.mean_offline_s, avail.horizon_s
    online_first = bool(rng.random() < mean_on / (mean_on + mean_off))
    first, second = (mean_on, mean_off) if online_first else (mean_off, mean_on)
    batch = int(horizon / (mean_on + mean_off)) + 8
    chunks, total = [], 0.0
    while total < horizon:
        pairs = np.column_stack([rng.exponential(first, batch), rng.exponential(second, batch)]).ravel()
        chunks.append(pairs)
        total += float(pairs.sum())
    lengths = np.concatenate(chunks)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, horizon, side="left")) + 1  # periods that start before the horizon
    ends, starts = ends[:n], ends[:n] - lengths[:n]
    is_online = (np.arange(n) % 2 == 0) == online_first
    windows = [(float(a), float(b)) for a, b in zip(starts[is_online], ends[is_online])]
    if windows and windows[-1][1] >= horizon:  # the last online period runs past the horizon
        windows[-1] = (windows[-1][0], math.inf)
    else:  # an offline period runs past the horizon: online again from the horizon on
        windows.append((horizon, math.inf))
    return tuple(windows)
