"""Network tiers: the typical link of each kind (:data:`NETWORK_TIERS`; the table is in :mod:`hetfl.devices.profiles`).

A leaf module: the config validates ``devices.network.tiers`` against these names without importing the rest of
the device model.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_PER_MBIT = 1e6 / 8  # 1 Mbit/s = 125,000 bytes/s


@dataclass(frozen=True)
class NetworkTier:
    name: str
    down_mbps: float
    up_mbps: float
    latency_ms: float


NETWORK_TIERS: dict[str, NetworkTier] = {
    t.name: t
    for t in (
        NetworkTier("3g", down_mbps=2.0, up_mbps=0.5, latency_ms=150.0),
        NetworkTier("4g", down_mbps=20.0, up_mbps=5.0, latency_ms=60.0),
        NetworkTier("5g", down_mbps=150.0, up_mbps=30.0, latency_ms=25.0),
        NetworkTier("wifi", down_mbps=50.0, up_mbps=20.0, latency_ms=15.0),
        NetworkTier("ethernet", down_mbps=1000.0, up_mbps=1000.0, latency_ms=2.0),
    )
}
