"""Device heterogeneity: compute speed, network and availability of each client, and task timing."""

from hetfl.devices.profiles import (
    NETWORK_TIERS,
    DeviceProfile,
    NetworkTier,
    TaskTiming,
    build_profiles,
    describe_profiles,
    task_timing,
)
from hetfl.devices.table import DeviceTable
from hetfl.devices.trace import load_trace, save_trace

__all__ = [
    "NETWORK_TIERS",
    "DeviceProfile",
    "DeviceTable",
    "NetworkTier",
    "TaskTiming",
    "build_profiles",
    "describe_profiles",
    "load_trace",
    "save_trace",
    "task_timing",
]
