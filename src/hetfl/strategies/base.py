"""The one strategy interface every algorithm implements, and the server it talks to.

A strategy is event-driven. The engine (the virtual-clock simulator, whose client halves may run
on Ray workers, or a gRPC deployment) calls its hooks when something happens:

- ``start(server)``: the federation is ready; dispatch the first tasks.
- ``on_update(server, update)``: client ``update.client_id`` returned ``update`` at ``server.now``.
- ``on_failure(server, task)``: a client lost its task (went offline or dropped out).
- ``on_timer(server, tag)``: a timer the strategy set has fired (round deadlines, group deadlines).

A deployed server (:mod:`hetfl.deploy.engine`) also asks ``expected_payload(server, task)``: the tensors a client
half returns besides its parameters, checked before ``on_update`` sees them. There an exception raised by
``on_update`` rejects that update: the strategy's state is restored as it was before the call (its containers
copied, tensors and tasks shared: a hook must not change a tensor in place before it may raise) unless the hook
committed an aggregation first, and the server's dispatches and timers of the call are withdrawn. An exception in
``on_failure`` or ``on_timer`` is logged and the state kept as the hook left it.

It answers through the :class:`Server`: ``dispatch`` work to clients, ``cancel`` tasks it no longer
wants, ``set_timer``, and ``commit`` a new global model (one aggregation = one server version).

The client half of an algorithm, :meth:`Strategy.client_train`, runs where the data is and sees
only the task and the client's own state, so the same class runs in a simulation and on a real client
(or a Ray worker, which holds a copy of the strategy as it was built: the client half must not read what
the server half changes during a run). When it is plain local training, :meth:`Strategy.local_training` says so, and the simulator may
train many such tasks together (``training.vectorize``) with the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from hetfl.compression import Compression
    from hetfl.training import LocalTrainer


@dataclass
class Task:
    """Work sent to one client: start from ``params`` (global version ``version``), run ``steps`` steps."""

    task_id: int
    client_id: int
    version: int
    params: torch.Tensor
    steps: int
    dispatched_at: float
    payload: dict[str, torch.Tensor] = field(default_factory=dict)  # extra tensors sent (counted in bytes)
    options: dict[str, Any] = field(default_factory=dict)  # scalars for the client half (e.g. prox_mu)
    bytes_up: int = 0  # what the client's upload will carry (Strategy.transfer_bytes, fixed at dispatch)
    flops: float = 0.0  # what the client computes for it (Strategy.task_flops, fixed at dispatch)
    steps_asked: int | None = None  # partial work: the steps asked for, when the engine cut ``steps`` to a deadline
    timing: Any = None  # the simulator's TaskTiming for it (wait, download, compute, upload), fixed at dispatch


@dataclass
class Update:
    """What a client returned for ``task``."""

    task: Task
    params: torch.Tensor  # the client's model after local training
    n_samples: int
    steps: int
    loss: float
    arrived_at: float
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # scalars (e.g. FedNova's a_i)

    @property
    def client_id(self) -> int:
        return self.task.client_id

    @property
    def delta(self) -> torch.Tensor:
        """Model change: client's result minus the model it started from."""
        return self.params - self.task.params

    @property
    def staleness(self) -> int:
        """How many aggregations happened since the task was dispatched (0 for synchronous rounds)."""
        return self.arrived_version - self.task.version

    arrived_version: int = 0


@dataclass
class ClientData:
    """A client's local training data, as the client half of a strategy sees it.

    ``x``, ``y``: its labelled samples (every training sample unless ``data.labelled_fraction`` < 1).
    ``x_unlabelled``: the features of its unlabelled samples, without labels (None when it has none); only
    semi-supervised algorithms (semipfl) read them."""

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    x_unlabelled: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])


@dataclass
class ClientResult:
    params: torch.Tensor
    steps: int
    loss: float
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


BATCHABLE_OPTIONS = frozenset({"lr", "prox_mu", "correction", "grad_mask"})
"""``Task.options`` that :func:`hetfl.training.vectorized.train_many` takes as keyword arguments."""


class Server(Protocol):
    """What a strategy may ask of the engine. Implemented by the simulator (and later backends).

    Optionally, ``client_store``: a :class:`~hetfl.engine.store.ParamStore` for tensors a strategy keeps per
    client (FedStale's stored updates), under the run's memory budget; a strategy asks for it with
    ``getattr(server, "client_store", None)`` and keeps a plain dict when the engine has none.
    """

    now: float  # simulated seconds (wall seconds in a real deployment)
    version: int  # number of aggregations so far
    params: torch.Tensor  # current global model (flat)
    rng: np.random.Generator  # the server's random stream (client sampling)
    n_clients: int
    trainer: "LocalTrainer"  # the reference architecture, for server-side computation (stale-update recovery)
    profiles: Sequence[Any]  # each client's DeviceProfile, as the devices registered (the simulator: a DeviceTable)

    def available(self) -> list[int]: ...  # clients online and without a task, sorted

    def next_available_time(self) -> float: ...  # when the next idle client comes online (inf if never)

    def num_samples(self, client_id: int) -> int: ...

    def default_steps(self, client_id: int) -> int: ...

    def step_flops(self, client_id: int) -> float: ...  # FLOPs of one local step of the client's architecture

    def dispatch(
        self,
        client_id: int,
        *,
        steps: int | None = None,
        payload: dict[str, torch.Tensor] | None = None,
        options: dict[str, Any] | None = None,
        finish_by: float | None = None,
    ) -> Task: ...  # finish_by (the simulator's partial work): train only the steps that arrive by then

    def cancel(self, task: Task) -> None: ...  # the task's result is no longer wanted (never computed)

    def server_work(self, flops: float) -> None: ...  # the server's own work, timed where server.flops is set

    def set_timer(self, at: float, tag: str) -> Any: ...

    def cancel_timer(self, handle: Any) -> None: ...

    def commit(self, params: torch.Tensor, updates: list[Update], *, dropped: int = 0) -> None: ...

    @property
    def stopping(self) -> bool: ...  # True once the run has met a stop condition


def buffer_entries(server: Server) -> int:
    """How many entries at the front of the flat model vector are the model's buffers (BatchNorm statistics:
    ``server.trainer.n_buffers``); 0 for a server without a trainer (a test's stand-in)."""
    return getattr(getattr(server, "trainer", None), "n_buffers", 0)


class Strategy:
    """Base class: subclasses override the hooks they need.

    ``upload_copies`` is how many tensors of the server's parameters' size a client sends back
    (SCAFFOLD: 2), so the engine can time the upload before the client has computed anything.

    ``global_model``: ``server.params`` is a model of the reference architecture, which the engine
    evaluates as the global model. Strategies whose server holds something else (a classifier head,
    class prototypes, adapters) set it False, and clients' own models are evaluated instead.
    ``model_heterogeneous``: the strategy works when clients train different architectures (a
    model zoo); the client half then gets the trainer of the client's own architecture.
    """

    name: ClassVar[str] = "base"
    upload_copies: ClassVar[int] = 1
    personalised: ClassVar[bool] = False  # clients use their own models (see personal_params)
    global_model: ClassVar[bool] = True
    model_heterogeneous: ClassVar[bool] = False
    # aggregation is the sample-weighted mean of the updates (FedAvg, FedProx), so a deployment may aggregate
    # securely: the server then sees only the cohort's sum (hetfl.deploy, deploy.secure_aggregation)
    linear_aggregation: ClassVar[bool] = False
    # the upload is a change of the global model that may be sent compressed (strategy.compression); a strategy that
    # needs its clients' exact changes sets it False
    compressible: ClassVar[bool] = True
    compression: "Compression | None" = None  # strategy.compression, set by build_strategy (hetfl.compression)

    def initial_params(self, trainer: "LocalTrainer") -> torch.Tensor:
        """The server's parameters before the first aggregation, given the reference architecture's
        ``trainer``: its initial model by default."""
        return trainer.initial.clone()

    def start(self, server: Server) -> None:
        raise NotImplementedError

    def on_update(self, server: Server, update: Update) -> None:
        raise NotImplementedError

    def on_failure(self, server: Server, task: Task) -> None:
        """A client lost its task; by default nothing waits on it."""

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The extra tensors (``ClientResult.payload``) the client half returns for ``task``: name -> (shape, dtype).

        A deployed server accepts an update only if its payload is exactly this, every float finite
        (:func:`hetfl.deploy.validate.check_payload`), as it checks the parameters: an unknown, missing or
        misshaped tensor from a client is rejected before the strategy sees it. None by default; a strategy whose
        client half returns a payload (SCAFFOLD's ``delta_c``) must declare it here."""
        return {}

    def upload_reference(self, server: Server, task: Task) -> torch.Tensor:
        """The value, before training, of what ``task``'s client half returns as its parameters
        (``ClientResult.params``): a deployed server accepts an upload only of this tensor's shape and dtype, and
        bounds its change from it (:func:`hetfl.deploy.validate.check_update`). By default the model the task
        started from, ``task.params``; a strategy whose clients send back a part returns that part's start (HDEE
        its domain's expert, FedConv the client's sub-model)."""
        return task.params

    def on_timer(self, server: Server, tag: str) -> None:
        """A timer fired; strategies that set timers override this."""

    def on_proceed(self, server: Server) -> None:
        """The run goes on after a stop (more rounds) while tasks are still in flight: dispatch what the
        stop held back. (With nothing in flight the engine calls ``start`` again instead.)"""

    def client_train(
        self, trainer: "LocalTrainer", task: Task, data: ClientData, state: dict[str, Any], seed: int
    ) -> ClientResult:
        """The client half: plain local training. ``state`` persists on the client between tasks.

        It may read its arguments and the strategy's parameters (what the constructor and the ``check_*``
        hooks set), never what the server half changes during the run: a Ray worker runs it on a copy of the
        strategy made before the run started (:mod:`hetfl.engine.backends`)."""
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed, **task.options)
        return ClientResult(result.params, result.steps, result.loss)

    def local_training(self, task: Task) -> dict[str, Any] | None:
        """The keyword arguments of :func:`hetfl.training.vectorized.train_many` that train ``task``
        (``lr``, ``prox_mu``, ``correction``, ``grad_mask``), when the client half is plain local training
        that the engine may batch with other tasks; None when it does something else.

        By default: ``task.options`` when :meth:`client_train` is this class's (``trainer.train(task.params,
        ..., **task.options)``, which FedAvg, FedProx and the asynchronous strategies use) and the options
        are ones ``train_many`` takes; None for any strategy that overrides :meth:`client_train` (Ditto,
        SCAFFOLD, FedNova, ...), which must then override this hook too if its client half can be batched.
        """
        if type(self).client_train is not Strategy.client_train or not set(task.options) <= BATCHABLE_OPTIONS:
            return None
        return dict(task.options)

    def personal_params(
        self, trainer: "LocalTrainer", params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int
    ) -> torch.Tensor | None:
        """The client half at evaluation: the model this client would use, given the global ``params``,
        its training ``data`` and its persisted ``state``; None means the global model itself.

        Only asked of strategies with ``personalised = True``; it must not change ``state``.
        """
        return None

    def scorer(self, trainer: "LocalTrainer") -> Any:
        """What scores the models :meth:`personal_params` returns for ``trainer``'s architecture: an object with
        ``predict(params, x) -> logits``; the trainer itself by default (FedIns: instance-adaptive inference; HDEE, FlexMoRE: an ensemble or
        mixture of experts)."""
        return trainer

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        """Bytes ``task`` downloads and uploads, asked at dispatch (the engine times the task with them).

        By default the server's parameters and the task's payload down, ``upload_copies`` times the
        server's parameters up. Strategies whose clients download or upload only part of them (an
        adapter truncated to the client's rank) or something else (FLoRA's stacked adapters) override it.
        With ``strategy.compression``, the upload is what its codec sends.
        """
        shared = server.params.numel() * server.params.element_size()
        payload = sum(t.numel() * t.element_size() for t in task.payload.values())
        if self.compression is not None:
            return shared + payload, self.compression.upload_bytes(server.params)
        return shared + payload, shared * self.upload_copies

    def describe_transfer(self, trainer: "LocalTrainer") -> str:
        """What one task moves, a few words for the run's one-line description (``hetfl run``), given the
        reference ``trainer``: by default the size of the server's parameters (:meth:`initial_params`: the model,
        or the part a model-heterogeneous strategy shares). Strategies whose ``transfer_bytes`` differ (adapters
        of the client's rank) say so."""
        params = self.initial_params(trainer)
        size = params.numel() * params.element_size()
        return f"{size / 1e3:.1f} kB a transfer" if size else "nothing transferred"

    def task_flops(self, server: Server, task: Task) -> float:
        """FLOPs ``task`` costs its client, asked at dispatch: its simulated compute time and ``train_flops``.

        By default ``compute_steps(task.steps)`` steps of the client's architecture
        (``server.step_flops``); FedSpine charges the pruned model and the rank it chose.
        """
        return self.compute_steps(task.steps) * server.step_flops(task.client_id)

    def server_flops(self, server: Server, updates: list[Update]) -> float:
        """FLOPs the server spends on a commit of ``updates``: what ``server.flops`` (``server:``) times
        (:mod:`hetfl.engine.server_time`). By default a weighted mean of the updates' parameters, a multiply and an
        add per parameter and update (a commit of none, a timer's, costs nothing); updates that share one params
        tensor (a leaf aggregator's group, ``aggregation.hierarchy``) are one merge. A strategy that trains on the
        server (a head, an inversion) adds that work."""
        return 2.0 * server.params.numel() * len({id(u.params) for u in updates})

    def check_devices(self, profiles: list[Any]) -> None:
        """Refuse device profiles the algorithm's parameters do not cover (raise ConfigError), before the run
        starts; e.g. a rank per compute tier that misses one of the devices' tiers."""

    def compute_steps(self, steps: int) -> int:
        """Local optimiser steps a task of ``steps`` costs the client, for its simulated compute time and
        ``trained_steps`` (Ditto also trains a personal model, FedRep a head phase); ``steps`` by default."""
        return steps

    def check_training(self, optimizer: str, momentum: float) -> None:
        """Refuse a local optimiser the algorithm's mathematics does not hold for (raise ConfigError)."""

    def check_model(self, model_name: str) -> None:
        """Refuse a model the algorithm cannot work with (raise ConfigError), before the run starts."""

    def check_models(self, trainers: list["LocalTrainer"]) -> None:
        """Refuse a set of client architectures (a model zoo) the algorithm cannot combine (raise ConfigError)."""

    @staticmethod
    def server_step(server: Server, mean_delta: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The next global model: ``server.params + step`` on the parameters, ``+ mean_delta`` on the model's
        buffers (the first ``server.trainer.n_buffers`` entries: BatchNorm's running means and variances).

        ``step`` is what a server optimiser makes of the updates' mean change ``mean_delta`` (a learning rate,
        momentum, Adam's moments). Statistics are averaged, never stepped: momentum or a server learning rate above
        1 would extrapolate a running variance below zero, and the model evaluates to NaN. Every built-in server
        optimiser goes through here; a strategy of one's own should too."""
        n_buffers = buffer_entries(server)
        if not n_buffers:
            return server.params + step
        step = step.clone()
        step[:n_buffers] = mean_delta[:n_buffers]
        return server.params + step

    def held_updates(self) -> int:
        """Updates received but not aggregated yet (a buffer, an open group): none by default."""
        return 0

    def metrics(self) -> dict[str, float]:
        """Algorithm-specific numbers for ``metrics.jsonl`` (groups formed, recovery cost); none by default."""
        return {}

    def summary(self, server: Server) -> dict[str, Any]:
        """Algorithm-specific results for ``summary.json`` (its ``strategy_summary``), asked once when the run
        ends, with the server as it ended (e.g. FedSpine's per-client choice history); none by default.
        Values must be JSON-serialisable."""
        return {}


def client_report(data: ClientData, n_classes: int) -> dict[str, float]:
    """What a client says about its data with every update (scalars only, never the data).

    ``label_entropy``: entropy of the client's label histogram divided by log(n_classes), in [0, 1]
    (0: one class; 1: all classes equally); ``n_labels``: classes present. Client selection
    (HeteRo-Select's label diversity) reads these.
    """
    counts = torch.bincount(data.y.long().flatten(), minlength=n_classes).double()  # next-token targets: every token
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log()).sum()) / np.log(n_classes) if n_classes > 1 and len(p) > 1 else 0.0
    return {"label_entropy": entropy, "n_labels": float(len(p))}
