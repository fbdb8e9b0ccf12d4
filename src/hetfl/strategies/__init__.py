"""Federated algorithms, one file each, all on the event-driven interface in :mod:`hetfl.strategies.base`."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hetfl.config import ModelConfig, SelectionConfig, StrategyConfig, TrainingConfig
from hetfl.errors import ConfigError, HetflError
from hetfl import compression, registry
from hetfl.strategies.base import ClientData, ClientResult, Server, Strategy, Task, Update
from hetfl.strategies.adapters import AdapterFL
from hetfl.strategies.clustered import FLHC
from hetfl.strategies.ditto import Ditto
from hetfl.strategies.fedasync import FedAsync
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.fedbn import FedBN
from hetfl.strategies.fedbuff import FedBuff
from hetfl.strategies.fedcompass import FedCompass
from hetfl.strategies.fednova import FedNova
from hetfl.strategies.fedopt import FedAdam, FedYogi
from hetfl.strategies.fedprox import FedProx
from hetfl.strategies.fedstale import FedStale, FedVARP
from hetfl.strategies.hcmeta import HCMeta
from hetfl.strategies.ifca import IFCA
from hetfl.strategies.finetune import FedAvgFineTune
from hetfl.strategies.fml import FML
from hetfl.strategies.fedgh import FedGH
from hetfl.strategies.fedins import FedIns
from hetfl.strategies.fedlora import FedLoRA
from hetfl.strategies.fedspine import FedSpine
from hetfl.strategies.fedproto import FedProto
from hetfl.strategies.hetero import LGFedAvg, LocalOnly
from hetfl.strategies.ocfl import OCFL
from hetfl.strategies.partial import FedPer, FedRep
from hetfl.strategies.hidenseek import HideNseek
from hetfl.strategies.fedtiny import FedTiny
from hetfl.strategies.fedconv import FedConv
from hetfl.strategies.pfedgate import PFedGate
from hetfl.strategies.pfedpg import PFedPG
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.scaffold import Scaffold
from hetfl.strategies.selection import HeteRoSelect, Oort, RandomSelection, Selection


def _builtins(kind: str) -> dict[str, type]:
    """hetfl's own classes of ``kind``, imported through :mod:`hetfl.registry` as a user's are."""
    return {name: registry.load(kind, name, key=f"(built-in {kind})") for name in registry.KINDS[kind].builtins}


STRATEGIES: dict[str, type[Strategy]] = _builtins("strategy")
"""The built-in algorithms by name (``hetfl algorithms`` also lists those installed packages add)."""

SELECTIONS: dict[str, type[Selection]] = _builtins("selection")
"""The built-in client selections by name."""


ROUND_KEYS = ("clients_per_round", "deadline_s", "selection", "aggregator", "privacy")  # set from strategy.* keys, not strategy.params


def constructor_parameters(cls: type) -> dict[str, tuple[inspect.Parameter, Any]]:
    """Every keyword a class's constructor accepts, with its annotation: its own ``__init__``'s and, when that takes
    ``**kwargs`` (a subclass forwarding to its base), those of the next ``__init__`` up the MRO, and so on."""
    found: dict[str, tuple[inspect.Parameter, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not evaluate: checked by nothing, as an unannotated one
            hints = {}
        forwards = False
        for p in list(inspect.signature(init).parameters.values())[1:]:  # past self
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in found:
                found[p.name] = (p, hints.get(p.name))
        if not forwards:
            break
    return found


def parameters(cls: type) -> list[inspect.Parameter]:
    """The constructor parameters a user sets through ``strategy.params`` (or ``strategy.selection.params``)."""
    return [p for name, (p, _) in constructor_parameters(cls).items() if name not in ROUND_KEYS]


def _check_keys(cls: type, name: str, keys: Iterable[str], where: str) -> None:
    known = [p.name for p in parameters(cls)]
    for key in keys:
        if key in ROUND_KEYS and key in constructor_parameters(cls):
            raise ConfigError(f"{where}.{key}: a key of strategy itself; set strategy.{key} instead")
        if key not in known:
            raise ConfigError(f"{where}.{key}: not a parameter of {name} (known: {', '.join(known) or 'none'})")


def strategy_class(name: str, key: str = "strategy.name") -> type[Strategy]:
    """The class ``name`` (a built-in, an entry point's or an import path) names."""
    return registry.load("strategy", name, key=key)


def build_strategy(
    cfg: StrategyConfig, training: TrainingConfig | None = None, model: ModelConfig | None = None
) -> Strategy:
    """Instantiate ``cfg.name`` with its parameters; a wrong name or parameter is a one-line ConfigError.

    With ``training`` (``model``), also refuse a local optimiser (a model) the algorithm's mathematics
    does not cover.
    """
    cls = strategy_class(cfg.name)
    for name, params in cfg.per_algorithm.items():
        other = strategy_class(name, f"strategy.per_algorithm.{name}")
        _check_keys(other, name, params, f"strategy.per_algorithm.{name}")
    _check_keys(cls, cfg.name, cfg.params, "strategy.params")
    wheres = {key: f"strategy.params.{key}" if key in cfg.params else f"strategy.per_algorithm.{cfg.name}.{key}"
              for key in cfg.params_for(cfg.name)}
    kwargs = _typed(cls, cfg.params_for(cfg.name), wheres)
    accepted = constructor_parameters(cls)
    if "clients_per_round" in accepted:
        kwargs["clients_per_round"] = cfg.clients_per_round
    if "deadline_s" in accepted:
        kwargs["deadline_s"] = cfg.deadline_s
    if "selection" in accepted:
        kwargs["selection"] = build_selection(cfg.selection)
    elif cfg.selection.name != "random":
        raise ConfigError(
            f"strategy.selection.name: {cfg.name} does not run rounds, so it takes no client selection "
            "(selections apply to round-based algorithms such as fedavg)"
        )
    _robust_options(cls, cfg, accepted, kwargs)
    strategy = _instantiate(cls, kwargs, f"strategy.params: {cfg.name}")
    if cfg.partial_work:
        if not isinstance(strategy, RoundStrategy):
            raise ConfigError(f"strategy.partial_work: {cfg.name} does not run rounds with a deadline (partial work "
                              "applies to round-based algorithms such as fedavg and fedprox)")
        strategy.partial_work = True
    if cfg.compression.kind != "none":
        reason = compression.refusal(strategy)
        if reason is not None:
            raise ConfigError(f"strategy.compression.kind: {cfg.name} {reason}, so its upload cannot be compressed; "
                              "set strategy.compression.kind to none")
        strategy.compression = compression.Compression(cfg.compression)
    if "name" not in vars(cls):  # a user's class without a name of its own is called what the config calls it
        strategy.name = cfg.name
    if training is not None:
        strategy.check_training(training.optimizer, training.momentum)
    if model is not None:
        strategy.check_model(model.name)
    return strategy


def _robust_options(cls: type, cfg: StrategyConfig, accepted: Any, kwargs: dict[str, Any]) -> None:
    """Pass ``strategy.aggregator`` and ``strategy.privacy`` to algorithms that take them; refuse them elsewhere."""

    def takers(key: str) -> str:  # the algorithms whose constructor takes ``key``, for the error message
        names = (name for name, other in STRATEGIES.items() if key in constructor_parameters(other))
        return ", ".join(sorted(names))

    if "aggregator" in accepted:
        kwargs["aggregator"] = cfg.aggregator
    elif cfg.aggregator.max_update_norm is not None:
        raise ConfigError(
            f"strategy.aggregator.max_update_norm: {cfg.name} does not aggregate a mean of client changes, so norm "
            f"bounding would change its mathematics (it applies to {takers('aggregator')})"
        )
    elif cfg.aggregator.rule != "mean":
        raise ConfigError(
            f"strategy.aggregator.rule: {cfg.name} does not aggregate a mean of client changes, so a robust rule would "
            f"change its mathematics (robust rules apply to {takers('aggregator')})"
        )
    if "privacy" in accepted:
        kwargs["privacy"] = cfg.privacy
    elif cfg.privacy.enabled:
        raise ConfigError(
            f"strategy.privacy.clip: DP-FedAvg is defined for a round's mean of uniformly sampled clients' changes, which "
            f"{cfg.name} does not aggregate (privacy applies to {takers('privacy')})"
        )


def build_selection(cfg: SelectionConfig) -> Selection:
    """Instantiate the client selection ``cfg.name`` with ``cfg.params`` (errors name the key)."""
    cls = registry.load("selection", cfg.name, key="strategy.selection.name")
    _check_keys(cls, cfg.name, cfg.params, "strategy.selection.params")
    kwargs = _typed(cls, dict(cfg.params), {key: f"strategy.selection.params.{key}" for key in cfg.params})
    return _instantiate(cls, kwargs, f"strategy.selection.params: {cfg.name}")


def _instantiate(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    except HetflError:
        raise
    except Exception as err:  # a user's constructor failed otherwise: one line (HETFL_DEBUG=1: the traceback)
        if os.environ.get("HETFL_DEBUG"):
            raise
        raise ConfigError(f"{where}: {cls.__name__}(...) raised {type(err).__name__}: {err}") from None


def _typed(cls: type, kwargs: dict[str, Any], wheres: dict[str, str]) -> dict[str, Any]:
    """``kwargs``, each checked against ``cls``'s constructor annotation (a bad one names its key)."""
    hints = {name: hint for name, (_, hint) in constructor_parameters(cls).items() if hint is not None}
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            kwargs[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            error = err.errors()[0]
            inner = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"{wheres[key]}{'.' + inner if inner else ''}: {error['msg']} (got {value!r})") from None
    return kwargs


__all__ = [
    "STRATEGIES", "SELECTIONS", "build_strategy", "build_selection", "parameters", "constructor_parameters",
    "strategy_class",
    "ClientData", "ClientResult", "Server", "Strategy", "Task", "Update", "RoundStrategy",
    "FedAvg", "FedProx", "FedNova", "Scaffold", "FedAdam", "FedYogi", "FedStale", "FedVARP",
    "FedAsync", "FedBuff", "FedCompass",
    "Ditto", "FedAvgFineTune",
    "FedPer", "FedRep", "FedBN", "LGFedAvg", "LocalOnly", "FedProto", "FedGH", "FedIns",
    "PFedGate", "PFedPG", "HideNseek", "FedTiny", "FedConv",
    "FML", "AdapterFL", "FedLoRA", "FedSpine",
    "IFCA", "FLHC", "OCFL", "HCMeta",
    "Selection", "RandomSelection", "Oort", "HeteRoSelect",
]
