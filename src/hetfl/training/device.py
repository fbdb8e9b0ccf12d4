"""Where local training and evaluation compute: ``training.device``, resolved in one place, and the boundary a task
crosses to get there.

The device holds a trainer's model (its flat parameter and gradient vectors, :class:`~hetfl.training.LocalTrainer`),
the clients' training data (moved once, :meth:`hetfl.engine.simulator.ClientPool.to`), the evaluation set
(:class:`~hetfl.training.evaluate.Evaluator`), and everything a client half computes. The server's side stays on
the CPU: the global model, the strategies' arithmetic, client states kept between tasks, checkpoints. A task crosses
between the two in one place, :func:`client_half` (and :func:`personal_half` at evaluation): its start model,
payload, options and the client's state go to the device, its result and the client's new state come back to the
CPU. So strategies, stores and checkpoints never see a device tensor, and with ``training.device: cpu`` (the
default) nothing moves at all.

A client half of one's own that creates tensors (``torch.zeros``, a generator's draws) creates them on
``trainer.device`` (or on its inputs' device, ``task.params.device``), as it would for any torch code that runs
on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from hetfl.errors import ConfigError

if TYPE_CHECKING:
    from hetfl.strategies.base import ClientData, ClientResult, Strategy, Task
    from hetfl.training.local import LocalTrainer

CPU = torch.device("cpu")
DEVICE_KEY = "training.device"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available() -> str:
    """What this machine offers, in words: ``CUDA devices cuda:0..cuda:1 and the CPU``, ``only the CPU``."""
    found = []
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        n = torch.cuda.device_count()
        found.append("CUDA device cuda:0" if n == 1 else f"CUDA devices cuda:0..cuda:{n - 1}")
    if _mps_available():
        found.append("Apple's mps")
    return " and ".join([*found, "the CPU"]) if found else "only the CPU"


def resolve_device(text: str, key: str = DEVICE_KEY) -> torch.device:
    """The ``torch.device`` that ``text`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) names on this machine.

    ``auto``: the first CUDA device if there is one, else ``mps`` if available, else the CPU. A device this machine
    lacks (``cuda`` without CUDA, ``cuda:N`` with N out of range, ``mps`` off Apple silicon) is a one-line
    :class:`~hetfl.errors.ConfigError` naming ``key`` and what the machine has.
    """
    name = str(text).strip().lower()
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else CPU
    if name == "cpu":
        return CPU
    if name == "mps":
        if not _mps_available():
            raise ConfigError(f"{key}: mps, but this machine has {available()}; set {key} to auto or cpu")
        return torch.device("mps")
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ConfigError(f"{key}: {text!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise ConfigError(f"{key}: {name}, but this machine has {available()} (torch {torch.__version__}, built "
                          f"{'without CUDA' if torch.version.cuda is None else 'with CUDA ' + torch.version.cuda}); "
                          f"set {key} to auto or cpu")
    n = int(index) if colon else 0
    if n >= torch.cuda.device_count():
        raise ConfigError(f"{key}: {name}, but this machine has {available()}; set {key} to one of them, or auto")
    return torch.device("cuda", n)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples, recursively) on ``device``; a tensor already
    there is returned as it is (no copy), anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _state_to(state: dict[str, Any], device: torch.device) -> None:
    """Move the client's state dict's tensors to ``device``, in place (the caller keeps the dict)."""
    moved = to_device(state, device)
    state.clear()
    state.update(moved)


def client_half(strategy: "Strategy", trainer: "LocalTrainer", task: "Task", data: "ClientData",
                state: dict[str, Any], seed: int) -> "ClientResult":
    """``strategy.client_train(trainer, task, data, state, seed)`` on ``trainer.device``: the task's tensors (start
    model, payload, options), the data and ``state`` moved there first, the result's parameters and payload and the
    client's new ``state`` (updated in place) moved back to the CPU. On the CPU, the call itself."""
    device = trainer.device
    if device.type == "cpu":
        return strategy.client_train(trainer, task, data, state, seed)
    on_device = dataclasses.replace(task, params=task.params.to(device), payload=to_device(task.payload, device),
                                    options=to_device(task.options, device))
    data = dataclasses.replace(data, x=data.x.to(device), y=data.y.to(device))
    _state_to(state, device)
    try:
        result = strategy.client_train(trainer, on_device, data, state, seed)
    finally:
        _state_to(state, CPU)
    return dataclasses.replace(result, params=result.params.to(CPU), payload=to_device(result.payload, CPU))


def personal_half(strategy: "Strategy", trainer: "LocalTrainer", params: torch.Tensor, data: "ClientData",
                  state: dict[str, Any], seed: int) -> torch.Tensor | None:
    """``strategy.personal_params`` on ``trainer.device``, as :func:`client_half` runs ``client_train``; the model it
    returns (None: the global one) on the CPU."""
    device = trainer.device
    if device.type == "cpu":
        return strategy.personal_params(trainer, params, data, state, seed)
    data = dataclasses.replace(data, x=data.x.to(device), y=data.y.to(device))
    _state_to(state, device)
    try:
        out = strategy.personal_params(trainer, params.to(device), data, state, seed)
    finally:
        _state_to(state, CPU)
    return None if out is None else out.to(CPU)
