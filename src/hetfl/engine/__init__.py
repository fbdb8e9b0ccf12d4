"""The engine: the virtual clock, the simulator that drives strategies on it, what it shares with the deployment
server (:mod:`hetfl.engine.core`), and whole runs."""

from hetfl.engine.clock import Event, EventQueue
from hetfl.engine.core import Counters, Engine, EngineCore
from hetfl.engine.simulator import ClientPool, Simulator

__all__ = ["Event", "EventQueue", "ClientPool", "Counters", "Engine", "EngineCore", "Simulator"]
