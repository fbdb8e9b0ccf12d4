"""Federated algorithms, one file each, all on the event-driven interface in :mod:`hetfl.strategies.base`."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hetfl.config import StrategyConfig
from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Strategy, Task, Update
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.fednova import FedNova
from hetfl.strategies.fedopt import FedAdam, FedYogi
from hetfl.strategies.fedprox import FedProx
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedNova, Scaffold, FedAdam, FedYogi)
}


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """Instantiate ``cfg.name`` with its parameters; a wrong name or parameter is a one-line ConfigError."""
    cls = STRATEGIES.get(cfg.name)
    if cls is None:
        raise ConfigError(f"strategy.name: unknown algorithm '{cfg.name}' (known: {', '.join(sorted(STRATEGIES))})")
    accepted = inspect.signature(cls.__init__).parameters
    known = [k for k in accepted if k not in ("self", "clients_per_round", "deadline_s")]
    for name, params in cfg.per_algorithm.items():
        other = STRATEGIES.get(name)
        if other is None:
            raise ConfigError(f"strategy.per_algorithm.{name}: unknown algorithm (known: {', '.join(sorted(STRATEGIES))})")
        other_known = [k for k in inspect.signature(other.__init__).parameters if k not in ("self", "clients_per_round", "deadline_s")]
        for key in params:
            if key not in other_known:
                raise ConfigError(
                    f"strategy.per_algorithm.{name}.{key}: not a parameter of {name} (known: {', '.join(other_known) or 'none'})"
                )
    for key in cfg.params:
        if key not in known:
            raise ConfigError(
                f"strategy.params.{key}: not a parameter of {cfg.name} (known: {', '.join(known) or 'none'})"
            )
    kwargs = _typed(cls, cfg)
    if "clients_per_round" in accepted:
        kwargs["clients_per_round"] = cfg.clients_per_round
    if "deadline_s" in accepted:
        kwargs["deadline_s"] = cfg.deadline_s
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.params: {cfg.name}: {err}") from None


def _typed(cls: type[Strategy], cfg: StrategyConfig) -> dict[str, Any]:
    """The algorithm's parameters, each checked against its constructor's annotation (a bad one names its key)."""
    hints = typing.get_type_hints(cls.__init__)
    kwargs = cfg.params_for(cfg.name)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            kwargs[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            where = f"strategy.params.{key}" if key in cfg.params else f"strategy.per_algorithm.{cfg.name}.{key}"
            raise ConfigError(f"{where}: {err.errors()[0]['msg']} (got {value!r})") from None
    return kwargs


__all__ = [
    "STRATEGIES", "build_strategy", "ClientData", "ClientResult", "Server", "Strategy", "Task", "Update",
    "RoundStrategy", "FedAvg", "FedProx", "FedNova", "Scaffold", "FedAdam", "FedYogi",
]
