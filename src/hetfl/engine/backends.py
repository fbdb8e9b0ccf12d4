"""Where clients' local training runs: in the simulator's process, or on the workers of a Ray cluster.

The virtual clock, the event queue and the strategy's server half always stay with the
:class:`~hetfl.engine.simulator.Simulator`; a backend only computes client halves
(:meth:`~hetfl.strategies.base.Strategy.client_train`). It rests on one property of a task: its
result depends only on inputs fixed at dispatch (start model, steps, options, payload, the client's
data at the dispatch time, the seed ``task_seed(task_id)``, and the client's persisted state, which
changes only at that client's own previous arrival, before it can be given another task). So the
work may start at dispatch and be collected at the arrival, and the run is the same.

The simulator calls, for each task:

- :meth:`Backend.start` at dispatch, when the task's event is an arrival (a task that will be lost is
  never trained);
- :meth:`Backend.result` at its arrival: the client half's :class:`ClientResult`, with ``state`` (the
  client's persisted state) updated in place to the client's new state;
- :meth:`Backend.forget` when it will never arrive (cancelled by the strategy, or lost).

:class:`InProcess` trains lazily at the arrival, batching in-flight plain-training tasks
(``training.vectorize``). :class:`RayBackend` submits a Ray task at dispatch and waits for it at the
arrival; see its docstring for what travels and what stays.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import pickle
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.strategies.base import ClientData, ClientResult, Strategy, Task
from hetfl.training import LocalTrainer
from hetfl.training.device import CPU, client_half
from hetfl.training.vectorized import train_many

if TYPE_CHECKING:
    from hetfl.config import BackendConfig
    from hetfl.engine.simulator import Simulator


class Backend:
    """How the simulator has a task's client half computed. Subclasses override the four hooks."""

    name = "base"

    def __init__(self) -> None:
        self.batches: list[int] = []  # the size of every batched train_many call (diagnostics)

    def bind(self, sim: "Simulator") -> None:
        """Called once, by ``sim``'s constructor, before the strategy starts."""
        self.sim = sim

    def start(self, task: Task) -> None:
        """``task`` was dispatched and will arrive: its work may begin now."""

    def result(self, task: Task, data: ClientData, state: dict[str, Any]) -> ClientResult:
        """``task`` arrived: its client half's result. ``data`` is what the client held at dispatch; ``state``
        is the client's persisted state, which this updates in place."""
        raise NotImplementedError

    def forget(self, task: Task) -> None:
        """``task`` will never arrive (cancelled, lost): drop whatever work it started."""

    def close(self) -> None:
        """The run is over: release workers and connections (called once, at the end of a run)."""


class InProcess(Backend):
    """Client halves run in this process, at each task's arrival.

    With ``vectorize`` (``training.vectorize``) the first arrival that needs training also trains, in one
    :func:`~hetfl.training.vectorized.train_many` call, every other in-flight task whose event is an
    arrival, that is plain local training (:meth:`Strategy.local_training`) with the same non-tensor
    options and whose client has the same architecture; those results wait in a cache until their own
    arrival. The cache is not state: a checkpoint leaves it out and a resumed run retrains those tasks.
    A model ``train_many`` cannot train (BatchNorm's running statistics, a random layer, an in-place update
    ``torch.func`` refuses: :meth:`LocalTrainer.batching_problem`) is trained one task at a time under ``auto``,
    with one warning per architecture per run on the ``hetfl`` logger.

    Parameters
    ----------
    vectorize : {"auto", "on", "off"}
        ``auto`` batches only a group of at least ``min_tasks`` tasks of a model of at most ``max_params``
        parameters; ``off`` trains one task at a time.
    """

    name = "inprocess"

    def __init__(self, vectorize: str = "off", *, min_tasks: int = 1, max_params: int = 0) -> None:
        super().__init__()
        self.batching = Batching(vectorize, min_tasks, max_params)
        self._trained: dict[int, tuple[Task, ClientResult]] = {}  # task id -> (its task, result trained ahead)

    def result(self, task: Task, data: ClientData, state: dict[str, Any]) -> ClientResult:
        sim = self.sim
        trainer = sim.models.trainer(task.client_id)
        result = self._train_batched(task, data, trainer)
        if result is None:
            result = client_half(sim.strategy, trainer, task, data, state, sim.task_seed(task.task_id))
        return result

    def forget(self, task: Task) -> None:
        cached = self._trained.pop(task.task_id, None)
        if cached is not None and cached[0] is task:
            self.sim.counters.wasted_steps += self.sim.strategy.compute_steps(cached[1].steps)

    def _train_batched(self, task: Task, data: ClientData, trainer: LocalTrainer) -> ClientResult | None:
        """``task``'s result from a batch (trained now or earlier), or None: train it on its own.

        Batched: ``task`` and every other in-flight task whose event is an arrival, that is not trained yet,
        whose strategy's :meth:`~hetfl.strategies.base.Strategy.local_training` gives the same non-tensor
        options and whose client trains ``trainer``'s architecture. Each task keeps its own inputs (start,
        steps, seed, data), so a result equals ``client_train``'s up to floating-point summation order.
        """
        if self.batching.vectorize == "off":
            return None
        cached = self._trained.pop(task.task_id, None)
        if cached is not None and cached[0] is task:  # (another task object: a state restored from a checkpoint)
            return cached[1]
        sim = self.sim
        strategy = sim.strategy
        options = strategy.local_training(task)
        if options is None:
            return None
        key = _options_key(options)
        group, group_options = [task], [options]
        for event in sim.in_flight():
            other: Task = event.data
            if event.kind != "arrival" or other is task or sim.models.trainer(other.client_id) is not trainer:
                continue
            if other.task_id in self._trained and self._trained[other.task_id][0] is other:
                continue
            other_options = strategy.local_training(other)
            if other_options is not None and _options_key(other_options) == key:
                group.append(other)
                group_options.append(other_options)
        if not self.batching.allows(len(group), trainer, data):
            return None
        datasets = [data, *(sim.pool.data(t.client_id, t.dispatched_at) for t in group[1:])]  # ``task``'s: at hand
        results = train_batch(trainer, group, group_options, datasets, [sim.task_seed(t.task_id) for t in group])
        if results is None:
            return None  # train on its own: the error, if any, comes at the arrival of the task that diverges
        self.batches.append(len(group))
        for other, result in zip(group[1:], results[1:]):
            self._trained[other.task_id] = (other, result)
        return results[0]


class Batching:
    """When tasks are trained together (``training.vectorize``), for both backends.

    Parameters
    ----------
    vectorize : {"auto", "on", "off"}
        ``auto`` batches only a group of at least ``min_tasks`` tasks of a model of at most ``max_params``
        parameters; ``off`` trains one task at a time.
    """

    def __init__(self, vectorize: str = "off", min_tasks: int = 1, max_params: int = 0) -> None:
        if vectorize not in ("auto", "on", "off"):
            raise ValueError(f"vectorize must be auto, on or off; got {vectorize!r}")
        self.vectorize, self.min_tasks, self.max_params = vectorize, min_tasks, max_params
        self._noticed: set[int] = set()  # trainers said to be trained one task at a time (auto), by id

    def allows(self, n_tasks: int, trainer: LocalTrainer, data: ClientData) -> bool:
        """Whether ``n_tasks`` tasks of ``trainer``'s architecture are trained as one batch (``data``: one client's,
        for the probe)."""
        if self.vectorize == "off" or n_tasks < 1:
            return False
        if self.vectorize == "auto" and (n_tasks < self.min_tasks or trainer.numel > self.max_params):
            return False
        return self.batchable(trainer, data)

    def batchable(self, trainer: LocalTrainer, data: ClientData) -> bool:
        """Whether ``train_many`` can train ``trainer``'s model (:meth:`LocalTrainer.batching_problem`, probed once
        per trainer on two of ``data``'s samples). Under ``auto``, a model it cannot train is trained one task at a
        time, and said so once per architecture per run (a warning on the ``hetfl`` logger); under ``on`` (which
        :func:`hetfl.engine.run.build_federation` checks before the run) it is a ConfigError."""
        problem = trainer.batching_problem(data.x, data.y)
        if problem is None:
            return True
        if self.vectorize == "on":
            raise ConfigError(
                f"training.vectorize: on, but {trainer.label} cannot be trained batched: {problem}; set "
                "training.vectorize to auto (trains it one task at a time) or off"
            )
        if id(trainer) not in self._noticed:
            self._noticed.add(id(trainer))
            logging.getLogger("hetfl").warning(
                "training.vectorize: auto trains %s one task at a time: %s", trainer.label, problem
            )
        return False


def train_batch(trainer: LocalTrainer, tasks: list[Task], options: list[dict[str, Any]], datasets: list[ClientData],
                seeds: list[int]) -> list[ClientResult] | None:
    """``tasks`` (of ``trainer``'s architecture, plain local training with ``options`` each, the same non-tensor
    ones) trained as one :func:`~hetfl.training.vectorized.train_many` call; None if one of them diverged (then
    train each on its own, so that the error comes at the arrival of the task that diverges)."""
    device = trainer.device  # the tasks' parameters and options go to it; the results come back to the CPU
    kwargs = {
        name: torch.stack([o[name].expand(trainer.numel) for o in options]).to(device)
        if isinstance(value, torch.Tensor) else value
        for name, value in options[0].items()
    }
    try:
        results = train_many(trainer, torch.stack([t.params for t in tasks]).to(device), [(d.x, d.y) for d in datasets],
                             [t.steps for t in tasks], seeds, **kwargs)
    except DivergedError:
        return None
    rows = torch.stack([r.params for r in results]).to(CPU) if device.type != "cpu" else [r.params for r in results]
    return [ClientResult(row, r.steps, r.loss) for r, row in zip(results, rows)]


def _options_key(options: dict[str, Any]) -> list[tuple[str, Any]]:
    """What tasks batched together share: the options' names, and the values of the non-tensor ones."""
    return sorted((name, None if isinstance(value, torch.Tensor) else value) for name, value in options.items())


# --------------------------------------------------------------------------- Ray
def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("backend.name: ray is not installed; pip install hetfl[ray]") from None
    return ray


def code_roots(code: Any) -> list[str]:
    """The folders a config's user code was imported from (its ``code`` section's ``root``s), each once, in order."""
    roots = (getattr(record, "root", None) for record in (code or {}).values())
    return list(dict.fromkeys(root for root in roots if root))


def with_code_roots(runtime_env: dict[str, Any] | None, roots: list[str]) -> dict[str, Any]:
    """``runtime_env`` whose ``env_vars`` put ``roots`` first on the workers' ``PYTHONPATH``, before the one it
    gives (else this process's), so that workers import the user's modules as this process did."""
    env = dict(runtime_env or {})
    if not roots:
        return env
    env_vars = dict(env.get("env_vars") or {})
    given = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    paths = [*roots, *(p for p in str(given).split(os.pathsep) if p)]
    env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["env_vars"] = env_vars
    return env


LOCAL_RAY_ATTEMPTS = 2
"""A local Ray whose node times out while it starts (a loaded machine: "The current node timed out during startup")
is started again once before the run gives up."""


def start_ray(address: str | None, num_workers: int | None, threads: int, runtime_env: dict[str, Any] | None,
              roots: list[str] | None = None) -> bool:
    """Initialise Ray in this process unless it is already: a local Ray of ``num_workers * threads`` CPUs
    (``num_workers`` None: this machine's cores), or the cluster at ``address``. True if this call started it.

    A local Ray's workers get ``roots`` (the folders the config's user code was imported from, :func:`code_roots`)
    first on their ``PYTHONPATH``, merged into ``runtime_env``'s ``env_vars``: a strategy or model of one's own
    travels to them by reference, so they must import its module. A cluster's workers see other file systems:
    ship the code with ``backend.runtime_env`` (``py_modules``), docs/architecture.md, "Backends"."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    local = address is None
    given = runtime_env
    if local:
        runtime_env = with_code_roots(runtime_env, roots or [])
    try:
        if local:
            workers = num_workers or max(1, (os.cpu_count() or 1) // threads)
            for attempt in range(LOCAL_RAY_ATTEMPTS):
                try:
                    ray.init(address="local", num_cpus=workers * threads, include_dashboard=False,
                             runtime_env=runtime_env or None, logging_level=logging.WARNING)
                    break
                except Exception as err:  # noqa: BLE001 - a node that timed out at startup: once more, from scratch
                    if attempt + 1 == LOCAL_RAY_ATTEMPTS or "timed out" not in str(err):
                        raise
                    logging.getLogger("hetfl").warning(
                        "backend: the local Ray node timed out during startup; starting it again")
                    ray.shutdown()
        else:
            ray.init(address=address, runtime_env=runtime_env or None, logging_level=logging.WARNING)
    except Exception as err:  # Ray reports a bad address or runtime_env with many exception types
        what = "starting a local Ray" if local else f"connecting to the Ray cluster at {address!r}"
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        env = f" with backend.runtime_env {given}" if given else ""
        raise ConfigError(f"backend: {what}{env} failed: {detail}") from None
    return True


def share_ray(cfg: Any, roots: list[str] | None = None) -> None:
    """For a command that runs several experiments (``hetfl compare``): with ``backend.name: ray``, start Ray
    once now, so that every run uses it (a run stops only a Ray it started); Ray stops when the process exits.
    ``roots``: where every run's user code was imported from (default: ``cfg``'s, :func:`code_roots`)."""
    if cfg.backend.name == "ray":
        roots = code_roots(cfg.code) if roots is None else roots
        start_ray(cfg.backend.address, cfg.backend.num_workers, cfg.threads, cfg.backend.runtime_env, roots)


@dataclasses.dataclass
class _TrainerSpec:
    """A trainer as it travels: its model with independent parameter tensors (re-homed into flat buffers on
    arrival), its configuration, and its initial parameters (a pretrained base, say)."""

    model: torch.nn.Module
    cfg: Any
    label: str
    initial: torch.Tensor
    reference: int  # index of its reference trainer among the specs


@dataclasses.dataclass
class ClientSide:
    """What a Ray worker holds for one run, sent once through the object store: the strategy as it was
    built (its parameters, none of a run's server state), one trainer per architecture, which architecture
    each client trains, and the clients' data."""

    strategy: bytes  # pickled before the run started
    trainers: list[_TrainerSpec]
    of_client: np.ndarray  # client -> index into trainers
    pool: Any  # the simulator's ClientPool
    threads: int

    @classmethod
    def of(cls, sim: "Simulator", threads: int) -> "ClientSide":
        trainers = list(dict.fromkeys([sim.trainer, *sim.models.trainers]))
        trainers += [t.reference for t in trainers if t.reference not in trainers]
        index = {id(t): i for i, t in enumerate(trainers)}
        specs = [_TrainerSpec(_portable(t.model), t.cfg, t.label, t.initial.clone(), index[id(t.reference)]) for t in trainers]
        models = np.array([index[id(t)] for t in sim.models.trainers], dtype=np.int64)
        from ray import cloudpickle  # a strategy class defined in a script (__main__) travels by value

        pool = sim.pool.to(CPU) if hasattr(sim.pool, "to") else sim.pool  # each worker moves it to its own device
        return cls(cloudpickle.dumps(sim.strategy), specs, models[sim.models.of_client], pool, threads)

    def unpack(self) -> "_Worker":
        trainers = []
        for spec in self.trainers:
            trainer = LocalTrainer(spec.model, spec.cfg, spec.label)
            trainer.initial = spec.initial
            trainers.append(trainer)
        for trainer, spec in zip(trainers, self.trainers):
            trainer.reference = trainers[spec.reference]
        pool = self.pool.to(trainers[0].device) if hasattr(self.pool, "to") else self.pool  # once per worker and run
        return _Worker(pickle.loads(self.strategy), trainers, self.of_client, pool, self.threads)


def _portable(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` on the CPU whose parameters and buffers own their memory (a trainer's are views into one
    flat buffer, which pickling would copy once per tensor) and whose parameters carry no gradient. A worker's
    trainer moves it to the worker's own device (``training.device``, resolved there)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.data = p.data.to(CPU, copy=True)
        p.grad = None
    owned: dict[int, torch.Tensor] = {}  # a buffer two modules share stays shared
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                if id(buffer) not in owned:
                    owned[id(buffer)] = buffer.to(CPU, copy=True)
                module._buffers[name] = owned[id(buffer)]
    return model


@dataclasses.dataclass
class _Worker:
    strategy: Strategy
    trainers: list[LocalTrainer]
    of_client: np.ndarray
    pool: Any
    threads: int

    def train(self, task: Task, state: dict[str, Any], seed: int) -> tuple[ClientResult, dict[str, Any]]:
        torch.set_num_threads(self.threads)
        trainer = self.trainers[self.of_client[task.client_id]]
        data = self.pool.data(task.client_id, task.dispatched_at)
        return client_half(self.strategy, trainer, task, data, state, seed), state

    def train_batch(self, tasks: list[Task], seeds: list[int]) -> list[ClientResult] | None:
        """``tasks`` (one architecture, plain local training: the driver grouped them) as one batch
        (:func:`train_batch`); None if one diverged."""
        torch.set_num_threads(self.threads)
        trainer = self.trainers[self.of_client[tasks[0].client_id]]
        options = [self.strategy.local_training(t) for t in tasks]
        datasets = [self.pool.data(t.client_id, t.dispatched_at) for t in tasks]
        return train_batch(trainer, tasks, options, datasets, seeds)  # type: ignore[arg-type]


_WORKERS: dict[str, _Worker] = {}  # in a Ray worker process: the runs it has served, by key (the last two)


def _worker(key: str, box: list) -> _Worker:
    """This worker process's :class:`_Worker` for the run ``key``. ``box`` holds the run's :class:`ClientSide`
    reference, boxed so that Ray passes the reference itself and this process fetches and unpacks it once per run."""
    worker = _WORKERS.get(key)
    if worker is None:
        import ray

        worker = ray.get(box[0]).unpack()
        while len(_WORKERS) >= 2:
            del _WORKERS[next(iter(_WORKERS))]
        _WORKERS[key] = worker
    return worker


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _train_remote(key: str, box: list, stub: Task, state: dict[str, Any], seed: int, params: torch.Tensor,
                  *payload: torch.Tensor) -> tuple[ClientResult, dict[str, Any], float, str]:
    """The Ray task of one client half: its result, the client's new state, the seconds it took and the node."""
    start = time.perf_counter()
    task = dataclasses.replace(stub, params=params, payload=dict(zip(stub.payload, payload)))
    result, state = _worker(key, box).train(task, state, seed)
    return result, state, time.perf_counter() - start, _node()


def _train_batch_remote(key: str, box: list, stubs: list[Task], uses: list[list[int]], seeds: list[int],
                        *tensors: torch.Tensor) -> tuple[list[ClientResult] | None, dict[str, Any], float, str]:
    """The Ray task of a batch of plain-training tasks: their results (None: one diverged), the seconds it took and
    the node. Task ``i`` starts from ``tensors[uses[i][0]]`` with payload ``tensors[uses[i][1:]]``: a model shared
    by the batch travels once."""
    start = time.perf_counter()
    tasks = [dataclasses.replace(stub, params=tensors[use[0]], payload=dict(zip(stub.payload, (tensors[i] for i in use[1:]))))
             for stub, use in zip(stubs, uses)]
    results = _worker(key, box).train_batch(tasks, seeds)
    return results, {}, time.perf_counter() - start, _node()


RAY_RETRIES = 3  # Ray's max_retries of a client half's task: resubmitted by Ray when its worker or node dies
RESUBMITS = 3  # then by the backend, when a result is still lost (retries spent, its object lost with its node)


class RayBackend(Backend):
    """Client halves run as Ray tasks, on a local Ray started for the run or on a cluster.

    A task is submitted at dispatch and collected at its arrival, so up to the cluster's CPUs train
    at once while the simulator goes on. What travels:

    - once per run, through the object store (:class:`ClientSide`): the strategy as it was built, before
      the run started, one trainer per architecture and the clients' data. A client half reads only its
      arguments and the strategy's parameters (the contract of :meth:`Strategy.client_train`: a real client
      would build the strategy from the config), so server-side memory (FedStale's table of every client's
      last update, buffers, selection statistics) never travels.
    - once per model version (and per payload tensor, e.g. SCAFFOLD's ``c``): the tensor, put in the object
      store by the first task that needs it and shared by every task that starts from it;
    - per task: the task's scalars, the client's state (Ditto's personal model, SCAFFOLD's ``c_i``) and the
      seed; back: the result and the client's new state, which replaces the simulator's copy at the arrival.

    With ``training.vectorize`` (``auto`` or ``on``), the tasks dispatched together (between two arrivals: one
    round's, typically) that are plain local training with the same options and architecture are split into
    at most one batch per worker slot (the cluster's CPUs over ``threads``) and each batch is one Ray task,
    trained with :func:`~hetfl.training.vectorized.train_many` (``auto``: a batch of at least
    ``vectorize_min_tasks`` tasks of a model of at most ``vectorize_max_params`` parameters; smaller ones go
    one by one). Results then equal the one-by-one ones up to floating-point summation order, as in-process.

    A lost node or worker process costs no result: Ray resubmits a task whose worker or node died
    (``max_retries``, :data:`RAY_RETRIES`), and a result Ray still cannot produce (its retries spent, its object
    lost with its node) is submitted again by this backend, alone, up to :data:`RESUBMITS` times
    (``resubmitted`` counts them). A task's result depends only on what it was sent, so a retried task gives the
    same result, and a run that loses nodes equals one that does not.

    A task that will be lost is never submitted; a cancelled task's result is dropped and never waited on (its Ray
    task runs to its end: ``ray.cancel`` can abort the driver in a race with a finishing task). Futures are not state: a run resumed from a checkpoint submits, at its first arrival,
    every task in flight.

    Parameters
    ----------
    address : str or None
        A running cluster (``ray.init(address=...)``: ``"auto"``, ``"ray://head:10001"``); None starts a
        local Ray with ``num_workers`` workers for this run and stops it at the end. If Ray is already
        initialised in this process, the backend uses it and leaves it running.
    num_workers : int or None
        Local Ray only: workers training at once (each with ``threads`` torch threads); None: this machine's
        cores divided by ``threads``.
    runtime_env : dict or None
        Passed to ``ray.init`` (``working_dir``, ``py_modules``, ``pip``, ``env_vars``), so that a cluster's
        workers can import hetfl and its dependencies.
    threads : int
        torch threads of each worker's training (the run's ``threads``), so results equal the in-process run's.
    vectorize, min_tasks, max_params
        ``training.vectorize``, ``vectorize_min_tasks``, ``vectorize_max_params``: when dispatched tasks are
        trained as one batch on a worker (:class:`Batching`).
    num_gpus : float
        GPUs each Ray task reserves (``backend.num_gpus_per_worker``; fractional: tasks share a GPU). Ray sets the
        task's visible GPUs; its trainer resolves ``training.device`` there (``cuda``: the first visible one) and
        keeps the run's data on it, moved once per worker.
    roots : list of str, optional
        Folders the config's user code was imported from (:func:`code_roots`): put on a local Ray's workers'
        ``PYTHONPATH`` (:func:`start_ray`).
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, num_workers: int | None = None,
                 runtime_env: dict[str, Any] | None = None, threads: int = 1, roots: list[str] | None = None,
                 vectorize: str = "off", min_tasks: int = 1, max_params: int = 0, num_gpus: float = 0.0) -> None:
        super().__init__()
        self.batching = Batching(vectorize, min_tasks, max_params)
        self.ray = import_ray()
        self.num_gpus = num_gpus
        self.address, self.num_workers, self.runtime_env, self.threads = address, num_workers, runtime_env or {}, threads
        self.roots = list(roots or [])
        self._started_ray = False
        self._remote: Any = None
        self._key = uuid.uuid4().hex
        self._box: list[Any] = []
        self._batch_remote: Any = None
        self._slots = 1  # tasks the cluster trains at once: batches a group is split into
        # task id -> (task, ObjectRef, tensors it uses, its index in a batch's results or None: a task of its own)
        self._futures: dict[int, tuple[Task, Any, list[int], int | None]] = {}
        self._batch_values: dict[Any, list[Any]] = {}  # a batch's ObjectRef -> [its tasks not collected, its value]
        self._pending: list[Task] = []  # dispatched since the last arrival, to be grouped into batches (vectorize)
        self._tensors: dict[int, list[Any]] = {}  # id(tensor) -> [tensor, ObjectRef, tasks using it]
        self.submitted = 0  # diagnostics: tasks submitted, collected, cancelled; seconds workers spent on those collected
        self.collected = 0
        self.cancelled = 0
        self.worker_seconds = 0.0
        self.resubmitted = 0  # tasks submitted again after a lost node, worker or object
        self.nodes: collections.Counter[str] = collections.Counter()  # Ray node id -> tasks collected from it

    def bind(self, sim: "Simulator") -> None:
        super().bind(sim)
        self._client_side = ClientSide.of(sim, self.threads)  # the strategy as built: before it starts

    # ------------------------------------------------------------------ the hooks
    def start(self, task: Task) -> None:
        if self.batching.vectorize == "off":
            self._submit(task)
        else:
            self._pending.append(task)  # submitted at the next arrival, with the others dispatched with it

    def result(self, task: Task, data: ClientData, state: dict[str, Any]) -> ClientResult:
        self._flush()
        entry = self._futures.get(task.task_id)
        if entry is None or entry[0] is not task:  # not submitted by this process: a run resumed from a checkpoint
            self._submit_in_flight()  # the others in flight too, so that they train while this one does
            self._submit(task)
        ray = self.ray
        lost = 0
        while True:
            _, ref, tensors, index = self._futures.pop(task.task_id)
            self._release(tensors)
            try:
                result, new_state, seconds, node = self._fetch(ref, index)
            except (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as err:
                lost += 1
                if lost > RESUBMITS:
                    raise HetflError(f"backend ray: task {task.task_id} (client {task.client_id}) failed {lost} times, "
                                     f"the last: {str(err).splitlines()[0]}") from None
                self.resubmitted += 1
                self._submit(task)  # alone: its result depends only on what it is sent
                continue
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, HetflError):
                    raise cause from None  # a diverged client, say: the same one-line error as in-process
                if isinstance(cause, ModuleNotFoundError):  # code of one's own the workers cannot import
                    raise HetflError(
                        f"backend ray: the workers cannot import {cause.name!r}, which the strategy or model comes from; "
                        "give it to them with backend.runtime_env, e.g. {py_modules: [/path/to/" + f"{cause.name}.py]}}"
                        " (docs/architecture.md, Backends)"
                    ) from None
                raise
            except ray.exceptions.RayError as err:
                raise HetflError(
                    f"backend ray: task {task.task_id} (client {task.client_id}) failed: {str(err).splitlines()[0]}"
                ) from None
            if result is None:  # its batch diverged: train it on its own, which raises if it is the one
                self._submit(task)
                continue
            break
        self.collected += 1
        self.worker_seconds += seconds
        self.nodes[node] += 1
        if new_state is not None:
            state.clear()
            state.update(new_state)
        return result

    def _fetch(self, ref: Any, index: int | None) -> tuple[ClientResult | None, dict[str, Any] | None, float, str]:
        """A task's result (None: its batch diverged), the client's new state (None: unchanged), the worker seconds it
        took (its share of a batch's) and its node. A batch's value is fetched once and kept until its last task
        is collected or forgotten."""
        if index is None:
            return self.ray.get(ref)
        entry = self._batch_values[ref]
        if entry[1] is None:
            entry[1] = self.ray.get(ref)
        results, _, seconds, node = entry[1]
        self._batch_done(ref)
        return None if results is None else results[index], None, seconds / len(results or [0, 0]), node

    def _batch_done(self, ref: Any) -> None:
        entry = self._batch_values.get(ref)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._batch_values[ref]

    def forget(self, task: Task) -> None:
        pending = [t for t in self._pending if t is not task]
        if len(pending) < len(self._pending):
            self._pending = pending  # never submitted: nothing wasted
            return
        entry = self._futures.get(task.task_id)
        if entry is None or entry[0] is not task:
            return
        del self._futures[task.task_id]
        _, ref, tensors, index = entry
        self._release(tensors)
        if index is not None:
            self._batch_done(ref)
        self.cancelled += 1
        # The result is dropped, never fetched; the work is not stopped: ray.cancel races with a task that is
        # finishing and can abort the driver (Ray's "Tried to complete task that was not pending" check, seen
        # here with Ray 2.60; ray-project/ray#54798), so a cancelled task runs to its end and is wasted.
        del ref
        self.sim.counters.wasted_steps += self.sim.strategy.compute_steps(task.steps)

    def close(self) -> None:
        self._futures.clear()
        self._batch_values.clear()
        self._pending.clear()
        self._tensors.clear()
        self._box.clear()
        self._remote = None
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    # ------------------------------------------------------------------ submission
    def _connect(self) -> None:
        self._started_ray = start_ray(self.address, self.num_workers, self.threads, self.runtime_env, self.roots)
        self._remote = self.ray.remote(num_cpus=self.threads, num_gpus=self.num_gpus, max_retries=RAY_RETRIES)(
            _train_remote)
        self._batch_remote = self.ray.remote(num_cpus=self.threads, num_gpus=self.num_gpus, max_retries=RAY_RETRIES)(
            _train_batch_remote)
        self._slots = max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.threads))
        self._box = [self.ray.put(self._client_side)]

    def _submit(self, task: Task) -> None:
        if self._remote is None:
            self._connect()
        stale = self._futures.get(task.task_id)
        if stale is not None:  # another task object of the same id (a state restored from a checkpoint)
            self._release(stale[2])
            if stale[3] is not None:
                self._batch_done(stale[1])
        state = self.sim.client_states.get(task.client_id, {})
        tensors = [task.params, *task.payload.values()]
        refs = [self._shared(t) for t in tensors]
        stub = dataclasses.replace(task, params=torch.empty(0), payload=dict.fromkeys(task.payload))
        ref = self._remote.remote(self._key, self._box, stub, state, self.sim.task_seed(task.task_id), *refs)
        self._futures[task.task_id] = (task, ref, [id(t) for t in tensors], None)
        self.submitted += 1

    def _flush(self) -> None:
        """Submit the tasks dispatched since the last arrival: plain-training tasks of one architecture and the same
        options in at most ``_slots`` batches (:class:`Batching` decides whether a batch is trained as one), the
        others one by one."""
        pending, self._pending = self._pending, []
        sim = self.sim
        groups: dict[tuple[int, tuple[Any, ...]], list[Task]] = {}
        for task in pending:
            options = sim.strategy.local_training(task)
            if options is None:
                self._submit(task)
            else:
                key = (id(sim.models.trainer(task.client_id)), tuple(_options_key(options)))
                groups.setdefault(key, []).append(task)
        for tasks in groups.values():
            trainer = sim.models.trainer(tasks[0].client_id)
            least = self.batching.min_tasks if self.batching.vectorize == "auto" else 1
            n_batches = max(1, min(self._slots, len(tasks) // least))
            for part in (tasks[i::n_batches] for i in range(n_batches)):
                data = sim.pool.data(part[0].client_id, part[0].dispatched_at)
                if len(part) > 1 and self.batching.allows(len(part), trainer, data):
                    self._submit_batch(part)
                else:
                    for task in part:
                        self._submit(task)

    def _submit_batch(self, tasks: list[Task]) -> None:
        if self._remote is None:
            self._connect()
        refs: list[Any] = []
        where: dict[int, int] = {}  # id(tensor) -> its index among refs: a model shared by the batch travels once
        uses, stubs = [], []
        for task in tasks:
            tensors = [task.params, *task.payload.values()]
            use = []
            for tensor in tensors:
                ref = self._shared(tensor)  # counted once per task, released at each task's arrival or forgetting
                if id(tensor) not in where:
                    where[id(tensor)] = len(refs)
                    refs.append(ref)
                use.append(where[id(tensor)])
            uses.append(use)
            stubs.append(dataclasses.replace(task, params=torch.empty(0), payload=dict.fromkeys(task.payload)))
        seeds = [self.sim.task_seed(t.task_id) for t in tasks]
        ref = self._batch_remote.remote(self._key, self._box, stubs, uses, seeds, *refs)
        self._batch_values[ref] = [len(tasks), None]
        for i, task in enumerate(tasks):
            self._futures[task.task_id] = (task, ref, [id(t) for t in (task.params, *task.payload.values())], i)
        self.submitted += len(tasks)
        self.batches.append(len(tasks))

    def _submit_in_flight(self) -> None:
        """Submit every in-flight task that will arrive and has no Ray task of its own (after a resume)."""
        for event in self.sim.in_flight():
            task: Task = event.data
            entry = self._futures.get(task.task_id)
            if event.kind == "arrival" and (entry is None or entry[0] is not task):
                self._submit(task)

    def _shared(self, tensor: torch.Tensor) -> Any:
        """``tensor``'s object in the Ray object store, put once however many tasks send it. The server never
        changes a model in place, so the same tensor object is the same value."""
        entry = self._tensors.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            entry = self._tensors[id(tensor)] = [tensor, self.ray.put(tensor), 0]
        entry[2] += 1
        return entry[1]

    def _release(self, tensors: list[int]) -> None:
        for key in tensors:
            entry = self._tensors.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._tensors[key]


def build_backend(cfg: "BackendConfig", *, threads: int, training: Any, roots: list[str] | None = None) -> Backend:
    """The backend ``backend.*`` asks for; ``training`` (a TrainingConfig) sets the in-process batching; ``roots``:
    where the config's user code was imported from (:func:`code_roots`), for a local Ray's workers."""
    if cfg.name == "ray":
        return RayBackend(address=cfg.address, num_workers=cfg.num_workers, runtime_env=cfg.runtime_env,
                          threads=threads, roots=roots, vectorize=training.vectorize,
                          min_tasks=training.vectorize_min_tasks, max_params=training.vectorize_max_params,
                          num_gpus=cfg.num_gpus_per_worker)
    return InProcess(training.vectorize, min_tasks=training.vectorize_min_tasks, max_params=training.vectorize_max_params)
