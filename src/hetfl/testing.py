"""Conformance checks for strategies: the invariants every hetfl algorithm keeps, as scikit-learn's ``check_estimator``.

:func:`check_strategy` runs a strategy on tiny in-memory federations (eight clients of Gaussian blobs, a logistic
regression or a small MLP, virtual time: about a second in all) and checks

``every task accounted for exactly once``
    under harsh heterogeneity (round deadlines, dropout, clients going offline mid-task), for several seeds: every
    dispatched task arrives, is lost, is cancelled or is still in flight, exactly one of them; no task arrives twice
    and no update is aggregated twice; every update that arrived is aggregated, dropped or held by the strategy;
    only arrived tasks are trained and upload (the steps and bytes counted are theirs); each client trained the
    steps its task asked for; every update passes the checks a deployed server makes before its strategy sees it
    (parameters of the shape and dtype of ``upload_reference(server, task)``, finite; the payload
    ``expected_payload`` declares; finite statistics).
``deterministic``
    two runs with the same seed give bit-identical models, clocks, counters and client states.
``resume equals an uninterrupted run``
    the simulator's state saved in the middle of a run (``torch.save``, as ``checkpoint.pt``), loaded into a
    freshly built simulator (``torch.load``, as ``hetfl run --resume``) and run on, ends bit for bit where the
    straight run ends: so the strategy's state pickles, and holds nothing outside it.
``linear aggregation, as claimed`` (only for a strategy with ``linear_aggregation = True``)
    the strategy aggregates the same when every update is replaced by the updates' sample-weighted mean, which is
    all a deployment with secure aggregation hands it (:func:`hetfl.strategies.checks.check_linear_aggregation`).
``learns``
    on an easy task (separable blobs, every round's clients online) five aggregations lower the federation's loss
    by a fifth: the global model's, or for a strategy without one, the mean of the clients' own models' losses.

A broken invariant raises an ``AssertionError`` naming the strategy, the invariant and what was counted. What the
strategy refuses (``check_model``/``check_models``: a model it cannot work with, ``check_devices``,
``check_training``) is not a failure: the checks choose the first model it takes (``logreg``, else ``mlp``) and
skip, with the strategy's own reason, what it takes none of. The returned :class:`StrategyReport` says what ran.

Use it in your own tests (pytest or any runner)::

    from hetfl.testing import check_strategy
    from mystrategies import FedAvgM

    def test_fedavgm_is_a_hetfl_strategy():
        report = check_strategy(FedAvgM, beta=0.9)
        assert not report.skipped, report.skipped

``**params`` are the strategy's parameters, validated from its constructor exactly as a config's
``strategy.params`` are (a subclass forwarding ``**kwargs`` to a built-in takes its base's too). ``strategy.*``
keys the scenarios set (``clients_per_round``, ``deadline_s``, ``selection``, ``aggregator``, ``privacy``) may be
given too and replace the scenario's. hetfl's own test suite runs this function over every built-in algorithm
(``tests/test_simulator.py``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from hetfl.config import ModelConfig, StrategyConfig, TrainingConfig
from hetfl.devices import DeviceProfile
from hetfl.engine.simulator import ClientPool, Simulator
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.strategies import ROUND_KEYS, RoundStrategy, Strategy, Task, Update, build_strategy
from hetfl.training import LocalTrainer

ACCOUNTING = "every task accounted for exactly once"
DETERMINISTIC = "deterministic"
RESUME = "resume equals an uninterrupted run"
LEARNS = "learns"
CHECKS = (ACCOUNTING, DETERMINISTIC, RESUME, LEARNS)
"""The invariants :func:`check_strategy` checks on every strategy, in order."""
LINEAR = "linear aggregation, as claimed"
CLAIMS = (LINEAR,)
"""What :func:`check_strategy` checks only of a strategy that claims it (``linear_aggregation = True``)."""

SEEDS = (0, 1, 2)
MODELS = ("logreg", "mlp", "hetfl.testing:BatchNormMLP", "hetfl.testing:PromptMLP")
"""The checks' models, the first the strategy takes is used: FedPer needs a body (the MLP), FedBN BatchNorm layers,
pFedPG a soft prompt."""
HARSH_ROUNDS = 12
LEARN_ROUNDS = 5
LEARN_FACTOR = 0.8  # the loss after LEARN_ROUNDS aggregations must be below this share of the initial loss
HARSH = {"clients_per_round": 4, "deadline_s": 4.0}  # strategy.* keys of the harsh scenario
EASY = {"clients_per_round": 3}
HARSH_TRAINING = TrainingConfig(local_steps=2, batch_size=4, lr=0.1)
EASY_TRAINING = TrainingConfig(local_steps=5, batch_size=4, lr=0.1)


@dataclass
class StrategyReport:
    """What :func:`check_strategy` did: the checks that passed, those skipped and why, the model used."""

    strategy: str
    model: str | None = None
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def reason(self) -> str:
        """Why checks were skipped (the strategy's own words), or an empty string."""
        return "; ".join(dict.fromkeys(self.skipped.values()))

    def __str__(self) -> str:
        text = f"{self.strategy}: passed {', '.join(self.passed) or 'nothing'}"
        if self.skipped:
            text += f"; skipped {', '.join(self.skipped)}: {self.reason}"
        return text + (f" (model {self.model}, {self.seconds:.1f} s)" if self.model else "")


def check_strategy(strategy: type[Strategy] | str, /, *, seeds: Sequence[int] = SEEDS, **params: Any) -> StrategyReport:
    """Run the common invariants (:data:`CHECKS`, see the module docstring) on ``strategy``.

    Parameters
    ----------
    strategy : Strategy subclass or str
        The class, or a name a config would give (``fedavg``, ``mymodule:MyStrategy``, an entry point's).
    seeds : sequence of int, default (0, 1, 2)
        Seeds of the harsh scenario (devices, dropout, sampling, batches); the first also seeds the determinism and
        resume checks.
    **params
        The strategy's parameters (``strategy.params``), and optionally the scenario's ``strategy.*`` keys.

    Returns
    -------
    StrategyReport
        The checks passed and those skipped, each with the strategy's reason (a model or devices it refuses).

    Raises
    ------
    AssertionError
        An invariant is broken; the message names the strategy, the invariant and the numbers.
    ConfigError
        ``params`` are not the strategy's (an unknown key, a wrong type), as a config's would be refused.
    """
    started = time.perf_counter()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("check_strategy: seeds must name at least one seed")
    given = {key: params.pop(key) for key in ROUND_KEYS if key in params}

    def make(scenario: dict[str, Any]) -> Strategy:
        try:
            cfg = StrategyConfig(name=strategy, params=dict(params), **{**scenario, **given})
        except ValidationError as err:  # an unknown name, a malformed strategy.* key
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"check_strategy({strategy!r}): strategy.{where}: "
                              f"{first['msg'].removeprefix('Value error, ')}") from None
        try:
            return build_strategy(cfg)
        except ConfigError as err:
            raise ConfigError(f"check_strategy({cfg.name}): {err}") from None

    harsh = make(HARSH)
    report = StrategyReport(strategy=harsh.name)
    model, refusal = _choose_model(harsh, _harsh_profiles(seeds[0]))
    if model is None:
        report.skipped = dict.fromkeys(CHECKS, refusal or "")
        report.seconds = time.perf_counter() - started
        return report
    report.model = model
    label = harsh.name

    runs = [_accounting(lambda: make(HARSH), model, seed, label, cuts="deadline_s" not in given) for seed in seeds]
    report.passed.append(ACCOUNTING)

    straight, resumed = _resume(lambda: make(HARSH), model, seeds[0], label)
    _same_run(runs[0], straight, label, DETERMINISTIC, f"seed {seeds[0]}: two runs of {HARSH_ROUNDS} aggregations")
    report.passed.append(DETERMINISTIC)
    _same_run(straight, resumed, label, RESUME,
              f"seed {seeds[0]}: saved after aggregation {HARSH_ROUNDS // 2}, resumed to {HARSH_ROUNDS}")
    report.passed.append(RESUME)

    _learns(make(EASY), model, label)
    report.passed.append(LEARNS)

    if harsh.linear_aggregation:
        _linear(lambda: make(EASY), model, label)
        report.passed.append(LINEAR)
    report.seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------- the federations
def _profile(client_id: int, *, flops: float = 1e6, windows: Any = None, dropout: float = 0.0) -> DeviceProfile:
    return DeviceProfile(client_id=client_id, speed=1.0, flops=flops, down_Bps=1e5, up_Bps=1e5, latency_s=0.0,
                         windows=windows, dropout=dropout, tier="test")


def _harsh_profiles(seed: int) -> list[DeviceProfile]:
    """Eight devices of three speeds that lose 15% of their tasks; every third goes offline once, for 0.5-2 s."""
    rng = np.random.default_rng(seed)
    profiles = []
    for i in range(8):
        start = float(rng.uniform(0, 3))
        windows = ((0.0, start), (start + float(rng.uniform(0.5, 2)), math.inf)) if i % 3 == 0 else None
        profiles.append(_profile(i, flops=float(rng.choice([2e5, 1e6, 5e6])), dropout=0.15, windows=windows))
    return profiles


def _easy_profiles() -> list[DeviceProfile]:
    return [_profile(i, flops=1e6 * (i + 1)) for i in range(4)]


def _blobs(n: int, seed: int, features: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around ``classes`` random centres: nearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, features, generator=g) * 3
    return centers[y] + torch.randn(n, features, generator=g), y


class BatchNormMLP(torch.nn.Module):
    """Linear, BatchNorm1d, ReLU, then a linear ``head``: the checks' model with buffers (running statistics) that
    travel in the flat vector, for strategies that need normalisation layers (FedBN)."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), hidden),
                                        torch.nn.BatchNorm1d(hidden), torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PromptMLP(torch.nn.Module):
    """Linear, ReLU, then a linear ``head``, on the input plus ``prompt`` (one learned row, zero at first): the checks'
    model with a soft prompt (the prompt protocol of :class:`hetfl.models.transformer.TinyLM`), for pFedPG."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.zeros(1, math.prod(input_shape)))
        self.body = torch.nn.Sequential(torch.nn.Linear(math.prod(input_shape), hidden), torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1) + self.prompt))


def _trainer(model: str, training: TrainingConfig, seed: int) -> LocalTrainer:
    torch.manual_seed(seed)
    return LocalTrainer(build_model(ModelConfig(name=model, hidden=[8]), (4,), 3), training)


def _simulator(strategy: Strategy, sizes: list[int], profiles: list[DeviceProfile], *, model: str,
               training: TrainingConfig, seed: int) -> Simulator:
    x, y = _blobs(sum(sizes), seed)
    bounds = np.cumsum([0, *sizes])
    indices = [torch.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    return Simulator(strategy=strategy, trainer=_trainer(model, training, seed), pool=ClientPool(x, y, indices),
                     profiles=profiles, flops_per_step=1e6, seed=seed)


def _stop_after(rounds: int) -> Callable[[Simulator], None]:
    def on_commit(sim: Simulator) -> None:
        if sim.version >= rounds:
            sim.stop("rounds")

    return on_commit


def _run(sim: Simulator, rounds: int, every_step: Callable[[Simulator], None] | None = None) -> Simulator:
    """Step ``sim`` (after a stop, or from the start) until ``rounds`` aggregations or nothing is left to do."""
    sim.on_commit = _stop_after(rounds)
    sim.proceed()
    while sim.step():
        if every_step is not None:
            every_step(sim)
    return sim


def _choose_model(strategy: Strategy, profiles: list[DeviceProfile]) -> tuple[str | None, str | None]:
    """The first of :data:`MODELS` the strategy takes, or None and its reasons for refusing them all."""
    try:
        strategy.check_training(HARSH_TRAINING.optimizer, HARSH_TRAINING.momentum)
        strategy.check_devices(profiles)
    except ConfigError as err:
        return None, str(err)
    reasons = []
    for model in MODELS:
        try:
            strategy.check_model(model)
            strategy.check_models([_trainer(model, HARSH_TRAINING, 0)])
            return model, None
        except ConfigError as err:
            reasons.append(f"{model}: {err}")
    return None, f"{strategy.name} refuses the checks' models ({'; '.join(reasons)})"


def _fail(label: str, invariant: str, context: str, detail: str) -> AssertionError:
    return AssertionError(f"hetfl.testing: {label} breaks '{invariant}' ({context}): {detail}")


# --------------------------------------------------------------------------- every task accounted for
def _accounting(make: Callable[[], Strategy], model: str, seed: int, label: str, *, cuts: bool) -> Simulator:
    """One harsh run with every dispatch, arrival and aggregation recorded; its books checked (``cuts``: the
    scenario's deadline must have cut a straggler of a round-based strategy)."""
    strategy = make()
    sim = _simulator(strategy, [6] * 8, _harsh_profiles(seed), model=model, training=HARSH_TRAINING, seed=seed)
    dispatched: list[Task] = []
    arrived: list[Update] = []
    aggregated: list[int] = []
    dispatch, commit, on_update = sim.dispatch, sim.commit, strategy.on_update

    def spy_dispatch(*args: Any, **kwargs: Any) -> Task:
        task = dispatch(*args, **kwargs)
        dispatched.append(task)
        return task

    def spy_commit(params: torch.Tensor, updates: list[Update], *args: Any, **kwargs: Any) -> None:
        aggregated.extend(u.task.task_id for u in updates)
        commit(params, updates, *args, **kwargs)

    def spy_update(server: Any, update: Update) -> None:
        arrived.append(update)
        on_update(server, update)

    sim.dispatch, sim.commit, strategy.on_update = spy_dispatch, spy_commit, spy_update  # type: ignore[method-assign]
    _run(sim, HARSH_ROUNDS)

    def check(ok: bool, detail: str) -> None:
        if not ok:
            raise _fail(label, ACCOUNTING, f"seed {seed}, {sim.version} aggregations, t = {sim.now:.2f} s", detail)

    c, in_flight = sim.counters, len(sim.in_flight())
    check(c.tasks == len(dispatched), f"{c.tasks} tasks counted, {len(dispatched)} dispatched")
    check(c.tasks == c.arrived + c.failed + c.cancelled + in_flight,
          f"{c.tasks} tasks dispatched, but {c.arrived} arrived + {c.failed} lost + {c.cancelled} cancelled + "
          f"{in_flight} in flight = {c.arrived + c.failed + c.cancelled + in_flight}")
    ids = [u.task.task_id for u in arrived]
    check(len(ids) == c.arrived, f"{c.arrived} arrivals counted, the strategy was told of {len(ids)}")
    check(len(set(ids)) == len(ids), f"tasks {sorted(i for i in set(ids) if ids.count(i) > 1)} arrived twice")
    known = {t.task_id for t in dispatched}
    check(set(ids) <= known, f"tasks {sorted(set(ids) - known)} arrived without being dispatched")
    twice = sorted(i for i in set(aggregated) if aggregated.count(i) > 1)
    check(not twice, f"the updates of tasks {twice} were aggregated more than once")
    check(set(aggregated) <= set(ids), f"tasks {sorted(set(aggregated) - set(ids))} were aggregated without arriving")
    rounds = isinstance(strategy, RoundStrategy)  # rounds also report their lost and cut tasks as dropped
    held = strategy.held_updates()
    lost = (c.failed + c.cancelled) if rounds else 0
    check(c.updates + c.dropped + held == c.arrived + lost,
          f"{c.arrived} updates arrived{f' and {lost} tasks were lost or cut' if rounds else ''}, but {c.updates} "
          f"were aggregated + {c.dropped} dropped + {held} held = {c.updates + c.dropped + held}")
    check(c.updates == len(aggregated), f"{c.updates} aggregated updates counted, {len(aggregated)} committed")
    wrong = [(u.task.task_id, u.task.steps, u.steps) for u in arrived if u.steps != u.task.steps]
    check(not wrong, "updates trained other steps than their tasks asked (task, asked, trained): " + str(wrong[:3]))
    steps = sum(strategy.compute_steps(u.steps) for u in arrived)
    check(c.trained_steps == steps, f"{c.trained_steps} steps counted as trained, the arrived tasks' are {steps}")
    refused = [(u.task.task_id, _deploy_refusal(strategy, sim, u)) for u in arrived]
    refused = [(task, why) for task, why in refused if why is not None]
    check(not refused, "updates a deployed server would reject (hetfl.deploy.validate; task, reason): " + str(refused[:3]))
    up = sum(u.task.bytes_up for u in arrived)
    check(c.bytes_up == up, f"{c.bytes_up} bytes counted up, the arrived tasks' uploads are {up}")
    check(c.failed > 0, "the scenario lost no task: the strategy dispatched too little for the check to mean anything")
    if cuts and rounds and getattr(strategy, "deadline_s", None) is not None:
        check(c.cancelled > 0, f"the round deadline of {strategy.deadline_s} s cut no straggler: does the strategy "
              "pass deadline_s to RoundStrategy?")
    return sim


# --------------------------------------------------------------------------- determinism and resume
def _deploy_refusal(strategy: Strategy, server: Any, update: Update) -> str | None:
    """Why a deployed server would reject ``update`` before its strategy sees it (:mod:`hetfl.deploy.validate`: the
    parameters against ``upload_reference``, the payload against ``expected_payload``, finite statistics), or None."""
    from hetfl.deploy.validate import check_payload, check_stats, check_update

    reference = strategy.upload_reference(server, update.task)
    return (check_update(update.params, reference=reference, max_norm=None)
            or check_payload(update.payload, strategy.expected_payload(server, update.task))
            or check_stats(update.stats))


def _resume(make: Callable[[], Strategy], model: str, seed: int, label: str) -> tuple[Simulator, Simulator]:
    """A straight run that saves its state mid-way, as ``checkpoint.pt``; and a fresh one resumed from it."""
    profiles = _harsh_profiles(seed)

    def build() -> Simulator:
        return _simulator(make(), [6] * 8, profiles, model=model, training=HARSH_TRAINING, seed=seed)

    saved: list[bytes] = []

    def save(sim: Simulator) -> None:
        if not saved and sim.version >= HARSH_ROUNDS // 2:
            buffer = io.BytesIO()
            try:
                torch.save({"state": sim.state}, buffer)
            except Exception as err:  # the checkpoint of a real run would fail the same way
                raise _fail(label, RESUME, f"seed {seed}", f"its state does not save: {type(err).__name__}: {err}")
            saved.append(buffer.getvalue())

    straight = _run(build(), HARSH_ROUNDS, save)
    if not saved:
        raise _fail(label, RESUME, f"seed {seed}", f"the run ended after {straight.version} aggregations, before the "
                    f"checkpoint at {HARSH_ROUNDS // 2} ({straight.stop_reason})")
    resumed = build()
    resumed.state = torch.load(io.BytesIO(saved[0]), weights_only=False)["state"]
    return straight, _run(resumed, HARSH_ROUNDS)


def _same_run(a: Simulator, b: Simulator, label: str, invariant: str, context: str) -> None:
    """The two runs ended in the same place: model, clock, counters, client states, bit for bit."""
    if not torch.equal(a.params, b.params):
        diff = float((a.params - b.params).abs().max()) if a.params.shape == b.params.shape else math.nan
        raise _fail(label, invariant, context, f"the models differ (largest difference {diff:.3g})")
    if (a.version, a.now) != (b.version, b.now):
        raise _fail(label, invariant, context, f"one ended at aggregation {a.version}, t = {a.now!r} s, the other at "
                    f"{b.version}, t = {b.now!r} s")
    for name in (f.name for f in dataclasses.fields(a.counters)):
        if name == "wasted_steps":  # work trained ahead and then cancelled: the engine's, not the run's (not state)
            continue
        if not _same(getattr(a.counters, name), getattr(b.counters, name)):
            raise _fail(label, invariant, context,
                        f"counters.{name} differ: {getattr(a.counters, name)!r} and {getattr(b.counters, name)!r}")
    clients = sorted(set(a.client_states) | set(b.client_states))
    for client in clients:
        if not _same(a.client_states.get(client), b.client_states.get(client)):
            raise _fail(label, invariant, context, f"client {client}'s state differs")


def _same(a: Any, b: Any) -> bool:
    """Equal, bit for bit, through dicts, lists and tuples of tensors and arrays."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------- learning
def _loss(sim: Simulator) -> float:
    """The global model's loss on all training data; without a global model, the mean of each client's own
    model's loss on its own data."""
    if sim.strategy.global_model:
        return float(F.cross_entropy(sim.trainer.predict(sim.params, sim.pool.x), sim.pool.y))
    losses = []
    for client in range(sim.n_clients):
        personal = sim.personal_model(client)
        trainer, params = personal if personal is not None else (sim.trainer, sim.params)
        data = sim.pool.data(client)
        losses.append(float(F.cross_entropy(trainer.predict(params, data.x), data.y)))
    return sum(losses) / len(losses)


def _learns(strategy: Strategy, model: str, label: str) -> None:
    sim = _simulator(strategy, [12] * 4, _easy_profiles(), model=model, training=EASY_TRAINING, seed=0)
    before = _loss(sim)
    _run(sim, LEARN_ROUNDS)
    after = _loss(sim)
    context = f"4 clients of separable blobs, {model}"
    if sim.version != LEARN_ROUNDS:
        raise _fail(label, LEARNS, context, f"made {sim.version} aggregations, not {LEARN_ROUNDS} ({sim.stop_reason})")
    if not after < LEARN_FACTOR * before:
        raise _fail(label, LEARNS, context, f"the loss went from {before:.4f} to {after:.4f} in {LEARN_ROUNDS} "
                    f"aggregations; expected below {LEARN_FACTOR * before:.4f}")


def _linear(make: Callable[[], Strategy], model: str, label: str) -> None:
    """A strategy that claims ``linear_aggregation`` (a deployment may then aggregate it securely) aggregates the
    same when every update is replaced by the updates' sample-weighted mean (:mod:`hetfl.strategies.checks`)."""
    from hetfl.strategies.checks import check_linear_aggregation

    def run(strategy: Strategy) -> None:
        profiles = [_profile(i, flops=1e6 * (1 + i % 3)) for i in range(5)]
        _run(_simulator(strategy, [6, 10, 14, 20, 8], profiles, model=model, training=HARSH_TRAINING, seed=0),
             LEARN_ROUNDS)

    if getattr(make(), "aggregate", None) is None:
        raise _fail(label, LINEAR, "", "it claims linear_aggregation but has no aggregate(server, updates) to hand "
                    "the securely aggregated updates to; only round-based strategies can claim it")
    try:
        check_linear_aggregation(make, run)
    except AssertionError as err:
        raise _fail(label, LINEAR, f"5 clients, 3 a round, {model}", str(err)) from None


__all__ = ["CHECKS", "CLAIMS", "StrategyReport", "check_strategy"]
