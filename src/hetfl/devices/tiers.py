"""Network tiers: the typical link of each kind (:data:`NETWORK_TIERS`; the table is in :mod:`hetfl.devices.profiles`).

The ``*_measured`` tiers are calibrated to the measurements of Hayek, Chung, Comer, Murthy, Kettimuthu and Kadota,
"Federated Learning over 5G, WiFi, and Ethernet: Measurements and Evaluation" (arXiv 2504.04678, 2025): Flower,
SqueezeNet on CIFAR-10, Raspberry Pi clients, a 5G-NR standalone testbed (OpenAirInterface gNB on a software radio)
beside WiFi and Ethernet to the same server. From the paper (its abstract; the body's tables were not available to
us): the uplink model transfer on 5G took **33.3x** as long as on Ethernet and **17.8x** as long as on WiFi, and was
**about 23%** of an average communication round with all edge devices. Our choices: a transfer of the same model
takes bytes / rate, so the uplink rates keep those two ratios, anchored at Ethernet's 1000 Mbit/s (a gigabit port,
our assumption): Ethernet 1000, WiFi 1000 x 17.8 / 33.3 = 534.5, 5G 1000 / 33.3 = 30.03 Mbit/s. The downlink and
latency figures are not among the numbers we could read from the paper, so each keeps the typical tier's (5G 150
Mbit/s down and 25 ms, WiFi 50 and 15 ms, Ethernet 1000 and 2 ms), except WiFi's downlink, raised to its uplink
(534.5) so the downlink is not the slower direction on the WLAN. The 23% share also depends on the testbed's
training time (Raspberry Pis), set by ``devices.compute``, not by a network tier. The typical tiers are unchanged,
so no recorded benchmark moves.

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
        # calibrated to arXiv 2504.04678 (module docstring): uplink time ratios 5G / Ethernet 33.3, 5G / WiFi 17.8
        NetworkTier("5g_measured", down_mbps=150.0, up_mbps=1000.0 / 33.3, latency_ms=25.0),
        NetworkTier("wifi_measured", down_mbps=1000.0 * 17.8 / 33.3, up_mbps=1000.0 * 17.8 / 33.3, latency_ms=15.0),
        NetworkTier("ethernet_measured", down_mbps=1000.0, up_mbps=1000.0, latency_ms=2.0),
    )
}
