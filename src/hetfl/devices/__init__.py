"""Device heterogeneity: compute speed, network and availability of each client, and task timing."""

from hetfl.devices.draw import build_profiles
from hetfl.devices.profiles import DeviceProfile, TaskTiming, describe_profiles, steps_in_time, task_timing
from hetfl.devices.table import DeviceTable
from hetfl.devices.tiers import NETWORK_TIERS, NetworkTier
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
    "steps_in_time",
    "task_timing",
]
