"""Flower clients under hetfl's clock: a Flower ``client_fn`` as the client half of hetfl's strategies.

A user with a Flower app runs it in hetfl's simulator unchanged::

    client: flowerapp:client_fn        # in a config; or, from Python,
    ExperimentConfig(client=hetfl.flower.from_numpy_client(client_fn), ...)

``client_fn(context)`` returns a ``NumPyClient`` (or ``NumPyClient(...).to_client()``, or any Flower ``Client``);
the legacy ``client_fn(cid: str)`` works too. hetfl then trains and evaluates through it, and every strategy whose
client half is plain local training (FedAvg, FedProx, FedAdam, FedYogi, FedStale, FedVARP, FedAsync, FedBuff,
FedCompass, and a user's subclass that keeps :meth:`Strategy.client_train`) runs it under the device model, with
the usual metrics and reports. What plays which part:

- **Clients.** Client ``c`` (``0 <= c < data.n_clients``) is ``client_fn(context)`` with Flower's simulation
  convention: ``context.node_config`` holds ``partition-id`` = c and ``num-partitions`` = ``data.n_clients`` (and
  ``flower.node_config``), ``context.run_config`` is ``flower.run_config``, ``context.node_id`` is c and
  ``context.state`` is the client's own record, kept in memory for the run (not in checkpoints). As in Flower's
  simulation, ``client_fn`` is called anew for every fit and evaluate; each call runs with torch's, NumPy's global and
  Python's random streams seeded from the task (and restored after), so an unseeded ``DataLoader(shuffle=True)`` is
  deterministic. The data lives in the clients: hetfl's ``data`` section gives only ``n_clients``.
- **The model** is client 0's ``get_parameters``: its arrays, held as one float32 vector (float64 arrays are
  rounded to float32; integer and boolean arrays are averaged as floats and rounded back when sent).
- **A task** is ``fit(arrays, config)`` from the task's start model, with ``config`` = ``flower.fit_config`` plus
  ``server_round`` (the start model's version + 1), ``local_steps`` (the task's steps), ``local_epochs``,
  ``batch_size``, ``lr``, ``seed`` and the task's scalar options (FedProx's ``proximal_mu``). Its result is the
  returned arrays; its sample weight is ``num_examples`` as the client's calibration fit reported it (see below);
  its loss is ``metrics['loss']`` (or ``train_loss``) if the fit reports one.
- **Evaluation** is every client's ``evaluate(arrays, {'server_round': version, **flower.evaluate_config})``: its
  ``num_examples`` and ``metrics['accuracy']`` give the pooled accuracy (weighted by examples), the loss and the
  per-client numbers of ``metrics.jsonl``.
- **Pricing a task.** The simulator prices a task when it dispatches it, so the cost is measured before the run:
  each client's fit is run once (from the initial model, discarded) under torch's ``FlopCounterMode``, at the
  task's default steps, which also gives its ``num_examples``; with ``training.local_steps`` unset the default
  steps depend on ``num_examples``, so a first fit of one step finds it. A task of ``s`` steps costs ``s / s_c``
  times client ``c``'s measured FLOPs (``s_c``: its default steps). That assumes the fit's work follows
  ``config['local_steps']``; client 0 is fitted once more at another step count to check it. A client whose
  FLOPs do not follow it costs what it measured for a task of its default steps, and a strategy that asks for other
  step counts (FedCompass) is refused, before the run or at such a task. ``FlopCounterMode`` counts torch's
  matrix products and convolutions; a fit that runs no torch (NumPy, TensorFlow) measures 0 and needs
  ``flower.flops_per_step``. Bytes are those of the float32 vector down and up (the arrays' size when they are
  float32). Evaluation is not priced.

Refused in one line: strategies whose client half is not plain local training (SCAFFOLD's control variates, FedNova's
normalisation, Ditto, FedPer, FedRep, FedBN, the model-heterogeneous ones: each needs hetfl's own model or trainer),
stale-update recovery (it inverts gradients of hetfl's model), selections that read label histograms
(``hetero_select``) or, without a reported loss, losses (``oort``), the Ray backend (its workers rebuild hetfl's own
trainer), batched training (``training.vectorize: on``; ``auto`` trains one task at a time), ``model.zoo``, and
``hetfl server``/``hetfl client``, which deploy hetfl's own trainer.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hetfl.engine.backends import InProcess
from hetfl.engine.simulator import ClientModels
from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.strategies.base import ClientData, ClientResult, Strategy, Task
from hetfl.training.local import LocalResult, _stream_seed, short_error

if TYPE_CHECKING:
    from hetfl.config import ExperimentConfig, TrainingConfig
    from hetfl.engine.run import Federation
    from hetfl.engine.simulator import Simulator

INSTALL = "pip install hetfl[flower]"
KEY = "client"


def _flwr() -> Any:
    """The ``flwr`` package, or a one-line error saying how to install it."""
    try:
        import flwr.client
        import flwr.common  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"{KEY}: running a Flower client needs flwr, which does not import ({err}); {INSTALL}"
        ) from None
    return flwr


# --------------------------------------------------------------------------- the Python entry
class FlowerClientFn:
    """A Flower ``client_fn`` marked for hetfl (:func:`from_numpy_client`); called, it is the ``client_fn``.

    It carries the function's ``__module__`` and ``__qualname__``, so a config given it from Python records the same
    import path (``flowerapp:client_fn``) a config file would name, and ``--resume`` finds the function again.
    """

    def __init__(self, client_fn: Callable[..., Any]) -> None:
        self.client_fn = client_fn
        functools.update_wrapper(self, client_fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.client_fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"from_numpy_client({getattr(self.client_fn, '__qualname__', self.client_fn)!r})"


def from_numpy_client(client_fn: Callable[..., Any]) -> FlowerClientFn:
    """``client_fn`` (``context -> NumPyClient or Client``, or the legacy ``cid: str -> ...``) as hetfl's ``client``.

    Pass the result where a config takes a client: ``ExperimentConfig(client=from_numpy_client(client_fn), ...)``
    (or name the function in a config file, ``client: flowerapp:client_fn``: the same door). Its ``fit`` then trains
    and its ``evaluate`` scores, under hetfl's clock, strategies and device model (see :mod:`hetfl.flower`).
    """
    if isinstance(client_fn, FlowerClientFn):
        return client_fn
    _calling_convention(_unwrap(client_fn), getattr(client_fn, "__qualname__", repr(client_fn)))
    return FlowerClientFn(client_fn)


def _unwrap(fn: Any) -> Any:
    return fn.client_fn if isinstance(fn, FlowerClientFn) else fn


def _calling_convention(fn: Any, label: str) -> str:
    """``context`` (Flower's ``client_fn(context)``) or ``cid`` (the legacy ``client_fn(cid: str)``); a one-line
    ConfigError for anything else (a ClientApp, a function of no or several arguments)."""
    if type(fn).__name__ == "ClientApp":
        raise ConfigError(
            f"{KEY}: {label} is a Flower ClientApp; name the client_fn it is built from (ClientApp(client_fn=...)): "
            "hetfl calls the client_fn's fit and evaluate itself (a ClientApp of @app.train() functions cannot be run)"
        )
    if not callable(fn):
        raise ConfigError(f"{KEY}: {label} is not a function; expected a Flower client_fn (context -> Client)")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return "context"
    if len(params) != 1:
        raise ConfigError(
            f"{KEY}: {label} takes {len(params)} required arguments; a Flower client_fn takes one, the Context "
            "(def client_fn(context: Context) -> Client)"
        )
    annotation = params[0].annotation
    if params[0].name == "cid" or annotation is str or annotation == "str":
        return "cid"
    return "context"


# --------------------------------------------------------------------------- arrays <-> one vector
@dataclass(frozen=True)
class ArraySpec:
    """The shapes and dtypes of a client's arrays, and each one's place in hetfl's flat float32 vector."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, arrays: Sequence[Any], where: str) -> "ArraySpec":
        if not isinstance(arrays, (list, tuple)) or not arrays:
            raise ConfigError(
                f"{KEY}: {where} gave {_what(arrays)}; expected a non-empty list of NumPy arrays (the model)"
            )
        arrays = [np.asarray(a) for a in arrays]
        bad = [i for i, a in enumerate(arrays) if a.dtype.kind not in "fiub"]
        if bad:
            raise ConfigError(f"{KEY}: {where} gave array {bad[0]} of dtype {arrays[bad[0]].dtype}; expected numbers")
        return cls(tuple(a.shape for a in arrays), tuple(a.dtype for a in arrays))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, arrays: Sequence[Any], where: str) -> torch.Tensor:
        """``arrays`` as one float32 vector; a one-line HetflError if they are not this spec's (count and shapes)."""
        if not isinstance(arrays, (list, tuple)):
            raise HetflError(f"{KEY}: {where} returned {_what(arrays)} as its arrays; expected a list of NumPy arrays")
        arrays = [np.asarray(a) for a in arrays]
        shapes = tuple(a.shape for a in arrays)
        if shapes != self.shapes:
            raise HetflError(
                f"{KEY}: {where} returned {len(arrays)} arrays of shapes {_shapes(shapes)}; expected the "
                f"{len(self.shapes)} of get_parameters, {_shapes(self.shapes)}"
            )
        flat = np.concatenate([a.reshape(-1).astype(np.float32, copy=False) for a in arrays]) if arrays else np.zeros(0)
        return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))

    def unflatten(self, flat: torch.Tensor) -> list[np.ndarray]:
        """The arrays of ``flat``, each a fresh copy in its own shape and dtype (integers and booleans rounded)."""
        values = flat.detach().cpu().numpy()
        out, offset = [], 0
        for shape, dtype, size in zip(self.shapes, self.dtypes, self.sizes):
            part = values[offset : offset + size].reshape(shape)
            offset += size
            if dtype.kind in "iub":
                part = np.rint(part)
            out.append(part.astype(dtype, copy=True))
        return out


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    text = ", ".join(str(tuple(s)) for s in shapes[:4])
    return f"[{text}{', ...' if len(shapes) > 4 else ''}]"


def _what(value: Any) -> str:
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- calling the user's clients
class _Seeded:
    """torch's, NumPy's global and Python's random streams seeded from ``seed`` inside the block, restored after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (torch.default_generator.get_state(), np.random.get_state(), random.getstate())
        stream = _stream_seed(self.seed)
        torch.default_generator.manual_seed(stream)
        np.random.seed(stream % 2**32)
        random.seed(stream)

    def __exit__(self, *exc: Any) -> bool:
        torch_state, np_state, py_state = self.saved
        torch.default_generator.set_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
        return False


@dataclass
class FlowerClients:
    """The user's ``client_fn`` and what each call gets: a Context per client (kept for the run), the run's configs.

    :meth:`fit`, :meth:`evaluate` and :meth:`get_parameters` each build the client anew (``client_fn(context)``, as
    Flower's simulation does for every message) inside a seeded block, and turn whatever the user's code raises into
    a one-line :class:`HetflError` naming the client and the call (``HETFL_DEBUG=1``: the exception itself).
    """

    client_fn: Callable[..., Any]
    label: str  # the import path, for messages
    n_clients: int
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    fit_config: dict[str, Any]
    evaluate_config: dict[str, Any]
    convention: str = "context"
    contexts: dict[int, Any] = field(default_factory=dict)

    def context(self, client: int) -> Any:
        if client not in self.contexts:
            from flwr.common import Context, RecordDict

            node_config = {**self.node_config, "partition-id": client, "num-partitions": self.n_clients}
            self.contexts[client] = Context(
                run_id=0, node_id=client, node_config=node_config, state=RecordDict(), run_config=dict(self.run_config)
            )
        return self.contexts[client]

    def _client(self, client: int) -> Any:
        """``client_fn``'s client for ``client``, as an object with NumPyClient's methods."""
        flwr = _flwr()
        made = self.client_fn(str(client) if self.convention == "cid" else self.context(client))
        numpy_client = getattr(made, "numpy_client", None)  # NumPyClient(...).to_client() keeps the NumPyClient here
        if isinstance(numpy_client, flwr.client.NumPyClient):
            return numpy_client
        if isinstance(made, flwr.client.NumPyClient):
            return made
        if isinstance(made, flwr.client.Client):
            return _ClientAsNumPy(made)
        raise HetflError(
            f"{KEY}: {self.label} returned {_what(made)} for client {client}; expected a Flower Client "
            "(NumPyClient(...).to_client()) or a NumPyClient"
        )

    def call(self, client: int, what: str, seed: int, method: Callable[[Any], Any]) -> Any:
        """``method(client_fn's client)`` inside the seeded block; the user's exception as one line."""
        try:
            with _Seeded(seed):
                return method(self._client(client))
        except HetflError:
            raise
        except Exception as err:
            if os.environ.get("HETFL_DEBUG"):
                raise
            raise HetflError(f"{KEY}: {self.label}: {what} of client {client} raised {short_error(err)}") from None

    def get_parameters(self, client: int, seed: int) -> list[Any]:
        return self.call(client, "get_parameters", seed, lambda c: c.get_parameters({}))

    def fit(
        self, client: int, arrays: list[np.ndarray], config: dict[str, Any], seed: int
    ) -> tuple[list[Any], int, dict[str, Any]]:
        result = self.call(client, "fit", seed, lambda c: c.fit(arrays, config))
        if not (isinstance(result, (tuple, list)) and len(result) == 3 and isinstance(result[2], dict)
                and _is_count(result[1])):
            raise HetflError(
                f"{KEY}: {self.label}: fit of client {client} returned {_what(result)}; expected (arrays, "
                "num_examples, metrics), as NumPyClient.fit does"
            )
        return result[0], int(result[1]), result[2]

    def evaluate(
        self, client: int, arrays: list[np.ndarray], config: dict[str, Any], seed: int
    ) -> tuple[float, int, dict[str, Any]]:
        result = self.call(client, "evaluate", seed, lambda c: c.evaluate(arrays, config))
        if not (isinstance(result, (tuple, list)) and len(result) == 3 and isinstance(result[2], dict)
                and _is_count(result[1]) and _is_number(result[0])):
            raise HetflError(
                f"{KEY}: {self.label}: evaluate of client {client} returned {_what(result)}; expected (loss, "
                "num_examples, metrics), as NumPyClient.evaluate does"
            )
        return float(result[0]), int(result[1]), result[2]


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class _ClientAsNumPy:
    """A Flower ``Client`` (not made from a NumPyClient) behind NumPyClient's methods, through its messages."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        from flwr.common import GetParametersIns, parameters_to_ndarrays

        return parameters_to_ndarrays(self.client.get_parameters(GetParametersIns(config=config)).parameters)

    def fit(self, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        res = self.client.fit(FitIns(parameters=ndarrays_to_parameters(arrays), config=config))
        return parameters_to_ndarrays(res.parameters), res.num_examples, dict(res.metrics)

    def evaluate(self, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        from flwr.common import EvaluateIns, ndarrays_to_parameters

        res = self.client.evaluate(EvaluateIns(parameters=ndarrays_to_parameters(arrays), config=config))
        return float(res.loss), res.num_examples, dict(res.metrics)


def _loss(metrics: dict[str, Any]) -> float:
    for key in ("loss", "train_loss"):
        if _is_number(metrics.get(key)):
            return float(metrics[key])
    return math.nan


# --------------------------------------------------------------------------- the trainer, the pool, the evaluator
class FlowerTrainer:
    """The :class:`~hetfl.training.LocalTrainer` interface the strategies' client halves use, over Flower clients.

    ``train`` is ``fit`` of the task's client (the task is set by :class:`FlowerBackend` at its arrival);
    ``initial`` the model of client 0's ``get_parameters``; ``steps_for`` the same rule as hetfl's trainer
    (``training.local_steps``, else ``local_epochs`` passes of ``batch_size``).
    """

    n_buffers = 0
    head = None
    key = KEY
    device = torch.device("cpu")  # where hetfl's side of a task lives; the Flower client computes where it likes

    def __init__(self, clients: FlowerClients, spec: ArraySpec, initial: torch.Tensor, cfg: "TrainingConfig") -> None:
        self.clients, self.spec, self.initial = clients, spec, initial
        self.cfg = cfg.model_copy(update={"vectorize": "off"})
        self.label = clients.label
        self.reference: FlowerTrainer = self
        self.task: Task | None = None  # the task being trained (FlowerBackend.result)
        self.sim: Simulator | None = None
        self.default_steps: np.ndarray = np.zeros(0, dtype=np.int64)  # each client's steps at calibration
        self.honours_steps = True  # whether the fit's FLOPs follow config['local_steps'] (calibration)
        self.steps_note = ""  # the measurement behind honours_steps, for messages
        self.calibration_loss: np.ndarray = np.zeros(0)  # each client's loss in its calibration fit (nan: none)

    @property
    def numel(self) -> int:
        return self.spec.numel

    def steps_for(self, n_samples: int) -> int:
        if self.cfg.local_steps is not None:
            return self.cfg.local_steps
        return max(1, math.ceil(self.cfg.local_epochs * n_samples / self.cfg.batch_size))

    def fit_config(self, *, steps: int, server_round: int, seed: int, lr: float | None = None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config of a fit: ``flower.fit_config``, then hetfl's keys and the task's scalar options."""
        config = {**self.clients.fit_config, "server_round": server_round, "local_steps": int(steps),
                  "local_epochs": float(self.cfg.local_epochs), "batch_size": int(self.cfg.batch_size),
                  "lr": float(self.cfg.lr if lr is None else lr), "seed": int(seed)}
        for name, value in (options or {}).items():
            if isinstance(value, torch.Tensor) or value is None:
                raise HetflError(
                    f"{KEY}: the task's option {name} is a tensor, which a Flower fit's config cannot carry"
                )
            config["proximal_mu" if name == "prox_mu" else name] = value
        return config

    def train(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int,
              lr: float | None = None, correction: torch.Tensor | None = None, grad_mask: torch.Tensor | None = None,
              regularizer: Any = None, **options: Any) -> LocalResult:
        """The task's client's ``fit`` from ``params``: its arrays as the new model, its reported loss."""
        task = self.task
        if task is None:
            raise RuntimeError("FlowerTrainer.train trains the task FlowerBackend gives it; none is set")
        if correction is not None or grad_mask is not None or regularizer is not None:
            raise HetflError(f"{KEY}: a Flower client's fit trains plainly; this strategy's client half asks for more")
        client = task.client_id
        if not self.honours_steps and steps != int(self.default_steps[client]):
            raise HetflError(
                f"{KEY}: the strategy asks client {client} for {steps} local steps, and {self.label}'s fit does not "
                f"follow config['local_steps'] ({self.steps_note}), so hetfl cannot price the task; train "
                "config['local_steps'] steps in fit, or use a strategy that gives every task the default steps"
            )
        if options.get("prox_mu", None) == 0.0:
            options.pop("prox_mu")
        config = self.fit_config(steps=steps, server_round=task.version + 1, seed=seed, lr=lr, options=options)
        arrays, _, metrics = self.clients.fit(client, self.spec.unflatten(params), config, seed)
        new = self.spec.flatten(arrays, f"{self.label}: fit of client {client}")
        if not torch.isfinite(new).all():
            raise DivergedError(
                f"{KEY}: fit of client {client} returned non-finite parameters; lower its learning rate"
            )
        return LocalResult(new, steps, _loss(metrics))

    def batching_problem(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        return "a Flower client trains in its own fit, one task at a time"

    def head_problem(self) -> str | None:
        return "is a Flower client's model, which hetfl holds only as arrays"

    def backend(self) -> "FlowerBackend":
        return FlowerBackend(self)


class FlowerBackend(InProcess):
    """Client halves run in this process, one at a time, through the Flower clients: the in-process backend that
    tells the :class:`FlowerTrainer` which task it trains (the client and the start model's version)."""

    name = "flower"

    def __init__(self, trainer: FlowerTrainer) -> None:
        super().__init__("off")
        self.trainer = trainer

    def bind(self, sim: "Simulator") -> None:
        super().bind(sim)
        self.trainer.sim = sim

    def result(self, task: Task, data: ClientData, state: dict[str, Any]) -> ClientResult:
        self.trainer.task = task
        try:
            return super().result(task, data, state)
        finally:
            self.trainer.task = None


class FlowerPool:
    """The clients' data as the simulator sees it: only each client's ``num_examples`` (the data is the client's).

    ``data(c, t)`` is ``num_examples`` rows of no features (so ``n_samples`` weighs the update) and label 0.
    """

    n_classes = 1
    drift = None

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)

    @property
    def n_clients(self) -> int:
        return len(self.counts)

    def n_samples(self, client_id: int) -> int:
        return int(self.counts[client_id])

    def sample_counts(self) -> np.ndarray:
        return self.counts.copy()

    def data(self, client_id: int, t: float = 0.0) -> ClientData:
        n = int(self.counts[client_id])
        return ClientData(client_id, torch.empty((n, 0)), torch.zeros(n, dtype=torch.int64))


class FlowerEvaluator:
    """Every client's ``evaluate`` of the global model: the pooled accuracy and loss (weighted by each client's
    ``num_examples``) and the per-client accuracies (clients that evaluated at least one example)."""

    def __init__(self, trainer: FlowerTrainer, seed: int) -> None:
        self.trainer, self.seed = trainer, seed
        self._last: tuple[int, torch.Tensor, Any] | None = None  # the last scores (round 0 repeats the build's)

    def scores(self, params: torch.Tensor, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each client's (num_examples, loss, accuracy) for the model ``params``."""
        last = self._last
        if last is not None and last[0] == version and torch.equal(last[1], params):
            return last[2]
        scores = self._scores(params, version)
        self._last = (version, params.clone(), scores)
        return scores

    def _scores(self, params: torch.Tensor, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        trainer, clients = self.trainer, self.trainer.clients
        config = {**clients.evaluate_config, "server_round": int(version)}
        n, loss, acc = (np.zeros(clients.n_clients) for _ in range(3))
        for c in range(clients.n_clients):
            seed = int(np.random.SeedSequence([self.seed, 7, c, version]).generate_state(1)[0])
            loss[c], n[c], metrics = clients.evaluate(c, trainer.spec.unflatten(params), dict(config), seed)
            if n[c] > 0:
                if not _is_number(metrics.get("accuracy")):
                    raise HetflError(
                        f"{KEY}: {clients.label}: evaluate of client {c} returned metrics {sorted(metrics)} without a "
                        "number 'accuracy'; hetfl's accuracy, target and reports need it (return {'accuracy': ...})"
                    )
                acc[c] = float(metrics["accuracy"])
        if not n.sum():
            raise HetflError(f"{KEY}: {clients.label}: no client's evaluate scored an example (num_examples 0 for all)")
        return n, loss, acc

    def __call__(self, params: torch.Tensor, t: float = 0.0) -> dict[str, float]:
        sim = self.trainer.sim
        n, loss, acc = self.scores(params, sim.version if sim is not None else 0)
        scored = n > 0
        return {
            "accuracy": float((acc * n).sum() / n.sum()),
            "loss": float((loss * n).sum() / n.sum()),
            "client_acc_mean": float(acc[scored].mean()),
            "client_acc_p10": float(np.percentile(acc[scored], 10)),
            "client_acc_min": float(acc[scored].min()),
        }

    def personal(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        raise HetflError(f"{KEY}: a Flower client has no personal model for hetfl to score")


class FlowerModels(ClientModels):
    """One "architecture" (the Flower client's model) whose local step costs each client what its fit measured."""

    per_client: np.ndarray  # FLOPs of one local step, by client

    @classmethod
    def measured(cls, trainer: FlowerTrainer, per_client: np.ndarray) -> "FlowerModels":
        of_client = np.zeros(len(per_client), dtype=np.int64)
        models = cls([trainer], [float(np.mean(per_client))], of_client)  # type: ignore[list-item]
        models.per_client = np.asarray(per_client, dtype=np.float64)
        return models

    def flops(self, client_id: int, n_samples: int | None = None) -> float:  # measured on the client's own batches
        return float(self.per_client[client_id])


@dataclass
class FlowerData:
    """What the run knows of the clients' data: their counts, as their calibration fits and first evaluation said."""

    label: str
    train_sizes: np.ndarray
    test_sizes: np.ndarray
    calibration: dict[str, Any]
    sequence_targets: bool = False
    drift: Any = None

    @property
    def n_clients(self) -> int:
        return len(self.train_sizes)

    @property
    def dataset(self) -> Any:
        raise HetflError(
            f"{KEY}: {self.label} is a Flower client, run in hetfl's simulator (hetfl run, hetfl compare); its data "
            "and model are its own, so hetfl server and hetfl client, which deploy hetfl's own trainer, cannot run it"
        )

    def describe(self, fed: "Federation", strategy: Strategy) -> str:
        trainer: FlowerTrainer = fed.trainer  # type: ignore[assignment]
        speeds = np.asarray(fed.profiles.speed)
        per_task = np.asarray(self.calibration["task_flops"])
        steps = ("follow config['local_steps']" if trainer.honours_steps
                 else f"ignore config['local_steps'] ({trainer.steps_note})")
        return (
            f"Flower client {self.label}: {self.n_clients} clients ({int(self.train_sizes.sum())} train / "
            f"{int(self.test_sizes.sum())} test examples, as fit and evaluate report them); {len(trainer.spec.shapes)} "
            f"arrays, {trainer.numel:,} entries, {strategy.describe_transfer(trainer)}; measured "
            f"{per_task.min() / 1e6:.2f} to {per_task.max() / 1e6:.2f} MFLOP a task of default steps "
            f"(its FLOPs {steps}); "
            f"{self.calibration['fits']} calibration fits in {self.calibration['seconds']:.1f} s; device speeds span "
            f"{float(speeds.max() / speeds.min()):.1f}x"
        )


# --------------------------------------------------------------------------- building the federation
def _measure(clients: FlowerClients, trainer: FlowerTrainer, client: int, arrays: list[np.ndarray], steps: int,
             seed: int) -> tuple[float, int, float]:
    """FLOPs, num_examples and loss of one calibration fit of ``client`` at ``steps`` local steps from ``arrays``."""
    from torch.utils.flop_counter import FlopCounterMode

    config = trainer.fit_config(steps=steps, server_round=0, seed=seed)
    counter = FlopCounterMode(display=False)
    with counter:
        new, n, metrics = clients.fit(client, [a.copy() for a in arrays], config, seed)
    trainer.spec.flatten(new, f"{clients.label}: fit of client {client}")  # the arrays must be the model's
    return float(counter.get_total_flops()), n, _loss(metrics)


def build_federation(cfg: "ExperimentConfig") -> "Federation":
    """The federation of a config whose ``client`` names a Flower client_fn: its clients calibrated (module docstring).

    Called by :func:`hetfl.engine.run.build_federation` when ``cfg.client`` is set.
    """
    from hetfl import registry
    from hetfl.devices import build_profiles
    from hetfl.engine.run import Federation

    _flwr()
    from hetfl.strategies import build_strategy

    _check_client_half(build_strategy(cfg.strategy, cfg.training, cfg.model), cfg)  # before the calibration's fits
    started = time.perf_counter()
    record = cfg.code.get(KEY)
    search = [record.root] if record is not None else []
    resolved = registry.resolve("client", cfg.client, key=KEY, search=[*search, os.getcwd()])  # type: ignore[arg-type]
    client_fn = _unwrap(resolved.obj)
    label = resolved.path
    n = cfg.data.n_clients
    fl = cfg.flower
    clients = FlowerClients(client_fn, label, n, dict(fl.run_config), dict(fl.node_config), dict(fl.fit_config),
                            dict(fl.evaluate_config), _calling_convention(client_fn, label))

    def seed(*path: int) -> int:
        return int(np.random.SeedSequence([cfg.seed, 6, *path]).generate_state(1)[0])

    first = clients.get_parameters(0, seed(0))
    spec = ArraySpec.of(first, f"{label}: get_parameters of client 0")
    initial = spec.flatten(first, f"{label}: get_parameters of client 0")
    trainer = FlowerTrainer(clients, spec, initial, cfg.training)
    arrays = spec.unflatten(initial)

    counts = np.zeros(n, dtype=np.int64)
    default_steps = np.zeros(n, dtype=np.int64)
    task_flops = np.zeros(n)
    losses = np.zeros(n)
    fits, seen = 0, {}  # seen: client 0's FLOPs by step count
    for c in range(n):
        steps = int(cfg.training.local_steps) if cfg.training.local_steps is not None else 1
        flops, counts[c], losses[c] = _measure(clients, trainer, c, arrays, steps, seed(1, c))
        fits += 1
        default_steps[c] = trainer.steps_for(int(counts[c]))
        if default_steps[c] != steps:  # local_epochs: the default steps follow num_examples, known only now
            if c == 0:
                seen[steps] = flops
            flops, counts[c], losses[c] = _measure(clients, trainer, c, arrays, int(default_steps[c]), seed(2, c))
            fits += 1
            if trainer.steps_for(int(counts[c])) != default_steps[c]:
                raise HetflError(f"{KEY}: {label}: fit of client {c} reported different num_examples on two calls")
        task_flops[c] = flops
    # does the fit's work follow config['local_steps']? client 0 at a second step count (measured already, or now)
    s0 = int(default_steps[0])
    if not seen:
        other = 1 if s0 > 1 else 2
        seen[other] = _measure(clients, trainer, 0, arrays, other, seed(3))[0]
        fits += 1
    (other, probe), = seen.items()
    if task_flops[0] > 0:
        ratio = probe / task_flops[0]
        trainer.honours_steps = bool(abs(ratio - other / s0) <= abs(ratio - 1.0))
        trainer.steps_note = (f"client 0's fit measured {task_flops[0] / 1e6:.3g} MFLOP at {s0} steps and "
                              f"{probe / 1e6:.3g} at {other}")
    if fl.flops_per_step is not None:
        per_step = np.full(n, float(fl.flops_per_step))
        trainer.honours_steps, trainer.steps_note = True, "flower.flops_per_step given"
        task_flops = per_step * default_steps
    else:
        if not task_flops.all():
            c = int(np.flatnonzero(task_flops == 0)[0])
            raise ConfigError(
                f"{KEY}: {label}: fit of client {c} ran no torch operation FlopCounterMode counts (0 FLOPs), so "
                "hetfl cannot price its compute time; set flower.flops_per_step (FLOPs of one local step)"
            )
        per_step = task_flops / default_steps
    trainer.default_steps = default_steps
    trainer.calibration_loss = losses
    models = FlowerModels.measured(trainer, per_step)
    evaluator = FlowerEvaluator(trainer, cfg.seed)
    test_sizes, _, _ = evaluator.scores(initial, 0)
    profiles = build_profiles(cfg.devices, n, np.random.default_rng([cfg.seed, 4]))
    calibration = {"fits": fits, "seconds": time.perf_counter() - started, "task_flops": task_flops.tolist()}
    data = FlowerData(label, counts, test_sizes.astype(np.int64), calibration)
    pool = FlowerPool(counts)
    step = float(per_step.mean())
    return Federation(cfg, data, profiles, trainer, evaluator, pool, step, models)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- which strategies can run it
def check_strategy(strategy: Strategy, trainer: Any, cfg: "ExperimentConfig") -> None:
    """Refuse, in one line, a strategy that cannot run a Flower client (called by ``Federation.strategy``)."""
    if not isinstance(trainer, FlowerTrainer):
        return
    _check_client_half(strategy, cfg)
    name = strategy.name
    selection = cfg.strategy.selection.name
    if selection == "oort" and np.isnan(trainer.calibration_loss).any():
        raise ConfigError(f"strategy.selection.name: oort ranks clients by their training loss, and {trainer.label}'s "
                          "fit reports none; return metrics {'loss': ...} from fit, or use random selection")
    if not trainer.honours_steps and name == "fedcompass":
        raise ConfigError(
            f"strategy.name: fedcompass gives each client its own number of local steps, and {trainer.label}'s fit "
            f"does not follow config['local_steps'] ({trainer.steps_note}); train config['local_steps'] steps in fit"
        )


def _check_client_half(strategy: Strategy, cfg: "ExperimentConfig") -> None:
    """What the strategy's class and parameters rule out, known before the clients are calibrated."""
    name = strategy.name
    why = None
    if type(strategy).client_train is not Strategy.client_train:
        why = (f"its client half ({type(strategy).__name__}.client_train) is more than plain local training and "
               "needs hetfl's own trainer and model")
    elif strategy.model_heterogeneous or not strategy.global_model:
        why = "it is model-heterogeneous (clients keep parts of hetfl's own models)"
    elif strategy.personalised:
        why = "it is personalised (clients keep models of their own, which a Flower client does not give hetfl)"
    elif strategy.upload_copies != 1:
        why = "its clients upload more than the model"
    if why is not None:
        raise ConfigError(
            f"strategy.name: {name} cannot run a Flower client: {why}; use one whose client half is the fit alone "
            "(fedavg, fedprox, fedadam, fedyogi, fedstale, fedvarp, fedasync, fedbuff, fedcompass)"
        )
    if getattr(strategy, "recovery", None) is not None:
        raise ConfigError(
            f"strategy.params.recovery: stale-update recovery inverts gradients of hetfl's own model; {name} runs a "
            "Flower client, whose model is inside its fit"
        )
    if cfg.strategy.selection.name == "hetero_select":
        raise ConfigError("strategy.selection.name: hetero_select reads the clients' label histograms, which a Flower "
                          "client keeps to itself; use random or oort")
