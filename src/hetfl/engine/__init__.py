"""The engine: the virtual clock, the simulator that drives strategies on it, and whole runs."""

from hetfl.engine.clock import Event, EventQueue
from hetfl.engine.simulator import ClientPool, Counters, Simulator

__all__ = ["Event", "EventQueue", "ClientPool", "Counters", "Simulator"]
