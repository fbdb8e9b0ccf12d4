"""Federated algorithms, one file each, all on the event-driven interface in :mod:`hetfl.strategies.base`."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hetfl.config import StrategyConfig, TrainingConfig
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


ROUND_KEYS = ("self", "clients_per_round", "deadline_s")  # set from strategy.* keys, not strategy.params


def parameters(cls: type[Strategy]) -> list[inspect.Parameter]:
    """The constructor parameters a user sets through ``strategy.params``."""
    return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name not in ROUND_KEYS]


def _check_keys(cls: type[Strategy], name: str, keys: Iterable[str], where: str) -> None:
    known = [p.name for p in parameters(cls)]
    for key in keys:
        if key not in known:
            raise ConfigError(f"{where}.{key}: not a parameter of {name} (known: {', '.join(known) or 'none'})")


def build_strategy(cfg: StrategyConfig, training: TrainingConfig | None = None) -> Strategy:
    """Instantiate ``cfg.name`` with its parameters; a wrong name or parameter is a one-line ConfigError.

    With ``training``, also refuse a local optimiser the algorithm's mathematics does not cover.
    """
    cls = STRATEGIES.get(cfg.name)
    if cls is None:
        raise ConfigError(f"strategy.name: unknown algorithm '{cfg.name}' (known: {', '.join(sorted(STRATEGIES))})")
    for name, params in cfg.per_algorithm.items():
        other = STRATEGIES.get(name)
        if other is None:
            raise ConfigError(f"strategy.per_algorithm.{name}: unknown algorithm (known: {', '.join(sorted(STRATEGIES))})")
        _check_keys(other, name, params, f"strategy.per_algorithm.{name}")
    _check_keys(cls, cfg.name, cfg.params, "strategy.params")
    kwargs = _typed(cls, cfg)
    accepted = inspect.signature(cls.__init__).parameters
    if "clients_per_round" in accepted:
        kwargs["clients_per_round"] = cfg.clients_per_round
    if "deadline_s" in accepted:
        kwargs["deadline_s"] = cfg.deadline_s
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.params: {cfg.name}: {err}") from None
    if training is not None:
        strategy.check_training(training.optimizer, training.momentum)
    return strategy


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
    "STRATEGIES", "build_strategy", "parameters", "ClientData", "ClientResult", "Server", "Strategy", "Task", "Update",
    "RoundStrategy", "FedAvg", "FedProx", "FedNova", "Scaffold", "FedAdam", "FedYogi",
]
