"""hetfl: federated learning across heterogeneous clients.

A virtual-clock simulator that turns device profiles into simulated wall-clock time, the
federated algorithms behind one event-driven strategy interface, and their results.
"""

__version__ = "0.1.0"
